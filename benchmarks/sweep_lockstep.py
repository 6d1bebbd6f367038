"""Lockstep sweep vs the same runs one after another: training wall time, in one process.

    .venv/bin/python benchmarks/sweep_lockstep.py [--store DIR] [--tokens 100000] [--d-sae 1024]
        [--batch-size 2048] [--archs topk,batchtopk,relu,topk:64] [--repeats 2] [--threads 2]

Both modes train the same runs (a small sweep: families x levels) on the same activation store
with the same seed, budget and width, through the code `saelab sweep` uses:

* sequential (``--no-lockstep``): :func:`saelab.pipeline.fit_sae` per run, each run streaming
  the store itself (its own shard reads, shuffle gather and normalisation);
* lockstep (the default): :func:`saelab.sweep.lockstep.setup_job` per run, then one
  :func:`saelab.train.lockstep.train_lockstep` pass over the store for all of them.

Timed: everything from building the SAEs to the final checkpoints (setup, data-based init,
training, checkpoints every 25 steps as in a sweep); not timed: evaluation, identical in both
modes. The final weights of both modes are compared (they must be equal). Default store: the
largest real SmolLM2 store in ``$SAELAB_CACHE/stores`` (a synthetic one if there is none).
Prints the machine (``lscpu`` model name), the load average, each repeat's times and ratio
(odd repeats run the sequential mode first, even ones the lockstep mode first).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from saelab.config import ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.data.store import ActivationStore, StoreSpec, StoreWriter
from saelab.pipeline import export_sae, fit_sae, prepare_run
from saelab.runtime import cache_root, tune_malloc
from saelab.sweep.lockstep import LockstepJob, setup_job
from saelab.sweep.plan import SweepRun
from saelab.train.lockstep import train_lockstep


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name"))
    except Exception:
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def default_store() -> Path | None:
    stores = [p for p in (cache_root() / "stores").glob("*") if (p / "manifest.json").exists()
              and "-eval-" not in p.name]
    best = max(stores, key=lambda p: ActivationStore.open(p).num_rows, default=None)
    return best


def synthetic_store(path: Path, rows: int = 100_000, d: int = 576) -> ActivationStore:
    spec = StoreSpec(model="synthetic", hook="blocks.0.hook_resid_post", d_in=d,
                     context_size=128, exclude_first_positions=1, dtype="float32")
    w = StoreWriter(path, spec, shard_rows=16_384)
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=1)
    for _ in range(rows // (16 * 127) + 1):
        keep = torch.ones(16, 128, dtype=torch.bool)
        keep[:, 0] = False
        n = int(keep.sum())
        codes = (torch.rand(n, 4 * d, generator=g) < 0.01) * torch.rand(n, 4 * d, generator=g)
        w.add(torch.randint(0, 100, (16, 128), generator=g), keep, codes @ dirs + 0.3)
    return w.finish()


def run_cfgs(store: ActivationStore, out: Path, args) -> list[RunConfig]:
    cfgs = []
    for spec in args.archs.split(","):
        family, _, level = spec.partition(":")
        options = {"k": int(level or 32)} if "topk" in family else None
        cfgs.append(RunConfig(
            model=ModelConfig(model=store.model, hook=store.hook, device="cpu"),
            sae=SAEConfig(architecture=family, d_sae=args.d_sae, options=options),
            train=TrainConfig(tokens=args.tokens, batch_size=args.batch_size,
                              checkpoint_every=25),
            store=str(store.path), out=str(out / spec.replace(":", "-"))))
    return cfgs


def sequential(store, cfgs) -> tuple[float, list]:
    t0 = time.perf_counter()
    finals = []
    for cfg in cfgs:
        cfg = prepare_run(copy.deepcopy(cfg))
        final, _ = fit_sae(cfg, store, Path(cfg.out), progress=False, log=lambda *_: None)
        finals.append(final)
    return time.perf_counter() - t0, finals


def lockstep(store, cfgs) -> tuple[float, list]:
    lm = SimpleNamespace(d_model=store.d_in, name=store.model)
    hook = SimpleNamespace(name=store.hook)
    t0 = time.perf_counter()
    jobs = []
    for cfg in cfgs:
        job = LockstepJob(SweepRun(cfg.sae.architecture, "-", 0, cfg), copy.deepcopy(cfg))
        setup_job(job, lm, hook, False, lambda *_: None)
        jobs.append(job)
    train_lockstep([j.member for j in jobs], store, cfgs[0].data.exclude_first_positions,
                   progress=False)
    secs = time.perf_counter() - t0
    return secs, [export_sae(j.sae, j.scale) for j in jobs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--archs", default="topk,batchtopk,relu,topk:64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    tmp = Path(tempfile.mkdtemp(prefix="saelab-lockstep-"))
    try:
        path = Path(args.store) if args.store else default_store()
        store = (ActivationStore.open(path) if path else synthetic_store(tmp / "store"))
        n_runs = len(args.archs.split(","))
        print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads")
        print(f"store: {store.path} ({store.num_rows:,} rows, d_in {store.d_in}); {n_runs} runs "
              f"({args.archs}), d_sae {args.d_sae}, {args.tokens:,} tokens at batch "
              f"{args.batch_size} each")
        for r in range(1, args.repeats + 1):
            load = os.getloadavg()[0]
            # alternate which mode goes first: the load on a shared machine drifts
            if r % 2:
                seq, a = sequential(store, run_cfgs(store, tmp / f"seq{r}", args))
                lock, b = lockstep(store, run_cfgs(store, tmp / f"lock{r}", args))
            else:
                lock, b = lockstep(store, run_cfgs(store, tmp / f"lock{r}", args))
                seq, a = sequential(store, run_cfgs(store, tmp / f"seq{r}", args))
            same = all(torch.equal(x, y) for fa, fb in zip(a, b, strict=True)
                       for x, y in zip(fa.state_dict().values(), fb.state_dict().values(),
                                       strict=True))
            print(f"repeat {r}: sequential {seq:.1f} s, lockstep {lock:.1f} s, ratio "
                  f"{seq / lock:.2f}x; weights identical: {same}; load average {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
