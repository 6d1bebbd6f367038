"""Run an LM over a corpus and write the activations at one hook point to an activation store.

Resumable and idempotent: a folder holding a complete store with the same settings is reused
without loading the model; an incomplete one is continued after its last complete shard (the
LM never reruns the windows already stored); a folder holding anything else is refused.

With ``with_grads`` the LM runs forward *and* backward (:func:`lm_loss_grads`) and each shard
also holds the LM-loss gradient at the hook for every stored row. A store with grads is a
superset of one without: it is reused (and continued with grads) for a request without them;
a store without grads is refused for a request with them.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.config import EMBEDDED, HarvestConfig
from saelab.data.store import DTYPES, MANIFEST, ActivationStore, StoreSpec, StoreWriter
from saelab.errors import SaelabError, StoreError

if TYPE_CHECKING:
    from saelab.models.loading import LoadedModel

log = logging.getLogger(__name__)


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


def _check_same_settings(store: ActivationStore, cfg: HarvestConfig) -> None:
    """Refuse a store made with other settings, without loading the model."""
    from saelab.models.hooks import parse_hook

    m = store.manifest
    diffs = [
        f"{k}={m.get(k)!r} (asked {v!r})" for k, v in _data_settings(cfg).items() if m.get(k) != v
    ]
    if _local_or_name(cfg.model.model) not in (m.get("model"), m.get("model_spec")):
        diffs.append(f"model={m['model']!r} (asked {cfg.model.model!r})")
    try:
        hook = parse_hook(cfg.model.hook, int(m.get("n_layers", 0))).name
    except SaelabError:
        hook = cfg.model.hook
    if hook != store.hook:
        diffs.append(f"hook={store.hook!r} (asked {cfg.model.hook!r})")
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
    import torch.nn.functional as F

    from saelab.errors import HookError
    from saelab.models.hooks import _activation, hook_module

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


def harvest(
    cfg: HarvestConfig, progress: bool = True, lm: LoadedModel | None = None
) -> ActivationStore:
    """Harvest ``cfg.tokens`` activation rows into ``cfg.store`` (or reuse/resume it).

    ``lm``: an already loaded ``cfg.model`` (saves loading it twice); else loaded on demand.
    """
    cfg.validate()
    path = Path(cfg.store)
    store = _existing(path)
    # an existing store with grads stays one (a superset serves requests without grads)
    with_grads = cfg.with_grads or (store is not None and store.has_grads)
    if store is not None:
        _check_same_settings(store, cfg)
        if store.complete and (store.num_rows >= cfg.tokens or store.exhausted):
            if store.num_rows < cfg.tokens:
                warnings.warn(
                    f"reusing {path}: its corpus ran out at {store.num_rows:,} rows "
                    f"(asked {cfg.tokens:,})",
                    stacklevel=2,
                )
            return store

    from saelab.data.corpus import iter_documents
    from saelab.data.windows import batch_windows, drop_norm_outliers, iter_windows, keep_mask
    from saelab.models.hooks import parse_hook, run_to_hook
    from saelab.models.loading import load_model

    lm = lm or load_model(cfg.model)
    hook = parse_hook(cfg.model.hook, lm.n_layers)
    data = _data_settings(cfg)
    spec = StoreSpec(
        model=lm.name,
        hook=hook.name,
        d_in=lm.d_model,
        model_spec=_local_or_name(cfg.model.model),
        n_layers=lm.n_layers,
        model_dtype=str(lm.dtype).removeprefix("torch."),
        with_grads=with_grads,
        **data,
    )
    writer = StoreWriter(path, spec, cfg.shard_rows, target_rows=cfg.tokens)
    done, rows = writer.windows_done, writer.rows
    if done:
        log.info("resuming %s after %d windows (%d rows)", path, done, rows)

    # Batches are aligned to multiples of lm_batch_size from window 0, so a resumed run feeds
    # the LM exactly the batches an uninterrupted one would: bit-identical activations.
    B, T = cfg.lm_batch_size, cfg.data.context_size
    first = done // B * B
    docs = iter_documents(cfg.data, cfg.split)
    windows = itertools.islice(
        iter_windows(docs, lm.tokenizer, T, cfg.data.prepend_bos), first, None
    )
    prev_seconds = writer.manifest.get("harvest_stats", {}).get("seconds", 0.0)
    bar = tqdm(
        total=cfg.tokens,
        initial=rows,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"harvest {hook.name}",
    )
    start, start_rows, w_index = time.perf_counter(), rows, first
    reached = rows >= cfg.tokens  # only after a crash between the last shard and finish()
    outliers = cfg.data.exclude_norm_outliers
    try:
        for windows_BT in () if reached else batch_windows(windows, B):
            skip = max(0, done - w_index)  # windows of this batch already stored
            w_index += len(windows_BT)
            keep_BT = keep_mask(
                windows_BT,
                lm.tokenizer,
                cfg.data.exclude_first_positions,
                cfg.data.exclude_special_tokens,
            ).cpu()
            grads_BTD = None
            if with_grads:
                # the loss scores every kept position of the batch (before truncation), so a
                # row's gradient does not depend on where the harvest stops
                acts_BTD, grads_BTD, keep_BT = lm_loss_grads(
                    lm.model, windows_BT.to(lm.device), hook,
                    lambda a, k=keep_BT: drop_norm_outliers(a, k, outliers))
            else:
                with torch.inference_mode():
                    acts_BTD = run_to_hook(lm.model, windows_BT.to(lm.device), hook)
                keep_BT = drop_norm_outliers(acts_BTD, keep_BT, outliers)
            keep_BT, n_win = _truncate(keep_BT[skip:], cfg.tokens - rows)
            windows_BT, acts_BTD = windows_BT[skip : skip + n_win], acts_BTD[skip : skip + n_win]
            keep_BT = keep_BT[:n_win]
            # select and cast on the LM's device: one transfer of the kept rows only
            keep_dev = keep_BT.to(acts_BTD.device)
            acts_ND = acts_BTD[keep_dev].to(DTYPES[cfg.store_dtype])
            grads_ND = None
            if grads_BTD is not None:
                grads_ND = grads_BTD[skip : skip + n_win][keep_dev].to(DTYPES[cfg.store_dtype])
            writer.add(windows_BT, keep_BT, acts_ND, grads_ND)
            rows += len(acts_ND)
            bar.update(len(acts_ND))
            elapsed = time.perf_counter() - start
            writer.update(
                harvest_stats={
                    "seconds": prev_seconds + elapsed,
                    "tokens_per_s": (rows - start_rows) / max(elapsed, 1e-9),
                    "device": str(lm.device),
                    "lm_batch_size": B,
                }
            )
            if rows >= cfg.tokens:
                reached = True
                break
    finally:
        bar.close()
    if not reached:
        warnings.warn(
            f"the corpus ran out after {rows:,} rows (asked {cfg.tokens:,}); the "
            f"store at {path} holds what there is",
            stacklevel=2,
        )
    return writer.finish(exhausted=not reached)
