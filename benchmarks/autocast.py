"""bf16 autocast against float32 for SAE training: FVU after N steps and training tokens/s.

    .venv/bin/python benchmarks/autocast.py --store STORE [--arch relu,jumprelu] [--steps 100]
        [--d-sae 2048] [--batch 1024] [--device cpu|cuda] [--eval-rows 16384]

Trains each family twice with ``saelab.pipeline.fit_sae`` on the same store, seed and batches,
once with ``--autocast off`` and once with ``bf16``, and reports the FVU of each exported SAE on
the same ``--eval-rows`` rows of the store (float32 evaluation), the relative FVU difference
(target: within 1%) and the training tokens/s. A family whose kernels are not autocast-aware is
reported as unsupported. Make a store with e.g. ``saelab harvest --hook
blocks.6.hook_resid_post --tokens 100000 --out STORE``.

``--dense-too``: relu and gated are trained once more in each precision with their sparse
training path switched off (``sparse_density = 0``, docs/methods.md §0.10), to show that the
path changes the FVU by no more than precision does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def run(args, arch: str, mode: str, x_ND: torch.Tensor, dense: bool = False) -> dict:
    """:func:`fit_and_score`; ``dense``: with the family's sparse training path off."""
    from saelab.saes.registry import get_family

    family = get_family(arch)
    saved = family.__dict__.get("sparse_density")
    if dense:
        family.sparse_density = 0.0
    try:
        return fit_and_score(args, arch, mode, x_ND)
    finally:
        if dense:
            family.sparse_density = saved


def fit_and_score(args, arch: str, mode: str, x_ND: torch.Tensor) -> dict:
    from saelab.config import RunConfig, SAEConfig, TrainConfig
    from saelab.data.store import ActivationStore
    from saelab.errors import ConfigError
    from saelab.pipeline import fit_sae

    options = {"k": args.k} if "topk" in arch else None
    cfg = RunConfig(sae=SAEConfig(architecture=arch, d_sae=args.d_sae, options=options),
                    train=TrainConfig(tokens=args.batch * args.steps, batch_size=args.batch,
                                      autocast=mode, log_every=10**9, checkpoint_every=0),
                    store=args.store)
    cfg.model.device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out = tmp
        try:
            sae, res = fit_sae(cfg, ActivationStore.open(args.store), Path(tmp),
                               progress=False, log=lambda *_: None)
        except ConfigError as e:
            return {"error": str(e)}
    with torch.no_grad():
        x = x_ND.to(sae.W_dec.device)
        sse = var = 0.0
        for i in range(0, len(x), 4096):
            xb = x[i : i + 4096]
            sse += float((sae(xb).recon.float() - xb).pow(2).sum())
        var = float((x - x.mean(0)).pow(2).sum())
    return {"fvu": sse / var, "tokens_per_s": res.tokens_per_second}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--arch", default="relu,jumprelu,topk,gated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-rows", type=int, default=16_384)
    ap.add_argument("--dense-too", action="store_true",
                    help="relu/gated: also train with the sparse training path off")
    args = ap.parse_args()
    from saelab.data.store import ActivationStore
    from saelab.data.stream import sample_rows

    x_ND = sample_rows(ActivationStore.open(args.store), args.eval_rows, seed=123)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, d_sae {args.d_sae}, "
          f"batch {args.batch}, {args.steps} steps, FVU on {len(x_ND):,} store rows", flush=True)
    rows = []
    for arch in args.arch.split(","):
        fp32, bf16 = run(args, arch, "off", x_ND), run(args, arch, "bf16", x_ND)
        row = {"arch": arch, "fp32": fp32, "bf16": bf16}
        if "error" in bf16:
            print(f"{arch:10s} fp32 FVU {fp32['fvu']:.4f}  bf16: unsupported ({bf16['error']})")
        else:
            row["rel_fvu_diff"] = (bf16["fvu"] - fp32["fvu"]) / fp32["fvu"]
            row["speedup"] = bf16["tokens_per_s"] / fp32["tokens_per_s"]
            print(f"{arch:10s} FVU fp32 {fp32['fvu']:.4f}  bf16 {bf16['fvu']:.4f}  "
                  f"({100 * row['rel_fvu_diff']:+.2f}%)   tokens/s fp32 "
                  f"{fp32['tokens_per_s']:,.0f}  bf16 {bf16['tokens_per_s']:,.0f}  "
                  f"(x{row['speedup']:.2f})", flush=True)
        if args.dense_too and arch in ("relu", "gated"):
            for mode, name in (("off", "fp32"), ("bf16", "bf16")):
                d = run(args, arch, mode, x_ND, dense=True)
                ref = row[name]
                row[f"{name}_dense"] = d
                print(f"{'':10s} {name} dense-only path: FVU {d['fvu']:.4f} (sparse path "
                      f"{ref['fvu']:.4f}, {100 * (ref['fvu'] - d['fvu']) / d['fvu']:+.2f}%)  "
                      f"tokens/s {d['tokens_per_s']:,.0f} (sparse path "
                      f"{ref['tokens_per_s']:,.0f}, x{ref['tokens_per_s'] / d['tokens_per_s']:.2f})",
                      flush=True)
        rows.append(row)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
