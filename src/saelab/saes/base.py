"""Parts every SAE family shares: parameters, decode, decoder-norm handling and folding.

Conventions (docs/methods.md §0.1): row-vector maths, ``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` is
``[d_sae, d_in]`` (row ``i`` is latent ``i``'s decoder direction). Parameter names follow
SAELens so a saved state dict opens there unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from saelab.config import SAEConfig
from saelab.errors import ConfigError, SAEFormatError
from saelab.saes.registry import unknown_options_error


def geometric_median(x_ND: Tensor, iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iteration (docs/methods.md §0.7)."""
    y_D = x_ND.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x_ND - y_D).norm(dim=1).clamp_min(1e-8)
        y_new = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        if (y_new - y_D).norm() <= tol * y_D.norm().clamp_min(1e-8):
            return y_new
        y_D = y_new
    return y_D


@dataclass
class NoOptions:
    """No options of its own."""


class SAEOutput(NamedTuple):
    recon: Tensor
    latents: Tensor


class LossOutput(NamedTuple):
    """A training loss plus what the trainer needs without recomputing the forward pass.

    Sparse families may leave ``latents`` as None (no dense ``[B, F]`` code is ever built) and
    give ``fired_F`` (bool: latent fired in this batch) and ``l0`` (mean active per token).
    """

    total: Tensor
    terms: dict[str, Tensor]
    latents: Tensor | None  # [B, F], for dead-latent tracking and L0 logging
    recon: Tensor  # [B, D]
    fired_F: Tensor | None = None
    l0: Tensor | None = None


class SAE(nn.Module):
    """Base class. Subclasses set ``architecture`` and implement ``encode`` and ``loss``.

    Family-specific defaults live in ``defaults`` (filled into ``None`` config fields) and
    ``train_defaults`` (learning rate, Adam beta1) so the CLI and API share one source. A
    family's own options are the dataclass ``Options`` (``opt(...)`` fields, optional
    ``validate()``); ``self.cfg.options`` is its instance.
    """

    architecture: ClassVar[str] = ""
    #: the dataclass of this family's own options (``SAEConfig.options`` holds an instance)
    Options: ClassVar[type] = NoOptions
    #: SAELens architectures (folders without a ``saelab`` block) this family loads; only the
    #: class's own declaration counts, so subclasses do not inherit it
    saelens_loads: ClassVar[tuple[str, ...]] = ()
    #: the SAELens ``architecture`` this family saves as (None: not loadable by SAELens)
    saelens_architecture: ClassVar[str | None] = None
    trainable: ClassVar[bool] = True
    #: the config field (dotted path into SAEConfig) that sets this family's sparsity, and the
    #: levels `saelab sweep` trains by default (low to high L0 where possible)
    sweep_param: ClassVar[str] = "l1_coefficient"
    sweep_levels: ClassVar[tuple[float, ...]] = ()
    #: True if training needs the LM-loss gradient at the hook beside each activation (g-SAE)
    uses_lm_grads: ClassVar[bool] = False
    #: ``--autocast auto`` trains this family under bf16 autocast where bf16 matmuls are fast
    #: (measured: faster, FVU unchanged; docs/methods.md §0.9); others stay float32
    autocast_auto: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    #: defaults of every family unless its ``defaults`` says otherwise
    shared_defaults: ClassVar[dict[str, Any]] = {"normalize_activations": "scalar_sqrt_d",
                                                 "b_dec_init": "geometric_median"}
    train_defaults: ClassVar[dict[str, Any]] = {}
    variants: ClassVar[tuple[str, ...]] = ()

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = self.resolve_config(cfg)
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        if d_in < 1:
            raise ValueError("SAEConfig.d_in must be set (>= 1) before building an SAE")
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        #: steps over which the sparsity coefficient ramps up linearly (set by the trainer)
        self.sparsity_warmup_steps = 0
        #: optimiser steps of the whole run (set by the trainer; 0 = unknown)
        self.total_steps = 0
        #: a latent fires when |activation| > this (dead-latent tracking, §0.5; set by the
        #: trainer from TrainConfig.dead_activation_eps)
        self.dead_eps = 0.0

    # ---- configuration -------------------------------------------------------------------
    @classmethod
    def make_options(cls, values: Any = None, *, strict: bool = True) -> Any:
        """An instance of ``cls.Options`` from None (the defaults), an instance (copied), a dict
        of field values, or another options dataclass whose fields this family has.

        ``strict``: a value this family has no field for is a ConfigError naming its flag and
        the families that have it; otherwise it is dropped."""
        if isinstance(values, cls.Options):
            return copy.deepcopy(values)
        if values is None:
            return cls.Options()
        if dataclasses.is_dataclass(values) and not isinstance(values, type):
            values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.architecture} options must be a {cls.Options.__name__} or a "
                              f"dict, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = [k for k in values if k not in names]
        if unknown and strict:
            raise unknown_options_error(cls.architecture, unknown)
        return cls.Options(**{k: copy.deepcopy(v) for k, v in values.items() if k in names})

    @classmethod
    def resolve_config(cls, cfg: SAEConfig) -> SAEConfig:
        """Fill ``None`` fields with this family's defaults and ``options`` with an instance of
        ``cls.Options``; returns a copy (an ``SAEConfig``, whatever subclass ``cfg`` is)."""
        values: dict[str, Any] = {f.name: copy.deepcopy(getattr(cfg, f.name))
                                  for f in dataclasses.fields(SAEConfig) if f.name != "options"}
        values["options"] = cls.make_options(cfg.options)
        for key, value in {**SAE.shared_defaults, **cls.defaults}.items():
            if values.get(key) is None:
                values[key] = value(values) if callable(value) else value
        if cls.variants and values["variant"] not in cls.variants:
            raise ConfigError(
                f"unknown variant {values['variant']!r} for {cls.architecture}: choose one of "
                f"{', '.join(cls.variants)}"
            )
        return SAEConfig(**values)

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Checks of ``cfg.options`` (already an instance of ``cls.Options``) that need the
        shared fields too; the options' own ``validate()`` runs before this."""

    # ---- SAELens translation -------------------------------------------------------------------
    @classmethod
    def from_saelens_cfg(cls, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
        """SAEConfig values (``options`` as a dict) for a SAELens ``cfg.json`` without a
        ``saelab`` block; d_in / d_sae are read by the caller."""
        # Pre-6.0 SAELens stored TopK SAEs as "standard" with activation_fn "topk".
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if act not in (None, "relu"):
            raise SAEFormatError(
                f"{folder}: activation_fn {act!r} is not supported; saelab loads ReLU-based "
                "standard, gated, jumprelu and topk SAEs"
            )
        return {
            "architecture": cls.architecture,
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
            "normalize_activations": "none",
            "options": {},
        }

    @classmethod
    def from_saelens_tensors(cls, tensors: dict[str, Tensor]) -> None:
        """Rewrite older SAELens tensor layouts of this family into the 6.x names, in place."""
        for key in ("scaling_factor", "finetuning_scaling_factor"):
            scale = tensors.pop(key, None)
            # Old SAELens decoded (f ⊙ s) W_dec: fold s into the decoder rows (exact).
            if scale is not None and "W_dec" in tensors and not torch.all(scale == 1):
                tensors["W_dec"] = tensors["W_dec"] * scale.to(tensors["W_dec"].dtype)[:, None]

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    #: True if training keeps decoder rows at unit norm (N1); a family whose answer depends on
    #: its config overrides this with a property.
    unit_norm_decoder: bool = False

    # ---- the SAE function ------------------------------------------------------------------
    def encode(self, x_BD: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f_BF: Tensor) -> Tensor:
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> SAEOutput:
        f_BF = self.encode(x_BD)
        return SAEOutput(self.decode(f_BF), f_BF)

    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             grad_BD: Tensor | None = None) -> LossOutput:
        """Training loss on a batch of (normalised) activations.

        ``dead_mask_F``: latents the trainer counts as dead (§0.5), for AuxK-style losses.
        ``grad_BD``: the LM-loss gradient at the hook for each row (only families with
        ``uses_lm_grads``). Families ignore what they do not use. ``encode`` is always the
        inference function; batch-dependent selection (BatchTopK, Feature Choice, ...) happens
        here only.
        """
        raise NotImplementedError(f"{self.architecture} SAEs are not trainable")

    def fired_latents(self, code: Any) -> Tensor:
        """bool ``[F]`` of a ``SparseCode``: latents with ``|value| > dead_eps`` in the batch
        (any nonzero value when ``dead_eps`` is 0). No host sync."""
        if self.dead_eps <= 0:
            return code.fired(self.d_sae)
        hit = (code.vals.detach().abs() > self.dead_eps).flatten().to(torch.uint8)
        out = torch.zeros(self.d_sae, dtype=torch.uint8, device=hit.device)
        return out.scatter_reduce_(0, code.idx.flatten(), hit, "amax").bool()

    def fired_dense(self, f_BF: Tensor, nonneg: bool = False) -> Tensor:
        """bool ``[F]`` of a dense code: ``|f| > dead_eps`` somewhere in the batch (``nonneg``:
        the code is ``≥ 0``, so one column-max pass decides)."""
        f = f_BF.detach()
        if nonneg:
            return f.amax(0) > self.dead_eps
        return (f.amax(0) > self.dead_eps) | (f.amin(0) < -self.dead_eps)

    def after_step(self, step: int, out: LossOutput) -> None:
        """Called by the trainer after each optimiser step and decoder renormalisation
        (e.g. GBA's bias adaptation). ``step`` is the step just taken (0-based)."""

    def training_state(self) -> dict[str, Tensor]:
        """Extra tensors (not in ``state_dict``) a checkpoint must hold to resume exactly."""
        return {}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`training_state` returned."""

    def sparsity_scale(self, step: int) -> float:
        """Multiplier on the sparsity coefficient: linear warm-up (docs/methods.md §0.8)."""
        if self.sparsity_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.sparsity_warmup_steps)

    def _input_for_encoder(self, x_BD: Tensor, W_DF: Tensor) -> Tensor:
        """``(x - b_dec) @ W`` written as ``x @ W - b_dec @ W``.

        Autograd then never forms d(x - b_dec): b_dec's encoder-side gradient is a vector-matrix
        product instead of a full [B, D] matmul.
        """
        h_BF = x_BD @ W_DF
        if self.cfg.apply_b_dec_to_input:
            h_BF = h_BF - self.b_dec @ W_DF
        return h_BF

    # ---- decoder-norm handling (docs/methods.md §0.4) ------------------------------------------------
    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """N1 after the optimiser step: rows back to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + 1e-8)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """N1 before the optimiser step: remove each row's gradient component along the row."""
        g = self.W_dec.grad
        if g is None:
            return
        # (g·d̂) d̂ with d̂ = W/(‖W‖ + eps), as (g·W)/(‖W‖ + eps)² · W: two row-wise dots and one
        # fused update, no [F, D] temporaries (this runs every step)
        W = self.W_dec
        coef_F = torch.linalg.vecdot(g, W, dim=1) / (W.norm(dim=1) + 1e-8).square()
        g.addcmul_(W, coef_F[:, None], value=-1.0)

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """N3: make decoder rows unit-norm without changing the SAE function."""
        raise NotImplementedError(f"{self.architecture} does not support folding")

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on ``scale * x``; rewrite it to act on raw ``x``.

        Latents come out divided by ``scale``; the reconstruction is exactly ``recon(scale x)/scale``.
        Every family divides its additive biases (and thresholds) by ``scale``.
        """
        for name in self.bias_names():
            getattr(self, name).div_(scale)

    def bias_names(self) -> tuple[str, ...]:
        """Parameters/buffers measured in input units (divided by the input scale on folding)."""
        return ("b_dec",)

    # ---- init helpers (docs/methods.md §0.7) ----------------------------------------------------------
    @torch.no_grad()
    def init_tied_(self, generator: torch.Generator | None, row_norm: float = 1.0) -> None:
        """Kaiming-uniform decoder, rows rescaled to ``row_norm``; ``W_enc = W_dec^T``."""
        w = torch.empty(self.d_sae, self.d_in, dtype=torch.float32)
        bound = (6.0 / self.d_in) ** 0.5  # kaiming-uniform for a [d_sae, d_in] matrix, fan_in=d_in
        w.uniform_(-bound, bound, generator=generator)
        w *= row_norm / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)

    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """Data-dependent initialisation from a (normalised) sample: ``b_dec`` per
        ``cfg.b_dec_init``."""
        mode = self.cfg.b_dec_init
        if mode == "zeros":
            return
        x = x_ND.float()
        centre = geometric_median(x) if mode == "geometric_median" else x.mean(0)
        self.b_dec.copy_(centre.to(self.b_dec.dtype))

    # ---- saving ---------------------------------------------------------------------------------
    def saelens_extra_cfg(self) -> dict[str, Any]:
        """Extra ``cfg.json`` fields this family needs (beyond d_in, d_sae, dtype, device)."""
        return {"apply_b_dec_to_input": bool(self.cfg.apply_b_dec_to_input)}

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}"
