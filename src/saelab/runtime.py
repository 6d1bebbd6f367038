"""Device, dtype and process-level tuning shared by harvesting, training and evaluation."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from saelab.dtypes import ALIASES, DTYPES
from saelab.errors import ConfigError
from saelab.fsutil import atomic_write_json

_DTYPES = {**DTYPES, **{alias: DTYPES[name] for alias, name in ALIASES.items()}}


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
    """dtype for the LM forward. ``auto`` picks bfloat16 only where bf16 matmuls are clearly
    faster than fp32 on this device, as measured once by :func:`bf16_speedup` (cached)."""
    if (name or "auto").strip().lower() != "auto":
        return parse_dtype(name)
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def bf16_is_fast(device: torch.device | str) -> bool:
    """bf16 is supported on ``device`` and its matmuls beat float32 by ``BF16_MIN_SPEEDUP``
    (the cached :func:`bf16_speedup`): the verdict of every ``auto`` precision choice."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return False
    return bf16_speedup(device) >= BF16_MIN_SPEEDUP


BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this factor: its rounding is not free
_BENCH_FILE = "bf16_benchmark.json"


def device_model(device: torch.device) -> str:
    """What the benchmark verdict depends on: the GPU's or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def bf16_speedup(device: torch.device | str) -> float:
    """fp32 time / bf16 time of an LM-sized matmul on ``device``, measured once per device
    model, torch version and thread count, and cached in ``<cache root>/bf16_benchmark.json``."""
    device = torch.device(device)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = f"{device.type}|{device_model(device)}|torch {torch.__version__}|threads {threads}"
    path = cache_root() / _BENCH_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), dict) and "speedup" in cached[key]:
        return float(cached[key]["speedup"])
    times = {dt: _matmul_seconds(device, dt) for dt in (torch.float32, torch.bfloat16)}
    speedup = times[torch.float32] / max(times[torch.bfloat16], 1e-12)
    cached[key] = {"speedup": round(speedup, 3), "fp32_s": times[torch.float32],
                   "bf16_s": times[torch.bfloat16]}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-measurement
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cached)
    return speedup


def _matmul_seconds(device: torch.device, dtype: torch.dtype, m: int = 1024, k: int = 576,
                    n: int = 1536, budget_s: float = 0.05) -> float:
    """Best time of ``[m, k] @ [k, n]`` (a SmolLM2-sized MLP projection of 8 windows)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(k, n, generator=g).to(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        (a @ b).sum().item()  # warm-up: kernels, caches
        best, spent = float("inf"), 0.0
        for i in itertools.count():
            if i >= 3 and spent >= budget_s:
                break
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
    return best


def cpu_has_amx() -> bool:
    """True if this CPU has AMX tiles (fast bf16 matmuls). Uses a private torch helper."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # private API: absent on old/other builds
        return False


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_malloc_tuned = False


def tune_malloc() -> bool:
    """Keep big freed tensors in the glibc heap instead of unmapping them (glibc Linux only).

    By default glibc serves blocks above its mmap threshold (at most 32 MB) with fresh mmaps and
    unmaps them on free, so every training step pays page faults + zeroing for each large
    temporary (an SAE step at width 4096 allocates several 64 MB buffers); see
    benchmarks/README.md for what this saves. The cost: the process keeps its peak heap.
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
