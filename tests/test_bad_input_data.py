"""Bad input on the data side: one `error:` line, exit 2, no traceback, nothing lost.

Every case runs the real CLI (``saelab.cli.main``) on the tiny random LM of conftest and checks,
with the helpers of ``tests/badinput.py``, that the sha256 of every pre-existing file is
unchanged.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path

import pytest
import torch
from badinput import assert_clean_failure, assert_unchanged, run_cli_case, snapshot_tree
from safetensors import SafetensorError

from saelab.config import DataConfig, HarvestConfig, ModelConfig
from saelab.data.store import ActivationStore
from saelab.fsutil import atomic_write_json
from saelab.harvest import harvest
from saelab.train import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))


def harvest_args(tiny, out: Path, dataset: Path | None = None, *extra: str) -> list[str]:
    lm, corpus = tiny
    return ["harvest", "--model", str(lm), "--dataset", str(dataset or corpus), "--hook", HOOK,
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16",
            "--tokens", "300", "--shard-rows", "100", "--quiet", "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "has no complete window"),
        ("blank.txt", b"\n\n  \n", "has no complete window"),
        ("tiny.txt", b"hello world\n", "has no complete window of 16 tokens"),
        ("binary.jsonl", random.Random(0).randbytes(4096),
         "UTF-8 text"),
        ("late_binary.jsonl", b'{"text": "fine words"}\n' * 2 + b'{"text": "\xff\xfe"}\n'
         + b'{"text": "fine words here"}\n' * 300, "late_binary.jsonl:3: not UTF-8 text"),
        ("garbage.txt", random.Random(1).randbytes(4096),
         "does not look like UTF-8 text"),
        ("nul.txt", b"plain words " * 50 + b"\x00" + b"more words " * 50,
         "does not look like UTF-8 text"),
    ],
)
def test_unusable_corpus_is_one_line_and_creates_no_store(tiny, tmp_path, name, content,
                                                         message):
    data = tmp_path / name
    data.write_bytes(content)
    before = snapshot_tree(tmp_path)
    out = tmp_path / "store"
    assert_clean_failure(run_cli_case(harvest_args(tiny, out, data)), message)
    assert not out.exists()  # nothing half-made is left for the next run to trip over
    assert_unchanged(before, snapshot_tree(tmp_path))
    assert not list(tmp_path.glob(".*.lock"))


def test_out_is_a_file(tiny, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    before = snapshot_tree(tmp_path)
    assert_clean_failure(run_cli_case(harvest_args(tiny, out)), "is not an activation store")
    assert_unchanged(before, snapshot_tree(tmp_path))


def test_out_under_a_file(tiny, tmp_path):
    parent = tmp_path / "notes.txt"
    parent.write_text("my notes\n")
    before = snapshot_tree(tmp_path)
    assert_clean_failure(run_cli_case(harvest_args(tiny, parent / "store")), "notes.txt")
    assert_unchanged(before, snapshot_tree(tmp_path))


def _deny_writes_under(folder: Path, monkeypatch) -> None:
    """Make file creation inside ``folder`` fail with EACCES, as in a read-only folder (the
    tests may run as root, for whom chmod does not bite)."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):  # noqa: A002 - tempfile's own name
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_output_folder(tiny, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        _deny_writes_under(out, monkeypatch)
    else:
        out.chmod(0o555)
    before = snapshot_tree(tmp_path)
    try:
        assert_clean_failure(run_cli_case(harvest_args(tiny, out)), "Permission denied",
                             str(out))
    finally:
        out.chmod(0o755)
    assert out.is_dir()  # the user's (empty) folder is not removed
    assert_unchanged(before, snapshot_tree(tmp_path))


def test_disk_full_mid_harvest_keeps_written_shards(tiny, tmp_path, monkeypatch):
    from saelab.data import store as store_mod

    out = tmp_path / "store"
    real, calls = store_mod.atomic_write_bytes, {"n": 0}
    kept: dict[str, str] = {}

    def fill_disk_on_third_shard(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            kept.update(snapshot_tree(out))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", fill_disk_on_third_shard)
    assert_clean_failure(run_cli_case(harvest_args(tiny, out)), "No space left on device",
                         "rerun continues")
    assert_unchanged(kept, snapshot_tree(out))
    store = ActivationStore.open(out)
    assert len(store.shards) == 2 and not store.complete
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real)
    assert run_cli_case(harvest_args(tiny, out)).code == 0  # the rerun finishes the store
    assert ActivationStore.open(out).complete


def train_args(tiny, out: Path) -> list[str]:
    lm, corpus = tiny
    return ["train", "--model", str(lm), "--dataset", str(corpus), "--hook", HOOK,
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16",
            "--d-sae", "32", "--tokens", "3072", "--batch-size", "256", "--eval-tokens", "600",
            "--ce-windows", "8", "--checkpoint-every", "4", "--quiet", "--out", str(out)]


@pytest.mark.parametrize("failure", ["enospc", "erofs", "safetensors"])
def test_failed_checkpoint_write_keeps_the_old_one(tiny, tmp_path, monkeypatch, failure):
    run = tmp_path / "run"
    real, calls = checkpoint.save_file, {"n": 0}
    before: dict[str, str] = {}

    def fail_second(tensors, filename, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            before.update(snapshot_tree(run / "checkpoint"))
            if failure == "safetensors":
                raise SafetensorError("Error while serializing: No space left on device")
            code = errno.ENOSPC if failure == "enospc" else errno.EROFS
            raise OSError(code, os.strerror(code), filename)
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", fail_second)
    line = assert_clean_failure(run_cli_case(train_args(tiny, run)), "the previous checkpoint "
                                "is kept", "--resume")
    assert "Traceback" not in line
    assert before and any(p.endswith("state.safetensors") for p in before)
    assert_unchanged(before, snapshot_tree(run / "checkpoint"))
    assert checkpoint.load_checkpoint(run).step == 4
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp folder left


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tiny, tmp_path, umask):
    lm, corpus = tiny
    old = os.umask(umask)
    try:
        store = harvest(HarvestConfig(
            model=ModelConfig(model=str(lm), hook=HOOK, device="cpu", model_dtype="float32"),
            data=DataConfig(dataset=str(corpus), context_size=16), store=str(tmp_path / "s"),
            tokens=200, shard_rows=100), progress=False)
        checkpoint.save_checkpoint(tmp_path / "run", 3, {"w": torch.ones(3)}, {"x": 1})
        atomic_write_json(tmp_path / "run" / "metrics.json", {"fvu": 0.5})
    finally:
        os.umask(old)
    files = [*store.path.iterdir(), *(tmp_path / "run").rglob("*")]
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (want_dir if f.is_dir() else want_file), (f, oct(mode))
