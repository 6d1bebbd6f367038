"""Two processes on one run folder, and a kill -9 mid-training.

A second `saelab train` (or `--overwrite`, `--resume`, `saelab eval`) on a run folder another
process holds fails with one line naming the holder's pid and changes nothing; a real
`python -m saelab train` killed with SIGKILL mid-training resumes to bit-identical weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from badinput import assert_clean_failure, assert_unchanged, run_cli_case, snapshot_tree
from safetensors.torch import load_file

from saelab.cli import main
from saelab.locks import holder, lock_file

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    ENV["SAELAB_CACHE"] = str(tmp_path / "cache")


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    lm, corpus = tiny
    return ["train", "--model", str(lm), "--dataset", str(corpus), "--hook", HOOK,
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16",
            "--d-sae", "32", "--tokens", "1024", "--batch-size", "256", "--eval-tokens", "300",
            "--ce-windows", "4", "--checkpoint-every", "2", "--quiet", "--out", str(out),
            *extra]


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock as `saelab train` does, until killed."""
    code = f"""
        import time
        from saelab.runfolder import RunFolder
        with RunFolder({str(folder)!r}).lock("train"):
            print("held", flush=True)
            time.sleep(600)
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("SAELAB_CACHE", str(out.parent / "cache"))
    try:
        assert main(train_args(tiny, out)) == 0
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("verb", ["train", "overwrite", "resume", "eval"])
def test_second_process_on_a_held_run_is_refused_naming_the_pid(tiny, finished, tmp_path, verb):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine\n")
    argv = {"train": train_args(tiny, out),
            "overwrite": train_args(tiny, out, "--overwrite", "--seed", "3"),
            "resume": ["train", "--out", str(out), "--resume", "--quiet"],
            "eval": ["eval", str(out), "--eval-tokens", "200", "--skip-ce", "--quiet"]}[verb]
    before = snapshot_tree(tmp_path)
    p = _hold(out)
    try:
        line = assert_clean_failure(run_cli_case(argv), f"saelab pid {p.pid}", str(out))
        assert "in use" in line
    finally:
        p.kill()
        p.wait()
    assert_unchanged(before, snapshot_tree(tmp_path))


def _slow_train(tiny, out: Path, *extra: str) -> list[str]:
    """A run that takes a few seconds of training in a subprocess: wide enough that a poll
    catches it between checkpoints."""
    args = train_args(tiny, out, "--d-sae", "512", "--tokens", "30720", "--batch-size", "256",
                      "--checkpoint-every", "5", "--log-every", "1", "--arch", "topk",
                      "--k", "8", "--skip-ce", "--store-passes", "40", *extra)
    return [sys.executable, "-m", "saelab", *args]


def _wait_for(predicate, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_second_train_refused_then_kill_9_and_resume_is_bit_identical(tiny, tmp_path):
    """A real `python -m saelab train` holds its run folder: a second train into it exits 2
    naming its pid. Killed with SIGKILL mid-training, `--resume` ends bit-identical to an
    uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_slow_train(tiny, full)[3:]) == 0  # the reference, uninterrupted
    total = json.loads((full / "checkpoint" / "state.json").read_text())["step"]

    victim = subprocess.Popen(_slow_train(tiny, part), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _checkpoint_step(part) >= 10, victim, 240, "a checkpoint")
        os.kill(victim.pid, signal.SIGSTOP)  # frozen mid-training, still holding the lock
        assert (holder(part) or {}).get("pid") == victim.pid
        before = snapshot_tree(part)
        second = run_cli_case(_slow_train(tiny, part)[3:])
        assert_clean_failure(second, f"saelab pid {victim.pid} (train)", str(part))
        assert_unchanged(before, snapshot_tree(part))
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()
    killed_at = _checkpoint_step(part)
    assert 0 < killed_at < total, (killed_at, total)  # really mid-training
    assert not (part / "metrics.json").exists() and not (part / "sae").exists()

    resumed = subprocess.run([sys.executable, "-m", "saelab", "train", "--out", str(part),
                              "--resume", "--quiet"], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(full / "sae" / "sae_weights.safetensors"))
    b = load_file(str(part / "sae" / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))  # one record per step: none lost, none twice
    assert not lock_file(part).exists()
