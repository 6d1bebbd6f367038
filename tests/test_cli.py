"""The main job through the CLI on a tiny random LM: files, metrics, refusals, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saelab
from saelab.cli import _parser, main
from saelab.cliargs import build
from saelab.config import RunConfig, SweepConfig
from saelab.errors import ConfigError
from saelab.saes.registry import (
    architectures,
    check_shared_options,
    get_family,
    validate_sae_config,
    with_family,
)
from saelab.train.trainer import Trainer

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    lm, corpus = tiny
    return ["train", "--model", str(lm), "--dataset", str(corpus), "--hook", HOOK,
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16",
            "--d-sae", "32", "--tokens", "3072", "--batch-size", "256", "--eval-tokens", "600",
            "--ce-windows", "8", "--checkpoint-every", "4", "--log-every", "2", "--quiet",
            "--out", str(out), *extra]


def test_train_writes_a_complete_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out)) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "CE loss recovered" in printed
    for name in ("run_config.json", "metrics.json", "metrics.jsonl", "feature_density.png",
                 "sae/cfg.json", "sae/sae_weights.safetensors", "sae/sparsity.safetensors",
                 "sae/metrics.json", "checkpoint/state.safetensors"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("l0", "fvu", "mse", "ce_loss_recovered", "delta_lm_loss", "kl_score",
                "relative_reconstruction_bias", "dead_fraction"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key], key
    # the files hold this run, not merely exist: 3072 / 256 = 12 steps, logged every 2,
    # checkpointed at the end; the SAE folder carries the same metrics as the run folder
    state = json.loads((out / "checkpoint/state.json").read_text())
    assert state["step"] == 12 and state["d_sae"] == 32 and state["batch_size"] == 256
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]
    sae_metrics = json.loads((out / "sae/metrics.json").read_text())
    assert {k: sae_metrics[k] for k in ("l0", "fvu")} == {k: metrics[k] for k in ("l0", "fvu")}
    assert 0 < metrics["l0"] <= 32 and 0 <= metrics["dead_fraction"] <= 1
    assert json.loads((out / "run_config.json").read_text())["train"]["tokens"] == 3072
    cfg = json.loads((out / "sae/cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["metadata"]["hook_name"] == HOOK
    sparsity = load_file(str(out / "sae/sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (32,) and float(sparsity.max()) <= 0

    sae = saelab.load_sae(out)  # a run folder loads directly
    x = torch.randn(5, sae.d_in)
    assert sae(x).recon.shape == (5, sae.d_in) and sae.encode(x).shape == (5, 32)


def test_cached_store_holds_budget_over_store_passes(tiny, tmp_path):
    from saelab.data.store import ActivationStore

    def cached_rows() -> list[int]:
        paths = sorted((tmp_path / "cache" / "stores").glob("*/manifest.json"))
        return sorted(ActivationStore.open(p.parent).num_rows for p in paths)

    assert main(train_args(tiny, tmp_path / "a", "--skip-ce")) == 0
    assert cached_rows() == [3072 // 4]  # default: 4 passes over the store
    assert main(train_args(tiny, tmp_path / "b", "--skip-ce", "--store-passes", "1.5")) == 0
    assert cached_rows() == [768, 2048]
    assert main(train_args(tiny, tmp_path / "c", "--skip-ce", "--harvest-tokens", "900",
                           "--store-passes", "3")) == 0  # an explicit row count wins
    assert cached_rows() == [768, 900, 2048]


def test_existing_run_is_refused_then_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--tokens", "1024")) == 0
    before = (out / "sae/sae_weights.safetensors").read_bytes()
    assert main(train_args(tiny, out, "--tokens", "1024", "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run" in err and "--overwrite" in err
    assert (out / "sae/sae_weights.safetensors").read_bytes() == before
    assert main(train_args(tiny, out, "--tokens", "1024", "--seed", "1", "--overwrite")) == 0
    assert (out / "sae/sae_weights.safetensors").read_bytes() != before


def test_non_run_folder_is_never_clobbered(tiny, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(train_args(tiny, out, "--overwrite")) == 2
    assert "holds no saelab run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_interrupted_run_resumes_to_identical_weights(tiny, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    assert main(train_args(tiny, full)) == 0

    part = tmp_path / "part"
    real_step = Trainer._train_step

    def interrupt_at_step_7(self, x, *rest):
        if self.step == 7:
            raise KeyboardInterrupt
        return real_step(self, x, *rest)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_step_7)
    assert main(train_args(tiny, part)) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert main(["train", "--out", str(part), "--resume", "--quiet"]) == 0
    a = load_file(str(full / "sae/sae_weights.safetensors"))
    b = load_file(str(part / "sae/sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_verb_rewrites_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--tokens", "1024")) == 0
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-tokens", "300", "--ce-windows", "4", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_tokens"] >= 250 and "ce_loss_recovered" in metrics


@pytest.mark.parametrize("flags,message", [
    (["--hook", "blocks.9.hook_resid_post"], "out of range"),
    (["--hook", "blocks.1.hook_nope"], "unknown hook"),
    (["--l1-coefficient", "-1"], "--l1-coefficient"),
    (["--d-sae", "0"], "width"),
    (["--store-passes", "0.5"], "--store-passes"),
    (["--arch", "nope"], "unknown architecture 'nope'"),
    (["--arch", "jumprelu", "--jumprelu-bandwidth", "0"], "--jumprelu-bandwidth"),
    (["--arch", "gated", "--k", "8"], "--k is not an option of gated (it belongs to abstopk, "),
    (["--arch", "topk", "--k", "64"], "--k (64) cannot exceed --d-sae (32)"),
    (["--model", "no-such-org/no-such-model-xyz"], "cannot load model"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (out / "sae").exists()


def test_store_for_another_hook_is_refused(tiny, tmp_path, capsys):
    lm, corpus = tiny
    store = tmp_path / "store"
    assert main(["harvest", "--model", str(lm), "--dataset", str(corpus), "--hook",
                 "blocks.0.hook_mlp_out", "--context-size", "16", "--tokens", "500",
                 "--model-dtype", "float32", "--out", str(store), "--quiet"]) == 0
    assert main(train_args(tiny, tmp_path / "run", "--store", str(store))) == 2
    err = capsys.readouterr().err
    assert "was made for" in err and "blocks.0.hook_mlp_out" in err


def test_nan_activations_name_shard_and_row(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    from saelab.data.store import ActivationStore

    lm, corpus = tiny
    store = tmp_path / "store"
    assert main(["harvest", "--model", str(lm), "--dataset", str(corpus), "--hook", HOOK,
                 "--context-size", "16", "--tokens", "500", "--model-dtype", "float32",
                 "--out", str(store), "--quiet"]) == 0
    shard = store / ActivationStore.open(store).shards[0].file
    tensors = load_file(str(shard))
    tensors["acts"][3, 0] = float("nan")
    save_file(tensors, str(shard))
    # Make the checksum match so the NaN check, not the checksum, must catch it.
    manifest = json.loads((store / "manifest.json").read_text())
    from saelab.fsutil import sha256_file

    manifest["shards"][0]["sha256"] = sha256_file(shard)
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert main(train_args(tiny, tmp_path / "run", "--store", str(store))) == 2
    err = capsys.readouterr().err
    assert "shard_00000" in err and "row 3" in err


def test_archs_lists_families(capsys):
    assert main(["archs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "trainable"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == set(architectures())
    for name, line in rows.items():
        assert f"saes/{name}.py" in line, line  # each family lives in the file named after it
        assert (Path(saelab.__file__).parent / "saes" / f"{name}.py").is_file()
    # aligned: the file column starts at the same offset on every row
    assert len({ln.index("saes/") for ln in lines[1:]}) == 1
    assert "options.k" in rows["topk"] and "l1_coefficient" in rows["gated"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("saelab ") and len(out.split()) == 2


def _train_cfg(*flags):
    args = _parser().parse_args(["train", *flags])
    cfg = build(RunConfig, args)
    cfg.validate()
    return validate_sae_config(cfg.sae)


def test_family_options_go_to_the_chosen_family_only():
    sae = _train_cfg("--arch", "gated", "--d-sae", "16")  # no k to check against d_sae
    assert type(sae.options) is get_family("gated").Options
    sae = _train_cfg("--arch", "matryoshka", "--k", "8", "--aux-k", "3",
                     "--group-fractions", "1,1")
    assert (sae.options.k, sae.options.aux_k, sae.options.group_fractions) == (8, 3, "1,1")
    assert not hasattr(sae.options, "jumprelu_bandwidth") and not hasattr(sae.options, "bandwidth")
    with pytest.raises(ConfigError, match=r"--group-fractions is not an option of topk \("
                                          r"it belongs to matryoshka\)"):
        _train_cfg("--arch", "topk", "--group-fractions", "1,1")


def test_each_family_flag_once_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--k ", "--aux-k ", "--jumprelu-bandwidth ", "--group-fractions ", "--htf "):
        assert text.count(f"  {flag}") == 1, flag


def test_sweep_flags_apply_where_the_family_has_them():
    args = _parser().parse_args(["sweep", "--arch", "topk,relu", "--k", "8"])
    cfg = build(SweepConfig, args)
    assert cfg.sae.options == {"k": 8}
    check_shared_options(cfg.sae.options, ["topk", "relu"])
    assert with_family(cfg.sae, "topk", strict=False).options.k == 8
    assert type(with_family(cfg.sae, "relu", strict=False).options) is get_family("relu").Options
    with pytest.raises(ConfigError, match="--k is not an option of any family in --arch"):
        check_shared_options(cfg.sae.options, ["relu", "gated"])


def test_eval_with_gradient_pursuit_encoder_leaves_the_run_alone(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--arch", "topk", "--k", "4", "--tokens", "1024")) == 0
    before = {p.name: p.read_bytes() for p in [out / "metrics.json", out / "sae" / "cfg.json",
                                              out / "sae" / "sae_weights.safetensors"]}
    sae_metrics = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--encoder", "gp", "--eval-tokens", "300", "--ce-windows",
                 "2", "--quiet"]) == 0
    gp = json.loads((out / "metrics_gp.json").read_text())
    assert gp["encoder"] == "gradient_pursuit"
    # each token gets at most the atoms the SAE's own encoder gives it (docs/methods.md §12.5)
    assert 0 < gp["l0"] <= sae_metrics["l0"] + 1e-9
    assert 0 < gp["fvu"] < 1.5 and "ce_loss_recovered" in gp
    after = {p.name: p.read_bytes() for p in [out / "metrics.json", out / "sae" / "cfg.json",
                                             out / "sae" / "sae_weights.safetensors"]}
    assert after == before
