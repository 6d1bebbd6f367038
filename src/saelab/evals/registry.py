"""Evals as plug-ins, in SAEBench's shape: a typed config, a typed output and ``run``.

An eval module registers itself at import with :func:`register_eval`; :func:`evals` imports
every public module of ``saelab.evals``. Each output dataclass declares its metrics with
:func:`metric` fields, whose metadata say everything the rest of saelab needs: the
``metrics.json`` key (the field name), the summary-table label and number format, a one-line
meaning (for reports), and whether it is a sweep CSV column or a Pareto axis. No metric key
string is repeated elsewhere: the summary table, the sweep CSV and the Pareto plots are built
from :func:`metric_fields`.

``run(ctx, sae, cfg)`` takes an :class:`~saelab.evals.evaluate.EvalContext` (the held-out data
and SAE-independent LM passes, shared by many SAEs) and returns an output instance; its
:func:`metrics_of` is what goes into ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import saelab.evals as _pkg
from saelab.errors import ConfigError
from saelab.plugins import import_plugins

#: metadata key of a metric field
METRIC = "saelab_metric"
#: suffix of the keys of the norm-filtered protocol variant (see ``evals/evaluate.py``)
FILTERED_SUFFIX = "_filtered"


@dataclass(frozen=True)
class MetricInfo:
    """What a metric field means and where it is shown."""

    label: str
    meaning: str
    fmt: str = "{:.4g}"
    #: position in the terminal summary table (lower first); None: not shown
    summary: float | None = None
    #: sweep CSV column name (default: the key) and its position; None: not a column
    column: float | None = None
    column_name: str = ""
    #: short header and number format in the sweep table (default: label, fmt)
    short: str = ""
    short_fmt: str = ""
    #: Pareto plot of a sweep against L0: (file name, y label, higher is better)
    pareto: tuple[str, str, bool] | None = None
    #: the filtered-protocol variant of this metric is also shown in the summary table
    summary_filtered: float | None = None


def metric(label: str, meaning: str, fmt: str = "{:.4g}", *, summary: float | None = None,
           column: float | None = None, column_name: str = "", short: str = "",
           short_fmt: str = "", pareto: tuple[str, str, bool] | None = None,
           summary_filtered: float | None = None) -> Any:
    """A float field of an eval output that is reported as a metric (None: not measured,
    left out of ``metrics.json``)."""
    info = MetricInfo(label, meaning, fmt, summary, column, column_name, short or label,
                      short_fmt or fmt, pareto, summary_filtered)
    return field(default=None, metadata={METRIC: info})


@dataclass(frozen=True)
class Eval:
    """One registered eval.

    ``run(ctx, sae, cfg)`` returns an ``output`` instance. ``needs_lm``: the eval splices the
    SAE into the LM (skipped with ``--skip-ce``).
    """

    name: str
    config: type
    output: type
    run: Callable[[Any, Any, Any], Any]
    help: str
    needs_lm: bool = False
    #: order in which evals run and their metrics are written
    order: int = 0


_REGISTRY: dict[str, Eval] = {}
#: output dataclasses that carry metrics without being an eval (training facts, timings)
_FACTS: list[type] = []


def register_eval(ev: Eval) -> Eval:
    if not (dataclasses.is_dataclass(ev.config) and dataclasses.is_dataclass(ev.output)):
        raise TypeError(f"eval {ev.name!r}: config and output must be dataclasses")
    if ev.name in _REGISTRY and _REGISTRY[ev.name] != ev:
        raise TypeError(f"eval {ev.name!r} registered twice")
    _REGISTRY[ev.name] = ev
    return ev


def register_facts(cls: type) -> type:
    """Register a dataclass of metrics written by the pipeline rather than an eval."""
    if cls not in _FACTS:
        _FACTS.append(cls)
    return cls


def evals() -> dict[str, Eval]:
    """Every registered eval, in run order."""
    import_plugins(_pkg, skip={"registry"})
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_eval(name: str) -> Eval:
    found = evals()
    if name not in found:
        raise ConfigError(f"unknown eval {name!r}: choose from {', '.join(found)}")
    return found[name]


def default_evals() -> list[str]:
    return list(evals())


def parse_evals(text: str | None, skip_ce: bool = False) -> list[str]:
    """``--evals core,ce`` -> ["core", "ce"] in run order; empty/None -> every eval. ``skip_ce``
    drops the evals that splice the SAE into the LM."""
    found = evals()
    names = [n.strip() for n in (text or "").split(",") if n.strip()] or list(found)
    for n in names:
        if n not in found:
            raise ConfigError(f"--evals: unknown eval {n!r}: choose from {', '.join(found)}")
    chosen = [n for n in found if n in names and not (skip_ce and found[n].needs_lm)]
    if not chosen:
        raise ConfigError("--evals with --skip-ce leaves nothing to evaluate: drop --skip-ce "
                          "or add core / density")
    return chosen


# ---- metric fields -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricField:
    key: str
    info: MetricInfo
    owner: type


def _fields_of(cls: type) -> Iterator[MetricField]:
    for f in dataclasses.fields(cls):
        if METRIC in f.metadata:
            yield MetricField(f.name, f.metadata[METRIC], cls)


def metric_fields() -> list[MetricField]:
    """Every metric of every registered eval output and facts dataclass."""
    out = []
    for ev in evals().values():
        out += _fields_of(ev.output)
    for cls in _FACTS:
        out += _fields_of(cls)
    return out


def metrics_of(output: Any) -> dict[str, float]:
    """The ``metrics.json`` entries of an eval output: its metric fields (unmeasured ones, None,
    left out), then those of its ``filtered`` variant (if any) with :data:`FILTERED_SUFFIX`."""
    out: dict[str, float] = {}
    for mf in _fields_of(type(output)):
        v = getattr(output, mf.key)
        if v is not None:
            out[mf.key] = float(v)
    filtered = getattr(output, "filtered", None)
    if filtered is not None:
        out.update({k + FILTERED_SUFFIX: v for k, v in metrics_of(filtered).items()})
    return out


def summary_rows() -> list[tuple[str, str, str]]:
    """(metrics key, label, format) of the terminal summary table, in order."""
    rows = []
    for mf in metric_fields():
        if mf.info.summary is not None:
            rows.append((mf.info.summary, mf.key, mf.info.label, mf.info.fmt))
        if mf.info.summary_filtered is not None:
            rows.append((mf.info.summary_filtered, mf.key + FILTERED_SUFFIX,
                         f"{mf.info.label}, norm-filtered", mf.info.fmt))
    return [r[1:] for r in sorted(rows, key=lambda r: r[0])]


def sweep_columns() -> list[tuple[str, str, str, str]]:
    """(CSV column, metrics key, short header, format) of the sweep CSV/table, in order."""
    cols = [(mf.info.column, mf.info.column_name or mf.key, mf.key, mf.info.short,
             mf.info.short_fmt)
            for mf in metric_fields() if mf.info.column is not None]
    return [c[1:] for c in sorted(cols, key=lambda c: c[0])]


def pareto_axes() -> dict[str, tuple[str, str, bool]]:
    """{file name: (metrics key, y label, higher is better)} of a sweep's Pareto plots."""
    axes = [(mf.info.pareto[0], (mf.key, mf.info.pareto[1], mf.info.pareto[2]), mf.info.column)
            for mf in metric_fields() if mf.info.pareto is not None]
    return {name: ax for name, ax, _ in sorted(axes, key=lambda a: a[2] or 0)}
