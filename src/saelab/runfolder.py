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
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saelab.config import RunConfig, check_types
from saelab.errors import NotWritableError, RunFolderError, SaelabError
from saelab.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, json_safe
from saelab.locks import hold_lock
from saelab.saes.registry import config_from_dict
from saelab.train.checkpoint import checkpoint_dir

RUN_CONFIG = "run_config.json"
SAE_DIR = "sae"
METRICS = "metrics.json"
LOG = "metrics.jsonl"
DENSITY_PLOT = "feature_density.png"
SAEBENCH_CORE = "saebench_core.json"
# what saelab writes in a run folder: all that `--overwrite` may replace (the user's own files
# beside them stay)
RUN_ARTEFACTS = frozenset({RUN_CONFIG, SAE_DIR, METRICS, LOG, DENSITY_PLOT, SAEBENCH_CORE,
                           "checkpoint", "checkpoint.old", "report.html", "dashboard"})


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
            data = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{self.config_path} cannot be read ({e}): the run folder is "
                                 "damaged; train it again with --overwrite") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"{self.config_path} must hold a JSON object, got "
                                 f"{type(data).__name__}: the run folder is damaged; train it "
                                 "again with --overwrite")
        return data

    def load_config(self):
        """The run's RunConfig (old and new saved formats), its field types checked."""
        data = self.read_config_dict()
        try:
            cfg = config_from_dict(RunConfig, data)  # old and new formats
            check_types(cfg)
        except (SaelabError, TypeError, ValueError, AttributeError, KeyError) as e:
            raise RunFolderError(f"{self.config_path} is damaged ({_first_line(e)}): fix it "
                                 "or train the run again with --overwrite") from None
        return cfg

    def save_config(self, cfg: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, asdict(cfg))

    # ---- metrics ---------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, float]:
        """``metrics.json`` (empty when absent or unreadable: it is rewritten, not trusted)."""
        try:
            data = json.loads(self.metrics_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` atomically (NaN stays NaN, as format-1 readers expect)."""
        atomic_write_json(self.metrics_path, metrics)

    def write_json(self, name: str, obj: Any) -> Path:
        """A strict-JSON artefact (NaN/inf as null) in the folder."""
        atomic_write_json(self.path / name, json_safe(obj))
        return self.path / name

    def last_logged(self, key: str, default: float) -> float:
        """The last value of ``key`` in the training log."""
        for rec in reversed(self.log_records()):
            if isinstance(rec.get(key), int | float):
                return float(rec[key])
        return default

    def log_records(self) -> list[dict]:
        """The training log's records; unreadable lines (a kill mid-write truncates the last
        one) are skipped."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def repair_log(self) -> None:
        """Drop unreadable lines from the training log (what a kill mid-write leaves), so a
        resumed run appends to a clean log. Rewritten only when something is dropped."""
        if not self.log_path.exists():
            return
        text = self.log_path.read_text(errors="replace")
        records = self.log_records()
        if len(records) != sum(1 for ln in text.splitlines() if ln.strip()):
            atomic_write_bytes(self.log_path,
                               "".join(json.dumps(r) + "\n" for r in records).encode())

    def is_unstarted(self) -> bool:
        """A run whose training never got to a checkpoint or an SAE (e.g. a store error right
        after the config was written): a plain rerun may start it again."""
        return (self.is_run() and not self.has_checkpoint() and not self.has_sae()
                and not self.metrics_path.exists())

    # ---- creation --------------------------------------------------------------------------
    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Check, and change nothing: a folder holding a run needs ``resume`` or ``overwrite``
        (``overwrite`` replaces it only when the new run commits, see :meth:`commit_from`), a
        folder holding anything else is refused, and the folder must be writable."""
        out = self.path
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise RunFolderError(f"--out {out}: {parent} is a file, not a folder: "
                                         "choose another --out")
                break
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out} is a file, not a folder: choose another --out")
        if not out.exists():
            if resume:
                raise RunFolderError(f"--resume: {out} does not exist; run without --resume")
            return
        is_run = self.is_run()
        if resume:
            if not is_run:
                raise RunFolderError(f"--resume: {out} holds no saelab run ({RUN_CONFIG} "
                                     "missing)")
        elif is_run and not overwrite and not self.is_unstarted():
            raise RunFolderError(f"{out} already holds a run: pass --resume to continue it or "
                                 "--overwrite to replace it")
        elif not is_run and any(out.iterdir()):
            raise RunFolderError(f"{out} is not empty and holds no saelab run: choose another "
                                 "--out (nothing was written)")
        check_writable(out)

    @property
    def staging_path(self) -> Path:
        """Where ``--overwrite`` builds the new run (beside the old one, hidden) until it
        commits."""
        return self.path.parent / f".{self.path.name}.overwrite"

    def commit_from(self, staging: Path) -> None:
        """Replace this folder's run by the finished run in ``staging``: the run artefacts of
        the old run (the names saelab writes there) go, the user's own files stay, and
        ``metrics.json`` (the mark of a finished run) moves in last."""
        staging = Path(staging)
        trash = self.path.parent / f".{self.path.name}.replaced"
        shutil.rmtree(trash, ignore_errors=True)
        trash.mkdir()
        for name in sorted(RUN_ARTEFACTS):
            if (self.path / name).exists() or (self.path / name).is_symlink():
                os.replace(self.path / name, trash / name)
        new = sorted(staging.iterdir(), key=lambda p: p.name == METRICS)
        for entry in new:
            os.replace(entry, self.path / entry.name)
        fsync_dir(self.path)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, what: str = "train") -> Iterator[None]:
        """Hold the run folder's advisory lock (:func:`saelab.locks.hold_lock`, a file beside
        the folder) while ``what`` runs: a second process gets a one-line LockedError naming
        the holder's pid."""
        with hold_lock(self.path, what):
            yield


def check_writable(folder: Path) -> None:
    """Create and remove a probe file in ``folder`` (or, when it does not exist yet, its
    nearest existing parent): raises :class:`NotWritableError` before any work is done."""
    target = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        fd, probe = tempfile.mkstemp(prefix=".saelab-probe.", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NotWritableError(f"cannot write to {target} ({e.strerror or e}): choose a "
                               "writable --out") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
