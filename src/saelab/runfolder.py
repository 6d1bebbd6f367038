"""A run folder: what `saelab train` writes and `saelab eval` / `saelab sweep` read back.

Layout (format 1, unchanged)::

    run_config.json     the RunConfig the run was made with (written before training)
    checkpoint/         the last training checkpoint (checkpoint.old/ while one is replaced)
    metrics.jsonl       training log, one JSON object per logged step
    sae/                the final SAE in SAELens format (cfg.json, weights, sparsity)
    metrics.json        held-out metrics; written last: a run with it is finished
    feature_density.png

:class:`RunFolder` names these paths once and holds the small helpers pipeline, sweep and eval
share (state, config, metrics, lock).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saelab.errors import RunFolderError
from saelab.fsutil import atomic_write_json, json_safe

RUN_CONFIG = "run_config.json"
SAE_DIR = "sae"
METRICS = "metrics.json"
LOG = "metrics.jsonl"
DENSITY_PLOT = "feature_density.png"
SAEBENCH_CORE = "saebench_core.json"


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ---- paths -----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def sae_dir(self) -> Path:
        return self.path / SAE_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def density_plot(self) -> Path:
        return self.path / DENSITY_PLOT

    @property
    def saebench_core_path(self) -> Path:
        return self.path / SAEBENCH_CORE

    @property
    def checkpoint_dir(self) -> Path:
        from saelab.train.checkpoint import checkpoint_dir

        return checkpoint_dir(self.path)

    # ---- state -----------------------------------------------------------------------------
    def is_run(self) -> bool:
        """The folder holds a saelab run (its config was written)."""
        return self.config_path.exists()

    def is_finished(self) -> bool:
        """Training and evaluation finished (``metrics.json`` is written last)."""
        return self.is_run() and self.metrics_path.exists()

    def has_sae(self) -> bool:
        return (self.sae_dir / "cfg.json").exists()

    def _checkpoint_states(self) -> list[Path]:
        ckpt = self.checkpoint_dir
        return [c / "state.json" for c in (ckpt, ckpt.with_name(ckpt.name + ".old"))
                if (c / "state.json").exists()]

    def has_checkpoint(self) -> bool:
        return bool(self._checkpoint_states())

    def step(self) -> int | None:
        """The step of the newest readable checkpoint, or None without one."""
        for state in self._checkpoint_states():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                return int(json.loads(state.read_text())["step"])
        return None

    def state(self) -> str:
        """``finished`` | ``resume`` (config and a checkpoint) | ``fresh``."""
        if self.is_finished():
            return "finished"
        if self.is_run() and self.has_checkpoint():
            return "resume"
        return "fresh"

    # ---- config ----------------------------------------------------------------------------
    def read_config_dict(self) -> dict[str, Any]:
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{self.config_path} cannot be read ({e}): the run folder is "
                                 "damaged; train it again with --overwrite") from None

    def load_config(self):
        """The run's RunConfig (old and new saved formats)."""
        from saelab.config import RunConfig

        return _config_from_dict(RunConfig, self.read_config_dict())

    def save_config(self, cfg: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, asdict(cfg))

    # ---- metrics ---------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, float]:
        """``metrics.json`` (empty when absent)."""
        if not self.metrics_path.exists():
            return {}
        return json.loads(self.metrics_path.read_text())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` atomically (NaN stays NaN, as format-1 readers expect)."""
        atomic_write_json(self.metrics_path, metrics)

    def write_json(self, name: str, obj: Any) -> Path:
        """A strict-JSON artefact (NaN/inf as null) in the folder."""
        atomic_write_json(self.path / name, json_safe(obj))
        return self.path / name

    def last_logged(self, key: str, default: float) -> float:
        """The last value of ``key`` in the training log."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        for line in reversed(lines):
            if line.strip() and key in (rec := json.loads(line)):
                return float(rec[key])
        return default

    # ---- creation --------------------------------------------------------------------------
    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber: a folder holding a run needs ``resume`` or ``overwrite``."""
        out = self.path
        if not out.exists():
            if resume:
                raise RunFolderError(f"--resume: {out} does not exist; run without --resume")
            return
        is_run = self.is_run()
        if resume:
            if not is_run:
                raise RunFolderError(f"--resume: {out} holds no saelab run ({RUN_CONFIG} "
                                     "missing)")
            return
        if is_run and not overwrite:
            raise RunFolderError(f"{out} already holds a run: pass --resume to continue it or "
                                 "--overwrite to replace it")
        if not is_run and any(out.iterdir()):
            raise RunFolderError(f"{out} is not empty and holds no saelab run: choose another "
                                 "--out (nothing was written)")
        if overwrite and is_run:
            shutil.rmtree(out)

    @contextlib.contextmanager
    def lock(self, what: str = "train") -> Iterator[None]:
        """Hold the run folder's advisory lock (:func:`saelab.locks.hold_lock`, a file beside
        the folder) while ``what`` runs: a second process gets a one-line LockedError naming
        the holder's pid."""
        from saelab.locks import hold_lock

        with hold_lock(self.path, what):
            yield


def _config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """``cls`` rebuilt from a saved dict: the registry's rebuild (old and new SAE option formats)
    where it exists, else the plain one."""
    try:
        from saelab.saes.registry import config_from_dict
    except ImportError:
        from saelab.config import from_dict as config_from_dict
    return config_from_dict(cls, data)
