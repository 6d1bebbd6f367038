"""Plots of `saelab darkmatter` (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saelab.plotting import pyplot


def write_plots(r: dict, dec, n_fit: int, out: Path) -> list[str]:
    """Predicted vs true ‖e‖², the per-token scaling R² heatmaps, FVU vs width (split and
    fit), and GP before/after; returns the files written."""
    plt = pyplot()
    files = []

    # predicted vs true ‖e‖² on held-out rows
    y = dec.scalars["err_sq"][n_fit:]
    p = dec.scalars["pred_err_sq"][n_fit:]
    sel = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:20_000]
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    ax.scatter(y[sel].numpy(), p[sel].numpy(), s=2, alpha=0.3, color="#3b6ea8", lw=0)
    lo, hi = float(y.min()), float(y.max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls=":")
    ax.set_xlabel("true ‖e‖² (held out)")
    ax.set_ylabel("linear prediction from x")
    ax.set_title(f"R² = {r['decomposition']['r2_error_sq_norm']:.3f}")
    fig.tight_layout()
    files.append(_save(fig, plt, out / "error_norm_prediction.png"))

    s = r.get("scaling")
    if s:
        labels = [str(int(w)) for w in s["widths"]]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
        for ax, key, title in ((axes[0], "r2", "R² of ‖e_j‖ from [‖e_i‖, 1]"),
                               (axes[1], "nonlinear_pct_of_remaining",
                                "% of the rest explained by ‖e_nl,i‖")):
            m = np.array(s[key], dtype=float)
            m[np.tril_indices(len(m), k=-1)] = np.nan
            im = ax.imshow(m, cmap="viridis")
            fig.colorbar(im, ax=ax)
            ax.set_xticks(range(len(labels)), labels, rotation=45)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("width j (target)")
            ax.set_ylabel("width i (regressor)")
            ax.set_title(title, fontsize=9)
            for i in range(len(m)):
                for j in range(i, len(m)):
                    ax.text(j, i, f"{m[i, j]:.2f}" if key == "r2" else f"{m[i, j]:.0f}",
                            ha="center", va="center", fontsize=6, color="w")
        fig.tight_layout()
        files.append(_save(fig, plt, out / "per_token_scaling.png"))

        w = np.array(s["widths"])
        fig, ax = plt.subplots(figsize=(5, 3.8), dpi=120)
        ax.plot(w, s["fvu"], "o-", label="FVU (x̂)")
        ax.plot(w, s["fvu_nonlinear"], "s-", label="nonlinear FVU (x̂ + e_lin)")
        ax.plot(w, s["fvu_linear"], "^-", label="linear part")
        ww = np.geomspace(w.min(), w.max(), 100)
        for key, style in (("fit_fvu", "--"), ("fit_fvu_nonlinear", ":")):
            f = s.get(key) or {}
            if f:
                ax.plot(ww, f["c"] + f["a"] * ww ** (-f["m"]), style, color="grey",
                        label=f"fit c={f['c']:.3f} a={f['a']:.2f} m={f['m']:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("SAE width")
        ax.set_ylabel("FVU (held out)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, plt, out / "fvu_vs_width.png"))

    g = r.get("gradient_pursuit")
    if g:
        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
        names = ["FVU", "nonlinear FVU", "linear part"]
        keys = ["fvu", "fvu_nonlinear", "fvu_linear"]
        xs = range(len(keys))
        ax.bar([i - 0.2 for i in xs], [g["sae"][k] for k in keys], 0.4, label="SAE encoder")
        ax.bar([i + 0.2 for i in xs], [g["gp"][k] for k in keys], 0.4, label="gradient pursuit")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("held-out fraction of variance")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(_save(fig, plt, out / "gradient_pursuit.png"))
    return files


def _save(fig, plt, path: Path) -> str:
    fig.savefig(path)
    plt.close(fig)
    return str(path)
