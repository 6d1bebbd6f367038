"""`saelab report RUN|SWEEP_DIR`: one self-contained ``report.html`` beside a run or a sweep.

A run's report: its configuration, the held-out metrics with one line on what each means,
training curves from ``metrics.jsonl`` (loss, L0, FVU, dead fraction against tokens), the
density histogram and a link to the run's dashboard (``RUN/dashboard/dashboard.html``) when it
has one. A sweep's report: the table of runs, the Pareto plots and a link per run. Images are
embedded as data URIs, so the file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from saelab.errors import RunFolderError
from saelab.evals.registry import FILTERED_SUFFIX, metric_fields
from saelab.fsutil import atomic_write_bytes
from saelab.plotting import pyplot
from saelab.report.html import page

REPORT_HTML = "report.html"


def metric_meanings() -> dict[str, tuple[str, str]]:
    """key -> (label, meaning), from the eval plug-ins' metric metadata (their ``_filtered``
    variants included)."""
    out: dict[str, tuple[str, str]] = {}
    for mf in metric_fields():
        out[mf.key] = (mf.info.label, mf.info.meaning)
        out[mf.key + FILTERED_SUFFIX] = (
            f"{mf.info.label}, norm-filtered",
            f"{mf.info.meaning} Filtered variant: the training-time exclusions (leading "
            "positions, norm outliers) are left clean and unscored.")
    return out


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def training_curves(records: list[dict]) -> str | None:
    """A 2x2 PNG (data URI): loss, L0, FVU and dead fraction against training tokens."""
    recs = [r for r in records if "tokens" in r]
    if not recs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.6), dpi=100)
    for ax, (key, label, log) in zip(axes.flat, (
            ("loss", "training loss", True), ("l0", "L0 (active latents / token)", True),
            ("fvu", "FVU (training batch)", True), ("dead_fraction", "dead fraction", False)),
            strict=True):
        pts = [(r["tokens"], r[key]) for r in recs
               if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, lw=1.3, color="#2f5fa7")
            if log and min(ys) > 0:
                # deferred: matplotlib is heavy (the CLI imports this module at start-up)
                from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

                ax.set_yscale("log")
                # plain numbers at 1, 2, 5 x 10^n (the default labels only decades, or none)
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training tokens", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.25)
    fig.tight_layout()
    uri = _png_uri(fig)
    plt.close(fig)
    return uri


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}.")
        return out
    return [(prefix[:-1], d)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


_REPORT_CSS = """
.wrap { max-width: 1050px; margin: 0 auto; padding: 10px 22px 40px; }
.wrap table { width: auto; margin-bottom: 8px; } .wrap td { font-size: 13px; }
.wrap img { max-width: 100%; border: 1px solid var(--line); }
.metrics td:nth-child(2) { text-align: right; font-variant-numeric: tabular-nums; }
.metrics td:nth-child(3) { color: var(--muted); }
.cfg td:first-child { font-family: ui-monospace, Menlo, monospace; font-size: 12px; }
.links a { margin-right: 14px; }
"""


def _wrap(title: str, sub: str, body: str) -> str:
    return page(title, f"<style>{_REPORT_CSS}</style><header><h1>{html.escape(title)}</h1>"
                       f"<div class=\"meta\">{sub}</div></header><div class=\"wrap\">{body}</div>")


def run_report(run: Path) -> str:
    """The HTML of one run's report."""
    cfg = json.loads((run / "run_config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() \
        else {}
    records = []
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line of an interrupted run
    sae = cfg.get("sae", {})
    model = cfg.get("model", {})
    sub = html.escape(f"{sae.get('architecture', '?')} SAE · d_sae {sae.get('d_sae', '?')} · "
                      f"{model.get('model', '?')} · {model.get('hook', '?')} · {run}")
    parts = []
    dash = run / "dashboard" / "dashboard.html"
    links = ['<a href="dashboard/dashboard.html" id="dashboard-link">feature dashboard</a>'
             if dash.exists() else
             f'<span class="note">no dashboard yet: <code>saelab dashboard {html.escape(str(run))}'
             f' --out {html.escape(str(run / "dashboard"))}</code></span>']
    parts.append(f'<p class="links">{"".join(links)}</p>')
    meanings = metric_meanings()
    if metrics:
        rows = []
        shown = [k for k in meanings if k in metrics] + [k for k in metrics if k not in meanings]
        for k in shown:
            label, meaning = meanings.get(k, (k, ""))
            rows.append([html.escape(label), _fmt(metrics[k]), html.escape(meaning)])
        parts.append("<h3>Held-out metrics</h3>" + _table(["metric", "value", "what it means"],
                                                          rows, "metrics"))
    else:
        parts.append('<p class="empty">no metrics.json: the run has not been evaluated</p>')
    curves = training_curves(records)
    parts.append("<h3>Training curves</h3>" + (f'<img id="curves" src="{curves}" '
                                               'alt="training curves">' if curves else
                                               '<p class="empty">no metrics.jsonl</p>'))
    if (run / "feature_density.png").exists():
        parts.append('<h3>Feature density</h3><img id="density" src="'
                     f'{_file_uri(run / "feature_density.png")}" alt="feature density">')
    cfg_rows = [[html.escape(k), html.escape(_fmt(v))] for k, v in _flatten(cfg)]
    parts.append("<h3>Configuration</h3>" + _table(["setting", "value"], cfg_rows, "cfg"))
    return _wrap("saelab run report", sub, "".join(parts))


def sweep_report(sweep: Path) -> str:
    """The HTML of a sweep's report: table, Pareto plots, a link per run."""
    data = json.loads((sweep / "sweep.json").read_text())
    rows = data.get("runs", [])
    meanings = metric_meanings()
    keys = [k for k in ("l0", "fvu", "ce_loss_recovered", "delta_lm_loss", "kl_score",
                        "dead_fraction") if any(k in r.get("metrics", r) for r in rows)]
    head = ["run", "family", "level", *(meanings.get(k, (k, ""))[0] for k in keys), "report"]
    body = []
    for r in rows:
        m = r.get("metrics", r)
        rd = sweep / str(r.get("run", ""))
        name = html.escape(str(r.get("run", "")))
        link = (f'<a href="{name}/{REPORT_HTML}">report</a>' if (rd / REPORT_HTML).exists()
                else f'<a href="{name}/">folder</a>')
        body.append([name, html.escape(str(r.get("family", ""))), _fmt(r.get("level", "")),
                     *(_fmt(m.get(k, math.nan)) for k in keys), link])
    parts = ["<h3>Runs</h3>" + _table(head, body, "metrics")]
    pngs = sorted(sweep.glob("pareto_*.png"))
    if pngs:
        parts.append("<h3>Pareto plots</h3>" + "".join(
            f'<p><img class="pareto" src="{_file_uri(p)}" alt="{p.name}"></p>' for p in pngs))
    if data.get("failed"):
        parts.append(f"<h3>Failed</h3><pre>{html.escape(json.dumps(data['failed'], indent=1))}"
                     "</pre>")
    sub = html.escape(f"{len(rows)} runs · {sweep}")
    return _wrap("saelab sweep report", sub, "".join(parts))


def write_report(path: str | Path) -> Path:
    """Write ``report.html`` into a run folder or a sweep folder; returns its path."""
    path = Path(path)
    if (path / "sweep.json").exists():
        text = sweep_report(path)
    elif (path / "run_config.json").exists():
        text = run_report(path)
    else:
        raise RunFolderError(f"{path} is neither a run folder (run_config.json) nor a sweep "
                             f"folder (sweep.json): pass a folder written by `saelab train` or "
                             f"`saelab sweep`")
    out = path / REPORT_HTML
    atomic_write_bytes(out, text.encode())
    return out
