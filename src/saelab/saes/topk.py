"""TopK (Gao et al. 2024; METHODS.md §4), BatchTopK (§4.8) and AbsTopK (§5).

Shared recipe (§4.1–4.5): ``π = (x − b_dec) W_enc + b_enc``; tied Kaiming init with unit-norm
decoder rows kept unit-norm by tangent projection (N1); ``b_dec`` from the geometric median;
loss = batch-normalised MSE (FVU of the batch, the sparsify form of §4.2) + α·AuxK (§0.6,
α = 1/32, k_aux = d_in/2, dead window from ``TrainConfig.dead_window_tokens``).

- ``topk``: ``ReLU(TopK_k(π))`` per token (ReLU after the selection, the library default of
  §4.1); optional Multi-TopK term ``L(4k)/8``. Saves as SAELens ``topk``.
- ``batchtopk``: the ``k·B`` largest ``ReLU(π)`` entries of the whole batch in training; at
  inference one global threshold θ, an EMA (β = ``threshold_beta``) of the smallest kept
  activation per batch, estimated after ``threshold_start_fraction`` of training; ``encode`` is
  ``ReLU(π)·1[π > θ]``. That is a JumpReLU with θ_i = θ, so it saves as SAELens ``jumprelu``.
- ``abstopk``: the k largest ``|π|`` per token with their signs, no ReLU (§5.2); the pre-encoder
  bias and AuxK (selected by ``|π|``, signed) are [U] options kept on by default (§5.3).

Training is sparse in both directions (``saes/sparse.py``): π is computed once without autograd,
the selection runs on it, and only the selected entries are re-attached (``SparsePreActs``), so
the encoder backward costs B·k·D, not a dense [D, B] × [B, F] matmul; decoding is an
``embedding_bag`` over the k active rows. Gradients are exactly those of autograd through the
dense π (``sparse_encoder_grad = False`` restores that path).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE, LossOutput
from saelab.saes.registry import register
from saelab.saes.sparse import (
    SparseCode,
    SparsePreActs,
    attach_grad,
    auxk_loss,
    normalized_mse,
    topk_per_batch,
    topk_per_token,
)


def topk_lr(sae: SAE) -> float:
    """2.5x the width law ``2e-4 / sqrt(M / 2^14)`` of sparsify/dictionary_learning ([R]),
    capped at 1e-3: our default budgets are ~500 steps, not ~10^5."""
    return min(1e-3, 5e-4 / math.sqrt(sae.d_sae / 2**14))


@register
class TopKSAE(SAE):
    """TopK SAE with AuxK (METHODS §4.1-4.7, §0.6)."""

    architecture = "topk"
    saelens_architecture = "topk"
    defaults = {"apply_b_dec_to_input": True}
    train_defaults = {"lr": topk_lr, "adam_beta1": 0.9}
    sweep_param = "topk.k"
    sweep_levels = (16, 32, 64)
    #: AbsTopK selects by |π| and keeps signs
    signed = False
    #: ``loss`` selects on a detached π and re-attaches only the selected entries (sparse
    #: encoder backward, exact gradients). This needs ``select_train`` codes whose nonzero values
    #: are ``ReLU(π)`` (``π`` if ``signed``) at their entries; a family whose training values are
    #: anything else (noise, rescaling) sets this False or overrides ``loss``.
    sparse_encoder_grad: ClassVar[bool] = True
    unit_norm_decoder = True

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, device=device, dtype=dtype))

    @property
    def k(self) -> int:
        return self.cfg.topk.k

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.init_tied_(generator, row_norm=1.0)
        self.W_enc.mul_(self.cfg.topk.encoder_init_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """π with autograd (inference, and families that differentiate through the dense π).

        One ``addmm`` with the folded bias ``b_enc − b_dec W_enc``: no [B, D] or extra [B, F]
        pass, and b_dec's gradient stays a matrix-vector product."""
        bias_F = self.b_enc
        if self.cfg.apply_b_dec_to_input:
            bias_F = bias_F - self.b_dec @ self.W_enc
        return torch.addmm(bias_F, x_BD, self.W_enc)

    def sparse_pre_acts(self, x_BD: Tensor) -> SparsePreActs:
        """π without autograd plus a sparse backward for the entries later selected."""
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return SparsePreActs(x_BD, self.W_enc, self.b_enc, b_dec)

    # ---- selection: inference (encode) and training (loss) ---------------------------------
    def select(self, pre_BF: Tensor) -> SparseCode:
        """Inference-time sparse code."""
        return topk_per_token(pre_BF, min(self.k, self.d_sae), signed=self.signed)

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        """Training-time sparse code (batch-level families override this)."""
        return self.select(pre_BF)

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.select(self.pre_acts(x_BD)).dense(x_BD.shape[0], self.d_sae)

    def aux_loss(self, pre_BF: Tensor | SparsePreActs, residual_BD: Tensor,
                 dead_mask_F: Tensor | None) -> Tensor:
        """AuxK; ``pre_BF`` is π with autograd or (from ``loss``) a ``SparsePreActs``."""
        t = self.cfg.topk
        if t.aux_coefficient == 0:
            return residual_BD.new_zeros(())
        return auxk_loss(pre_BF, residual_BD, self.W_dec, dead_mask_F, self.k_aux,
                         signed=self.signed, scale_by_dead=t.aux_scale_by_dead)

    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             **_: Tensor | None) -> LossOutput:
        pre: Tensor | SparsePreActs
        if self.sparse_encoder_grad:
            pre = self.sparse_pre_acts(x_BD)
            pre_BF = pre.dense
            code = attach_grad(pre, self.select_train(pre_BF, step), signed=self.signed)
        else:
            pre = pre_BF = self.pre_acts(x_BD)
            code = self.select_train(pre_BF, step)
        recon_BD = code.decode(self.W_dec) + self.b_dec
        nmse = normalized_mse(recon_BD, x_BD)
        terms = {"nmse": nmse}
        total = nmse
        if self.cfg.topk.multi_topk and self.architecture == "topk":
            code4 = topk_per_token(pre_BF, min(4 * self.k, self.d_sae))
            if isinstance(pre, SparsePreActs):
                code4 = attach_grad(pre, code4)
            recon4 = code4.decode(self.W_dec) + self.b_dec
            terms["multi_topk"] = normalized_mse(recon4, x_BD)
            total = total + terms["multi_topk"] / 8
        aux = self.aux_loss(pre, x_BD - recon_BD, dead_mask_F)
        terms["auxk"] = aux
        total = total + self.cfg.topk.aux_coefficient * aux
        B = x_BD.shape[0]
        return LossOutput(total, terms, None, recon_BD, fired_F=code.fired(self.d_sae),
                          l0=code.l0(B))

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc")

    def saelens_extra_cfg(self) -> dict:
        return {**super().saelens_extra_cfg(), "k": self.k}


@register
class AbsTopKSAE(TopKSAE):
    """AbsTopK SAE: k largest |pre-activations| per token, signs kept (METHODS §5)."""

    architecture = "abstopk"
    saelens_architecture = None
    signed = True


class ThresholdedBatchSAE(TopKSAE):
    """Base of families trained with a batch-level selection and run at inference with a
    JumpReLU-style threshold buffer ``threshold`` [d_sae] (BatchTopK, Mutual/Feature Choice,
    Matryoshka). ``encode`` = ``ReLU(π)·1[π > threshold]``; saves as SAELens ``jumprelu``."""

    saelens_architecture = "jumprelu"

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self.register_buffer("threshold", torch.zeros(self.d_sae, device=device, dtype=dtype))
        # number of threshold estimates folded in so far (checkpointed, not saved with the SAE)
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64,
                                                              device=device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.threshold.zero_()
        self.threshold_updates.zero_()

    def select(self, pre_BF: Tensor) -> SparseCode:
        acts = torch.where(pre_BF > self.threshold, torch.relu(pre_BF), 0.0)
        idx = acts.nonzero()
        counts = torch.bincount(idx[:, 0], minlength=pre_BF.shape[0])
        offsets = torch.zeros(pre_BF.shape[0] + 1, dtype=torch.long, device=pre_BF.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        return SparseCode(idx[:, 1], acts[idx[:, 0], idx[:, 1]], offsets)

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD)
        return torch.where(pre_BF > self.threshold, torch.relu(pre_BF), 0.0)

    def estimating_threshold(self, step: int) -> bool:
        return self.training and step >= int(self.cfg.topk.threshold_start_fraction
                                              * self.total_steps)

    @torch.no_grad()
    def update_threshold(self, estimate_F: Tensor) -> None:
        """Fold one batch's estimate (scalar or per latent; inf = no estimate) into the EMA.

        The weight of the new estimate is ``max(1 - β, 1/(n + 1))`` after ``n`` estimates: a
        plain running mean until ``n`` reaches ``1/(1 - β)``, an EMA after. A bare EMA with
        β = 0.999 would barely move from its first estimate in our ~100–500-step runs (its
        first ~1000 updates are dominated by the start). No host sync."""
        beta = self.cfg.topk.threshold_beta
        est = estimate_F.to(self.threshold.dtype).expand_as(self.threshold)
        valid = torch.isfinite(est)
        w = (1.0 / (self.threshold_updates + 1).to(est.dtype)).clamp_min(1 - beta)
        new = self.threshold + w * (torch.where(valid, est, self.threshold) - self.threshold)
        self.threshold.copy_(torch.where(valid, new, self.threshold))
        self.threshold_updates.add_(valid.any().long())

    def training_state(self) -> dict[str, Tensor]:
        return {"threshold_updates": self.threshold_updates}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        if "threshold_updates" in tensors:
            self.threshold_updates.copy_(tensors["threshold_updates"])

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc", "threshold")

    def saelens_extra_cfg(self) -> dict:
        return {"apply_b_dec_to_input": bool(self.cfg.apply_b_dec_to_input)}


@register
class BatchTopKSAE(ThresholdedBatchSAE):
    """BatchTopK SAE: top k·B activations per batch, global inference threshold (METHODS §4.8)."""

    architecture = "batchtopk"

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        code = topk_per_batch(pre_BF, self.k * pre_BF.shape[0], relu=True)
        if self.estimating_threshold(step):
            # smallest surviving positive activation of this batch (inf if none)
            smallest = torch.where(code.vals > 0, code.vals, torch.inf).min().detach()
            self.update_threshold(smallest)
        return code
