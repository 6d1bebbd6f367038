"""Training checkpoints: SAE parameters, Adam moments, dead counters and the step, written
atomically (safetensors + JSON, no pickles) and verified by checksum on load."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab.errors import CheckpointError
from saelab.fsutil import atomic_folder, atomic_write_json, file_mode, sha256_file

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


@dataclass
class CheckpointState:
    step: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    """Replace the run's checkpoint atomically. A failed write (disk full, read-only folder)
    raises :class:`CheckpointError` and leaves the previous checkpoint as it was."""
    target = checkpoint_dir(run_dir)
    try:
        with atomic_folder(target) as tmp:
            state = tmp / STATE_FILE
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(state))
            state.chmod(file_mode())  # safetensors writes 0600; follow the umask
            full = {**meta, "step": step, "sha256": sha256_file(state)}
            atomic_write_json(tmp / META_FILE, full)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0] or type(e).__name__
        kept = "the previous checkpoint is kept" if target.exists() else "no checkpoint was saved"
        raise CheckpointError(
            f"cannot write the checkpoint to {target} ({reason}); {kept}: free disk space or "
            f"fix the folder's permissions, then rerun with --resume"
        ) from None


def load_checkpoint(run_dir: Path) -> CheckpointState:
    """Load the newest complete checkpoint (falling back to the ``.old`` copy a crash may leave)."""
    primary = checkpoint_dir(run_dir)
    candidates = [primary, primary.with_name(primary.name + ".old")]
    errors = []
    for folder in candidates:
        if not folder.exists():
            continue
        try:
            return _load(folder)
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError(
            f"{errors[0]}; delete {primary} to restart the run, or pass --overwrite"
        )
    raise CheckpointError(
        f"no checkpoint in {run_dir}: nothing to resume (run without --resume, or --overwrite)"
    )


def _load(folder: Path) -> CheckpointState:
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"damaged checkpoint {meta_path}: {e.__class__.__name__}") from None
    check_meta(meta, meta_path)
    if not state_path.exists():
        raise CheckpointError(f"damaged checkpoint: {state_path} is missing")
    if sha256_file(state_path) != meta.get("sha256"):
        raise CheckpointError(f"damaged checkpoint: {state_path} fails its checksum")
    try:
        tensors = load_file(str(state_path))
    except Exception as e:  # safetensors raises its own error types for truncation
        raise CheckpointError(f"damaged checkpoint {state_path}: {e}") from None
    return CheckpointState(meta["step"], meta, tensors)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_meta(meta: Any, meta_path: Path) -> None:
    """``state.json`` holds what resuming reads, with the right types: a non-negative integer
    ``step`` (not beyond ``total_steps`` where recorded), a finite positive ``input_scale``,
    and integer sizes. Raises :class:`CheckpointError` naming the key."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"damaged checkpoint {meta_path}: not a JSON object")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"damaged checkpoint {meta_path}: 'step' must be an integer >= 0, "
                              f"got {step!r}")
    total = meta.get("total_steps")
    if total is not None and (not isinstance(total, int) or step > total):
        raise CheckpointError(f"damaged checkpoint {meta_path}: 'step' {step} is beyond the "
                              f"run's total_steps {total!r}")
    scale = meta.get("input_scale", 1.0)
    if not (_is_number(scale) and scale > 0):
        raise CheckpointError(f"damaged checkpoint {meta_path}: 'input_scale' must be a finite "
                              f"number > 0, got {scale!r}")
    for key in ("d_in", "d_sae", "batch_size"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise CheckpointError(f"damaged checkpoint {meta_path}: {key!r} must be an integer, "
                                  f"got {v!r}")
    if not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"damaged checkpoint {meta_path}: 'sha256' missing")


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict:
    out = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"opt.{names[p]}.{key}"] = value
    return out


def restore_optimizer(opt: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter],
                      tensors: dict[str, torch.Tensor]) -> None:
    for name, p in named_params.items():
        prefix = f"opt.{name}."
        state = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items()
                 if k.startswith(prefix)}
        if state:
            if "step" in state:
                state["step"] = state["step"].cpu()  # Adam keeps `step` on CPU unless capturable
            opt.state[p] = state
