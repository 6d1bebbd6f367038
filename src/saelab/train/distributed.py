"""Data-parallel SAE training on one machine: the torchrun launcher and process-group setup.

``saelab train --nproc N ...`` relaunches itself as ``python -m torch.distributed.run
--standalone --nproc-per-node N -m saelab train ...`` (``--nproc`` removed); every worker then
calls :func:`init_from_env`, which joins the process group torchrun describes in the
environment (gloo on CPU, NCCL on CUDA, one GPU per local rank).

What each piece does under W ranks (the maths is in ``saelab.dist``):

* the stream (``ActivationStream(rank=, world_size=)``) keeps the single-process global batch
  order and gives rank ``r`` its contiguous ``B / W`` rows of every batch;
* the trainer averages gradients, ORs the "fired" masks for the dead-latent counters, logs
  global metrics, and writes checkpoints / logs only on rank 0;
* losses normalised by a batch statistic and batch-level selections use global statistics.

So W ranks at global batch B take the same optimiser steps as one process at batch B, up to
float summation order, and a run can be resumed with any W that divides B.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch

from saelab import dist
from saelab.config import from_dict
from saelab.errors import ConfigError
from saelab.runtime import resolve_device


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun (it sets these for every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str | torch.device = "auto") -> bool:
    """Join the process group torchrun set up; returns True if this is a distributed run.

    Idempotent; does nothing outside torchrun or with a world of one. On CUDA each worker
    takes GPU ``LOCAL_RANK`` (so ``cuda`` means that GPU) and the backend is NCCL; else gloo.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if torch.distributed.is_initialized():
        return True
    dev = resolve_device(str(device))
    if dev.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"{os.environ['WORLD_SIZE']} processes but only {torch.cuda.device_count()} "
                "GPUs: lower --nproc to the number of GPUs")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``saelab <argv minus --nproc>`` on ``nproc``
    workers on this machine (``--standalone`` picks a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "-m", "saelab", *strip_nproc(argv)]


def relaunch(argv: Sequence[str], nproc: int) -> int:
    """Run ``saelab <argv>`` under torchrun with ``nproc`` workers; returns its exit code.

    CPU threads are split between the workers unless ``OMP_NUM_THREADS`` is set (torchrun's
    default of one thread per worker leaves cores idle when nproc < cores)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))
    proc = subprocess.Popen(torchrun_command(argv, nproc), env=env, stderr=subprocess.PIPE)
    return _relay_stderr(proc, sys.stderr.buffer)


# torchrun's own report once a worker fails: log lines of its agent such as "W1202 01:05:39.3
# 123 .../elastic/multiprocessing/api.py:1028] Sending process 5 closing signal SIGTERM" and
# "E1202 ... failed (exitcode: 2) local_rank: 0 ...", then its traceback and a summary table
_REPORT = re.compile(rb"(?m)^[EW]\d{4} [^\n]*torch/distributed/elastic/multiprocessing/"
                     rb"[^\n]*(?:failed \(exitcode|closing signal)")
_FAILED = re.compile(rb"failed \(exitcode: (-?\d+)\)")


def _relay_stderr(proc: subprocess.Popen, out) -> int:
    """Pass the workers' stderr through as it comes (progress bars included) and return the
    exit code. When a worker stopped on a user error (exit 2, its one ``error:`` line already
    printed), torchrun's multi-screen failure report is dropped and 2 returned; any other
    failure keeps the report (it names the worker and the signal) and returns torchrun's code."""
    held = b""  # the unfinished last line, not yet written (it may start torchrun's report)
    report = b""
    while chunk := proc.stderr.read1(65536):
        if report:
            report += chunk
            continue
        text = held + chunk
        m = _REPORT.search(text)
        if m:
            out.write(text[: m.start()])
            report = text[m.start():]
            continue
        cut = text.rfind(b"\n") + 1
        # a partial line that cannot be the report's start goes out now (a progress bar)
        if not text[cut:].startswith((b"E", b"W")) or b"\r" in text[cut:]:
            cut = len(text)
        out.write(text[:cut])
        out.flush()
        held = text[cut:]
    out.write(held)
    rc = proc.wait()
    codes = {int(c) for c in _FAILED.findall(report)}
    if report and codes == {2}:
        return 2  # a user error: the worker printed its one line
    out.write(report)
    out.flush()
    return rc


_NEEDS_STORE = ("distributed training needs an existing activation store: harvest one with "
                "`saelab harvest --out STORE ...` and pass --store STORE")


def prepare_ranks(cfg, prepare: Callable):
    """Rank 0 checks/prepares the run folder (``prepare(cfg)``), then every other rank takes
    the same resolved config (the saved one on resume) without touching the folder."""
    payload: list = [None]
    if dist.is_main():
        if not cfg.store and not cfg.resume:  # a resumed run has its saved --store
            raise ConfigError(_NEEDS_STORE)
        cfg = prepare(cfg)
        if not cfg.store:
            raise ConfigError(_NEEDS_STORE)
        payload[0] = dataclasses.asdict(cfg)
    # a rank-0 failure ends this process, and torchrun then stops the others
    torch.distributed.broadcast_object_list(payload, src=0)
    if not dist.is_main():
        cfg = from_dict(type(cfg), payload[0])
    return cfg
