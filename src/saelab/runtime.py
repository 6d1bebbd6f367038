"""Device, dtype and process-level tuning shared by harvesting, training and evaluation."""

from __future__ import annotations

import ctypes
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from saelab.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; explicit names are checked for availability."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available: use --device cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not _mps_available():
            raise ConfigError(
                f"device {name!r} requested but MPS is not available: use --device cpu"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (and common short forms) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return _DTYPES[key]


def resolve_model_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """dtype for the LM forward. ``auto`` picks bfloat16 only where bf16 matmuls are fast.

    On CPUs without AMX, bf16 matmuls are emulated and slower than fp32, so ``auto`` keeps fp32.
    """
    if (name or "auto").strip().lower() != "auto":
        return parse_dtype(name)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16
    return torch.float32


def cpu_has_amx() -> bool:
    """True if this CPU has AMX tiles (fast bf16 matmuls). Uses a private torch helper."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # private API: absent on old/other builds
        return False


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: the CPUs this process may use). Returns the count."""
    if n is None or n < 1:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_malloc_tuned = False


def tune_malloc() -> bool:
    """Keep big freed tensors in the glibc heap instead of unmapping them (glibc Linux only).

    By default glibc serves blocks above its mmap threshold (at most 32 MB) with fresh mmaps and
    unmaps them on free, so every training step pays page faults + zeroing for each large
    temporary (an SAE step at width 4096 allocates several 64 MB buffers). Measured on a 2-core
    CPU, 4096x576 -> 4096 latents fwd+bwd: ~115k page faults and ~170 ms of kernel time per
    step before, ~0 after. The cost: the process keeps its peak heap instead of shrinking.
    Safe to call many times; returns False (and does nothing) where unsupported.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = mallopt(_M_MMAP_MAX, 0) == 1
        ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False
    _malloc_tuned = bool(ok)
    return _malloc_tuned


def cache_root() -> Path:
    """Root of saelab's caches: ``$SAELAB_CACHE`` or ``~/.cache/saelab``."""
    root = os.environ.get("SAELAB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "saelab"


def hub_offline() -> bool:
    """True if the user asked huggingface_hub to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe of the Hugging Face endpoint.

    Without it an offline machine spends ~25 s in huggingface_hub's retry back-off before failing.
    Behind an HTTP(S) proxy a direct probe proves nothing, so we then assume the hub is reachable.
    """
    if hub_offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
