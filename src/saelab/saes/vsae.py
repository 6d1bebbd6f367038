"""Variational TopK SAE, vSAE (Baker, Li et al. 2025; docs/methods.md §11). A research variant: the
paper's result is negative (the KL term kills latents), so it is here to reproduce that.

::

    x̄ = x                      (April mode, the default; x − b_dec with apply_b_dec_to_input)
    μ = ReLU(x̄ W_enc + b_enc)
    log σ² = clamp(x̄ W_var + b_var, −6, 2)          (variance = learned; b_var starts at −2)
    z = μ + σ ⊙ ε   in training (learned variance, or fixed with unit_variance sampling)
    z = μ           at inference, and in training with fixed variance and sampling off
    f = the k entries of z largest in |z|, signs kept
    x̂ = f W_dec + b_dec

Loss (§11.3): ``SSE (per token, batch mean) + β_KL(t)·KL + α·AuxK``.

- KL, learned variance: ``½ Σ_i (μ_i² + σ_i² − 1 − log σ_i²)`` with μ clamped to [−10, 10],
  summed over latents, batch mean. Fixed variance: ``½‖μ‖²``. With sampling off z = μ, so this
  is the code's ``½‖z‖²``; with unit-variance sampling it is the exact KL of N(μ, I) from
  N(0, I), while ``½‖z‖²`` of the sampled z would equal it plus F/2 in expectation, with extra
  noise and the same expected gradient.
- β_KL ramps linearly from 0 to ``kl_coefficient`` over the first ``kl_warmup_fraction`` of
  ``total_steps`` (the code's warm-up, which starts at exactly 0).
- AuxK (§0.6) on μ (the post-ReLU mean; dead latents are scored without sampling noise), α and
  k_aux from ``TopKOptions``, normalised by the residual's variance as in dictionary_learning,
  which the vSAE code builds on. The main term is the SSE, as in that code, so AuxK is small
  next to it: that is the reference behaviour.

Choices where the spec leaves room:

- Decoder: unit-norm rows kept by tangent projection (N1), tied Kaiming init with ``b_dec`` from
  the data, as the library's TopK. The spec says "same as the host SAE" and that the code
  constrains the norm only outside April mode; a TopK code cannot be folded (§0.4 N3) so an
  unconstrained decoder would not export, hence N1 always.
- Variance head init: Kaiming-uniform ``W_var`` (fan-in d_in), ``b_var = −2`` [C].
- KL coefficient default 0.01 (``VSAEOptions``): one of the logged run values; it is
  measured against an SSE on inputs scaled to E‖x‖ = √d, where 1.0 already collapses the
  deterministic L0 far below k in a short run.
- Dead-latent tracking (and so AuxK) sees the training code, i.e. the noisy selection, as the
  reference trainer does: latents picked only by noise count as alive.
- Noise: drawn from a generator seeded by (``noise_seed``, step), not the global RNG, so a
  resumed run sees the same samples; ``noise_seed`` comes from the init generator and is part
  of :meth:`training_state`.
- Learning rate: the TopK width law capped at 1e-3 (:func:`topk_lr`): 5e-4 at M = 2^14 (the
  code default), ~7e-4 at the paper's M = 8192 (runs used 8e-4), 1e-3 for M ≤ 4096 and the
  ~500-step budgets this library defaults to. The code's LR warm-up/decay (max(200, 2%) steps,
  decay from 80%) is left to ``TrainConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.config import opt
from saelab.errors import ConfigError
from saelab.saes._topk_base import TopKBaseSAE, TopKOptions, topk_lr
from saelab.saes.base import LossOutput
from saelab.saes.registry import register
from saelab.saes.sparse import topk_per_token

LOG_VAR_MIN, LOG_VAR_MAX = -6.0, 2.0  # §11.2 clamp of log σ²
MU_CLAMP = 10.0  # §11.3: μ clamped to [−10, 10] inside the learned-variance KL
LOG_VAR_INIT = -2.0  # §11.2: b_var init
_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive steps over seed space


@dataclass
class VSAEOptions(TopKOptions):
    """Variational SAE (docs/methods.md §11)."""

    variance: str = opt("learned", "Posterior variance: learned (log sigma^2 head) or fixed.",
                        choices=("learned", "fixed"))
    fixed_var_sampling: str = opt(
        "off", "Fixed variance only: off (the code's var_flag=0: z = mu, KL = ||z||^2/2) or "
        "unit_variance (the write-up: z = mu + eps).", choices=("off", "unit_variance"))
    kl_coefficient: float = opt(
        0.01, "Full KL coefficient beta_KL, against the per-token SSE of inputs normalised to "
        "E||x|| = sqrt(d) (code default 500; logged runs 1e-4, 1e-2, 1, 100). 0.01 is one of the "
        "logged values; at 1.0 the deterministic L0 collapsed to ~8 of k = 32 within 100 steps "
        "on SmolLM2 layer 6.", flag="vsae_kl_coefficient")
    kl_warmup_fraction: float = opt(0.1, "Linear KL warm-up from 0 over this fraction of steps.",
                                    flag="vsae_kl_warmup_fraction")

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.kl_coefficient) and self.kl_coefficient >= 0):
            raise ConfigError(f"--vsae-kl-coefficient must be a finite number >= 0, got "
                              f"{self.kl_coefficient}")
        if not 0 <= self.kl_warmup_fraction <= 1:
            raise ConfigError(f"--vsae-kl-warmup-fraction must be in [0, 1], got "
                              f"{self.kl_warmup_fraction}")


@register
class VariationalSAE(TopKBaseSAE):
    """TopK vSAE (docs/methods.md §11): Gaussian posterior over latents, KL to N(0, I), TopK by |z|."""
    autocast_auto = False  # dense terms beside the selection: not measured under bf16

    architecture = "vsae"
    Options = VSAEOptions
    saelens_architecture = None
    defaults = {"apply_b_dec_to_input": False}  # §11.2 April mode
    train_defaults = {"lr": topk_lr, "adam_beta1": 0.9}
    sweep_param = "options.k"
    sweep_levels = (16, 32, 64)
    #: selection by |z| with signs (sampled z can be negative)
    signed = True
    #: the training code holds sampled values, not π: ``loss`` differentiates the dense μ
    sparse_encoder_grad = False

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        kw = {"device": device, "dtype": dtype}
        if self.learned_variance:
            self.W_var = nn.Parameter(torch.empty(self.d_in, self.d_sae, **kw))
            self.b_var = nn.Parameter(torch.full((self.d_sae,), LOG_VAR_INIT, **kw))
        #: seeds the training noise together with the step (see module docstring)
        self.noise_seed = 0

    @property
    def learned_variance(self) -> bool:
        return self.cfg.options.variance == "learned"

    @property
    def samples(self) -> bool:
        """True if training adds noise to μ."""
        return self.learned_variance or self.cfg.options.fixed_var_sampling == "unit_variance"

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if self.learned_variance:
            bound = math.sqrt(6.0 / self.d_in)  # Kaiming-uniform, fan-in d_in
            w = torch.empty(self.d_in, self.d_sae).uniform_(-bound, bound, generator=generator)
            self.W_var.copy_(w)
            self.b_var.fill_(LOG_VAR_INIT)
        self.noise_seed = int(torch.randint(0, 2**62, (), generator=generator))

    # ---- the posterior -------------------------------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """The posterior mean μ = ReLU(x̄ W_enc + b_enc); inference selects on it directly."""
        return torch.relu(self._input_for_encoder(x_BD, self.W_enc) + self.b_enc)

    def log_var(self, x_BD: Tensor) -> Tensor:
        """Clamped log σ² of the learned variance head."""
        lv_BF = self._input_for_encoder(x_BD, self.W_var) + self.b_var
        return lv_BF.clamp(LOG_VAR_MIN, LOG_VAR_MAX)

    def noise(self, shape: torch.Size, step: int, like: Tensor) -> Tensor:
        """ε ~ N(0, I) for training step ``step``: a function of (noise_seed, step) only."""
        g = torch.Generator(device=like.device)
        g.manual_seed((self.noise_seed ^ (step * _GOLDEN)) % 2**63)
        return torch.randn(shape, generator=g, device=like.device, dtype=like.dtype)

    def sample(self, mu_BF: Tensor, log_var_BF: Tensor | None, step: int) -> Tensor:
        """Training-time latent z (reparameterised, so gradients reach μ and log σ²)."""
        if not self.samples:
            return mu_BF
        eps_BF = self.noise(mu_BF.shape, step, mu_BF)
        if log_var_BF is None:  # fixed unit variance
            return mu_BF + eps_BF
        return mu_BF + torch.exp(0.5 * log_var_BF) * eps_BF

    def kl(self, mu_BF: Tensor, log_var_BF: Tensor | None) -> Tensor:
        """KL to N(0, I), summed over latents, mean over the batch (§11.3)."""
        if log_var_BF is None:
            return 0.5 * mu_BF.pow(2).sum(-1).mean()
        mu = mu_BF.clamp(-MU_CLAMP, MU_CLAMP)
        return 0.5 * (mu.pow(2) + log_var_BF.exp() - 1.0 - log_var_BF).sum(-1).mean()

    def kl_scale(self, step: int) -> float:
        """β_KL(t) / kl_coefficient: linear from 0 over the warm-up, then 1."""
        warm = int(round(self.cfg.options.kl_warmup_fraction * self.total_steps))
        return 1.0 if warm <= 0 else min(1.0, step / warm)

    # ---- training --------------------------------------------------------------------------------
    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             **_: Tensor | None) -> LossOutput:
        mu_BF = self.pre_acts(x_BD)
        log_var_BF = self.log_var(x_BD) if self.learned_variance else None
        z_BF = self.sample(mu_BF, log_var_BF, step) if self.training else mu_BF
        code = topk_per_token(z_BF, min(self.k, self.d_sae), signed=True)
        recon_BD = code.decode(self.W_dec) + self.b_dec
        sse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        kl = self.kl(mu_BF, log_var_BF)
        aux = self.aux_loss(mu_BF, x_BD - recon_BD, dead_mask_F, x_BD)
        beta = self.cfg.options.kl_coefficient * self.kl_scale(step)
        total = sse + beta * kl + self.cfg.options.aux_coefficient * aux
        terms = {"sse": sse, "kl": kl, "auxk": aux}
        return LossOutput(total, terms, None, recon_BD, fired_F=self.fired_latents(code),
                          l0=code.l0(x_BD.shape[0]))

    def training_state(self) -> dict[str, Tensor]:
        return {"noise_seed": torch.tensor(self.noise_seed, dtype=torch.int64)}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        if "noise_seed" in tensors:
            self.noise_seed = int(tensors["noise_seed"])

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """As the base class, plus the variance head: σ is in latent units, so on raw inputs
        ``log σ²`` must come out lower by ``2 log scale`` (exact up to the [−6, 2] clamp)."""
        super().fold_input_scale(scale)
        if self.learned_variance:
            self.W_var.mul_(scale)
            self.b_var.sub_(2.0 * math.log(scale))
