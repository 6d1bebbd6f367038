"""Training throughput of saelab's trainer against named baselines measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py [--store STORE] [--steps 8]
        [--saelens-python /path/to/venv/bin/python]

Setting: d_in 576 (or the store's), d_sae 4096, batch 4096, fp32, real activations from a store
when given (else Gaussian rows; throughput does not depend on the values much for dense
families). Baselines:

- ``reference``: the same loss written as plain PyTorch autograd straight from METHODS.md (no
  fused encoder, default allocator), with torch.optim.Adam — what a direct implementation pays;
- ``sae_lens``: SAELens's own training step, if ``--saelens-python`` points at a venv with
  ``sae-lens`` installed (it is not a saelab dependency); run in a subprocess on the same rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_SAE, BATCH = 4096, 4096


def load_rows(store: str | None, n: int, d_in: int = 576) -> torch.Tensor:
    if not store:
        return torch.randn(n, d_in, generator=torch.Generator().manual_seed(0)) * 5
    from saelab.data.store import ActivationStore
    from saelab.data.stream import sample_rows

    return sample_rows(ActivationStore.open(store), n)


def reference_gated_loss(p: dict, x: torch.Tensor, lam: float) -> torch.Tensor:
    """METHODS §2.2-2.3 written directly, autograd through every op."""
    xb = x - p["b_dec"]
    pi_gate = xb @ p["W_enc"] + p["b_gate"]
    pi_mag = xb @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]
    f = (pi_gate > 0).float() * torch.relu(pi_mag)
    recon = f @ p["W_dec"] + p["b_dec"]
    gate = torch.relu(pi_gate)
    aux = gate @ p["W_dec"].detach() + p["b_dec"].detach()
    return ((recon - x) ** 2).sum(-1).mean() + lam * gate.sum(-1).mean() + \
        ((aux - x) ** 2).sum(-1).mean()


def reference_relu_loss(p: dict, x: torch.Tensor, lam: float) -> torch.Tensor:
    f = torch.relu(x @ p["W_enc"] + p["b_enc"])
    recon = f @ p["W_dec"] + p["b_dec"]
    return ((recon - x) ** 2).sum(-1).mean() + lam * (f * p["W_dec"].norm(dim=1)).sum(-1).mean()


def time_reference(arch: str, rows: torch.Tensor, steps: int) -> float:
    d = rows.shape[1]
    g = torch.Generator().manual_seed(0)
    p = {"W_enc": torch.randn(d, D_SAE, generator=g) / d**0.5,
         "W_dec": torch.randn(D_SAE, d, generator=g) / d**0.5,
         "b_dec": torch.zeros(d), "b_enc": torch.zeros(D_SAE), "b_gate": torch.zeros(D_SAE),
         "r_mag": torch.zeros(D_SAE), "b_mag": torch.zeros(D_SAE)}
    for t in p.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(p.values(), lr=1e-4)
    loss_fn = reference_gated_loss if arch == "gated" else reference_relu_loss

    def step(i: int) -> None:
        x = rows[(i * BATCH) % (len(rows) - BATCH):][:BATCH]
        loss = loss_fn(p, x, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time(step, steps)


def time_saelab(arch: str, rows: torch.Tensor, steps: int) -> float:
    from saelab.config import SAEConfig, TrainConfig
    from saelab.saes.registry import build_sae
    from saelab.train.trainer import Trainer

    sae = build_sae(SAEConfig(architecture=arch, d_in=rows.shape[1], d_sae=D_SAE))
    tr = Trainer(sae, TrainConfig(tokens=BATCH * (steps + 2) * 10, batch_size=BATCH,
                                  log_every=10**9, checkpoint_every=0), progress=False)

    def step(i: int) -> None:
        tr._train_step(rows[(i * BATCH) % (len(rows) - BATCH):][:BATCH])
        tr.step += 1

    return _time(step, steps)


def _time(step, steps: int) -> float:
    for i in range(2):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 2)
    return steps * BATCH / (time.perf_counter() - t0)


SAELENS_SCRIPT = r"""
import sys, time, json, torch
from safetensors.torch import load_file
from sae_lens.saes.sae import TrainStepInput
arch, path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = load_file(path)["rows"]
d = rows.shape[1]
if arch == "gated":
    from sae_lens.saes.gated_sae import GatedTrainingSAE as C, GatedTrainingSAEConfig as K
    cfg = K(d_in=d, d_sae=4096, l1_coefficient=1.0)
else:
    from sae_lens.saes.standard_sae import StandardTrainingSAE as C, StandardTrainingSAEConfig as K
    cfg = K(d_in=d, d_sae=4096, l1_coefficient=1.0)
sae = C(cfg)
opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
def step(i):
    x = rows[(i * 4096) % (len(rows) - 4096):][:4096]
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 1.0},
                                                   dead_neuron_mask=None, n_training_steps=i,
                                                   is_logging_step=False))
    opt.zero_grad(); out.loss.backward(); opt.step()
for i in range(2): step(i)
t0 = time.perf_counter()
for i in range(steps): step(i + 2)
print(json.dumps({"tps": steps * 4096 / (time.perf_counter() - t0)}))
"""


def time_saelens(python: str, arch: str, rows: torch.Tensor, steps: int) -> float | None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.safetensors"
        save_file({"rows": rows.contiguous()}, str(path))
        proc = subprocess.run([python, "-c", SAELENS_SCRIPT, arch, str(path), str(steps)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (sae_lens baseline failed: {proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["tps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--saelens-python", default="")
    ap.add_argument("--archs", default="gated,relu")
    args = ap.parse_args()

    from saelab.runtime import tune_malloc

    rows = load_rows(args.store, BATCH * 4)
    print(f"d_in {rows.shape[1]}, d_sae {D_SAE}, batch {BATCH}, fp32, "
          f"{torch.get_num_threads()} threads, rows from {args.store or 'Gaussian noise'}")
    for arch in args.archs.split(","):
        ref = time_reference(arch, rows, args.steps)
        lens = time_saelens(args.saelens_python, arch, rows, args.steps) \
            if args.saelens_python else None
        tune_malloc()  # ours runs with the allocator set as the CLI sets it
        ours = time_saelab(arch, rows, args.steps)
        line = f"{arch:6s} saelab {ours:8,.0f} tok/s | reference {ref:8,.0f} ({ours / ref:.2f}x)"
        if lens:
            line += f" | sae_lens {lens:8,.0f} ({ours / lens:.2f}x)"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
