"""Shared base of TopK (Gao et al. 2024; docs/methods.md §4), BatchTopK (§4.8), AbsTopK (§5) and
the families built on them (``options.py``, ``batchtopk.py``, ``abstopk.py``, choice, matryoshka,
vsae, gsae): their options (``TopKOptions``, ``AuxKOptions``) and training.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab import dist
from saelab.config import SAEConfig, opt
from saelab.errors import ConfigError, SAEFormatError
from saelab.saes.base import SAE, LossOutput
from saelab.saes.sparse import (
    SparseCode,
    SparsePreActs,
    attach_grad,
    auxk_loss,
    encoder_pre_acts,
    normalized_mse,
    topk_per_global_batch,
    topk_per_token,
)


@dataclass
class AuxKOptions:
    """AuxK dead-latent loss (docs/methods.md §0.6) of the TopK-style families and topafa."""

    aux_k: int = opt(0, "k_aux of the AuxK dead-latent loss (§0.6); 0 = d_in // 2 "
                     "(sparsify / dictionary_learning).")
    aux_coefficient: float = opt(1 / 32, "alpha of the AuxK loss (§0.6); 0 disables it.")
    aux_scale_by_dead: bool = opt(
        False, "Scale AuxK by min(n_dead / k_aux, 1) (the sparsify variant, §0.6).")
    aux_normalization: str = opt(
        "residual", "Denominator of AuxK's normalised MSE (§0.6): residual (the variance of "
        "its own target, the residual: OpenAI, dictionary_learning) or target (the variance "
        "of the main target x: sparsify's FVU form).", choices=("residual", "target"))

    def validate(self) -> None:
        if self.aux_k < 0 or self.aux_coefficient < 0:
            raise ConfigError("--aux-k and --aux-coefficient must be >= 0")
        if self.aux_normalization not in ("residual", "target"):
            raise ConfigError(f"--aux-normalization must be residual or target, got "
                              f"{self.aux_normalization!r}")


@dataclass
class TopKOptions(AuxKOptions):
    """TopK-family settings shared by topk, batchtopk, abstopk, mutual/feature choice,
    matryoshka, vsae and gsae (docs/methods.md §4, §0.6)."""

    mse_normalization: str = opt(
        "batch", "Scale of the main reconstruction loss (§4.2): batch (each batch's FVU, "
        "sum||x - x_hat||^2 / sum||x - mean_batch(x)||^2, the sparsify form) or fixed (the "
        "MSE divided by one constant, the MSE of predicting the data mean, measured once on "
        "the init sample: the OpenAI form).", choices=("batch", "fixed"))
    k: int = opt(32, "Active latents per token (per-token for topk/abstopk/gsae/vsae, batch "
                 "average for batchtopk/mutual_choice/feature_choice/matryoshka).")
    multi_topk: bool = opt(False, "topk only: add the Multi-TopK term L(4k)/8 (§4.2).")
    encoder_init_scale: float = opt(
        0.5, "W_enc = scale x W_dec^T at init (the spec's tied init, §4.3, is 1: unit-norm "
        "encoder columns). [U] default 0.5: on saelab synth it recovered the true features far "
        "better than 1 for topk and the batch-level families, and it lowered FVU slightly on "
        "SmolLM2 layer-6 activations (docs/methods.md §4.3).")
    threshold_beta: float = opt(
        0.999, "EMA factor of the inference threshold of batchtopk / mutual_choice / "
        "matryoshka / feature_choice (§4.8, §6.5); a running mean until 1/(1-beta) estimates.")
    threshold_start_fraction: float = opt(
        0.5, "Start estimating inference thresholds after this fraction of training steps "
        "(the spec's 'after warm-up'; half the run, since our runs are short and the early "
        "code is far from the final one).")

    def validate(self) -> None:
        super().validate()
        if self.mse_normalization not in ("batch", "fixed"):
            raise ConfigError(f"--mse-normalization must be batch or fixed, got "
                              f"{self.mse_normalization!r}")
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if not (self.encoder_init_scale > 0 and math.isfinite(self.encoder_init_scale)):
            raise ConfigError(f"--encoder-init-scale must be a positive number, got "
                              f"{self.encoder_init_scale}")
        if not 0 <= self.threshold_beta < 1 or not 0 <= self.threshold_start_fraction < 1:
            raise ConfigError("--threshold-beta and --threshold-start-fraction must be in [0, 1)")


def topk_lr(sae: SAE) -> float:
    """2.5x the width law ``2e-4 / sqrt(M / 2^14)`` of sparsify/dictionary_learning ([R]),
    capped at 1e-3: our default budgets are ~500 steps, not ~10^5."""
    return min(1e-3, 5e-4 / math.sqrt(sae.d_sae / 2**14))


def centered_sq_sum(x_BD: Tensor) -> Tensor:
    """``Σ‖x − x̄‖²`` of the (global, in data-parallel training) batch, without autograd."""
    with torch.no_grad():
        if dist.is_distributed():
            return dist.global_centered_sq_sum(x_BD)
        xc = (x_BD - x_BD.mean(0)).flatten()
        return torch.dot(xc, xc)


def aux_target_factor(residual_BD: Tensor, x_BD: Tensor) -> Tensor:
    """``Σ‖e − ē‖² / Σ‖x − x̄‖²``: turns AuxK normalised by its own target's (the residual
    ``e``'s) variance into AuxK normalised by the main target's (``aux_normalization =
    target``, §0.6). Detached: both variances are constants of the step."""
    return centered_sq_sum(residual_BD) / centered_sq_sum(x_BD).clamp_min(1e-12)


class AuxKMixin:
    """``k_aux`` of the families whose options are :class:`AuxKOptions`."""

    cfg: SAEConfig
    d_in: int

    @property
    def k_aux(self) -> int:
        """How many dead latents AuxK (§0.6) reconstructs the residual with; default d_in / 2."""
        return self.cfg.options.aux_k or self.d_in // 2


class TopKBaseSAE(AuxKMixin, SAE):
    """TopK SAE with AuxK (docs/methods.md §4.1-4.7, §0.6): the base of the TopK-style families
    (registered as ``topk`` by ``saes/topk.py``)."""

    Options = TopKOptions
    saelens_architecture = "topk"
    defaults = {"apply_b_dec_to_input": True}
    train_defaults = {"lr": topk_lr, "adam_beta1": 0.9}
    sweep_param = "options.k"
    sweep_levels = (16, 32, 64)
    #: only the selection's π runs in bf16; values are re-attached in float32 (sparse.py)
    autocast_auto = True
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
        # scale of mse_normalization = fixed (0 = not measured yet); a training constant, so it
        # is checkpointed (training_state) but not saved with the SAE
        self.register_buffer("mse_scale", torch.zeros((), device=device, dtype=torch.float32),
                             persistent=False)
        self._have_mse_scale = False

    @property
    def k(self) -> int:
        return self.cfg.options.k

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.init_tied_(generator, row_norm=1.0)
        self.W_enc.mul_(self.cfg.options.encoder_init_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """π with autograd (inference, and families that differentiate through the dense π).

        One ``addmm`` with the folded bias ``b_enc − b_dec W_enc``: no [B, D] or extra [B, F]
        pass, and b_dec's gradient stays a matrix-vector product."""
        return encoder_pre_acts(x_BD, self.W_enc, self.b_enc,
                                self.b_dec if self.cfg.apply_b_dec_to_input else None)

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
                 dead_mask_F: Tensor | None, x_BD: Tensor | None = None) -> Tensor:
        """AuxK; ``pre_BF`` is π with autograd or (from ``loss``) a ``SparsePreActs``;
        ``x_BD`` (the main target) is needed by ``aux_normalization = target``."""
        t = self.cfg.options
        if t.aux_coefficient == 0:
            return residual_BD.new_zeros(())
        aux = auxk_loss(pre_BF, residual_BD, self.W_dec, dead_mask_F, self.k_aux,
                        signed=self.signed, scale_by_dead=t.aux_scale_by_dead)
        return self.normalize_aux(aux, residual_BD, x_BD)

    def normalize_aux(self, aux: Tensor, residual_BD: Tensor, x_BD: Tensor | None) -> Tensor:
        if self.cfg.options.aux_normalization != "target":
            return aux
        if x_BD is None:
            raise ValueError("aux_normalization = target needs the main target x_BD")
        return aux * aux_target_factor(residual_BD, x_BD)

    def recon_loss(self, recon_BD: Tensor, x_BD: Tensor) -> Tensor:
        """Main reconstruction loss (§4.2): the batch FVU, or the MSE over a fixed scale."""
        if self.cfg.options.mse_normalization == "batch":
            return normalized_mse(recon_BD, x_BD)
        # per-row SSE / (mean per-row SSE of predicting the data mean): the same units as the
        # batch FVU; a rank-local mean, so averaging over ranks gives the global value
        return (recon_BD - x_BD).pow(2).sum() / (x_BD.shape[0] * self.fixed_mse_scale(x_BD))

    def fixed_mse_scale(self, x_BD: Tensor) -> Tensor:
        """The constant of ``mse_normalization = fixed``: ``E‖x − E x‖²`` of the init sample
        (:meth:`init_from_data`), else of the first training batch."""
        if not self._have_mse_scale:  # a Python flag: no host sync per step
            self.mse_scale.copy_(centered_sq_sum(x_BD) / (x_BD.shape[0] * dist.world_size()))
            self._have_mse_scale = True
        return self.mse_scale.clamp_min(1e-12)

    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        super().init_from_data(x_ND)
        if self.cfg.options.mse_normalization == "fixed":
            x = x_ND.float()
            self.mse_scale.fill_(float((x - x.mean(0)).pow(2).sum(1).mean()))
            self._have_mse_scale = True

    def training_state(self) -> dict[str, Tensor]:
        return {**super().training_state(), "mse_scale": self.mse_scale}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_training_state(tensors)
        if "mse_scale" in tensors:
            self.mse_scale.copy_(tensors["mse_scale"])
            self._have_mse_scale = bool(self.mse_scale > 0)

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
        nmse = self.recon_loss(recon_BD, x_BD)
        terms = {"nmse": nmse}
        total = nmse
        if self.cfg.options.multi_topk and self.architecture == "topk":
            code4 = topk_per_token(pre_BF, min(4 * self.k, self.d_sae))
            if isinstance(pre, SparsePreActs):
                code4 = attach_grad(pre, code4)
            recon4 = code4.decode(self.W_dec) + self.b_dec
            terms["multi_topk"] = self.recon_loss(recon4, x_BD)
            total = total + terms["multi_topk"] / 8
        aux = self.aux_loss(pre, x_BD - recon_BD, dead_mask_F, x_BD)
        terms["auxk"] = aux
        total = total + self.cfg.options.aux_coefficient * aux
        B = x_BD.shape[0]
        return LossOutput(total, terms, None, recon_BD, fired_F=self.fired_latents(code),
                          l0=code.l0(B))

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc")

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if cfg.options.k > cfg.d_sae:
            raise ConfigError(f"--k ({cfg.options.k}) cannot exceed --d-sae ({cfg.d_sae})")

    def saelens_extra_cfg(self) -> dict:
        return {**super().saelens_extra_cfg(), "k": self.k}

    @classmethod
    def from_saelens_cfg(cls, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
        values = super().from_saelens_cfg(cfg, folder)
        k = cfg.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SAEFormatError(f"{folder / 'cfg.json'}: topk needs a positive integer k, "
                                 f"got {k!r}")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise SAEFormatError(
                f"{folder}: rescale_acts_by_decoder_norm=true selects latents by "
                "π·‖d_i‖, which saelab's topk does not do; normalise the decoder in SAELens "
                "first (fold_W_dec_norm) and save again")
        values["options"] = {"k": k}
        return values


class ThresholdedBatchSAE(TopKBaseSAE):
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
        return self.training and step >= int(self.cfg.options.threshold_start_fraction
                                              * self.total_steps)

    @torch.no_grad()
    def update_threshold(self, estimate_F: Tensor) -> None:
        """Fold one batch's estimate (scalar or per latent; inf = no estimate) into the EMA.

        The weight of the new estimate is ``max(1 - β, 1/(n + 1))`` after ``n`` estimates: a
        plain running mean until ``n`` reaches ``1/(1 - β)``, an EMA after. A bare EMA with
        β = 0.999 would barely move from its first estimate in our ~100–500-step runs (its
        first ~1000 updates are dominated by the start). No host sync."""
        beta = self.cfg.options.threshold_beta
        est = estimate_F.to(self.threshold.dtype).expand_as(self.threshold)
        valid = torch.isfinite(est)
        w = (1.0 / (self.threshold_updates + 1).to(est.dtype)).clamp_min(1 - beta)
        new = self.threshold + w * (torch.where(valid, est, self.threshold) - self.threshold)
        self.threshold.copy_(torch.where(valid, new, self.threshold))
        self.threshold_updates.add_(valid.any().long())

    def training_state(self) -> dict[str, Tensor]:
        return {**super().training_state(), "threshold_updates": self.threshold_updates}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_training_state(tensors)
        if "threshold_updates" in tensors:
            self.threshold_updates.copy_(tensors["threshold_updates"])

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc", "threshold")

    def saelens_extra_cfg(self) -> dict:
        return {"apply_b_dec_to_input": bool(self.cfg.apply_b_dec_to_input)}


class BatchTopKBaseSAE(ThresholdedBatchSAE):
    """BatchTopK training (docs/methods.md §4.8): top k·B activations per batch, one global inference
    threshold; the base of batchtopk, mutual_choice and matryoshka."""

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        # over the global batch in data-parallel training (saelab.dist; a no-op otherwise)
        code = topk_per_global_batch(pre_BF, self.k * dist.global_rows(pre_BF.shape[0]),
                                     relu=True)
        if self.estimating_threshold(step):
            # smallest surviving positive activation of this batch (inf if none)
            smallest = torch.where(code.vals > 0, code.vals, torch.inf).min().detach()
            self.update_threshold(dist.all_reduce_min(smallest))
        return code
