"""Plain-text tables for the terminal: one printer (:func:`format_table`) for every table, and
the run summary whose rows come from the eval outputs' metric metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from saelab.evals.registry import summary_rows


def fmt_value(fmt: str, value: Any, missing: str = "-") -> str:
    """``fmt.format(value)`` for a finite number, ``missing`` otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return fmt.format(value)
    return missing


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 left: int = 1, rule: bool = True, indent: str = "") -> str:
    """Columns padded to their widest cell: the first ``left`` columns left-aligned, the rest
    right-aligned; a rule under the header row (``headers`` empty: no header)."""
    n = max([len(headers)] + [len(r) for r in rows])
    widths = [max([len(headers[i]) if i < len(headers) else 0]
                  + [len(r[i]) for r in rows if i < len(r)]) for i in range(n)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i])
                                  for i, c in enumerate(cells)).rstrip()

    lines = []
    if headers:
        head = line(headers)
        lines += [head, "-" * len(head)] if rule else [head]
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def summary_table(metrics: Mapping[str, float], title: str = "") -> str:
    """The headline metrics of one run, one per line, in the order the eval outputs declare."""
    rows = [[label, fmt.format(metrics[key]).rjust(12)] for key, label, fmt in summary_rows()
            if key in metrics]
    body = format_table([], rows, indent="  ")
    return "\n".join(([title] if title else []) + ([body] if rows else []))
