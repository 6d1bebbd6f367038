"""The main job on the real embedded model and corpus, at a tiny budget (slow: kept in CI)."""

import json

import pytest

from saelab.cli import main

pytestmark = pytest.mark.slow


#: (FVU below, L0 below, CE recovered above) that the 60-step SAE passes and an untrained one
#: fails. Measured with the LM in bf16 (`--model-dtype auto` on CPU), seeds 0 and 1:
#:   gated: random init FVU 1.52-1.59, after the b_dec data init (step 0) FVU 0.90-0.91 and
#:          L0 505-513; trained FVU 0.39-0.40, L0 245-255, CE recovered 0.73-0.74
#:   relu:  random init FVU 1.72, CE recovered 0.23-0.29; step 0 FVU 0.99, L0 505-512, CE
#:          recovered 0.48; trained FVU 0.785, L0 69-71, CE recovered 0.61
#: (the gated SAE's CE recovered at step 0, 0.83-0.85, is above its trained one: not a bound)
TRAINED = {"gated": (0.6, 400.0, 0.6), "relu": (0.9, 200.0, 0.5)}


@pytest.mark.parametrize("arch", ["gated", "relu"])
def test_train_on_embedded_default(tmp_path, monkeypatch, arch):
    out = tmp_path / arch
    args = ["train", "--arch", arch, "--tokens", "61440", "--d-sae", "1024",
            "--eval-tokens", "4096", "--ce-windows", "8", "--out", str(out), "--quiet",
            "--harvest-tokens", "61440", "--lr", "1e-3"]
    # Keep the real model cache (built once per machine) but put the store in tmp.
    monkeypatch.setattr("saelab.harvest.cache_root", lambda: tmp_path / "cache")
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 2.0 < m["ce_loss_clean"] < 5.0  # a real pretrained LM on real English
    assert m["ce_loss_zero_ablation"] > m["ce_loss_with_sae"] > m["ce_loss_clean"] - 0.05
    fvu_below, l0_below, ce_above = TRAINED[arch]
    assert 0.0 < m["fvu"] < fvu_below, m["fvu"]
    assert 0 < m["l0"] < l0_below, m["l0"]
    assert ce_above < m["ce_loss_recovered"] <= 1.05, m["ce_loss_recovered"]
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "SmolLM2-135M-Instruct"
    assert cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
