"""Sparse building blocks shared by the TopK family: sparse encoding and decoding, batch-level
selection, the normalised reconstruction loss and AuxK (docs/methods.md §0.6, §4).

Codes are kept sparse as ``(idx, vals)`` pairs so no dense ``[B, F]`` code is built in the hot
loop. Both directions of the SAE cost B·k·D per step instead of B·F·D, except the one dense
matmul that selection needs:

- decoding ``k`` latents per token is an ``embedding_bag`` over decoder rows, and its backward
  only touches the rows that fired;
- encoding (:class:`SparsePreActs`, :func:`topk_encode`): π is computed once *without autograd*,
  the selection runs on it, and only the selected entries are re-attached to the graph. Their
  backward forms ``dW_enc``, ``db_enc`` and (with the pre-encoder bias) ``db_dec`` from the
  selected entries alone, so the dense ``[D, B] × [B, F]`` gradient matmul and the dense
  ``[B, F]`` gradient of autograd-through-``topk`` are never built. Gradients are exact (the
  same numbers autograd gives through the dense π; tested in float64).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab import dist


class SparseCode(NamedTuple):
    """Active latents of a batch.

    Per-token layout: ``idx``/``vals`` are ``[B, K]`` and ``offsets`` is None. Ragged layout
    (batch-level selection): ``idx``/``vals`` are flat ``[N]``, grouped by row, and row ``b``
    owns entries ``offsets[b]:offsets[b+1]`` (``offsets`` has ``B + 1`` entries).
    """

    idx: Tensor
    vals: Tensor
    offsets: Tensor | None = None

    def decode(self, W_dec_FD: Tensor) -> Tensor:
        """``f @ W_dec`` without the dense code (no bias); sparse backward (:class:`_SparseDecode`)."""
        return _SparseDecode.apply(self.vals, W_dec_FD, self.idx, self.offsets)

    def dense(self, batch: int, d_sae: int) -> Tensor:
        """The dense ``[B, F]`` code (for ``encode`` and tests, not the training loop)."""
        out = self.vals.new_zeros(batch, d_sae)
        if self.offsets is None:
            return out.scatter_(1, self.idx, self.vals)
        rows = self.rows()
        out[rows, self.idx] = self.vals
        return out

    def rows(self) -> Tensor:
        """Row index of every entry (ragged layout) or ``[B, K]`` row ids (per-token)."""
        if self.offsets is None:
            B, K = self.idx.shape
            return torch.arange(B, device=self.idx.device)[:, None].expand(B, K)
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(len(counts), device=self.idx.device), counts,
                                       output_size=self.idx.numel())

    def fired(self, d_sae: int) -> Tensor:
        """bool ``[F]``: latents with a nonzero code somewhere in the batch (no host sync)."""
        nz = (self.vals != 0).flatten().to(torch.uint8)
        hits = torch.zeros(d_sae, dtype=torch.uint8, device=self.idx.device)
        return hits.scatter_reduce_(0, self.idx.flatten(), nz, "amax").bool()

    def l0(self, batch: int) -> Tensor:
        """Mean number of nonzero codes per row."""
        return (self.vals != 0).sum().float() / batch


# ---- sparse decoder ---------------------------------------------------------------------------
def _bags(idx: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(flat indices, bag start offsets [B], bag of every entry)`` for ``embedding_bag``."""
    code = SparseCode(idx, idx, offsets)
    if offsets is None:
        B, K = idx.shape
        starts = torch.arange(0, B * K, K, device=idx.device)
    else:
        starts = offsets[:-1]
    return idx.reshape(-1), starts, code.rows().reshape(-1)


def _embedding_bag_sum(idx: Tensor, vals: Tensor, offsets: Tensor | None, W_FD: Tensor) -> Tensor:
    starts = None if offsets is None else offsets[:-1]
    return F.embedding_bag(idx, W_FD, starts, per_sample_weights=vals, mode="sum")


class _SparseDecode(torch.autograd.Function):
    """``Σ_e vals_e W[idx_e]`` per row (an ``embedding_bag``), with a faster backward than
    ``embedding_bag``'s: ``dW`` is :func:`scatter_rows` of the output gradient, ``dvals_e`` the
    dot product ``W[idx_e] · g[row(e)]``. Same numbers (up to summation order)."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_FD: Tensor, idx: Tensor, offsets: Tensor | None) -> Tensor:
        ctx.save_for_backward(vals, W_FD, idx, offsets)
        return _embedding_bag_sum(idx, vals, offsets, W_FD)

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        vals, W_FD, idx, offsets = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        d_vals = d_W = None
        if ctx.needs_input_grad[0]:
            flat, starts, bag = _bags(idx, offsets)
            d_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_BD, W_FD, flat, starts, bag, 0, -1).view(vals.shape)
        if ctx.needs_input_grad[1]:
            d_W = scatter_rows(idx, offsets, vals, g_BD, W_FD.shape[0]).to(W_FD.dtype)
        return d_vals, d_W, None, None


# ---- sparse encoder backward ------------------------------------------------------------------
#: column block width of the sparse scatter: a [F, w] output block and the [B, w] input block stay
#: in cache while the entries hit rows at random (~1.3-2x faster than unblocked on a 2-core CPU)
_BLOCK = 128


def scatter_rows(idx: Tensor, offsets: Tensor | None, weights: Tensor, rows_BD: Tensor,
                 n_out: int, *, transpose: bool = False) -> Tensor:
    """``out[f] = Σ_{entries e with idx_e = f} weights_e · rows_BD[row(e)]`` → ``[n_out, D]``
    (``[D, n_out]``, contiguous, with ``transpose``).

    ``idx``/``weights``/``offsets`` are in :class:`SparseCode` layout. This is the weight
    gradient of an ``embedding_bag`` and the encoder-weight gradient of a sparse code: the
    product ``Gᵀ · rows`` with ``G`` the code's ``[B, n_out]`` matrix. ``Gᵀ`` is built as CSR by
    one argsort of the entries by latent, then multiplied one column block of ``rows`` at a
    time. No ``[N, D]`` temporary is made. On a 2-core AVX2 CPU at B·k = 131k, D = 576 (one
    thread) this took ~100 ms against ~180-210 ms for ``embedding_bag``'s backward and for
    ``torch.sparse.mm`` of the transposed ``[B, F]`` CSR matrix, and ~400 ms for ``index_add_``
    of an ``[N, D]`` product temporary (sparsify's encoder backward).
    """
    B, D = rows_BD.shape
    perm, crow, col = _by_latent(idx, offsets, n_out)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        G = torch.sparse_csr_tensor(crow, col, weights.reshape(-1)[perm].to(rows_BD.dtype),
                                    (n_out, B), check_invariants=False)
    out = rows_BD.new_empty((n_out, D))
    for a in range(0, D, _BLOCK):
        b = min(D, a + _BLOCK)
        out[:, a:b].copy_(G @ rows_BD[:, a:b].contiguous())
    if not transpose:
        return out
    # transposed in row blocks: each [256, D] source block and its [D, 256] target stay in
    # cache, unlike transposing each [n_out, _BLOCK] product as it is made
    out_T = rows_BD.new_empty((D, n_out))
    for a in range(0, n_out, 256):
        out_T[:, a:a + 256].copy_(out[a:a + 256].T)
    return out_T


def _by_latent(idx: Tensor, offsets: Tensor | None, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(perm, crow, col)``: the entries of a code sorted by latent (``perm``), as the CSR
    structure of its ``[n_out, B]`` transpose. A training step scatters over the same code twice
    (the decoder-weight and the encoder-weight gradient), so the argsort is kept on the ``idx``
    tensor itself (codes are built fresh every step and never modified in place)."""
    memo = getattr(idx, "_saelab_by_latent", None)
    if memo is not None and memo[0] == n_out and memo[1] is offsets:
        return memo[2]
    flat = idx.reshape(-1)
    perm = flat.argsort()
    entry_rows = SparseCode(idx, idx, offsets).rows().reshape(-1)
    crow = torch.zeros(n_out + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n_out), 0, out=crow[1:])
    out = (perm, crow, entry_rows[perm])
    idx._saelab_by_latent = (n_out, offsets, out)
    return out


class _SelectedPreActs(torch.autograd.Function):
    """``π[row(e), idx_e]`` for the entries of a code, with the sparse encoder backward.

    π = ``(x − b_dec) W + b_enc`` (``b_dec``/``b_enc`` may be None). The forward reads the
    values from the precomputed, detached ``pre_BF``; the backward, given ``g_e = dL/dπ_e``::

        s_F        = Σ_e g_e [idx_e = F]                        (db_enc)
        dW[:, f]   = Σ_{e: idx_e = f} g_e x_row(e)  −  b_dec s_f
        db_dec     = −W s
        dx_b       = Σ_{e in row b} g_e W[:, idx_e]             (only if x needs grad)
    """

    @staticmethod
    def forward(ctx, pre_BF: Tensor, x_BD: Tensor, W_DF: Tensor, b_enc_F: Tensor | None,
                b_dec_D: Tensor | None, idx: Tensor, offsets: Tensor | None,
                rows: Tensor | None = None) -> Tensor:
        if offsets is None:
            vals = pre_BF.gather(1, idx)
        else:
            if rows is None:
                rows = SparseCode(idx, idx, offsets).rows()
            vals = pre_BF[rows, idx]
        # under autocast π is bf16; the selected values join the float32 graph
        vals = vals.to(W_DF.dtype)
        ctx.has_b_dec = b_dec_D is not None
        ctx.save_for_backward(x_BD, W_DF, b_dec_D, idx, offsets)
        return vals

    @staticmethod
    def backward(ctx, g: Tensor):
        x_BD, W_DF, b_dec_D, idx, offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        Fdim = W_DF.shape[1]
        g = g.contiguous()
        s_F = None
        if need[3] or need[4] or (need[2] and ctx.has_b_dec):
            s_F = g.new_zeros(Fdim).index_add_(0, idx.reshape(-1), g.reshape(-1))
        dW = d_benc = d_bdec = dx = None
        if need[2]:
            dW = scatter_rows(idx, offsets, g, x_BD, Fdim, transpose=True)
            if ctx.has_b_dec:
                dW.addr_(b_dec_D, s_F, alpha=-1)
        if need[3]:
            d_benc = s_F
        if need[4]:
            d_bdec = -(W_DF @ s_F)
        if need[1]:
            dx = SparseCode(idx, g, offsets).decode(W_DF.T.contiguous())
        return None, dx, dW, d_benc, d_bdec, None, None, None


class _DeadColumnsDecode(torch.autograd.Function):
    """AuxK's dense regime as one node: ``ê = (m ⊙ π[:, cols]) @ W_dec[cols]``, where the
    multiplier ``m_BN`` is the selection mask (already 0 where ReLU would cut), times an optional
    per-latent weight, and ``p_BN`` the detached ``π[:, cols]``; the backward forms every
    gradient from ``dπ = m ⊙ (g W_dec[cols]ᵀ)`` with ``[B, n] × D`` GEMMs over those columns only:

        dW_dec[cols] = (m ⊙ π)ᵀ g        dW_enc[:, cols] = (x − b_dec)ᵀ dπ
        db_enc[cols] = Σ_b dπ            db_dec = −W_enc[:, cols] Σ_b dπ      dx = dπ W_enc[:, cols]ᵀ

    A GEMM multiply-add is far cheaper than a random row gather, so this beats the B·k_aux·D
    scatter of the sparse regime once k_aux / n ≳ ``_AUX_DENSE_DENSITY``. Under autocast the
    GEMMs of both directions run in its dtype (the backward replays the caller's autocast
    state, which autograd does not restore for custom functions); the result is float32.
    """

    @staticmethod
    def forward(ctx, p_BN: Tensor, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor | None,
                b_dec_D: Tensor | None, W_dec_FD: Tensor, cols: Tensor, m_BN: Tensor) -> Tensor:
        dev = x_BD.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W_dec_FD.dtype
        z_BN = p_BN.to(cd) * m_BN.to(cd)
        Wd_ND = W_dec_FD.index_select(0, cols).to(cd)
        ctx.cd, ctx.has_b_dec = cd, b_dec_D is not None
        ctx.save_for_backward(x_BD, W_enc_DF, b_dec_D, cols, m_BN, z_BN, Wd_ND)
        return (z_BN @ Wd_ND).to(W_dec_FD.dtype)

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        x_BD, W_enc_DF, b_dec_D, cols, m_BN, z_BN, Wd_ND = ctx.saved_tensors
        need = ctx.needs_input_grad
        cd, out = ctx.cd, W_enc_DF.dtype
        g_cd = g_BD.contiguous().to(cd)
        dx = dW_enc = d_benc = d_bdec = dW_dec = None
        if need[5]:
            dW_dec = W_enc_DF.new_zeros(W_enc_DF.shape[1], Wd_ND.shape[1])
            dW_dec.index_copy_(0, cols, (z_BN.T @ g_cd).to(out))
        if not any(need[1:5]):
            return None, None, None, None, None, dW_dec, None, None
        dp_BN = (g_cd @ Wd_ND.T).mul_(m_BN.to(cd))
        s_N = dp_BN.sum(0, dtype=out)
        We_DN = W_enc_DF.index_select(1, cols) if (need[1] or need[4]) else None
        if need[2]:
            dW_DN = (x_BD.to(cd).T @ dp_BN).to(out)
            if ctx.has_b_dec:
                dW_DN.addr_(b_dec_D, s_N, alpha=-1)
            dW_enc = W_enc_DF.new_zeros(W_enc_DF.shape).index_copy_(1, cols, dW_DN)
        if need[3]:
            d_benc = s_N.new_zeros(W_enc_DF.shape[1]).index_copy_(0, cols, s_N)
        if need[4]:
            d_bdec = -(We_DN @ s_N)
        if need[1]:
            dx = (dp_BN @ We_DN.T.to(cd)).to(x_BD.dtype)
        return None, dx, dW_enc, d_benc, d_bdec, dW_dec, None, None


def encoder_pre_acts(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor | None = None,
                     b_dec_D: Tensor | None = None) -> Tensor:
    """``π = (x − b_dec) W_enc + b_enc`` as one GEMM with the folded bias ``b_enc − b_dec W_enc``
    (no ``[B, D]`` subtraction, no extra ``[B, F]`` pass); a None bias is left out."""
    bias_F = b_enc_F
    if b_dec_D is not None:
        shift_F = b_dec_D @ W_enc_DF
        bias_F = -shift_F if bias_F is None else bias_F - shift_F
    if bias_F is None:
        return x_BD @ W_enc_DF
    return torch.addmm(bias_F, x_BD, W_enc_DF)


class SparsePreActs:
    """Encoder pre-activations ``π = (x − b_dec) W_enc + b_enc`` for sparse training.

    ``dense`` is π ``[B, F]`` computed with one ``addmm`` and *no autograd*: run the selection
    on it. :meth:`gather` then returns the selected entries as differentiable values whose
    gradients reach ``W_enc``, ``b_enc``, ``b_dec`` (and ``x`` if it needs grad) through the
    sparse backward of :class:`_SelectedPreActs`. Pass ``b_dec_D=None`` without the
    pre-encoder bias and ``b_enc_F=None`` for encoders without one.
    """

    def __init__(self, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor | None = None,
                 b_dec_D: Tensor | None = None, dense: Tensor | None = None):
        self.x_BD, self.W_enc_DF, self.b_enc_F, self.b_dec_D = x_BD, W_enc_DF, b_enc_F, b_dec_D
        if dense is not None:  # π computed by the caller (detached)
            self.dense = dense
            return
        with torch.no_grad():
            self.dense = encoder_pre_acts(x_BD, W_enc_DF, b_enc_F, b_dec_D)

    @property
    def shape(self) -> torch.Size:
        return self.dense.shape

    def gather(self, idx: Tensor, offsets: Tensor | None = None,
               rows: Tensor | None = None) -> Tensor:
        """Differentiable π at the entries of a code (``SparseCode`` layout; ``rows``: each
        entry's row, if the caller has it)."""
        return _SelectedPreActs.apply(self.dense, self.x_BD, self.W_enc_DF, self.b_enc_F,
                                      self.b_dec_D, idx, offsets, rows)

    def positive(self, src_BF: Tensor | None = None) -> SparseCode:
        """Ragged code of the entries where ``src`` (default: π itself) is positive, grouped by
        row, with differentiable values π there (the sparse training path of relu / gated)."""
        nz = (self.dense if src_BF is None else src_BF).nonzero()
        code = ragged_code(nz, nz[:, 1], self.dense.shape[0])
        return code._replace(vals=self.gather(code.idx, code.offsets, nz[:, 0]))

    def decode_columns(self, cols: Tensor, m_BN: Tensor, W_dec_FD: Tensor,
                       p_BN: Tensor | None = None) -> Tensor:
        """Differentiable ``(m ⊙ π[:, cols]) @ W_dec[cols]`` (:class:`_DeadColumnsDecode`);
        ``p_BN``: ``π[:, cols]`` if the caller has it already."""
        if p_BN is None:
            p_BN = self.dense[:, cols]
        return _DeadColumnsDecode.apply(p_BN, self.x_BD, self.W_enc_DF, self.b_enc_F,
                                        self.b_dec_D, W_dec_FD, cols, m_BN)


def attach_grad(pre: SparsePreActs, code: SparseCode, signed: bool = False) -> SparseCode:
    """``code`` with its values recomputed from ``pre`` so they carry gradients.

    The values become ``ReLU(π)`` (``π`` if ``signed``) at the selected entries; entries the
    selection zeroed (``vals == 0``, e.g. unmatched Feature Choice slots) stay zero. The numbers
    equal ``code.vals`` for every selection that keeps ``act(π)`` values.
    """
    v = pre.gather(code.idx, code.offsets)
    if not signed:
        v = torch.relu(v)
    return code._replace(vals=torch.where(code.vals != 0, v, 0.0))


def topk_encode(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor | None, b_dec_D: Tensor | None,
                k: int, signed: bool = False) -> tuple[SparseCode, SparsePreActs]:
    """TopK (or AbsTopK) encoding for training with the sparse encoder backward.

    Returns the code (differentiable ``vals``) and the :class:`SparsePreActs` (dense π for AuxK
    and other selections). Same values and gradients as ``topk_per_token(π, k, signed)`` with
    autograd through the dense π, at B·k·D backward cost instead of B·F·D.
    """
    pre = SparsePreActs(x_BD, W_enc_DF, b_enc_F, b_dec_D)
    code = topk_per_token(pre.dense, min(k, pre.shape[1]), signed=signed)
    return attach_grad(pre, code, signed=signed), pre


# ---- selection --------------------------------------------------------------------------------
def topk_per_token(pre_BF: Tensor, k: int, signed: bool = False) -> SparseCode:
    """TopK (§4.1): ``ReLU(TopK_k(π))``, or AbsTopK (§5): the k largest ``|π|`` with signs."""
    if signed:
        _, idx = pre_BF.abs().topk(k, dim=-1, sorted=False)
        return SparseCode(idx, pre_BF.gather(1, idx))
    vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
    return SparseCode(idx, torch.relu(vals))


def topk_per_batch(acts_BF: Tensor, k_total: int, relu: bool = False) -> SparseCode:
    """BatchTopK (§4.8): the ``k_total`` largest entries of the whole batch (ragged rows).

    ``acts_BF`` should be non-negative (post-ReLU), or pass π with ``relu=True``: the selection
    on π equals the one on ReLU(π) up to ties at 0, and skips a [B, F] ReLU pass. Returned
    entries are grouped by row.
    """
    B, Fdim = acts_BF.shape
    k_total = min(k_total, acts_BF.numel())
    vals, flat = _topk_flat(acts_BF.reshape(-1), k_total)
    if relu:
        vals = torch.relu(vals)
    flat, order = flat.sort()
    vals = vals[order]
    rows = torch.div(flat, Fdim, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=B)
    offsets = torch.zeros(B + 1, dtype=torch.long, device=acts_BF.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SparseCode(flat - rows * Fdim, vals, offsets)


def topk_per_global_batch(acts_BF: Tensor, k_total: int, relu: bool = False) -> SparseCode:
    """:func:`topk_per_batch` over the *global* batch of a data-parallel run: ``k_total``
    counts the entries of every rank's rows, and each rank keeps its entries at or above the
    global ``k_total``-th largest value (the same set up to ties). Single process: exactly
    :func:`topk_per_batch`."""
    if not dist.is_distributed():
        return topk_per_batch(acts_BF, k_total, relu)
    tau = dist.global_kth_largest(acts_BF.reshape(-1), k_total)
    idx = (acts_BF >= tau).nonzero()  # row-major: grouped by row, as topk_per_batch's
    vals = acts_BF[idx[:, 0], idx[:, 1]]
    if relu:
        vals = torch.relu(vals)
    return ragged_code(idx, vals, acts_BF.shape[0])


def sample_density(v_BF: Tensor, rows: int = 512) -> float:
    """Fraction of nonzero entries in ~``rows`` evenly strided rows of ``v`` (one host sync):
    enough to choose a training path, at a fraction of a full counting pass."""
    v = v_BF[::max(1, v_BF.shape[0] // rows)]
    return int(torch.count_nonzero(v)) / max(1, v.numel())


def train_on_sparse_code(code_BF: Tensor, override: float | None = None) -> bool:
    """Whether an L1 family's step should take its sparse path: the code's sampled density
    (:func:`sample_density`) is below :func:`sparse_code_density` (no sync when that is 0)."""
    below = sparse_code_density(code_BF, override)
    return below > 0 and sample_density(code_BF) < below


def sparse_code_density(code_BF: Tensor, override: float | None = None) -> float:
    """Density (fraction of ``[B, F]`` entries active) below which the L1 families (relu,
    gated) train on the sparse code: decoding and every gradient then cost ~N·D random-row work
    instead of ``[B, F] × D`` GEMMs. The crossover depends on how fast those GEMMs are: measured
    on a 2-core AVX512-BF16 CPU at B = F = 4096, D = 576 at ~5% with bf16 GEMMs (autocast) and
    ~15% in float32 (docs/methods.md §0.10); these defaults sit just below. Not measured on a
    GPU, whose GEMMs are far faster than its gathers: dense there (0). ``override``, if not
    None, is returned instead."""
    if override is not None:
        return override
    if code_BF.device.type != "cpu":
        return 0.0
    return 1 / 8 if code_BF.dtype in (torch.float32, torch.float64) else 1 / 20


def ragged_code(idx_N2: Tensor, vals_N: Tensor, batch: int) -> SparseCode:
    """Ragged ``SparseCode`` from ``(row, latent)`` pairs already grouped by row (the order of
    ``mask.nonzero()``) and their values."""
    counts = torch.bincount(idx_N2[:, 0], minlength=batch)
    offsets = torch.zeros(batch + 1, dtype=torch.long, device=idx_N2.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SparseCode(idx_N2[:, 1], vals_N, offsets)


def _topk_flat(v_N: Tensor, k: int, chunk: int = 8) -> tuple[Tensor, Tensor]:
    """``v_N.topk(k, sorted=False)`` for large ``k``, exact up to ties, ~4x faster on CPU.

    Split ``v`` into strided chunks of ``chunk`` entries and keep the ``k`` chunks with the
    largest maxima: the k-th largest chunk maximum is a lower bound of the k-th largest entry
    (those k chunks hold k distinct entries above it), so every top-k entry lies in a kept chunk
    (or ties with the k-th value). The final ``topk`` then runs over ``k·chunk`` candidates.
    """
    N = v_N.numel()
    C = N // chunk
    if k * chunk * 2 > N:
        return v_N.topk(k, sorted=False)
    _, cid = v_N[:C * chunk].view(chunk, C).amax(0).topk(k, sorted=False)
    pos = (cid[None, :] + torch.arange(0, C * chunk, C, device=v_N.device)[:, None]).reshape(-1)
    if C * chunk < N:  # the ragged tail is always a candidate
        pos = torch.cat([pos, torch.arange(C * chunk, N, device=v_N.device)])
    vals, j = v_N.gather(0, pos).topk(k, sorted=False)
    return vals, pos[j]


# ---- losses -----------------------------------------------------------------------------------
def normalized_mse(recon_BD: Tensor, x_BD: Tensor) -> Tensor:
    """Batch FVU ``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (the sparsify form of §4.2's normalised MSE).

    Data-parallel: the denominator is the global batch's, and each rank returns W times its
    share of the global FVU, so the rank mean (gradients are averaged) is the global FVU."""
    if dist.is_distributed():
        var = dist.global_centered_sq_sum(x_BD)
        return (F.mse_loss(recon_BD, x_BD, reduction="sum") * dist.world_size()
                / var.clamp_min(1e-12))
    xc = (x_BD - x_BD.mean(0)).flatten()
    # one BLAS dot, no squared temporary; torch.dot, not @, which autocast would run in bf16
    var = torch.dot(xc, xc)
    return F.mse_loss(recon_BD, x_BD, reduction="sum") / var.clamp_min(1e-12)


#: AuxK decodes densely over the dead columns when k_aux >= this fraction of them (measured
#: crossover ~1/15 on a 2-core AVX2 CPU: a random row gather costs ~15x a GEMM multiply-add)
_AUX_DENSE_DENSITY = 1 / 16


def auxk_loss(pre_BF: Tensor | SparsePreActs, residual_BD: Tensor, W_dec_FD: Tensor,
              dead_mask_F: Tensor | None, k_aux: int, *, signed: bool = False,
              scale_by_dead: bool = False, weight_F: Tensor | None = None) -> Tensor:
    """AuxK (§0.6): the top-``k_aux`` dead latents reconstruct the (detached) residual.

    ``L_aux = ‖ê − e‖² / ‖e − ē‖²`` over the batch, ``ê`` decoded without ``b_dec``; exactly 0
    (and no gradient) when nothing is dead. Only the dead latents' encoder columns and decoder
    rows get gradient. ``signed`` selects by ``|π|`` keeping signs (AbsTopK, §5.3);
    ``scale_by_dead`` multiplies by ``min(n_dead / k_aux, 1)`` (sparsify); ``weight_F``
    (optional, per latent) scales each latent's code, as aux_zipf_loss's deficit weighting.

    ``pre_BF`` is either π with autograd or a :class:`SparsePreActs`. With the latter no
    ``[B, F]`` gradient is built: when ``k_aux ≥ n_dead·_AUX_DENSE_DENSITY`` the dead columns
    are handled densely (``[B, n_dead]`` GEMMs, :class:`_DeadColumnsDecode`), otherwise sparsely
    (the B·k_aux selected entries, :class:`_SelectedPreActs` and the sparse decoder).
    Finding the dead set costs one host sync (``nonzero``); the trainer calls this once a step.
    """
    dense_BF = pre_BF.dense if isinstance(pre_BF, SparsePreActs) else pre_BF
    if dead_mask_F is None:
        return dense_BF.new_zeros(())
    dead_idx = dead_mask_F.nonzero().squeeze(1)
    n_dead = dead_idx.numel()
    if n_dead == 0 or k_aux <= 0:
        return dense_BF.new_zeros(())
    e_BD = residual_BD.detach()
    k = min(k_aux, n_dead)
    if k >= _AUX_DENSE_DENSITY * n_dead:
        # dense over the dead columns only, in both directions: at k_aux / n_dead ≳ 1/16 the
        # [B, n_dead] x D GEMMs (decode forward and backward, encoder-weight gradient) beat
        # B·k_aux random row gathers and scatters
        with torch.no_grad():
            p_BN = dense_BF.detach()[:, dead_idx]  # (advanced indexing beats index_select)
            code = topk_per_token(p_BN, k, signed=signed)
            # the code's multiplier: 1 at the selected entries (0 where ReLU cuts), × weight
            hit_BK = (torch.ones_like(code.vals) if signed else (code.vals > 0).to(code.vals))
            if weight_F is not None:
                hit_BK = hit_BK * weight_F[dead_idx][code.idx].to(hit_BK)
            m_BN = torch.zeros_like(p_BN).scatter_(1, code.idx, hit_BK)
        if isinstance(pre_BF, SparsePreActs):
            e_hat_BD = pre_BF.decode_columns(dead_idx, m_BN, W_dec_FD, p_BN)
        else:
            e_hat_BD = (pre_BF.index_select(1, dead_idx) * m_BN) @ W_dec_FD.index_select(0, dead_idx)
    else:
        code = topk_per_token(dense_BF.index_select(1, dead_idx), k, signed=signed)
        idx = dead_idx[code.idx]
        vals = code.vals
        if isinstance(pre_BF, SparsePreActs):
            vals = attach_grad(pre_BF, SparseCode(idx, vals), signed=signed).vals
        if weight_F is not None:
            vals = vals * weight_F[idx]
        e_hat_BD = SparseCode(idx, vals).decode(W_dec_FD)
    loss = normalized_mse(e_hat_BD, e_BD)
    if scale_by_dead:
        loss = loss * min(n_dead / k_aux, 1.0)
    return loss
