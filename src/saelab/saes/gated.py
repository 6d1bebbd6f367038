"""Gated SAE (Rajamanoharan et al. 2024; docs/methods.md §2) — saelab's flagship family.

One shared encoder direction per latent (``W_enc`` = ``W_gate``); the magnitude path is
``W_mag = exp(r_mag) ⊙ W_gate`` (§2.2), so one encoder matmul feeds both paths::

    h       = (x − b_dec) W_enc
    π_gate  = h + b_gate            f_gate = 1[π_gate > 0]
    π_mag   = h·exp(r_mag) + b_mag  f      = f_gate ⊙ ReLU(π_mag)

Variants:

- ``paper`` (default, [P]): L1 on ``ReLU(π_gate)`` only; auxiliary reconstruction of
  ``ReLU(π_gate)`` through a *frozen* copy of the decoder; unit-norm decoder rows with tangent
  gradient projection (N1); Adam β1 = 0.
- ``april`` ([C] SAELens / authors' later advice): gate L1 weighted by decoder norms, decoder
  not frozen in the aux loss, no norm constraint.

Losses are per-token SSE averaged over the batch on normalised inputs (``E‖x‖ = √d``), so λ is
not the paper's number (the paper divides the L2 term by d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.saes._gated_kernel import GatedEncode, gate
from saelab.saes.base import SAE, LossOutput
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.registry import register
from saelab.saes.sparse import SparsePreActs, encoder_pre_acts, train_on_sparse_code


@dataclass
class GatedOptions:
    """Gated SAE: no options of its own (--l1-coefficient and --variant are shared)."""


@register
class GatedSAE(SAE):
    architecture = "gated"
    autocast_auto = True
    Options = GatedOptions
    saelens_loads = ("gated",)
    saelens_architecture = "gated"
    variants = ("paper", "april")
    defaults = {
        "variant": "paper",
        "apply_b_dec_to_input": True,
        "l1_coefficient": 4.0,
    }
    train_defaults = {"lr": 1e-3, "adam_beta1": 0.0}
    sweep_levels = (8.0, 4.0, 2.0)
    #: train on the sparse code (:meth:`_loss_sparse`) below this fraction of open gates
    #: (None: :func:`~saelab.saes.sparse.sparse_code_density`, by the code's dtype and device)
    sparse_density: float | None = None

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        kw = {"device": device, "dtype": dtype}
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae, **kw))

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.variant == "paper"

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # §2.4 [R]: random unit decoder rows, W_gate = W_decᵀ, r_mag = biases = 0.
        self.init_tied_(generator, row_norm=1.0)
        for p in (self.b_gate, self.r_mag, self.b_mag, self.b_dec):
            p.zero_()

    def _pre_acts(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        h_BF = self._input_for_encoder(x_BD, self.W_enc)
        return h_BF + self.b_gate, torch.addcmul(self.b_mag, h_BF, self.r_mag.exp())

    def encode(self, x_BD: Tensor) -> Tensor:
        pi_gate_BF, pi_mag_BF = self._pre_acts(x_BD)
        return torch.where(pi_gate_BF > 0, torch.relu(pi_mag_BF), 0.0)

    def loss(self, x_BD: Tensor, step: int, **_: Tensor | None) -> LossOutput:
        # The Heaviside gate passes no gradient: W_gate/b_gate learn only from L1 and aux.
        sub = bool(self.cfg.apply_b_dec_to_input)
        with torch.no_grad():
            h_BF = encoder_pre_acts(x_BD, self.W_enc, None, self.b_dec if sub else None)
            gate_BF = gate(h_BF, self.b_gate)
        # paper: aux decodes through a frozen decoder, plain L1; april: neither
        paper = self.cfg.variant == "paper"
        W_aux, b_aux = ((self.W_dec.detach(), self.b_dec.detach()) if paper
                        else (self.W_dec, self.b_dec))
        if train_on_sparse_code(gate_BF, self.sparse_density):
            recon_BD, sparsity, aux_recon_BD, f_BF, fired_F, l0 = self._terms_sparse(
                x_BD, h_BF, gate_BF, W_aux, b_aux)
        else:
            f_BF, gate_BF = GatedEncode.apply(x_BD, self.W_enc, self.b_dec, self.b_gate,
                                              self.r_mag, self.b_mag, sub, h_BF, gate_BF)
            recon_BD = self.decode(f_BF)
            sparsity = (gate_BF.sum(-1) if paper else gate_BF @ self.W_dec.norm(dim=1)).mean()
            aux_recon_BD = gate_BF @ W_aux + b_aux
            # f ≥ 0: "fired" is one column-max pass (the tracker's generic |f| > 0 test is three)
            fired_F, l0 = self.fired_dense(f_BF, nonneg=True), None
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        aux = (aux_recon_BD - x_BD).pow(2).sum(-1).mean()
        lam = self.cfg.l1_coefficient * self.sparsity_scale(step)
        total = mse + lam * sparsity + aux
        return LossOutput(total, {"mse": mse, "l1": sparsity, "aux": aux}, f_BF, recon_BD,
                          fired_F=fired_F, l0=l0)

    def _terms_sparse(self, x_BD: Tensor, h_BF: Tensor, gate_BF: Tensor, W_aux: Tensor,
                      b_aux: Tensor) -> tuple:
        """:meth:`loss`'s terms once few gates are open: every term lives on the N entries with
        ``π_gate > 0`` (``f`` is 0 elsewhere and so are the gradients of ``f`` and
        ``ReLU(π_gate)``), so decoding and every gradient are sparse (``saes/sparse.py``), not
        [B, F] × D GEMMs. Same values and gradients as the dense path (tested in float64).
        No dense code is built (``latents`` None; ``fired`` and ``l0`` from the sparse one)."""
        B = x_BD.shape[0]
        pre = SparsePreActs(x_BD, self.W_enc, None,
                            self.b_dec if self.cfg.apply_b_dec_to_input else None, dense=h_BF)
        code = pre.positive(gate_BF)
        idx, h_N = code.idx, code.vals  # h_N: float32, with the sparse encoder backward
        gate_N = torch.relu(h_N + self.b_gate[idx])
        f_N = torch.relu(torch.addcmul(self.b_mag[idx], h_N, self.r_mag.exp()[idx]))
        recon_BD = code._replace(vals=f_N).decode(self.W_dec) + self.b_dec
        l1_N = gate_N if self.cfg.variant == "paper" else gate_N * self.W_dec.norm(dim=1)[idx]
        aux_recon_BD = code._replace(vals=gate_N).decode(W_aux) + b_aux
        f_code = code._replace(vals=f_N.detach())
        return (recon_BD, l1_N.sum() / B, aux_recon_BD, None, self.fired_latents(f_code),
                f_code.l0(B))

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_gate", "b_mag")

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        # §0.4 N3: scaling latent i by n_i leaves the gate's sign unchanged; r_mag is a ratio.
        n_F = self.W_dec.norm(dim=1)
        self.W_dec.div_(n_F[:, None])
        self.W_enc.mul_(n_F[None, :])
        self.b_gate.mul_(n_F)
        self.b_mag.mul_(n_F)

    @torch.no_grad()
    def to_jumprelu(self):
        """The exact JumpReLU SAE (§2.6): W_enc = W_mag, b_enc = b_mag, θ = max(b_mag − e^r b_gate, 0)."""
        cfg = type(self.cfg)(**{**self.cfg.__dict__, "architecture": "jumprelu", "variant": None,
                                "l1_coefficient": None, "options": None})
        jr = JumpReLUSAE(cfg, device=self.W_enc.device, dtype=self.W_enc.dtype)
        scale_F = self.r_mag.exp()
        jr.W_enc.copy_(self.W_enc * scale_F)
        jr.b_enc.copy_(self.b_mag)
        jr.threshold.copy_((self.b_mag - scale_F * self.b_gate).clamp_min(0.0))
        jr.W_dec.copy_(self.W_dec)
        jr.b_dec.copy_(self.b_dec)
        return jr
