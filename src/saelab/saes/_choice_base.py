"""Shared base of the Feature Choice and Mutual Choice SAEs (Ayonrinde 2024; docs/methods.md §6;
``feature_choice.py``, ``mutual_choice.py``): their options and the experimental
``aux_zipf_loss`` (§6.4).

Both see a batch as a bipartite token–latent graph with affinities ``A = ReLU(π(X))`` and keep at
most ``k·B`` matches (§6.1):

- ``mutual_choice`` (§6.3): the global top ``k·B`` entries of ``A``, i.e. BatchTopK under its own
  name, with BatchTopK's scalar inference threshold (§4.8). Saves as SAELens ``jumprelu``.
- ``feature_choice`` (§6.2): latent ``j`` keeps the top ``m_j`` entries of its column of ``A``.
  Capacities ``m_j`` sum to ``k·B`` (``capacity``): ``uniform`` (every ``m_j`` is the
  floor or ceiling of ``k·B/M``, so the budget is spent exactly rather than overshot by the
  ceiling) or ``zipf`` — [U] parameterisation, our default: ``m_j ∝ 1/(rank_j + 1)^s`` with
  ``s = options.zipf_exponent``, where ``rank_j`` orders latents by their tracked firing
  frequency (most frequent first), each ``m_j`` clipped to ``[1, B]`` (``[0, B]`` if
  ``k·B < M``) by water-filling, then rounded by largest remainder. The capacity follows the
  rank the latent earned, so the allocation is self-reinforcing; ranks start in index order.
  Inference (§6.5, [U]): a per-latent threshold ``τ_j``, the EMA (``options.threshold_beta``) of the
  ``m_j``-th largest entry of column ``j`` (the column maximum for a latent with ``m_j = 0``).
  The spec writes ``f = A·1[A ≥ τ_j]``; ``encode`` uses the strict ``π > τ_j`` of the shared
  JumpReLU form so the saved SAELens ``jumprelu`` file computes exactly the same function. The
  two differ only on exact ties with ``τ_j``; at ``τ_j = 0`` both give ``ReLU(π)``.
  Data-parallel (``saelab.dist``): capacities are those of the global batch, and ``τ_j``
  (selection and inference estimate) is the global column's ``m_j``-th largest, gathered from
  every rank's local column top ``min(m_max, B/W)``; each rank keeps its positive entries
  ``≥ τ_j``, the single-process selection up to ties with ``τ_j``.

A latent whose pre-activations are all ≤ 0 over a batch has only zero affinities: it gets no
match, no gradient from the main loss, and the FC budget is underspent by its ``m_j`` (so the
total is ≤ ``k·B``, never forced onto zero entries). FC therefore rules out dead latents only
for latents that still see positive affinities (§6.2 note). Such a latent is reported as not
fired, so the dead-latent tracker counts it, but AuxK / aux_zipf_loss select ``ReLU(π)`` too and
give it no gradient either; only drift of ``b_dec`` can revive it. The spec's remedies (a small
bias, or selecting on pre-ReLU affinities) are [U] and not implemented.

``aux_zipf_loss`` (``aux_zipf``, off by default, both families). EXPERIMENTAL: the paper
names it but publishes no formula; this is the spec's proposal (§6.4), not the paper's loss.
The per-latent firing frequency ``ρ_j`` is an EMA (``zipf_freq_beta``) of the fraction
of batch tokens on which ``j`` fired. A Zipf curve ``ρ̃_r = C/(r + 1)^s`` is fitted by least
squares in log–log space to the ranked frequencies of the most frequent
``zipf_fit_fraction`` of latents (the low-frequency tail is excluded, as are zero
frequencies). Latents with ``ρ_j < κ·ρ̃_{rank(j)}`` (``κ = options.zipf_kappa``) are
*underutilised*; together with the trainer's dead latents they form the set on which AuxK
(§0.6) asks the top-``k_aux`` latents to reconstruct the residual, optionally scaling each
latent's code by its deficit ``(ρ̃ − ρ)/ρ̃`` (dead latents: weight 1). Until the frequency EMA
has seen ``1/(1 − β)`` updates the set is the dead set alone. When the set equals the dead set
the loss is AuxK exactly. With ``aux_zipf`` off both families use plain AuxK, like TopK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab import dist
from saelab.config import opt
from saelab.errors import ConfigError
from saelab.saes._topk_base import TopKOptions
from saelab.saes.sparse import SparseCode, auxk_loss


@dataclass
class ChoiceOptions(TopKOptions):
    """Feature Choice / Mutual Choice (docs/methods.md §6)."""

    capacity: str = opt(
        "uniform", "feature_choice capacity per latent: uniform (m = k*B/M, rounded so every "
        "m_j is floor or ceil of it and the total is k*B) or zipf (m_j proportional to "
        "1/(rank_j+1)^s by firing-frequency rank, normalised to k*B, each in [1, B]; the "
        "parameterisation is [U]).",
        choices=("uniform", "zipf"))
    zipf_exponent: float = opt(1.0, "s of the zipf capacity, and the fallback slope of "
                               "aux_zipf_loss's reference curve when it cannot be fitted ([U]).")
    aux_zipf: bool = opt(
        False, "EXPERIMENTAL, feature_choice / mutual_choice: aux_zipf_loss (§6.4) in place of "
        "AuxK. The formula is the spec's proposal, not the paper's (unpublished): AuxK restricted "
        "to latents firing below kappa x a Zipf fit of the ranked firing frequencies, plus the "
        "dead latents. Uses --aux-k and --aux-coefficient.")
    zipf_kappa: float = opt(0.5, "kappa of aux_zipf_loss: 'underutilised' below kappa x fit.")
    zipf_freq_beta: float = opt(
        0.99, "EMA factor of the per-latent firing frequency (one update per step; window "
        "~ 1/(1-beta) steps) behind the zipf capacity ranks and aux_zipf_loss ([U]).")
    zipf_fit_fraction: float = opt(
        0.5, "aux_zipf_loss fits the Zipf curve to this most frequent fraction of latents, "
        "leaving out the low-frequency tail it judges ([U]).")
    zipf_deficit_weight: bool = opt(
        False, "aux_zipf_loss: weight each latent by its deficit (fit - freq) / fit (§6.4 option).")

    def validate(self) -> None:
        super().validate()
        self.validate_choice()

    def validate_choice(self) -> None:
        if self.capacity not in ("uniform", "zipf"):
            raise ConfigError(f"--capacity must be uniform or zipf, got {self.capacity!r}")
        if not (0 <= self.zipf_freq_beta < 1 and 0 < self.zipf_fit_fraction <= 1
                and self.zipf_kappa > 0 and self.zipf_exponent >= 0):
            raise ConfigError("need 0 <= --zipf-freq-beta < 1, 0 < --zipf-fit-fraction <= 1, "
                              "--zipf-kappa > 0 and --zipf-exponent >= 0")


# ---- firing frequency and aux_zipf_loss (both families) --------------------------------------
class ZipfUsageMixin:
    """Tracks per-latent firing frequency and, with ``aux_zipf``, replaces AuxK with
    aux_zipf_loss (the spec's [U] proposal, §6.4; see the module docstring)."""

    firing_freq: Tensor
    freq_updates: Tensor

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self.cfg.options.validate_choice()
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
        # data-parallel: the global batch's rate (saelab.dist; plain `/ batch` otherwise)
        rate_F = dist.all_reduce_sum(rate_F) / dist.global_rows(batch)
        beta = self.cfg.options.zipf_freq_beta
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
        c = self.cfg.options
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
        c = self.cfg.options
        dead = (dead_mask_F if dead_mask_F is not None
                else torch.zeros(self.d_sae, dtype=torch.bool, device=self.firing_freq.device))
        ref_F = self.zipf_reference()
        ready = self.freq_updates >= math.ceil(1 / (1 - c.zipf_freq_beta))
        mask_F = (ready & (self.firing_freq < c.zipf_kappa * ref_F)) | dead
        if not c.zipf_deficit_weight:
            return mask_F, None
        deficit = ((ref_F - self.firing_freq) / ref_F).clamp(0, 1)
        return mask_F, torch.where(dead, torch.ones_like(deficit), deficit)

    def aux_loss(self, pre_BF: Tensor, residual_BD: Tensor, dead_mask_F: Tensor | None,
                 x_BD: Tensor | None = None) -> Tensor:
        t = self.cfg.options
        if not self.cfg.options.aux_zipf or t.aux_coefficient == 0:
            return super().aux_loss(pre_BF, residual_BD, dead_mask_F, x_BD)
        mask_F, weight_F = self.underutilised(dead_mask_F)
        aux = auxk_loss(pre_BF, residual_BD, self.W_dec, mask_F, self.k_aux,
                        scale_by_dead=t.aux_scale_by_dead, weight_F=weight_F)
        return self.normalize_aux(aux, residual_BD, x_BD)

    def training_state(self) -> dict[str, Tensor]:
        return {**super().training_state(), "firing_freq": self.firing_freq,
                "freq_updates": self.freq_updates}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_training_state(tensors)
        for name in ("firing_freq", "freq_updates"):
            if name in tensors:
                getattr(self, name).copy_(tensors[name])
