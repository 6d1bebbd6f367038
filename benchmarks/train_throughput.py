"""Training throughput of saelab against named baselines, measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py [--store STORE] [--rounds 5] [--steps 2]
        [--contenders default|all|NAME,...] [--threads 2] [--malloc tuned|default]

Setting: d_sae 4096, k 32, batch 4096, fp32, ``--threads`` intra-op threads (default 2), d_in
from the activations. Rows: ``--store`` (a saelab activation store), else a small store of real
SmolLM2-135M activations (blocks.12.hook_resid_post, d_in 576) harvested once with saelab into
``benchmarks/.cache/`` (Gaussian rows only if that fails; the table then says so). Rows are
scaled so ``E‖x‖ = √d`` (saelab's default input normalisation) and every contender trains on the
same batches.

Contenders (each a long-lived subprocess, ``benchmarks/_train_worker.py``):

- ``saelab/{topk,batchtopk,gated,relu}``: ``Trainer._train_step``, the trainer's real step;
- ``sparsify/topk``: EleutherAI sparsify (PyPI ``eai-sparsify`` 1.3.3): the body of its
  trainer's step around its own ``SparseCoder`` (fused TopK encoder, AuxK, eager decoder), with
  its ``adam`` optimiser choice;
- ``sae_lens/{topk,gated}`` (+ ``batchtopk``, ``relu`` with ``--contenders all``): SAELens
  (PyPI ``sae-lens`` 6.54.12) ``SAETrainer.step`` with each training SAE's default config;
- ``ceiling/relu``: only the five dense matmuls a ReLU step needs, into preallocated outputs;
- ``*+auxk``: the TopK contenders again with the same fixed 25% of latents (``--dead-fraction``)
  marked dead in each library's own dead-latent counter before every step, so AuxK runs.

The baselines are not saelab dependencies: they are installed on first use into a scratch venv
(``benchmarks/.venv-baselines``, gitignored; torch pinned to the running torch version first so
pip reuses the local CPU wheel) and run from there; ``--no-baselines`` skips them.

Fairness. Every contender runs in its own process with the same torch build, thread count and
rows, and the same glibc allocator setting: with ``--malloc tuned`` (default) all of them get
``GLIBC_TUNABLES`` equivalent to ``saelab.runtime.tune_malloc()`` (no mmap for big blocks, no
trimming), which is what the saelab CLI applies to itself; ``--malloc default`` leaves glibc's
defaults for all. Measurements are interleaved because the machine may be shared: every worker
warms up, then in each of ``--rounds`` rounds each contender (in rotated order) times
``--steps`` steps. A contender's figure is the median step time over all rounds; the spread
column is the interquartile range of its step times over the median, and each ratio is also
given as the range of per-round ratios, so noise is visible.

Trained state. saelab's relu and gated switch to a sparse training path once their code is
sparse (``saes/sparse.py: sparse_code_density``), which is most of a real run (L0 falls below
~2.5% of d_sae within ~100 steps of the 5% L1 warm-up). They are timed after ``--l1-warmup``
(150) untimed training steps of a ``--l1-run-steps`` (2000) step run, and the table gives each
such contender's code density where timing starts. The other contenders' step costs do not
depend on the weights (dense matmuls and elementwise passes throughout, or a fixed k), so they
are timed after ``--warmup`` steps from their initialisation.

Precision: ``name@fp32`` / ``name@bf16`` (see ``DEFAULT``). saelab's ``--autocast auto`` (the
default) trains the TopK family and relu as ``@bf16`` where bf16 matmuls are fast, which the
header line reports; every ratio names both sides' precision.

Targets (issue 13): TopK ≥ 1.5× sparsify with and without AuxK and ≥ 3× SAELens; Gated ≥ 2.5×
SAELens; ReLU ≥ 0.9× the dense-matmul ceiling of the same precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_train_worker.py"
BASELINE_VENV = HERE / ".venv-baselines"
BASELINE_PACKAGES = ("eai-sparsify==1.3.3", "sae-lens==6.54.12")
BATCH = 4096
#: ``@fp32`` / ``@bf16``: the SAE's precision (saelab: ``--autocast off|bf16``; sparsify and
#: SAELens: their own bf16 autocast, which sparsify applies on CUDA only); no suffix: float32
DEFAULT = ("saelab/topk@fp32", "saelab/topk@bf16", "sparsify/topk", "sparsify/topk@bf16",
           "sae_lens/topk",
           "saelab/topk@fp32+auxk", "saelab/topk@bf16+auxk", "sparsify/topk+auxk",
           "sparsify/topk@bf16+auxk",
           "saelab/batchtopk@bf16",
           "saelab/gated@fp32", "saelab/gated@bf16", "sae_lens/gated", "sae_lens/gated@bf16",
           "saelab/relu@fp32", "saelab/relu@bf16", "ceiling/relu", "ceiling/relu@bf16")
EXTRA = ("sae_lens/batchtopk", "sae_lens/relu", "sae_lens/topk+auxk")
#: (numerator, denominator, minimum ratio, label)
TARGETS = (
    ("saelab/topk@bf16", "sparsify/topk", 1.5, "TopK bf16-π vs sparsify fp32"),
    ("saelab/topk@bf16", "sparsify/topk@bf16", 1.5, "TopK vs sparsify, both bf16"),
    ("saelab/topk@fp32", "sparsify/topk", 1.5, "TopK vs sparsify, both fp32"),
    ("saelab/topk@bf16+auxk", "sparsify/topk+auxk", 1.5, "TopK+AuxK bf16-π vs sparsify fp32"),
    ("saelab/topk@bf16+auxk", "sparsify/topk@bf16+auxk", 1.5, "TopK+AuxK, both bf16"),
    ("saelab/topk@fp32+auxk", "sparsify/topk+auxk", 1.5, "TopK+AuxK, both fp32"),
    ("saelab/topk@bf16", "sae_lens/topk", 3.0, "TopK bf16-π vs SAELens fp32"),
    ("saelab/gated@bf16", "sae_lens/gated", 2.5, "Gated bf16 vs SAELens fp32"),
    ("saelab/gated@bf16", "sae_lens/gated@bf16", 2.5, "Gated vs SAELens, both bf16"),
    ("saelab/gated@fp32", "sae_lens/gated", 2.5, "Gated vs SAELens, both fp32"),
    ("saelab/gated@fp32", "sae_lens/gated@bf16", None, "Gated fp32 vs SAELens bf16"),
    ("saelab/relu@fp32", "ceiling/relu", 0.9, "ReLU vs dense ceiling, fp32"),
    ("saelab/relu@bf16", "ceiling/relu@bf16", 0.9, "ReLU vs dense ceiling, bf16"),
    ("saelab/relu@bf16", "ceiling/relu", None, "ReLU bf16 vs fp32 ceiling"),
    ("saelab/batchtopk@bf16", "sae_lens/batchtopk", None, "BatchTopK bf16-π vs SAELens"),
    ("saelab/relu@fp32", "sae_lens/relu", None, "ReLU vs SAELens, fp32"),
)
#: saelab contenders timed after --l1-warmup training steps (their cost depends on the density)
L1_FAMILIES = ("saelab/relu", "saelab/gated")
#: glibc equivalent of saelab.runtime.tune_malloc()
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:" \
               "glibc.malloc.top_pad=67108864"


# ---- rows ---------------------------------------------------------------------------------------
def load_rows(store: str | None, n: int) -> tuple[torch.Tensor, str]:
    """``n`` rows scaled to ``E‖x‖ = √d``, and where they came from."""
    from saelab.data.store import ActivationStore
    from saelab.data.stream import sample_rows

    source = store
    if not source:
        try:
            source = str(_harvest_default(n))
        except Exception as exc:  # no model / corpus on this machine
            print(f"  (could not harvest real activations: {exc}; using Gaussian rows)")
            x = torch.randn(n, 576, generator=torch.Generator().manual_seed(0))
            return _scale(x), "Gaussian noise (d_in 576)"
    x = sample_rows(ActivationStore.open(source), n)
    if x.shape[0] < n:
        raise SystemExit(f"{source} holds {x.shape[0]} rows; the benchmark needs {n}")
    return _scale(x[:n].float()), source


def _scale(x: torch.Tensor) -> torch.Tensor:
    return (x * (x.shape[1] ** 0.5 / x.norm(dim=1).mean())).contiguous()


def _harvest_default(n: int) -> Path:
    from saelab.config import DataConfig, HarvestConfig, ModelConfig
    from saelab.harvest import harvest

    path = HERE / ".cache" / f"smollm2-resid12-{n}"
    if not (path / "manifest.json").exists():
        print(f"  harvesting {n:,} real activation rows into {path} (once) ...", flush=True)
    cfg = HarvestConfig(model=ModelConfig(hook="blocks.12.hook_resid_post"), data=DataConfig(),
                        store=str(path), tokens=n)
    harvest(cfg, progress=False)
    return path


# ---- baselines venv -----------------------------------------------------------------------------
def baselines_python(venv: Path) -> Path:
    """Python of a venv holding the baselines; created and filled on first use."""
    py = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    want = " ".join((torch_pin, *BASELINE_PACKAGES))
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return py
    print(f"  installing baselines into {venv} ({want}); first run only ...", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the venv sees the running interpreter's site-packages (a .pth after its own), so pip finds
    # this very torch build installed and never fetches another (PyPI's default is a CUDA
    # build); the baselines' own packages still go into the venv
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parent.parent
    (Path(site) / "_saelab_torch.pth").write_text(f"{torch_site}\n")
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, torch_pin, *BASELINE_PACKAGES], check=True)
    stamp.write_text(want + "\n")
    return py


# ---- workers ------------------------------------------------------------------------------------
@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    info: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # median step time per round

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        tail = "".join(self.log.read_text(errors="replace").splitlines(True)[-15:])
        raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}):\n{tail}")

    def run(self, steps: int) -> None:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        t = self.read()["times"]
        self.times += t
        self.rounds.append(statistics.median(t))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def start(name: str, python: str, rows_path: Path, args, extra: tuple[str, ...] = ()) -> Worker:
    """Start a worker (its stderr, library chatter included, goes to a log beside the rows);
    ``extra``: more worker flags."""
    base, _, variant = name.partition("+")
    dead = args.dead_fraction if variant == "auxk" else 0.0
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if args.malloc == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    warmup = args.warmup
    if base.split("@")[0] in L1_FAMILIES:
        # their step cost falls with the code's density (the sparse path): time them at a
        # trained density, after the L1 warm-up of a --l1-run-steps run
        warmup = max(warmup, args.l1_warmup)
        extra = ("--run-steps", str(args.l1_run_steps), *extra)
    cmd = [python, str(WORKER), "--contender", base, "--rows", str(rows_path), "--batch",
           str(BATCH), "--threads", str(args.threads), "--warmup", str(warmup),
           "--dead-fraction", str(dead), *extra]
    log = rows_path.with_name(name.replace("/", "_") + ".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env, cwd=str(HERE.parent))
    w = Worker(name, proc, log)
    w.info = w.read()
    return w


# ---- report -------------------------------------------------------------------------------------
def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def report(workers: dict[str, Worker], header: str) -> dict:
    print(header)
    print(f"{'contender':22s} {'tokens/s':>10s} {'ms/step':>9s} {'spread':>7s} {'steps':>5s}"
          f" {'density':>8s}")
    res = {}
    for name, w in workers.items():
        med = statistics.median(w.times)
        iqr = (_q(w.times, 0.75) - _q(w.times, 0.25)) / med
        dens = w.info.get("density") if name.split("@")[0] in L1_FAMILIES else None
        res[name] = {"tokens_per_second": BATCH / med, "median_step_seconds": med,
                     "iqr_over_median": iqr, "steps": len(w.times), "round_medians": w.rounds,
                     "code_density": dens}
        print(f"{name:22s} {BATCH / med:10,.0f} {1e3 * med:9.1f} {100 * iqr:6.1f}% "
              f"{len(w.times):5d} {'' if dens is None else f'{100 * dens:7.2f}%'}")
    print()
    print(f"{'ratio':34s} {'median':>7s} {'per-round range':>16s} {'target':>7s}  met")
    ratios = {}
    for num, den, target, label in TARGETS:
        if num not in workers or den not in workers:
            continue
        a, b = workers[num], workers[den]
        ratio = statistics.median(b.times) / statistics.median(a.times)
        per_round = [rb / ra for ra, rb in zip(a.rounds, b.rounds, strict=True)]
        lo, hi = min(per_round), max(per_round)
        tgt = f"≥{target:g}" if target else "-"
        met = ("yes" if ratio >= target else "NO") if target else ""
        ratios[label] = {"ratio": ratio, "per_round_min": lo, "per_round_max": hi,
                         "target": target, "met": None if target is None else ratio >= target}
        print(f"{label:34s} {ratio:6.2f}x {lo:7.2f}-{hi:<7.2f}x {tgt:>7s}  {met}")
    return {"contenders": res, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="", help="activation store to draw rows from")
    ap.add_argument("--contenders", default="default",
                    help="default, all, or a comma list (e.g. saelab/topk,sparsify/topk)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--l1-warmup", type=int, default=150,
                    help="untimed training steps of saelab's relu/gated before timing (their "
                         "sparse path runs once the code is sparse; 0: time them from init)")
    ap.add_argument("--l1-run-steps", type=int, default=2000,
                    help="the run length their schedules assume (L1 warm-up: 5%% of it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    ap.add_argument("--dead-fraction", type=float, default=0.25)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--baselines-venv", default=str(BASELINE_VENV))
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    names = {"default": DEFAULT, "all": DEFAULT + EXTRA}.get(args.contenders)
    names = list(names or args.contenders.split(","))
    own = ("saelab/", "ceiling/")
    if args.no_baselines:
        names = [n for n in names if n.startswith(own)]
    base_py = None
    if any(not n.startswith(own) for n in names):
        base_py = str(baselines_python(Path(args.baselines_venv)))

    rows, source = load_rows(args.store, 4 * BATCH)
    from saelab.runtime import bf16_is_fast

    auto = "bf16" if bf16_is_fast("cpu") else "fp32"
    header = (f"d_in {rows.shape[1]}, d_sae 4096, k 32, batch {BATCH}, fp32 parameters, "
              f"--autocast auto = {auto} here, {args.threads} "
              f"threads, malloc {args.malloc} for all, torch {torch.__version__}, rows: {source}; "
              f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up "
              f"(saelab relu/gated: after {args.l1_warmup} training steps of a "
              f"{args.l1_run_steps}-step run)")
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        rows_path = Path(tmp) / "rows.safetensors"
        save_file({"rows": rows}, str(rows_path))
        try:
            for name in names:
                t0 = time.perf_counter()
                py = sys.executable if name.startswith(own) else base_py
                workers[name] = start(name, py, rows_path, args)
                print(f"  ready: {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
            order = list(workers.values())
            for r in range(args.rounds):
                for w in order[r % len(order):] + order[:r % len(order)]:
                    w.run(args.steps)
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for w in workers.values():
                w.close()
    print()
    out = report(workers, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": header, **out}, indent=2))


if __name__ == "__main__":
    main()
