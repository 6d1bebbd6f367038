"""`--model-dtype auto`: bf16 only where a (cached, per-device) micro-benchmark says it wins."""

from __future__ import annotations

import json

import pytest
import torch

from saelab import runtime


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))


def planted(monkeypatch, fp32_s: float, bf16_s: float) -> list:
    calls = []

    def fake(device, dtype, **kw):
        calls.append(dtype)
        return fp32_s if dtype == torch.float32 else bf16_s

    monkeypatch.setattr(runtime, "_matmul_seconds", fake)
    return calls


@pytest.mark.parametrize(("fp32_s", "bf16_s", "want"), [
    (2.0, 1.0, torch.bfloat16),   # 2x faster: worth it
    (1.2, 1.0, torch.float32),    # 1.2x: below the 1.3x bar
    (1.0, 3.0, torch.float32),    # emulated bf16 (no hardware support): slower
])
def test_auto_follows_the_benchmark_and_caches_it(monkeypatch, tmp_path, fp32_s, bf16_s, want):
    calls = planted(monkeypatch, fp32_s, bf16_s)
    assert runtime.resolve_model_dtype("auto", "cpu") is want
    assert runtime.resolve_model_dtype("auto", "cpu") is want
    assert len(calls) == 2  # measured once (fp32 + bf16), then read from the cache
    cache = json.loads((tmp_path / "cache" / "bf16_benchmark.json").read_text())
    (key, entry), = cache.items()
    assert key.startswith("cpu|") and torch.__version__ in key
    assert entry["speedup"] == pytest.approx(fp32_s / bf16_s, rel=1e-3)
    assert runtime.resolve_model_dtype("float32", "cpu") is torch.float32  # explicit wins


def test_real_benchmark_is_cheap_and_sane():
    import time

    t0 = time.perf_counter()
    s = runtime.bf16_speedup("cpu")
    assert 0.01 < s < 100 and time.perf_counter() - t0 < 10
