"""The eval protocol (SAEBench core by default, the norm-filtered variant beside it), the
LM-splice endpoints through the real splice path, and ``saebench_core.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from saelab.config import DataConfig, EvalConfig, ModelConfig

HOOK = "blocks.1.hook_resid_post"
FIXTURE_RUN = Path(__file__).parent / "fixtures" / "format_v1" / "run_topk"

pytestmark = pytest.mark.usefixtures("one_thread")


class _Out:
    def __init__(self, recon, latents):
        self.recon, self.latents = recon, latents


class FixedSAE(nn.Module):
    """A stand-in SAE whose output is ``x`` (identity), zeros or a fixed vector."""

    architecture = "fixed"
    uses_lm_grads = False

    def __init__(self, d: int, mode: str, vector: torch.Tensor | None = None):
        super().__init__()
        self.d_in = self.d_sae = d
        self.mode, self.vector = mode, vector
        self.W_dec = nn.Parameter(torch.eye(d), requires_grad=False)
        self.W_enc = nn.Parameter(torch.eye(d), requires_grad=False)

    def forward(self, x):
        if self.mode == "identity":
            recon = x.clone()
        elif self.mode == "zero":
            recon = torch.zeros_like(x)
        else:
            recon = self.vector.to(x.dtype).expand_as(x).clone()
        return _Out(recon, x)


@pytest.fixture(scope="module")
def setup(tiny):
    from saelab.evals.evaluate import EvalContext
    from saelab.models.hooks import parse_hook
    from saelab.models.loading import load_model

    lm = load_model(ModelConfig(model=str(tiny[0]), hook=HOOK, device="cpu",
                                model_dtype="float32"))
    hook = parse_hook(HOOK, lm.n_layers)
    # the filtered variant also drops position 1 (a training-time exclusion of two leading
    # positions), so the protocols differ on the tiny LM, whose norms have no outliers
    data = DataConfig(dataset=str(tiny[1]), context_size=16, exclude_first_positions=2)
    ecfg = EvalConfig(eval_tokens=120, ce_windows=8)
    ctx = EvalContext.build(lm, hook, data, ecfg, progress=False)
    return lm, hook, data, ecfg, ctx


def _eval(setup, sae):
    from saelab.evals.evaluate import evaluate

    lm, hook, data, ecfg, ctx = setup
    return evaluate(sae, lm, hook, data, ecfg, progress=False, baseline=ctx).metrics


def test_default_protocol_scores_every_non_special_position(setup, tiny_tokenizer):
    lm, _, data, _, ctx = setup
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)))
    expected = ~torch.isin(ctx.windows_NT, special)
    assert torch.equal(ctx.keep_NT, expected)  # position 0 is BOS: dropped as special only
    assert not ctx.keep_NT[:, 0].any()
    assert bool((ctx.filt_NT <= ctx.keep_NT).all())
    n_drop = int(ctx.keep_NT.sum() - ctx.filt_NT.sum())
    assert n_drop >= ctx.windows_NT.shape[0] - 1  # position 1 of (almost) every window

    m = _eval(setup, FixedSAE(lm.d_model, "zero"))
    assert m["n_tokens"] == int(ctx.keep_NT.sum())
    assert m["n_tokens_filtered"] == int(ctx.filt_NT.sum())
    assert m["eval_positions_filtered"] == n_drop
    # share of the variance: naive float64 over the scored rows
    x = torch.cat(ctx.acts).double()
    f = torch.cat(ctx.in_filt)
    dev = (x - x.mean(0)).pow(2).sum(-1)
    assert m["filtered_variance_share"] == pytest.approx((dev[~f].sum() / dev.sum()).item(),
                                                         rel=1e-9)
    # zero output: FVU = Σ‖x‖² / Σ‖x − x̄‖² on each protocol's own rows
    xf = x[f]
    assert m["fvu"] == pytest.approx((x.pow(2).sum() / dev.sum()).item(), rel=1e-6)
    assert m["fvu_filtered"] == pytest.approx(
        (xf.pow(2).sum() / (xf - xf.mean(0)).pow(2).sum()).item(), rel=1e-6)


@pytest.mark.parametrize("suffix", ["", "_filtered"])
def test_identity_sae_recovers_everything(setup, suffix):
    lm = setup[0]
    m = _eval(setup, FixedSAE(lm.d_model, "identity"))
    assert m["ce_loss_recovered" + suffix] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_with_sae" + suffix] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_score" + suffix] == pytest.approx(1.0, abs=1e-6)
    assert m["delta_lm_loss" + suffix] == pytest.approx(0.0, abs=1e-6)
    assert m["fvu" + suffix] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("suffix", ["", "_filtered"])
def test_zero_output_sae_recovers_nothing_under_zero_ablation(setup, suffix):
    lm = setup[0]
    m = _eval(setup, FixedSAE(lm.d_model, "zero"))
    assert m["ce_loss_recovered" + suffix] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_score" + suffix] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_with_sae" + suffix] == pytest.approx(m["ce_loss_zero_ablation" + suffix])


def test_mean_output_sae_recovers_nothing_under_mean_ablation(setup):
    lm, ctx = setup[0], setup[4]
    # each protocol ablates with the mean of its own scored rows (independent float64 means)
    x = torch.cat(ctx.acts).double()
    f = torch.cat(ctx.in_filt)
    for mean, suffix in ((x.mean(0), ""), (x[f].mean(0), "_filtered")):
        m = _eval(setup, FixedSAE(lm.d_model, "mean", mean.float()))
        assert m["ce_loss_recovered_mean_ablation" + suffix] == pytest.approx(0.0, abs=1e-5)
        assert m["kl_score_mean_ablation" + suffix] == pytest.approx(0.0, abs=1e-5)


def test_saebench_core_json_schema_and_values(tiny, tmp_path):
    """``saelab train`` writes saebench_core.json with SAEBench's field names and our values."""
    from saelab.cli import main

    lm, corpus = tiny
    out = tmp_path / "run"
    assert main(["train", "--arch", "relu", "--model", str(lm), "--dataset", str(corpus),
                 "--hook", HOOK, "--device", "cpu", "--context-size", "16", "--d-sae", "32",
                 "--tokens", "512", "--batch-size", "128", "--eval-tokens", "100",
                 "--ce-windows", "2", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "saebench_core.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    # the field names of SAEBench's CoreEvalOutput / CoreMetricCategories / CoreFeatureMetric
    assert {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis",
            "eval_result_metrics", "eval_result_details", "sae_bench_commit_hash",
            "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
            "eval_result_unstructured"} == set(doc)
    assert doc["eval_type_id"] == "core"
    groups = doc["eval_result_metrics"]
    assert {k: set(v) for k, v in groups.items()} == {
        "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation",
                                        "kl_div_with_sae"},
        "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation",
                                           "ce_loss_with_sae", "ce_loss_without_sae"},
        "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse",
                                   "cossim"},
        "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
        "sparsity": {"l0", "l1"},
        "token_stats": {"total_tokens_eval_reconstruction",
                        "total_tokens_eval_sparsity_variance"},
        "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent",
                         "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                         "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                         "frac_alive"},
    }
    assert {k for k in doc["eval_config"]} >= {"model_name", "llm_dtype", "batch_size_prompts",
                                               "n_eval_reconstruction_batches", "dataset",
                                               "context_size", "compute_kl",
                                               "exclude_special_tokens_from_reconstruction"}
    assert groups["model_performance_preservation"]["ce_loss_score"] == m["ce_loss_recovered"]
    assert groups["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert groups["token_stats"]["total_tokens_eval_sparsity_variance"] == m["n_tokens"]
    details = doc["eval_result_details"]
    assert [d["index"] for d in details] == list(range(32))
    assert set(details[0]) == {"index", "feature_density", "consistent_activation_heuristic",
                               "encoder_bias", "encoder_norm", "encoder_decoder_cosine_sim",
                               "max_decoder_cosine_sim", "max_encoder_cosine_sim"}
    # weight-based fields against a naive loop over the saved SAE
    import saelab

    sae = saelab.load_sae(out)
    w = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1)
    for i in (0, 7, 31):
        others = [float(w[i] @ w[j]) for j in range(32) if j != i]
        assert details[i]["max_decoder_cosine_sim"] == pytest.approx(max(others), abs=1e-5)
        assert details[i]["encoder_norm"] == pytest.approx(sae.W_enc[:, i].detach().norm().item(),
                                                           rel=1e-5)
    alive = sum(d["feature_density"] > 0 for d in details) / 32
    assert groups["misc_metrics"]["frac_alive"] == pytest.approx(alive)


@pytest.mark.slow
def test_format1_run_reproduces_its_metrics_as_the_filtered_variant(tmp_path):
    """The format-1 run was evaluated under the old protocol (training exclusions); re-evaluated
    today, its ``_filtered`` keys reproduce those numbers."""
    from saelab.cli import main

    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    # The fixture's LM ran at model_dtype 'auto', which resolved to float32 then; 'auto' now
    # measures bf16 against fp32 on the machine and may pick bf16, so pin what it was.
    rc = json.loads((run / "run_config.json").read_text())
    rc["model"]["model_dtype"] = "float32"
    (run / "run_config.json").write_text(json.dumps(rc))
    saved = json.loads((FIXTURE_RUN / "metrics.json").read_text())
    assert main(["eval", str(run), "--eval-tokens", "2048", "--ce-windows", "2", "--quiet"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    keys = [k for k, v in saved.items() if isinstance(v, float) and k + "_filtered" in m]
    assert len(keys) >= 25, keys
    for key in keys:
        assert m[key + "_filtered"] == pytest.approx(saved[key], rel=1e-4, abs=1e-6), key
    assert m["eval_positions_dropped_as_outliers"] == saved["eval_positions_dropped_as_outliers"]
