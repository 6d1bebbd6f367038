"""Headless matplotlib for every plot saelab writes (report, analyses, sweeps).

A foundation module so that any layer may draw: matplotlib is imported on first use only, since
the CLI imports every analysis and report module at start-up.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (PNG files, never a display)."""
    import matplotlib  # deferred: heavy, and only needed when a plot is drawn

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt  # deferred: as above, and only after the Agg backend

    return plt
