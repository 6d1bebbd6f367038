"""Held-out FVU after N training steps: saelab TopK against EleutherAI sparsify's TopK.

    .venv/bin/python benchmarks/fvu_peers.py [--store STORE] [--steps 100] [--lr 4e-4]

Both train d_sae 4096, k 32, batch 4096 on the same rows in the same order (each in its own
process, ``_train_worker.py``, as in ``train_throughput.py``), then each reconstructs the same
16,384 held-out rows; FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² computed by the worker from its SAE's output.
Rows come from ``--store`` (default: the ``make demo`` store when it exists, else the
throughput benchmark's small store), with positions whose norm exceeds 4× the median dropped
(saelab's training default) and scaled to ``E‖x‖ = √d``. saelab runs at sparsify's LR
(``--lr``, the width law ``2e-4 / √(4096 / 2^14)`` = 4e-4) and at its own default (1e-3), in
fp32 and bf16 (``--autocast``); sparsify with its default 1000-step LR warm-up and with
saelab's 50. One seed: differences below ~0.005 are noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from train_throughput import BASELINE_VENV, baselines_python, load_rows, start

DEMO_STORE = Path.home() / ".cache/saelab/stores"


def _rows(store: str, n: int) -> tuple[torch.Tensor, str]:
    if not store:
        demo = sorted(DEMO_STORE.glob("embedded-blocks.12.hook_resid_post-160000-*"))
        store = str(demo[0]) if demo else ""
    x, src = load_rows(store, n)
    keep = x.norm(dim=1) < 4 * x.norm(dim=1).median()
    x = x[keep]
    x = x * (x.shape[1] ** 0.5 / x.norm(dim=1).mean())
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))], src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # the settings start() reads: no dead latents, no warm-up steps, tuned malloc for all
    args.dead_fraction, args.warmup, args.malloc = 0.0, 0, "tuned"
    x, src = _rows(args.store, 160_000)
    held, train = x[:16_384].contiguous(), x[16_384:].contiguous()
    n = (len(train) // 4096) * 4096
    # sparsify twice: its default 1000-step LR warm-up (10% of its LR at step 100), and saelab's
    # 50-step warm-up so both run at the same LR schedule
    contenders = [("sparsify/topk", 1000), ("sparsify/topk", 50), ("saelab/topk@fp32", args.lr),
                  ("saelab/topk@bf16", args.lr), ("saelab/topk@fp32", None),
                  ("saelab/topk@bf16", None)]
    base_py = str(baselines_python(BASELINE_VENV))
    print(f"rows: {src} ({n:,} training rows, 16,384 held out), {args.steps} steps of 4096")
    with tempfile.TemporaryDirectory() as tmp:
        rows_path, held_path = Path(tmp) / "rows.safetensors", Path(tmp) / "held.safetensors"
        save_file({"rows": train[:n]}, str(rows_path))
        save_file({"rows": held}, str(held_path))
        for name, lr in contenders:
            if name.startswith("sparsify"):
                py, extra, lr_s = base_py, ("--sparsify-lr-warmup", str(lr)), f"4e-4, warm-up {lr}"
            else:
                extra = ("--lr", str(lr)) if lr is not None else ()
                py = sys.executable
                lr_s = f"{lr:g}, warm-up 50" if lr is not None else "default, warm-up 50"
            w = start(name, py, rows_path, args, extra)
            w.run(args.steps)
            w.proc.stdin.write(f"fvu {held_path}\n")
            w.proc.stdin.flush()
            fvu = w.read()["fvu"]
            w.close()
            print(f"{name:20s} lr {lr_s:22s} held-out FVU {fvu:.4f}  "
                  f"({sum(w.times):.0f} s)", flush=True)


if __name__ == "__main__":
    main()
