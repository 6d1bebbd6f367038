"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024; METHODS.md §6), with the experimental
``aux_zipf_loss`` (§6.4).

Both see a batch as a bipartite token–latent graph with affinities ``A = ReLU(π(X))`` and keep at
most ``k·B`` matches (§6.1):

- ``mutual_choice`` (§6.3): the global top ``k·B`` entries of ``A``, i.e. BatchTopK under its own
  name, with BatchTopK's scalar inference threshold (§4.8). Saves as SAELens ``jumprelu``.
- ``feature_choice`` (§6.2): latent ``j`` keeps the top ``m_j`` entries of its column of ``A``.
  Capacities ``m_j`` sum to ``k·B`` (``choice.capacity``): ``uniform`` (every ``m_j`` is the
  floor or ceiling of ``k·B/M``, so the budget is spent exactly rather than overshot by the
  ceiling) or ``zipf`` — [U] parameterisation, our default: ``m_j ∝ 1/(rank_j + 1)^s`` with
  ``s = choice.zipf_exponent``, where ``rank_j`` orders latents by their tracked firing
  frequency (most frequent first), each ``m_j`` clipped to ``[1, B]`` (``[0, B]`` if
  ``k·B < M``) by water-filling, then rounded by largest remainder. The capacity follows the
  rank the latent earned, so the allocation is self-reinforcing; ranks start in index order.
  Inference (§6.5, [U]): a per-latent threshold ``τ_j``, the EMA (``topk.threshold_beta``) of the
  ``m_j``-th largest entry of column ``j`` (the column maximum for a latent with ``m_j = 0``).
  The spec writes ``f = A·1[A ≥ τ_j]``; ``encode`` uses the strict ``π > τ_j`` of the shared
  JumpReLU form so the saved SAELens ``jumprelu`` file computes exactly the same function. The
  two differ only on exact ties with ``τ_j``; at ``τ_j = 0`` both give ``ReLU(π)``.

A latent whose pre-activations are all ≤ 0 over a batch has only zero affinities: it gets no
match, no gradient from the main loss, and the FC budget is underspent by its ``m_j`` (so the
total is ≤ ``k·B``, never forced onto zero entries). FC therefore rules out dead latents only
for latents that still see positive affinities (§6.2 note). Such a latent is reported as not
fired, so the dead-latent tracker counts it, but AuxK / aux_zipf_loss select ``ReLU(π)`` too and
give it no gradient either; only drift of ``b_dec`` can revive it. The spec's remedies (a small
bias, or selecting on pre-ReLU affinities) are [U] and not implemented.

``aux_zipf_loss`` (``choice.aux_zipf``, off by default, both families). EXPERIMENTAL: the paper
names it but publishes no formula; this is the spec's proposal (§6.4), not the paper's loss.
The per-latent firing frequency ``ρ_j`` is an EMA (``choice.zipf_freq_beta``) of the fraction
of batch tokens on which ``j`` fired. A Zipf curve ``ρ̃_r = C/(r + 1)^s`` is fitted by least
squares in log–log space to the ranked frequencies of the most frequent
``choice.zipf_fit_fraction`` of latents (the low-frequency tail is excluded, as are zero
frequencies). Latents with ``ρ_j < κ·ρ̃_{rank(j)}`` (``κ = choice.zipf_kappa``) are
*underutilised*; together with the trainer's dead latents they form the set on which AuxK
(§0.6) asks the top-``k_aux`` latents to reconstruct the residual, optionally scaling each
latent's code by its deficit ``(ρ̃ − ρ)/ρ̃`` (dead latents: weight 1). Until the frequency EMA
has seen ``1/(1 − β)`` updates the set is the dead set alone. When the set equals the dead set
the loss is AuxK exactly. With ``aux_zipf`` off both families use plain AuxK, like TopK.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.saes.registry import register
from saelab.saes.sparse import SparseCode, auxk_loss
from saelab.saes.topk import BatchTopKSAE, ThresholdedBatchSAE

#: (first rank, end rank, largest capacity) of a group of ranks selected with one topk
Bucket = tuple[int, int, int]


# ---- capacities (Feature Choice) ---------------------------------------------------------------
def rank_capacities(total: int, n_latents: int, batch: int, exponent: float) -> Tensor:
    """Integer capacity per frequency rank, ``∝ 1/(r+1)^exponent`` (0 = uniform), non-increasing.

    Each capacity lies in ``[lo, batch]`` (``lo = 1`` if ``total >= n_latents``, else 0) and they
    sum to ``min(total, n_latents·batch)``: water-filling finds the scale ``c`` with
    ``Σ clip(c·p_r, lo, batch) = total``, then largest-remainder rounding keeps the sum exact.
    """
    M = n_latents
    total = min(total, M * batch)
    p = (torch.arange(M, dtype=torch.float64) + 1).pow(-exponent)
    p /= p.sum()
    lo = 1.0 if total >= M else 0.0

    def spent(c: float) -> float:
        return float((c * p).clamp(lo, batch).sum())

    c_lo, c_hi = 0.0, total / float(p.min())  # spent(c_hi) = M·batch >= total
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if spent(mid) <= total:
            c_lo = mid
        else:
            c_hi = mid
        if c_hi - c_lo <= 1e-12 * c_hi:
            break
    a = (c_lo * p).clamp(lo, batch)
    cap = a.floor()
    short = int(round(total - float(cap.sum())))
    frac = torch.where(cap < batch, a - cap, -1.0)
    # stable: equal remainders favour the more frequent rank, keeping cap non-increasing
    top = frac.argsort(descending=True, stable=True)[:max(short, 0)]
    cap[top[frac[top] > 0]] += 1  # `> 0` only guards float noise; the sum stays <= total
    return cap.long()


def plan_buckets(cap_R: Tensor) -> list[Bucket]:
    """Split ranks (capacities non-increasing) into runs whose capacities exceed half the run's
    largest, so one topk per run wastes < 2x the budget; zero-capacity ranks are left out.
    ``uniform`` capacities (floor/ceil of one value >= 1) form a single run."""
    neg = (-cap_R).contiguous()
    out: list[Bucket] = []
    r, M = 0, len(cap_R)
    while r < M:
        kmax = int(cap_R[r])
        if kmax == 0:
            break
        # first rank with cap <= kmax // 2
        end = int(torch.searchsorted(neg, torch.tensor(-(kmax // 2)), side="left"))
        out.append((r, end, kmax))
        r = end
    return out


# ---- firing frequency and aux_zipf_loss (both families) --------------------------------------
class ZipfUsageMixin:
    """Tracks per-latent firing frequency and, with ``choice.aux_zipf``, replaces AuxK with
    aux_zipf_loss (the spec's [U] proposal, §6.4; see the module docstring)."""

    firing_freq: Tensor
    freq_updates: Tensor

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        c = self.cfg.choice
        if c.capacity not in ("uniform", "zipf"):
            raise ConfigError(f"--capacity must be uniform or zipf, got {c.capacity!r}")
        if not (0 <= c.zipf_freq_beta < 1 and 0 < c.zipf_fit_fraction <= 1 and c.zipf_kappa > 0
                and c.zipf_exponent >= 0):
            raise ConfigError("need 0 <= --zipf-freq-beta < 1, 0 < --zipf-fit-fraction <= 1, "
                              "--zipf-kappa > 0 and --zipf-exponent >= 0")
        # training-only state: checkpointed through training_state(), not saved with the SAE
        self.register_buffer("firing_freq", torch.zeros(self.d_sae, device=device),
                             persistent=False)
        self.register_buffer("freq_updates", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.firing_freq.zero_()
        self.freq_updates.zero_()

    @torch.no_grad()
    def track_firing(self, code: SparseCode, batch: int) -> None:
        """Fold this batch's firing rate per latent into the EMA (training only; no host sync)."""
        if not self.training:
            return
        fired = (code.vals != 0).to(self.firing_freq.dtype).flatten()
        rate_F = torch.zeros_like(self.firing_freq).index_add_(0, code.idx.flatten(), fired)
        rate_F /= batch
        beta = self.cfg.choice.zipf_freq_beta
        first = self.freq_updates == 0
        self.firing_freq.copy_(torch.where(first, rate_F,
                                           beta * self.firing_freq + (1 - beta) * rate_F))
        self.freq_updates.add_(1)

    def frequency_order(self) -> Tensor:
        """Latent at each rank, most frequent first (ties: lower index first)."""
        return self.firing_freq.argsort(descending=True, stable=True)

    @torch.no_grad()
    def zipf_reference(self) -> Tensor:
        """``ρ̃_{rank(j)}`` per latent: the Zipf curve fitted to the ranked head frequencies."""
        c = self.cfg.choice
        M = self.d_sae
        freq_R, order_R = self.firing_freq.sort(descending=True, stable=True)
        ranks = torch.arange(M, device=freq_R.device)
        x_R = torch.log1p(ranks.to(freq_R.dtype))
        w_R = ((ranks < math.ceil(c.zipf_fit_fraction * M)) & (freq_R > 0)).to(freq_R.dtype)
        y_R = torch.log(freq_R.clamp_min(torch.finfo(freq_R.dtype).tiny))
        n = w_R.sum().clamp_min(1)
        mx, my = (w_R * x_R).sum() / n, (w_R * y_R).sum() / n
        sxx = (w_R * (x_R - mx) ** 2).sum()
        sxy = (w_R * (x_R - mx) * (y_R - my)).sum()
        # fewer than two distinct fitted ranks: fall back to the configured slope
        slope = torch.where(sxx > 1e-9, sxy / sxx.clamp_min(1e-9),
                            torch.full_like(sxx, -c.zipf_exponent))
        fit_R = torch.exp(my + slope * (x_R - mx))
        return torch.empty_like(fit_R).scatter_(0, order_R, fit_R)

    @torch.no_grad()
    def underutilised(self, dead_mask_F: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """aux_zipf_loss's latent set (underutilised ∪ dead) and optional deficit weights."""
        c = self.cfg.choice
        dead = (dead_mask_F if dead_mask_F is not None
                else torch.zeros(self.d_sae, dtype=torch.bool, device=self.firing_freq.device))
        ref_F = self.zipf_reference()
        ready = self.freq_updates >= math.ceil(1 / (1 - c.zipf_freq_beta))
        mask_F = (ready & (self.firing_freq < c.zipf_kappa * ref_F)) | dead
        if not c.zipf_deficit_weight:
            return mask_F, None
        deficit = ((ref_F - self.firing_freq) / ref_F).clamp(0, 1)
        return mask_F, torch.where(dead, torch.ones_like(deficit), deficit)

    def aux_loss(self, pre_BF: Tensor, residual_BD: Tensor, dead_mask_F: Tensor | None) -> Tensor:
        t = self.cfg.topk
        if not self.cfg.choice.aux_zipf or t.aux_coefficient == 0:
            return super().aux_loss(pre_BF, residual_BD, dead_mask_F)
        mask_F, weight_F = self.underutilised(dead_mask_F)
        return auxk_loss(pre_BF, residual_BD, self.W_dec, mask_F, self.k_aux,
                         scale_by_dead=t.aux_scale_by_dead, weight_F=weight_F)

    def training_state(self) -> dict[str, Tensor]:
        return {**super().training_state(), "firing_freq": self.firing_freq,
                "freq_updates": self.freq_updates}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_training_state(tensors)
        for name in ("firing_freq", "freq_updates"):
            if name in tensors:
                getattr(self, name).copy_(tensors[name])


# ---- the two families --------------------------------------------------------------------------
@register
class MutualChoiceSAE(ZipfUsageMixin, BatchTopKSAE):
    """Mutual Choice: BatchTopK's global top-k·B under its own name (METHODS §6.3)."""

    architecture = "mutual_choice"
    sweep_param = "topk.k"
    sweep_levels = (16, 32, 64)

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        code = super().select_train(pre_BF, step)
        self.track_firing(code, pre_BF.shape[0])
        return code


@register
class FeatureChoiceSAE(ZipfUsageMixin, ThresholdedBatchSAE):
    """Feature Choice: each latent keeps its top-m_j tokens of the batch (METHODS §6.2)."""

    architecture = "feature_choice"
    sweep_param = "topk.k"
    sweep_levels = (16, 32, 64)

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self._plans: dict[tuple[int, str], tuple[Tensor, list[Bucket]]] = {}

    def _plan(self, batch: int, device: torch.device) -> tuple[Tensor, list[Bucket]]:
        """Capacities by rank and their topk buckets; depend only on (k, B, M, s): cached."""
        key = (batch, str(device))
        if key not in self._plans:
            c = self.cfg.choice
            s = c.zipf_exponent if c.capacity == "zipf" else 0.0
            cap_R = rank_capacities(self.k * batch, self.d_sae, batch, s)
            self._plans[key] = (cap_R.to(device), plan_buckets(cap_R))
        return self._plans[key]

    def capacities(self, batch: int) -> Tensor:
        """``m_j`` per latent for a batch of ``batch`` tokens, from the current frequency ranks."""
        cap_R, _ = self._plan(batch, self.firing_freq.device)
        return torch.empty_like(cap_R).scatter_(0, self.frequency_order(), cap_R)

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        B, M = pre_BF.shape
        acts_BF = torch.relu(pre_BF)
        cap_R, buckets = self._plan(B, pre_BF.device)
        order_R = self.frequency_order()
        estimating = self.estimating_threshold(step)
        est_F = acts_BF.new_full((M,), torch.inf)
        rows, cols, vals = [], [], []
        for r0, r1, kmax in buckets:
            if r0 == 0 and r1 == M:  # one bucket (uniform): no column gather needed
                lat_G = torch.arange(M, device=pre_BF.device)
                cap_G = torch.empty_like(cap_R).scatter_(0, order_R, cap_R)
                sub_BG = acts_BF
            else:
                lat_G, cap_G = order_R[r0:r1], cap_R[r0:r1]
                sub_BG = acts_BF.index_select(1, lat_G)
            v_KG, row_KG = sub_BG.topk(kmax, dim=0)  # sorted: row i is the (i+1)-th largest
            keep_KG = torch.arange(kmax, device=pre_BF.device)[:, None] < cap_G
            vals.append(torch.where(keep_KG, v_KG, 0.0).flatten())
            rows.append(row_KG.flatten())
            cols.append(lat_G.expand(kmax, -1).flatten())
            if estimating:  # the m_j-th largest affinity of each column
                est_F.index_copy_(0, lat_G, v_KG.detach().gather(0, (cap_G - 1)[None]).squeeze(0))
        if estimating:
            r_zero = buckets[-1][1] if buckets else 0
            if r_zero < M:  # m_j = 0: never matched in training, so threshold at the column max
                lat_Z = order_R[r_zero:]
                est_F.index_copy_(0, lat_Z, acts_BF.detach().index_select(1, lat_Z).amax(0))
            self.update_threshold(est_F)
        code = _group_by_row(torch.cat(rows), torch.cat(cols), torch.cat(vals), B)
        self.track_firing(code, B)
        return code


def _group_by_row(rows: Tensor, cols: Tensor, vals: Tensor, batch: int) -> SparseCode:
    """Ragged ``SparseCode`` from (row, latent, value) triples; unmatched slots keep value 0."""
    rows, perm = rows.sort(stable=True)
    offsets = torch.searchsorted(rows, torch.arange(batch + 1, device=rows.device))
    return SparseCode(cols[perm], vals[perm], offsets)
