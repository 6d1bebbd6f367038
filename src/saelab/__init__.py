"""saelab: sparse dictionary learning on language-model activations.

Python API (the CLI is a thin layer over these)::

    import saelab
    sae = saelab.load_sae("runs/demo")          # ours or a SAELens folder
    out = sae(acts_BD)                           # out.recon, out.latents
    summary = saelab.train(saelab.RunConfig())   # the main job
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from saelab.config import (
    VERSION,
    DataConfig,
    EvalConfig,
    HarvestConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainConfig,
)
from saelab.errors import SaelabError

__version__ = VERSION

__all__ = [
    "DataConfig", "EvalConfig", "HarvestConfig", "ModelConfig", "RunConfig", "SAEConfig",
    "SaelabError", "TrainConfig", "evaluate", "harvest", "load_sae", "train",
]

if TYPE_CHECKING:
    from saelab.saes.base import SAE


def load_sae(path: Any, device: Any = None, dtype: Any = None) -> SAE:
    """Load an SAE folder (ours, or one written by SAELens); a run folder works too."""
    from saelab.io import load_sae as _load  # deferred: `import saelab` must not load torch

    p = Path(path)
    if (p / "run_config.json").exists() and (p / "sae" / "cfg.json").exists():
        p = p / "sae"
    return _load(p, device=device, dtype=dtype)


def train(cfg: RunConfig, progress: bool = True):
    """Harvest (or reuse) activations, train, evaluate and save; returns a RunSummary."""
    from saelab.pipeline import train_run  # deferred: the pipeline pulls in the LM stack

    return train_run(cfg, progress=progress)


def harvest(cfg: HarvestConfig, progress: bool = True):
    """Write activations into an on-disk store; returns the ActivationStore."""
    from saelab.harvest import harvest as _harvest  # deferred: transformers, torch

    return _harvest(cfg, progress=progress)


def evaluate(sae, lm, hook, data: DataConfig | None = None, eval_cfg: EvalConfig | None = None,
             skip_ce: bool = False):
    """Held-out metrics for ``sae`` at ``hook`` of the loaded ``lm``; returns an EvalResult."""
    from saelab.evals.evaluate import evaluate as _evaluate  # deferred: torch, the LM stack

    return _evaluate(sae, lm, hook, data or DataConfig(), eval_cfg or EvalConfig(),
                     skip_ce=skip_ce)
