"""The one map of dtype names to torch dtypes (bottom layer: imports only torch).

``DTYPES`` holds the canonical names (what cfg.json, manifests and configs store);
``ALIASES`` the short forms the CLI / API also accept; ``STORE_DTYPES`` the names an activation
store may hold.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ALIASES: dict[str, str] = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                           "fp16": "float16", "half": "float16"}
STORE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str | None:
    """Canonical name of ``dtype``, or None if it has none here."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return None
