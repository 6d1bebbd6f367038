"""`saelab sweep`: SAE families x sparsity levels, trained and evaluated the same way.

Every run is an ordinary run folder ``OUT/runs/<family>-<param>-<level>/`` made by the pipeline
(:func:`saelab.pipeline.train_run`) with the same model, store, seed, token budget, batch size,
width and evaluation. What does not depend on the SAE is done once per sweep: one LM load, one
store (harvested or reused by the pipeline's cache; families that need LM gradients get the
store the pipeline picks for them), one :class:`~saelab.evals.evaluate.EvalBaseline` (held-out
activations, clean / zero- / mean-ablation CE and clean log-probabilities).

Resumable: a run folder with ``metrics.json`` is finished and read back; one with a checkpoint
resumes from it; anything else restarts. ``sweep.csv``, ``sweep.json`` and the Pareto plots are
rewritten after every finished run. ``OUT/sweep_config.json`` records the settings every run
shares; a rerun with other shared settings is refused unless ``overwrite``. Changing only
``--arch`` / ``--levels`` extends (or narrows) the sweep and keeps the finished runs.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from saelab.config import (
    PipelineConfig,
    RunConfig,
    SAEConfig,
    SweepConfig,
    from_dict,
    set_dotted,
)
from saelab.errors import ConfigError, RunFolderError
from saelab.fsutil import atomic_write_bytes, atomic_write_json

SWEEP_CONFIG = "sweep_config.json"
RUNS = "runs"

#: (CSV column, metrics.json key, table header, table format)
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("l0", "l0", "L0", "{:.1f}"),
    ("fvu", "fvu", "FVU", "{:.4f}"),
    ("ce_loss_recovered", "ce_loss_recovered", "CE rec", "{:.2%}"),
    ("ce_loss_recovered_mean_ablation", "ce_loss_recovered_mean_ablation", "CE rec (mean)",
     "{:.2%}"),
    ("delta_lm_loss", "delta_lm_loss", "dLM", "{:.4f}"),
    ("kl_score", "kl_score", "KL score", "{:.4f}"),
    ("gamma", "relative_reconstruction_bias", "gamma", "{:.3f}"),
    ("dead_fraction", "dead_fraction", "dead", "{:.1%}"),
    ("dense_fraction_1pct", "dense_fraction_1pct", "dense>1%", "{:.1%}"),
    ("train_tokens_per_second", "train_tokens_per_second", "train tok/s", "{:,.0f}"),
    ("seconds", "", "seconds", "{:.0f}"),
)


@dataclass
class SweepRun:
    """One point of the grid: a family at one level of its sparsity knob."""

    family: str
    param: str  # dotted SAEConfig path (the family's sweep_param)
    level: float | int
    cfg: RunConfig

    @property
    def name(self) -> str:
        return f"{self.family}-{self.param.split('.')[-1]}-{_fmt_level(self.level)}"

    @property
    def label(self) -> str:
        return f"{self.family} {self.param.split('.')[-1]}={_fmt_level(self.level)}"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]  # finished runs, in grid order (CSV columns + "metrics")
    failed: list[dict[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.rows)


def _fmt_level(v: float | int) -> str:
    return format(v, "g")


# ---- the grid -----------------------------------------------------------------------------------
def _field_type(root: type, dotted: str) -> type:
    """The scalar type of the (nested) dataclass field at ``dotted``."""
    cls: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"sweep parameter {dotted!r} is not a field of {root.__name__}")
        hint = hints[part]
        if i < len(parts) - 1:
            if not is_dataclass(hint):
                raise ConfigError(f"sweep parameter {dotted!r}: {part} is not an option group")
            cls = hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def plan_runs(cfg: SweepConfig) -> list[SweepRun]:
    """Every (family, level) run of ``cfg`` with its full, validated RunConfig."""
    from saelab.saes.registry import get_family

    explicit = cfg.archs.strip() != "all"
    overrides = cfg.level_overrides()
    runs = []
    for family in cfg.arch_list():
        cls = get_family(family)
        levels = overrides.get(family, list(cls.sweep_levels))
        if not levels:
            if explicit:
                raise ConfigError(f"{family} declares no default sweep levels: give them with "
                                  f"--levels {family}=V1,V2,...")
            continue
        for value in levels:
            sae = copy.deepcopy(cfg.sae)
            sae.architecture = family
            if _field_type(SAEConfig, cls.sweep_param) is float:
                value = float(value)  # a None default (family's choice) is a float knob
            level = set_dotted(sae, cls.sweep_param, value)
            # every setting train and sweep share, with this run's SAE and the sweep's rows
            shared = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(PipelineConfig)}
            run = SweepRun(family, cls.sweep_param, level, RunConfig(
                **{**shared, "sae": sae, "out": "", "harvest_tokens": cfg.harvest_rows()}))
            run.cfg.out = str(Path(cfg.out) / RUNS / run.name)
            try:
                run.cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"run {run.label}: {e}") from None
            runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("--levels repeats a value: every run needs its own level")
    if not runs:
        raise ConfigError("nothing to sweep: no family in --arch has sweep levels")
    return runs


# ---- settings checks ----------------------------------------------------------------------------
def _comparable(d: dict) -> dict:
    """A run's or sweep's settings without what may change between invocations."""
    d = copy.deepcopy(d)
    for key in ("out", "resume", "overwrite", "archs", "levels"):
        d.pop(key, None)
    d.get("model", {}).pop("device", None)
    d.get("train", {}).pop("wandb_project", None)
    if d.get("store"):
        d["store"] = str(Path(d["store"]).expanduser().resolve())
    return d


def _prepare_out(cfg: SweepConfig) -> None:
    """Create OUT, or check that it holds a sweep with the same shared settings."""
    out = Path(cfg.out)
    settings = _comparable(asdict(cfg))
    marker = out / SWEEP_CONFIG
    if marker.exists():
        saved = json.loads(marker.read_text()).get("settings")
        if cfg.overwrite:
            _clear_sweep(out)
        elif diff := _diff_keys(saved or {}, settings):
            raise RunFolderError(
                f"{out} holds a sweep made with other settings "
                f"({', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''}): pass "
                f"--overwrite to replace it, or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise RunFolderError(f"{out} is not empty and holds no saelab sweep: choose another "
                             "--out (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"settings": settings})


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys only one side has are options added or removed by
    another saelab version: they are not counted (as from_dict fills them with defaults)."""
    keys = []
    for k in sorted(set(a) & set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _clear_sweep(out: Path) -> None:
    """Remove what a sweep writes (and only that)."""
    shutil.rmtree(out / RUNS, ignore_errors=True)
    for name in (SWEEP_CONFIG, "sweep.csv", "sweep.json", *PLOT_FILES):
        (out / name).unlink(missing_ok=True)


def _check_run_matches(run: SweepRun) -> None:
    from saelab.pipeline import RUN_CONFIG

    saved = json.loads((run.run_dir / RUN_CONFIG).read_text())
    mine = _comparable(asdict(run.cfg))
    theirs = _comparable(asdict(from_dict(RunConfig, saved)))
    if diff := _diff_keys(theirs, mine):
        raise RunFolderError(
            f"{run.run_dir} holds a run made with other settings ({', '.join(diff[:4])}): "
            "pass --overwrite to replace the sweep, or choose another --out")


# ---- running ------------------------------------------------------------------------------------
class _Shared:
    """The LM, hook and evaluation baseline, loaded on first need (a sweep whose runs are all
    finished never loads the model)."""

    def __init__(self, cfg: SweepConfig, progress: bool, log: Callable[[str], None]):
        self.cfg, self.progress, self.log = cfg, progress, log
        self.lm = self.hook = self.baseline = None
        self.baseline_seconds = 0.0

    def ready(self) -> _Shared:
        if self.lm is None:
            from saelab.evals.evaluate import EvalBaseline
            from saelab.models.hooks import parse_hook
            from saelab.models.loading import load_model
            from saelab.runtime import tune_malloc

            tune_malloc()
            self.lm = load_model(self.cfg.model)
            self.hook = parse_hook(self.cfg.model.hook, self.lm.n_layers)
            t0 = time.perf_counter()
            self.baseline = EvalBaseline.build(self.lm, self.hook, self.cfg.data, self.cfg.eval,
                                               skip_ce=self.cfg.skip_ce, progress=self.progress)
            self.baseline_seconds = time.perf_counter() - t0
            self.log(f"eval baseline (held-out activations, clean/ablated CE): "
                     f"{self.baseline_seconds:.1f} s, shared by every run")
        return self


def _state(run: SweepRun) -> str:
    """finished | resume | fresh."""
    from saelab.pipeline import RUN_CONFIG
    from saelab.train.checkpoint import checkpoint_dir

    d = run.run_dir
    if (d / "metrics.json").exists() and (d / RUN_CONFIG).exists():
        return "finished"
    ckpt = checkpoint_dir(d)
    has_ckpt = any((c / "state.json").exists() for c in (ckpt, ckpt.with_name(ckpt.name + ".old")))
    if (d / RUN_CONFIG).exists() and has_ckpt:
        return "resume"
    return "fresh"


def _train_one(run: SweepRun, shared: _Shared, state: str, progress: bool,
               log: Callable[[str], None]) -> dict[str, float]:
    """Train and evaluate one run through the pipeline; returns its metrics."""
    from saelab.pipeline import resolve_store, train_run

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


def _row(run: SweepRun, metrics: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"family": run.family, "param": run.param, "level": run.level,
                           "run": f"{RUNS}/{run.name}"}
    for col, key, _, _ in COLUMNS:
        if col == "seconds":
            row[col] = metrics.get("train_seconds", math.nan) + metrics.get("eval_seconds", 0.0)
        else:
            row[col] = metrics.get(key, math.nan)
    row["metrics"] = metrics
    return row


def run_sweep(cfg: SweepConfig, progress: bool = True,
              log: Callable[[str], None] = print) -> SweepResult:
    """Train and evaluate every run of ``cfg`` not already finished in ``cfg.out``."""
    from saelab.train.trainer import TrainingDivergedError

    cfg.validate()
    runs = _runs_the_store_can_serve(cfg, plan_runs(cfg), log)
    _prepare_out(cfg)
    out = Path(cfg.out)
    shared = _Shared(cfg, progress, log)
    done: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, str]] = []
    result = SweepResult(out, [], failed)
    t_start = time.perf_counter()
    stale = True  # outputs not yet written for the current set of finished runs
    run_seconds: list[float] = []  # wall time of the runs trained in this session
    for i, run in enumerate(runs, 1):
        state = _state(run)
        if state != "fresh":
            _check_run_matches(run)
        if state == "finished":
            log(f"run {i}/{len(runs)}: {run.label}: finished earlier, reading its metrics")
            done[run.name] = _row(run, json.loads((run.run_dir / "metrics.json").read_text()))
            stale = True
            continue
        note = " (resuming from its checkpoint)" if state == "resume" else ""
        log(f"run {i}/{len(runs)}: {run.label}{note}{_eta(run_seconds, runs[i - 1:], done)}")
        shared.ready()  # the LM and eval baseline, once (not counted in the run's time)
        t_run = time.perf_counter()
        try:
            metrics = _train_one(run, shared, state, progress, log)
        except TrainingDivergedError as e:
            log(f"run {i}/{len(runs)}: {run.label} failed: {e}")
            failed.append({"run": run.name, "error": str(e)})
            stale = True
            continue
        run_seconds.append(time.perf_counter() - t_run)
        done[run.name] = _row(run, metrics)
        log(_run_summary(f"run {i}/{len(runs)}: {run.label}", metrics))
        _write_outputs(cfg, runs, done, result, shared, time.perf_counter() - t_start)
        stale = False
    if stale:
        _write_outputs(cfg, runs, done, result, shared, time.perf_counter() - t_start)
    return result


def _run_summary(head: str, m: dict[str, float]) -> str:
    parts = [f"L0 {m.get('l0', math.nan):.1f}", f"FVU {m.get('fvu', math.nan):.3f}"]
    if "ce_loss_recovered" in m:
        parts.append(f"CE rec {m['ce_loss_recovered']:.1%}")
    train, ev, ce = (m.get(k, 0.0) for k in ("train_seconds", "eval_seconds", "eval_ce_seconds"))
    return (f"{head}: {', '.join(parts)}; train {train:.0f} s, eval {ev:.0f} s "
            f"(LM splices {ce:.0f} s)")


def _eta(run_seconds: list[float], remaining: list[SweepRun], done: dict) -> str:
    """' (about N min left)' from the mean time of the runs trained so far in this session."""
    todo = sum(r.name not in done for r in remaining)
    if not run_seconds or not todo:
        return ""
    left = todo * sum(run_seconds) / len(run_seconds)
    return f" (about {left / 60:.0f} min left)" if left >= 90 else f" (about {left:.0f} s left)"


def _runs_the_store_can_serve(cfg: SweepConfig, runs: list[SweepRun],
                              log: Callable[[str], None]) -> list[SweepRun]:
    """With --store: families that train on LM-loss gradients need a store that has them.
    Named explicitly they are an error (before anything is trained); under 'all' they are left
    out with a note. Without --store the pipeline harvests a store with gradients for them."""
    from saelab.data.store import ActivationStore
    from saelab.saes.registry import get_family

    needs = [r for r in runs if get_family(r.family).uses_lm_grads]
    if not cfg.store or not needs or ActivationStore.open(cfg.store).has_grads:
        return runs
    families = ", ".join(dict.fromkeys(r.family for r in needs))
    if cfg.archs.strip() != "all":
        raise ConfigError(f"{families} train(s) on LM-loss gradients but --store {cfg.store} has "
                          "none: drop them from --arch, or give a store harvested with "
                          "--with-grads")
    log(f"note: leaving out {families}: --store {cfg.store} has no LM-loss gradients "
        "(harvest one with --with-grads)")
    skip = {r.name for r in needs}
    return [r for r in runs if r.name not in skip]


# ---- outputs ------------------------------------------------------------------------------------
PLOT_FILES = ("pareto_fvu.png", "pareto_ce.png", "pareto_delta_lm.png")


def _write_outputs(cfg: SweepConfig, runs: list[SweepRun], done: dict[str, dict[str, Any]],
                   result: SweepResult, shared: _Shared, seconds: float) -> None:
    from saelab.report.pareto import write_pareto_plots

    out = Path(cfg.out)
    rows = [done[r.name] for r in runs if r.name in done]
    result.rows = rows
    atomic_write_bytes(out / "sweep.csv", to_csv(rows).encode())
    atomic_write_json(out / "sweep.json", _json_safe({
        "settings": _comparable(asdict(cfg)),
        "families": {f: [r.level for r in runs if r.family == f]
                     for f in dict.fromkeys(r.family for r in runs)},
        "runs": rows,
        "pending": [r.name for r in runs if r.name not in done],
        "failed": result.failed,
        "eval_baseline_seconds": shared.baseline_seconds,
        # activations (held-out truncated forwards) and ce (clean/zero/mean LM forwards)
        "eval_baseline_split": shared.baseline.seconds if shared.baseline is not None else {},
        "session_seconds": seconds,
    }))
    title = (f"{cfg.model.model} · {cfg.model.hook} · d_sae {cfg.sae.d_sae} · "
             f"{cfg.train.tokens:,} tokens/run")
    result.files = [out / "sweep.csv", out / "sweep.json",
                    *write_pareto_plots(rows, out, title=title)]


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null: strict JSON readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def csv_columns() -> list[str]:
    return ["family", "param", "level", "run", *(c for c, _, _, _ in COLUMNS)]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in row.items()})
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per run: family, level and the headline metrics."""
    headers = ["run", *(h for _, _, h, _ in COLUMNS)]
    body = []
    for row in rows:
        cells = [f"{row['family']} {row['param'].split('.')[-1]}={_fmt_level(row['level'])}"]
        for col, _, _, fmt in COLUMNS:
            v = row.get(col, math.nan)
            cells.append(fmt.format(v) if isinstance(v, int | float) and math.isfinite(v)
                         else "-")
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                     for i, h in enumerate(headers))
    lines = [line, "-" * len(line)]
    for cells in body:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(cells)))
    return "\n".join(lines)
