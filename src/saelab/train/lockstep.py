"""Many SAEs per pass over the store: train several :class:`Trainer` s in lockstep on one stream.

Every step reads ONE batch from the store (one shard read, one shuffle gather), moves it to the
device and multiplies it by the input scale once (:meth:`Trainer.prepare_batch`), and every
trainer of the group takes its optimiser step on that same tensor (:meth:`Trainer.step_on`,
the body of :meth:`Trainer.fit`). So a group member sees exactly the batches, in exactly the
order, that it would see trained alone, and reaches the same weights (bit for bit on one
device: nothing in a step depends on the other members).

A group must share what decides the batch sequence and its preparation: the store, batch size,
shuffle buffer, seed, position filter, gradients or not, device, dtype and input scale, and the
token budget (:func:`stream_key`). Members may start at different steps (resumed from their own
checkpoints): the stream starts at the smallest start step and a member joins when the stream
reaches its step, so a member already past a batch skips it. Each member keeps its own run
folder: checkpoints every ``checkpoint_every`` of its steps and its ``metrics.jsonl``, in the
single-run format, so each run resumes on its own.

Single process only (data-parallel groups would need one collective schedule for all members).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saelab import dist
from saelab.data.store import ActivationStore
from saelab.data.stream import ActivationStream
from saelab.errors import ConfigError
from saelab.train.trainer import Trainer, TrainingDivergedError, TrainResult


@dataclass
class Member:
    """One SAE of a lockstep group: its trainer (already resumed, if it resumes) and how far
    it has come. ``seconds``: its own steps plus an equal share of each batch it trained on
    (read, shuffle, normalise), so the members' seconds add up to the group's wall time."""

    trainer: Trainer
    name: str = ""
    start: int = 0
    seconds: float = 0.0
    last: dict[str, float] = field(default_factory=dict)
    error: TrainingDivergedError | None = None
    result: TrainResult | None = None

    def __post_init__(self) -> None:
        self.start = self.trainer.step


def stream_key(trainer: Trainer, store: ActivationStore, drop_positions_below: int) -> tuple:
    """What trainers must share to train on one stream: equal keys, one group."""
    c, sae = trainer.cfg, trainer.sae
    return (str(Path(store.path).expanduser().resolve()), c.batch_size, c.shuffle_buffer_rows,
            c.seed, drop_positions_below, bool(sae.uses_lm_grads), str(trainer.device),
            sae.W_dec.dtype, trainer.input_scale, trainer.total_steps)


def group_by_stream(items: Sequence[Any], key: Callable[[Any], tuple]) -> list[list[Any]]:
    """``items`` split by ``key``, in order of first appearance (order kept inside a group)."""
    groups: dict[tuple, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def train_lockstep(members: list[Member], store: ActivationStore, drop_positions_below: int = 0,
                   progress: bool = True) -> list[Member]:
    """Train every member to its ``total_steps`` on one pass of batches; returns ``members``
    with ``result`` set (or ``error``, for a member whose loss diverged: the others go on).

    The members' trainers must have been built with ``progress=False`` (the group has one bar)
    and share :func:`stream_key`."""
    if not members:
        return members
    if dist.world_size() > 1:
        raise ConfigError("lockstep training runs in one process: train data-parallel runs "
                          "one at a time (--no-lockstep)")
    keys = {stream_key(m.trainer, store, drop_positions_below) for m in members}
    if len(keys) > 1:
        raise ConfigError("lockstep members differ in what decides their batches (store, batch "
                          "size, seed, budget, device, dtype or input scale): group them apart")
    lead = members[0].trainer
    cfg, total = lead.cfg, lead.total_steps
    first = min(m.start for m in members)
    stream = ActivationStream(store, cfg.batch_size, cfg.shuffle_buffer_rows, seed=cfg.seed,
                              device=lead.device, start_batch=first,
                              drop_positions_below=drop_positions_below,
                              with_grads=lead.sae.uses_lm_grads)
    bar = _progress(total, first, progress, len(members))
    t0 = time.perf_counter()  # the members' log lines count throughput from here, as fit does
    it = iter(stream)
    for step in range(first, total):
        alive = [m for m in members if m.error is None and m.trainer.step < total]
        if not alive:
            break
        t_read = time.perf_counter()
        try:
            batch = next(it)  # batch `step`: read even if no member trains on it, to stay aligned
        except StopIteration:
            raise ConfigError("the batch iterator ran out before the token budget") from None
        active = [m for m in alive if m.trainer.step == step]
        if not active:  # members still to come start later (a diverged member left a gap)
            continue
        x_BD, grad_BD = active[0].trainer.prepare_batch(batch)
        share = (time.perf_counter() - t_read) / len(active)
        for m in active:
            t_step = time.perf_counter()
            try:
                rec = m.trainer.step_on(x_BD, grad_BD, total, t0, m.start)
            except TrainingDivergedError as e:
                m.error = e  # this member stops; the group goes on without it
                rec = None
            m.seconds += share + time.perf_counter() - t_step
            m.last = rec or m.last
        if bar is not None:
            bar.update(1)
            fvus = [m.last["fvu"] for m in active if m.error is None and "fvu" in m.last]
            if fvus:
                bar.set_postfix(fvu=",".join(f"{v:.3f}" for v in fvus), refresh=False)
    if bar is not None:
        bar.close()
    for m in members:
        if m.error is not None:
            continue
        m.trainer.save_checkpoint()  # as fit ends: the final checkpoint is the run's state
        steps = m.trainer.step - m.start
        tokens = steps * cfg.batch_size
        m.result = TrainResult(m.trainer.step, m.trainer.step * cfg.batch_size, m.seconds,
                               tokens / m.seconds if m.seconds > 0 else 0.0, m.last)
    return members


def _progress(total: int, initial: int, enabled: bool, n: int):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=f"train x{n} (lockstep)", unit="step",
                dynamic_ncols=True)


__all__ = ["Member", "group_by_stream", "stream_key", "train_lockstep"]
