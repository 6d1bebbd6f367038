"""`density` eval: how often each latent fires on held-out tokens (docs/methods.md §13.2)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saelab.evals.registry import Eval, metric, register_eval

#: feature-density thresholds of the dense fractions
DENSE_1PCT, DENSE_10PCT = 0.01, 0.10


@dataclass
class DensityEvalConfig:
    """Settings of the `density` eval (none yet: it reads the shared held-out activations)."""


@dataclass
class DensityOutput:
    """Dead and dense latents, and each latent's firing frequency."""

    dead_fraction: float = metric(
        "dead latents (eval)", "Fraction of latents that never fire on the held-out tokens.",
        "{:.2%}", summary=110, column=80, short="dead",
        short_fmt="{:.1%}")
    dense_fraction_1pct: float = metric(
        "dense latents (>1% tokens)", "Fraction of latents that fire on more than 1% of "
        "held-out tokens.", "{:.2%}", summary=120, column=90, short="dense>1%",
        short_fmt="{:.1%}")
    dense_fraction_10pct: float = metric(
        "dense latents (>10% tokens)", "Fraction of latents that fire on more than 10% of "
        "held-out tokens.", "{:.2%}")
    #: [d_sae] fraction of held-out tokens on which each latent is nonzero (not a metric)
    density_F: Tensor | None = None


def run(ctx, sae, cfg: DensityEvalConfig) -> DensityOutput:
    density_F = ctx.reconstruction(sae).feature_density()
    return DensityOutput(dead_fraction=(density_F == 0).double().mean().item(),
                         dense_fraction_1pct=(density_F > DENSE_1PCT).double().mean().item(),
                         dense_fraction_10pct=(density_F > DENSE_10PCT).double().mean().item(),
                         density_F=density_F.float().cpu())


DENSITY = register_eval(Eval("density", DensityEvalConfig, DensityOutput, run,
                             help="feature density: dead and dense latents", order=30))
