"""Exact least squares over streamed rows, and held-out R² / FVU accumulators (float64).

Ordinary least squares ``min_A Σ_t ‖y_t − x_t A‖²`` needs only ``XᵀX`` and ``XᵀY``: both are
accumulated in float64 batch by batch (memory ``K² + K·M`` however many rows), and solved once
through an eigendecomposition of ``XᵀX`` with a relative cut-off, which gives the minimum-norm
solution for rank-deficient regressors (as ``torch.linalg.lstsq`` with the ``gelsd`` driver).
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


class NormalEquations:
    """Streamed ``XᵀX``, ``XᵀY``, ``ΣX``, ``ΣY`` (float64). Solve with or without an intercept
    (a column of ones appended to X) from the same sums, for any subset of the Y columns."""

    def __init__(self, k: int, m: int, device: torch.device | str = "cpu"):
        self.k, self.m = k, m
        self.xtx = torch.zeros(k, k, dtype=F64, device=device)
        self.xty = torch.zeros(k, m, dtype=F64, device=device)
        self.sx = torch.zeros(k, dtype=F64, device=device)
        self.sy = torch.zeros(m, dtype=F64, device=device)
        self.n = 0

    def update(self, x_BK: Tensor, y_BM: Tensor) -> None:
        x = x_BK.to(self.xtx.device, F64).reshape(x_BK.shape[0], -1)
        y = y_BM.to(x.device, F64).reshape(x.shape[0], -1)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.n += x.shape[0]

    def solve(self, rcond: float = 1e-9, intercept: bool = False,
              cols: slice | None = None) -> LinearMap:
        """The least-squares map for Y columns ``cols`` (all by default). ``rcond`` is relative
        to the largest singular value of X (the eigenvalues of ``XᵀX`` are cut at ``rcond²``
        of the largest, floored at float64 round-off)."""
        if self.n == 0:
            raise ValueError("least squares on zero rows")
        cols = cols if cols is not None else slice(None)
        xtx, xty = self.xtx, self.xty[:, cols]
        if intercept:
            n = torch.tensor([[float(self.n)]], dtype=F64, device=xtx.device)
            xtx = torch.cat([torch.cat([xtx, self.sx[:, None]], 1),
                             torch.cat([self.sx[None, :], n], 1)], 0)
            xty = torch.cat([xty, self.sy[None, cols]], 0)
        evals, evecs = torch.linalg.eigh(xtx)
        cut = float(evals.max().clamp_min(0)) * max(rcond**2, xtx.shape[0] * 2.3e-16)
        inv = torch.where(evals > cut, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
        sol = evecs @ (inv[:, None] * (evecs.T @ xty))
        if intercept:
            return LinearMap(sol[:-1], sol[-1])
        return LinearMap(sol, torch.zeros(sol.shape[1], dtype=F64, device=sol.device))


class LinearMap:
    """``y ≈ x A + b`` (float64 weights; ``apply`` returns the input's dtype)."""

    def __init__(self, A_KM: Tensor, b_M: Tensor):
        self.A_KM, self.b_M = A_KM, b_M

    def to(self, device, dtype=F64) -> LinearMap:
        return LinearMap(self.A_KM.to(device, dtype), self.b_M.to(device, dtype))

    def apply(self, x_BK: Tensor) -> Tensor:
        A, b = self.A_KM.to(x_BK.device, x_BK.dtype), self.b_M.to(x_BK.device, x_BK.dtype)
        return x_BK @ A + b


class R2Accumulator:
    """Held-out R² per output dimension, ``1 − SS_res/SS_tot`` with ``SS_tot`` about the
    held-out mean; ``mean()`` is the mean over dimensions (the reference code's vector R²) and
    ``pooled()`` the pooled variance explained (``1 − FVU``). Sums are shifted by the first
    batch's mean so that ``SS_tot`` does not cancel catastrophically."""

    def __init__(self):
        self.n = 0
        self.shift = self.s1 = self.s2 = self.ss_res = self.ss_raw = None

    def update(self, y_BM: Tensor, pred_BM: Tensor) -> None:
        y = y_BM.to(F64).reshape(y_BM.shape[0], -1)
        p = pred_BM.to(F64).reshape(y.shape)
        if self.shift is None:
            self.shift = y.mean(0)
            z = torch.zeros_like(self.shift)
            self.s1, self.s2, self.ss_res, self.ss_raw = z.clone(), z.clone(), z.clone(), z.clone()
        yc = y - self.shift
        self.s1 += yc.sum(0)
        self.s2 += (yc * yc).sum(0)
        self.ss_res += ((y - p) ** 2).sum(0)
        self.ss_raw += (y * y).sum(0)
        self.n += y.shape[0]

    def ss_tot(self) -> Tensor:
        return self.s2 - self.s1 * self.s1 / max(self.n, 1)

    def per_dim(self) -> Tensor:
        return 1.0 - self.ss_res / self.ss_tot().clamp_min(1e-300)

    def mean(self) -> float:
        return float(self.per_dim().mean())

    def pooled(self) -> float:
        return 1.0 - float(self.ss_res.sum() / self.ss_tot().sum().clamp_min(1e-300))


def reduction(acc: R2Accumulator) -> float:
    """``1 − Σ‖y − ŷ‖² / Σ‖y‖²``: the share of the target's energy (not its variance about the
    mean) that the prediction removes."""
    return 1.0 - float(acc.ss_res.sum() / acc.ss_raw.sum().clamp_min(1e-300))


def fit_eval_r2(x_fit: Tensor, y_fit: Tensor, x_eval: Tensor, y_eval: Tensor,
                intercept: bool = True, rcond: float = 1e-9) -> tuple[float, LinearMap]:
    """Fit on one set, return the held-out mean R² on the other (small in-memory problems)."""
    x_fit = x_fit.reshape(x_fit.shape[0], -1)
    ne = NormalEquations(x_fit.shape[1], y_fit.reshape(y_fit.shape[0], -1).shape[1])
    ne.update(x_fit, y_fit)
    fmap = ne.solve(rcond, intercept=intercept)
    acc = R2Accumulator()
    acc.update(y_eval, fmap.apply(x_eval.reshape(x_eval.shape[0], -1).to(F64)))
    return acc.mean(), fmap
