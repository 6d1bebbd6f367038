"""Harvest throughput: fp32 vs bf16, against the bare truncated forward; multi-hook vs separate.

    .venv/bin/python benchmarks/harvest.py [--windows 48] [--hook blocks.12.hook_resid_post]
                                           [--device auto] [--json OUT.json]

On the embedded SmolLM2-135M-Instruct, on the same corpus windows (every timed side reads and
tokenises the corpus itself, as the harvest does):

1. ``bf16 micro-benchmark``: the cached verdict ``--model-dtype auto`` uses (fp32/bf16 matmul).
2. For fp32 and bf16: the real ``saelab.harvest`` path (truncated forward + keep mask + outlier
   filter + checksummed shard writes) against the bare truncated forward (``run_to_hooks`` on
   the same batches, nothing kept): the harvest's overhead, target >= 90% of the bare speed.
3. Clean next-token CE on ``--ce-windows`` held-out windows, fp32 vs bf16 (full forward).
4. ``--hook`` at 4 depths in one pass (``harvest_hooks``) against 4 separate harvests.
5. ``--ranks N`` (default 2; 0 skips): ``saelab harvest --nproc N`` (torchrun, one thread per
   rank) against ``saelab harvest`` in one process with all the threads, same windows, both
   through the CLI; tokens/s from each store's own harvest clock (model loading excluded) and
   from the wall clock (process start and model load included), and a check that both stores
   hold the same rows.

Numbers depend on the machine; the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saelab.config import DataConfig, HarvestConfig, ModelConfig
from saelab.data.corpus import iter_documents
from saelab.data.store import ActivationStore
from saelab.data.windows import batch_windows, iter_windows
from saelab.harvest import harvest, harvest_hooks, run_to_hooks
from saelab.models.hooks import parse_hook
from saelab.models.loading import load_model
from saelab.runtime import bf16_speedup, resolve_device, tune_malloc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--hook", default="blocks.12.hook_resid_post")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ce-windows", type=int, default=16)
    ap.add_argument("--skip-multi", action="store_true")
    ap.add_argument("--ranks", type=int, default=2, help="processes of the multi-rank harvest")
    ap.add_argument("--ranks-windows", type=int, default=96)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    tune_malloc()
    device = resolve_device(args.device)
    data = DataConfig()
    hook = parse_hook(args.hook)
    res: dict = {"device": str(device), "threads": torch.get_num_threads(),
                 "windows": args.windows, "hook": hook.name,
                 "bf16_matmul_speedup": round(bf16_speedup(device), 2)}
    print(f"device {device}, {torch.get_num_threads()} threads, {args.windows} windows x "
          f"{data.context_size} tokens, hook {hook.name}")
    print(f"bf16 micro-benchmark: bf16 matmul {res['bf16_matmul_speedup']:.2f}x fp32 "
          f"-> auto picks {'bfloat16' if res['bf16_matmul_speedup'] >= 1.3 else 'float32'}")
    rows = int(0.9 * args.windows * (data.context_size - 1))  # stops inside the windows

    def run_harvest(mcfg: ModelConfig, lm, hooks: list[str]) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = HarvestConfig(model=mcfg, data=data, store=str(Path(tmp) / "s"), tokens=rows,
                                lm_batch_size=args.batch, hooks=hooks)
            t0 = time.perf_counter()
            if len(hooks) > 1:
                harvest_hooks(cfg, progress=False, lm=lm)
            else:
                harvest(cfg, progress=False, lm=lm)
            return time.perf_counter() - t0

    def bare_forward(lm, n_win: int) -> float:
        t0 = time.perf_counter()
        windows = iter_windows(iter_documents(data, "train"), lm.tokenizer, data.context_size,
                               data.prepend_bos)
        done = 0
        with torch.inference_mode():
            for ids_BT in batch_windows(windows, args.batch):
                run_to_hooks(lm.model, ids_BT.to(lm.device), [hook])
                done += len(ids_BT)
                if done >= n_win:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def clean_ce(lm) -> float:
        windows = iter_windows(iter_documents(data, "eval"), lm.tokenizer, data.context_size,
                               data.prepend_bos)
        ids = torch.stack([w for _, w in zip(range(args.ce_windows), windows, strict=False)])
        total, n = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(ids), args.batch):
                ids_BT = ids[i : i + args.batch].to(lm.device)
                logits = lm.model(input_ids=ids_BT, use_cache=False).logits.float()
                total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                               ids_BT[:, 1:].flatten(), reduction="sum"))
                n += ids_BT[:, 1:].numel()
        return total / n

    n_win = -(-args.windows // args.batch) * args.batch
    n_tokens = n_win * data.context_size
    for dtype in ("float32", "bfloat16"):
        mcfg = ModelConfig(hook=hook.name, model_dtype=dtype, device=str(device))
        lm = load_model(mcfg)
        run_harvest(mcfg, lm, [hook.name])  # warm-up: allocator, kernels, tokenizer
        t_h = min(run_harvest(mcfg, lm, [hook.name]) for _ in range(2))
        t_b = min(bare_forward(lm, n_win) for _ in range(2))
        ce = clean_ce(lm)
        res[dtype] = {"harvest_tokens_per_s": n_tokens / t_h, "bare_tokens_per_s": n_tokens / t_b,
                      "harvest_vs_bare": t_b / t_h, "clean_ce": ce}
        print(f"{dtype:9s} harvest {n_tokens / t_h:8,.0f} tok/s   bare truncated forward "
              f"{n_tokens / t_b:8,.0f} tok/s   harvest/bare {t_b / t_h:6.1%}   clean CE "
              f"{ce:.4f} nats ({args.ce_windows} held-out windows)")
        if dtype == "float32" and not args.skip_multi:
            layers = [max(0, hook.layer * k // 4) for k in (1, 2, 3, 4)]
            hooks = [f"blocks.{L}.hook_resid_post" for L in layers]
            t_one = run_harvest(mcfg, lm, hooks)
            t_sep = sum(run_harvest(mcfg, lm, [h]) for h in hooks)
            res["multi_hook"] = {"hooks": hooks, "one_pass_s": t_one, "separate_s": t_sep,
                                 "speedup": t_sep / t_one}
            print(f"{len(hooks)} hooks ({', '.join(map(str, layers))}): one pass {t_one:.1f} s, "
                  f"{len(hooks)} separate harvests {t_sep:.1f} s -> {t_sep / t_one:.2f}x")
        del lm
    f32, b16 = res["float32"], res["bfloat16"]
    res["bf16_harvest_speedup"] = b16["harvest_tokens_per_s"] / f32["harvest_tokens_per_s"]
    res["bf16_clean_ce_delta"] = b16["clean_ce"] - f32["clean_ce"]
    print(f"bf16 / fp32 harvest speed {res['bf16_harvest_speedup']:.2f}x, clean CE change "
          f"{res['bf16_clean_ce_delta']:+.4f} nats")
    if args.ranks > 1:
        res["ranks"] = multi_rank(args, hook.name, str(device))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


def multi_rank(args, hook: str, device: str) -> dict:
    """``saelab harvest --nproc N`` against one process, through the CLI (section 5)."""
    data = DataConfig()
    T = data.context_size
    # one LM batch per block, so N ranks share the windows evenly
    shard_rows = args.batch * T
    tokens = int(0.95 * args.ranks_windows * (T - 1))
    threads = torch.get_num_threads()
    out = {"ranks": args.ranks, "windows": args.ranks_windows, "tokens": tokens}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for label, nproc in (("one_process", 1), (f"{args.ranks}_ranks", args.ranks)):
            path = Path(tmp) / label
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc))}
            cmd = [sys.executable, "-m", "saelab", "harvest", "--quiet", "--hook", hook,
                   "--device", device, "--tokens", str(tokens), "--shard-rows", str(shard_rows),
                   "--lm-batch-size", str(args.batch), "--out", str(path)]
            if nproc > 1:
                cmd += ["--nproc", str(nproc)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            store = stores[label] = ActivationStore.open(path)
            secs = store.manifest["harvest_stats"]["seconds"]
            out[label] = {"tokens_per_s": store.num_rows / secs, "wall_s": wall,
                          "threads_per_process": env["OMP_NUM_THREADS"]}
            print(f"{label:12s} {store.num_rows / secs:8,.0f} tok/s (harvest clock), "
                  f"wall {wall:6.1f} s incl. start + model load")
        one, many = stores.values()
        a = torch.cat([one.read_shard(i)["acts"] for i in range(len(one.shards))])
        b = torch.cat([many.read_shard(i)["acts"] for i in range(len(many.shards))])
        out["same_rows"] = bool(a.shape == b.shape and torch.allclose(a, b, atol=1e-4))
        out["speedup"] = (out[f"{args.ranks}_ranks"]["tokens_per_s"]
                          / out["one_process"]["tokens_per_s"])
    print(f"{args.ranks} ranks / one process: {out['speedup']:.2f}x (harvest clock); "
          f"same rows: {out['same_rows']}")
    return out


if __name__ == "__main__":
    main()
