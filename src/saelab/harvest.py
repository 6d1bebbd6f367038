"""Run an LM over a corpus and write the activations at one or more hook points to stores.

Resumable and idempotent: a folder holding a complete store with the same settings is verified
(every shard's size and sha256) and reused without loading the model; damaged shards are
harvested again; an incomplete store is continued after its last good shard (the LM never
reruns the windows already stored); a folder holding anything else is refused. Each store is
held under an advisory lock (:mod:`saelab.locks`) while it is written: a second harvest into
the same store waits for the first and then reuses its result.

Several hooks (``HarvestConfig.hooks``) share one LM forward, stopped at the deepest hook; the
stores go to ``<out>/<hook name>/`` and their rows align: row ``r`` of every store is the same
(window, position). With the norm-outlier filter on, a row is kept only if it is no outlier at
any of the hooks (recorded as ``outlier_hooks`` in each manifest).

With ``with_grads`` the LM runs forward *and* backward (:func:`lm_loss_grads`) and each shard
also holds the LM-loss gradient at the hook for every stored row. A store with grads is a
superset of one without: it is reused (and continued with grads) for a request without them;
a store without grads is refused for a request with them.

Under torchrun (``saelab harvest --nproc N``) every rank runs the LM on its own blocks of
batches and writes their shards; rank 0 holds the locks and writes the one manifest
(:func:`_harvest_ranks`). The store holds the same rows as a one-process harvest.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab import dist
from saelab.config import EMBEDDED, HarvestConfig, RunConfig
from saelab.data.corpus import iter_documents
from saelab.data.store import (
    DTYPES,
    MANIFEST,
    ActivationStore,
    StoreSpec,
    StoreWriter,
    write_shard,
)
from saelab.data.windows import batch_windows, drop_norm_outliers, iter_windows, keep_mask
from saelab.errors import (
    ConfigError,
    DatasetNotAvailableError,
    HookError,
    NotWritableError,
    PeerError,
    SaelabError,
    StoreError,
)
from saelab.locks import hold_lock
from saelab.models.hooks import KINDS, HookPoint, _activation, hook_module, parse_hook
from saelab.models.loading import LoadedModel, load_model
from saelab.runtime import cache_root
from saelab.saes.registry import get_family

log = logging.getLogger(__name__)
# order of the hook points inside one block: attention output, MLP output, block output
_DEPTH = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}
assert set(_DEPTH) == set(KINDS)


def _local_or_name(s: str) -> str:
    """A local path resolved (so ./x and /abs/x match), anything else unchanged."""
    p = Path(s).expanduser()
    return str(p.resolve()) if s != EMBEDDED and p.exists() else s


def _data_settings(cfg: HarvestConfig) -> dict:
    d = cfg.data
    return {
        "dataset": _local_or_name(d.dataset),
        "text_column": d.text_column,
        "eval_fraction": d.eval_fraction,
        "split": cfg.split,
        "context_size": d.context_size,
        "prepend_bos": d.prepend_bos,
        "exclude_first_positions": d.exclude_first_positions,
        "exclude_special_tokens": d.exclude_special_tokens,
        "exclude_norm_outliers": d.exclude_norm_outliers,
        "dtype": cfg.store_dtype,
    }


def _check_same_settings(store: ActivationStore, cfg: HarvestConfig, hook_arg: str,
                         outlier_hooks: str) -> None:
    """Refuse a store made with other settings, without loading the model."""
    m = store.manifest
    diffs = [
        f"{k}={m.get(k)!r} (asked {v!r})" for k, v in _data_settings(cfg).items() if m.get(k) != v
    ]
    if _local_or_name(cfg.model.model) not in (m.get("model"), m.get("model_spec")):
        diffs.append(f"model={m['model']!r} (asked {cfg.model.model!r})")
    try:
        hook = parse_hook(hook_arg, int(m.get("n_layers", 0))).name
    except SaelabError:
        hook = hook_arg
    if hook != store.hook:
        diffs.append(f"hook={store.hook!r} (asked {hook_arg!r})")
    if m.get("outlier_hooks", "") != outlier_hooks:
        diffs.append(f"outlier_hooks={m.get('outlier_hooks', '')!r} (asked {outlier_hooks!r})")
    if cfg.with_grads and not store.has_grads:
        diffs.append("no LM-loss gradients (asked --with-grads)")
    if diffs:
        raise StoreError(
            f"{store.path} already holds an activation store made with other settings: "
            f"{'; '.join(diffs)}: pass another --out folder (nothing was overwritten)"
        )


def _existing(path: Path) -> ActivationStore | None:
    if (path / MANIFEST).exists():
        return ActivationStore.open(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(
            f"{path} exists and is not an activation store (no {MANIFEST}): refusing to "
            f"overwrite it; pass an empty or new --out folder"
        )
    return None


def _reusable(store: ActivationStore, tokens: int) -> bool:
    """A complete store with enough rows whose every shard passes its checksum (a damaged one
    is harvested again from its first bad shard: warned, returns False)."""
    if not (store.complete and (store.num_rows >= tokens or store.exhausted)):
        return False
    bad = store.damaged_shards()
    if bad:
        warnings.warn(
            f"store {store.path}: {len(bad)} damaged shard(s) ({store.shards[bad[0]].file}"
            f"{', ...' if len(bad) > 1 else ''}): harvesting again from {store.shards[bad[0]].file}",
            stacklevel=3,
        )
        return False
    if store.num_rows < tokens:
        warnings.warn(
            f"reusing {store.path}: its corpus ran out at {store.num_rows:,} rows "
            f"(asked {tokens:,})",
            stacklevel=3,
        )
    return True



def _truncate(keep_BT: Tensor, need: int) -> tuple[Tensor, int]:
    """Keep only the first ``need`` kept positions; also return how many windows they span."""
    flat = keep_BT.flatten()
    cum = flat.cumsum(0)
    if len(cum) == 0 or int(cum[-1]) <= need:
        return keep_BT, len(keep_BT)
    last = int(torch.searchsorted(cum, need))  # flat index of the need-th kept position
    return (flat & (cum <= need)).view_as(keep_BT), last // keep_BT.shape[1] + 1



def lm_loss_grads(
    model: torch.nn.Module, ids_BT: Tensor, hook, keep_fn: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Activations at ``hook``, the LM-loss gradient with respect to them, and the keep mask.

    One full forward in which the hook's output is replaced by a detached copy that requires
    grad (so the backward stops at the hook: nothing before it enters the graph and no
    parameter gradient is formed), then one backward of the summed next-token cross-entropy

        L = sum over b, t < T-1 with keep[b, t] of CE(logits[b, t], ids[b, t+1])   (float32)

    giving ``grads_BTD = dL/d acts_BTD``. ``keep_fn(acts_BTD) -> keep_BT`` chooses the scored
    positions (it may look at the activations, e.g. to drop norm outliers). Windows do not
    attend to each other, so each window's rows get the gradient of its own summed loss: the
    row's own next-token loss gradient plus, through attention, its effect on every later
    scored position; the last position's gradient is zero. Used by the harvest and by the g-SAE
    splice in evaluation; works inside ``torch.inference_mode`` (it leaves it locally).

    Returns ``(acts_BTD, grads_BTD, keep_BT)``: acts detached, grads in the activations' dtype,
    keep as ``keep_fn`` returned it.
    """
    module = hook_module(model, hook)
    held: list[Tensor] = []

    def make_leaf(_mod: torch.nn.Module, _args: object, output: object) -> object:
        leaf = _activation(output).detach().requires_grad_(True)
        held.append(leaf)
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    with torch.inference_mode(False), torch.enable_grad():
        ids_BT = ids_BT.clone()  # an inference tensor cannot enter an autograd graph
        handle = module.register_forward_hook(make_leaf)
        try:
            logits_BTV = model(input_ids=ids_BT, use_cache=False).logits
        finally:
            handle.remove()
        if not held:
            raise HookError(f"hook {hook}: the hooked module did not run in the forward pass")
        acts_BTD = held[0]
        keep_BT = keep_fn(acts_BTD.detach())
        # cloned: the mask may be an inference tensor, and indexing saves it for backward
        score_BT = keep_BT[:, :-1].to(logits_BTV.device).clone()
        loss = F.cross_entropy(logits_BTV[:, :-1][score_BT].float(), ids_BT[:, 1:][score_BT],
                               reduction="sum")
        del logits_BTV
        (grads_BTD,) = torch.autograd.grad(loss, acts_BTD, allow_unused=True)
    if grads_BTD is None:  # nothing scored
        grads_BTD = torch.zeros_like(acts_BTD)
    return acts_BTD.detach(), grads_BTD.detach(), keep_BT



class _StopForward(Exception):
    """Raised from a forward hook once every hook's activation is in: skips the rest."""


def run_to_hooks(model: nn.Module, input_ids_BT: Tensor, hooks: list[HookPoint]) -> list[Tensor]:
    """Activations ``[B, T, D]`` at every hook in one forward, stopped at the deepest hook."""
    captured: dict[int, Tensor] = {}
    handles = []

    def grab(i: int) -> Callable[..., None]:
        def record(_mod: nn.Module, _args: object, output: object) -> None:
            captured[i] = _activation(output)
            if len(captured) == len(hooks):
                raise _StopForward

        return record

    try:
        for i, hook in enumerate(hooks):
            handles.append(hook_module(model, hook).register_forward_hook(grab(i)))
        with torch.no_grad():
            model(input_ids=input_ids_BT, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [str(h) for i, h in enumerate(hooks) if i not in captured]
    if missing:
        raise HookError(f"hook {', '.join(missing)}: the hooked module did not run in the forward")
    return [captured[i] for i in range(len(hooks))]


def default_store_path(cfg: RunConfig, tokens: int) -> Path:
    """The cached training store of a run (``saelab train`` without --store), keyed by
    everything that changes its contents."""
    fields = {"model": cfg.model.model, "hook": cfg.model.hook,
              "dtype": cfg.model.model_dtype, "data": asdict(cfg.data), "tokens": tokens}
    grads = needs_lm_grads(cfg)
    if grads:  # its own key (stores without grads keep their old keys)
        fields["with_grads"] = True
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{Path(cfg.model.model).name}-{cfg.model.hook}-{tokens}{'-grads' if grads else ''}"
    return cache_root() / "stores" / f"{name}-{digest}"


def needs_lm_grads(cfg: RunConfig) -> bool:
    """True if the family trains on LM-loss gradients beside the activations (g-SAE)."""
    return get_family(cfg.sae.architecture).uses_lm_grads


def store_paths(cfg: HarvestConfig) -> dict[str, Path]:
    """Store folder of each hook (canonical name): ``cfg.store`` itself for one hook,
    ``cfg.store/<hook>`` for several."""
    names = [parse_hook(h).name for h in cfg.hook_names()]
    if len(set(names)) != len(names):
        raise ConfigError(f"--hook names one hook twice ({', '.join(cfg.hook_names())})")
    out = Path(cfg.store)
    if len(names) == 1:
        return {names[0]: out}
    if (out / MANIFEST).exists() or (out.exists() and not out.is_dir()):
        raise StoreError(
            f"{out} is {'an activation store' if out.is_dir() else 'a file'}; with several "
            f"--hook, --out names a parent folder for one store per hook: pass another --out"
        )
    return {n: out / n for n in names}


def harvest(
    cfg: HarvestConfig, progress: bool = True, lm: LoadedModel | None = None
) -> ActivationStore:
    """Harvest ``cfg.tokens`` activation rows at one hook into ``cfg.store`` (or reuse/resume
    it). ``lm``: an already loaded ``cfg.model`` (saves loading it twice); else loaded on
    demand. For several hooks use :func:`harvest_hooks`."""
    if len(cfg.hook_names()) > 1:
        raise ConfigError("harvest() takes one hook; use harvest_hooks() for several")
    return next(iter(harvest_hooks(cfg, progress, lm).values()))


@dataclass
class _Slot:
    """One store being written: its hook's index in the forward, its writer, progress."""

    index: int
    path: Path
    writer: StoreWriter | None  # None on ranks > 0 of a data-parallel harvest
    created: bool  # this call made the folder (removed again if it ends up empty)
    rows: int = 0
    done: int = 0  # windows already in the store
    reached: bool = False
    start_rows: int = 0
    prev_seconds: float = 0.0
    n_shards: int = 0
    spec: StoreSpec | None = None


def harvest_hooks(
    cfg: HarvestConfig, progress: bool = True, lm: LoadedModel | None = None
) -> dict[str, ActivationStore]:
    """Harvest every hook of ``cfg.hook_names()``, one store each (see the module docstring).

    Returns ``{hook name: store}`` in the order given.
    """
    cfg.validate()
    if dist.is_distributed():
        return _harvest_ranks(cfg, progress, lm)
    paths = store_paths(cfg)
    names = list(paths)
    outlier_hooks = _outlier_hooks(cfg, names)
    with contextlib.ExitStack() as locks:
        ready, existing = _lock_and_check(cfg, paths, outlier_hooks, locks)
        if len(ready) == len(names):
            return {n: ready[n] for n in names}
        with _not_writable(cfg):
            made = _run(cfg, paths, existing, set(ready), outlier_hooks, progress, lm)
    return {n: ready.get(n) or made[n] for n in names}


def _outlier_hooks(cfg: HarvestConfig, names: list[str]) -> str:
    return ",".join(names) if len(names) > 1 and cfg.data.exclude_norm_outliers > 0 else ""


def _lock_and_check(cfg: HarvestConfig, paths: dict[str, Path], outlier_hooks: str,
                    locks: contextlib.ExitStack) -> tuple[dict, dict]:
    """Lock every store (held until ``locks`` closes) and sort them into reusable ones and
    existing ones (``None``: none yet); refuses a store made with other settings."""
    hint = "wait for it or choose another --out"
    for name in sorted(paths):  # a fixed order: two multi-hook harvests cannot deadlock
        locks.enter_context(hold_lock(paths[name], "harvest", wait=True, hint=hint))
    ready: dict[str, ActivationStore] = {}
    existing: dict[str, ActivationStore | None] = {}
    for arg, name in zip(cfg.hook_names(), paths, strict=True):
        store = existing[name] = _existing(paths[name])
        if store is not None:
            _check_same_settings(store, cfg, arg, outlier_hooks)
            if _reusable(store, cfg.tokens):
                ready[name] = store
    return ready, existing


@contextlib.contextmanager
def _not_writable(cfg: HarvestConfig) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        where = e.filename or cfg.store
        raise NotWritableError(
            f"cannot write {where} ({e.strerror or e}); shards already written are kept "
            f"and a rerun continues from them: free disk space or choose a writable --out"
        ) from None


def _run(cfg: HarvestConfig, paths: dict[str, Path], existing: dict, ready: set[str],
         outlier_hooks: str, progress: bool, lm: LoadedModel | None
         ) -> dict[str, ActivationStore]:
    lm = lm or load_model(cfg.model)
    slots, needed, with_grads, windows, first = _open(cfg, paths, existing, ready,
                                                      outlier_hooks, lm)
    try:
        _fill(cfg, lm, list(slots.values()), needed, windows, first, with_grads, progress)
    except BaseException:
        _drop_empty(slots)
        raise
    return {n: s.writer.finish(exhausted=not s.reached) for n, s in slots.items()}


def _drop_empty(slots: dict[str, _Slot]) -> None:
    for s in slots.values():  # an interrupted first harvest leaves no empty store behind
        if s.created and s.writer is not None and not s.writer.shards:
            shutil.rmtree(s.path, ignore_errors=True)


def _needed(cfg: HarvestConfig, lm: LoadedModel, ready: set[str], outlier_hooks: str
            ) -> list[HookPoint]:
    """The hooks the forward must record, shallowest first: with outliers filtered jointly
    every hook's activation is needed, else only those of stores still to write."""
    hooks = [parse_hook(h, lm.n_layers) for h in cfg.hook_names()]
    needed = [h for h in hooks if outlier_hooks or h.name not in ready]
    return sorted(needed, key=lambda h: (h.layer, _DEPTH[h.kind]))


def _corpus_windows(cfg: HarvestConfig, lm: LoadedModel, first: int) -> Iterator[Tensor]:
    """Token windows from window ``first`` on; refuses a corpus without a single window."""
    T = cfg.data.context_size
    counted = _Counted(iter_documents(cfg.data, cfg.split))
    windows = itertools.islice(iter_windows(counted, lm.tokenizer, T, cfg.data.prepend_bos),
                               first, None)
    head = next(windows, None)
    if head is None and first == 0:
        raise DatasetNotAvailableError(
            f"dataset {cfg.data.dataset!r} has no complete window of {T} tokens in its "
            f"{cfg.split} split ({counted.n} document(s)): give a bigger corpus or a smaller "
            f"--context-size"
        )
    return itertools.chain([head] if head is not None else [], windows)


def _open(cfg: HarvestConfig, paths: dict[str, Path], existing: dict, ready: set[str],
          outlier_hooks: str, lm: LoadedModel):
    """Open a writer for every store still to write; returns (slots, needed hooks, with_grads,
    the windows to run, index of the first of them)."""
    names = list(paths)
    needed = _needed(cfg, lm, ready, outlier_hooks)
    with_grads = cfg.with_grads or any(s is not None and s.has_grads for s in existing.values())
    if with_grads and len(needed) > 1:
        raise ConfigError("stores with LM-loss gradients are harvested one hook at a time: "
                          "give a single --hook")
    data = _data_settings(cfg)
    B = cfg.lm_batch_size

    def spec_for(name: str) -> StoreSpec:
        return StoreSpec(
            model=lm.name, hook=name, d_in=lm.d_model,
            model_spec=_local_or_name(cfg.model.model), n_layers=lm.n_layers,
            model_dtype=str(lm.dtype).removeprefix("torch."), with_grads=with_grads,
            outlier_hooks=outlier_hooks, **data,
        )

    slots: dict[str, _Slot] = {}
    pending = [n for n in names if n not in ready]
    fresh = [n for n in pending if existing[n] is None]
    for n in pending:  # existing stores first: they fix where the corpus must resume
        if n not in fresh:
            slots[n] = _open_slot(cfg, paths[n], spec_for(n), needed, n, created=False)
    # Batches are aligned to multiples of lm_batch_size from window 0, so a resumed run feeds
    # the LM exactly the batches an uninterrupted one would: bit-identical activations.
    first = 0 if fresh else min(s.done for s in slots.values()) // B * B
    # read the corpus before creating any folder: a failed dataset load or a corpus too small
    # for one window leaves nothing behind
    windows = _corpus_windows(cfg, lm, first)
    try:
        for n in fresh:
            slots[n] = _open_slot(cfg, paths[n], spec_for(n), needed, n,
                                  created=not paths[n].exists())
    except BaseException:
        _drop_empty(slots)
        raise
    slots = {n: slots[n] for n in pending}  # in the order given
    return slots, needed, with_grads, windows, first


class _Counted:
    """Iterate documents, counting them (for the message when a corpus is too small)."""

    def __init__(self, docs: Iterable[str]):
        self._docs, self.n = iter(docs), 0

    def __iter__(self) -> Iterator[str]:
        for doc in self._docs:
            self.n += 1
            yield doc


def _open_slot(cfg: HarvestConfig, path: Path, spec: StoreSpec, needed: list[HookPoint],
               name: str, created: bool) -> _Slot:
    writer = StoreWriter(path, spec, cfg.shard_rows, target_rows=cfg.tokens)
    slot = _Slot(index=[h.name for h in needed].index(name), path=path, writer=writer,
                 created=created, rows=writer.rows, done=writer.windows_done)
    slot.reached = slot.rows >= cfg.tokens  # only after a crash between last shard and finish
    slot.start_rows = slot.rows
    slot.prev_seconds = writer.manifest.get("harvest_stats", {}).get("seconds", 0.0)
    slot.n_shards = len(writer.shards)
    slot.spec = spec
    if slot.done:
        log.info("resuming %s after %d windows (%d rows)", path, slot.done, slot.rows)
    return slot


def _fill(cfg: HarvestConfig, lm: LoadedModel, slots: list[_Slot], needed: list[HookPoint],
          windows: Iterable[Tensor], first: int, with_grads: bool, progress: bool) -> None:
    """Run the LM over ``windows`` (window ``first`` onwards) and feed every slot its rows."""
    B = cfg.lm_batch_size
    store_dtype = DTYPES[cfg.store_dtype]
    label = needed[0].name if len(needed) == 1 else f"{len(slots)} hooks"
    bar = tqdm(total=cfg.tokens * len(slots), initial=sum(s.rows for s in slots), unit="tok",
               unit_scale=True, disable=not progress, desc=f"harvest {label}")
    start, w_index = time.perf_counter(), first
    try:
        for windows_BT in batch_windows(windows, B):
            w0 = w_index
            w_index += len(windows_BT)
            active = [s for s in slots if not s.reached and s.done < w_index]
            if not active:
                if all(s.reached for s in slots):
                    break
                continue
            acts, grads_BTD, keep_BT = _forward(cfg, lm, windows_BT, needed, with_grads)
            for s in active:
                skip = max(0, s.done - w0)  # windows of this batch already stored
                k_BT, n_win = _truncate(keep_BT[skip:], cfg.tokens - s.rows)
                k_BT = k_BT[:n_win]
                # select and cast on the LM's device: one transfer of the kept rows only
                k_dev = k_BT.to(acts[s.index].device)
                acts_ND = acts[s.index][skip : skip + n_win][k_dev].to(store_dtype)
                grads_ND = None
                if grads_BTD is not None:
                    grads_ND = grads_BTD[skip : skip + n_win][k_dev].to(store_dtype)
                s.writer.add(windows_BT[skip : skip + n_win], k_BT, acts_ND, grads_ND)
                s.rows += len(acts_ND)
                s.done = w0 + skip + n_win
                bar.update(len(acts_ND))
                _note_stats(s, time.perf_counter() - start, lm, cfg, len(needed))
                s.reached = s.rows >= cfg.tokens
            if all(s.reached for s in slots):
                break
    finally:
        bar.close()
    _warn_short(cfg, slots)


def _warn_short(cfg: HarvestConfig, slots: list[_Slot]) -> None:
    short = [s for s in slots if not s.reached]
    if short:
        warnings.warn(
            f"the corpus ran out after {short[0].rows:,} rows (asked {cfg.tokens:,}); the "
            f"store at {short[0].path} holds what there is",
            stacklevel=5,
        )


def _note_stats(s: _Slot, elapsed: float, lm: LoadedModel, cfg: HarvestConfig, n_hooks: int,
                ranks: int = 1) -> None:
    if s.writer is not None:
        s.writer.update(harvest_stats={
            "seconds": s.prev_seconds + elapsed,
            "tokens_per_s": (s.rows - s.start_rows) / max(elapsed, 1e-9),
            "device": str(lm.device),
            "lm_batch_size": cfg.lm_batch_size,
            "hooks_per_forward": n_hooks,
            "ranks": ranks,
        })


def _forward(cfg: HarvestConfig, lm: LoadedModel, windows_BT: Tensor, needed: list[HookPoint],
             with_grads: bool) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """One LM pass over a batch: activations per needed hook, LM-loss grads (or None), and
    the keep mask (excluded positions, special tokens and norm outliers off; on the CPU)."""
    outliers = cfg.data.exclude_norm_outliers
    base_BT = keep_mask(windows_BT, lm.tokenizer, cfg.data.exclude_first_positions,
                        cfg.data.exclude_special_tokens).cpu()
    ids_BT = windows_BT.to(lm.device)
    if with_grads:
        # the loss scores every kept position of the batch (before truncation), so a row's
        # gradient does not depend on where the harvest stops
        acts_BTD, grads_BTD, keep_BT = lm_loss_grads(
            lm.model, ids_BT, needed[0], lambda a: drop_norm_outliers(a, base_BT, outliers))
        return [acts_BTD], grads_BTD, keep_BT
    with torch.inference_mode():
        acts = run_to_hooks(lm.model, ids_BT, needed)
    keep_BT = base_BT
    for a in acts:  # each hook's outliers judged on the same base mask
        keep_BT = keep_BT & drop_norm_outliers(a, base_BT, outliers)
    return acts, None, keep_BT


# ---- data-parallel harvest (torchrun) ----------------------------------------------------------
def _from_main(fn: Callable[[], object]) -> object:
    """``fn()`` on rank 0, its result (or its error, as :class:`PeerError`) on every rank."""
    box: list = [None]
    if dist.is_main():
        try:
            box[0] = ("ok", fn())
        except (SaelabError, OSError) as e:  # OSError: rank 0 reports it as NotWritableError
            box[0] = ("error", str(e))
            torch.distributed.broadcast_object_list(box, src=0)
            raise
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise PeerError(value)
    return value


def _harvest_ranks(cfg: HarvestConfig, progress: bool, lm: LoadedModel | None
                   ) -> dict[str, ActivationStore]:
    """:func:`harvest_hooks` on every rank of a torchrun job.

    The corpus is cut into blocks of whole LM batches (about ``shard_rows`` rows each); block
    ``b`` goes to rank ``b mod W``, which runs the LM on it and writes it as one shard. Rank 0
    alone holds the locks, checks and opens the stores, and lists every rank's shard in the
    one manifest, in corpus order; the rows (and their order) are those of a one-process
    harvest, only the shard boundaries differ. A rerun, on any number of ranks, resumes it.
    """
    paths = store_paths(cfg)
    names = list(paths)
    outlier_hooks = _outlier_hooks(cfg, names)
    with contextlib.ExitStack() as locks:
        opened: dict = {}

        def check() -> list[str]:
            ready, existing = _lock_and_check(cfg, paths, outlier_hooks, locks)
            opened["existing"] = existing
            return sorted(ready)

        ready_names = _from_main(check)
        if len(ready_names) < len(names):
            lm = lm or load_model(cfg.model)
            ready = set(ready_names)

            def open_all() -> tuple:
                slots, _, with_grads, windows, first = _open(cfg, paths, opened["existing"],
                                                             ready, outlier_hooks, lm)
                opened.update(slots=slots, windows=windows)
                return first, with_grads, {n: replace(s, writer=None)
                                           for n, s in slots.items()}

            with _not_writable(cfg):
                first, with_grads, states = _from_main(open_all)
                # rank 0 keeps its writers and the corpus it already opened; the others
                # take the slots' state and open the corpus at the same window
                slots = opened.get("slots") or states
                windows = opened.get("windows") or _corpus_windows(cfg, lm, first)
                needed = _needed(cfg, lm, ready, outlier_hooks)
                try:
                    _fill_ranks(cfg, lm, list(slots.values()), needed, windows, first,
                                with_grads, progress)
                except BaseException:
                    if dist.is_main():
                        _drop_empty(slots)
                    raise
                if dist.is_main():
                    for s in slots.values():
                        s.writer.finish(exhausted=not s.reached)
        dist.barrier()  # every store complete before any rank opens it
    return {n: ActivationStore.open(paths[n]) for n in names}


def _fill_ranks(cfg: HarvestConfig, lm: LoadedModel, slots: list[_Slot],
                needed: list[HookPoint], windows: Iterable[Tensor], first: int,
                with_grads: bool, progress: bool) -> None:
    """:func:`_fill` for rank ``r`` of ``W``: in each round every rank runs the LM on its own
    block of batches; the kept-row counts are exchanged, so each rank knows where the token
    target falls and what its shard is named; each writes its shard, rank 0 lists them."""
    W, r = dist.world_size(), dist.rank()
    B, T = cfg.lm_batch_size, cfg.data.context_size
    per_block = max(1, round(cfg.shard_rows / (B * T)))  # LM batches per block (= per shard)
    store_dtype = DTYPES[cfg.store_dtype]
    batches = batch_windows(windows, B)
    label = needed[0].name if len(needed) == 1 else f"{len(slots)} hooks"
    bar = tqdm(total=cfg.tokens * len(slots), initial=sum(s.rows for s in slots), unit="tok",
               unit_scale=True, disable=not (progress and dist.is_main()),
               desc=f"harvest {label} on {W} ranks")
    start, w_index = time.perf_counter(), first
    try:
        while not all(s.reached for s in slots):
            # this round: W blocks in corpus order, block q for rank q
            starts, mine = [], []
            for q in range(W):
                block = list(itertools.islice(batches, per_block))
                starts.append(w_index)
                if q == r:
                    mine = block
                w_index += sum(len(b) for b in block)
            ended = w_index - starts[0] < W * per_block * B
            parts = _run_block(cfg, lm, slots, needed, mine, starts[r], with_grads,
                               store_dtype)
            # (first window, windows, kept rows) per slot on every rank
            counts = [None] * W
            torch.distributed.all_gather_object(
                counts, [(p["w0"], p["n_win"], p["rows"]) for p in parts])
            infos = []
            for i, s in enumerate(slots):
                infos.append(_write_share(cfg, s, i, counts, r, parts[i]))
            shared = [None] * W
            torch.distributed.all_gather_object(shared, infos)
            for i, s in enumerate(slots):
                for q in range(W):
                    info = shared[q][i]
                    if info is None:
                        continue
                    if s.writer is not None:
                        s.writer.commit_shard(info)
                    s.rows += info.rows
                    s.done = info.window_end
                    s.n_shards += 1
                    bar.update(info.rows)
                s.reached = s.rows >= cfg.tokens
                _note_stats(s, time.perf_counter() - start, lm, cfg, len(needed), W)
            if ended:
                break
    finally:
        bar.close()
    if dist.is_main():
        _warn_short(cfg, slots)


def _run_block(cfg: HarvestConfig, lm: LoadedModel, slots: list[_Slot],
               needed: list[HookPoint], block: list[Tensor], w0: int, with_grads: bool,
               store_dtype: torch.dtype) -> list[dict]:
    """Every kept row of this rank's block, per slot (windows a slot already holds left out:
    a resumed store)."""
    parts = [{"w0": max(w0, s.done), "n_win": 0, "rows": 0, "windows": [], "keep": [],
              "acts": [], "grads": []} for s in slots]
    for windows_BT in block:
        w_end = w0 + len(windows_BT)
        active = [i for i, s in enumerate(slots) if not s.reached and s.done < w_end]
        if active:
            acts, grads_BTD, keep_BT = _forward(cfg, lm, windows_BT, needed, with_grads)
        for i in active:
            s, p = slots[i], parts[i]
            skip = max(0, s.done - w0)
            k_BT = keep_BT[skip:]
            k_dev = k_BT.to(acts[s.index].device)
            p["windows"].append(windows_BT[skip:])
            p["keep"].append(k_BT)
            p["acts"].append(acts[s.index][skip:][k_dev].to(store_dtype).cpu())
            if grads_BTD is not None:
                p["grads"].append(grads_BTD[skip:][k_dev].to(store_dtype).cpu())
            p["n_win"] += len(k_BT)
            p["rows"] += int(k_BT.sum())
        w0 = w_end
    return parts


def _write_share(cfg: HarvestConfig, s: _Slot, i: int, counts: list, r: int, part: dict):
    """Write this rank's shard of slot ``s`` (rows up to the token target only); returns its
    ShardInfo, or None when this rank adds nothing to the store this round."""
    have = s.rows
    index = s.n_shards
    for q in range(r + 1):
        w0, n_win, rows = counts[q][i]
        need = cfg.tokens - have
        if s.reached or need <= 0 or n_win == 0:
            if q == r:
                return None
            continue
        if rows == 0:  # every rank sees it: all stop, rank 0 reports
            raise (StoreError if dist.is_main() else PeerError)(
                f"windows {w0}..{w0 + n_win} of the corpus have no kept position; a "
                f"multi-process harvest writes one shard per block of LM batches and cannot "
                f"store an empty one: raise --shard-rows or harvest on one process")
        if q < r:
            have += min(rows, need)
            index += 1
            continue
        keep_WT = torch.cat(part["keep"])
        keep_WT, n = _truncate(keep_WT, need)
        keep_WT = keep_WT[:n]
        n_rows = int(keep_WT.sum())
        acts_ND = torch.cat(part["acts"])[:n_rows]
        grads_ND = torch.cat(part["grads"])[:n_rows] if part["grads"] else None
        return write_shard(s.path, s.spec, index, w0, torch.cat(part["windows"])[:n],
                           keep_WT, acts_ND, grads_ND)
    return None
