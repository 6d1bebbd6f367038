"""`saelab report`: the run and sweep pages, read back from the written HTML."""

from __future__ import annotations

import base64
import json
import re

import pytest

from saelab.cli import main
from saelab.report.run_report import REPORT_HTML, metric_meanings, write_report


def _run(tmp_path, with_dashboard=False):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(
        {"model": {"model": "embedded", "hook": "blocks.3.hook_resid_post"},
         "sae": {"architecture": "topk", "d_sae": 128}, "train": {"tokens": 5000, "lr": 3e-4}}))
    (run / "metrics.json").write_text(json.dumps({"fvu": 0.123456, "l0": 32.0}))
    lines = [json.dumps({"step": s, "tokens": 1024 * s, "loss": 5.0 / s, "l0": 32.0,
                         "fvu": 0.5 / s, "dead_fraction": 0.0}) for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "tok')  # torn tail
    if with_dashboard:
        (run / "dashboard").mkdir()
        (run / "dashboard" / "dashboard.html").write_text("x")
    return run


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)',
                                                    text)]


def test_run_report(tmp_path):
    run = _run(tmp_path)
    out = write_report(run)
    assert out == run / REPORT_HTML
    text = out.read_text()
    label, meaning = metric_meanings()["fvu"]
    assert label in text and meaning.split()[0] in text
    assert "0.1235" in text  # metric formatted to 4 significant digits
    assert "train.lr" in text and "0.0003" in text  # flattened configuration
    pngs = _pngs(text)
    assert len(pngs) == 1 and pngs[0][:8] == b"\x89PNG\r\n\x1a\n"  # curves; no density png
    assert "dashboard-link" not in text and "saelab dashboard" in text
    assert "https://" not in text and "<script src" not in text  # self-contained


def test_run_report_links_dashboard(tmp_path):
    text = write_report(_run(tmp_path, with_dashboard=True)).read_text()
    assert 'href="dashboard/dashboard.html"' in text


def test_sweep_report(tmp_path):
    from saelab.report.pareto import plot_pareto

    rows = [{"family": "topk", "param": "topk.k", "level": lvl, "run": f"runs/topk-k{lvl}",
             "metrics": {"l0": float(lvl), "fvu": 1 / lvl}} for lvl in (8, 16, 32)]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": rows}))
    plot_pareto(rows and [{"family": r["family"], "level": r["level"], **r["metrics"]}
                          for r in rows], "fvu", tmp_path / "pareto_fvu.png", "FVU")
    (tmp_path / "runs" / "topk-k16").mkdir(parents=True)
    (tmp_path / "runs" / "topk-k16" / REPORT_HTML).write_text("x")
    text = write_report(tmp_path).read_text()
    assert text.count("<tr>") == 1 + 3  # header + one row per run
    assert 'href="runs/topk-k16/report.html"' in text and 'href="runs/topk-k8/"' in text
    assert len(_pngs(text)) == 1


def test_cli_report(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert str(run / REPORT_HTML) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["dashboard", "RUN", "--latents", "5-2"],
                                  ["steer", "RUN", "--prompt", "hi"]])
def test_cli_view_verbs_reject_bad_input(tmp_path, capsys, argv):
    run = _run(tmp_path)
    (run / "sae").mkdir()
    argv = [str(run) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
