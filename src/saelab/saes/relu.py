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

from saelab.saes._relu_kernel import ReLUTrain
from saelab.saes.base import SAE, LossOutput
from saelab.saes.registry import register
from saelab.saes.sparse import SparsePreActs, encoder_pre_acts, train_on_sparse_code


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
    #: train on the sparse code below this fraction of active latents (:meth:`loss`)
    #: (None: :func:`~saelab.saes.sparse.sparse_code_density`, by the code's dtype and device)
    sparse_density: float | None = None

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
        sub = bool(self.cfg.apply_b_dec_to_input)
        with torch.no_grad():
            f_BF = encoder_pre_acts(x_BD, self.W_enc, self.b_enc,
                                    self.b_dec if sub else None).relu_()
        B = x_BD.shape[0]
        if train_on_sparse_code(f_BF, self.sparse_density):
            # few latents active: decode and every gradient over the N active entries only
            # (saes/sparse.py), not [B, F] × D GEMMs; same values and gradients
            pre = SparsePreActs(x_BD, self.W_enc, self.b_enc, self.b_dec if sub else None,
                                dense=f_BF)  # ReLU(π) is π at every entry it keeps
            code = pre.positive()
            recon_BD = code.decode(self.W_dec) + self.b_dec
            colsum_F = code.vals.new_zeros(self.d_sae).index_add(0, code.idx, code.vals)
            f_code = code._replace(vals=code.vals.detach())
            fired_F, l0, f_BF = self.fired_latents(f_code), f_code.l0(B), None
        else:
            # decode + the L1 column sums in one Function (_relu_kernel): same values and
            # gradients as autograd through encode()/decode(), fewer [B, F] passes
            f_BF, recon_BD, colsum_F = ReLUTrain.apply(x_BD, self.W_enc, self.b_enc, self.b_dec,
                                                       self.W_dec, sub, f_BF)
            # f ≥ 0: a latent fired iff its column sum is positive (no pass over f)
            fired_F = (colsum_F.detach() > 0 if self.dead_eps <= 0
                       else self.fired_dense(f_BF, nonneg=True))
            l0 = None
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        if self.cfg.variant == "april":
            # norm-weighted L1, mean over rows of Σ_F f_F‖d_F‖ = (Σ_b f) · ‖d‖ / B
            sparsity = colsum_F @ self.W_dec.norm(dim=1) / B
        else:
            sparsity = colsum_F.sum() / B
        lam = self.cfg.l1_coefficient * self.sparsity_scale(step)
        total = mse + lam * sparsity
        return LossOutput(total, {"mse": mse, "l1": sparsity}, f_BF, recon_BD, fired_F=fired_F,
                          l0=l0)

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc")

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        n_F = self.W_dec.norm(dim=1)
        self.W_dec.div_(n_F[:, None])
        self.W_enc.mul_(n_F[None, :])
        self.b_enc.mul_(n_F)
