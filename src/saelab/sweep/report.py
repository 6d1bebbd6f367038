"""Sweep reporting: ``sweep.csv``, ``sweep.json``, the terminal table and the Pareto plots.

Columns and plot axes come from the eval outputs' metric metadata
(:func:`saelab.evals.registry.sweep_columns`, :func:`~saelab.evals.registry.pareto_axes`);
``seconds`` (training + evaluation wall time) is the one column of the sweep's own.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from saelab.evals.facts import RunFacts
from saelab.evals.registry import pareto_axes, sweep_columns
from saelab.fsutil import atomic_write_bytes, atomic_write_json, json_safe
from saelab.report.pareto import write_pareto_plots
from saelab.report.table import fmt_value
from saelab.report.table import format_table as table
from saelab.sweep.plan import RUNS, SweepRun, comparable, fmt_level

#: the sweep's own column: training + evaluation wall time of a run
SECONDS = ("seconds", "seconds", "{:.0f}")


def columns() -> list[tuple[str, str, str, str]]:
    """(CSV column, metrics key, table header, table format), metric columns then seconds."""
    return [*sweep_columns(), (SECONDS[0], "", SECONDS[1], SECONDS[2])]


def plot_files() -> tuple[str, ...]:
    return tuple(pareto_axes())


def outputs() -> tuple[str, ...]:
    """Every file a sweep writes in its folder (besides ``runs/`` and its config)."""
    return ("sweep.csv", "sweep.json", *plot_files())


def row(run: SweepRun, metrics: dict[str, float]) -> dict[str, Any]:
    """One run's CSV row (plus its whole ``metrics`` dict)."""
    out: dict[str, Any] = {"family": run.family, "param": run.param, "level": run.level,
                           "run": f"{RUNS}/{run.name}"}
    for col, key, _, _ in columns():
        if col == SECONDS[0]:
            out[col] = RunFacts.wall_seconds(metrics)
        else:
            out[col] = metrics.get(key, math.nan)
    out["metrics"] = metrics
    return out


def csv_columns() -> list[str]:
    return ["family", "param", "level", "run", *(c for c, _, _, _ in columns())]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()})
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per run: family, level and the headline metrics."""
    cols = columns()
    body = [[f"{r['family']} {r['param'].split('.')[-1]}={fmt_level(r['level'])}",
             *(fmt_value(fmt, r.get(col, math.nan)) for col, _, _, fmt in cols)] for r in rows]
    return table(["run", *(h for _, _, h, _ in cols)], body)


def write_outputs(cfg, runs: list[SweepRun], done: dict[str, dict[str, Any]], result,
                  baseline_seconds: float, baseline_split: dict[str, float],
                  seconds: float) -> None:
    """Rewrite ``sweep.csv``, ``sweep.json`` and the Pareto plots for the finished runs."""
    out = Path(cfg.out)
    rows = [done[r.name] for r in runs if r.name in done]
    result.rows = rows
    atomic_write_bytes(out / "sweep.csv", to_csv(rows).encode())
    atomic_write_json(out / "sweep.json", json_safe({
        "settings": comparable(asdict(cfg)),
        "families": {f: [r.level for r in runs if r.family == f]
                     for f in dict.fromkeys(r.family for r in runs)},
        "runs": rows,
        "pending": [r.name for r in runs if r.name not in done],
        "failed": result.failed,
        "eval_baseline_seconds": baseline_seconds,
        # activations (held-out truncated forwards) and ce (clean/zero/mean LM forwards)
        "eval_baseline_split": baseline_split,
        "session_seconds": seconds,
    }))
    title = (f"{cfg.model.model} · {cfg.model.hook} · d_sae {cfg.sae.d_sae} · "
             f"{cfg.train.tokens:,} tokens/run")
    result.files = [out / "sweep.csv", out / "sweep.json",
                    *write_pareto_plots(rows, out, title=title)]
