"""ReLU SAE with an L1 penalty (docs/methods.md §1), in two variants.

- ``april`` (default; Anthropic April-2024 update, [R]): no pre-encoder bias, sparsity penalty
  ``λ Σ_i f_i ‖d_i‖`` with no decoder-norm constraint (N2), decoder rows initialised at norm
  ``init_decoder_norm`` (0.1, as SAELens and dictionary_learning), ``W_enc = W_decᵀ``.
- ``tm`` (Towards Monosemanticity): ``b_dec`` subtracted before encoding, plain L1 with unit-norm
  decoder rows (N1). Neuron resampling (§1.4, [U] in detail) is not implemented yet.

Both initialise ``b_dec`` from data (``b_dec_init``, geometric median by default; §0.7).

Loss scale: per-token SSE averaged over the batch, on inputs normalised so that
``E‖x‖ = √d`` by default (§0.3); the default ``λ`` assumes that scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE, LossOutput
from saelab.saes.registry import register


@dataclass
class ReLUOptions:
    """ReLU SAE: no options of its own (--l1-coefficient and --variant are shared)."""


@register
class ReLUSAE(SAE):
    architecture = "relu"
    Options = ReLUOptions
    saelens_loads = ("standard",)
    saelens_architecture = "standard"
    variants = ("april", "tm")
    autocast_auto = True
    defaults = {
        "variant": "april",
        "apply_b_dec_to_input": lambda v: v["variant"] == "tm",
        "l1_coefficient": 5.0,
    }
    # LR 1e-3, not the April recipe's 5e-5 [R]: that assumes ~200k steps; our budgets are ~500.
    train_defaults = {"lr": 1e-3, "adam_beta1": 0.9}
    sweep_levels = (10.0, 5.0, 2.5)

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, device=device, dtype=dtype))

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.variant == "tm"

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        norm = self.cfg.init_decoder_norm if self.cfg.variant == "april" else 1.0
        self.init_tied_(generator, row_norm=norm)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        h_BF = self._input_for_encoder(x_BD, self.W_enc)
        # in h's dtype: under autocast a float32 bias would promote every [B, F] pass after it
        return h_BF + self.b_enc.to(h_BF.dtype)

    def encode(self, x_BD: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def loss(self, x_BD: Tensor, step: int, **_: Tensor | None) -> LossOutput:
        f_BF = self.encode(x_BD)
        recon_BD = self.decode(f_BF)
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        if self.cfg.variant == "april":
            # Norm-weighted L1, mean over rows of Σ_F f_F‖d_F‖: summing f over the batch first
            # makes its gradient an expanded [F] row instead of a materialised [B, F] outer product
            sparsity = f_BF.sum(0) @ self.W_dec.norm(dim=1).to(f_BF.dtype) / f_BF.shape[0]
        else:
            sparsity = f_BF.sum(-1).mean()
        lam = self.cfg.l1_coefficient * self.sparsity_scale(step)
        total = mse + lam * sparsity
        # f ≥ 0, so "fired" is one column-max pass (the tracker's generic |f| > 0 test is three)
        return LossOutput(total, {"mse": mse, "l1": sparsity}, f_BF, recon_BD,
                          fired_F=self.fired_dense(f_BF, nonneg=True))

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc")

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        n_F = self.W_dec.norm(dim=1)
        self.W_dec.div_(n_F[:, None])
        self.W_enc.mul_(n_F[None, :])
        self.b_enc.mul_(n_F)
