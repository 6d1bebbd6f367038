"""Gradient TopK SAE, g-SAE (Olmo et al. 2024/2025; docs/methods.md §7).

TopK picks the k largest activations; a g-SAE picks the k latents whose ablation would change
the LM loss most, to first order, weighted against their size (§7.2)::

    z   = ReLU((x − b_dec) W_enc + b_enc)            # as TopK
    ĝ   = normalise(g)                                # g = ∂ℒ/∂x, the LM-loss gradient at x
    s   = z + β · z ⊙ |ĝ W_decᵀ|                     # (ĝ W_decᵀ)_i = d_i · ĝ
    idx = top-k of s;  f = z on idx (values from z, not s);  x̂ = f W_dec + b_dec

- ``g`` is what the harvest stores with ``--with-grads`` (see ``saelab.harvest.lm_loss_grads``):
  the gradient, w.r.t. this row's activation, of the *summed* next-token cross-entropy of the
  row's window over its scored positions, i.e. the row's own next-token loss gradient plus its
  effect through attention on later positions' losses. The last position of a window gets 0.
- ``g`` and ``W_dec`` enter the score as constants (no autograd through the score): they change
  which latents are selected, never the gradients of the selected values (§7.2).
- ``grad_norm`` ([U], §7.2): ``batch_mean_l2`` (default) divides g by the mean ‖g‖ of the rows
  given (in training the batch; at inference the rows passed to ``encode``, so the selection of
  a row depends on the batch through that one scalar); ``per_token_l2`` uses g/‖g‖ (rows with
  g = 0 stay 0); ``none`` uses g as is.
- ``β`` ([U] default 1, ``--gsae-beta``): 0 is exactly TopK. With a normalised g,
  ``|d_i · ĝ| ≤ ‖ĝ‖`` (≈ 1), so β = 1 rescales a latent's score by at most about 2x.
- Loss, init, decoder norm and AuxK as TopK (§7.3 [U]): batch FVU + α·AuxK (dead latents chosen
  by pre-activation), tied init, unit-norm decoder (N1). Training needs g (``uses_lm_grads``).
  Training is sparse as TopK's: score and selection run on a detached π and only the chosen
  ``ReLU(π)`` entries are re-attached (``SparsePreActs``), so the encoder backward costs B·k·D
  (``sparse_encoder_grad = False`` restores autograd through the dense π).

Inference (§7.5 [U]): ``encode(x, grad=g)`` is the g-SAE selection; ``encode(x)`` without a
gradient falls back to plain TopK on z, which is *not* the training-time selection (it ignores
the LM loss; with β > 0 it can pick other latents). The saved folder is a SAELens ``topk``
folder (the grad-free inference function is exactly SAELens' TopK): SAELens, and every saelab
tool that calls ``encode(x)``, runs the fallback. saelab's CE/KL splice evaluation uses the
gradient selection with the true next-token labels.

Input normalisation: the trainer feeds ``c·x`` and ``g/c``. With a normalised g the selection is
scale-free and folding ``c`` into the biases keeps it exact; with ``grad_norm = none``,
:meth:`fold_input_scale` also divides β by ``c`` (the saved config holds β in raw units).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.config import opt
from saelab.errors import ConfigError
from saelab.saes._topk_base import TopKBaseSAE, TopKOptions
from saelab.saes.base import LossOutput, SAEOutput
from saelab.saes.registry import register
from saelab.saes.sparse import SparseCode, SparsePreActs, attach_grad, topk_per_token

GRAD_NORMS = ("none", "per_token_l2", "batch_mean_l2")


@dataclass
class GSAEOptions(TopKOptions):
    """Gradient TopK SAE (docs/methods.md §7): selection by z + beta z |g W_dec^T|."""

    beta: float = opt(1.0, "beta of the selection score; 0 = plain TopK ([U] default).",
                      flag="gsae_beta")
    grad_norm: str = opt(
        "batch_mean_l2", "Normalisation of the LM-loss gradient g before scoring ([U]): none, "
        "per_token_l2 (g/||g||) or batch_mean_l2 (g / mean of ||g|| over the batch given).",
        flag="gsae_grad_norm", choices=("none", "per_token_l2", "batch_mean_l2"))


@register
class GradientSAE(TopKBaseSAE):
    """g-SAE: TopK whose selection adds each latent's first-order effect on the LM loss."""
    autocast_auto = False  # dense terms beside the selection: not measured under bf16

    architecture = "gsae"
    Options = GSAEOptions
    saelens_architecture = "topk"
    uses_lm_grads = True
    sweep_param = "options.k"
    sweep_levels = (16, 32, 64)

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        g = self.cfg.options
        if not (g.beta >= 0 and g.beta < float("inf")):
            raise ConfigError(f"--gsae-beta must be a finite number >= 0, got {g.beta}")
        if g.grad_norm not in GRAD_NORMS:
            raise ConfigError(
                f"--gsae-grad-norm must be one of {', '.join(GRAD_NORMS)}, got {g.grad_norm!r}")

    @property
    def beta(self) -> float:
        return float(self.cfg.options.beta)

    # ---- the gradient selection ----------------------------------------------------------------
    def normalize_grad(self, grad_BD: Tensor) -> Tensor:
        """ĝ per ``options.grad_norm`` (no autograd)."""
        g = grad_BD.detach().to(self.W_dec.dtype)
        mode = self.cfg.options.grad_norm
        if mode == "per_token_l2":
            return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if mode == "batch_mean_l2":
            return g / g.norm(dim=1).mean().clamp_min(1e-12)
        return g

    def select_with_grad(self, pre_BF: Tensor, grad_BD: Tensor) -> SparseCode:
        """Top-k of ``s = z + β z |ĝ W_decᵀ|`` per row; values ``z`` at those latents.

        Only the selected values carry autograd (through ``pre_BF``); the score is a constant.
        """
        k = min(self.k, self.d_sae)
        if self.beta == 0:  # s = z: exactly TopK (and no [B, F] gradient matmul)
            return topk_per_token(pre_BF, k)
        with torch.no_grad():
            # s = (1 + β|ĝ W_decᵀ|) · ReLU(π), written as ReLU((1 + β|ĝ W_decᵀ|) · π) (the
            # factor is positive), all in place on the one [B, F] matmul result
            s_BF = self.normalize_grad(grad_BD) @ self.W_dec.detach().T
            s_BF.abs_().mul_(self.beta).add_(1.0).mul_(pre_BF.detach()).clamp_(min=0.0)
            idx = s_BF.topk(k, dim=-1, sorted=False).indices
            del s_BF
        return SparseCode(idx, torch.relu(pre_BF.gather(1, idx)))

    # ---- inference -------------------------------------------------------------------------------
    def encode(self, x_BD: Tensor, grad: Tensor | None = None) -> Tensor:
        """Dense code. With ``grad`` (the LM-loss gradient at ``x_BD``, same shape) the g-SAE
        selection; without, plain TopK on z (differs from the training-time selection)."""
        if grad is not None and grad.shape != x_BD.shape:
            raise ValueError(f"grad has shape {tuple(grad.shape)}, x has {tuple(x_BD.shape)}")
        pre_BF = self.pre_acts(x_BD)
        code = self.select(pre_BF) if grad is None else self.select_with_grad(pre_BF, grad)
        return code.dense(x_BD.shape[0], self.d_sae)

    def forward(self, x_BD: Tensor, grad: Tensor | None = None) -> SAEOutput:
        f_BF = self.encode(x_BD, grad)
        return SAEOutput(self.decode(f_BF), f_BF)

    # ---- training --------------------------------------------------------------------------------
    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             grad_BD: Tensor | None = None, **_: Tensor | None) -> LossOutput:
        if grad_BD is None:
            raise ConfigError(
                "gsae trains on LM-loss gradients beside the activations: stream a store made "
                "with `saelab harvest --with-grads` (batches of (x, grad))")
        pre: Tensor | SparsePreActs
        if self.sparse_encoder_grad:  # select on a detached π, re-attach the chosen entries
            pre = self.sparse_pre_acts(x_BD)
            code = attach_grad(pre, self.select_with_grad(pre.dense, grad_BD))
        else:
            pre = self.pre_acts(x_BD)
            code = self.select_with_grad(pre, grad_BD)
        recon_BD = code.decode(self.W_dec) + self.b_dec
        nmse = self.recon_loss(recon_BD, x_BD)
        aux = self.aux_loss(pre, x_BD - recon_BD, dead_mask_F, x_BD)
        total = nmse + self.cfg.options.aux_coefficient * aux
        return LossOutput(total, {"nmse": nmse, "auxk": aux}, None, recon_BD,
                          fired_F=self.fired_latents(code), l0=code.l0(x_BD.shape[0]))

    # ---- export ----------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """As TopK; with an unnormalised gradient also β ← β/c, so the selection on raw
        ``(x, g)`` equals the training-time one on ``(c·x, g/c)``."""
        super().fold_input_scale(scale)
        if self.cfg.options.grad_norm == "none":
            self.cfg.options.beta = self.beta / scale
