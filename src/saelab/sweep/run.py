"""Sweep running: train and evaluate every planned run not already finished, sharing one LM,
one store per store key and one eval context."""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.config import SweepConfig
from saelab.evals.evaluate import EvalContext
from saelab.evals.facts import RunFacts
from saelab.models.hooks import parse_hook
from saelab.models.loading import load_model
from saelab.pipeline import resolve_store, train_run
from saelab.report.table import fmt_value
from saelab.runtime import tune_malloc
from saelab.sweep import report
from saelab.sweep.lockstep import lockstep_runs, train_in_lockstep
from saelab.sweep.plan import (
    SweepRun,
    check_run_matches,
    plan_runs,
    prepare_out,
    runs_the_store_can_serve,
)
from saelab.train.trainer import TrainingDivergedError


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]  # finished runs, in grid order (CSV columns + "metrics")
    failed: list[dict[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def table(self) -> str:
        return report.format_table(self.rows)


class _Shared:
    """The LM, hook and eval context, loaded on first need (a sweep whose runs are all
    finished never loads the model)."""

    def __init__(self, cfg: SweepConfig, progress: bool, log: Callable[[str], None]):
        self.cfg, self.progress, self.log = cfg, progress, log
        self.lm = self.hook = self.baseline = None
        self.baseline_seconds = 0.0

    def ready(self) -> _Shared:
        if self.lm is None:
            tune_malloc()
            self.lm = load_model(self.cfg.model)
            self.hook = parse_hook(self.cfg.model.hook, self.lm.n_layers)
            t0 = time.perf_counter()
            self.baseline = EvalContext.build(self.lm, self.hook, self.cfg.data, self.cfg.eval,
                                              skip_ce=self.cfg.skip_ce, progress=self.progress)
            self.baseline_seconds = time.perf_counter() - t0
            self.log(f"eval baseline (held-out activations, clean/ablated CE): "
                     f"{self.baseline_seconds:.1f} s, shared by every run")
        return self

    @property
    def split(self) -> dict[str, float]:
        return self.baseline.seconds if self.baseline is not None else {}


def _train_one(run: SweepRun, shared: _Shared, state: str, progress: bool,
               log: Callable[[str], None]) -> dict[str, float]:
    """Train and evaluate one run through the pipeline; returns its metrics."""
    cfg = copy.deepcopy(run.cfg)
    if state == "resume":
        cfg.resume = True
    elif run.run_dir.exists():
        # started but never checkpointed (or a stray folder): start again
        shutil.rmtree(run.run_dir)
    shared.ready()
    store = resolve_store(cfg, shared.lm, shared.hook.name, progress)
    summary = train_run(cfg, progress=progress, log=log, lm=shared.lm, store=store,
                        eval_baseline=shared.baseline)
    return summary.metrics


def run_sweep(cfg: SweepConfig, progress: bool = True,
              log: Callable[[str], None] = print) -> SweepResult:
    """Train and evaluate every run of ``cfg`` not already finished in ``cfg.out``."""
    cfg.validate()
    runs = runs_the_store_can_serve(cfg, plan_runs(cfg), log)
    prepare_out(cfg, report.outputs())
    out = Path(cfg.out)
    shared = _Shared(cfg, progress, log)
    done: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, str]] = []
    result = SweepResult(out, [], failed)
    t_start = time.perf_counter()
    stale = True  # outputs not yet written for the current set of finished runs
    run_seconds: list[float] = []  # wall time of the runs trained in this session

    def write() -> None:
        report.write_outputs(cfg, runs, done, result, shared.baseline_seconds, shared.split,
                             time.perf_counter() - t_start)

    # lockstep: the unfinished runs that share a store train together first (one pass of the
    # store for all), each evaluated and saved as it would be alone; the loop below then reads
    # the finished runs back and trains whatever is left one at a time
    handled: set[str] = set()
    states = {run.name: run.folder.state() for run in runs} if cfg.lockstep else {}
    for run in runs:
        if states.get(run.name, "fresh") != "fresh":
            check_run_matches(run)
    together = lockstep_runs([(r, states[r.name]) for r in runs]) if cfg.lockstep else []
    if together:
        shared.ready()
        t_group = time.perf_counter()
        for run, outcome in train_in_lockstep(together, shared.lm, shared.hook, shared.baseline,
                                              progress, log):
            i = runs.index(run) + 1
            handled.add(run.name)
            if isinstance(outcome, TrainingDivergedError):
                log(f"run {i}/{len(runs)}: {run.label} failed: {outcome}")
                failed.append({"run": run.name, "error": str(outcome)})
                stale = True
                continue
            done[run.name] = report.row(run, outcome)
            log(_run_summary(f"run {i}/{len(runs)}: {run.label} (lockstep)", outcome))
            write()
            stale = False
        run_seconds += [(time.perf_counter() - t_group) / len(together)] * len(together)
    for i, run in enumerate(runs, 1):
        if run.name in handled:
            continue
        state = run.folder.state()
        if state != "fresh":
            check_run_matches(run)
        if state == "finished":
            log(f"run {i}/{len(runs)}: {run.label}: finished earlier, reading its metrics")
            done[run.name] = report.row(run, run.folder.read_metrics())
            stale = True
            continue
        note = " (resuming from its checkpoint)" if state == "resume" else ""
        log(f"run {i}/{len(runs)}: {run.label}{note}{_eta(run_seconds, runs[i - 1:], done)}")
        shared.ready()  # the LM and eval context, once (not counted in the run's time)
        t_run = time.perf_counter()
        try:
            metrics = _train_one(run, shared, state, progress, log)
        except TrainingDivergedError as e:
            log(f"run {i}/{len(runs)}: {run.label} failed: {e}")
            failed.append({"run": run.name, "error": str(e)})
            stale = True
            continue
        run_seconds.append(time.perf_counter() - t_run)
        done[run.name] = report.row(run, metrics)
        log(_run_summary(f"run {i}/{len(runs)}: {run.label}", metrics))
        write()
        stale = False
    if stale:
        write()
    return result


def _run_summary(head: str, m: dict[str, float]) -> str:
    """One line after a run: its sweep-table columns and its wall times."""
    parts = [f"{short} {fmt_value(fmt, m.get(key, math.nan))}"
             for _, key, short, fmt in report.columns()[:3] if key in m]
    t = RunFacts.from_metrics(m)
    return (f"{head}: {', '.join(parts)}; train {t.train_seconds or 0:.0f} s, eval "
            f"{t.eval_seconds or 0:.0f} s (LM splices {t.eval_ce_seconds or 0:.0f} s)")


def _eta(run_seconds: list[float], remaining: list[SweepRun], done: dict) -> str:
    """' (about N min left)' from the mean time of the runs trained so far in this session."""
    todo = sum(r.name not in done for r in remaining)
    if not run_seconds or not todo:
        return ""
    left = todo * sum(run_seconds) / len(run_seconds)
    return f" (about {left / 60:.0f} min left)" if left >= 90 else f" (about {left:.0f} s left)"
