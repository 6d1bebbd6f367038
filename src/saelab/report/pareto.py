"""Sparsity–fidelity Pareto plots of a sweep (PNG, headless): one line per family.

L0 is on a log axis (levels usually span powers of two); each family's points are joined in
order of L0 and labelled with their level, so the trade-off each family offers reads left to
right. Points without a finite positive L0 or a finite metric are left out (a diverged run, or
CE metrics skipped).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saelab.evals.registry import pareto_axes
from saelab.fsutil import atomic_write_bytes
from saelab.plotting import pyplot


def pareto_plots() -> dict[str, tuple[str, str, bool]]:
    """file name -> (row key, y-axis label, higher is better), from the eval outputs' metric
    metadata (:func:`saelab.evals.registry.pareto_axes`)."""
    return pareto_axes()



#: the x axis of every Pareto plot: the sweep row's L0 column
X_KEY = "l0"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def family_series(rows: Sequence[Mapping[str, Any]], y: str
                  ) -> dict[str, list[tuple[float, float, Any]]]:
    """{family: [(L0, y, level), ...] sorted by L0}, plottable points only."""
    out: dict[str, list[tuple[float, float, Any]]] = {}
    for row in rows:
        x, v = row.get(X_KEY), row.get(y)
        if _finite(x) and x > 0 and _finite(v):
            out.setdefault(str(row["family"]), []).append((float(x), float(v), row.get("level")))
    return {f: sorted(pts, key=lambda p: p[0]) for f, pts in out.items()}


def plot_pareto(rows: Sequence[Mapping[str, Any]], y: str, path: Path, ylabel: str,
                title: str = "", higher_is_better: bool = False) -> Path:
    """L0 (log axis) against ``y``, one marked line per family, written to ``path``."""
    plt = pyplot()
    series = family_series(rows, y)
    # fixed margins, not tight_layout: these plots are redrawn after every run and text
    # layout dominates their cost
    fig = plt.figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_axes((0.1, 0.12, 0.86, 0.76))
    markers = "osD^v<>phX*"
    for i, (family, pts) in enumerate(sorted(series.items())):
        xs, ys, levels = zip(*pts, strict=True)
        ax.plot(xs, ys, marker=markers[i % len(markers)], ms=5, lw=1.4, label=family)
        for x, v, level in pts:
            ax.annotate(format(level, "g") if _finite(level) else str(level), (x, v),
                        textcoords="offset points", xytext=(4, 3), fontsize=6, alpha=0.7)
    if series:
        # deferred: matplotlib is heavy and only needed when a plot is drawn
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log", base=2)  # levels are usually powers of two apart
        # ticks at 2^n and 1.5 * 2^n; limits span > 1.5x so at least one is labelled
        ax.xaxis.set_major_locator(LogLocator(base=2, subs=(1.0, 1.5)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        xs_all = [x for pts in series.values() for x, _, _ in pts]
        ax.set_xlim(min(xs_all) / 1.3, max(xs_all) * 1.3)
        ax.legend(fontsize=8, frameon=False, ncol=2 if len(series) > 6 else 1)
    else:
        ax.text(0.5, 0.5, f"no runs with {y} yet", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_xlabel("L0 (mean active latents per token, log scale)")
    ax.set_ylabel(ylabel)
    better = "higher" if higher_is_better else "lower"
    ax.set_title((title + "\n" if title else "") + f"{better} is better; points labelled by level",
                 fontsize=9)
    ax.grid(True, which="major", alpha=0.25)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())  # rewritten after every run: never torn
    return Path(path)


def write_pareto_plots(rows: Sequence[Mapping[str, Any]], out_dir: Path,
                       title: str = "") -> list[Path]:
    """The sweep plots (today FVU, CE loss recovered, delta LM loss vs L0) in ``out_dir``."""
    return [plot_pareto(rows, key, Path(out_dir) / name, label, title, better)
            for name, (key, label, better) in pareto_plots().items()]
