"""Helpers for bad-input tests: run a CLI case, check it failed cleanly, prove nothing changed.

A clean failure is exit code 2, exactly one ``error:`` line on stderr and no traceback;
:func:`snapshot_tree` before and after proves every pre-existing file is byte-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from saelab.cli import main


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_cli_case(argv: list[str], subprocess_run: bool = False, env: dict | None = None,
                 timeout: float = 300) -> CliResult:
    """``saelab ARGV`` in this process (``saelab.cli.main``) or, with ``subprocess_run``, as
    ``python -m saelab ARGV`` (environment ``env`` on top of this one's)."""
    if subprocess_run:
        p = subprocess.run([sys.executable, "-m", "saelab", *argv], capture_output=True,
                           text=True, env={**os.environ, **(env or {})}, timeout=timeout)
        return CliResult(p.returncode, p.stdout, p.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_clean_failure(result: CliResult, *fragments: str) -> str:
    """Exit 2, one ``error:`` line holding every fragment, no traceback. Returns the line."""
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def snapshot_tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a root may be a file), keyed by path; folders are
    listed too (value "dir") so a removed or added folder shows up."""
    snap: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            snap[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            snap[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    """Every file of ``before`` is still there with the same bytes (new files are allowed)."""
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed}"
