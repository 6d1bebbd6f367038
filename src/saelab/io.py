"""Save and load SAEs in the SAELens 6.x folder format.

A saved SAE is a folder::

    cfg.json                  SAELens config (+ our ``saelab`` block)
    sae_weights.safetensors   tensors named as SAELens names them (W_enc, b_enc, W_dec, ...)
    sparsity.safetensors      optional: key ``sparsity``, log10 feature density [d_sae]
    metrics.json              optional: evaluation metrics (ours; SAELens ignores it)

``sae_lens.SAE.load_from_disk(folder)`` opens our folders (checked against SAELens 6.54.12
with ``benchmarks/saelens_compat.py``), and :func:`load_sae` opens folders SAELens wrote,
including the pre-6.0 config layout (``model_name``/``hook_point`` at the top level,
``log_threshold`` for JumpReLU, ``scaling_factor`` for fine-tuned decoders).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.config import SAEConfig
from saelab.dtypes import DTYPES, dtype_name
from saelab.errors import ConfigError, SAEFormatError
from saelab.fsutil import atomic_folder
from saelab.saes.base import SAE
from saelab.saes.registry import architectures, get_family, sae_config_from_dict

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
METRICS_FILENAME = "metrics.json"

#: written as ``metadata.sae_lens_version``: SAELens treats a config without a version >= 6.0
#: as pre-6.0 and rewrites it, so this marks the layout, not a SAELens install.
SAELENS_FORMAT_VERSION = "6.0.0"
#: version of our ``saelab`` block in cfg.json: 2 stores only the family's options
#: (``config.options``); 1 stored every family's option group. Both load.
SAELAB_FORMAT_VERSION = 2
SAELAB_FORMAT_VERSIONS = (1, 2)
# SAELens keeps these in ``metadata`` since 6.0; older versions had them at the top level.
_LEGACY_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "dataset_trust_remote_code",
    "sae_lens_training_version",
)
_LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
# Per-token input transforms SAELens applies at run time; saelab SAEs have none.
_RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale", "covariance_whitening")


# ---- saving ----------------------------------------------------------------------------------
def save_sae(
    sae: SAE,
    folder: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    sparsity_log10_F: Tensor | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to ``folder`` atomically; returns the folder.

    The SAE must already act on raw activations: fold any input normalisation
    (``sae.fold_input_scale``) first, because ``cfg.json`` says ``normalize_activations: none``.
    ``metadata`` fills SAELens' metadata block (model_name, hook_name, context_size, ...).
    The folder is built beside ``folder`` and renamed into place, so an existing folder is only
    replaced once the new one is complete.
    """
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    cfg = saelens_cfg(sae, metadata)
    sparsity = None
    if sparsity_log10_F is not None:
        sparsity = sparsity_log10_F.detach().float().cpu().contiguous()
        if tuple(sparsity.shape) != (sae.d_sae,):
            raise ValueError(
                f"sparsity_log10_F has shape {tuple(sparsity.shape)}, expected ({sae.d_sae},)"
            )
    with atomic_folder(folder) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILENAME)
        if sparsity is not None:
            save_file({"sparsity": sparsity}, tmp / SPARSITY_FILENAME)
        if metrics is not None:
            _write_json(tmp / METRICS_FILENAME, metrics)
        # cfg.json last: a folder with a config is one whose tensors were written.
        _write_json(tmp / CFG_FILENAME, cfg)
        # safetensors writes 0600 files; give them the usual umask permissions.
        umask = _umask()
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
            _fsync(file)  # the rename must not outrun the data on a crash
    return folder


def saelens_cfg(sae: SAE, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` content for ``sae``: SAELens 6.x keys plus our ``saelab`` block."""
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": None,
        "hook_name": None,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": None,
    }
    meta.update(_jsonable(metadata or {}))
    hook_name = meta.get("hook_name") or ""
    cfg: dict[str, Any] = {
        # A family SAELens lacks gets a name SAELens rejects cleanly instead of misreading.
        "architecture": sae.saelens_architecture or f"saelab.{sae.architecture}",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": _dtype_name(sae.W_enc.dtype),
        # SAELens' load_from_disk overrides this with its device argument; cpu is portable.
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input),
        # Input normalisation is folded into the weights before saving (docs/methods.md §0.3).
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
    }
    cfg.update(sae.saelens_extra_cfg())
    cfg["metadata"] = meta
    cfg["saelab"] = {
        "format_version": SAELAB_FORMAT_VERSION,
        "version": _saelab_version(),
        "architecture": sae.architecture,
        "config": dataclasses.asdict(sae.cfg),
    }
    return cfg


# ---- loading ---------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> dict[str, Any]:
    """``cfg.json`` of an SAE folder, with ``metadata`` filled from pre-6.0 top-level keys."""
    folder = _resolve_folder(path)
    cfg_path = folder / CFG_FILENAME
    if not cfg_path.is_file():
        raise SAEFormatError(f"{folder} is not an SAE folder: {CFG_FILENAME} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SAEFormatError(f"{cfg_path}: metadata must be a JSON object, got "
                             f"{type(meta).__name__}")
    meta = dict(meta)
    for key, value in cfg.items():
        key = _LEGACY_RENAMES.get(key, key)
        if key in _LEGACY_METADATA_KEYS:
            meta.setdefault(key, value)
    _check_metadata(meta, cfg_path)
    cfg["metadata"] = meta
    return cfg


# metadata keys saelab reads back, and the JSON types each may have (None: absent)
_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "model_name": (str,), "hook_name": (str,), "dataset_path": (str,),
    "context_size": (int,), "exclude_first_positions": (int,), "prepend_bos": (bool,),
    "hook_head_index": (int,),
}


def _check_metadata(meta: dict[str, Any], cfg_path: Path) -> None:
    for key, kinds in _METADATA_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        ok = isinstance(value, kinds) and not (bool not in kinds and isinstance(value, bool))
        if not ok or (key == "context_size" and value < 2):
            want = " or ".join(k.__name__ for k in kinds)
            raise SAEFormatError(f"{cfg_path}: metadata.{key} must be a {want}"
                                 f"{' >= 2' if key == 'context_size' else ''}, got {value!r}")


def read_sparsity(path: str | Path) -> Tensor | None:
    """log10 feature density from ``sparsity.safetensors``, or None if the folder has none."""
    file = _resolve_folder(path) / SPARSITY_FILENAME
    if not file.is_file():
        return None
    try:
        return load_file(file, device="cpu")["sparsity"]
    except (SafetensorError, OSError, KeyError) as e:
        raise SAEFormatError(f"{file} is unreadable or has no 'sparsity' tensor: {e}") from None


def load_sae(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load an SAE folder written by saelab or by SAELens (``standard``, ``gated``, ``jumprelu``).

    ``dtype`` defaults to the one in ``cfg.json``; ``device`` to cpu. Raises
    :class:`SAEFormatError` naming the problem for missing/corrupt files, unknown architectures
    and missing or wrongly shaped tensors.
    """
    folder = _resolve_folder(path)
    cfg = read_metadata(folder)
    family, sae_cfg = _family_and_config(cfg, folder)
    target_dtype = _parse_dtype(dtype if dtype is not None else cfg.get("dtype"), folder)

    weights_path = folder / WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise SAEFormatError(f"{folder}: {WEIGHTS_FILENAME} is missing")
    try:
        tensors = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEFormatError(f"{weights_path} is unreadable or corrupt: {e}") from None
    if target_dtype is None:
        target_dtype = tensors["W_enc"].dtype if "W_enc" in tensors else torch.float32
    if "saelab" not in cfg:
        family.from_saelens_tensors(tensors)  # older SAELens tensor layouts

    # Build on the meta device: no memory is allocated before the real tensors are assigned.
    sae = family(sae_cfg, device="meta", dtype=target_dtype)
    _check_tensors(sae, tensors, weights_path)
    # floating tensors take the target dtype; integer ones (e.g. ITDA atom labels) keep theirs
    state = {k: t.to(target_dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    sae.load_state_dict(state, assign=True)
    # Non-persistent buffers (training-only state) are not in the file: materialise as zeros.
    for module in sae.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros_like(buf, device="cpu")
    return sae.to(device or "cpu")


def _resolve_folder(path: str | Path) -> Path:
    folder = Path(path)
    if folder.is_file() and folder.name in (CFG_FILENAME, WEIGHTS_FILENAME):
        folder = folder.parent  # a path to one of the files: be forgiving
    if folder.is_dir():
        return folder
    # A crash inside atomic_folder's swap leaves the previous complete folder as <name>.old.
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.is_dir():
        return old
    if folder.exists():
        raise SAEFormatError(
            f"{folder} is not a folder: pass the SAE folder holding {CFG_FILENAME}"
        )
    raise SAEFormatError(f"SAE folder {folder} does not exist")


def saelens_families() -> dict[str, type[SAE]]:
    """SAELens architecture → the saelab family that loads it (folders without a ``saelab``
    block): each family declares the architectures it loads in ``saelens_loads``."""
    out: dict[str, type[SAE]] = {}
    for cls in architectures().values():
        for arch in cls.__dict__.get("saelens_loads", ()):
            out[arch] = cls
    return out


def _family_and_config(cfg: dict[str, Any], folder: Path) -> tuple[type[SAE], SAEConfig]:
    block = cfg.get("saelab")
    if isinstance(block, dict):
        fmt = block.get("format_version", 1)
        if fmt not in SAELAB_FORMAT_VERSIONS:
            raise SAEFormatError(
                f"{folder / CFG_FILENAME}: saelab format_version {fmt!r} is newer than this "
                f"saelab reads ({', '.join(map(str, SAELAB_FORMAT_VERSIONS))}): upgrade saelab")
        name = block.get("architecture")
        values = dict(block.get("config") or {})
        values["architecture"] = name
    else:
        arch = cfg.get("architecture", "standard")  # pre-6.0 configs had no architecture key
        loaders = saelens_families()
        if arch not in loaders:
            raise SAEFormatError(
                f"{folder}: unknown architecture {arch!r}; saelab loads SAELens architectures "
                f"{', '.join(sorted(loaders))}"
            )
        _check_normalization(cfg, folder)
        values = loaders[arch].from_saelens_cfg(cfg, folder)
        name = values["architecture"]
    if name not in architectures():
        raise SAEFormatError(
            f"{folder}: unknown architecture {name!r}; choose one of "
            f"{', '.join(sorted(architectures()))}"
        )
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SAEFormatError(
                f"{folder / CFG_FILENAME}: {key} must be a positive integer, got {value!r}"
            )
        values[key] = value
    family = get_family(name)
    try:
        return family, family.resolve_config(sae_config_from_dict(values))
    except (ConfigError, TypeError) as e:
        raise SAEFormatError(f"{folder / CFG_FILENAME}: invalid saelab config: {e}") from None


def _check_normalization(cfg: dict[str, Any], folder: Path) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm in (None, False, "none"):
        return
    if norm in _RUNTIME_NORMS:
        raise SAEFormatError(
            f"{folder}: normalize_activations={norm!r} is a run-time input transform that saelab "
            "does not implement; fold it into the weights in SAELens first"
        )
    # True (pre-6.0) / "expected_average_only_in": a scale SAELens does not store in the folder.
    warnings.warn(
        f"{folder}: normalize_activations={norm!r}: the input scale is not stored in the folder, "
        "so the SAE expects inputs already scaled as in training",
        stacklevel=4,  # the caller of load_sae
    )


def _check_tensors(sae: SAE, tensors: dict[str, Tensor], weights_path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    arch = sae.architecture
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise SAEFormatError(
            f"{weights_path}: missing tensor(s) {', '.join(missing)} for a {arch} SAE"
        )
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise SAEFormatError(
            f"{weights_path}: unexpected tensor(s) {', '.join(extra)} for a {arch} SAE "
            f"(expected {', '.join(expected)})"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise SAEFormatError(
                f"{weights_path}: tensor {name} has shape {list(got)}, expected {list(shape)} "
                f"(d_in={sae.d_in}, d_sae={sae.d_sae})"
            )


# ---- helpers ---------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    name = dtype_name(dtype)
    if name is None:
        raise ValueError(
            f"cannot save an SAE with dtype {dtype}: SAELens supports {', '.join(DTYPES)}"
        )
    return name


def _parse_dtype(value: torch.dtype | str | None, folder: Path) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise SAEFormatError(f"{folder}: unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _jsonable(obj: Any) -> Any:
    """Tensors, numpy values and paths → plain JSON types (non-finite floats → None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # numpy arrays / scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _saelab_version() -> str:
    try:
        return version("saelab")
    except PackageNotFoundError:
        return "unknown"
