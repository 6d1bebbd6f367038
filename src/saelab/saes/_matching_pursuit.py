"""Batched matching pursuit (docs/methods.md §9.2), signed and non-negative, on any device and dtype.

``MP(x, D, k)``: ``k`` times, pick the atom with the largest (absolute, or for the non-negative
version the largest positive) correlation with the residual, add that correlation to its
coefficient and subtract the atom's share from the residual. Atoms may be picked again; their
coefficients accumulate. Rows of ``D`` must be unit norm.

Two equivalent ways to keep the correlations ``c = r Dᵀ`` current:

- *residual*: recompute ``c = r Dᵀ`` every step, ``k`` dense ``[B, N, D]`` products;
- *Gram*: one dense product ``c = x Dᵀ``, then after picking atom ``i`` with coefficient ``a``,
  ``c ← c - a G[i]`` with ``G = D Dᵀ``: a ``[B, N]`` update per step instead of a matmul.

The Gram path is the fast one whenever ``G`` fits in memory (``N²`` entries). Rows are processed
in chunks so that the ``[chunk, N]`` correlation block stays cache-resident on a CPU.

The code is returned sparsely: ``idx_BK`` (atom picked at each step) and ``coef_BK`` (the
coefficient added at that step; repeats allowed), which :func:`dense_code` scatters into
``[B, N]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: columns per block of the two-level argmax (the correlation width is padded to a multiple)
BLOCK = 256
#: bytes of the [chunk, N] correlation block a CPU chunk aims for (fits a typical L2/L3 slice)
_CPU_BLOCK_BYTES = 4 << 20
#: bytes of the block on an accelerator (only bounds memory; there is no cache to fit)
_ACCEL_BLOCK_BYTES = 1 << 30
#: bytes of the correlation super-block whose x Dᵀ is one matmul (see matching_pursuit)
_OUTER_BLOCK_BYTES = 256 << 20


class MPResult(NamedTuple):
    idx_BK: Tensor  # int64 [B, k]: atom chosen at each step
    coef_BK: Tensor  # [B, k]: coefficient added at each step (0 where non-negative MP stopped)
    recon_BD: Tensor  # [B, D]: sum_t coef_t * D[idx_t]


def gram_matrix(atoms_ND: Tensor) -> Tensor:
    """``D Dᵀ`` (symmetric ``[N, N]``)."""
    return atoms_ND @ atoms_ND.T


def auto_chunk_rows(n_atoms: int, device: torch.device, itemsize: int = 4) -> int:
    budget = _CPU_BLOCK_BYTES if device.type == "cpu" else _ACCEL_BLOCK_BYTES
    return max(8, budget // max(1, n_atoms * itemsize))


def matching_pursuit(
    x_BD: Tensor,
    atoms_ND: Tensor,
    k: int,
    *,
    nonneg: bool = False,
    gram_NN: Tensor | None = None,
    chunk_rows: int | None = None,
) -> MPResult:
    """Matching pursuit of every row of ``x_BD`` over unit-norm ``atoms_ND``, ``k`` steps.

    ``gram_NN``: ``atoms_ND @ atoms_ND.T`` to use the Gram update (pass it when encoding many
    batches with one dictionary; :func:`padded_gram` gives the layout read without a copy, and
    a view into a larger zero-padded capacity buffer works too); None uses the residual path. ``nonneg``: pick the largest
    positive correlation and stop (coefficient 0 from then on) once none is positive.
    ``chunk_rows``: rows per block; None picks one that keeps a block ~4 MB on a CPU.
    """
    B, D = x_BD.shape
    N = atoms_ND.shape[0]
    if atoms_ND.shape[1] != D:
        raise ValueError(f"atoms have width {atoms_ND.shape[1]}, inputs {D}")
    x_BD = x_BD.to(atoms_ND.dtype)
    if N == 0 or k == 0 or B == 0:
        return MPResult(torch.zeros(B, k, dtype=torch.long, device=x_BD.device),
                        torch.zeros(B, k, dtype=x_BD.dtype, device=x_BD.device),
                        torch.zeros_like(x_BD))
    if gram_NN is not None:
        if gram_NN.shape[0] < N:
            raise ValueError(f"gram has {gram_NN.shape[0]} rows for {N} atoms")
        M = padded_width(N)
        if gram_NN.shape[1] < M:
            gram_NN = torch.nn.functional.pad(gram_NN[:, :N], (0, M - N))
        elif gram_NN.shape[1] > M or gram_NN.shape[0] > N:
            gram_NN = gram_NN[:N, :M]  # a view into a larger (capacity) buffer
    rows = chunk_rows or auto_chunk_rows(N, x_BD.device, x_BD.element_size())
    idx_BK = torch.empty(B, k, dtype=torch.long, device=x_BD.device)
    coef_BK = torch.empty(B, k, dtype=x_BD.dtype, device=x_BD.device)
    recon_BD = torch.empty_like(x_BD)
    if gram_NN is None:
        for s in range(0, B, rows):
            e = min(B, s + rows)
            _mp_residual(x_BD[s:e], atoms_ND, k, nonneg, idx_BK[s:e], coef_BK[s:e],
                         recon_BD[s:e])
        return MPResult(idx_BK, coef_BK, recon_BD)
    # the initial x Dᵀ runs over a super-block of many chunks: a matmul with few rows re-reads
    # all of D from memory per call and runs well below peak; the step loop then walks
    # cache-sized chunks of the result
    outer = max(rows, _OUTER_BLOCK_BYTES // max(1, padded_width(N) * x_BD.element_size()))
    for so in range(0, B, outer):
        eo = min(B, so + outer)
        c_all = _correlations(x_BD[so:eo], atoms_ND)
        for s in range(so, eo, rows):
            e = min(eo, s + rows)
            _mp_gram(c_all[s - so:e - so], atoms_ND, k, nonneg, gram_NN, idx_BK[s:e],
                     coef_BK[s:e], recon_BD[s:e])
    return MPResult(idx_BK, coef_BK, recon_BD)


def _pick(c_BM: Tensor, nonneg: bool, n_atoms: int) -> tuple[Tensor, Tensor]:
    """(index, value) of the largest |c| (or largest c) per row.

    Two-level: max over blocks of ``BLOCK`` columns, then within the winning block. Reductions
    that return indices over a long row are slow on CPUs; ``amax``/``amin`` over short blocks
    are vectorised, and the index search then runs on ``[B, M / BLOCK]`` and ``[B, BLOCK]``.
    Padding columns (index >= n_atoms) hold 0; one only wins when no real atom beats 0, and
    then its value is 0, so the clamped index contributes nothing.
    """
    B, M = c_BM.shape
    v_BJL = c_BM.view(B, M // BLOCK, BLOCK)
    hi_BJ = v_BJL.amax(dim=2)
    score_BJ = hi_BJ if nonneg else torch.maximum(hi_BJ, v_BJL.amin(dim=2).neg_())
    j_B = score_BJ.argmax(dim=1)
    flat = torch.arange(B, device=c_BM.device) * (M // BLOCK) + j_B
    seg_BL = c_BM.view(B * (M // BLOCK), BLOCK).index_select(0, flat)
    w_B = (seg_BL if nonneg else seg_BL.abs()).argmax(dim=1)
    a_B = seg_BL.gather(1, w_B[:, None]).squeeze(1)
    if nonneg:
        a_B = a_B.clamp_min(0)
    return (j_B * BLOCK + w_B).clamp_max_(n_atoms - 1), a_B


def padded_width(n_atoms: int) -> int:
    return -(-n_atoms // BLOCK) * BLOCK


def padded_gram(atoms_ND: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``D Dᵀ`` with zero columns up to a multiple of ``BLOCK``: the form the Gram path reads
    (pass this, not :func:`gram_matrix`, to skip a copy per call). ``dtype``: store it in
    another dtype, e.g. bfloat16 to halve the memory traffic of the per-step row reads (the
    correlations stay in the atoms' dtype; picks then follow a Gram rounded to 8 bits)."""
    N = atoms_ND.shape[0]
    out = atoms_ND.new_zeros(N, padded_width(N))
    torch.matmul(atoms_ND, atoms_ND.T, out=out[:, :N]) if N else None
    return out if dtype is None or dtype == out.dtype else out.to(dtype)


def _correlations(x_BD: Tensor, atoms_ND: Tensor) -> Tensor:
    N = atoms_ND.shape[0]
    if padded_width(N) == N:  # no padding: write the product in place, no copy
        return x_BD @ atoms_ND.T
    c_BM = x_BD.new_zeros(x_BD.shape[0], padded_width(N))
    c_BM[:, :N] = x_BD @ atoms_ND.T
    return c_BM


def _mp_gram(c_BM, atoms_ND, k, nonneg, gram_NM, idx_BK, coef_BK, recon_BD) -> None:
    """``c_BM``: the chunk's initial correlations (padded), updated in place."""
    N = atoms_ND.shape[0]
    rows_BM = torch.empty_like(c_BM)  # reused: no allocation per step
    # a Gram kept in another dtype (bf16: half the bytes per row read) is read into its own
    # buffer and cast, since mixed-dtype in-place arithmetic is slow on CPUs
    cast_BM = None if gram_NM.dtype == c_BM.dtype else c_BM.new_empty(c_BM.shape,
                                                                        dtype=gram_NM.dtype)
    for t in range(k):
        i_B, a_B = _pick(c_BM, nonneg, N)
        idx_BK[:, t] = i_B
        coef_BK[:, t] = a_B
        if cast_BM is None:
            torch.index_select(gram_NM, 0, i_B, out=rows_BM)
        else:
            rows_BM.copy_(torch.index_select(gram_NM, 0, i_B, out=cast_BM))
        c_BM.addcmul_(rows_BM, a_B[:, None], value=-1.0)
    # sum_t a_t D[i_t], accumulated step by step: gathering all k atoms at once would build a
    # [B, k, D] temporary (k times the inputs' size)
    recon_BD.zero_()
    for t in range(k):
        recon_BD.addcmul_(atoms_ND.index_select(0, idx_BK[:, t]), coef_BK[:, t, None])


def _mp_residual(x_BD, atoms_ND, k, nonneg, idx_BK, coef_BK, recon_BD) -> None:
    r_BD = x_BD.clone()
    for t in range(k):
        i_B, a_B = _pick(_correlations(r_BD, atoms_ND), nonneg, atoms_ND.shape[0])
        idx_BK[:, t] = i_B
        coef_BK[:, t] = a_B
        r_BD.addcmul_(atoms_ND.index_select(0, i_B), a_B[:, None], value=-1.0)
    torch.sub(x_BD, r_BD, out=recon_BD)


def dense_code(idx_BK: Tensor, coef_BK: Tensor, n_atoms: int) -> Tensor:
    """The ``[B, N]`` code: coefficients of repeated picks summed."""
    out = torch.zeros(idx_BK.shape[0], n_atoms, dtype=coef_BK.dtype, device=coef_BK.device)
    return out.scatter_add_(1, idx_BK, coef_BK)


def normalised_error(x_BD: Tensor, recon_BD: Tensor, eps: float = 1e-9) -> Tensor:
    """The reference's ITDA error: mean over dimensions of (x/‖x‖ - x̂/‖x̂‖)²  ``[B]``."""
    xn = x_BD / x_BD.norm(dim=1, keepdim=True).clamp_min(eps)
    rn = recon_BD / recon_BD.norm(dim=1, keepdim=True).clamp_min(eps)
    return (xn - rn).square().mean(dim=1)
