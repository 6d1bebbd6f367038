"""The computations of the dark-matter analysis (docs/methods.md §12) on in-memory activation rows.

Rows ``x_ND`` (float32, CPU) are already shuffled: rows ``[0, n_fit)`` are the fitting half,
the rest the held-out half on which every R² and FVU is reported. Every pass runs in chunks on
the analysis device; least squares accumulate float64 normal equations (bounded memory) and
solve once. An SAE enters as a *reconstruction function* ``x_BD -> (x̂_BD, l0_B)``, so the
SAE's own encoder and gradient pursuit on its decoder go through the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.analysis._dark_matter_lstsq import (
    F64,
    LinearMap,
    NormalEquations,
    R2Accumulator,
    fit_eval_r2,
    reduction,
)
from saelab.saes._gradient_pursuit import gp_encode

ReconFn = Callable[[Tensor], tuple[Tensor, Tensor]]
COMPONENTS = ("x", "x_hat", "e_lin", "e_nl")


def sae_recon_fn(sae) -> ReconFn:
    """The SAE's own reconstruction and per-token L0."""
    def fn(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        dev, dt = sae.W_dec.device, sae.W_dec.dtype
        f_BF = sae.encode(x_BD.to(dev, dt))
        return sae.decode(f_BF).to(x_BD.dtype), (f_BF != 0).sum(1)
    return fn


def gp_recon_fn(sae, chunk_rows: int = 1024) -> ReconFn:
    """Gradient pursuit on the SAE's decoder, each token to the L0 of the SAE's own encoder."""
    def fn(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        dev, dt = sae.W_dec.device, sae.W_dec.dtype
        x = x_BD.to(dev, dt)
        steps_B = (sae.encode(x) != 0).sum(1)
        f_BF = gp_encode(x, sae.W_dec, sae.b_dec, steps_B, chunk_rows)
        return sae.decode(f_BF).to(x_BD.dtype), (f_BF != 0).sum(1)
    return fn


def chunks(n: int, size: int, start: int = 0) -> Iterator[slice]:
    for a in range(start, n, size):
        yield slice(a, min(n, a + size))


@dataclass
class Decomposition:
    """One SAE's split ``x = x̂ + e_lin + e_nl`` (docs/methods.md §12.1) and its held-out metrics."""

    error_map: LinearMap  # x -> e   (A*, and b when fitted with an intercept)
    norm_map: LinearMap  # x -> ‖e‖²
    metrics: dict[str, float]
    #: per row (all rows, in order): err_norm, err_sq, nl_norm, lin_norm, l0, pred_err_sq, x_norm
    scalars: dict[str, Tensor] = field(default_factory=dict)

    def parts(self, x_BD: Tensor, recon_BD: Tensor) -> dict[str, Tensor]:
        e = x_BD - recon_BD
        e_lin = self.error_map.apply(x_BD)
        return {"x": x_BD, "x_hat": recon_BD, "e_lin": e_lin, "e_nl": e - e_lin}


def decompose(x_ND: Tensor, n_fit: int, recon_fn: ReconFn, *, intercept: bool = False,
              chunk_rows: int = 4096, device: torch.device | str = "cpu",
              rcond: float = 1e-9) -> Decomposition:
    """Fit ``e ≈ x A*`` and ``‖e‖² ≈ x a`` on rows ``[0, n_fit)``; report on the rest."""
    N, D = x_ND.shape
    if not 0 < n_fit < N:
        raise ValueError(f"need rows to fit and rows to evaluate (n_fit {n_fit}, rows {N})")
    ne = NormalEquations(D, D + 1, device=device)
    with torch.no_grad():
        for sl in chunks(n_fit, chunk_rows):
            x = x_ND[sl].to(device, torch.float32)
            e = x - recon_fn(x)[0]
            ne.update(x, torch.cat([e, (e.double() ** 2).sum(1, keepdim=True).float()], 1))
        err_map = ne.solve(rcond, intercept, slice(0, D))
        norm_map = ne.solve(rcond, intercept, slice(D, D + 1))
        vec, sq, fvu, fvu_nl = R2Accumulator(), R2Accumulator(), R2Accumulator(), R2Accumulator()
        worst = 0.0
        names = ("err_norm", "err_sq", "nl_norm", "lin_norm", "l0", "pred_err_sq", "x_norm")
        sc = {k: torch.zeros(N, dtype=F64) for k in names}
        for sl in chunks(N, chunk_rows):
            x = x_ND[sl].to(device, torch.float32)
            recon, l0 = recon_fn(x)
            xd, rd = x.double(), recon.double()
            e = xd - rd
            e_lin = err_map.apply(xd)
            e_nl = e - e_lin
            # the identity x = x̂ + e_lin + e_nl, checked in float64 relative to ‖x‖
            dev_ = ((rd + e_lin + e_nl) - xd).norm(dim=1) / xd.norm(dim=1).clamp_min(1e-30)
            worst = max(worst, float(dev_.max()))
            err_sq = (e * e).sum(1)
            pred_sq = norm_map.apply(xd)[:, 0]
            for k, v in (("err_norm", err_sq.sqrt()), ("err_sq", err_sq),
                         ("nl_norm", e_nl.norm(dim=1)), ("lin_norm", e_lin.norm(dim=1)),
                         ("l0", l0.double()), ("pred_err_sq", pred_sq), ("x_norm", xd.norm(dim=1))):
                sc[k][sl] = v.cpu()
            lo = max(sl.start, n_fit) - sl.start
            if lo < x.shape[0]:
                ev = slice(lo, None)
                vec.update(e[ev], e_lin[ev])
                sq.update(err_sq[ev], pred_sq[ev])
                fvu.update(xd[ev], rd[ev])
                fvu_nl.update(xd[ev], rd[ev] + e_lin[ev])
    f_tot, f_nl = 1.0 - fvu.pooled(), 1.0 - fvu_nl.pooled()
    metrics = {
        "r2_error_vector": vec.mean(),  # mean over dimensions (the reference's definition)
        "r2_error_vector_pooled": vec.pooled(),
        "r2_error_sq_norm": sq.mean(),
        "fvu": f_tot,
        "fvu_nonlinear": f_nl,
        "fvu_linear": f_tot - f_nl,
        "nonlinear_share_of_error": f_nl / f_tot if f_tot > 0 else math.nan,
        "l0": float(sc["l0"][n_fit:].mean()),
        "identity_max_rel_error": worst,
        "n_fit": float(n_fit),
        "n_eval": float(N - n_fit),
    }
    return Decomposition(err_map, norm_map, metrics, sc)


def norm_baselines(dec: Decomposition, tokens_N: Tensor, n_fit: int) -> dict[str, float]:
    """Held-out R² of ‖e‖² from simpler predictors, as in the reference's baseline comparison:
    ``[‖x‖, 1]``, ``[L0, 1]``, and the per-token-id mean of ‖e‖² (here estimated on the fitting
    half; token ids unseen there get the fitting half's overall mean)."""
    s = dec.scalars
    y = s["err_sq"]
    fit, ev = slice(0, n_fit), slice(n_fit, None)
    out = {}
    for name, key in (("act_norm", "x_norm"), ("l0", "l0")):
        out[f"r2_error_sq_norm_from_{name}"] = fit_eval_r2(s[key][fit, None], y[fit],
                                                          s[key][ev, None], y[ev])[0]
    tok = tokens_N.long()
    n_tok = int(tok.max()) + 1 if tok.numel() else 1
    sums = torch.zeros(n_tok, dtype=F64).index_add_(0, tok[fit], y[fit])
    counts = torch.bincount(tok[fit], minlength=n_tok).double()
    mean_tok = torch.where(counts > 0, sums / counts.clamp_min(1), y[fit].mean())
    acc = R2Accumulator()
    acc.update(y[ev], mean_tok[tok[ev]])
    out["r2_error_sq_norm_from_token_id"] = acc.mean()
    return out


def scaling_matrices(decs: list[Decomposition], n_fit: int) -> dict[str, list[list[float]]]:
    """Per-token scaling predictability across widths (docs/methods.md §12.3): for every pair (i, j),
    R² of ‖e_j‖ regressed on ``[‖e_i‖, 1]``, and the percentage of the remaining variance
    explained when ``‖e_nl,i‖`` is added; fitted on one half, scored on the other."""
    n = len(decs)
    r2 = [[math.nan] * n for _ in range(n)]
    pct = [[math.nan] * n for _ in range(n)]
    fit, ev = slice(0, n_fit), slice(n_fit, None)
    for i, di in enumerate(decs):
        xi = di.scalars["err_norm"][:, None]
        xi2 = torch.cat([xi, di.scalars["nl_norm"][:, None]], 1)
        for j, dj in enumerate(decs):
            y = dj.scalars["err_norm"]
            base = fit_eval_r2(xi[fit], y[fit], xi[ev], y[ev])[0]
            more = fit_eval_r2(xi2[fit], y[fit], xi2[ev], y[ev])[0]
            r2[i][j] = base
            pct[i][j] = 0.0 if base >= 1 else (more - base) / (1 - base) * 100
    return {"r2": r2, "nonlinear_pct_of_remaining": pct}


def power_law_fit(widths: list[float], fvus: list[float]) -> dict[str, float]:
    """Fit ``FVU ≈ c + a·W^(−m)`` with ``a, c ≥ 0``: for each ``m`` on a grid, (c, a) by
    non-negative least squares; keep the best. Needs at least three widths."""
    if len(widths) < 3:
        return {}
    w = torch.tensor(widths, dtype=F64)
    y = torch.tensor(fvus, dtype=F64)
    best = None
    for m in torch.linspace(0.01, 3.0, 600, dtype=F64):
        z = w ** (-m)
        cands = []
        zc, yc = z - z.mean(), y - y.mean()
        a = float((zc * yc).sum() / (zc * zc).sum().clamp_min(1e-300))
        cands.append((max(a, 0.0), None))
        cands.append((float((z * y).sum() / (z * z).sum()), 0.0))  # c = 0
        for a, c in cands:
            a = max(a, 0.0)
            c = max(float((y - a * z).mean()), 0.0) if c is None else c
            sse = float(((y - c - a * z) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, c, a, float(m))
    sse, c, a, m = best
    return {"c": c, "a": a, "m": m, "sse": sse}


def cross_maps(x_ND: Tensor, n_fit: int, target: tuple[ReconFn, Decomposition],
               sources: dict[str, tuple[Tensor, ReconFn, Decomposition]], *,
               combined: bool = True, intercept: bool = False, chunk_rows: int = 4096,
               device: torch.device | str = "cpu", rcond: float = 1e-9) -> dict:
    """Earlier-component linear maps (docs/methods.md §12.5b): regress the target's total error ``e``
    and nonlinear error ``e_nl`` on each component (x, x̂, e_lin, e_nl) of each source SAE
    (rows aligned with ``x_ND``), and, with ``combined``, on all sources' x̂ together.

    Returns ``{source: {component: {"e": {...}, "e_nl": {...}}}}`` with the held-out mean R²,
    pooled R² and ``reduction`` (share of the target's energy the map removes)."""
    t_fn, t_dec = target
    D = x_ND.shape[1]
    keys = [(s, c) for s in sources for c in COMPONENTS]
    if combined and len([s for s in sources if s != "self"]) > 1:
        keys.append(("combined", "x_hat"))

    def regressors(sl: slice) -> tuple[dict, Tensor]:
        x = x_ND[sl].to(device, torch.float32).double()
        tp = t_dec.parts(x, t_fn(x.float())[0].double())
        y = torch.cat([tp["x"] - tp["x_hat"], tp["e_nl"]], 1)
        comps = {}
        for name, (xs_ND, fn, dec) in sources.items():
            xs = xs_ND[sl].to(device, torch.float32).double()
            for c, v in dec.parts(xs, fn(xs.float())[0].double()).items():
                comps[(name, c)] = v
        if ("combined", "x_hat") in keys:
            comps[("combined", "x_hat")] = torch.cat(
                [comps[(s, "x_hat")] for s in sources if s != "self"], 1)
        return comps, y

    nes: dict = {}
    with torch.no_grad():
        for sl in chunks(n_fit, chunk_rows):
            comps, y = regressors(sl)
            for k in keys:
                if k not in nes:
                    nes[k] = NormalEquations(comps[k].shape[1], 2 * D, device=device)
                nes[k].update(comps[k], y)
        maps = {k: ne.solve(rcond, intercept) for k, ne in nes.items()}
        accs = {(k, t): R2Accumulator() for k in keys for t in ("e", "e_nl")}
        for sl in chunks(x_ND.shape[0], chunk_rows, start=n_fit):
            comps, y = regressors(sl)
            for k in keys:
                pred = maps[k].apply(comps[k])
                accs[(k, "e")].update(y[:, :D], pred[:, :D])
                accs[(k, "e_nl")].update(y[:, D:], pred[:, D:])
    out: dict = {}
    for (src, comp), t in accs:
        acc = accs[((src, comp), t)]
        out.setdefault(src, {}).setdefault(comp, {})[t] = {
            "r2": acc.mean(), "r2_pooled": acc.pooled(), "reduction": reduction(acc)}
    return out


def part_rows(x_ND: Tensor, recon_fn: ReconFn, dec: Decomposition, rows: slice,
              chunk_rows: int = 4096, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """``e_lin`` and ``e_nl`` (float32, CPU) of the given rows, to train SAEs on."""
    out: dict[str, list[Tensor]] = {"e_lin": [], "e_nl": []}
    with torch.no_grad():
        n = rows.stop - rows.start
        for sl in chunks(n, chunk_rows):
            x = x_ND[rows][sl].to(device, torch.float32)
            p = dec.parts(x.double(), recon_fn(x)[0].double())
            out["e_lin"].append(p["e_lin"].float().cpu())
            out["e_nl"].append(p["e_nl"].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def fvu_of(sae, x_ND: Tensor, chunk_rows: int = 4096) -> float:
    """Pooled FVU of an SAE on rows ``x_ND`` (about their own mean)."""
    acc = R2Accumulator()
    fn = sae_recon_fn(sae)
    with torch.no_grad():
        for sl in chunks(x_ND.shape[0], chunk_rows):
            x = x_ND[sl].to(sae.W_dec.device, torch.float32)
            acc.update(x, fn(x)[0])
    return 1.0 - acc.pooled()
