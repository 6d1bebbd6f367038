"""Bad input on the run side, as a table: every case is exit 2, one ``error:`` line, no traceback,
and the sha256 of every pre-existing file unchanged.

Each case builds its situation in its own folder (often a copy of one finished tiny run), runs
the real CLI (``saelab.cli.main``) in this process on the tiny random LM of conftest, and is
classified as ``clean``, ``traceback`` (an exception escaped, or a traceback was printed),
``unclean`` (wrong exit code or not exactly one ``error:`` line) and, independently, ``lost``
(a pre-existing file changed or vanished). ``pytest -s tests/test_bad_input.py`` prints the
counts at the end (also on failures, so the table can be run against a broken tree).

Cases that must *succeed* without losing anything (a truncated log line, a stuck run folder,
``eval --skip-ce``, ``--overwrite`` beside the user's own files) are separate tests below.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from badinput import CliResult, assert_unchanged, run_cli_case, snapshot_tree

from saelab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.1.hook_resid_post"
OUTCOMES: dict[str, tuple[str, bool]] = {}  # case name -> (clean|traceback|unclean, data lost)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One SAELAB_CACHE for the module: the tiny store is harvested once."""
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAELAB_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if not OUTCOMES:
        return
    kinds = [k for k, _ in OUTCOMES.values()]
    lost = sum(lost for _, lost in OUTCOMES.values())
    print(f"\nbad-input table: {len(OUTCOMES)} cases: {kinds.count('clean')} clean errors, "
          f"{kinds.count('traceback')} tracebacks, {kinds.count('unclean')} unclean exits, "
          f"{lost} with data lost")
    for name, (kind, was_lost) in OUTCOMES.items():
        if kind != "clean" or was_lost:
            print(f"  {name}: {kind}{' + data lost' if was_lost else ''}")


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    lm, corpus = tiny
    return ["train", "--model", str(lm), "--dataset", str(corpus), "--hook", HOOK,
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16",
            "--d-sae", "32", "--tokens", "1024", "--batch-size", "256", "--eval-tokens", "300",
            "--ce-windows", "4", "--checkpoint-every", "2", "--log-every", "1", "--quiet",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(tiny, cache, tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoint kept) that cases copy."""
    out = tmp_path_factory.mktemp("template") / "run"
    assert main(train_args(tiny, out)) == 0
    return out


@dataclass
class Ctx:
    tmp: Path
    tiny: tuple[Path, Path]
    template: Path
    monkeypatch: pytest.MonkeyPatch

    def run(self, name: str = "run") -> Path:
        """A fresh copy of the finished run."""
        dst = self.tmp / name
        shutil.copytree(self.template, dst)
        return dst

    def train(self, out: Path, *extra: str) -> list[str]:
        return train_args(self.tiny, out, *extra)

    def edit_json(self, path: Path, change: Callable[[dict], object]) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


@dataclass
class Case:
    name: str
    setup: Callable[[Ctx], list[str]]  # builds the situation, returns argv
    fragment: str = ""  # a piece of the expected error line
    marks: list = field(default_factory=list)


def _deny_writes_in(folder: Path, mp: pytest.MonkeyPatch) -> None:
    """File creation inside ``folder`` fails with EACCES, as in a read-only folder (the tests
    may run as root, for whom chmod does not bite)."""
    real_mkstemp, real_mkdtemp, real_open = tempfile.mkstemp, tempfile.mkdtemp, os.open

    def denied(dir):  # noqa: A002
        return dir is not None and Path(dir).resolve() == folder.resolve()

    def mkstemp(*a, dir=None, **kw):  # noqa: A002
        if denied(dir):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*a, dir=dir, **kw)

    def mkdtemp(*a, dir=None, **kw):  # noqa: A002
        if denied(dir):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(*a, dir=dir, **kw)

    def os_open(path, flags, *a, **kw):
        if flags & os.O_CREAT and Path(path).parent.resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    mp.setattr(tempfile, "mkstemp", mkstemp)
    mp.setattr(tempfile, "mkdtemp", mkdtemp)
    mp.setattr(os, "open", os_open)


# ---- the cases -------------------------------------------------------------------------------
def _overwrite_bad(*flags: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.train(c.run(), "--overwrite", *flags)


def _flags(*flags: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.train(c.tmp / "new", *flags)


def _run_config_notes(c: Ctx) -> list[str]:
    run = c.run()
    (run / "notes.txt").write_text("my notes, not saelab's\n")
    return c.train(run, "--overwrite", "--hook", "blocks.99.hook_resid_post")


def _out_is_file(c: Ctx) -> list[str]:
    (c.tmp / "out.txt").write_text("not a folder\n")
    return c.train(c.tmp / "out.txt")


def _out_under_file(c: Ctx) -> list[str]:
    (c.tmp / "f").write_text("a file\n")
    return c.train(c.tmp / "f" / "run")


def _read_only_new(c: Ctx) -> list[str]:
    parent = c.tmp / "ro"
    parent.mkdir()
    _deny_writes_in(parent, c.monkeypatch)
    return c.train(parent / "run")


def _read_only_empty(c: Ctx) -> list[str]:
    out = c.tmp / "empty"
    out.mkdir()
    _deny_writes_in(out, c.monkeypatch)
    return c.train(out)


def _read_only_resume(c: Ctx) -> list[str]:
    run = c.run()
    (run / "metrics.json").unlink()
    _deny_writes_in(run, c.monkeypatch)
    _deny_writes_in(run / "checkpoint", c.monkeypatch)
    return ["train", "--out", str(run), "--resume", "--quiet"]


def _resume_with(change: Callable[[Ctx, Path], None]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        run = c.run()
        (run / "metrics.json").unlink()  # interrupted in eval: resumable
        change(c, run)
        return ["train", "--out", str(run), "--resume", "--quiet"]
    return setup


def _eval_with(change: Callable[[Ctx, Path], None]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        run = c.run()
        change(c, run)
        return ["eval", str(run), "--eval-tokens", "200", "--ce-windows", "2", "--quiet"]
    return setup


def _bare_sae_with(change: Callable[[Ctx, dict], None]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        sae = c.tmp / "sae"
        shutil.copytree(c.template / "sae", sae)
        c.edit_json(sae / "cfg.json", lambda d: change(c, d))
        return ["eval", str(sae), "--eval-tokens", "200", "--skip-ce", "--quiet"]
    return setup


def _write(rel: str, text: str) -> Callable[[Ctx, Path], None]:
    return lambda c, run: (run / rel).write_text(text)


def _edit(rel: str, change: Callable[[dict], object]) -> Callable[[Ctx, Path], None]:
    return lambda c, run: c.edit_json(run / rel, change)


def _state(change: Callable[[dict], object]) -> Callable[[Ctx, Path], None]:
    def edit(c: Ctx, run: Path) -> None:
        for folder in ("checkpoint", "checkpoint.old"):
            if (run / folder / "state.json").exists():
                c.edit_json(run / folder / "state.json", change)
    return edit


def _missing_store_overwrite(c: Ctx) -> list[str]:
    return c.train(c.run(), "--overwrite", "--store", str(c.tmp / "no-store"))


def _store_is_file(c: Ctx) -> list[str]:
    (c.tmp / "store.txt").write_text("rows\n")
    return c.train(c.tmp / "new", "--store", str(c.tmp / "store.txt"))


def _store_empty_dir(c: Ctx) -> list[str]:
    (c.tmp / "store").mkdir()
    return c.train(c.tmp / "new", "--store", str(c.tmp / "store"))


def _resume_non_run(c: Ctx) -> list[str]:
    (c.tmp / "mine").mkdir()
    (c.tmp / "mine" / "data.csv").write_text("a,b\n")
    return ["train", "--out", str(c.tmp / "mine"), "--resume", "--quiet"]


def _non_run_overwrite(c: Ctx) -> list[str]:
    (c.tmp / "mine").mkdir()
    (c.tmp / "mine" / "data.csv").write_text("a,b\n")
    return c.train(c.tmp / "mine", "--overwrite")


def _corrupt_checkpoint(c: Ctx, run: Path) -> None:
    for folder in ("checkpoint", "checkpoint.old"):
        state = run / folder / "state.safetensors"
        if state.exists():
            state.write_bytes(state.read_bytes()[:100])


def _no_model_meta(c: Ctx, d: dict) -> None:
    d["metadata"].pop("model_name", None)
    d.pop("model_name", None)


def _del(key: str) -> Callable[[dict], object]:
    return lambda d: d.pop(key)


def _set(key: str, value) -> Callable[[dict], object]:
    return lambda d: d.__setitem__(key, value)


def _set2(key: str, sub: str, value) -> Callable[[dict], object]:
    return lambda d: d[key].__setitem__(sub, value)


CASES = [
    # --overwrite must validate before it replaces anything
    Case("overwrite+bad hook", _overwrite_bad("--hook", "blocks.99.hook_resid_post"),
         "out of range"),
    Case("overwrite+missing store", _missing_store_overwrite, "no-store"),
    Case("overwrite+unknown model", _overwrite_bad("--model", "no-such-org/no-such-model-xyz"),
         "cannot load model"),
    Case("overwrite+bad hook, user files beside", _run_config_notes, "out of range"),
    Case("overwrite+non-run folder", _non_run_overwrite, "holds no saelab run"),
    Case("overwrite+tokens < batch", _overwrite_bad("--tokens", "10"), "--tokens"),
    # where the run goes
    Case("--out is a file", _out_is_file, "out.txt"),
    Case("--out under a file", _out_under_file, "f"),
    Case("--out empty", _flags("--out", ""), "--out"),
    Case("read-only parent, new run", _read_only_new, "Permission denied"),
    Case("read-only empty --out", _read_only_empty, "Permission denied"),
    Case("read-only run folder, --resume", _read_only_resume, "Permission denied"),
    # damaged run folders on --resume
    Case("resume: run_config.json not JSON", _resume_with(_write("run_config.json", "{oops")),
         "run_config.json"),
    Case("resume: run_config.json a list", _resume_with(_write("run_config.json", "[1, 2]")),
         "run_config.json"),
    Case("resume: run_config tokens 'abc'",
         _resume_with(_edit("run_config.json", _set2("train", "tokens", "abc"))), "tokens"),
    Case("resume: run_config train a string",
         _resume_with(_edit("run_config.json", _set("train", "fast"))), "run_config.json"),
    Case("resume: run_config d_sae null",
         _resume_with(_edit("run_config.json", _set2("sae", "d_sae", None))), "d_sae"),
    Case("resume: state.json without step", _resume_with(_state(_del("step"))), "step"),
    Case("resume: state.json input_scale 'abc'",
         _resume_with(_state(_set("input_scale", "abc"))), "input_scale"),
    Case("resume: state.json step beyond total", _resume_with(_state(_set("step", 10_000))),
         "step"),
    Case("resume: state.json negative step", _resume_with(_state(_set("step", -3))), "step"),
    Case("resume: corrupt checkpoint tensors", _resume_with(_corrupt_checkpoint), "checkpoint"),
    Case("resume: folder missing", lambda c: ["train", "--out", str(c.tmp / "nope"), "--resume"],
         "does not exist"),
    Case("resume: non-run folder", _resume_non_run, "holds no saelab run"),
    Case("resume + overwrite", lambda c: c.train(c.run(), "--resume", "--overwrite"),
         "contradict"),
    # option values
    Case("--adam-eps nan", _flags("--adam-eps", "nan"), "--adam-eps"),
    Case("--adam-eps -1", _flags("--adam-eps", "-1"), "--adam-eps"),
    Case("--seed 2**70", _flags("--seed", str(2**70)), "--seed"),
    Case("--seed -1", _flags("--seed", "-1"), "--seed"),
    Case("--d-sae 1e9 (not an int)", _flags("--d-sae", "1e9"), "--d-sae"),
    Case("--d-sae 10**9 (memory)", _flags("--d-sae", str(10**9)), "memory"),
    Case("--grad-clip nan", _flags("--grad-clip", "nan"), "--grad-clip"),
    Case("--grad-clip inf", _flags("--grad-clip", "inf"), "--grad-clip"),
    Case("--tokens 10 (less than a batch)", _flags("--tokens", "10"), "--tokens"),
    Case("--tokens -5", _flags("--tokens", "-5"), "--tokens"),
    Case("--batch-size 0", _flags("--batch-size", "0"), "--batch-size"),
    Case("--lr 0", _flags("--lr", "0"), "--lr"),
    Case("--lr inf", _flags("--lr", "inf"), "--lr"),
    Case("--adam-beta2 1", _flags("--adam-beta2", "1"), "--adam-beta2"),
    Case("--adam-beta1 nan", _flags("--adam-beta1", "nan"), "--adam-beta1"),
    Case("--l1-coefficient nan", _flags("--l1-coefficient", "nan"), "--l1-coefficient"),
    Case("--lr-decay-fraction nan", _flags("--lr-decay-fraction", "nan"),
         "--lr-decay-fraction"),
    Case("--store-passes inf", _flags("--store-passes", "inf"), "--store-passes"),
    Case("--context-size 1", _flags("--context-size", "1"), "--context-size"),
    Case("--eval-tokens -1", _flags("--eval-tokens", "-1"), "--eval-tokens"),
    Case("--checkpoint-every -1", _flags("--checkpoint-every", "-1"), "--checkpoint-every"),
    Case("--k 0 for topk", _flags("--arch", "topk", "--k", "0"), "--k"),
    Case("--nproc 0", _flags("--nproc", "0"), "--nproc"),
    Case("--device tpu", _flags("--device", "tpu"), "device"),
    Case("--hook empty", _flags("--hook", ""), "hook"),
    Case("--hook resid_post.x", _flags("--hook", "resid_post.x"), "hook"),
    # argparse: one line, no usage block
    Case("--d-sae abc", _flags("--d-sae", "abc"), "--d-sae"),
    Case("--lr fast", _flags("--lr", "fast"), "--lr"),
    Case("unknown flag", _flags("--lerning-rate", "1e-3"), "--lerning-rate"),
    Case("--dtype float64 (not a choice)", _flags("--dtype", "float64"), "--dtype"),
    Case("--arch without a value", lambda c: ["train", "--out", str(c.tmp / "x"), "--arch"],
         "--arch"),
    Case("no verb", lambda c: [], "VERB"),
    Case("unknown verb", lambda c: ["trian", "--out", str(c.tmp / "x")], "trian"),
    # data
    Case("--store is a file", _store_is_file, "store.txt"),
    Case("--store an empty folder", _store_empty_dir, "store"),
    Case("--dataset missing", _flags("--dataset", "/no/such/corpus.txt"), "corpus.txt"),
    # saelab eval
    Case("eval: folder missing", lambda c: ["eval", str(c.tmp / "nope")], "does not exist"),
    Case("eval: run_config.json not JSON", _eval_with(_write("run_config.json", "{oops")),
         "run_config.json"),
    Case("eval: run_config model a number",
         _eval_with(_edit("run_config.json", _set2("model", "model", 7))), "model"),
    Case("eval: run_config data a list",
         _eval_with(_edit("run_config.json", _set("data", [1]))), "run_config.json"),
    Case("eval: unfinished run (no sae/)",
         _eval_with(lambda c, run: shutil.rmtree(run / "sae")), "no finished SAE"),
    Case("eval: corrupt SAE weights",
         _eval_with(_write("sae/sae_weights.safetensors", "garbage")), "corrupt"),
    Case("eval: --evals nope", lambda c: ["eval", str(c.run()), "--evals", "nope"], "nope"),
    Case("eval: --eval-batch-size 0", lambda c: ["eval", str(c.run()), "--eval-batch-size", "0"],
         "--eval-batch-size"),
    Case("eval: SAE cfg d_sae 'abc'", _bare_sae_with(lambda c, d: d.__setitem__("d_sae", "abc")),
         "d_sae"),
    Case("eval: SAE cfg dtype 7", _bare_sae_with(lambda c, d: d.__setitem__("dtype", 7)),
         "dtype"),
    Case("eval: SAE cfg metadata a list",
         _bare_sae_with(lambda c, d: d.__setitem__("metadata", [1])), "metadata"),
    Case("eval: metadata context_size 'abc'",
         _bare_sae_with(lambda c, d: d["metadata"].__setitem__("context_size", "abc")),
         "context_size"),
    Case("eval: metadata hook_name 5",
         _bare_sae_with(lambda c, d: d["metadata"].__setitem__("hook_name", 5)), "hook_name"),
    Case("eval: SAE folder without model metadata", _bare_sae_with(_no_model_meta),
         "model_name"),
]


def classify(result: CliResult | None, escaped: str | None) -> str:
    if escaped is not None or (result is not None and "Traceback" in result.stderr):
        return "traceback"
    assert result is not None
    return "clean" if result.code == 2 and len(result.error_lines) == 1 else "unclean"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tiny, finished_run, tmp_path, monkeypatch):
    ctx = Ctx(tmp_path, tiny, finished_run, monkeypatch)
    argv = case.setup(ctx)
    before = snapshot_tree(tmp_path)
    result, escaped = None, None
    try:
        result = run_cli_case(argv)
    except Exception:  # noqa: BLE001 - a traceback is what the table counts
        escaped = traceback.format_exc()
    monkeypatch.undo()  # the write-denying patches must not hide files from the snapshot
    after = snapshot_tree(tmp_path)
    lost = any(after.get(p) != h for p, h in before.items())
    kind = classify(result, escaped)
    OUTCOMES[case.name] = (kind, lost)
    assert escaped is None, escaped
    assert result is not None
    assert kind == "clean", (result.code, result.stderr[-3000:])
    line = result.error_lines[0]
    assert case.fragment in line, (case.fragment, line)
    assert_unchanged(before, after)
    assert not list(tmp_path.glob(".*.lock")), "lock file left behind"


def test_table_has_enough_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


# ---- inputs that must succeed without losing anything ------------------------------------------
def test_overwrite_keeps_the_users_files_and_replaces_the_run(tiny, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine\n")
    (run / "plots").mkdir()
    (run / "plots" / "a.png").write_bytes(b"png")
    old_weights = (run / "sae" / "sae_weights.safetensors").read_bytes()
    assert main(train_args(tiny, run, "--overwrite", "--seed", "5")) == 0
    assert (run / "notes.txt").read_text() == "mine\n"
    assert (run / "plots" / "a.png").read_bytes() == b"png"
    assert (run / "sae" / "sae_weights.safetensors").read_bytes() != old_weights
    assert json.loads((run / "run_config.json").read_text())["train"]["seed"] == 5
    assert json.loads((run / "run_config.json").read_text())["out"] == str(run)
    assert not list(tmp_path.glob(".run.*"))  # staging and trash folders are gone


def test_overwrite_that_fails_mid_training_leaves_the_old_run(tiny, finished_run, tmp_path,
                                                              monkeypatch):
    from saelab.train.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot_tree(run)
    real = Trainer._train_step

    def fail_at_step_2(self, *a):
        if self.step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(run))
        return real(self, *a)

    monkeypatch.setattr(Trainer, "_train_step", fail_at_step_2)
    result = run_cli_case(train_args(tiny, run, "--overwrite", "--seed", "5"))
    assert result.code == 2 and len(result.error_lines) == 1, result.stderr
    assert_unchanged(before, snapshot_tree(run))
    monkeypatch.setattr(Trainer, "_train_step", real)
    assert main(train_args(tiny, run, "--overwrite", "--seed", "5")) == 0  # and it recovers


def test_truncated_last_log_line_resumes(tiny, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.json").unlink()
    log = run / "metrics.jsonl"
    text = log.read_text()
    log.write_text(text + text.splitlines()[-1][:17])  # a kill mid-write
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]


def test_store_error_mid_run_is_not_a_stuck_state(tiny, tmp_path, monkeypatch):
    """A run that died before its first checkpoint (config written, nothing trained) can be
    rerun as it was, or resumed (from step 0)."""
    from saelab.data import stream
    from saelab.errors import StoreError

    real = stream.ActivationStream.__iter__

    def broken(self):
        raise StoreError("shard_00000.safetensors fails its checksum")
        yield from real(self)

    for retry in (["--resume"], []):
        out = tmp_path / f"run{len(retry)}"
        monkeypatch.setattr(stream.ActivationStream, "__iter__", broken)
        result = run_cli_case(train_args(tiny, out))
        assert result.code == 2 and "checksum" in result.error_lines[0]
        assert (out / "run_config.json").exists() and not (out / "checkpoint").exists()
        monkeypatch.setattr(stream.ActivationStream, "__iter__", real)
        argv = (["train", "--out", str(out), "--resume", "--quiet"] if retry
                else train_args(tiny, out))
        assert main(argv) == 0, retry
        assert (out / "metrics.json").exists()


def test_eval_skip_ce_keeps_the_ce_metrics(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    old = json.loads((run / "metrics.json").read_text())
    old_sae = json.loads((run / "sae" / "metrics.json").read_text())
    assert old["ce_loss_recovered"] == old["ce_loss_recovered"]  # measured, not NaN
    assert main(["eval", str(run), "--skip-ce", "--eval-tokens", "200", "--quiet"]) == 0
    new = json.loads((run / "metrics.json").read_text())
    new_sae = json.loads((run / "sae" / "metrics.json").read_text())
    ce_keys = [k for k in old if k.startswith(("ce_", "kl_", "delta_lm"))]
    assert ce_keys
    for k in ce_keys:
        assert new[k] == old[k] and new_sae[k] == old_sae[k], k
    assert new["n_tokens"] != old["n_tokens"]  # the reconstruction metrics were re-measured
