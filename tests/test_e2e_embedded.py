"""The main job on the real embedded model and corpus, at a tiny budget (slow: kept in CI)."""

import json

import pytest

from saelab.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["gated", "relu"])
def test_train_on_embedded_default(tmp_path, monkeypatch, arch):
    out = tmp_path / arch
    args = ["train", "--arch", arch, "--tokens", "61440", "--d-sae", "1024",
            "--eval-tokens", "4096", "--ce-windows", "8", "--out", str(out), "--quiet",
            "--harvest-tokens", "61440", "--lr", "1e-3"]
    # Keep the real model cache (built once per machine) but put the store in tmp.
    monkeypatch.setattr("saelab.pipeline.cache_root", lambda: tmp_path / "cache")
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 2.0 < m["ce_loss_clean"] < 5.0  # a real pretrained LM on real English
    assert m["ce_loss_zero_ablation"] > m["ce_loss_with_sae"] > m["ce_loss_clean"] - 0.05
    # 15 steps: the April ReLU starts from 0.1-norm decoder rows and barely moves yet.
    assert 0.0 < m["fvu"] < (0.8 if arch == "gated" else 1.1)
    assert 0.3 < m["ce_loss_recovered"] <= 1.05
    assert 0 < m["l0"] < 1024
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "SmolLM2-135M-Instruct"
    assert cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
