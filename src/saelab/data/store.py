"""On-disk activation store: a folder of atomically written safetensors shards plus a manifest.

Layout (``format_version`` 1)::

    manifest.json            settings, shard list (rows, window range, bytes, sha256), statistics
    shard_00000.safetensors  acts [N, D] (store dtype)   tokens [N] int32   window [N] int64
                             pos [N] int16 (int32 if T > 32767)   windows [W, T] int32
                             stat_act_sum [D] f64   stat_norm_sum [1] f64   stat_sq_norm_sum [1] f64
                             grads [N, D] (store dtype; only if the manifest says with_grads)

Row ``r`` of a shard is the activation at position ``pos[r]`` of global window ``window[r]``
(token ``tokens[r]``); ``windows`` holds the full token windows ``window_start..window_end`` of
the shard (a shard holds whole windows, so its size is about, not exactly, ``shard_rows``).
Every file is written to a temp file, fsynced and renamed, so it exists complete or not at all;
the manifest is rewritten after every shard and only lists shards that are on disk.

``grads`` (stores harvested with ``--with-grads``, for gradient SAEs): row ``r`` holds
``∂L/∂acts[r]``, where ``L`` is the summed next-token cross-entropy of window ``window[r]``
over its scored positions (kept positions that have a next token in the window). Because of
attention this is the row's own next-token loss gradient plus its effect on every later scored
position's loss. The last position of a window scores nothing and nothing after it depends on
it, so its gradient is exactly zero. A store with grads is a superset of one without: it serves
requests for activations only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor

from saelab.dtypes import DTYPES as TORCH_DTYPES
from saelab.dtypes import STORE_DTYPES
from saelab.errors import NonFiniteActivationError, StoreError
from saelab.fsutil import atomic_write_bytes, atomic_write_json

FORMAT = "saelab.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {name: TORCH_DTYPES[name] for name in STORE_DTYPES}
ROW_KEYS = ("acts", "tokens", "window", "pos")
GRADS = "grads"  # optional row key: LM-loss gradients beside acts (StoreSpec.with_grads)
_SHARD_RE = re.compile(r"^shard_\d{5,}\.safetensors$")
_HARVEST_HINT = "run `saelab harvest --out FOLDER` to make one"
# (file, sha256, size, mtime_ns, inode) of shards hashed by this process: hash each once.
_VERIFIED: set[tuple[str, str, int, int, int]] = set()


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _is_temp(name: str) -> bool:
    # fsutil.atomic_write_bytes names temp files ".<target>.<random>.tmp"
    return name.startswith((".shard_", f".{MANIFEST}.")) and name.endswith(".tmp")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    window_start: int
    window_end: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds; two stores with equal specs are interchangeable (and resumable)."""

    model: str
    hook: str
    d_in: int
    context_size: int
    dtype: str = "float32"
    prepend_bos: bool = True
    exclude_first_positions: int = 0
    exclude_special_tokens: bool = True
    exclude_norm_outliers: float = 0.0  # drop rows with norm > this x median (0 = keep all)
    dataset: str = ""
    text_column: str = "text"
    eval_fraction: float = 0.05
    split: str = "train"
    model_spec: str = ""  # the --model argument as given (resolved if a local folder)
    n_layers: int = 0
    model_dtype: str = ""  # dtype of the LM forward that produced the activations
    with_grads: bool = False  # shards also hold `grads` (see the module docstring)
    # hooks whose norm-outlier masks were combined (a multi-hook harvest keeps a row only if
    # it is no outlier at any of them, so the stores' rows align); "" = this hook alone
    outlier_hooks: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"store dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def diff(self, other: StoreSpec) -> list[str]:
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k}={a[k]!r} (asked {b[k]!r})" for k in a if a[k] != b[k]]

    @classmethod
    def from_manifest(cls, m: dict) -> StoreSpec:
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls) if f.name in m})


def _parse_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise StoreError(f"{path} does not exist or is not a folder: {_HARVEST_HINT}")
    if not mpath.is_file():
        raise StoreError(f"{path} is not an activation store (no {MANIFEST}): {_HARVEST_HINT}")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{mpath} is corrupt ({e}): delete the folder and harvest again") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath} is not an activation-store manifest: {_HARVEST_HINT}")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"{path} uses store format {m['format_version']}, newer than this saelab "
            f"({FORMAT_VERSION}): upgrade saelab"
        )
    try:
        m["shards"] = [ShardInfo(**s) for s in m["shards"]]
        StoreSpec.from_manifest(m)
        for key in ("model", "hook", "d_in", "context_size", "complete", "stats"):
            m[key]  # noqa: B018 - presence check
    except (KeyError, TypeError) as e:
        raise StoreError(f"{mpath} is corrupt (bad or missing field {e}): harvest again") from e
    return m


def _manifest_json(m: dict) -> dict:
    return {**m, "shards": [dataclasses.asdict(s) for s in m["shards"]]}


class ActivationStore:
    """Read access to a store folder. Open with :meth:`ActivationStore.open`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationStore:
        path = Path(path)
        return cls(path, _parse_manifest(path))

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, model={self.model!r}, hook={self.hook!r}, "
            f"rows={self.num_rows}, d_in={self.d_in}, complete={self.complete})"
        )

    # --- manifest fields -------------------------------------------------------------------
    @property
    def spec(self) -> StoreSpec:
        return StoreSpec.from_manifest(self.manifest)

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def context_size(self) -> int:
        return int(self.manifest["context_size"])

    @property
    def exclude_first_positions(self) -> int:
        return int(self.manifest.get("exclude_first_positions", 0))

    @property
    def dataset(self) -> str:
        return self.manifest.get("dataset", "")

    @property
    def split(self) -> str:
        return self.manifest.get("split", "")

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def has_grads(self) -> bool:
        """True if every shard also holds ``grads`` (LM-loss gradients, see module docstring)."""
        return bool(self.manifest.get("with_grads", False))

    @property
    def exhausted(self) -> bool:
        """True if the corpus ran out before the target row count."""
        return bool(self.manifest.get("exhausted", False))

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def harvest_stats(self) -> dict:
        """Seconds spent and tokens/s of the harvest that made the store (empty if none)."""
        return self.manifest.get("harvest_stats", {})

    @property
    def num_windows(self) -> int:
        return self.shards[-1].window_end if self.shards else 0

    # --- statistics (exact, over every row; no pass needed) ---------------------------------
    @property
    def mean(self) -> Tensor:
        """Mean activation [D] (float64)."""
        s = self.manifest["stats"]
        return torch.tensor(s["act_sum"], dtype=torch.float64) / max(1, self.num_rows)

    @property
    def mean_norm(self) -> float:
        return self.manifest["stats"]["norm_sum"] / max(1, self.num_rows)

    @property
    def mean_sq_norm(self) -> float:
        return self.manifest["stats"]["sq_norm_sum"] / max(1, self.num_rows)

    # --- checks -----------------------------------------------------------------------------
    def check_compatible(
        self, model: str | None = None, hook: str | None = None, d_in: int | None = None
    ) -> None:
        """Raise :class:`StoreError` unless the store matches every given setting."""
        # "" = unknown (an imported dataset that does not name its model): not checked
        ok_model = model is None or not self.model or model in (
            self.model, self.manifest.get("model_spec"))
        ok_hook = hook is None or hook == self.hook
        ok_d = d_in is None or int(d_in) == self.d_in
        if ok_model and ok_hook and ok_d:
            return
        given = (("model", model), ("hook", hook), ("d_in", d_in))
        asked = ", ".join(f"{k} {v}" for k, v in given if v is not None)
        raise StoreError(
            f"store {self.path} was made for model {self.model} hook {self.hook} "
            f"(d_in {self.d_in}) but you asked for {asked}: use a matching store or harvest "
            f"a new one into another folder"
        )

    def verify(self) -> None:
        """Check every shard: present, right size and checksum, consistent, finite."""
        windows = 0
        for i, s in enumerate(self.shards):
            if s.window_start != windows:
                raise StoreError(f"{self.path}: shard {s.file} does not continue shard {i - 1}")
            windows = s.window_end
            self.read_shard(i, verify=True, force=True)

    def damaged_shards(self) -> list[int]:
        """Indices of shards that are missing or fail their size or sha256 check (each file
        is hashed once per process; a good result also spares :meth:`read_shard` the hash)."""
        bad = []
        for i, info in enumerate(self.shards):
            fpath = self.path / info.file
            try:
                st = fpath.stat()
            except OSError:
                bad.append(i)
                continue
            key = (str(fpath.resolve()), info.sha256, st.st_size, st.st_mtime_ns, st.st_ino)
            if key in _VERIFIED:
                continue
            if st.st_size != info.bytes or _sha256_mmap(fpath) != info.sha256:
                bad.append(i)
            else:
                _VERIFIED.add(key)
        return bad

    # --- reading ----------------------------------------------------------------------------
    def _shard_file(self, i: int) -> tuple[ShardInfo, Path]:
        if not 0 <= i < len(self.shards):
            raise IndexError(f"shard index {i} out of range (store has {len(self.shards)})")
        info = self.shards[i]
        fpath = self.path / info.file
        if not fpath.is_file():
            raise StoreError(
                f"shard {info.file} of store {self.path} is missing: the store is damaged; "
                f"delete the folder and harvest again"
            )
        return info, fpath

    def read_shard(self, i: int, verify: bool = True, force: bool = False) -> dict[str, Tensor]:
        """Tensors of shard ``i``: acts, tokens, window, pos, windows, and grads if the store
        has them (CPU).

        With ``verify`` the file's sha256 is checked (once per shard per process unless
        ``force``). Raises :class:`StoreError` naming the shard if it is missing, truncated or
        corrupt and :class:`NonFiniteActivationError` on NaN/inf.
        """
        info, fpath = self._shard_file(i)
        where = f"shard {info.file} of store {self.path}"
        st = fpath.stat()
        if st.st_size != info.bytes:
            raise StoreError(
                f"{where} is truncated or damaged ({st.st_size} bytes, manifest says "
                f"{info.bytes}): delete the folder and harvest again"
            )
        key = (str(fpath.resolve()), info.sha256, st.st_size, st.st_mtime_ns, st.st_ino)
        if verify and (force or key not in _VERIFIED):
            if _sha256_mmap(fpath) != info.sha256:
                raise StoreError(
                    f"{where} is corrupt (sha256 mismatch): delete the folder and harvest again"
                )
            _VERIFIED.add(key)
        try:  # memory-mapped: no copy until the caller touches the data
            t = load_file(fpath)
        except Exception as e:  # safetensors raises its own error type on bad bytes
            raise StoreError(f"{where} cannot be parsed ({e}): harvest again") from e
        self._check_shard(info, t, where)
        return {k: t[k] for k in (*_row_keys(self.has_grads), "windows")}

    def _check_shard(self, info: ShardInfo, t: dict[str, Tensor], where: str) -> None:
        n, w = info.rows, info.window_end - info.window_start
        shapes = {
            "acts": (n, self.d_in),
            "tokens": (n,),
            "window": (n,),
            "pos": (n,),
            "windows": (w, self.context_size),
        }
        if self.has_grads:
            shapes[GRADS] = (n, self.d_in)
        for k, shape in shapes.items():
            if k not in t or tuple(t[k].shape) != shape:
                got = tuple(t[k].shape) if k in t else "nothing"
                raise StoreError(f"{where}: {k} has shape {got}, expected {shape}")
        for k, what in (("acts", "activations"), (GRADS, "gradients")):
            if k not in shapes:
                continue
            if t[k].dtype != self.dtype:
                raise StoreError(f"{where}: {k} are {t[k].dtype}, manifest says {self.dtype}")
            r = first_nonfinite_row(t[k])
            if r is not None:
                raise NonFiniteActivationError(
                    f"{where} has NaN/inf {what} at row {r} (window {int(t['window'][r])}, "
                    f"position {int(t['pos'][r])}): harvest again (try --model-dtype float32)"
                )

    def read_tensor(self, i: int, key: str) -> Tensor:
        """One tensor of shard ``i`` without reading the rest (no checksum; e.g. ``pos``)."""
        info, fpath = self._shard_file(i)
        try:
            with safe_open(str(fpath), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise StoreError(f"shard {info.file} of store {self.path} cannot be read ({e})") from e


def _row_keys(with_grads: bool) -> tuple[str, ...]:
    return (*ROW_KEYS, GRADS) if with_grads else ROW_KEYS


def _sha256_mmap(path: Path) -> str:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return hashlib.sha256(m).hexdigest()


def first_nonfinite_row(x_ND: Tensor) -> int | None:
    """Index of the first row holding NaN/inf, or None."""
    # fast path: a finite float32 sum proves every element finite (NaN/inf propagate)
    if x_ND.numel() == 0 or bool(torch.isfinite(x_ND.sum(dtype=torch.float32))):
        return None
    bad = ~torch.isfinite(x_ND).all(dim=1)
    return int(bad.nonzero()[0]) if bool(bad.any()) else None  # else: the sum overflowed


def _windows_done(shards: list[ShardInfo]) -> int:
    return shards[-1].window_end if shards else 0


def _file_ok(path: Path, info: ShardInfo) -> bool:
    f = path / info.file
    return f.is_file() and f.stat().st_size == info.bytes and _sha256_mmap(f) == info.sha256


class StoreWriter:
    """Append windows' kept rows to a store; flush a shard whenever ``shard_rows`` are pending.

    Reopening a folder resumes it: only manifest-listed shards whose file has the right
    checksum are kept (the longest such prefix), stray shard/temp files are deleted, and
    :attr:`windows_done` says how many windows the caller should skip. Reopening a *complete*
    store drops its last shard (it may end mid-window) so the store can be extended.
    """

    def __init__(
        self, path: str | os.PathLike, spec: StoreSpec, shard_rows: int, target_rows: int = 0
    ):
        if shard_rows < 1:
            raise StoreError(f"shard_rows must be at least 1, got {shard_rows}")
        self.path = Path(path)
        self.spec = spec
        self.shard_rows = shard_rows
        self._dtype = DTYPES[spec.dtype]
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows = 0
        self._act_sum = torch.zeros(spec.d_in, dtype=torch.float64)
        self._norm_sum = 0.0
        self._sq_norm_sum = 0.0
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST).exists():
            self._resume(target_rows)
        else:
            others = [p.name for p in self.path.iterdir() if not _is_temp(p.name)]
            if others:
                raise StoreError(
                    f"{self.path} is not an activation store but holds files "
                    f"({', '.join(sorted(others)[:3])}...): refusing to overwrite; pick an "
                    f"empty or new folder"
                )
            self.manifest: dict[str, Any] = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                **dataclasses.asdict(spec),
                "target_rows": target_rows,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "complete": False,
                "exhausted": False,
                "shards": [],
            }
        self._clean_strays()
        self._write_manifest()
        self._next_window = self.windows_done

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest["shards"]

    @property
    def rows(self) -> int:
        """Rows written to shards (pending rows not included)."""
        return sum(s.rows for s in self.shards)

    @property
    def windows_done(self) -> int:
        """Windows stored in shards; a resuming caller skips this many."""
        return _windows_done(self.shards)

    def _resume(self, target_rows: int) -> None:
        store = ActivationStore.open(self.path)
        if store.spec != self.spec:
            raise StoreError(
                f"{self.path} holds a store made with other settings: "
                f"{'; '.join(store.spec.diff(self.spec))}: use another folder"
            )
        trusted: list[ShardInfo] = []
        for s in store.shards:
            if s.window_start != _windows_done(trusted) or not _file_ok(self.path, s):
                break
            trusted.append(s)
        if store.complete and len(trusted) == len(store.shards) and trusted:
            trusted.pop()
        self.manifest = {
            **store.manifest,
            "shards": trusted,
            "complete": False,
            "exhausted": False,
            "target_rows": target_rows,
        }
        for i in range(len(trusted)):
            stats = {
                k: store.read_tensor(i, k)
                for k in ("stat_act_sum", "stat_norm_sum", "stat_sq_norm_sum")
            }
            self._add_stats(stats)

    def _clean_strays(self) -> None:
        keep = {s.file for s in self.shards}
        for p in self.path.iterdir():
            if _is_temp(p.name) or (_SHARD_RE.match(p.name) and p.name not in keep):
                p.unlink(missing_ok=True)

    def _add_stats(self, t: dict[str, Tensor]) -> None:
        # summed shard by shard in order, so a resumed store gets bit-identical totals
        self._act_sum += t["stat_act_sum"]
        self._norm_sum += float(t["stat_norm_sum"][0])
        self._sq_norm_sum += float(t["stat_sq_norm_sum"][0])

    def _write_manifest(self) -> None:
        self.manifest["num_rows"] = self.rows
        self.manifest["num_windows"] = self.windows_done
        self.manifest["stats"] = {
            "act_sum": self._act_sum.tolist(),
            "norm_sum": self._norm_sum,
            "sq_norm_sum": self._sq_norm_sum,
        }
        atomic_write_json(self.path / MANIFEST, _manifest_json(self.manifest))

    def update(self, **fields: Any) -> None:
        """Set extra manifest fields (e.g. ``harvest_stats``); saved with the next write."""
        self.manifest.update(fields)

    def add(self, windows_WT: Tensor, keep_WT: Tensor, acts_ND: Tensor,
            grads_ND: Tensor | None = None) -> None:
        """Append the next ``W`` windows; ``acts_ND`` are their kept rows in row-major order.

        ``N == keep_WT.sum()``. Windows with no kept row still count as done. ``grads_ND``
        (same layout as ``acts_ND``) is required if and only if ``spec.with_grads``.
        """
        windows_WT, keep_WT, rows = _shard_rows(self.spec, windows_WT, keep_WT, acts_ND,
                                                grads_ND, self._next_window)
        counts_W = keep_WT.sum(dim=1)
        cum_W = counts_W.cumsum(0)
        w0 = r0 = 0
        while w0 < len(windows_WT):
            # first window whose rows bring the pending shard to >= shard_rows
            need = r0 + self.shard_rows - self._pending_rows
            j = int(torch.searchsorted(cum_W, need))
            w1 = min(j + 1, len(windows_WT))
            r1 = int(cum_W[w1 - 1])
            self._pending.append(
                {"windows": windows_WT[w0:w1], **{k: v[r0:r1] for k, v in rows.items()}}
            )
            self._pending_rows += r1 - r0
            self._next_window += w1 - w0
            if j < len(windows_WT):
                self._flush()
            w0, r0 = w1, r1

    def _flush(self) -> None:
        if not self._pending:
            return
        keys = (*_row_keys(self.spec.with_grads), "windows")
        t = {k: torch.cat([p[k] for p in self._pending]) for k in keys}
        start = self.windows_done
        self._pending, self._pending_rows = [], 0
        if len(t["acts"]) == 0:  # trailing windows without kept rows (finish only): no shard
            return
        info = _write_shard(self.path, len(self.shards), start, t)
        self.shards.append(info)
        self._add_stats(t)
        self._write_manifest()

    def commit_shard(self, info: ShardInfo) -> None:
        """List a shard another process wrote (:func:`write_shard`) as the next one.

        The file must be on disk with its listed size; its statistics are read from it."""
        if info.window_start != self.windows_done or info.file in {s.file for s in self.shards}:
            raise StoreError(f"{self.path}: shard {info.file} (windows {info.window_start}.."
                             f"{info.window_end}) does not follow windows 0..{self.windows_done}")
        f = self.path / info.file
        if not f.is_file() or f.stat().st_size != info.bytes:
            raise StoreError(f"{f} is missing or not {info.bytes} bytes: harvest again")
        with safe_open(str(f), framework="pt") as h:
            stats = {k: h.get_tensor(k) for k in ("stat_act_sum", "stat_norm_sum",
                                                    "stat_sq_norm_sum")}
        self.shards.append(info)
        self._add_stats(stats)
        self._write_manifest()

    def finish(self, exhausted: bool = False) -> ActivationStore:
        """Write the pending rows as the last shard and mark the store complete."""
        self._flush()
        self.manifest["complete"] = True
        self.manifest["exhausted"] = exhausted
        self._write_manifest()
        return ActivationStore.open(self.path)


def _shard_rows(spec: StoreSpec, windows_WT: Tensor, keep_WT: Tensor, acts_ND: Tensor,
                grads_ND: Tensor | None, first_window: int
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Checked, cast row tensors of windows ``first_window ..`` (see :meth:`StoreWriter.add`);
    also returns the windows (int32) and the keep mask on the CPU."""
    windows_WT, keep_WT = windows_WT.cpu(), keep_WT.cpu().bool()
    n_rows = int(keep_WT.sum())
    if (grads_ND is not None) != spec.with_grads:
        raise ValueError(f"this store {'needs' if spec.with_grads else 'takes no'} grads")
    w_idx, p_idx = keep_WT.nonzero(as_tuple=True)
    named = {"acts": acts_ND} if grads_ND is None else {"acts": acts_ND, GRADS: grads_ND}
    for key, value in named.items():
        if value.shape != (n_rows, spec.d_in):
            raise ValueError(f"{key} {tuple(value.shape)} != ({n_rows}, {spec.d_in})")
        named[key] = value = value.to("cpu", DTYPES[spec.dtype])
        r = first_nonfinite_row(value)
        if r is not None:
            what = "activation" if key == "acts" else "LM-loss gradient"
            raise NonFiniteActivationError(
                f"NaN/inf {what} in window {first_window + int(w_idx[r])} at position "
                f"{int(p_idx[r])}; refusing to store it (try --model-dtype float32, or "
                f"--store-dtype float32 if float16 overflowed)"
            )
    pos_dtype = torch.int16 if spec.context_size <= 32767 else torch.int32
    rows = {
        "acts": named["acts"],
        "tokens": windows_WT[keep_WT].to(torch.int32),
        "window": w_idx.to(torch.int64) + first_window,
        "pos": p_idx.to(pos_dtype),
    }
    if GRADS in named:
        rows[GRADS] = named[GRADS]
    return windows_WT.to(torch.int32), keep_WT, rows


def _write_shard(path: Path, index: int, window_start: int, t: dict[str, Tensor]) -> ShardInfo:
    """Write rows ``t`` (plus ``windows``) as shard ``index`` (atomic); adds its stats to ``t``."""
    t.update(_shard_stats(t["acts"]))
    data = st_save({k: v.contiguous() for k, v in t.items()})
    info = ShardInfo(
        file=shard_name(index),
        rows=len(t["acts"]),
        window_start=window_start,
        window_end=window_start + len(t["windows"]),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    atomic_write_bytes(path / info.file, data)
    return info


def write_shard(path: str | os.PathLike, spec: StoreSpec, index: int, window_start: int,
                windows_WT: Tensor, keep_WT: Tensor, acts_ND: Tensor,
                grads_ND: Tensor | None = None) -> ShardInfo:
    """Write windows ``window_start ..`` and their kept rows as one shard file named for
    position ``index``, without touching the manifest: a data-parallel harvest rank writes its
    own shards and rank 0 lists them in order (:meth:`StoreWriter.commit_shard`)."""
    windows_WT, _, rows = _shard_rows(spec, windows_WT, keep_WT, acts_ND, grads_ND,
                                      window_start)
    if len(rows["acts"]) == 0:
        raise StoreError(f"windows {window_start}..{window_start + len(windows_WT)} have no "
                         "kept rows: a shard needs at least one")
    return _write_shard(Path(path), index, window_start, {**rows, "windows": windows_WT})


def _shard_stats(acts_ND: Tensor, chunk: int = 4096) -> dict[str, Tensor]:
    # float32 within a chunk, float64 across chunks: exact enough, ~10x faster than all-f64
    act_sum = torch.zeros(acts_ND.shape[1], dtype=torch.float64)
    norm_sum = torch.zeros(1, dtype=torch.float64)
    sq_sum = torch.zeros(1, dtype=torch.float64)
    for x in acts_ND.split(chunk):
        x = x.float()
        act_sum += x.sum(dim=0).double()
        norms = torch.linalg.vector_norm(x, dim=1).double()
        norm_sum += norms.sum()
        sq_sum += norms.square().sum()
    return {"stat_act_sum": act_sum, "stat_norm_sum": norm_sum, "stat_sq_norm_sum": sq_sum}
