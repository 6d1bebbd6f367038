"""`saelab sweep --lockstep`: the sweep's unfinished runs trained together, many SAEs per pass.

Runs whose batches are the same sequence (same store, batch size, shuffle buffer, seed, position
filter, token budget, device, dtype and input scale, see :func:`saelab.train.lockstep.stream_key`)
form one group; the group reads, shuffles and normalises each batch once and every SAE of the
group steps on it (:func:`saelab.train.lockstep.train_lockstep`). Runs whose families need
another input scale (JumpReLU's unit mean squared norm beside the sqrt(d) of most families), LM
gradients (another store) or are not trained by gradient steps (ITDA: ``fit_from_batches``)
are grouped apart or left to the one-run-at-a-time path.

Each run is set up exactly as :func:`saelab.pipeline.fit_sae` sets it up (same init generator,
input scale, data-based init, checkpoint resume) and evaluated and saved as
:func:`saelab.pipeline.train_run` does, in its own run folder: per-run results and ``--resume``
are unchanged. Resume: each run resumes from its own checkpoint; a group whose runs stopped at
different steps streams from the smallest one and a run joins when the stream reaches its step.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.config import RunConfig
from saelab.data.stream import ActivationStream, estimate_norm_scale
from saelab.evals.facts import RunFacts
from saelab.evals.registry import metrics_of
from saelab.pipeline import (
    begin_run,
    check_memory,
    evaluate_and_save,
    export_sae,
    prepare_run,
    resolve_store,
    resume_trainer,
)
from saelab.runfolder import RunFolder
from saelab.runtime import parse_dtype, resolve_device
from saelab.saes.registry import build_sae, get_family
from saelab.sweep.plan import SweepRun
from saelab.train.lockstep import Member, group_by_stream, stream_key, train_lockstep
from saelab.train.trainer import Trainer, TrainingDivergedError


def can_lockstep(run: SweepRun) -> bool:
    """A run the lockstep path can train: gradient-trained family, one process."""
    cls = get_family(run.family)
    return (cls.trainable and not hasattr(cls, "fit_from_batches")
            and run.cfg.train.nproc == 1 and not run.cfg.overwrite)


def lockstep_runs(runs: list[tuple[SweepRun, str]]) -> list[tuple[SweepRun, str]]:
    """Of the unfinished ``(run, state)`` pairs, those worth training in lockstep: runs the path
    can train, when at least two share a store (LM gradients or not). A lone run keeps the
    one-run path."""
    ok = [(r, s) for r, s in runs if s != "finished" and can_lockstep(r)]
    by_store = group_by_stream(ok, lambda rs: (get_family(rs[0].family).uses_lm_grads,))
    return [rs for g in by_store if len(g) >= 2 for rs in g]


@dataclass
class LockstepJob:
    run: SweepRun
    cfg: RunConfig
    store: object = None
    member: Member | None = None
    scale: float = 1.0
    sae: object = None


def setup_job(job: LockstepJob, lm, hook, progress: bool, log: Callable[[str], None]) -> None:
    """Prepare the run folder and build, resume or data-initialise the SAE and its trainer:
    :func:`saelab.pipeline.fit_sae` up to its ``trainer.fit``, line for line."""
    cfg = job.cfg = prepare_run(job.cfg)
    out = Path(cfg.out)
    check_memory(cfg, lm.d_model)
    store = job.store = resolve_store(cfg, lm, hook.name, progress)
    check_memory(cfg, store.d_in)
    device = resolve_device(cfg.model.device)
    sae_cfg = copy.deepcopy(cfg.sae)
    sae_cfg.d_in = store.d_in
    gen = torch.Generator().manual_seed(cfg.train.seed)
    sae = job.sae = build_sae(sae_cfg, device=device, dtype=parse_dtype(cfg.train.dtype),
                              generator=gen)
    drop = cfg.data.exclude_first_positions
    scale = job.scale = estimate_norm_scale(store, sae.cfg.normalize_activations,
                                            drop_positions_below=drop)
    run = RunFolder(out)
    resume = begin_run(cfg, run, log, label=f"{job.run.label}: ")
    trainer = Trainer(sae, cfg.train, run_dir=out, input_scale=scale, progress=False)
    resume_trainer(trainer, run, resume, log, label=f"{job.run.label}: ")
    if not resume:
        stream = ActivationStream(store, cfg.train.batch_size, cfg.train.shuffle_buffer_rows,
                                  seed=cfg.train.seed, device=device, drop_positions_below=drop,
                                  with_grads=sae.uses_lm_grads)
        sae.init_from_data(stream.sample(min(32_768, store.num_rows), seed=cfg.train.seed)
                           * scale)
    job.member = Member(trainer, name=job.run.name)


def train_in_lockstep(runs: list[tuple[SweepRun, str]], lm, hook, baseline, progress: bool,
                      log: Callable[[str], None]
                      ) -> Iterator[tuple[SweepRun, dict[str, float] | TrainingDivergedError]]:
    """Train ``runs`` (``(run, state)``, none finished) in lockstep groups, evaluate and save
    each; yields ``(run, metrics)`` (or the divergence error) as each run is saved."""
    jobs = []
    for run, state in runs:
        cfg = copy.deepcopy(run.cfg)
        if state == "resume":
            cfg.resume = True
        elif run.run_dir.exists():  # started but never checkpointed: start again
            shutil.rmtree(run.run_dir)
        jobs.append(LockstepJob(run, cfg))
    with ExitStack() as locks:
        for job in jobs:
            locks.enter_context(RunFolder(Path(job.cfg.out)).lock("train"))
        for job in jobs:
            setup_job(job, lm, hook, progress, log)
        groups = group_by_stream(jobs, lambda j: stream_key(
            j.member.trainer, j.store, j.cfg.data.exclude_first_positions))
        for group in groups:
            lead = group[0]
            log(f"lockstep: {len(group)} runs on one pass of {lead.store.path} "
                f"({', '.join(j.run.label for j in group)})")
            train_lockstep([j.member for j in group], lead.store,
                           lead.cfg.data.exclude_first_positions, progress=progress)
            for job in group:
                m = job.member
                if m.error is not None:
                    yield job.run, m.error
                    continue
                result = m.result
                if result.steps == m.start and m.start > 0:
                    # resumed after training had finished (interrupted in eval)
                    result.tokens_per_second = RunFolder(Path(job.cfg.out)).last_logged(
                        "tokens_per_second", 0.0)
                log(f"{job.run.label}: trained {result.steps} steps ({result.tokens:,} tokens), "
                    f"{result.seconds:.1f} s of the group's time")
                extra = metrics_of(RunFacts(train_tokens_per_second=result.tokens_per_second,
                                            train_seconds=result.seconds))
                final = export_sae(job.sae, job.scale)
                metrics = evaluate_and_save(final, lm, hook, job.cfg, Path(job.cfg.out),
                                            progress=progress, baseline=baseline, extra=extra)
                yield job.run, metrics
