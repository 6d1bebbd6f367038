"""One contender of ``train_throughput.py``: builds a training step, then times it on request.

Runs in saelab's venv (``saelab/*``, ``ceiling/*``) or in the baselines venv (``sparsify/*``,
``sae_lens/*``), so it imports only what its contender needs. Protocol (stdout lines starting
with ``BENCH``, anything else a library prints is ignored by the controller)::

    worker → BENCH {"ready": true, ...}             after set-up and warm-up
    stdin  ← run N                                   time N steps
    worker → BENCH {"times": [seconds, ...]}
    stdin  ← fvu PATH                                held-out FVU on the rows in PATH
    worker → BENCH {"fvu": value}
    stdin  ← quit

Every contender trains on the same rows (``--rows``: a safetensors file with ``rows`` [N, D]),
cycling through them one batch per step, with the library's own defaults unless stated.
``--dead-fraction f`` marks the same fixed f·d_sae latents dead in the library's *own*
dead-latent counter before every step, so its AuxK loss runs (the set-up is not timed).
``--warmup N`` untimed training steps come first; ``--run-steps`` is the run length saelab's
schedules assume (the L1 warm-up is 5% of it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

D_SAE, K = 4096, 32


def _emit(obj: dict) -> None:
    sys.__stdout__.write("BENCH " + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def _dead_idx(d_sae: int, fraction: float) -> torch.Tensor:
    n = int(round(fraction * d_sae))
    return torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))[:n]


# ---- saelab -----------------------------------------------------------------------------------
def saelab_step(arch: str, rows: torch.Tensor, batch: int, dead_fraction: float,
                autocast: str = "auto", lr: float | None = None, run_steps: int = 10**6):
    from saelab.config import SAEConfig, TrainConfig
    from saelab.saes.registry import build_sae, with_family
    from saelab.train.trainer import Trainer

    # k applies to the families that have one (relu / gated have none)
    sae = build_sae(with_family(SAEConfig(architecture=arch, d_in=rows.shape[1], d_sae=D_SAE,
                                          options={"k": K}), strict=False))
    sae.init_from_data(rows[:batch])
    tr = Trainer(sae, TrainConfig(tokens=batch * run_steps, batch_size=batch, log_every=10**9,
                                  checkpoint_every=0, autocast=autocast, lr=lr),
                 progress=False)
    dead = _dead_idx(D_SAE, dead_fraction)

    def prepare() -> None:
        tr.dead.tokens_since_fired[dead] = tr.dead.window_tokens + 1

    def step(x: torch.Tensor) -> None:
        tr._train_step(x)  # the trainer's real step: loss, backward, N1, clip, Adam, tracking
        tr.step += 1

    step.recon = lambda x: sae(x).recon
    step.sae = sae
    return step, prepare


# ---- dense-matmul ceiling ---------------------------------------------------------------------
def ceiling_step(rows: torch.Tensor, batch: int, dtype: torch.dtype = torch.float32):
    """Only the five [B,D]x[D,F]-sized matmuls of a ReLU SAE step, into preallocated outputs:
    encoder forward, decoder forward, decoder weight grad, code grad, encoder weight grad
    (all in ``dtype``; the rows are cast outside the timed step)."""
    D = rows.shape[1]
    g = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(D, D_SAE, generator=g) / D**0.5).to(dtype)
    W_dec = (torch.randn(D_SAE, D, generator=g) / D_SAE**0.5).to(dtype)
    f_BF = torch.empty(batch, D_SAE, dtype=dtype)
    df_BF = torch.empty(batch, D_SAE, dtype=dtype)
    r_BD = torch.empty(batch, D, dtype=dtype)
    dW_dec = torch.empty(D_SAE, D, dtype=dtype)
    dW_enc = torch.empty(D, D_SAE, dtype=dtype)
    cast = {}

    def step(x: torch.Tensor) -> None:
        if dtype != x.dtype:  # cast once per batch: the real step gets its rows in dtype
            if x.data_ptr() not in cast:
                cast[x.data_ptr()] = x.to(dtype)
            x = cast[x.data_ptr()]
        torch.mm(x, W_enc, out=f_BF)
        torch.mm(f_BF, W_dec, out=r_BD)
        torch.mm(f_BF.T, r_BD, out=dW_dec)
        torch.mm(r_BD, W_dec.T, out=df_BF)
        torch.mm(x.T, df_BF, out=dW_enc)

    return step, None


# ---- EleutherAI sparsify ----------------------------------------------------------------------
def sparsify_step(rows: torch.Tensor, batch: int, dead_fraction: float, bf16: bool = False,
                  lr_warmup: int = 1000):
    """The body of ``sparsify.Trainer.fit`` for one batch (fvu loss, optimizer="adam"), calling
    sparsify's own SparseCoder forward (fused TopK encoder, AuxK, eager embedding_bag decoder),
    gradient projection, decoder renormalisation and dead-latent bookkeeping. AuxK is on
    (auxk_alpha = 1/32) so its dead-latent check runs, as in saelab. ``bf16``: the forward under
    bf16 autocast, which sparsify itself applies on CUDA only (``SparseCoder.forward``)."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    sae = SparseCoder(rows.shape[1], SparseCoderConfig(num_latents=D_SAE, k=K), device="cpu",
                      dtype=torch.float32)
    lr = 2e-4 / (sae.num_latents / 2**14) ** 0.5  # sparsify's default width law
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = get_linear_schedule_with_warmup(opt, lr_warmup, 10**6)  # 1000: sparsify's default
    auxk_alpha, threshold = 1 / 32, 10_000_000
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    did_fire = torch.zeros(D_SAE, dtype=torch.bool)
    dead = _dead_idx(D_SAE, dead_fraction)

    def prepare() -> None:
        since_fired[dead] = threshold + 1

    first = [True]

    def step(x: torch.Tensor) -> None:
        if first[0]:  # sparsify's trainer sets b_dec to the first batch's mean
            sae.b_dec.data = x.mean(0).to(sae.dtype)
            first[0] = False
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())
        float(out.auxk_loss.detach())
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()

    step.recon = lambda x: sae(x=x).sae_out
    return step, prepare


# ---- SAELens -----------------------------------------------------------------------------------
def saelens_step(arch: str, rows: torch.Tensor, batch: int, dead_fraction: float,
                 bf16: bool = False):
    """``SAETrainer.step`` (training_forward_pass incl. AuxK, dead-neuron tracking, backward,
    grad clipping, Adam, schedulers) with each training SAE's default config; ``bf16``: its
    ``autocast=True`` option (bf16 autocast around the training forward)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d = rows.shape[1]
    torch.manual_seed(0)
    if arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=D_SAE, k=K))
    elif arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=D_SAE, k=K))
    elif arch == "gated":
        from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

        sae = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=d, d_sae=D_SAE, l1_coefficient=1.0))
    elif arch == "relu":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=D_SAE,
                                                            l1_coefficient=1.0))
    else:
        raise SystemExit(f"unknown sae_lens contender {arch}")
    # lr_end: the runner config's post-init default (lr / 10); unused by the constant schedule
    cfg = SAETrainerConfig(total_training_samples=batch * 10**6, train_batch_size_samples=batch,
                           device="cpu", lr=3e-4, lr_end=3e-5, autocast=bf16)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    dead = _dead_idx(D_SAE, dead_fraction)

    def prepare() -> None:
        trainer.n_forward_passes_since_fired[dead] = cfg.dead_feature_window + 1

    def step(x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, prepare


def build(name: str, rows: torch.Tensor, batch: int, dead_fraction: float,
          lr: float | None = None, lr_warmup: int = 1000,
          run_steps: int = 10**6) -> tuple[Callable, Callable | None]:
    """``lib/arch[@precision]``: ``@fp32`` / ``@bf16`` pin the SAE's precision (saelab: its
    ``--autocast off|bf16``; baselines: their own bf16 autocast); no suffix: the library's
    default (saelab: ``--autocast auto``; baselines: float32 on a CPU)."""
    name, _, precision = name.partition("@")
    lib, _, arch = name.partition("/")
    bf16 = precision == "bf16"
    if lib == "saelab":
        mode = {"": "auto", "fp32": "off", "bf16": "bf16"}[precision]
        return saelab_step(arch, rows, batch, dead_fraction, mode, lr, run_steps)
    if lib == "ceiling":
        return ceiling_step(rows, batch, torch.bfloat16 if bf16 else torch.float32)
    if lib == "sparsify":
        return sparsify_step(rows, batch, dead_fraction, bf16, lr_warmup)
    if lib == "sae_lens":
        return saelens_step(arch, rows, batch, dead_fraction, bf16)
    raise SystemExit(f"unknown contender {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contender", required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dead-fraction", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=None, help="saelab: override the family's LR")
    ap.add_argument("--sparsify-lr-warmup", type=int, default=1000,
                    help="sparsify: LR warm-up steps (its default 1000)")
    ap.add_argument("--run-steps", type=int, default=10**6,
                    help="saelab: the length of the run its schedules (LR, L1 warm-up) assume")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    sys.stdout = sys.stderr  # library chatter must not reach the protocol stream
    from safetensors.torch import load_file

    rows = load_file(args.rows)["rows"]
    n_batches = rows.shape[0] // args.batch
    batches = [rows[i * args.batch:(i + 1) * args.batch] for i in range(n_batches)]
    t0 = time.perf_counter()
    step, prepare = build(args.contender, rows, args.batch, args.dead_fraction, args.lr,
                          args.sparsify_lr_warmup, args.run_steps)
    i = 0
    for _ in range(args.warmup):
        if prepare is not None:
            prepare()
        step(batches[i % n_batches])
        i += 1
    ready = {"ready": True, "setup_seconds": time.perf_counter() - t0,
             "torch": torch.__version__, "threads": torch.get_num_threads()}
    sae = getattr(step, "sae", None)
    if sae is not None:  # the code's density where timing starts (the L1 families' cost)
        with torch.no_grad():
            f = sae.encode(batches[i % n_batches])
        ready["density"] = float((f != 0).float().mean())
    _emit(ready)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "fvu":  # held-out FVU of the SAE as trained so far, rows from a file
            held = load_file(cmd[1])["rows"]
            with torch.no_grad():
                err = (step.recon(held).float() - held).pow(2).sum()
                fvu = float(err / (held - held.mean(0)).pow(2).sum())
            _emit({"fvu": fvu})
            continue
        times = []
        for _ in range(int(cmd[1])):
            if prepare is not None:
                prepare()
            t = time.perf_counter()
            step(batches[i % n_batches])
            times.append(time.perf_counter() - t)
            i += 1
        _emit({"times": times})


if __name__ == "__main__":
    main()
