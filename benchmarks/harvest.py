"""Harvest throughput against the full-model forward on the same tokens (named baseline).

    .venv/bin/python benchmarks/harvest.py [--windows 96] [--hook blocks.12.hook_resid_post]

Both sides run the embedded SmolLM2-135M-Instruct in the same dtype on the same windows, and
both read and tokenise the corpus inside the timed region. "harvest" is the real `saelab.harvest` path (truncated forward + keep mask + outlier
filter + shard writing with checksums) into a temporary store; the baseline is a plain
`model(ids)` full forward, which is what a harvester that does not stop at the hook pays.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=96)
    ap.add_argument("--hook", default="blocks.12.hook_resid_post")
    ap.add_argument("--model-dtype", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    from saelab.config import DataConfig, HarvestConfig, ModelConfig
    from saelab.data.corpus import iter_documents
    from saelab.data.windows import iter_windows
    from saelab.harvest import harvest
    from saelab.models.loading import load_model
    from saelab.runtime import tune_malloc

    tune_malloc()
    mcfg = ModelConfig(hook=args.hook, model_dtype=args.model_dtype)
    lm = load_model(mcfg)
    data = DataConfig()

    def corpus_windows(n: int) -> torch.Tensor:
        """The first ``n`` windows of the corpus, read and tokenised as the harvest does."""
        windows = []
        for w in iter_windows(iter_documents(data, "train"), lm.tokenizer, data.context_size,
                              data.prepend_bos):
            windows.append(w)
            if len(windows) == n:
                break
        return torch.stack(windows)

    def real_harvest() -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as tmp:
            # The harvest walks the same corpus from its start, so it sees the same windows;
            # ask for slightly fewer rows than they hold so it stops inside them.
            rows = int(0.9 * args.windows * (data.context_size - 1))
            cfg = HarvestConfig(model=mcfg, data=data, store=str(Path(tmp) / "s"), tokens=rows,
                                lm_batch_size=args.batch)
            t0 = time.perf_counter()
            store = harvest(cfg, progress=False, lm=lm)
            return time.perf_counter() - t0, store.num_windows

    def full_forward(n_win: int) -> float:
        # Same work before the LM as the harvest (corpus -> windows), so the ratio is the LM's.
        t0 = time.perf_counter()
        ids_NT = corpus_windows(n_win)
        with torch.inference_mode():
            for i in range(0, n_win, args.batch):
                lm.model(ids_NT[i:min(n_win, i + args.batch)].to(lm.device), use_cache=False)
        return time.perf_counter() - t0

    real_harvest()  # warm-up (allocator, kernels, tokenizer)
    t_harv, n_win = min(real_harvest() for _ in range(2))
    # the harvest forwards whole LM batches and keeps the rows it needs: count what it ran
    n_win = -(-n_win // args.batch) * args.batch
    t_full = min(full_forward(n_win) for _ in range(2))
    n_tokens = n_win * data.context_size
    full_tps, harv_tps = n_tokens / t_full, n_tokens / t_harv
    print(f"model SmolLM2-135M-Instruct ({lm.dtype}), hook {args.hook}, "
          f"{torch.get_num_threads()} threads, {n_win} windows x {data.context_size} tokens")
    print(f"baseline  full-model forward   {full_tps:9,.0f} tokens/s")
    print(f"saelab    harvest (to store)   {harv_tps:9,.0f} tokens/s   "
          f"ratio {harv_tps / full_tps:.2f}x")


if __name__ == "__main__":
    main()
