"""Lockstep training (many SAEs per pass of the store): same weights as one run at a time, one
read of the store per group, groups split by input scale, resume from different steps, a
diverging member does not stop the others, and `saelab sweep --lockstep` vs `--no-lockstep`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.config import ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.data.store import ActivationStore, StoreSpec, StoreWriter
from saelab.data.stream import ActivationStream
from saelab.pipeline import export_sae, fit_sae
from saelab.sweep import lockstep as sweep_lockstep
from saelab.sweep.plan import SweepRun
from saelab.train.lockstep import group_by_stream, stream_key, train_lockstep
from saelab.train.trainer import TrainingDivergedError

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
T, D = 16, 24
FAMILIES = {"topk": {"k": 6}, "relu": None, "batchtopk": {"k": 6}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    """~1.5k rows of a planted sparse code in 3 shards (offset, so b_dec matters)."""
    spec = StoreSpec(model="m", hook=HOOK, d_in=D, context_size=T, exclude_first_positions=1,
                     dtype="float32")
    w = StoreWriter(tmp_path_factory.mktemp("store") / "s", spec, shard_rows=512)
    g = torch.Generator().manual_seed(0)
    dirs_MD = torch.nn.functional.normalize(torch.randn(64, D, generator=g), dim=1)
    for _ in range(13):
        keep = torch.ones(8, T, dtype=torch.bool)
        keep[:, 0] = False
        n = int(keep.sum())
        codes = (torch.rand(n, 64, generator=g) < 0.06) * torch.rand(n, 64, generator=g) * 3
        acts = codes @ dirs_MD + 0.5 + 0.01 * torch.randn(n, D, generator=g)
        w.add(torch.randint(0, 50, (8, T), generator=g), keep, acts)
    return w.finish()


def run_cfg(store, out: Path, family: str, **train) -> RunConfig:
    cfg = RunConfig(
        model=ModelConfig(model="m", hook=HOOK, device="cpu"),
        sae=SAEConfig(architecture=family, d_sae=48, options=copy.deepcopy(FAMILIES.get(family))),
        train=TrainConfig(**{"tokens": 1280, "batch_size": 128, "checkpoint_every": 3,
                             "log_every": 1, "shuffle_buffer_rows": 700, **train}),
        store=str(store.path), out=str(out))
    return cfg


FAKE_LM = SimpleNamespace(d_model=D, name="m")
FAKE_HOOK = SimpleNamespace(name=HOOK)


def sequential(store, cfg: RunConfig):
    """The one-run path: pipeline.fit_sae (what `saelab train` and `--no-lockstep` use)."""
    from saelab.pipeline import prepare_run

    cfg = prepare_run(copy.deepcopy(cfg))
    final, _ = fit_sae(cfg, store, Path(cfg.out), progress=False, log=lambda *_: None)
    return final


def lockstep_jobs(store, cfgs: list[RunConfig]) -> list:
    jobs = []
    for cfg in cfgs:
        run = SweepRun(cfg.sae.architecture, "x", 0, cfg)
        job = sweep_lockstep.LockstepJob(run, copy.deepcopy(cfg))
        sweep_lockstep.setup_job(job, FAKE_LM, FAKE_HOOK, False, lambda *_: None)
        jobs.append(job)
    return jobs


def assert_same_weights(a, b, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lockstep_weights_equal_each_run_trained_alone(store, tmp_path, monkeypatch):
    names = list(FAMILIES)
    alone = {n: sequential(store, run_cfg(store, tmp_path / "alone" / n, n)) for n in names}

    reads = []
    real_read = ActivationStore.read_shard
    monkeypatch.setattr(ActivationStore, "read_shard",
                        lambda self, i, *a, **k: reads.append(i) or real_read(self, i, *a, **k))
    jobs = lockstep_jobs(store, [run_cfg(store, tmp_path / "lock" / n, n) for n in names])
    reads_setup = len(reads)  # the data-based init samples (per run, as alone)
    groups = group_by_stream(jobs, lambda j: stream_key(j.member.trainer, j.store, 1))
    assert len(groups) == 1  # same store, batches and input scale (sqrt(d) for all three)
    train_lockstep([j.member for j in jobs], store, 1, progress=False)
    group_reads = len(reads) - reads_setup

    # one pass for the whole group: the shard reads of ONE run's 10 batches (3 shards)
    probe = ActivationStream(store, 128, 700, drop_positions_below=1)
    for _ in zip(range(10), probe, strict=False):
        pass
    assert group_reads == probe.shard_reads == 3
    for job in jobs:
        n = job.run.family
        assert job.member.result.steps == 10 and job.member.error is None
        assert_same_weights(export_sae(job.sae, job.scale), alone[n])
        # the run folder is the single-run one: same log lines (steps, losses) and checkpoint
        mine = [json.loads(ln) for ln in (tmp_path / "lock" / n / "metrics.jsonl").open()]
        ref = [json.loads(ln) for ln in (tmp_path / "alone" / n / "metrics.jsonl").open()]
        assert [r["step"] for r in mine] == list(range(1, 11))
        assert [(r["loss"], r["fvu"], r["l0"]) for r in mine] == [
            (r["loss"], r["fvu"], r["l0"]) for r in ref]
        ca, cb = (json.loads((tmp_path / d / n / "run_config.json").read_text())
                  for d in ("lock", "alone"))
        assert ca.pop("out") != cb.pop("out") and ca == cb


def test_other_input_scale_is_another_group(store, tmp_path):
    jobs = lockstep_jobs(store, [run_cfg(store, tmp_path / n, n) for n in ("topk", "jumprelu")])
    # jumprelu normalises to E||x||^2 = 1, topk to E||x|| = sqrt(d): two streams
    assert jobs[0].scale != jobs[1].scale
    groups = group_by_stream(jobs, lambda j: stream_key(j.member.trainer, j.store, 1))
    assert [len(g) for g in groups] == [1, 1]
    with pytest.raises(Exception, match="differ in what decides their batches"):
        train_lockstep([j.member for j in jobs], store, 1, progress=False)


def test_resume_from_different_steps_matches_uninterrupted(store, tmp_path):
    names = ["topk", "relu"]
    alone = {n: sequential(store, run_cfg(store, tmp_path / "alone" / n, n)) for n in names}
    # interrupted runs: topk stopped after step 3's checkpoint, relu after step 6's
    first = lockstep_jobs(store, [run_cfg(store, tmp_path / "lock" / n, n) for n in names])
    for job, stop in zip(first, (3, 6), strict=True):
        tr, cfg = job.member.trainer, job.cfg
        stream = ActivationStream(store, 128, cfg.train.shuffle_buffer_rows,
                                  drop_positions_below=1)
        tr.fit(iter(stream), stop_after=stop)
        assert tr.step == stop
    resumed = []
    for n in names:
        cfg = run_cfg(store, tmp_path / "lock" / n, n)
        cfg.resume = True
        resumed.append(cfg)
    jobs = lockstep_jobs(store, resumed)
    assert [j.member.start for j in jobs] == [3, 6]
    train_lockstep([j.member for j in jobs], store, 1, progress=False)
    for job in jobs:
        n = job.run.family
        assert job.member.result.steps == 10
        assert_same_weights(export_sae(job.sae, job.scale), alone[n])
        steps = [json.loads(ln)["step"] for ln in (tmp_path / "lock" / n / "metrics.jsonl").open()]
        assert steps == list(range(1, 11))  # no step logged twice or skipped


def test_diverging_member_leaves_the_others_training(store, tmp_path, monkeypatch):
    names = ["topk", "relu"]
    alone = sequential(store, run_cfg(store, tmp_path / "alone", "relu"))
    jobs = lockstep_jobs(store, [run_cfg(store, tmp_path / "lock" / n, n) for n in names])
    bad = jobs[0].member.trainer
    real_log = type(bad)._log

    def diverge_at_4(self, *a, **k):
        if self is bad and self.step == 4:
            raise TrainingDivergedError("training diverged: loss is nan at step 4")
        return real_log(self, *a, **k)

    monkeypatch.setattr(type(bad), "_log", diverge_at_4)
    train_lockstep([j.member for j in jobs], store, 1, progress=False)
    assert isinstance(jobs[0].member.error, TrainingDivergedError)
    assert jobs[0].member.result is None and bad.step == 4
    assert jobs[1].member.result.steps == 10
    assert_same_weights(export_sae(jobs[1].sae, jobs[1].scale), alone)


# ---- `saelab sweep` end to end on the tiny random LM ------------------------------------------
@pytest.fixture(scope="module")
def lm_store(tiny, tmp_path_factory) -> Path:
    from saelab.config import DataConfig, HarvestConfig
    from saelab.harvest import harvest

    path = tmp_path_factory.mktemp("lmstore") / "s"
    mcfg = ModelConfig(model=str(tiny[0]), hook="blocks.1.hook_resid_post", device="cpu",
                       model_dtype="float32")
    harvest(HarvestConfig(model=mcfg, data=DataConfig(dataset=str(tiny[1]), context_size=16),
                          store=str(path), tokens=1024), progress=False)
    return path


def test_sweep_lockstep_equals_no_lockstep(tiny, lm_store, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    lm, corpus = tiny

    def sweep(out: Path, flag: str) -> None:
        assert main(["sweep", "--model", str(lm), "--dataset", str(corpus), "--hook",
                     "blocks.1.hook_resid_post", "--device", "cpu", "--model-dtype", "float32",
                     "--context-size", "16", "--d-sae", "32", "--tokens", "768", "--batch-size",
                     "128", "--eval-tokens", "300", "--ce-windows", "4", "--checkpoint-every",
                     "2", "--store", str(lm_store), "--quiet", "--out", str(out), "--arch",
                     "topk,relu,batchtopk", "--levels", "topk=4", "--levels", "relu=5",
                     "--levels", "batchtopk=4", flag]) == 0

    trained = []
    real = sweep_lockstep.train_lockstep
    monkeypatch.setattr(sweep_lockstep, "train_lockstep",
                        lambda members, *a, **k: trained.append(len(members))
                        or real(members, *a, **k))
    sweep(tmp_path / "lock", "--lockstep")
    assert trained == [3]  # one group of three
    sweep(tmp_path / "seq", "--no-lockstep")
    assert trained == [3]
    timing = ("train_seconds", "train_tokens_per_second", "eval_seconds", "eval_ce_seconds")
    for name in ("topk-k-4", "relu-l1_coefficient-5", "batchtopk-k-4"):
        a, b = (tmp_path / d / "runs" / name for d in ("lock", "seq"))
        wa, wb = (load_file(p / "sae" / "sae_weights.safetensors") for p in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
        ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
        assert {k: v for k, v in ma.items() if k not in timing} == {
            k: v for k, v in mb.items() if k not in timing}
