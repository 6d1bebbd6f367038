"""Activation datasets other tools write: SAELens cached activations <-> saelab stores.

SAELens's ``CacheActivationsRunner`` saves a Hugging Face ``datasets`` dataset to disk
(``dataset_info.json``, ``state.json``, ``data-XXXXX-of-YYYYY.arrow``) with one row per token
window: a column named after the hook (``Array2D`` of shape ``[context_size, d_in]``) and,
in newer versions, ``token_ids`` (``int32`` sequence of length ``context_size``). It records its
settings in ``cache_activations_runner_cfg.json`` beside the data on the hub; we read that file
when it is in the folder and write it on export.

- :func:`open_store` opens either kind of folder as an :class:`ActivationStore` (what
  ``saelab train --store DIR`` uses). A SAELens dataset is imported once into a saelab store in
  the cache (``<cache>/imported/<name>-<hash>``, keyed by the dataset's path, fingerprint and
  hook), row for row: every position of every window, in order.
  Positions come from the ``position`` column saelab writes, else from ``seqpos_slice`` in
  the cfg (SAELens may have dropped the first positions), else count from 0.
- :func:`export_saelens` writes a store in that layout. SAELens needs the same positions in
  every window, while a saelab store usually skips some (BOS, separators, norm outliers): when
  every window holds the same contiguous positions ``a..b-1`` the export has
  ``context_size = b - a`` (``seqpos_slice [a, b]`` in the cfg); otherwise each stored row
  becomes its own length-1 "window" (train it in SAELens with ``context_size=1``). bfloat16
  stores are exported as float32 (Arrow has no bfloat16).

Needs the optional ``datasets`` package (``pip install 'saelab[hf]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.data.store import MANIFEST, ActivationStore, StoreSpec, StoreWriter
from saelab.errors import ConfigError, StoreError
from saelab.fsutil import atomic_folder, atomic_write_json
from saelab.locks import hold_lock
from saelab.runtime import cache_root

SAELENS_CFG = "cache_activations_runner_cfg.json"
_HF_FILES = ("dataset_info.json", "state.json")
_TOKENS = "token_ids"
_POS = "position"  # extra column saelab writes (SAELens reads only the hook and token_ids)
_EXPORT_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
_IMPORT_DTYPES = {"float32": "float32", "float16": "float16", "float64": "float32"}


def _datasets(progress: bool = False) -> Any:
    try:
        import datasets  # optional heavy dependency (pyarrow); only for interop
    except ImportError:
        raise StoreError(
            "reading or writing SAELens activation datasets needs the Hugging Face datasets "
            "package: pip install datasets"
        ) from None
    if progress:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    return datasets


def is_saelens_dataset(path: str | os.PathLike) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk`` (and not a saelab store)."""
    path = Path(path)
    return not (path / MANIFEST).exists() and all((path / f).is_file() for f in _HF_FILES)


def open_store(path: str | os.PathLike, hook: str | None = None,
               progress: bool = False) -> ActivationStore:
    """A saelab store, or a SAELens cached-activation dataset imported (once) as one."""
    if is_saelens_dataset(path):
        return import_saelens(path, hook=hook, progress=progress)
    return ActivationStore.open(path)


def _saelens_cfg(path: Path) -> dict:
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StoreError(f"{path / SAELENS_CFG} is unreadable ({e}): fix or delete it") from None
    return cfg if isinstance(cfg, dict) else {}


def _load(path: Path) -> Any:
    ds_mod = _datasets()
    try:
        ds = ds_mod.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"cannot read the dataset in {path} ({first})") from None
    if isinstance(ds, ds_mod.DatasetDict):
        raise StoreError(f"{path} holds several splits ({', '.join(ds)}): give one split's folder")
    return ds


def _act_columns(ds: Any) -> dict[str, tuple[int, int, str]]:
    """Activation columns: name -> (context_size, d_in, dtype)."""
    array2d = _datasets().Array2D
    return {name: (int(f.shape[0]), int(f.shape[1]), str(f.dtype))
            for name, f in ds.features.items() if isinstance(f, array2d)}


def import_saelens(path: str | os.PathLike, hook: str | None = None,
                   out: str | os.PathLike | None = None, shard_rows: int = 65_536,
                   progress: bool = False) -> ActivationStore:
    """Convert a SAELens cached-activation dataset into a saelab store (reused if done).

    ``hook``: the activation column, needed only if the dataset has several. ``out``: where
    the store goes (default: the cache, see the module docstring).
    """
    path = Path(path).expanduser().resolve()
    _datasets(progress)
    ds = _load(path)
    columns = _act_columns(ds)
    if not columns:
        raise StoreError(f"{path} has no activation column (an Array2D per hook): not a "
                         f"SAELens cached-activation dataset")
    if hook is None:
        if len(columns) > 1:
            raise ConfigError(f"{path} holds activations of several hooks ({', '.join(columns)})"
                              f": choose one with --hook")
        hook = next(iter(columns))
    if hook not in columns:
        raise ConfigError(f"{path} has no activations for hook {hook!r} (it has "
                          f"{', '.join(columns)}): choose one of those")
    T, D, dtype = columns[hook]
    if dtype not in _IMPORT_DTYPES:
        raise StoreError(f"{path}: activations of dtype {dtype} are not supported "
                         f"(use float32 or float16)")
    cfg = _saelens_cfg(path)
    key = hashlib.sha256(f"{path}|{ds._fingerprint}|{hook}".encode()).hexdigest()[:16]
    out = Path(out) if out is not None else cache_root() / "imported" / f"{path.name}-{key}"
    seqpos = cfg.get("seqpos_slice") or [None]
    offset = int(seqpos[0] or 0)
    ours = cfg.get("saelab_store") if isinstance(cfg.get("saelab_store"), dict) else {}
    context = max(int(ours.get("context_size") or 0), offset + T)
    spec = StoreSpec(
        model=str(cfg.get("model_name") or ""),
        hook=hook,
        d_in=D,
        context_size=context,
        dtype=_IMPORT_DTYPES[dtype],
        prepend_bos=bool(cfg.get("prepend_bos", True)),
        exclude_first_positions=int(ours.get("exclude_first_positions", offset)),
        exclude_special_tokens=False,
        exclude_norm_outliers=0.0,
        dataset=f"saelens:{path}",
        text_column="",
        eval_fraction=0.0,
        split="train",
        model_spec=str(cfg.get("model_name") or ""),
        model_dtype=str(cfg.get("dtype") or dtype),
    )
    with hold_lock(out, "importing a SAELens dataset", wait=True):
        if (out / MANIFEST).exists():
            store = ActivationStore.open(out)
            if store.complete and store.spec == spec and not store.damaged_shards():
                return store
        writer = StoreWriter(out, spec, shard_rows, target_rows=len(ds) * T)
        writer.update(imported_from={"path": str(path), "format": "saelens",
                                     "fingerprint": ds._fingerprint,
                                     "seqpos_slice": seqpos})
        start = writer.windows_done  # resumes an interrupted import
        for acts_WLD, tokens_WL, pos_WL in _iter_rows(ds, hook, start, offset):
            if int(pos_WL.max()) >= context or int(pos_WL.min()) < 0:
                raise StoreError(f"{path}: positions outside 0..{context - 1}: damaged dataset")
            # place each row's tokens at their positions in a context-sized window
            windows_WT = torch.zeros(len(acts_WLD), context, dtype=torch.int64)
            windows_WT.scatter_(1, pos_WL, tokens_WL)
            keep_WT = torch.zeros(len(acts_WLD), context, dtype=torch.bool)
            keep_WT.scatter_(1, pos_WL, True)
            order_WL = pos_WL.argsort(dim=1)  # the writer takes rows in position order
            acts_ND = acts_WLD.gather(1, order_WL[..., None].expand(-1, -1, D)).reshape(-1, D)
            writer.add(windows_WT, keep_WT, acts_ND)
        return writer.finish()


def _iter_rows(ds: Any, hook: str, start: int, offset: int, chunk: int = 256
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(acts [W, L, D], tokens [W, L], positions [W, L]) per chunk of dataset rows."""
    cols = [c for c in (hook, _TOKENS, _POS) if c in ds.column_names]
    view = ds.select_columns(cols).with_format("numpy")
    for i in range(start, len(ds), chunk):
        batch = view[i : i + chunk]
        acts = torch.from_numpy(np.ascontiguousarray(batch[hook]))
        W, L = acts.shape[:2]
        if _TOKENS in batch:
            tokens = torch.from_numpy(np.asarray(batch[_TOKENS], dtype=np.int64))
        else:  # older SAELens caches keep no tokens
            tokens = torch.zeros(W, L, dtype=torch.int64)
        if _POS in batch:
            pos = torch.from_numpy(np.asarray(batch[_POS], dtype=np.int64))
        else:
            pos = torch.arange(offset, offset + L).expand(W, L).clone()
        yield acts, tokens, pos


def _uniform_slice(store: ActivationStore) -> tuple[int, int] | None:
    """(a, b) if every window of the store holds exactly positions a..b-1, else None."""
    span: tuple[int, int] | None = None
    for i, info in enumerate(store.shards):
        pos = store.read_tensor(i, "pos").long()
        win = store.read_tensor(i, "window").long()
        n_win = info.window_end - info.window_start
        if n_win == 0 or len(pos) % n_win:
            return None
        L = len(pos) // n_win
        a = int(pos[0]) if len(pos) else 0
        want_pos = torch.arange(a, a + L).repeat(n_win)
        want_win = torch.arange(info.window_start, info.window_end).repeat_interleave(L)
        if not (torch.equal(pos, want_pos) and torch.equal(win, want_win)):
            return None
        if span not in (None, (a, a + L)):
            return None
        span = (a, a + L)
    return span


def export_saelens(store: ActivationStore | str | os.PathLike, out: str | os.PathLike,
                   progress: bool = False) -> Path:
    """Write ``store`` as a SAELens cached-activation dataset folder ``out`` (new or empty).

    Layout and caveats: see the module docstring. Returns ``out``.
    """
    ds_mod = _datasets(progress)
    store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} exists and is not empty: refusing to overwrite it; pass a new "
                         f"--out folder")
    if not store.shards:
        raise StoreError(f"store {store.path} has no rows: nothing to export")
    span = _uniform_slice(store)
    L = span[1] - span[0] if span else 1
    dtype = _EXPORT_DTYPES[store.manifest["dtype"]]
    features = ds_mod.Features({
        store.hook: ds_mod.Array2D(shape=(L, store.d_in), dtype=dtype),
        _TOKENS: ds_mod.Sequence(ds_mod.Value("int32"), length=L),
        _POS: ds_mod.Sequence(ds_mod.Value("int32"), length=L),
    })
    np_dtype = np.float16 if dtype == "float16" else np.float32

    def rows() -> Iterator[dict]:
        for i in range(len(store.shards)):
            t = store.read_shard(i)
            acts = t["acts"].to(torch.float32 if np_dtype is np.float32 else torch.float16)
            acts = acts.numpy().reshape(-1, L, store.d_in)
            tokens = t["tokens"].numpy().astype(np.int32).reshape(-1, L)
            pos = t["pos"].numpy().astype(np.int32).reshape(-1, L)
            for a, tok, p in zip(acts, tokens, pos, strict=True):
                yield {store.hook: a, _TOKENS: tok, _POS: p}

    with hold_lock(out, "export-store"), atomic_folder(out) as tmp:
        scratch = Path(tempfile.mkdtemp(prefix=".export-cache.", dir=tmp.parent))
        try:
            ds = ds_mod.Dataset.from_generator(rows, features=features, cache_dir=str(scratch),
                                               keep_in_memory=False)
            ds.save_to_disk(str(tmp))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        atomic_write_json(tmp / SAELENS_CFG, {
            "model_name": store.model,
            "hook_name": store.hook,
            "d_in": store.d_in,
            "context_size": L,
            "seqpos_slice": list(span) if span else None,
            "dtype": dtype,
            "prepend_bos": bool(store.manifest.get("prepend_bos", True)),
            "training_tokens": store.num_rows,
            "exported_by": "saelab",
            "saelab_store": {"path": str(store.path), "context_size": store.context_size,
                             "exclude_first_positions": store.exclude_first_positions,
                             "rows_are_windows": span is not None,
                             "dataset": store.dataset, "split": store.split},
        })
    return out
