"""`saelab sweep` on the tiny random LM: grid, outputs, shared evaluation, resume, refusals."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import saelab
import saelab.sweep.run as sweep_mod
from saelab.cli import main
from saelab.config import DataConfig, EvalConfig, HarvestConfig, ModelConfig, SAEConfig
from saelab.evals.evaluate import EvalBaseline, EvalContext, evaluate
from saelab.harvest import harvest
from saelab.models.hooks import parse_hook
from saelab.models.loading import load_model
from saelab.saes.registry import build_sae
from saelab.train.trainer import Trainer

HOOK = "blocks.1.hook_resid_post"
PNGS = ("pareto_fvu.png", "pareto_ce.png", "pareto_delta_lm.png")
GRID = ("--arch", "topk,relu", "--levels", "topk=4,8", "--levels", "relu=5,1")
RUNS = ("topk-k-4", "topk-k-8", "relu-l1_coefficient-5", "relu-l1_coefficient-1")
#: (family, level parameter, level) of each run of GRID, in order
GRID_RUNS = (("topk", "k", 4.0), ("topk", "k", 8.0), ("relu", "l1_coefficient", 5.0),
             ("relu", "l1_coefficient", 1.0))
#: sweep.csv's metric columns, written out by hand: CSV column -> metrics.json key
CSV_METRICS = {
    "l0": "l0", "fvu": "fvu", "ce_loss_recovered": "ce_loss_recovered",
    "ce_loss_recovered_mean_ablation": "ce_loss_recovered_mean_ablation",
    "delta_lm_loss": "delta_lm_loss", "kl_score": "kl_score",
    "gamma": "relative_reconstruction_bias", "dead_fraction": "dead_fraction",
    "dense_fraction_1pct": "dense_fraction_1pct",
    "train_tokens_per_second": "train_tokens_per_second",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))


def _model_cfg(tiny) -> ModelConfig:
    return ModelConfig(model=str(tiny[0]), hook=HOOK, device="cpu", model_dtype="float32")


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "s"
    harvest(HarvestConfig(model=_model_cfg(tiny), data=DataConfig(dataset=str(tiny[1]),
                                                                   context_size=16),
                          store=str(path), tokens=1024), progress=False)
    return path


def sweep_args(tiny, store: Path, out: Path, *extra: str) -> list[str]:
    lm, corpus = tiny
    return ["sweep", "--model", str(lm), "--dataset", str(corpus), "--hook", HOOK,
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16",
            "--d-sae", "32", "--tokens", "768", "--batch-size", "128", "--eval-tokens", "300",
            "--ce-windows", "4", "--checkpoint-every", "2", "--log-every", "1",
            "--store", str(store), "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tiny, store, tmp_path_factory) -> tuple[Path, str]:
    """A finished 2 families x 2 levels sweep and what it printed."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(sweep_args(tiny, store, out, *GRID)) == 0
    return out, buf.getvalue()


def _files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_grid_writes_runs_csv_json_plots_and_table(finished):
    out, printed = finished
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert list(rows[0]) == ["family", "param", "level", "run", *CSV_METRICS, "seconds"]
    # --levels replaced the families' default levels (topk 16,32,64; relu 10,5,2.5)
    assert [r["run"] for r in rows] == [f"runs/{n}" for n in RUNS]
    data = json.loads((out / "sweep.json").read_text())
    assert [r["run"] for r in data["runs"]] == [r["run"] for r in rows] and not data["pending"]
    for r, name, (family, param, level), js in zip(rows, RUNS, GRID_RUNS, data["runs"], strict=True):
        assert (r["family"], r["param"].split(".")[-1], float(r["level"])) == (
            family, param, level)
        # each row is the run's own metrics.json, read back (every metric measured, CE too)
        saved = json.loads((out / "runs" / name / "metrics.json").read_text())
        for col, key in CSV_METRICS.items():
            assert r[col] != "" and float(r[col]) == saved[key], (name, col)
        assert float(r["seconds"]) == pytest.approx(saved["train_seconds"]
                                                    + saved["eval_seconds"])
        assert js["metrics"] == saved
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in RUNS:
        run_cfg = json.loads((out / "runs" / name / "run_config.json").read_text())
        assert run_cfg["train"]["tokens"] == 768 and run_cfg["sae"]["d_sae"] == 32
        assert (out / "runs" / name / "sae" / "cfg.json").exists()
    by_run = {r["run"]: r for r in data["runs"]}
    assert by_run["runs/topk-k-4"]["metrics"]["l0"] <= 4 + 1e-9  # TopK: at most k per token
    assert by_run["runs/topk-k-8"]["metrics"]["l0"] <= 8 + 1e-9
    assert by_run["runs/relu-l1_coefficient-5"]["level"] == 5.0
    assert "run 4/4: relu l1_coefficient=1" in printed and "CE rec" in printed
    final_table = printed.rsplit("sweep: 4 runs finished", 1)[1].splitlines()
    assert [ln.split("  ")[0] for ln in final_table if ln.startswith(("topk ", "relu "))] == [
        "topk k=4", "topk k=8", "relu l1_coefficient=5", "relu l1_coefficient=1"]


def test_sweep_metrics_equal_a_fresh_single_run_evaluate(tiny, finished):
    """The sweep's shared baseline gives exactly what evaluate() gives for one saved SAE, and
    its FVU and L0 match a naive float64 reference on the LM's own hidden states."""
    out, _ = finished
    lm = load_model(_model_cfg(tiny))
    hook = parse_hook(HOOK, lm.n_layers)
    data, ecfg = DataConfig(dataset=str(tiny[1]), context_size=16), EvalConfig(300, 4)
    windows_NT = EvalContext.build(lm, hook, data, ecfg, progress=False,
                                   with_lm=False).windows_NT
    # SAEBench core protocol: every position but special tokens is scored; the tiny tokenizer's
    # are BOS, EOS and the document separator <|endoftext|> (tests/conftest.py)
    special = lm.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    keep_NT = ~torch.isin(windows_NT, torch.tensor(special))
    with torch.no_grad():  # resid_post of block 1 is hidden state 2 (0 is the embeddings)
        hidden = lm.model(windows_NT, output_hidden_states=True).hidden_states[2]
    x_ND = hidden[keep_NT].double()
    for name in ("topk-k-8", "relu-l1_coefficient-1"):
        saved = json.loads((out / "runs" / name / "metrics.json").read_text())
        sae = saelab.load_sae(out / "runs" / name)
        res = evaluate(sae, lm, hook, data, ecfg, progress=False)
        for key, value in res.metrics.items():
            assert saved[key] == value, (name, key)
        with torch.no_grad():
            f_NF = sae.encode(x_ND.float())
            err = (x_ND - sae.decode(f_NF).double()).pow(2).sum()
        assert saved["fvu"] == pytest.approx(
            (err / (x_ND - x_ND.mean(0)).pow(2).sum()).item(), rel=1e-4), name
        assert saved["l0"] == pytest.approx((f_NF != 0).sum(-1).double().mean().item(),
                                            rel=1e-4), name


def test_shared_baseline_equals_per_run_evaluate_and_saves_forwards(tiny):
    lm = load_model(_model_cfg(tiny))
    hook = parse_hook(HOOK, lm.n_layers)
    data, ecfg = DataConfig(dataset=str(tiny[1]), context_size=16), EvalConfig(300, 12)
    saes = [build_sae(SAEConfig(architecture=a, d_in=lm.d_model, d_sae=48),
                      generator=torch.Generator().manual_seed(i))
            for i, a in enumerate(("topk", "relu"))]
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        shared = EvalBaseline.build(lm, hook, data, ecfg, progress=False)
        # a second baseline that can cache the clean log-probs of one CE batch only
        one_batch = shared.lm.batches[0].logp_clean.numel() * 4
        partial = EvalBaseline.build(lm, hook, data, ecfg, progress=False,
                                     max_logprob_bytes=one_batch)
        assert [b.logp_clean is not None for b in partial.lm.batches] == [True, False]
        for sae in saes:
            fresh = evaluate(sae, lm, hook, data, ecfg, progress=False)
            n0 = len(calls)
            reused = evaluate(sae, lm, hook, data, ecfg, progress=False, baseline=shared)
            n_shared = len(calls) - n0
            again = evaluate(sae, lm, hook, data, ecfg, progress=False, baseline=partial)
            assert reused.metrics == fresh.metrics == again.metrics
            assert torch.equal(reused.density_F, fresh.density_F)
            # one spliced forward per CE batch (2 batches of 8 windows) and protocol (default
            # and filtered) instead of four
            assert n_shared == 2 * 2
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="another hook, data or eval"):
        evaluate(saes[0], lm, hook, data, EvalConfig(300, 4), progress=False, baseline=shared)


def test_interrupted_sweep_resumes_without_retraining(tiny, store, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "sweep"
    args = sweep_args(tiny, store, out, "--arch", "topk", "--levels", "topk=4,8")
    real_step = Trainer._train_step
    seen: list[str] = []

    def interrupt_second_run_at_step_3(self, x, *rest):
        if self.run_dir not in seen:
            seen.append(self.run_dir)
        if len(seen) == 2 and self.step == 3:  # after its checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(self, x, *rest)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_second_run_at_step_3)
    assert main(args) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    first = out / "runs" / "topk-k-4"
    assert (first / "metrics.json").exists()
    assert not (out / "runs" / "topk-k-8" / "metrics.json").exists()
    assert len(list(csv.DictReader((out / "sweep.csv").open()))) == 1  # written after run 1
    before = _files(first)

    monkeypatch.setattr(Trainer, "_train_step", real_step)
    trained: list[str] = []
    real_train_one = sweep_mod._train_one
    monkeypatch.setattr(sweep_mod, "_train_one",
                        lambda run, *a, **k: trained.append(run.name) or real_train_one(run, *a,
                                                                                        **k))
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert trained == ["topk-k-8"]  # the finished run is read back, not retrained
    assert "run 1/2: topk k=4: finished earlier" in printed
    assert "run 2/2: topk k=8 (resuming from its checkpoint)" in printed
    assert _files(first) == before  # untouched: same bytes and modification times
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["run"] for r in rows] == ["runs/topk-k-4", "runs/topk-k-8"]
    steps = [json.loads(ln)["step"] for ln in
             (out / "runs" / "topk-k-8" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # resumed at step 2: no step logged twice or skipped


def test_other_settings_refused_new_levels_added(tiny, store, finished, tmp_path, capsys,
                                                 monkeypatch):
    out = tmp_path / "grid"
    shutil.copytree(finished[0], out)
    before = (out / "sweep.json").read_bytes()
    assert main(sweep_args(tiny, store, out, *GRID, "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings" in err and "--overwrite" in err
    assert "train.seed" in err and (out / "sweep.json").read_bytes() == before

    # the same settings with one more level: only the new run is trained
    trained: list[str] = []
    monkeypatch.setattr(sweep_mod, "_train_one",
                        lambda run, *a, **k: trained.append(run.name) or {"l0": 1.0})
    assert main(sweep_args(tiny, store, out, "--arch", "topk", "--levels", "topk=4,8,2")) == 0
    assert trained == ["topk-k-2"]


def test_folder_without_a_sweep_is_never_clobbered(tiny, store, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(sweep_args(tiny, store, out, *GRID, "--overwrite")) == 2
    assert "holds no saelab sweep" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("flags,message", [
    (["--levels", "topk=a,b"], "not FAMILY=NUMBER"),
    (["--levels", "topk"], "not FAMILY=NUMBER"),
    (["--levels", "topk=4.5"], "whole numbers"),
    (["--levels", "gated=2"], "not in --arch"),
    (["--arch", "nope"], "unknown or untrainable architecture 'nope'"),
    (["--levels", "topk=64"], "cannot exceed --d-sae"),
    (["--levels", "topk=4,4"], "repeats a value"),
    (["--arch", "gsae", "--levels", "gsae=4"], "has none"),  # store without LM-loss gradients
])
def test_bad_grid_is_one_line_and_writes_nothing(tiny, store, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    arch = [] if "--arch" in flags else ["--arch", "topk"]
    assert main(sweep_args(tiny, store, out, *arch, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and err.count("\n") == 0 and message in err, err
    assert not out.exists()
