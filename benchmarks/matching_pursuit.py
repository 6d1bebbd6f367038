"""Matching-pursuit encoding throughput against the bound of one dense ``x Dᵀ`` product.

Every MP encoding needs at least the initial correlations ``x Dᵀ`` (``[B, D] x [D, N]``), so
tokens/s of that product alone bounds MP's tokens/s. This script times, in one run and
interleaved (so machine load hits both alike), the bound, the Gram-updated MP and the
residual-recomputing MP, and prints the ratios. Best of ``--repeats``.

    .venv/bin/python benchmarks/matching_pursuit.py [--atoms 16384] [--k 40] [--rows 2048]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from saelab.saes._matching_pursuit import matching_pursuit, padded_gram


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {torch.get_num_threads()} torch threads, {platform.system()}"


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atoms", type=int, default=16384)
    ap.add_argument("--d", type=int, default=576, help="activation width (SmolLM2: 576)")
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--residual", action="store_true", help="also time the residual path")
    ap.add_argument("--gram-dtype", default="bfloat16", choices=("float32", "bfloat16", "none"),
                    help="also time MP with the Gram matrix stored in this dtype (none: skip)")
    ap.add_argument("--chunk-rows", type=int, default=0, help="rows per MP block; 0 = auto")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}")
    else:
        print(f"device: {machine()}")
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(args.atoms, args.d, generator=g)
    atoms = (atoms / atoms.norm(dim=1, keepdim=True)).to(dev, dtype)
    # rows that look like activations: sparse combinations of atoms plus noise
    idx = torch.randint(0, args.atoms, (args.rows, 8), generator=g)
    x = atoms.float().cpu()[idx].sum(1) + 0.1 * torch.randn(args.rows, args.d, generator=g)
    x = x.to(dev, dtype)
    gram = padded_gram(atoms)
    gdt = None if args.gram_dtype == "none" else getattr(torch, args.gram_dtype)
    gram_low = padded_gram(atoms, gdt) if gdt is not None and gdt != dtype else None
    rows = args.chunk_rows or None
    print(f"atoms {args.atoms}, d {args.d}, k {args.k}, rows {args.rows}, {args.dtype}")

    low = f"gram {args.gram_dtype}"
    best = {"bound": float("inf"), "gram": float("inf"), low: float("inf"),
            "residual": float("inf")}
    matching_pursuit(x[:64], atoms, args.k, gram_NN=gram)  # warm-up
    for _ in range(args.repeats):
        best["bound"] = min(best["bound"], timed(lambda: x @ atoms.T, sync))
        best["gram"] = min(best["gram"], timed(
            lambda: matching_pursuit(x, atoms, args.k, gram_NN=gram, chunk_rows=rows), sync))
        if gram_low is not None:
            best[low] = min(best[low], timed(lambda: matching_pursuit(
                x, atoms, args.k, gram_NN=gram_low, chunk_rows=rows), sync))
        if args.residual:
            best["residual"] = min(best["residual"], timed(
                lambda: matching_pursuit(x, atoms, args.k), sync))
    bound = args.rows / best["bound"]
    print(f"bound (one x·Dᵀ)      {bound:12,.0f} tokens/s")
    for name in ("gram", low, "residual"):
        if best[name] < float("inf"):
            tps = args.rows / best[name]
            print(f"MP {name:<18} {tps:12,.0f} tokens/s  = {tps / bound:6.1%} of the bound")


if __name__ == "__main__":
    main()
