"""JumpReLU SAE (Rajamanoharan et al. 2024; METHODS.md §3) — inference, loading and conversion.

::

    π = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc
    f = π ⊙ 1[π > θ]          (θ = ``threshold``, one per latent, ≥ 0)
    x̂ = f W_dec + b_dec

This family is the target of ``GatedSAE.to_jumprelu()`` (§2.6) and of loading Gemma Scope /
SAELens ``jumprelu`` folders. It is not trainable yet: training needs the straight-through
pseudo-derivatives for θ (§3.3), which are a later issue, so ``loss`` raises
``NotImplementedError`` (from the base class).

Thresholds are meant to be non-negative (§3.1; the gated conversion clips at 0). A negative θ
acts as θ = 0, i.e. a plain ReLU, exactly as SAELens computes ``ReLU(π) ⊙ 1[π > θ]``, so a
folder loads with the same function in both libraries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saelab.config import SAEConfig
from saelab.saes.base import SAE
from saelab.saes.registry import register


@register
class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    trainable = False
    # Gemma Scope convention (§0.2, §3.1): no pre-encoder bias.
    defaults = {"apply_b_dec_to_input": False}

    #: initial threshold of freshly built SAEs (§3.4)
    init_threshold = 1e-3

    def __init__(
        self,
        cfg: SAEConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(cfg, device=device, dtype=dtype)
        kw = {"device": device, "dtype": dtype}
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **kw))
        # A Parameter (not a buffer) so SAELens' state-dict layout matches and a future
        # trainer can learn it.
        self.threshold = nn.Parameter(torch.zeros(self.d_sae, **kw))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # §3.4 [R]: Kaiming-uniform unit-norm decoder, W_enc = W_decᵀ, zero biases, θ = 0.001.
        self.init_tied_(generator, row_norm=1.0)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(self.init_threshold)

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return self._input_for_encoder(x_BD, self.W_enc) + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        pi_BF = self.pre_acts(x_BD)
        # clamp: a negative θ behaves as ReLU, matching SAELens (see module docstring).
        return torch.where(pi_BF > self.threshold.clamp_min(0.0), pi_BF, 0.0)

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc", "threshold")

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        # §0.4 N3: scaling π_i by n_i and θ_i by n_i keeps the firing pattern; f_i·n_i times the
        # unit row d_i/n_i gives the same reconstruction. The clamp leaves all-zero rows alone.
        n_F = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec.div_(n_F[:, None])
        self.W_enc.mul_(n_F[None, :])
        self.b_enc.mul_(n_F)
        self.threshold.mul_(n_F)
