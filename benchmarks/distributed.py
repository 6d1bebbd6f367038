"""Data-parallel training throughput: 1 process against N ranks (gloo on CPU, NCCL on CUDA).

    .venv/bin/python benchmarks/distributed.py [--nproc 2] [--arch topk,gated] [--steps 40]
        [--d-in 576] [--d-sae 4096] [--batch 4096] [--device cpu|cuda] [--store STORE]

Trains the same SAE (global batch ``--batch``) with ``saelab.pipeline.fit_sae`` once in one
process and once on ``--nproc`` ranks (``torch.multiprocessing`` + ``init_process_group``, the
process group torchrun would make), and prints the global training tokens/s of each and the
speed-up. On CPU the cores are split: the single process gets all ``--threads`` (default: the
CPUs), each rank ``threads / nproc``, so the comparison is "same cores, different
parallelism". Rows: ``--store``, else a synthetic store (Gaussian rows, ``--d-in`` wide) cached
under ``benchmarks/.cache/distributed``. The first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _cfg(args, arch: str, out: str):
    from saelab.config import RunConfig, SAEConfig, TrainConfig

    options = {"k": args.k} if "topk" in arch else None
    cfg = RunConfig(sae=SAEConfig(architecture=arch, d_sae=args.d_sae, options=options),
                    train=TrainConfig(tokens=args.batch * args.steps, batch_size=args.batch,
                                      log_every=10**9, checkpoint_every=0),
                    store=args.store, out=out)
    cfg.model.device = args.device
    return cfg


def _timed_fit(cfg, warmup: int) -> float:
    """Global tokens/s of the steps after ``warmup`` (the trainer's own clock, via on_log)."""
    from saelab.data.store import ActivationStore
    from saelab.pipeline import fit_sae
    from saelab.train.trainer import Trainer

    marks: dict[int, float] = {}
    step = Trainer._train_step

    def timed(self, *a, **kw):
        out = step(self, *a, **kw)
        if self.step + 1 in (warmup, self.total_steps):  # self.step is bumped after this
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            marks[self.step + 1] = time.perf_counter()
        return out

    Trainer._train_step = timed
    try:
        fit_sae(cfg, ActivationStore.open(cfg.store), Path(cfg.out), progress=False,
                log=lambda *_: None)
    finally:
        Trainer._train_step = step
    n = cfg.train.total_steps - warmup
    return n * cfg.train.batch_size / (marks[cfg.train.total_steps] - marks[warmup])


def _rank(rank: int, world: int, port: int, args, arch: str, out: str, res: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads // world))
    else:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("gloo" if args.device == "cpu" else "nccl",
                                         rank=rank, world_size=world)
    try:
        tps = _timed_fit(_cfg(args, arch, out), args.warmup)
        if rank == 0:
            Path(res).write_text(json.dumps(tps))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_store(path: Path, rows: int, d_in: int) -> str:
    from memory import write_store

    write_store(path, rows, d_in)
    return str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--arch", default="topk,gated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--store", default="")
    args = ap.parse_args()
    if not args.store:
        args.store = _synthetic_store(HERE / ".cache" / "distributed" / f"store-d{args.d_in}",
                                      262_144, args.d_in)
    print(f"device {args.device}, {args.threads} threads in all, global batch {args.batch}, "
          f"d_sae {args.d_sae}, {args.steps} steps ({args.warmup} untimed)", flush=True)
    rows = []
    for arch in args.arch.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(args.threads)
            one = _timed_fit(_cfg(args, arch, f"{tmp}/one"), args.warmup)
            res = f"{tmp}/res.json"
            mp.spawn(_rank, args=(args.nproc, _free_port(), args, arch, f"{tmp}/many", res),
                     nprocs=args.nproc, join=True)
            many = json.loads(Path(res).read_text())
        rows.append({"arch": arch, "tokens_per_s_1": one, f"tokens_per_s_{args.nproc}": many,
                     "speedup": many / one})
        print(f"{arch:10s} 1 process {one:10,.0f} tok/s   {args.nproc} ranks {many:10,.0f} "
              f"tok/s   x{many / one:.2f}", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
