"""Language models: loading (embedded SmolLM2, embedded Gemma 3 270M or Hugging Face) and hook
points."""

from saelab.models.hooks import (
    HookPoint,
    capture,
    find_blocks,
    hook_module,
    parse_hook,
    run_to_hook,
    splice,
)
from saelab.models.loading import (
    EMBEDDED_NAME,
    GEMMA_ALIAS,
    GEMMA_NAME,
    LoadedModel,
    canonical_model_name,
    load_model,
    load_tokenizer,
)

__all__ = [
    "EMBEDDED_NAME",
    "GEMMA_ALIAS",
    "GEMMA_NAME",
    "HookPoint",
    "LoadedModel",
    "canonical_model_name",
    "capture",
    "find_blocks",
    "hook_module",
    "load_model",
    "load_tokenizer",
    "parse_hook",
    "run_to_hook",
    "splice",
]
