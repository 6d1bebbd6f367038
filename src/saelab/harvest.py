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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.config import EMBEDDED, HarvestConfig, RunConfig
from saelab.data.corpus import iter_documents
from saelab.data.store import DTYPES, MANIFEST, ActivationStore, StoreSpec, StoreWriter
from saelab.data.windows import batch_windows, drop_norm_outliers, iter_windows, keep_mask
from saelab.errors import (
    ConfigError,
    DatasetNotAvailableError,
    HookError,
    NotWritableError,
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
    writer: StoreWriter
    created: bool  # this call made the folder (removed again if it ends up empty)
    rows: int = 0
    done: int = 0  # windows already in the store
    reached: bool = False
    start_rows: int = 0
    prev_seconds: float = 0.0


def harvest_hooks(
    cfg: HarvestConfig, progress: bool = True, lm: LoadedModel | None = None
) -> dict[str, ActivationStore]:
    """Harvest every hook of ``cfg.hook_names()``, one store each (see the module docstring).

    Returns ``{hook name: store}`` in the order given.
    """
    cfg.validate()
    paths = store_paths(cfg)
    names = list(paths)
    multi = len(names) > 1
    outlier_hooks = ",".join(names) if multi and cfg.data.exclude_norm_outliers > 0 else ""
    hint = "wait for it or choose another --out"
    with contextlib.ExitStack() as locks:
        for name in sorted(names):  # a fixed order: two multi-hook harvests cannot deadlock
            locks.enter_context(hold_lock(paths[name], "harvest", wait=True, hint=hint))
        ready: dict[str, ActivationStore] = {}
        existing: dict[str, ActivationStore | None] = {}
        for arg, name in zip(cfg.hook_names(), names, strict=True):
            store = existing[name] = _existing(paths[name])
            if store is not None:
                _check_same_settings(store, cfg, arg, outlier_hooks)
                if _reusable(store, cfg.tokens):
                    ready[name] = store
        if len(ready) == len(names):
            return {n: ready[n] for n in names}
        try:
            made = _run(cfg, paths, existing, set(ready), outlier_hooks, progress, lm)
        except OSError as e:
            where = e.filename or cfg.store
            raise NotWritableError(
                f"cannot write {where} ({e.strerror or e}); shards already written are kept "
                f"and a rerun continues from them: free disk space or choose a writable --out"
            ) from None
    return {n: ready.get(n) or made[n] for n in names}


def _run(cfg: HarvestConfig, paths: dict[str, Path], existing: dict, ready: set[str],
         outlier_hooks: str, progress: bool, lm: LoadedModel | None
         ) -> dict[str, ActivationStore]:
    names = list(paths)
    lm = lm or load_model(cfg.model)
    hooks = [parse_hook(h, lm.n_layers) for h in cfg.hook_names()]
    depth = {h.name: (h.layer, _DEPTH[h.kind]) for h in hooks}
    # with outliers filtered jointly every hook's activation is needed, else only pending ones
    needed = [h for h in hooks if outlier_hooks or h.name not in ready]
    needed.sort(key=lambda h: depth[h.name])
    with_grads = cfg.with_grads or any(s is not None and s.has_grads for s in existing.values())
    if with_grads and len(needed) > 1:
        raise ConfigError("stores with LM-loss gradients are harvested one hook at a time: "
                          "give a single --hook")
    data = _data_settings(cfg)
    B, T = cfg.lm_batch_size, cfg.data.context_size

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
    counted = _Counted(iter_documents(cfg.data, cfg.split))
    windows = itertools.islice(iter_windows(counted, lm.tokenizer, T, cfg.data.prepend_bos),
                               first, None)
    # read the corpus before creating any folder: a failed dataset load or a corpus too small
    # for one window leaves nothing behind
    head = next(windows, None)
    if head is None and first == 0:
        raise DatasetNotAvailableError(
            f"dataset {cfg.data.dataset!r} has no complete window of {T} tokens in its "
            f"{cfg.split} split ({counted.n} document(s)): give a bigger corpus or a smaller "
            f"--context-size"
        )
    windows = itertools.chain([head] if head is not None else [], windows)
    try:
        for n in fresh:
            slots[n] = _open_slot(cfg, paths[n], spec_for(n), needed, n,
                                  created=not paths[n].exists())
        _fill(cfg, lm, list(slots.values()), needed, windows, first, with_grads, progress)
    except BaseException:
        for s in slots.values():  # an interrupted first harvest leaves no empty store behind
            if s.created and not s.writer.shards:
                shutil.rmtree(s.path, ignore_errors=True)
        raise
    return {n: s.writer.finish(exhausted=not s.reached) for n, s in slots.items()}


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
    if slot.done:
        log.info("resuming %s after %d windows (%d rows)", path, slot.done, slot.rows)
    return slot


def _fill(cfg: HarvestConfig, lm: LoadedModel, slots: list[_Slot], needed: list[HookPoint],
          windows: Iterable[Tensor], first: int, with_grads: bool, progress: bool) -> None:
    """Run the LM over ``windows`` (window ``first`` onwards) and feed every slot its rows."""
    B = cfg.lm_batch_size
    outliers = cfg.data.exclude_norm_outliers
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
            base_BT = keep_mask(windows_BT, lm.tokenizer, cfg.data.exclude_first_positions,
                                cfg.data.exclude_special_tokens).cpu()
            ids_BT = windows_BT.to(lm.device)
            grads_BTD = None
            if with_grads:
                # the loss scores every kept position of the batch (before truncation), so a
                # row's gradient does not depend on where the harvest stops
                acts_BTD, grads_BTD, keep_BT = lm_loss_grads(
                    lm.model, ids_BT, needed[0],
                    lambda a, k=base_BT: drop_norm_outliers(a, k, outliers))
                acts = [acts_BTD]
            else:
                with torch.inference_mode():
                    acts = run_to_hooks(lm.model, ids_BT, needed)
                keep_BT = base_BT
                for a in acts:  # each hook's outliers judged on the same base mask
                    keep_BT = keep_BT & drop_norm_outliers(a, base_BT, outliers)
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
                elapsed = time.perf_counter() - start
                s.writer.update(harvest_stats={
                    "seconds": s.prev_seconds + elapsed,
                    "tokens_per_s": (s.rows - s.start_rows) / max(elapsed, 1e-9),
                    "device": str(lm.device),
                    "lm_batch_size": B,
                    "hooks_per_forward": len(needed),
                })
                s.reached = s.rows >= cfg.tokens
            if all(s.reached for s in slots):
                break
    finally:
        bar.close()
    short = [s for s in slots if not s.reached]
    if short:
        warnings.warn(
            f"the corpus ran out after {short[0].rows:,} rows (asked {cfg.tokens:,}); the "
            f"store at {short[0].path} holds what there is",
            stacklevel=4,
        )
