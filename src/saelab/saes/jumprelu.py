"""JumpReLU SAE (Rajamanoharan et al. 2024; docs/methods.md §3): training, inference, conversion.

::

    π = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc
    f = π ⊙ 1[π > θ]          (θ = ``threshold``, one per latent, > 0)
    x̂ = f W_dec + b_dec

Training (§3.2–§3.3, [R]): ``L = ‖x − x̂‖² + λ·S`` with per-token SSE averaged over the batch and
λ = ``l1_coefficient`` (linearly warmed up by the trainer). The step function has no useful
derivative, so θ learns through straight-through pseudo-derivatives with a rectangle kernel
``K(u) = 1[|u| < 1/2]`` of bandwidth ε (``options.bandwidth``):

- the JumpReLU output passes the true derivative ``1[π > θ]`` to π and ``−(θ/ε)K((π−θ)/ε)``
  to θ (:class:`JumpReLUFunction`);
- the L0 term passes nothing to π (a π pseudo-gradient there kills latents, §3.3) and
  ``−(1/ε)K((π−θ)/ε)`` to θ (:class:`StepCount`).

Sparsity term S (``options.sparsity_loss``):

- ``l0`` (default, §3.2): mean L0 per token.
- ``target_l0`` (§3.7, the ``dictionary_learning`` default [C]): ``(L0/target − 1)²`` on the
  batch-mean L0; λ defaults to 1 there.
- ``tanh`` (§3.7, Anthropic Jan 2025 via SAELens [C]): ``Σ_i tanh(c·f_i‖d_i‖)`` per token; the
  Anthropic recipe pairs it with a much wider bandwidth than 0.001 on differently scaled inputs,
  so tune ``options.bandwidth`` when using it.

Any of them can add the pre-activation loss ``coef·Σ_i ReLU(θ_i − π_i)‖d_i‖`` on latents the
trainer counts as dead (``options.pre_act_coefficient``; 0 = off), which pulls dead latents'
pre-activations up to their thresholds.

Defaults: no pre-encoder bias (§3.1), unit-norm decoder with tangent projection (N1, §3.5; [U]
whether the paper imposes it), Kaiming-uniform tied init with θ = 0.001 (§3.4), inputs scaled to
``E‖x‖² = 1`` (§3.4), Adam β1 = 0 (§3.6), ε = 0.001 (§3.6).

Deviations, for our ~100–500-step budgets: LR 1e-3 instead of the [U] 7e-5 (which assumes ~10⁵
steps; Adam moves each parameter by about one LR per step and θ has to travel from 0.001 to a few
hundredths), λ warm-up over the trainer's ``l1_warmup_fraction`` instead of 10k steps, and
``b_dec`` from the library's data-based ``b_dec_init`` (geometric median) instead of 0 (§3.4).

θ is learned directly (as ``dictionary_learning`` does), not as ``log θ`` (as the authors'
code and SAELens do). Two reasons: (1) the saved tensor is ``threshold`` in SAELens' ``jumprelu``
layout, with no conversion on save, load, folding or gated → JumpReLU conversion; (2) Adam steps
on ``log θ`` change θ by a *factor* of about ``1 ± lr`` per step, so from θ = 0.001 reaching the
0.01–0.1 thresholds of unit-scale inputs takes thousands of steps, while additive steps take tens.
θ is kept positive by clamping it to ``THRESHOLD_FLOOR`` after every optimiser step
(:meth:`JumpReLUSAE.after_step`): with no sparsity pressure the reconstruction gradient pushes θ
down without limit, and a θ ≤ 0 would let non-positive pre-activations through.

This family is also the target of ``GatedSAE.to_jumprelu()`` (§2.6) and of loading Gemma Scope /
SAELens ``jumprelu`` folders. A loaded negative θ acts as θ = 0, i.e. a plain ReLU, exactly as
SAELens computes ``ReLU(π) ⊙ 1[π > θ]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.config import SAEConfig, opt
from saelab.errors import ConfigError
from saelab.saes.base import SAE, LossOutput
from saelab.saes.registry import register

#: smallest threshold training leaves behind (in normalised-input units); any positive value
#: keeps f = 0 for π ≤ 0, and a tiny one changes nothing else.
THRESHOLD_FLOOR = 1e-6

#: default λ per sparsity loss, for inputs with E‖x‖² = 1. ``l0``: from two 60-step runs on
#: SmolLM2-135M layer-6 residuals (d_sae 2048, batch 2048, LR 1e-3): λ = 1e-3 → L0 87,
#: FVU 0.21; λ = 4e-3 → L0 62, FVU 0.23, both still falling (θ travel is LR-limited that early),
#: so 4e-3 should settle in the tens over 100–500 steps. ``target_l0``: dictionary_learning's 1
#: [C]. ``tanh``: [U] the l0 value scaled by ~1/tanh(4·0.1), not tuned.
DEFAULT_LAMBDA = {"l0": 4e-3, "target_l0": 1.0, "tanh": 1e-2}


def _count_dtype(t: Tensor) -> torch.dtype:
    """Counts of up to B tokens must stay exact: float32 at least (bf16 rounds above 256)."""
    return torch.promote_types(t.dtype, torch.float32)


def _in_window(pi_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((π − θ)/ε) as a bool mask: |π − θ| < ε/2."""
    return (pi_BF - theta_F).abs_() < 0.5 * bandwidth


@dataclass
class JumpReLUOptions:
    """JumpReLU training (docs/methods.md §3): straight-through estimators and the sparsity loss."""

    bandwidth: float = opt(
        0.001, "Kernel bandwidth epsilon of the threshold pseudo-derivatives (§3.3; [R]).",
        flag="jumprelu_bandwidth")
    init_threshold: float = opt(0.001, "Initial threshold theta of every latent (§3.4; [R]).",
                                flag="jumprelu_init_threshold")
    sparsity_loss: str = opt(
        "l0", "Sparsity term: l0 (lambda * L0, §3.2), target_l0 ((L0/target - 1)^2, §3.7, the "
        "dictionary_learning default) or tanh (Anthropic Jan-2025 lambda*sum tanh(c f ||d||)).",
        flag="jumprelu_sparsity_loss", choices=("l0", "target_l0", "tanh"))
    target_l0: float = opt(20.0, "Target L0 of the target_l0 sparsity loss (dictionary_learning: "
                           "20 [C]); --l1-coefficient is its weight (default 1).",
                           flag="jumprelu_target_l0")
    tanh_c: float = opt(4.0, "c of the tanh sparsity loss.", flag="jumprelu_tanh_c")
    pre_act_coefficient: float = opt(
        0.0, "Coefficient of the pre-activation loss sum ReLU(theta - pi)*||d|| on dead latents "
        "(paired with tanh by Anthropic, ~3e-6; works with any sparsity loss); 0 disables.",
        flag="jumprelu_pre_act_coefficient")

    def validate(self) -> None:
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise ConfigError("--jumprelu-bandwidth and --jumprelu-init-threshold must be > 0")
        if self.sparsity_loss not in ("l0", "target_l0", "tanh"):
            raise ConfigError(f"--jumprelu-sparsity-loss must be l0, target_l0 or tanh, got "
                              f"{self.sparsity_loss!r}")
        if self.target_l0 <= 0 or self.tanh_c <= 0 or self.pre_act_coefficient < 0:
            raise ConfigError("--jumprelu-target-l0 and --jumprelu-tanh-c must be > 0 and "
                              "--jumprelu-pre-act-coefficient >= 0")


class JumpReLUFunction(torch.autograd.Function):
    """``f = π·1[π > θ]``: true derivative to π, pseudo-derivative ``−(θ/ε)K`` to θ (§3.3).

    As in :meth:`JumpReLUSAE.encode`, a θ ≤ 0 (only ever loaded, never left by training) acts
    as θ = 0 in the forward pass, so training starts from the function inference computes.
    """

    @staticmethod
    def forward(ctx: Any, pi_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pi_BF, theta_F)
        ctx.bandwidth = bandwidth
        return torch.where(pi_BF > theta_F.clamp_min(0.0), pi_BF, 0.0)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pi_BF, theta_F = ctx.saved_tensors
        grad_pi = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_pi = torch.where(pi_BF > theta_F.clamp_min(0.0), grad_BF, 0.0)
        if ctx.needs_input_grad[1]:
            win_BF = _in_window(pi_BF, theta_F, ctx.bandwidth)
            grad_theta = torch.where(win_BF, grad_BF, 0.0).sum(0) * (-theta_F / ctx.bandwidth)
        return grad_pi, grad_theta, None


class StepCount(torch.autograd.Function):
    """Per-latent firing count over the batch, ``Σ_b H(π_b − θ)`` (the L0 term, §3.3).

    Summing over the batch inside the function avoids a dense [B, F] float output. Backward:
    no gradient to π; ``−(1/ε)·#{b : |π_b − θ| < ε/2}`` to θ.
    """

    @staticmethod
    def forward(ctx: Any, pi_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pi_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (pi_BF > theta_F.clamp_min(0.0)).sum(0, dtype=_count_dtype(pi_BF))

    @staticmethod
    def backward(ctx: Any, grad_F: Tensor) -> tuple[None, Tensor | None, None]:
        pi_BF, theta_F = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            n_F = _in_window(pi_BF, theta_F, ctx.bandwidth).sum(0, dtype=grad_F.dtype)
            grad_theta = (n_F * grad_F * (-1.0 / ctx.bandwidth)).to(theta_F.dtype)
        return None, grad_theta, None


@register
class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    Options = JumpReLUOptions
    saelens_architecture = "jumprelu"
    saelens_loads = ("jumprelu",)
    defaults = {
        # Gemma Scope convention (§0.2, §3.1): no pre-encoder bias.
        "apply_b_dec_to_input": False,
        # §3.4 [R]: E‖x‖² = 1, the scale at which ε = θ₀ = 0.001 are meaningful.
        "normalize_activations": "scalar_unit_mean_sq_norm",
        # an unknown sparsity_loss falls back here and is rejected by validate() in __init__
        "l1_coefficient": lambda v: DEFAULT_LAMBDA.get(v["options"].sparsity_loss, 0.0),
    }
    # β1 = 0 (§3.6 [R]); LR 1e-3, not 7e-5: see the module docstring.
    train_defaults = {"lr": 1e-3, "adam_beta1": 0.0}
    # λ of the default l0 loss, high to low, aiming at L0 ≈ 10 / tens / ~100 on SmolLM2 (see
    # DEFAULT_LAMBDA; the ends are extrapolated from short runs). Meant for the l0 loss: under
    # target_l0, λ only weights the penalty and options.target_l0 sets the sparsity.
    sweep_levels = (1.6e-2, 4e-3, 1e-3)

    def __init__(
        self,
        cfg: SAEConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(cfg, device=device, dtype=dtype)
        self.cfg.options.validate()
        kw = {"device": device, "dtype": dtype}
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **kw))
        # A Parameter named as in SAELens' jumprelu layout; learned directly (module docstring).
        self.threshold = nn.Parameter(torch.zeros(self.d_sae, **kw))

    @property
    def unit_norm_decoder(self) -> bool:
        return True  # N1 (§3.5)

    @classmethod
    def from_saelens_tensors(cls, tensors: dict[str, Tensor]) -> None:
        super().from_saelens_tensors(tensors)
        # older SAELens JumpReLU folders store log θ
        if "log_threshold" in tensors and "threshold" not in tensors:
            tensors["threshold"] = tensors.pop("log_threshold").exp()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # §3.4 [R]: Kaiming-uniform unit-norm decoder, W_enc = W_decᵀ, zero biases, θ = 0.001.
        self.init_tied_(generator, row_norm=1.0)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(self.cfg.options.init_threshold)

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return self._input_for_encoder(x_BD, self.W_enc) + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        pi_BF = self.pre_acts(x_BD)
        # clamp: a negative θ behaves as ReLU, matching SAELens (see module docstring).
        return torch.where(pi_BF > self.threshold.clamp_min(0.0), pi_BF, 0.0)

    # ---- training ------------------------------------------------------------------------------
    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             **_: Tensor | None) -> LossOutput:
        opts = self.cfg.options
        eps = opts.bandwidth
        n_tokens = x_BD.shape[0]
        pi_BF = self.pre_acts(x_BD)
        theta_F = self.threshold
        f_BF = JumpReLUFunction.apply(pi_BF, theta_F, eps)
        recon_BD = self.decode(f_BF)
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()

        norms_F = None
        if opts.sparsity_loss == "tanh":
            norms_F = self.W_dec.norm(dim=1)
            sparsity = torch.tanh(f_BF * (opts.tanh_c * norms_F)).sum(-1).mean()
            with torch.no_grad():
                count_F = (f_BF != 0).sum(0, dtype=_count_dtype(pi_BF))
        else:
            count_F = StepCount.apply(pi_BF, theta_F, eps)
            l0 = count_F.sum() / n_tokens
            sparsity = l0 if opts.sparsity_loss == "l0" else (l0 / opts.target_l0 - 1.0).pow(2)

        lam = self.cfg.l1_coefficient * self.sparsity_scale(step)
        total = mse + lam * sparsity
        terms = {"mse": mse, "sparsity": sparsity}
        if opts.pre_act_coefficient > 0 and dead_mask_F is not None:
            if norms_F is None:
                norms_F = self.W_dec.norm(dim=1)
            # Σ_i ReLU(θ_i − π_i)‖d_i‖ over dead latents: one matrix-vector product, no host
            # sync (all-alive batches just contribute zero).
            w_F = dead_mask_F.to(norms_F.dtype) * norms_F
            pre_act = ((theta_F - pi_BF).relu() @ w_F).mean()
            total = total + opts.pre_act_coefficient * pre_act
            terms["pre_act"] = pre_act

        count_F = count_F.detach()
        fired_F = count_F > 0 if self.dead_eps <= 0 else self.fired_dense(f_BF)
        return LossOutput(total, terms, f_BF, recon_BD, fired_F=fired_F,
                          l0=count_F.sum() / n_tokens)

    @torch.no_grad()
    def after_step(self, step: int, out: LossOutput) -> None:
        # Keep θ > 0 (module docstring): the reconstruction gradient alone drives it down.
        self.threshold.clamp_(min=THRESHOLD_FLOOR)

    # ---- folding -------------------------------------------------------------------------------
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
