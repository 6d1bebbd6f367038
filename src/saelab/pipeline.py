"""`saelab train` end to end: store (harvest or reuse) → train → fold → evaluate → save.

Each stage only reads what the previous one produced; the trainer sees activation batches only.
A family whose dictionary is not learnt by gradient descent defines
``fit_from_batches(batches, total_rows, progress)`` on the SAE; the pipeline then streams it the
same (normalised) training batches instead of running the trainer, and folds, saves and
evaluates as usual.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab import dist
from saelab.config import VERSION, DataConfig, HarvestConfig, ModelConfig, RunConfig
from saelab.data.interop import open_store
from saelab.data.stream import ActivationStream, estimate_norm_scale
from saelab.errors import CheckpointError, ConfigError, RunFolderError, SAEFormatError, StoreError
from saelab.evals.evaluate import ACT_BATCH_WINDOWS, CE_BATCH_WINDOWS, evaluate
from saelab.evals.facts import RunFacts
from saelab.evals.metrics import log10_density
from saelab.evals.registry import metrics_of, parse_evals
from saelab.evals.saebench import core_output
from saelab.harvest import default_store_path, harvest, needs_lm_grads
from saelab.io import load_sae, read_metadata, saelens_cfg, save_sae
from saelab.models.hooks import parse_hook
from saelab.models.loading import load_model
from saelab.report.plots import plot_density
from saelab.runfolder import RUN_CONFIG, SAE_DIR, RunFolder
from saelab.runtime import parse_dtype, resolve_device, tune_malloc
from saelab.saes._gradient_pursuit import GPEncodedSAE
from saelab.saes.registry import build_sae, get_family, validate_sae_config
from saelab.train.distributed import init_from_env, prepare_ranks
from saelab.train.trainer import Trainer, TrainResult

__all__ = ["RUN_CONFIG", "SAE_DIR", "RunSummary", "default_store_path", "evaluate_and_save",
           "evaluate_run", "fit_sae", "prepare_run", "resolve_store", "train_run"]


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict[str, float]
    train_seconds: float
    train_tokens_per_second: float
    store_path: Path
    #: the config the run trained with (the saved one when resumed)
    config: RunConfig | None = None


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber: a folder holding a run needs --resume or --overwrite."""
    RunFolder(out).prepare(resume, overwrite)


def resolve_store(cfg: RunConfig, lm, hook_name: str, progress: bool):
    """Open ``cfg.store`` or harvest (or reuse) the cached store for this model/hook/corpus."""
    grads = needs_lm_grads(cfg)
    if cfg.store:
        store = open_store(cfg.store, progress=progress)  # a saelab store or a SAELens dataset
        if grads and not store.has_grads:
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
    out = Path(cfg.out)
    if init_from_env(cfg.model.device) and not dist.is_main():
        return _train_other_rank(cfg, out, store)
    run = RunFolder(out)
    with run.lock("train"):
        # everything is checked (folder, config, model, hook, store, memory) before anything
        # is written; --overwrite builds the new run beside the old one and swaps it in only
        # once it is finished, so a failure at any point leaves the old run as it was
        cfg = prepare_ranks(cfg, prepare_run) if dist.is_distributed() else prepare_run(cfg)
        tune_malloc()

        lm = lm or load_model(cfg.model)
        hook = parse_hook(cfg.model.hook, lm.n_layers)
        check_memory(cfg, lm.d_model)
        if store is None:
            store = resolve_store(cfg, lm, hook.name, progress)
        check_memory(cfg, store.d_in)
        work = out
        if cfg.overwrite and run.is_run():
            work = run.staging_path
            shutil.rmtree(work, ignore_errors=True)  # an earlier, interrupted --overwrite
        final, result = fit_sae(cfg, store, work, progress=progress, log=log)
        extra = metrics_of(RunFacts(train_tokens_per_second=result.tokens_per_second,
                                    train_seconds=result.seconds))
        metrics = evaluate_and_save(final, lm, hook, cfg, work, progress=progress,
                                    baseline=eval_baseline, extra=extra)
        if work != out:
            run.commit_from(work)
    return RunSummary(out, metrics, result.seconds, result.tokens_per_second, Path(store.path),
                      cfg)


def check_memory(cfg: RunConfig, d_in: int) -> None:
    """Refuse an SAE whose parameters, gradients and Adam moments would not fit the device's
    memory (estimated before anything is allocated: a huge ``--d-sae`` would otherwise be
    killed by the OS or fill swap)."""
    device = resolve_device(cfg.model.device)
    itemsize = torch.empty((), dtype=parse_dtype(cfg.train.dtype)).element_size()
    # encoder + decoder, each with its gradient and two Adam moments; plus the latents of a batch
    need = (8 * cfg.sae.d_sae * d_in + 2 * cfg.train.batch_size * cfg.sae.d_sae) * itemsize
    have = device_memory(device)
    if have and need > have:
        raise ConfigError(
            f"--d-sae {cfg.sae.d_sae:,} at d_in {d_in} needs about {need / 2**30:,.1f} GiB for "
            f"the SAE and its optimiser state, more than the {have / 2**30:,.1f} GiB memory of "
            f"{device}: lower --d-sae (or --batch-size)")


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (0 if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _train_other_rank(cfg: RunConfig, out: Path, store=None) -> RunSummary:
    """A data-parallel rank > 0: train its slice of every batch and write nothing (rank 0
    prepares the folder, checks the store, writes checkpoints, evaluates and saves)."""
    cfg = prepare_ranks(cfg, prepare_run)
    tune_malloc()
    store = store or open_store(cfg.store)  # a SAELens dataset: waits for rank 0's import
    _, result = fit_sae(cfg, store, out, progress=False, log=lambda *_: None)
    return RunSummary(out, {}, result.seconds, result.tokens_per_second, Path(store.path))


def prepare_run(cfg: RunConfig) -> RunConfig:
    """Check the run folder and the config; on ``resume``, return the run's saved config."""
    run = RunFolder(Path(cfg.out))
    run.prepare(cfg.resume, cfg.overwrite)
    if cfg.resume:
        saved = run.load_config()
        saved.resume, saved.overwrite = True, False
        saved.out = cfg.out
        cfg = saved
    elif cfg.overwrite and run.is_unstarted():
        cfg.overwrite = False  # nothing to keep: train in place
    cfg.validate()
    validate_sae_config(cfg.sae)
    if not get_family(cfg.sae.architecture).trainable:
        raise ConfigError(f"architecture {cfg.sae.architecture!r} cannot be trained yet")
    return cfg


def begin_run(cfg: RunConfig, run: RunFolder, log, label: str = "") -> bool:
    """Whether the run resumes from a checkpoint; a fresh start saves the config and drops the
    log of an attempt that never reached a checkpoint."""
    resume = cfg.resume
    if resume and not run.has_checkpoint():
        # stopped before its first checkpoint: nothing to restore, start again from step 0
        log(f"{label}note: the run has no checkpoint yet; starting it again from step 0")
        resume = False
    if not resume and dist.is_main():
        run.save_config(cfg)
        if run.log_path.exists():
            run.log_path.unlink()
    return resume


def resume_trainer(trainer: Trainer, run: RunFolder, resume: bool, log, label: str = "") -> int:
    """The first step ``trainer`` takes: its checkpoint's when resuming, else 0."""
    if resume and dist.is_main():
        run.repair_log()  # a kill mid-write may have truncated the log's last line
    start = trainer.resume() if resume else 0
    if start > trainer.total_steps:
        raise CheckpointError(f"the checkpoint in {run.path} is at step {start}, beyond the "
                              f"run's {trainer.total_steps} steps: it belongs to another run; "
                              "pass --overwrite to train this one again")
    if resume:
        log(f"{label}resuming at step {start}/{trainer.total_steps}")
    return start


def fit_sae(cfg: RunConfig, store, out: Path, progress: bool = True, log=print):
    """Build the SAE, train it on ``store`` (resuming from ``out``'s checkpoint when
    ``cfg.resume``) and return ``(exported SAE on raw activations, TrainResult)``. A family
    with ``fit_from_batches`` is fitted from the batch stream instead of the trainer."""
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

    run = RunFolder(out)
    resume = begin_run(cfg, run, log)
    if hasattr(sae, "fit_from_batches"):
        result = _fit_without_gradients(sae, cfg, store, scale, device, progress, log)
        return export_sae(sae, scale), result
    trainer = Trainer(sae, cfg.train, run_dir=out, input_scale=scale, progress=progress)
    start = resume_trainer(trainer, run, resume, log)
    stream = ActivationStream(store, cfg.train.batch_size, cfg.train.shuffle_buffer_rows,
                              seed=cfg.train.seed, device=device, start_batch=start,
                              drop_positions_below=drop, with_grads=sae.uses_lm_grads,
                              rank=dist.rank(), world_size=dist.world_size())
    if not resume:
        # Sampling reads its own shards; it does not advance the batch stream.
        sae.init_from_data(stream.sample(min(32_768, store.num_rows), seed=cfg.train.seed) * scale)
    result = trainer.fit(iter(stream))
    if result.steps == start and start > 0:
        # resumed after training had finished (interrupted in eval): keep the logged speed
        result.tokens_per_second = run.last_logged("tokens_per_second", 0.0)
    log(f"trained {result.steps} steps ({result.tokens:,} tokens) at "
        f"{result.tokens_per_second:,.0f} tokens/s")
    return export_sae(sae, scale), result


def _fit_without_gradients(sae, cfg: RunConfig, store, scale: float, device, progress: bool,
                           log):
    """Stream the training batches (the trainer's stream and input scale, ``tokens`` rows) to
    ``sae.fit_from_batches``; no checkpoints (such fits are not resumable: a resumed run
    fits again)."""
    n_batches = cfg.train.total_steps
    stream = ActivationStream(store, cfg.train.batch_size, cfg.train.shuffle_buffer_rows,
                              seed=cfg.train.seed, device=device,
                              drop_positions_below=cfg.data.exclude_first_positions,
                              with_grads=sae.uses_lm_grads)

    def batches() -> Iterator[torch.Tensor]:
        for i, batch in enumerate(stream):
            if i >= n_batches:
                return
            x_BD = batch[0] if isinstance(batch, tuple | list) else batch
            yield x_BD.to(device, sae.W_dec.dtype) * scale

    total = n_batches * cfg.train.batch_size
    t0 = time.perf_counter()
    with torch.no_grad():
        if getattr(sae, "wants_labelled_rows", False):
            # families that label what they keep (itda) read the store in order, labelled
            sae.fit_from_store(store, total, scale=scale, progress=progress, log=log,
                               drop_positions_below=cfg.data.exclude_first_positions)
            total = int(getattr(sae, "build_stats", {}).get("build_tokens", total))
        else:
            sae.fit_from_batches(batches(), total, progress)
    secs = time.perf_counter() - t0
    log(f"fitted {sae.architecture} from {total:,} rows in {secs:.1f} s")
    return TrainResult(n_batches, total, secs, total / secs if secs > 0 else 0.0, {})


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
                      baseline=None, extra: dict | None = None,
                      evals: list[str] | None = None, keep: dict | None = None) -> dict:
    """Run the evals (default: all; ``cfg.skip_ce`` drops the LM splices), save the SAE (with
    sparsity and metrics) and write ``metrics.json`` once, including ``extra`` (training facts)
    and the metrics of ``keep`` that these evals did not measure: a run folder with
    ``metrics.json`` is finished."""
    run = RunFolder(out)
    t0 = time.perf_counter()
    res = evaluate(sae, lm, hook, cfg.data, cfg.eval, skip_ce=cfg.skip_ce, progress=progress,
                   baseline=baseline, evals=evals)
    timing = RunFacts(eval_seconds=time.perf_counter() - t0,
                      eval_ce_seconds=res.seconds.get("ce", 0.0))
    metrics = {**(keep or {}), **res.metrics, **metrics_of(timing), **(extra or {})}
    save_sae(sae, run.sae_dir, metadata=_sae_metadata(lm, hook, cfg),
             sparsity_log10_F=log10_density(res.density_F), metrics=metrics)
    title = f"{sae.architecture} · {hook.name}"
    if "l0" in metrics:
        title += f" · L0 {metrics['l0']:.1f}"
    plot_density(res.density_F, run.density_plot, title=title)
    if "core" in res.outputs:
        write_saebench_core(run, res, sae, lm, cfg, metrics)
    run.write_metrics(metrics)
    return metrics


def write_saebench_core(run: RunFolder, res, sae, lm, cfg: RunConfig, metrics: dict) -> Path:
    """``saebench_core.json`` beside ``metrics.json`` (SAEBench's core-eval output schema)."""
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    out = core_output(metrics, sae, res.density_F, model_name=lm.name, llm_dtype=dtype,
                      dataset=cfg.data.dataset, context_size=cfg.data.context_size,
                      batch_windows=CE_BATCH_WINDOWS, n_ce_windows=res.n_ce_windows,
                      n_act_windows=res.n_windows, act_batch_windows=ACT_BATCH_WINDOWS,
                      sae_cfg_dict=saelens_cfg(sae), saelab_version=VERSION)
    return run.write_json(run.saebench_core_path.name, out)


def _sae_metadata(lm, hook, cfg: RunConfig) -> dict:
    return {
        "model_name": lm.name,
        "hook_name": hook.name,
        "hook_head_index": None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.dataset,
        "exclude_first_positions": cfg.data.exclude_first_positions,
    }


#: ``saelab eval --encoder``: the SAE's own encoder, or gradient pursuit on its decoder
ENCODERS = ("sae", "gp")
GP_METRICS = "metrics_gp.json"


def evaluate_run(path: Path, eval_cfg, skip_ce: bool = False, progress: bool = True,
                 evals: list[str] | None = None, encoder: str = "sae") -> dict:
    """`saelab eval`: re-evaluate a run folder (or a saved SAE folder) on held-out data with
    ``evals`` (default: all). Training facts, and with a subset of the evals the metrics it does
    not re-measure, are kept from the run's earlier ``metrics.json``.

    ``encoder="gp"`` encodes with gradient pursuit on the SAE's decoder (each token to the L0
    the SAE's own encoder gives it; docs/methods.md §12.5) and writes ``metrics_gp.json``
    instead, leaving the SAE and its ``metrics.json`` untouched."""
    if encoder not in ENCODERS:
        raise ConfigError(f"--encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    path = Path(path)
    run = RunFolder(path)
    names = parse_evals(",".join(evals) if evals else None)
    if run.is_run():
        cfg = run.load_config()
        sae_dir = run.sae_dir
        if not run.has_sae():
            raise RunFolderError(
                f"{path} holds no finished SAE ({sae_dir}/cfg.json missing): finish training "
                f"with `saelab train --resume --out {path}`"
            )
    else:
        # A bare SAE folder (ours or SAELens's): take the model/hook from its metadata.
        meta = read_metadata(path).get("metadata", {})
        name = meta.get("model_name") or ""
        if not name or not meta.get("hook_name"):
            missing = "model_name" if not name else "hook_name"
            raise SAEFormatError(
                f"{path}/cfg.json has no metadata.{missing}: saelab cannot tell which model and "
                f"hook it was trained on; evaluate its run folder instead, or add "
                f"metadata.model_name and metadata.hook_name to its cfg.json")
        model = "embedded" if name == "SmolLM2-135M-Instruct" else name
        data = DataConfig(context_size=int(meta.get("context_size") or 128),
                          prepend_bos=bool(meta.get("prepend_bos", True)))
        cfg = RunConfig(model=ModelConfig(model=model, hook=meta.get("hook_name") or ""),
                        data=data, out=str(path))
        sae_dir = path
    cfg.eval, cfg.skip_ce = eval_cfg, skip_ce
    with run.lock("eval"):
        lm = load_model(cfg.model)
        hook = parse_hook(cfg.model.hook, lm.n_layers)
        sae = load_sae(sae_dir, device=lm.device)
        if encoder == "gp":
            res = evaluate(GPEncodedSAE(sae), lm, hook, cfg.data, cfg.eval, skip_ce=skip_ce,
                           progress=progress, evals=names)
            run.write_json(GP_METRICS, {**res.metrics, "encoder": "gradient_pursuit"})
            return res.metrics
        if sae_dir == path:  # bare SAE folder: leave its weights alone, write metrics beside

            res = evaluate(sae, lm, hook, cfg.data, cfg.eval, skip_ce=skip_ce,
                           progress=progress, evals=names)
            if "core" in res.outputs:
                write_saebench_core(run, res, sae, lm, cfg, res.metrics)
            run.write_metrics(res.metrics)
            return res.metrics
        previous = run.read_metrics()
        facts = {k: v for k, v in previous.items() if k.startswith("train_")}
        partial = set(names) != set(parse_evals(None))
        metrics = evaluate_and_save(sae, lm, hook, cfg, path, progress=progress, extra=facts,
                                    evals=names, keep=previous if partial else None)
    return metrics
