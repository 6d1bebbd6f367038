"""Feature Choice SAE (Ayonrinde 2024; docs/methods.md §6.2): latent ``j`` keeps the top ``m_j``
entries of its column of the batch affinities ``A = ReLU(π)``; capacities, their topk buckets
and the per-latent inference thresholds are here, options and ``aux_zipf_loss`` in
``_choice_base.py`` (whose docstring describes the method)."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab import dist
from saelab.saes._choice_base import ChoiceOptions, ZipfUsageMixin
from saelab.saes._topk_base import ThresholdedBatchSAE
from saelab.saes.registry import register
from saelab.saes.sparse import SparseCode, ragged_code

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



@register
class FeatureChoiceSAE(ZipfUsageMixin, ThresholdedBatchSAE):
    """Feature Choice: each latent keeps its top-m_j tokens of the batch (docs/methods.md §6.2)."""

    architecture = "feature_choice"
    Options = ChoiceOptions
    sweep_param = "options.k"
    sweep_levels = (16, 32, 64)

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self._plans: dict[tuple[int, str], tuple[Tensor, list[Bucket]]] = {}

    def _plan(self, batch: int, device: torch.device) -> tuple[Tensor, list[Bucket]]:
        """Capacities by rank and their topk buckets; depend only on (k, B, M, s): cached."""
        key = (batch, str(device))
        if key not in self._plans:
            c = self.cfg.options
            s = c.zipf_exponent if c.capacity == "zipf" else 0.0
            cap_R = rank_capacities(self.k * batch, self.d_sae, batch, s)
            self._plans[key] = (cap_R.to(device), plan_buckets(cap_R))
        return self._plans[key]

    def capacities(self, batch: int) -> Tensor:
        """``m_j`` per latent for a batch of ``batch`` tokens, from the current frequency ranks."""
        cap_R, _ = self._plan(batch, self.firing_freq.device)
        return torch.empty_like(cap_R).scatter_(0, self.frequency_order(), cap_R)

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        if dist.is_distributed():
            return self._select_train_global(pre_BF, step)
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

    def _select_train_global(self, pre_BF: Tensor, step: int) -> SparseCode:
        """:meth:`select_train` over the global batch of a data-parallel run (saelab.dist).

        Capacities are those of the global batch; per column the global ``m_j``-th largest
        affinity ``τ_j`` comes from every rank's local top ``min(m_max, B_local)`` of the
        column, and each rank keeps its positive entries ``>= τ_j``: the single-process set up
        to ties with ``τ_j`` (zero affinities, which that path keeps as value-0 slots when a
        column has fewer than ``m_j`` positive entries, are left out: they carry nothing)."""
        B, M = pre_BF.shape
        acts_BF = torch.relu(pre_BF.detach())
        cap_R, buckets = self._plan(dist.global_rows(B), pre_BF.device)
        order_R = self.frequency_order()
        cap_F = torch.empty_like(cap_R).scatter_(0, order_R, cap_R)
        tau_F = acts_BF.new_full((M,), torch.inf)  # m_j = 0: never matched
        for r0, r1, kmax in buckets:  # every rank runs the same buckets (global ranks, B)
            if r0 == 0 and r1 == M:
                lat_G = torch.arange(M, device=pre_BF.device)
                sub_BG = acts_BF
            else:
                lat_G = order_R[r0:r1]
                sub_BG = acts_BF.index_select(1, lat_G)
            cand_KG = sub_BG.topk(min(kmax, B), dim=0, sorted=False).values
            tau_F.index_copy_(0, lat_G, dist.global_column_kth_largest(cand_KG, cap_F[lat_G]))
        if self.estimating_threshold(step):
            est_F = tau_F
            if not buckets or buckets[-1][1] < M:  # m_j = 0: the global column max
                est_F = torch.where(cap_F > 0, tau_F, dist.all_reduce_max(acts_BF.amax(0)))
            self.update_threshold(est_F)
        idx = ((acts_BF >= tau_F) & (acts_BF > 0)).nonzero()  # row-major: grouped by row
        code = ragged_code(idx, torch.relu(pre_BF)[idx[:, 0], idx[:, 1]], B)
        self.track_firing(code, B)
        return code


def _group_by_row(rows: Tensor, cols: Tensor, vals: Tensor, batch: int) -> SparseCode:
    """Ragged ``SparseCode`` from (row, latent, value) triples; unmatched slots keep value 0."""
    rows, perm = rows.sort(stable=True)
    offsets = torch.searchsorted(rows, torch.arange(batch + 1, device=rows.device))
    return SparseCode(cols[perm], vals[perm], offsets)
