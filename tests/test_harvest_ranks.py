"""Harvest on 2 processes (``saelab harvest --nproc 2``: torchrun, gloo): the stores hold the
rows of a one-process harvest, in the same order, each rank writing its own shards; a 2-rank
run extends a one-process store; a bad input is one ``error:`` line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelab.config import DataConfig, HarvestConfig, ModelConfig
from saelab.data.store import ActivationStore
from saelab.harvest import harvest_hooks

T = 16
HOOKS = ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out")
KEYS = ("acts", "tokens", "window", "pos")


def _cfg(tiny, out: Path, tokens: int, hooks=HOOKS) -> HarvestConfig:
    lm, corpus = tiny
    return HarvestConfig(
        model=ModelConfig(model=str(lm), device="cpu", model_dtype="float32"),
        # outliers judged jointly over both hooks: rank-local filtering would misalign rows
        data=DataConfig(dataset=str(corpus), context_size=T, exclude_first_positions=1,
                        exclude_norm_outliers=1.5),
        hooks=list(hooks), store=str(out), tokens=tokens, shard_rows=70, lm_batch_size=4)


def _cli(cfg: HarvestConfig, nproc: int = 2) -> subprocess.CompletedProcess:
    d = cfg.data
    argv = [sys.executable, "-m", "saelab", "harvest", "--nproc", str(nproc), "--quiet",
            "--model", cfg.model.model, "--device", "cpu", "--model-dtype", "float32",
            "--dataset", d.dataset, "--context-size", str(d.context_size),
            "--exclude-first-positions", str(d.exclude_first_positions),
            "--exclude-norm-outliers", str(d.exclude_norm_outliers),
            "--tokens", str(cfg.tokens), "--shard-rows", str(cfg.shard_rows),
            "--lm-batch-size", str(cfg.lm_batch_size), "--out", cfg.store]
    for h in cfg.hooks:
        argv += ["--hook", h]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def _rows(store: ActivationStore) -> dict[str, torch.Tensor]:
    shards = [store.read_shard(i) for i in range(len(store.shards))]
    return {k: torch.cat([s[k] for s in shards]) for k in KEYS}


def _assert_same_rows(one: ActivationStore, two: ActivationStore) -> None:
    a, b = _rows(one), _rows(two)
    for k in ("tokens", "window", "pos"):
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(a["acts"], b["acts"], rtol=1e-5, atol=1e-5)
    assert two.num_rows == one.num_rows and two.num_windows == one.num_windows
    torch.testing.assert_close(two.mean, one.mean, rtol=1e-6, atol=1e-7)
    assert two.mean_sq_norm == pytest.approx(one.mean_sq_norm, rel=1e-6)


@pytest.mark.slow
def test_two_ranks_write_the_rows_of_one_process(tiny, tmp_path):
    one = harvest_hooks(_cfg(tiny, tmp_path / "one", 333), progress=False)
    run = _cli(_cfg(tiny, tmp_path / "two", 333))
    assert run.returncode == 0, run.stderr
    for hook in HOOKS:
        two = ActivationStore.open(tmp_path / "two" / hook)
        two.verify()  # every listed shard on disk with its checksum
        assert two.complete and two.manifest["harvest_stats"]["ranks"] == 2
        _assert_same_rows(one[hook], two)
        # one shard per block of one LM batch (shard_rows 70 ~ 4 windows x 15 rows), so the
        # layout is not the one-process one: the ranks wrote alternate shards
        starts = [s.window_start for s in two.shards]
        assert starts == list(range(0, two.num_windows, 4))
        assert len(two.shards) != len(one[hook].shards)
    # the two hooks' rows align by (window, position)
    a, b = (_rows(ActivationStore.open(tmp_path / "two" / h)) for h in HOOKS)
    assert torch.equal(a["window"], b["window"]) and torch.equal(a["pos"], b["pos"])


@pytest.mark.slow
def test_two_ranks_extend_a_one_process_store(tiny, tmp_path):
    """A complete one-process store of 150 rows, asked for 333 on 2 ranks, is continued (its
    last shard dropped, as on one process) and ends as the one-process 333-row store."""
    hooks = HOOKS[:1]
    ref = harvest_hooks(_cfg(tiny, tmp_path / "ref", 333, hooks), progress=False)[HOOKS[0]]
    harvest_hooks(_cfg(tiny, tmp_path / "s", 150, hooks), progress=False)
    first = json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"][0]
    run = _cli(_cfg(tiny, tmp_path / "s", 333, hooks))
    assert run.returncode == 0, run.stderr
    store = ActivationStore.open(tmp_path / "s")
    store.verify()
    assert store.shards[0].sha256 == first["sha256"]  # the kept shard was not rewritten
    _assert_same_rows(ref, store)


@pytest.mark.slow
def test_two_rank_bad_input_is_one_line_and_keeps_the_store(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "s", 100, HOOKS[:1])
    harvest_hooks(cfg, progress=False)
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    cfg.data.context_size = 12
    run = _cli(cfg)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "context_size" in lines[0], \
        run.stderr
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
