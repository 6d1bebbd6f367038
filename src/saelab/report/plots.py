"""Plots written next to a run's metrics (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from saelab.plotting import pyplot


def plot_density(density_F: Tensor, path: Path, title: str = "") -> Path:
    """Histogram of log10 feature density (docs/methods.md §13.2); dead latents collect at −10."""
    plt = pyplot()
    logd = torch.log10(density_F.double() + 1e-10).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(logd, bins=60, range=(-10.5, 0.5), color="#3b6ea8")
    ax.axvline(-2, color="grey", ls=":", lw=1)
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    dead = int((density_F == 0).sum())
    ax.set_title(title or "feature density")
    ax.text(0.02, 0.95, f"dead (never fired): {dead}", transform=ax.transAxes, va="top",
            fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
