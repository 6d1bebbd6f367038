"""`saelab train` end to end: store (harvest or reuse) → train → fold → evaluate → save.

Each stage only reads what the previous one produced; the trainer sees activation batches only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saelab.config import HarvestConfig, RunConfig, from_dict
from saelab.errors import RunFolderError
from saelab.fsutil import atomic_write_json
from saelab.runtime import cache_root

RUN_CONFIG = "run_config.json"
SAE_DIR = "sae"


def default_store_path(cfg: RunConfig, tokens: int) -> Path:
    """A cached store keyed by everything that changes its contents."""
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
    from saelab.saes.registry import get_family

    return get_family(cfg.sae.architecture).uses_lm_grads


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict[str, float]
    train_seconds: float
    train_tokens_per_second: float
    store_path: Path


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber: a folder holding a run needs --resume or --overwrite."""
    if not out.exists():
        if resume:
            raise RunFolderError(f"--resume: {out} does not exist; run without --resume")
        return
    is_run = (out / RUN_CONFIG).exists()
    has_files = any(out.iterdir())
    if resume:
        if not is_run:
            raise RunFolderError(f"--resume: {out} holds no saelab run ({RUN_CONFIG} missing)")
        return
    if is_run and not overwrite:
        raise RunFolderError(
            f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it"
        )
    if has_files and not is_run:
        raise RunFolderError(
            f"{out} is not empty and holds no saelab run: choose another --out (nothing was written)"
        )
    if overwrite and is_run:
        shutil.rmtree(out)


def resolve_store(cfg: RunConfig, lm, hook_name: str, progress: bool):
    """Open ``cfg.store`` or harvest (or reuse) the cached store for this model/hook/corpus."""
    from saelab.data.store import ActivationStore
    from saelab.harvest import harvest

    grads = needs_lm_grads(cfg)
    if cfg.store:
        store = ActivationStore.open(cfg.store)
        if grads and not store.has_grads:
            from saelab.errors import StoreError

            raise StoreError(
                f"{cfg.sae.architecture} trains on LM-loss gradients but store {cfg.store} has "
                f"none: make one with `saelab harvest --with-grads`, or omit --store")
    else:
        tokens = cfg.harvest_rows()
        path = default_store_path(cfg, tokens)
        hcfg = HarvestConfig(model=cfg.model, data=cfg.data, store=str(path), tokens=tokens,
                             split="train", with_grads=grads)
        store = harvest(hcfg, progress=progress, lm=lm)
    store.check_compatible(model=lm.name, hook=hook_name, d_in=lm.d_model)
    return store


def train_run(cfg: RunConfig, progress: bool = True, log=print, *, lm=None, store=None,
              eval_baseline=None) -> RunSummary:
    """Run the whole main job. Raises a :class:`SaelabError` subclass on bad input.

    Callers that run many jobs on one model (``saelab sweep``) pass what they share: ``lm``
    (``cfg.model`` already loaded), ``store`` (the resolved activation store) and
    ``eval_baseline`` (an :class:`~saelab.evals.evaluate.EvalBaseline` for ``cfg``'s hook,
    data and eval settings).
    """
    from saelab.models.hooks import parse_hook
    from saelab.models.loading import load_model
    from saelab.runtime import tune_malloc

    out = Path(cfg.out)
    cfg = prepare_run(cfg)
    tune_malloc()

    lm = lm or load_model(cfg.model)
    hook = parse_hook(cfg.model.hook, lm.n_layers)
    if store is None:
        store = resolve_store(cfg, lm, hook.name, progress)
    final, result = fit_sae(cfg, store, out, progress=progress, log=log)
    extra = {"train_tokens_per_second": result.tokens_per_second,
             "train_seconds": result.seconds}
    metrics = evaluate_and_save(final, lm, hook, cfg, out, progress=progress,
                                baseline=eval_baseline, extra=extra)
    return RunSummary(out, metrics, result.seconds, result.tokens_per_second, Path(store.path))


def prepare_run(cfg: RunConfig) -> RunConfig:
    """Check the run folder and the config; on ``resume``, return the run's saved config."""
    from saelab.saes.registry import get_family

    out = Path(cfg.out)
    prepare_run_dir(out, cfg.resume, cfg.overwrite)
    if cfg.resume:
        saved = from_dict(RunConfig, json.loads((out / RUN_CONFIG).read_text()))
        saved.resume, saved.overwrite = True, False
        cfg = saved
    cfg.validate()
    if not get_family(cfg.sae.architecture).trainable:
        from saelab.errors import ConfigError

        raise ConfigError(f"architecture {cfg.sae.architecture!r} cannot be trained yet")
    return cfg


def fit_sae(cfg: RunConfig, store, out: Path, progress: bool = True, log=print):
    """Build the SAE, train it on ``store`` (resuming from ``out``'s checkpoint when
    ``cfg.resume``) and return ``(exported SAE on raw activations, TrainResult)``."""
    from saelab.data.stream import ActivationStream, estimate_norm_scale
    from saelab.runtime import parse_dtype, resolve_device
    from saelab.saes.registry import build_sae
    from saelab.train.trainer import Trainer

    log(f"store: {store.path} ({store.num_rows:,} rows, d_in {store.d_in})")
    if cfg.train.tokens > store.num_rows:
        log(f"note: the budget of {cfg.train.tokens:,} tokens is "
            f"{cfg.train.tokens / store.num_rows:.2f} passes over the store")

    device = resolve_device(cfg.model.device)
    sae_cfg = copy.deepcopy(cfg.sae)
    sae_cfg.d_in = store.d_in
    gen = torch.Generator().manual_seed(cfg.train.seed)
    sae = build_sae(sae_cfg, device=device, dtype=parse_dtype(cfg.train.dtype), generator=gen)
    drop = cfg.data.exclude_first_positions
    scale = estimate_norm_scale(store, sae.cfg.normalize_activations, drop_positions_below=drop)

    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        atomic_write_json(out / RUN_CONFIG, asdict(cfg))
    trainer = Trainer(sae, cfg.train, run_dir=out, input_scale=scale, progress=progress)
    start = trainer.resume() if cfg.resume else 0
    if cfg.resume:
        log(f"resuming at step {start}/{trainer.total_steps}")
    stream = ActivationStream(store, cfg.train.batch_size, cfg.train.shuffle_buffer_rows,
                              seed=cfg.train.seed, device=device, start_batch=start,
                              drop_positions_below=drop, with_grads=sae.uses_lm_grads)
    if not cfg.resume:
        # Sampling reads its own shards; it does not advance the batch stream.
        sae.init_from_data(stream.sample(min(32_768, store.num_rows), seed=cfg.train.seed) * scale)
    result = trainer.fit(iter(stream))
    if result.steps == start and start > 0:
        # resumed after training had finished (interrupted in eval): keep the logged speed
        result.tokens_per_second = _last_logged(out, "tokens_per_second", 0.0)
    log(f"trained {result.steps} steps ({result.tokens:,} tokens) at "
        f"{result.tokens_per_second:,.0f} tokens/s")
    return export_sae(sae, scale), result


def _last_logged(out: Path, key: str, default: float) -> float:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        if line.strip() and key in (rec := json.loads(line)):
            return float(rec[key])
    return default


def export_sae(sae, input_scale: float):
    """A copy that acts on raw activations: input scale folded in; decoder norms folded (N3)
    for families trained without a norm constraint."""
    final = copy.deepcopy(sae).eval()
    final.fold_input_scale(input_scale)
    if not final.unit_norm_decoder:
        final.fold_decoder_norms()
    for p in final.parameters():
        p.requires_grad_(False)
    return final


def evaluate_and_save(sae, lm, hook, cfg: RunConfig, out: Path, progress: bool = True,
                      baseline=None, extra: dict | None = None) -> dict:
    """Evaluate, save the SAE (with sparsity and metrics) and write ``metrics.json`` once,
    including ``extra`` (training facts): a run folder with ``metrics.json`` is finished."""
    from saelab.evals.evaluate import evaluate
    from saelab.evals.metrics import log10_density
    from saelab.io import save_sae
    from saelab.report.plots import plot_density

    t0 = time.perf_counter()
    res = evaluate(sae, lm, hook, cfg.data, cfg.eval, skip_ce=cfg.skip_ce, progress=progress,
                   baseline=baseline)
    metrics = {**res.metrics, "eval_seconds": time.perf_counter() - t0,
               "eval_ce_seconds": res.seconds.get("ce", 0.0), **(extra or {})}
    meta = {
        "model_name": lm.name,
        "hook_name": hook.name,
        "hook_head_index": None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.dataset,
        "exclude_first_positions": cfg.data.exclude_first_positions,
    }
    save_sae(sae, out / SAE_DIR, metadata=meta, sparsity_log10_F=log10_density(res.density_F),
             metrics=metrics)
    plot_density(res.density_F, out / "feature_density.png",
                 title=f"{sae.architecture} · {hook.name} · L0 {metrics['l0']:.1f}")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def evaluate_run(path: Path, eval_cfg, skip_ce: bool = False, progress: bool = True) -> dict:
    """`saelab eval`: re-evaluate a run folder (or a saved SAE folder) on held-out data."""
    from saelab.config import DataConfig, ModelConfig
    from saelab.io import load_sae, read_metadata
    from saelab.models.hooks import parse_hook
    from saelab.models.loading import load_model

    path = Path(path)
    if (path / RUN_CONFIG).exists():
        cfg = from_dict(RunConfig, json.loads((path / RUN_CONFIG).read_text()))
        sae_dir = path / SAE_DIR
        if not (sae_dir / "cfg.json").exists():
            raise RunFolderError(
                f"{path} holds no finished SAE ({sae_dir}/cfg.json missing): finish training "
                "with `saelab train --resume --out {path}`"
            )
    else:
        # A bare SAE folder (ours or SAELens's): take the model/hook from its metadata.
        meta = read_metadata(path).get("metadata", {})
        name = meta.get("model_name") or ""
        model = "embedded" if name == "SmolLM2-135M-Instruct" else name
        data = DataConfig(context_size=int(meta.get("context_size") or 128),
                          prepend_bos=bool(meta.get("prepend_bos", True)))
        cfg = RunConfig(model=ModelConfig(model=model, hook=meta.get("hook_name") or ""),
                        data=data, out=str(path))
        sae_dir = path
    cfg.eval, cfg.skip_ce = eval_cfg, skip_ce
    lm = load_model(cfg.model)
    hook = parse_hook(cfg.model.hook, lm.n_layers)
    sae = load_sae(sae_dir, device=lm.device)
    if sae_dir == path:  # bare SAE folder: leave its weights alone, write metrics beside them
        from saelab.evals.evaluate import evaluate

        res = evaluate(sae, lm, hook, cfg.data, cfg.eval, skip_ce=skip_ce, progress=progress)
        atomic_write_json(path / "metrics.json", res.metrics)
        return res.metrics
    previous = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
    metrics = evaluate_and_save(sae, lm, hook, cfg, path, progress=progress)
    # Training-time facts are not re-measured by an eval; keep them.
    metrics.update({k: v for k, v in previous.items() if k.startswith("train_")})
    atomic_write_json(path / "metrics.json", metrics)
    return metrics
