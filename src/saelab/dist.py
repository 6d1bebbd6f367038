"""Tiny collective helpers for data-parallel SAE training (bottom layer: imports only torch).

Every helper is a no-op (or the single-process answer) unless a ``torch.distributed`` process
group is initialised with more than one rank, so SAE families can call them unconditionally
and a single-process run computes exactly what it did before they existed.

Convention (``saelab.train.distributed``): every rank holds ``B / W`` rows of the global batch
of ``B`` and the trainer *averages* gradients over the ``W`` ranks. A loss that is a mean over
rows therefore needs nothing; a loss normalised by a batch statistic must use the global
statistic (:func:`global_centered_sq_sum`), and a batch-level selection must select over the
global batch (:func:`global_kth_largest`, per column :func:`global_column_kth_largest`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def _reduce(t: Tensor, op) -> Tensor:
    if not is_distributed():
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=op)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a new tensor, no autograd); ``t`` itself when not distributed."""
    return _reduce(t, torch.distributed.ReduceOp.SUM) if is_distributed() else t


def all_reduce_max(t: Tensor) -> Tensor:
    return _reduce(t, torch.distributed.ReduceOp.MAX) if is_distributed() else t


def all_reduce_min(t: Tensor) -> Tensor:
    return _reduce(t, torch.distributed.ReduceOp.MIN) if is_distributed() else t


def all_reduce_any(mask: Tensor) -> Tensor:
    """Elementwise OR of a bool tensor over ranks (e.g. "latent fired on some rank")."""
    if not is_distributed():
        return mask
    return _reduce(mask.to(torch.uint8), torch.distributed.ReduceOp.MAX).bool()


def global_rows(n_local: int) -> int:
    """Rows of the global batch when every rank holds ``n_local`` (equal shards)."""
    return n_local * world_size()


def global_centered_sq_sum(x_BD: Tensor) -> Tensor:
    """``Σ‖x − x̄‖²`` over the *global* batch, ``x̄`` its global mean (no autograd across ranks).

    The denominator of a batch-normalised MSE (FVU). Single process: the local value, with the
    exact arithmetic of ``(x − x.mean(0)).flatten() @ itself`` (autograd intact)."""
    if not is_distributed():
        xc = (x_BD - x_BD.mean(0)).flatten()
        return torch.dot(xc, xc)
    x = x_BD.detach()
    n = torch.tensor([float(x.shape[0])], dtype=x.dtype, device=x.device)
    s = all_reduce_sum(torch.cat([x.sum(0), n]))
    mean_D = s[:-1] / s[-1]
    xc = (x - mean_D).flatten()
    return all_reduce_sum(torch.dot(xc, xc))


def global_kth_largest(v_N: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry of the concatenation of every rank's ``v_N`` (a 0-d tensor).

    Each rank contributes its local top ``min(k, N)`` (equal sizes across ranks, as the
    collectives need), so the gathered candidates hold the global top ``k``. Not distributed:
    the local k-th largest. ``k`` larger than the global size returns the global minimum."""
    k_local = min(k, v_N.numel())
    top = v_N.detach().reshape(-1).topk(k_local, sorted=False).values
    if is_distributed():
        parts = [torch.empty_like(top) for _ in range(world_size())]
        torch.distributed.all_gather(parts, top.contiguous())
        top = torch.cat(parts)
    k = min(k, top.numel())
    return top.topk(k, sorted=False).values.min()


def global_column_kth_largest(top_KC: Tensor, k_C: Tensor) -> Tensor:
    """Per column ``c``, the ``k_C[c]``-th largest entry of the union over ranks of that column.

    ``top_KC`` is each rank's local top ``K`` rows of every column (any order; ``K`` equal on
    every rank, as the collectives need): with ``K >= min(k_C.max(), local rows)`` the gathered
    candidates hold each column's global top ``k_C[c]``. ``k_C`` >= 1; one larger than the
    gathered rows gives the column's global minimum. Not distributed: the local answer."""
    top = top_KC.detach()
    if is_distributed():
        parts = [torch.empty_like(top) for _ in range(world_size())]
        torch.distributed.all_gather(parts, top.contiguous())
        top = torch.cat(parts)
    top = top.sort(dim=0, descending=True).values
    i_C = (k_C.to(torch.long) - 1).clamp(0, top.shape[0] - 1)
    return top.gather(0, i_C[None]).squeeze(0)


def broadcast_(tensors, src: int = 0) -> None:
    """Overwrite ``tensors`` (in place) with rank ``src``'s values."""
    if not is_distributed():
        return
    for t in tensors:
        torch.distributed.broadcast(t.data if hasattr(t, "data") else t, src=src)


def all_reduce_mean_grads_(params) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce.

    A parameter whose grad is None on some ranks but not others gets zeros there; one with no
    grad anywhere stays None (Adam then skips it, as a single process would)."""
    if not is_distributed():
        return
    params = list(params)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                       device=params[0].device)
    has = all_reduce_max(has).bool().tolist()
    live = [p for p, h in zip(params, has, strict=True) if h]
    if not live:
        return
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    W = world_size()
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        flat.div_(W)
        off = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[off : off + n].view_as(p.grad))
            off += n
