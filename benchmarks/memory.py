"""Training memory is flat in store size: peak RSS training on a 1M-row and an 8M-row store.

    .venv/bin/python benchmarks/memory.py [--rows 1000000,8000000] [--steps 300] [--d-in 64]
        [--cache DIR] [--buffer-rows 262144]

Writes synthetic activation stores (float32, ``--d-in`` wide, 65,536-row shards; cached under
``benchmarks/.cache/memory`` and reused), then trains the same TopK SAE (d_sae 1024, k 32,
batch 4096) for ``--steps`` steps on each with ``saelab.pipeline.fit_sae`` (the real training
path: norm estimate, data init, shuffled stream, trainer, checkpoints) in a fresh subprocess,
and reports each subprocess's peak RSS (``getrusage`` max RSS, which includes file pages the
process had mapped) and the ratio of the largest to the smallest store. Target: within 10%.

What bounds the memory (``saelab.data.stream``): at most one shuffle block (``--buffer-rows``)
plus one shard and one batch are resident; the manifest is a few hundred bytes per shard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARD_ROWS = 65_536


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}"


def write_store(path: Path, rows: int, d_in: int):
    """A complete store of ``rows`` random rows (windows of 129 positions, position 0 dropped)."""
    import torch

    from saelab.data.store import ActivationStore, StoreSpec, StoreWriter

    if (path / "manifest.json").exists():
        store = ActivationStore.open(path)
        if store.complete and store.num_rows == rows and store.d_in == d_in:
            return store
        raise SystemExit(f"{path} holds another store: delete it")
    T = 129
    spec = StoreSpec(model="synthetic", hook="blocks.0.hook_resid_post", d_in=d_in,
                     context_size=T, exclude_first_positions=1, dtype="float32")
    w = StoreWriter(path, spec, shard_rows=SHARD_ROWS)
    g = torch.Generator().manual_seed(0)
    per_window = T - 1
    n_windows = -(-rows // per_window)
    chunk = 512
    done = 0
    for start in range(0, n_windows, chunk):
        n = min(chunk, n_windows - start)
        keep = torch.ones(n, T, dtype=torch.bool)
        keep[:, 0] = False
        over = done + n * per_window - rows
        if over > 0:  # the last window keeps fewer rows: exactly `rows` in all
            flat = keep.view(-1)
            kept = flat.nonzero().squeeze(1)
            flat[kept[-over:]] = False
        n_rows = int(keep.sum())
        acts = torch.randn(n_rows, d_in, generator=g)
        w.add(torch.zeros(n, T, dtype=torch.long), keep, acts)
        done += n_rows
    return w.finish()


def worker(store_path: str, steps: int, buffer_rows: int, out: str) -> None:
    """Train in this (fresh) process and print one JSON line with peak RSS."""
    from saelab.config import RunConfig, SAEConfig, TrainConfig
    from saelab.data.store import ActivationStore
    from saelab.pipeline import fit_sae
    from saelab.runtime import tune_malloc

    tune_malloc()  # what the CLI does
    batch = 4096
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = RunConfig(sae=SAEConfig(architecture="topk", d_sae=1024, options={"k": 32}),
                    train=TrainConfig(tokens=batch * steps, batch_size=batch, log_every=50,
                                      checkpoint_every=100, shuffle_buffer_rows=buffer_rows),
                    store=store_path, out=out)
    cfg.model.device = "cpu"
    store = ActivationStore.open(store_path)
    t0 = time.perf_counter()
    _, result = fit_sae(cfg, store, Path(out), progress=False, log=lambda *_: None)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rows": store.num_rows, "shards": len(store.shards),
                      "peak_rss_mib": peak / 1024, "rss_after_import_mib": rss0 / 1024,
                      "steps": result.steps, "seconds": secs}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1000000,8000000")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--buffer-rows", type=int, default=262_144)
    ap.add_argument("--cache", default=str(HERE / ".cache" / "memory"))
    ap.add_argument("--worker", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, args.buffer_rows, args.worker[1])
        return 0

    rows = [int(r) for r in args.rows.split(",")]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {_machine()}; torch threads per worker: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    results = []
    for n in rows:
        path = cache / f"store-{n}-d{args.d_in}"
        t0 = time.perf_counter()
        store = write_store(path, n, args.d_in)
        print(f"store {path}: {store.num_rows:,} rows in {len(store.shards)} shards "
              f"({time.perf_counter() - t0:.0f} s to write or open)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(path), str(Path(tmp) / "run"),
                 "--steps", str(args.steps), "--buffer-rows", str(args.buffer_rows)],
                capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(rec)
        print(f"  trained {rec['steps']} steps in {rec['seconds']:.0f} s: peak RSS "
              f"{rec['peak_rss_mib']:.0f} MiB (after imports {rec['rss_after_import_mib']:.0f})",
              flush=True)
    lo, hi = results[0], results[-1]
    ratio = hi["peak_rss_mib"] / lo["peak_rss_mib"]
    print(f"\npeak RSS, {hi['rows']:,} rows vs {lo['rows']:,} rows: "
          f"{hi['peak_rss_mib']:.0f} / {lo['peak_rss_mib']:.0f} MiB = {ratio:.3f} "
          f"({'within' if abs(ratio - 1) <= 0.10 else 'OUTSIDE'} the 10% target)")
    print(json.dumps({"machine": _machine(), "results": results, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
