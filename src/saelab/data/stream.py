"""Shuffled, exactly resumable batches from an activation store, in bounded memory.

The order is a pure function of (store, batch_size, buffer_rows, seed, drop_positions_below):

* epoch ``e`` permutes the shard order with a generator seeded by ``(seed, e)``;
* that order is cut into blocks of ``G = max(1, buffer_rows // mean_shard_rows)`` shards;
  block ``b``'s rows (shards concatenated in that order) are permuted with ``(seed, e, b)``;
* epochs are concatenated into one endless row sequence and batch ``i`` is rows
  ``[i*B, (i+1)*B)`` of it. A batch may span blocks and epochs: no row is ever dropped, so
  every row appears once per epoch, and the last batch of an epoch is completed from the
  start of the next one.

Block sizes come from the manifest, so ``start_batch=n`` seeks straight to batch ``n`` and
reads only the block it lies in. At most one block (G shards) plus one shard being read and
one batch are in memory.

Data-parallel training (``rank``/``world_size``, W ranks): the global batch order above is
unchanged and rank ``r`` yields rows ``[r*B/W, (r+1)*B/W)`` of every global batch, so the
ranks' batches are disjoint and together are exactly the single-process batch. Each rank reads
only the rows it yields from a block (about 1/W of it stays resident).

With ``with_grads`` (a store harvested with ``--with-grads``) each batch is a tuple
``(x_BD, g_BD)``: the same rows in the same order as without, plus their LM-loss gradients
(twice the memory per block).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from saelab.data.store import GRADS, ActivationStore
from saelab.errors import ConfigError, StoreError

NORM_MODES = ("none", "scalar_sqrt_d", "scalar_unit_mean_sq_norm")


def _perm(n: int, *key: object) -> Tensor:
    """A permutation of ``range(n)`` determined by ``key`` (stable across processes)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=g)


def _kept_counts(store: ActivationStore, drop_positions_below: int) -> list[int]:
    if drop_positions_below <= store.exclude_first_positions:  # nothing extra to drop
        return [s.rows for s in store.shards]
    # only the small `pos` tensor is read, never the activations
    return [
        int((store.read_tensor(i, "pos") >= drop_positions_below).sum())
        for i in range(len(store.shards))
    ]


def _to(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    if device.type == "cuda":  # async copy from pinned memory; cast on the GPU (fewer bytes)
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    return x.to(device=device, dtype=dtype)


class ActivationStream:
    """Endless iterable of ``[batch_size, d_in]`` batches; see the module docstring."""

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        buffer_rows: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        start_batch: int = 0,
        drop_positions_below: int = 0,
        with_grads: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or buffer_rows < 1 or start_batch < 0:
            raise ConfigError(
                f"batch_size and buffer_rows must be >= 1 and start_batch >= 0, got "
                f"{batch_size}, {buffer_rows}, {start_batch}"
            )
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ConfigError(
                f"the batch size ({batch_size}) must split evenly over {world_size} ranks "
                f"(rank {rank}): pick a batch size divisible by the number of processes"
            )
        if not 0 <= drop_positions_below < store.context_size:
            raise ConfigError(
                f"drop_positions_below must be in [0, {store.context_size}), "
                f"got {drop_positions_below}"
            )
        if not store.shards:
            raise StoreError(f"store {store.path} has no rows: harvest it first")
        if with_grads and not store.has_grads:
            raise StoreError(
                f"store {store.path} holds no LM-loss gradients: harvest one with "
                f"`saelab harvest --with-grads`"
            )
        if not store.complete:
            warnings.warn(
                f"store {store.path} is incomplete (harvest interrupted?): streaming "
                f"its {store.num_rows:,} rows",
                stacklevel=2,
            )
        self.store = store
        self.batch_size = batch_size
        self.buffer_rows = buffer_rows
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.start_batch = start_batch
        self.drop_positions_below = drop_positions_below
        self.with_grads = with_grads
        self.rank, self.world_size = rank, world_size
        #: rows this rank yields per batch (``batch_size`` on a single process)
        self.local_batch_size = batch_size // world_size
        #: the shard tensors each batch carries
        self._keys = ("acts", GRADS) if with_grads else ("acts",)
        self._counts = _kept_counts(store, drop_positions_below)
        self.rows_per_epoch = sum(self._counts)
        if self.rows_per_epoch == 0:
            raise StoreError(
                f"store {store.path} has no rows at positions >= {drop_positions_below}"
            )
        mean_shard_rows = max(1, round(store.num_rows / len(store.shards)))
        #: G, the number of shards mixed together (and resident) at a time
        self.shards_per_block = max(1, buffer_rows // mean_shard_rows)
        # instrumentation, for tests and benchmarks
        self.shard_reads = 0
        self.peak_block_shards = 0
        self.peak_buffer_rows = 0

    @property
    def batches_per_epoch(self) -> float:
        """Rows per epoch / batch size (not an integer in general: batches span epochs)."""
        return self.rows_per_epoch / self.batch_size

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        return self._batches(self.start_batch)

    def _layout(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Shard ids of each block of ``epoch`` and the blocks' first row offsets (+ total)."""
        order = _perm(len(self._counts), "shards", self.seed, epoch).tolist()
        g = self.shards_per_block
        blocks = [order[i : i + g] for i in range(0, len(order), g)]
        starts = [0]
        for ids in blocks:
            starts.append(starts[-1] + sum(self._counts[s] for s in ids))
        return blocks, starts

    def _load_block(self, epoch: int, b: int, ids: list[int],
                    need_R: Tensor | None = None) -> list[Tensor]:
        """The block's rows, one buffer per key of ``self._keys``: all of them, or only the
        block rows ``need_R`` (sorted), in that order."""
        total = sum(self._counts[s] for s in ids)
        self.peak_block_shards = max(self.peak_block_shards, len(ids))
        rows = total if need_R is None else len(need_R)
        self.peak_buffer_rows = max(self.peak_buffer_rows, rows)
        bufs = [torch.empty(rows, self.store.d_in, dtype=self.store.dtype) for _ in self._keys]
        off = out = 0
        for s in ids:  # copy shard by shard: peak memory is the block plus one shard
            n = self._counts[s]
            if need_R is not None:
                lo, hi = torch.searchsorted(need_R, torch.tensor([off, off + n])).tolist()
                if lo == hi:  # nothing of this shard for this rank: do not read it
                    off += n
                    continue
            t = self.store.read_shard(s)
            self.shard_reads += 1
            keep = None if n == len(t["acts"]) else t["pos"] >= self.drop_positions_below
            if need_R is None:
                for buf_RD, key in zip(bufs, self._keys, strict=True):
                    buf_RD[out : out + n] = t[key] if keep is None else t[key][keep]
                out += n
            else:
                idx = need_R[lo:hi] - off
                if keep is not None:
                    idx = keep.nonzero().squeeze(1)[idx]
                for buf_RD, key in zip(bufs, self._keys, strict=True):
                    torch.index_select(t[key], 0, idx, out=buf_RD[out : out + hi - lo])
                out += hi - lo
            off += n
            del t
        return bufs

    def _local_rows(self, epoch_start: int, block_start: int, i0: int, size: int,
                    perm_R: Tensor) -> Tensor:
        """Block rows this rank yields from block position ``i0`` on, in stream order.

        A block position ``i`` is global row ``epoch_start + block_start + i`` of the endless
        sequence; its slot in its batch decides the rank."""
        B, b = self.batch_size, self.local_batch_size
        slot = (torch.arange(i0, size, dtype=torch.long) + (epoch_start + block_start)) % B
        lo = self.rank * b
        mine = (slot >= lo) & (slot < lo + b)
        return perm_R[i0:][mine]

    def _new_batch(self) -> list[Tensor]:
        # pinned when feeding a GPU: the copy to the device can then run asynchronously
        pin = self.device.type == "cuda"
        return [torch.empty(self.local_batch_size, self.store.d_in, dtype=self.store.dtype,
                            pin_memory=pin) for _ in self._keys]

    def _batches(self, start_batch: int) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        B, R = self.local_batch_size, self.rows_per_epoch
        epoch, offset = divmod(start_batch * self.batch_size, R)
        batch, have = self._new_batch(), 0
        while True:
            blocks, starts = self._layout(epoch)
            for b in range(bisect.bisect_right(starts, offset) - 1, len(blocks)):
                size = starts[b + 1] - starts[b]
                if size == 0:
                    continue
                perm_R = _perm(size, "rows", self.seed, epoch, b)
                i, i_end = offset - starts[b], size
                if self.world_size > 1:
                    # only this rank's rows are read, remapped to their place in the buffer
                    src_R = self._local_rows(epoch * R, starts[b], i, size, perm_R)
                    need_R = src_R.sort().values
                    block = self._load_block(epoch, b, blocks[b], need_R)
                    perm_R, i, i_end = torch.searchsorted(need_R, src_R), 0, len(src_R)
                else:
                    block = self._load_block(epoch, b, blocks[b])
                while i < i_end:
                    take = min(B - have, i_end - i)
                    # gather straight from the unpermuted block: no second block-sized copy
                    for block_RD, batch_BD in zip(block, batch, strict=True):
                        torch.index_select(
                            block_RD, 0, perm_R[i : i + take], out=batch_BD[have : have + take]
                        )
                    have += take
                    i += take
                    if have == B:
                        out = [_to(t, self.device, self.dtype) for t in batch]
                        yield tuple(out) if self.with_grads else out[0]
                        batch, have = self._new_batch(), 0
                offset = starts[b + 1]
                del block, perm_R  # free before the next block is read
            epoch, offset = epoch + 1, 0

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` random rows on the stream's device and dtype (see :func:`sample_rows`)."""
        rows = sample_rows(self.store, n, seed, self.drop_positions_below)
        return _to(rows, self.device, self.dtype)


def sample_rows(
    store: ActivationStore, n: int, seed: int = 0, drop_positions_below: int = 0
) -> Tensor:
    """``n`` rows (float32, CPU) drawn without replacement from randomly chosen shards.

    Reads only as many shards (in a seeded random order) as hold ``n`` rows, so it costs no
    pass over the store; returns every row if the store has fewer than ``n``.
    """
    counts = _kept_counts(store, drop_positions_below)
    chosen, have = [], 0
    for s in _perm(len(counts), "sample", seed).tolist():
        if have >= n:
            break
        chosen.append(s)
        have += counts[s]
    parts = []
    for s in chosen:
        t = store.read_shard(s)
        parts.append(t["acts"][t["pos"] >= drop_positions_below])
    rows = torch.cat(parts) if parts else torch.empty(0, store.d_in, dtype=store.dtype)
    if len(rows) > n:
        rows = rows[_perm(len(rows), "sample-rows", seed)[:n]]
    return rows.float()


def estimate_norm_scale(
    store: ActivationStore,
    mode: str,
    n_rows: int | None = None,
    seed: int = 0,
    drop_positions_below: int = 0,
) -> float:
    """Scalar ``c`` such that ``c * x`` is normalised as ``mode`` says.

    ``scalar_sqrt_d``: E||c x|| = sqrt(d_in); ``scalar_unit_mean_sq_norm``: E||c x||^2 = 1;
    ``none``: 1. With ``n_rows=None`` the exact whole-store statistics in the manifest are used
    when they apply (no extra positions dropped), else a sample of ``n_rows`` (default 65,536).
    """
    if mode not in NORM_MODES:
        raise ConfigError(f"unknown normalisation {mode!r}: choose one of {', '.join(NORM_MODES)}")
    if mode == "none":
        return 1.0
    if n_rows is None and drop_positions_below <= store.exclude_first_positions:
        mean_norm, mean_sq = store.mean_norm, store.mean_sq_norm
    else:
        x = sample_rows(store, n_rows or 65_536, seed, drop_positions_below).double()
        norms = torch.linalg.vector_norm(x, dim=1)
        mean_norm, mean_sq = float(norms.mean()), float(norms.square().mean())
    if not (mean_norm > 0 and math.isfinite(mean_sq)):
        raise StoreError(f"store {store.path} has all-zero or non-finite activations")
    return norm_scale_from_stats(mode, store.d_in, mean_norm, mean_sq)


def norm_scale_from_stats(mode: str, d_in: int, mean_norm: float, mean_sq_norm: float) -> float:
    """The scalar of :func:`estimate_norm_scale` from E||x|| and E||x||^2."""
    if mode == "none":
        return 1.0
    if mode == "scalar_sqrt_d":
        return math.sqrt(d_in) / mean_norm
    return 1.0 / math.sqrt(mean_sq_norm)


def norm_scale_of_rows(x_ND: Tensor, mode: str) -> float:
    """:func:`estimate_norm_scale` for rows already in memory (e.g. synthetic data)."""
    if mode not in NORM_MODES:
        raise ConfigError(f"unknown normalisation {mode!r}: choose one of {', '.join(NORM_MODES)}")
    norms = torch.linalg.vector_norm(x_ND.double(), dim=1)
    mean_norm, mean_sq = float(norms.mean()), float(norms.square().mean())
    if not (mean_norm > 0 and math.isfinite(mean_sq)):
        raise ConfigError("cannot normalise all-zero or non-finite activations")
    return norm_scale_from_stats(mode, x_ND.shape[1], mean_norm, mean_sq)
