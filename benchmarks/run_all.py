"""Every benchmark that compares saelab with a named baseline in one run (``make bench``).

    .venv/bin/python benchmarks/run_all.py [--quick] [--with-harvest] [train_throughput args...]

Runs ``train_throughput.py`` (training tokens/s of saelab topk / batchtopk / gated / relu against
EleutherAI sparsify, SAELens and the dense-matmul ceiling, with ratios and targets; see its
docstring for the method and fairness rules) and, with ``--with-harvest``, ``harvest.py``
(harvest tokens/s against a full-model forward). ``--quick`` runs fewer rounds. Other
arguments are passed to ``train_throughput.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    args = sys.argv[1:]
    with_harvest = "--with-harvest" in args
    quick = "--quick" in args
    args = [a for a in args if a not in ("--with-harvest", "--quick")]
    if quick:
        args = ["--rounds", "3", "--steps", "1", *args]
    print("== training throughput (benchmarks/train_throughput.py) ==", flush=True)
    rc = subprocess.call([sys.executable, str(HERE / "train_throughput.py"), *args])
    if with_harvest:
        print("\n== harvest throughput (benchmarks/harvest.py) ==", flush=True)
        rc = rc or subprocess.call([sys.executable, str(HERE / "harvest.py")])
    return rc


if __name__ == "__main__":
    sys.exit(main())
