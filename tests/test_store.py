"""Activation store: roundtrip, integrity errors, compatibility, crash-safe resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from saelab.data import store as store_mod
from saelab.data.store import ActivationStore, StoreSpec, StoreWriter
from saelab.errors import NonFiniteActivationError, StoreError

T, D = 16, 8
SPEC = StoreSpec(
    model="tiny-lm",
    hook="blocks.1.hook_resid_post",
    d_in=D,
    context_size=T,
    exclude_first_positions=1,
    dataset="corpus.txt",
)


def make_windows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic synthetic windows ``start..stop``: (windows_WT, keep_WT, acts_ND).

    Column 0 of each row encodes ``window * T + pos`` so rows can be identified later.
    """
    wins, keeps, acts = [], [], []
    for w in range(start, stop):
        g = torch.Generator().manual_seed(w)
        wins.append(torch.randint(0, 1000, (T,), generator=g))
        keep = torch.rand(T, generator=g) > 0.25
        keep[0] = False
        if w % 7 == 3:  # some windows keep nothing
            keep[:] = False
        keeps.append(keep)
        a = torch.randn(int(keep.sum()), D, generator=g)
        a[:, 0] = (w * T + keep.nonzero()[:, 0]).float()
        acts.append(a)
    return torch.stack(wins), torch.stack(keeps), torch.cat(acts)


def write(
    path: Path,
    n_windows: int,
    shard_rows: int = 60,
    batch: int = 5,
    start: int = 0,
    writer: StoreWriter | None = None,
) -> StoreWriter:
    writer = writer or StoreWriter(path, SPEC, shard_rows=shard_rows)
    for w in range(start, n_windows, batch):
        writer.add(*make_windows(w, min(w + batch, n_windows)))
    return writer


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.safetensors"))}


def rewrite_shard(store: ActivationStore, i: int, tensors: dict) -> None:
    """Replace shard ``i`` with ``tensors`` and fix its manifest entry (bypassing checks)."""
    data = save(tensors)
    (store.path / store.shards[i].file).write_bytes(data)
    m = json.loads((store.path / "manifest.json").read_text())
    m["shards"][i].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store.path / "manifest.json").write_text(json.dumps(m))


def test_roundtrip(tmp_path):
    store = write(tmp_path, 40).finish()
    windows_WT, keep_WT, acts_ND = make_windows(0, 40)
    parts = [store.read_shard(i) for i in range(len(store.shards))]
    got = {k: torch.cat([p[k] for p in parts]) for k in ("acts", "tokens", "window", "pos")}
    assert torch.equal(got["acts"], acts_ND)
    assert torch.equal(got["tokens"].long(), windows_WT[keep_WT])
    w_idx, p_idx = keep_WT.nonzero(as_tuple=True)
    assert torch.equal(got["window"], w_idx) and torch.equal(got["pos"].long(), p_idx)
    assert got["tokens"].dtype == torch.int32 and got["pos"].dtype == torch.int16
    # every shard holds whole windows, about shard_rows rows, and their full token windows
    for s, p in zip(store.shards, parts, strict=True):
        assert torch.equal(p["windows"].long(), windows_WT[s.window_start : s.window_end])
        assert p["window"].min() >= s.window_start and p["window"].max() < s.window_end
    assert all(s.rows >= 60 for s in store.shards[:-1])
    assert store.num_rows == len(acts_ND) and store.num_windows <= 40 and store.complete
    assert (store.model, store.hook, store.d_in, store.context_size) == ("tiny-lm", SPEC.hook, D, T)
    # exact statistics for normalisation, no pass needed
    assert torch.allclose(store.mean, acts_ND.double().mean(0))
    assert store.mean_sq_norm == pytest.approx(float(acts_ND.double().square().sum(1).mean()))
    assert store.mean_norm == pytest.approx(float(acts_ND.double().norm(dim=1).mean()))
    store.verify()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_store(tmp_path, dtype):
    spec = dataclasses.replace(SPEC, dtype=dtype)
    w = StoreWriter(tmp_path, spec, shard_rows=50)
    w.add(*make_windows(0, 10))
    store = w.finish()
    acts = store.read_shard(0)["acts"]
    assert acts.dtype == getattr(torch, dtype)
    assert torch.equal(acts, make_windows(0, 10)[2][: len(acts)].to(acts.dtype))


def test_checksum_mismatch_names_shard(tmp_path):
    store = write(tmp_path, 30).finish()
    f = tmp_path / store.shards[1].file
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: parses fine, checksum catches it
    f.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path)
    store.read_shard(0)
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors.*sha256"):
        store.read_shard(1)
    with pytest.raises(StoreError, match="shard_00001"):
        store.verify()


def test_truncated_shard(tmp_path):
    store = write(tmp_path, 30).finish()
    f = tmp_path / store.shards[0].file
    f.write_bytes(f.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(StoreError, match=r"shard_00000\.safetensors.*truncated"):
            store.read_shard(0, verify=verify)
    # even with a manifest that agrees with the damaged file, parsing fails cleanly
    data = f.read_bytes()
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"shard_00000\.safetensors.*cannot be parsed"):
        ActivationStore.open(tmp_path).read_shard(0)


def test_missing_shard(tmp_path):
    store = write(tmp_path, 30).finish()
    (tmp_path / store.shards[2].file).unlink()
    with pytest.raises(StoreError, match=r"shard_00002\.safetensors.*missing"):
        store.read_shard(2)


def test_nan_refused_at_write(tmp_path):
    w = StoreWriter(tmp_path, SPEC, shard_rows=50)
    windows, keep, acts = make_windows(0, 4)
    acts[5, 2] = float("nan")
    w_idx, p_idx = keep.nonzero(as_tuple=True)
    with pytest.raises(
        NonFiniteActivationError, match=f"window {int(w_idx[5])} at position {int(p_idx[5])}"
    ):
        w.add(windows, keep, acts)


def test_nan_on_read_names_shard_and_row(tmp_path):
    store = write(tmp_path, 30).finish()
    t = load_file(tmp_path / store.shards[1].file)
    t["acts"][7, 3] = float("inf")
    rewrite_shard(store, 1, t)
    store = ActivationStore.open(tmp_path)
    with pytest.raises(NonFiniteActivationError, match=r"shard_00001\.safetensors.* row 7 "):
        store.read_shard(1)


def test_check_compatible(tmp_path):
    store = write(tmp_path, 10).finish()
    store.check_compatible(model="tiny-lm", hook=SPEC.hook, d_in=D)
    for kw in ({"model": "gpt2"}, {"hook": "blocks.0.hook_mlp_out"}, {"d_in": 16}):
        with pytest.raises(StoreError, match="was made for model tiny-lm hook .* but you asked"):
            store.check_compatible(**kw)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match=r"not an activation store \(no manifest.json\).*harvest"):
        ActivationStore.open(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        ActivationStore.open(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(StoreError, match="not an activation-store manifest"):
        ActivationStore.open(tmp_path)


def test_writer_refuses_foreign_folder_and_other_settings(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        StoreWriter(tmp_path / "a", SPEC, shard_rows=10)
    write(tmp_path / "b", 10).finish()
    other = dataclasses.replace(SPEC, hook="blocks.0.hook_mlp_out")
    with pytest.raises(StoreError, match="other settings: hook="):
        StoreWriter(tmp_path / "b", other, shard_rows=10)


def test_interrupted_write_resumes_to_identical_store(tmp_path, monkeypatch):
    ref = write(tmp_path / "ref", 50).finish()

    # crash inside the 3rd shard write, after its temp file exists
    real = store_mod.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            (path.parent / f".{path.name}.x1.tmp").write_bytes(data[:50])
            raise OSError("disk on fire")
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        write(tmp_path / "crash", 50)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real)

    crashed = ActivationStore.open(tmp_path / "crash")
    assert not crashed.complete and len(crashed.shards) == 2
    crashed.verify()  # only complete shards are listed
    # a shard renamed into place whose manifest update never happened is a stray too
    (tmp_path / "crash" / "shard_00002.safetensors").write_bytes(b"half")

    w = StoreWriter(tmp_path / "crash", SPEC, shard_rows=60)
    assert w.windows_done == crashed.shards[-1].window_end and w.rows == crashed.num_rows
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == [
        "manifest.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    done = write(tmp_path / "crash", 50, start=w.windows_done, writer=w).finish()
    assert shard_bytes(tmp_path / "crash") == shard_bytes(tmp_path / "ref")
    assert done.manifest["stats"] == ref.manifest["stats"]
    assert done.shards == ref.shards


def test_resume_drops_corrupt_tail_and_extends_complete_store(tmp_path):
    ref = write(tmp_path / "ref", 60).finish()
    write(tmp_path / "s", 40).finish()
    # a complete store reopened for more windows drops its (possibly partial) last shard
    w = StoreWriter(tmp_path / "s", SPEC, shard_rows=60)
    assert not ActivationStore.open(tmp_path / "s").complete
    write(tmp_path / "s", 60, start=w.windows_done, writer=w).finish()
    assert shard_bytes(tmp_path / "s") == shard_bytes(tmp_path / "ref")
    # a corrupt listed shard is not trusted, nor anything after it
    s = ActivationStore.open(tmp_path / "s")
    (tmp_path / "s" / s.shards[2].file).write_bytes(b"junk")
    w = StoreWriter(tmp_path / "s", SPEC, shard_rows=60)
    assert len(w.shards) == 2 and w.windows_done == s.shards[1].window_end
    done = write(tmp_path / "s", 60, start=w.windows_done, writer=w).finish()
    assert shard_bytes(tmp_path / "s") == shard_bytes(tmp_path / "ref")
    assert done.manifest["stats"] == ref.manifest["stats"]
