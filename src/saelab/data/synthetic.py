"""Synthetic activations generated from a known dictionary: the ground truth of `saelab synth`.

Model (all of it fixed by ``seed``)::

    x = Σ_i c_i d_i + offset + noise

- ``d_i`` (``directions_MD``, ``M = n_features``): unit vectors in ``R^d``, normalised Gaussians;
  with ``coherence = c`` each is ``normalise(√c·u + √(1−c)·g_i)`` for one shared unit ``u``,
  so the mean pairwise cosine is about ``c``.
- Feature ``i`` fires with probability ``p_i = min(p_max, a/(i+1)^s)`` (Zipf-like), ``a`` chosen
  so ``Σ p_i = mean_active``: the true mean L0 is exactly ``mean_active``.
- Firing is a Gaussian copula: feature ``i`` fires iff ``z_i < Φ⁻¹(p_i)`` with ``z ~ N(0, Σ)``;
  ``Σ`` has correlation ``group_correlation`` inside groups of ``group_size`` consecutive
  features and 0 elsewhere. Marginal probabilities are exact whatever the correlation. Without
  groups this is independent Bernoulli(``p_i``) firing, drawn directly.
- Active magnitudes: ``U(0.5, 1.5)``, ``Exp(1)`` or ``1``; ``signed`` flips each to ``±`` at
  random. Inactive coefficients are exactly 0.
- ``offset``: a fixed random direction of norm ``offset_norm``; ``noise``: i.i.d.
  ``N(0, noise_std²)`` per dimension.

Synthetic "LM-loss gradient" (for families with ``uses_lm_grads``, g-SAE §7): the fixed
quadratic readout loss ``L(x) = ½ Σ_i w_i ⟨d_i, x − offset⟩²`` with per-feature importances
``w_i`` log-uniform in [0.01, 1] (``importance_M``; a random, seeded subset of features matters
up to 100x more than others). Its gradient is ``g = Σ_i w_i ⟨d_i, x − offset⟩ d_i``, so
``|g·d_j|`` is large exactly for important active features, the quantity g-SAE's selection
uses. The loss is invented for this benchmark; it is not an LM's.

Determinism: training batch ``i`` is a pure function of ``(seed, "train", i, batch_size)``
(a fresh generator per batch), so the stream can start anywhere and a resumed Trainer sees the
same data. The held-out set and the sample used for initialisation come from their own keys
(``"heldout"``, ``"init"``), never from a training batch's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from saelab.config import SyntheticDataOptions

#: U(low, high) of the "uniform" magnitude distribution (mean 1, bounded away from 0 so an
#: active feature is always visible above small noise)
UNIFORM_MAGNITUDE = (0.5, 1.5)
#: range of the log-uniform importances of the synthetic readout loss
IMPORTANCE_RANGE = (0.01, 1.0)


def key_seed(*key: object) -> int:
    """A 63-bit generator seed determined by ``key`` (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def zipf_probabilities(n: int, mean_active: float, exponent: float, cap: float) -> Tensor:
    """``p_i = min(cap, a/(i+1)^s)`` with ``a`` set so ``Σ p = mean_active`` (float64 [n]).

    Bisection on ``a``: the sum is continuous and increasing in ``a``, reaching ``n·cap``.
    """
    if not 0 < mean_active <= cap * n:
        raise ValueError(f"mean_active must be in (0, cap*n = {cap * n}], got {mean_active}")
    r = (torch.arange(n, dtype=torch.float64) + 1).pow(-exponent)
    lo, hi = 0.0, cap / float(r.min())  # at hi every p is capped: sum = cap*n >= mean_active
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((mid * r).clamp(max=cap).sum()) < mean_active:
            lo = mid
        else:
            hi = mid
    return (hi * r).clamp(max=cap)


class SyntheticSample(NamedTuple):
    x: Tensor  # [N, d]
    codes: Tensor  # [N, M], the true coefficients


class SyntheticData:
    """The dictionary and its sampler; see the module docstring."""

    def __init__(self, opts: SyntheticDataOptions, seed: int = 0):
        opts.validate()
        self.opts, self.seed = opts, seed
        g = torch.Generator().manual_seed(key_seed("dictionary", seed))
        M, d = opts.n_features, opts.d
        dirs = torch.randn(M, d, generator=g, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        shared = torch.randn(d, generator=g, dtype=torch.float64)
        shared = shared / shared.norm()
        if opts.coherence > 0:
            c = opts.coherence
            dirs = math.sqrt(c) * shared + math.sqrt(1 - c) * dirs
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        self.directions_MD = dirs.float()
        offset = torch.randn(d, generator=g, dtype=torch.float64)
        self.offset_D = (offset / offset.norm() * opts.offset_norm).float()
        self.firing_prob_M = zipf_probabilities(M, opts.mean_active, opts.frequency_exponent,
                                                opts.max_firing_prob).float()
        lo, hi = IMPORTANCE_RANGE
        u = torch.rand(M, generator=g, dtype=torch.float64)
        self.importance_M = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).float()
        self._z_threshold_M = torch.special.ndtri(self.firing_prob_M.double()).float()
        self.n_groups = math.ceil(M / opts.group_size) if opts.group_size > 0 else 0

    @property
    def d(self) -> int:
        return self.opts.d

    @property
    def n_features(self) -> int:
        return self.opts.n_features

    @property
    def true_l0(self) -> float:
        """Expected number of active features per sample."""
        return float(self.firing_prob_M.double().sum())

    # ---- sampling ------------------------------------------------------------------------------
    def sample(self, n: int, *key: object) -> SyntheticSample:
        """``n`` samples drawn with a generator seeded by ``(seed, *key)``."""
        o = self.opts
        g = torch.Generator().manual_seed(key_seed("sample", self.seed, *key))
        M = o.n_features
        if self.n_groups and o.group_correlation > 0:
            z = torch.randn(n, M, generator=g)
            h = torch.randn(n, self.n_groups, generator=g)
            rho = o.group_correlation
            z = math.sqrt(rho) * h[:, torch.arange(M) // o.group_size] + math.sqrt(1 - rho) * z
            active = z < self._z_threshold_M
        else:  # independent features: the same law without the normal draws
            active = torch.rand(n, M, generator=g) < self.firing_prob_M
        # magnitudes only for the active entries (~mean_active per row, not M)
        nnz = int(active.sum())
        if o.magnitude == "uniform":
            lo, hi = UNIFORM_MAGNITUDE
            mag = lo + (hi - lo) * torch.rand(nnz, generator=g)
        elif o.magnitude == "exponential":
            mag = torch.empty(nnz).exponential_(1.0, generator=g)
        else:
            mag = torch.ones(nnz)
        if o.signed:
            mag = torch.where(torch.rand(nnz, generator=g) < 0.5, -mag, mag)
        codes = torch.zeros(n, M)
        codes[active] = mag
        x = codes @ self.directions_MD + self.offset_D
        if o.noise_std > 0:
            x = x + o.noise_std * torch.randn(n, o.d, generator=g)
        return SyntheticSample(x, codes)

    def readout_grad(self, x_ND: Tensor) -> Tensor:
        """Gradient of the synthetic loss ``½ Σ_i w_i ⟨d_i, x − offset⟩²`` at each row."""
        D = self.directions_MD.to(x_ND)
        proj_NM = (x_ND - self.offset_D.to(x_ND)) @ D.T
        return (proj_NM * self.importance_M.to(x_ND)) @ D

    def readout_loss(self, x_ND: Tensor) -> Tensor:
        """Per-row value of the synthetic loss (for tests and documentation)."""
        proj_NM = (x_ND - self.offset_D.to(x_ND)) @ self.directions_MD.to(x_ND).T
        return 0.5 * (proj_NM.pow(2) * self.importance_M.to(x_ND)).sum(-1)

    def batch(self, i: int, batch_size: int) -> SyntheticSample:
        """Training batch ``i`` (a pure function of the seed, ``i`` and ``batch_size``)."""
        return self.sample(batch_size, "train", batch_size, i)

    def batches(self, batch_size: int, start: int = 0, with_grads: bool = False
                ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Endless training stream from batch ``start``: ``x_BD``, or ``(x_BD, grad_BD)``."""
        i = start
        while True:
            x = self.batch(i, batch_size).x
            yield (x, self.readout_grad(x)) if with_grads else x
            i += 1

    def heldout(self, n: int) -> SyntheticSample:
        """The held-out set: its own seed stream, true codes kept."""
        return self.sample(n, "heldout")

    def init_sample(self, n: int) -> Tensor:
        """Rows for norm-scale estimation and ``b_dec`` init (neither training nor held-out)."""
        return self.sample(n, "init").x

    def describe(self) -> dict[str, float]:
        """Summary facts of the ground truth (for synth.json)."""
        cos = self.directions_MD @ self.directions_MD.T
        off = cos[~torch.eye(self.n_features, dtype=torch.bool)]
        return {
            "true_l0": self.true_l0,
            "max_firing_prob": float(self.firing_prob_M.max()),
            "min_firing_prob": float(self.firing_prob_M.min()),
            "mean_abs_cos": float(off.abs().mean()) if off.numel() else 0.0,
            "max_abs_cos": float(off.abs().max()) if off.numel() else 0.0,
        }
