"""Eval plug-ins and their registry, the RunFolder, and the pipeline hook for families fitted
without gradients (tiny random LM)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saelab.config import DataConfig, EvalConfig, ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.errors import ConfigError, RunFolderError
from saelab.runfolder import RunFolder

HOOK = "blocks.1.hook_resid_post"
FIXTURE_RUN = Path(__file__).parent / "fixtures" / "format_v1" / "run_topk"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))


# ---- registry -----------------------------------------------------------------------------------
def test_registry_names_parsing_and_skip_ce_alias():
    from saelab.evals.registry import evals, parse_evals

    assert list(evals()) == ["core", "ce", "density"]
    assert parse_evals(None) == ["core", "ce", "density"]
    assert parse_evals("density, core") == ["core", "density"]  # run order, not given order
    assert parse_evals("", skip_ce=True) == ["core", "density"]
    with pytest.raises(ConfigError, match="unknown eval 'nope'"):
        parse_evals("core,nope")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        parse_evals("ce", skip_ce=True)


def test_output_fields_declare_every_format1_metric_once():
    """The metric fields of the outputs are exactly today's metrics.json keys (the format-1
    run's metrics.json), each declared by one output."""
    from saelab.evals.registry import metric_fields

    keys = [mf.key for mf in metric_fields()]
    assert len(keys) == len(set(keys))
    saved = json.loads((FIXTURE_RUN / "metrics.json").read_text())
    assert set(saved) <= set(keys)


def test_table_columns_and_axes_come_from_metadata():
    from saelab.evals.registry import pareto_axes, summary_rows
    from saelab.report.table import summary_table
    from saelab.sweep import csv_columns

    assert csv_columns() == ["family", "param", "level", "run", "l0", "fvu",
                             "ce_loss_recovered", "ce_loss_recovered_mean_ablation",
                             "delta_lm_loss", "kl_score", "gamma", "dead_fraction",
                             "dense_fraction_1pct", "train_tokens_per_second", "seconds"]
    assert {k: v[0] for k, v in pareto_axes().items()} == {
        "pareto_fvu.png": "fvu", "pareto_ce.png": "ce_loss_recovered",
        "pareto_delta_lm.png": "delta_lm_loss"}
    table = summary_table({"fvu": 0.25, "l0": 12.0, "ce_loss_recovered": 0.9}, title="t")
    rows = [("L0 (mean active latents)", "12.0"), ("FVU (pooled)", "0.2500"),
            ("CE loss recovered (zero abl.)", "90.00%")]
    # the format-1 layout: labels padded to the longest, values right-aligned in 12
    assert table.splitlines() == ["t", *(f"  {lbl:<29}  {v:>12}" for lbl, v in rows)]
    assert [k for k, _, _ in summary_rows()][:2] == ["l0", "fvu"]


def test_format_table_aligns_columns():
    from saelab.report.table import format_table

    out = format_table(["name", "x"], [["a", "1.5"], ["long name", "10"]])
    assert out.splitlines() == ["name         x", "-" * 14, "a          1.5", "long name   10"]


# ---- the plug-ins against naive references ------------------------------------------------------
def test_core_and_density_match_naive_float64(tiny):
    """core / density on the shared context equal a direct float64 computation on the same
    held-out rows; only the requested evals run."""
    from saelab.evals.evaluate import EvalContext, evaluate
    from saelab.models.hooks import parse_hook
    from saelab.models.loading import load_model
    from saelab.saes.registry import build_sae

    lm = load_model(ModelConfig(model=str(tiny[0]), hook=HOOK, device="cpu",
                                model_dtype="float32"))
    hook = parse_hook(HOOK, lm.n_layers)
    data, ecfg = DataConfig(dataset=str(tiny[1]), context_size=16), EvalConfig(200, 2)
    sae = build_sae(SAEConfig(architecture="relu", d_in=lm.d_model, d_sae=24),
                    generator=torch.Generator().manual_seed(0))
    ctx = EvalContext.build(lm, hook, data, ecfg, progress=False)
    res = evaluate(sae, lm, hook, data, ecfg, progress=False, baseline=ctx,
                   evals=["core", "density"])
    x = torch.cat(ctx.acts).double()
    with torch.no_grad():
        f = sae.encode(x.float())
        xh = sae.decode(f).double()
    fvu = ((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    m = res.metrics
    assert m["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert m["l0"] == pytest.approx((f != 0).sum(-1).double().mean().item())
    density = (f != 0).double().mean(0)
    assert m["dead_fraction"] == pytest.approx((density == 0).double().mean().item())
    assert m["dense_fraction_1pct"] == pytest.approx((density > 0.01).double().mean().item())
    assert not any(k.startswith("ce_") for k in m) and "kl_score" not in m
    assert set(res.outputs) == {"core", "density"}
    torch.testing.assert_close(res.density_F.double(), density, rtol=0, atol=1e-6)


# ---- RunFolder ----------------------------------------------------------------------------------
def test_runfolder_reads_a_format1_run(tmp_path):
    run = RunFolder(tmp_path / "r")
    shutil.copytree(FIXTURE_RUN, run.path)
    assert run.is_run() and run.is_finished() and run.has_sae() and run.state() == "finished"
    saved = json.loads((FIXTURE_RUN / "checkpoint" / "state.json").read_text())["step"]
    assert run.step() == saved
    cfg = run.load_config()
    assert cfg.sae.architecture == "topk" and cfg.model.hook == "blocks.2.hook_resid_post"
    assert run.read_metrics()["l0"] == 8.0
    run.metrics_path.unlink()
    assert run.state() == "resume"
    shutil.rmtree(run.checkpoint_dir)
    assert run.state() == "fresh" and run.step() is None


def test_runfolder_prepare_refuses_to_clobber(tmp_path):
    """prepare() checks and changes nothing. A folder holding only its run_config.json is an
    unstarted run (e.g. a store error before the first checkpoint) and a plain rerun may start
    it; one with a checkpoint, an SAE or metrics needs --resume or --overwrite; a non-empty
    folder that is no run is refused whatever the flags."""
    run = RunFolder(tmp_path / "r")
    with pytest.raises(RunFolderError, match="does not exist"):
        run.prepare(resume=True, overwrite=False)
    run.prepare(resume=False, overwrite=False)  # nothing there: fine, and nothing created
    assert not run.path.exists()

    def listing() -> list[str]:
        return sorted(str(q.relative_to(run.path)) for q in run.path.rglob("*"))

    run.save_config(RunConfig(out=str(run.path)))
    assert run.is_unstarted() and run.state() == "fresh"
    before = listing()
    run.prepare(resume=False, overwrite=False)  # unstarted: a plain rerun is allowed
    run.prepare(resume=True, overwrite=False)
    run.prepare(resume=False, overwrite=True)
    assert listing() == before == ["run_config.json"]

    # a checkpoint: the run has started
    run.checkpoint_dir.mkdir(parents=True)
    (run.checkpoint_dir / "state.json").write_text(json.dumps({"step": 3}))
    assert not run.is_unstarted() and run.state() == "resume" and run.step() == 3
    with pytest.raises(RunFolderError, match="already holds a run: pass --resume"):
        run.prepare(resume=False, overwrite=False)
    run.prepare(resume=True, overwrite=False)
    run.prepare(resume=False, overwrite=True)  # replaced only when the new run commits
    assert (run.checkpoint_dir / "state.json").exists()

    # a finished SAE (no checkpoint left), then the metrics too
    shutil.rmtree(run.checkpoint_dir)
    run.sae_dir.mkdir()
    (run.sae_dir / "cfg.json").write_text("{}")
    assert not run.is_unstarted()
    with pytest.raises(RunFolderError, match="already holds a run"):
        run.prepare(resume=False, overwrite=False)
    run.write_metrics({"fvu": 0.5})
    assert run.state() == "finished"
    with pytest.raises(RunFolderError, match="already holds a run"):
        run.prepare(resume=False, overwrite=False)
    run.prepare(resume=False, overwrite=True)
    assert run.has_sae() and run.is_finished()

    # a folder of something else: refused with and without the flags, and left alone
    other = tmp_path / "notes"
    other.mkdir()
    RunFolder(other).prepare(resume=False, overwrite=False)  # empty: fine
    (other / "keep.txt").write_text("x")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(RunFolderError, match="holds no saelab run"):
            RunFolder(other).prepare(resume=resume, overwrite=overwrite)
    assert [q.name for q in other.iterdir()] == ["keep.txt"]


def test_runfolder_lock_refuses_a_second_holder(tmp_path):
    """The lock is taken by another process: the second holder gets a one-line LockedError."""
    import subprocess
    import sys
    import time

    from saelab.errors import LockedError

    run = RunFolder(tmp_path / "r")
    code = ("import sys, time; from saelab.runfolder import RunFolder\n"
            "with RunFolder(sys.argv[1]).lock('train'):\n"
            "    print('held', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as e, run.lock("eval"):
            pass
        assert str(proc.pid) in str(e.value) and "\n" not in str(e.value)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.05)
    with run.lock("eval"):  # released when the holder died
        pass


def test_eval_verb_selects_evals_and_keeps_the_rest(tiny, tmp_path):
    """`saelab eval RUN --evals core` re-measures core only and keeps the other metrics;
    `--skip-ce` is the alias for dropping ce; a bad name is one line."""
    from saelab.cli import main

    lm, corpus = tiny
    out = tmp_path / "run"
    assert main(["train", "--arch", "topk", "--model", str(lm), "--dataset", str(corpus),
                 "--hook", HOOK, "--device", "cpu", "--context-size", "16", "--d-sae", "32",
                 "--k", "4", "--tokens", "512", "--batch-size", "128", "--eval-tokens", "200",
                 "--ce-windows", "2", "--quiet", "--out", str(out)]) == 0
    before = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--evals", "core", "--eval-tokens", "30", "--ce-windows",
                 "2", "--quiet"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    assert after["n_tokens"] < before["n_tokens"]  # re-measured on fewer rows
    assert after["ce_loss_recovered"] == before["ce_loss_recovered"]  # kept
    assert after["train_seconds"] == before["train_seconds"]
    (out / "metrics.json").unlink()
    assert main(["eval", str(out), "--skip-ce", "--eval-tokens", "100", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "fvu" in m and "dead_fraction" in m and "ce_loss_recovered" not in m
    assert main(["eval", str(out), "--evals", "core,bogus", "--quiet"]) == 2


# ---- families fitted without gradients ----------------------------------------------------------
def test_pipeline_streams_batches_to_fit_from_batches(tiny, tmp_path, monkeypatch):
    """A family with ``fit_from_batches`` gets the normalised training batches (budget rows)
    instead of the gradient trainer, and the run is folded, saved and evaluated as usual."""
    import saelab
    from saelab.pipeline import train_run
    from saelab.saes import registry
    from saelab.saes.relu import ReLUSAE
    from saelab.train.trainer import Trainer

    seen: list[torch.Tensor] = []

    class GreedySAE(ReLUSAE):
        """Test family: the decoder is the first d_sae rows it is shown."""

        architecture = "greedy_test"

        def fit_from_batches(self, batches, total_rows, progress):
            rows = []
            for x_BD in batches:
                seen.append(x_BD.clone())
                rows.append(x_BD)
            assert total_rows == sum(b.shape[0] for b in rows)
            x = torch.cat(rows)[: self.d_sae]
            self.W_dec.copy_(torch.nn.functional.normalize(x, dim=1))
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.fill_(-0.5)

    monkeypatch.setitem(registry._REGISTRY, "greedy_test", GreedySAE)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("the trainer ran"))
    lm, corpus = tiny
    cfg = RunConfig(
        model=ModelConfig(model=str(lm), hook=HOOK, device="cpu", model_dtype="float32"),
        data=DataConfig(dataset=str(corpus), context_size=16),
        sae=SAEConfig(architecture="greedy_test", d_sae=16),
        train=TrainConfig(tokens=640, batch_size=128), eval=EvalConfig(200, 2),
        out=str(tmp_path / "run"))
    summary = train_run(cfg, progress=False, log=lambda *_: None)
    assert [b.shape for b in seen] == [torch.Size([128, 64])] * 5  # tokens // batch_size
    # the stream is normalised as for training: E|x| = sqrt(d_in) (docs/methods.md §0.3)
    norms = torch.cat(seen).norm(dim=1)
    assert norms.mean().item() == pytest.approx(64 ** 0.5, rel=0.2)
    m = summary.metrics
    assert {"fvu", "l0", "ce_loss_recovered", "dead_fraction", "train_seconds"} <= set(m)
    run = RunFolder(tmp_path / "run")
    assert run.is_finished() and run.has_sae()
    sae = saelab.load_sae(run.path)
    # folded to raw activations: decoder rows are the raw-scale directions of the fit
    torch.testing.assert_close(
        torch.nn.functional.normalize(sae.W_dec, dim=1),
        torch.nn.functional.normalize(seen[0][:16], dim=1), rtol=1e-4, atol=1e-4)
