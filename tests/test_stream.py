"""Activation stream: exact epochs, exact resume, bounded memory, normalisation estimate."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.data.store import ActivationStore, StoreSpec, StoreWriter
from saelab.data.stream import ActivationStream, estimate_norm_scale, sample_rows
from saelab.errors import ConfigError

T, D = 16, 6


def build_store(
    path, n_windows: int = 120, shard_rows: int = 100, dtype: str = "float32"
) -> ActivationStore:
    """Rows whose column 0 is a unique id ``window * T + pos``; positions 1.. kept."""
    spec = StoreSpec(
        model="m",
        hook="blocks.0.hook_resid_post",
        d_in=D,
        context_size=T,
        exclude_first_positions=1,
        dtype=dtype,
    )
    w = StoreWriter(path, spec, shard_rows=shard_rows)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n_windows, 8):
        n = min(8, n_windows - start)
        keep = torch.rand(n, T, generator=g) > 0.2
        keep[:, 0] = False
        w_idx, p_idx = keep.nonzero(as_tuple=True)
        acts = torch.randn(len(w_idx), D, generator=g) * 3 + 1
        acts[:, 0] = ((start + w_idx) * T + p_idx).float()
        w.add(torch.randint(0, 50, (n, T), generator=g), keep, acts)
    return w.finish()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"))


def ids(batches) -> torch.Tensor:
    return torch.cat([b[:, 0] for b in batches]).long()


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("batch_size,buffer_rows", [(64, 250), (37, 100), (500, 10_000), (1, 90)])
def test_every_row_once_per_epoch(store, batch_size, buffer_rows):
    all_ids = ids(store.read_shard(i)["acts"] for i in range(len(store.shards)))
    R = store.num_rows
    s = ActivationStream(store, batch_size, buffer_rows, seed=3)
    assert s.rows_per_epoch == R and s.batches_per_epoch == R / batch_size
    n = math.ceil(2 * R / batch_size)
    batches = take(s, n)
    assert all(b.shape == (batch_size, D) and b.dtype == torch.float32 for b in batches)
    got = ids(batches)
    for e in range(2):
        epoch = got[e * R : (e + 1) * R]
        assert torch.equal(epoch.sort().values, all_ids.sort().values)
    assert not torch.equal(got[:R], got[R : 2 * R])  # a fresh order every epoch


def test_batch_size_dividing_epoch(store):
    R = store.num_rows
    B = next(b for b in range(2, R) if R % b == 0 and b > 20)
    s = ActivationStream(store, B, 300, seed=0)
    got = ids(take(s, 2 * R // B))
    assert got[:R].unique().numel() == R and got[R:].unique().numel() == R


def test_start_batch_reproduces_tail(store):
    B, n = 50, 60  # 60 batches span several epochs (R is ~1,500)
    fresh = take(ActivationStream(store, B, 250, seed=7), n)
    for start in (1, 5, 17, 29, 31, 59):
        tail = take(ActivationStream(store, B, 250, seed=7, start_batch=start), n - start)
        assert all(torch.equal(a, b) for a, b in zip(fresh[start:], tail, strict=True))


def test_start_batch_skips_loading(store):
    s = ActivationStream(store, 50, 250, seed=7, start_batch=45)
    take(s, 1)
    assert s.shard_reads <= 2 * s.shards_per_block  # one block, two if the batch spans blocks


def test_seeds_differ_and_repeat(store):
    a = ids(take(ActivationStream(store, 64, 250, seed=0), 5))
    b = ids(take(ActivationStream(store, 64, 250, seed=1), 5))
    c = ids(take(ActivationStream(store, 64, 250, seed=0), 5))
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_memory_bound(store):
    s = ActivationStream(store, 32, 250, seed=0)
    assert s.shards_per_block == 250 // round(store.num_rows / len(store.shards))
    full_batches = s.rows_per_epoch // 32
    take(s, full_batches)
    assert s.peak_block_shards <= s.shards_per_block
    assert s.shard_reads == len(store.shards)  # each shard read exactly once per epoch


def test_drop_positions_below(store):
    s = ActivationStream(store, 40, 300, seed=0, drop_positions_below=5)
    got = ids(take(s, math.ceil(s.rows_per_epoch / 40)))[: s.rows_per_epoch]
    assert (got % T >= 5).all() and got.unique().numel() == s.rows_per_epoch
    assert s.rows_per_epoch < store.num_rows
    a = take(ActivationStream(store, 40, 300, seed=0, drop_positions_below=5), 30)
    b = take(ActivationStream(store, 40, 300, seed=0, drop_positions_below=5, start_batch=20), 10)
    assert all(torch.equal(x, y) for x, y in zip(a[20:], b, strict=True))


def test_low_precision_store_streams_float32(tmp_path):
    st = build_store(tmp_path, n_windows=30, dtype="bfloat16")
    batch = next(iter(ActivationStream(st, 16, 100, dtype=torch.float32)))
    assert batch.dtype == torch.float32


def test_bad_arguments(store):
    with pytest.raises(ConfigError):
        ActivationStream(store, 0, 100)
    with pytest.raises(ConfigError):
        ActivationStream(store, 10, 100, drop_positions_below=T)


def test_sample_and_norm_scale(store):
    x = sample_rows(store, 300, seed=1)
    assert x.shape == (300, D) and x[:, 0].unique().numel() == 300
    assert not torch.equal(x, sample_rows(store, 300, seed=2))
    assert len(sample_rows(store, 10**9)) == store.num_rows
    s = ActivationStream(store, 10, 100)
    assert s.sample(5).shape == (5, D)

    rows = sample_rows(store, 10**9).double()
    norms = rows.norm(dim=1)
    c = estimate_norm_scale(store, "scalar_sqrt_d")  # exact, from manifest statistics
    assert c == pytest.approx(math.sqrt(D) / float(norms.mean()), rel=1e-9)
    c = estimate_norm_scale(store, "scalar_unit_mean_sq_norm")
    assert c == pytest.approx(1 / math.sqrt(float(norms.square().mean())), rel=1e-9)
    assert estimate_norm_scale(store, "none") == 1.0
    # sampled estimate: from the rows sample_rows draws (column 0 is an id, so only the
    # arithmetic is checked here, not closeness to the exact value)
    sampled = estimate_norm_scale(store, "scalar_sqrt_d", n_rows=500, seed=4)
    drawn = sample_rows(store, 500, seed=4).double().norm(dim=1)
    assert sampled == pytest.approx(math.sqrt(D) / float(drawn.mean()), rel=1e-9)
    # extra dropped positions: the manifest statistics no longer apply, a sample is used
    kept = rows[rows[:, 0].long() % T >= 5].norm(dim=1)
    c = estimate_norm_scale(store, "scalar_unit_mean_sq_norm", n_rows=10**9, drop_positions_below=5)
    assert c == pytest.approx(1 / math.sqrt(float(kept.square().mean())), rel=1e-9)
    with pytest.raises(ConfigError):
        estimate_norm_scale(store, "l2")


@pytest.mark.parametrize("world,B,buffer_rows,drop,start", [
    (2, 64, 250, 0, 0), (2, 40, 300, 5, 7), (4, 36, 100, 0, 3), (3, 501, 10_000, 2, 0),
])
def test_rank_slices_partition_the_global_batch(store, world, B, buffer_rows, drop, start):
    """W ranks' batches, concatenated in rank order, are the single-process batch, row for row
    (spanning blocks and epochs), and each rank reads only the rows it yields."""
    n = 2 * math.ceil(store.num_rows / B) + 3  # over two epochs
    kw = {"seed": 5, "drop_positions_below": drop, "start_batch": start}
    single = take(ActivationStream(store, B, buffer_rows, **kw), n)
    ranks = [ActivationStream(store, B, buffer_rows, rank=r, world_size=world, **kw)
             for r in range(world)]
    per_rank = [take(s, n) for s in ranks]
    block_rows = max(1, buffer_rows // round(store.num_rows / len(store.shards))) * max(
        s.rows for s in store.shards)
    for s in ranks:  # a rank holds about 1/W of a block (its rows), not the block
        assert s.peak_buffer_rows <= (block_rows + B) / world
    for i in range(n):
        parts = [p[i] for p in per_rank]
        assert all(p.shape == (B // world, D) for p in parts)
        assert torch.equal(torch.cat(parts), single[i])


def test_rank_slicing_refuses_uneven_batch(store):
    with pytest.raises(ConfigError, match="divisible"):
        ActivationStream(store, 63, 250, rank=0, world_size=2)
    with pytest.raises(ConfigError):
        ActivationStream(store, 64, 250, rank=2, world_size=2)
