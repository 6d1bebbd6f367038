"""Sparse building blocks shared by the TopK family: sparse decoding, batch-level selection,
the normalised reconstruction loss and AuxK (METHODS.md §0.6, §4).

Codes are kept sparse as ``(idx, vals)`` pairs so no dense ``[B, F]`` code is built in the hot
loop: decoding ``k`` latents per token is an ``embedding_bag`` over decoder rows (B·k·D work,
not B·F·D), and its backward only touches the rows that fired.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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
        """``f @ W_dec`` without the dense code (no bias)."""
        if self.offsets is None:
            return F.embedding_bag(self.idx, W_dec_FD, per_sample_weights=self.vals, mode="sum")
        return F.embedding_bag(self.idx, W_dec_FD, self.offsets[:-1], per_sample_weights=self.vals,
                               mode="sum", include_last_offset=False)

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
        return torch.repeat_interleave(torch.arange(len(counts), device=self.idx.device), counts)

    def fired(self, d_sae: int) -> Tensor:
        """bool ``[F]``: latents with a nonzero code somewhere in the batch."""
        fired = torch.zeros(d_sae, dtype=torch.bool, device=self.idx.device)
        nz = self.vals != 0
        return fired.index_fill_(0, self.idx[nz].flatten(), True)

    def l0(self, batch: int) -> Tensor:
        """Mean number of nonzero codes per row."""
        return (self.vals != 0).sum().float() / batch


def topk_per_token(pre_BF: Tensor, k: int, signed: bool = False) -> SparseCode:
    """TopK (§4.1): ``ReLU(TopK_k(π))``, or AbsTopK (§5): the k largest ``|π|`` with signs."""
    if signed:
        _, idx = pre_BF.abs().topk(k, dim=-1, sorted=False)
        return SparseCode(idx, pre_BF.gather(1, idx))
    vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
    return SparseCode(idx, torch.relu(vals))


def topk_per_batch(acts_BF: Tensor, k_total: int) -> SparseCode:
    """BatchTopK (§4.8): the ``k_total`` largest entries of the whole batch (ragged rows).

    ``acts_BF`` should be non-negative (post-ReLU). Returned entries are grouped by row.
    """
    B, Fdim = acts_BF.shape
    k_total = min(k_total, acts_BF.numel())
    vals, flat = acts_BF.flatten().topk(k_total, sorted=False)
    flat, order = flat.sort()
    vals = vals[order]
    rows = torch.div(flat, Fdim, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=B)
    offsets = torch.zeros(B + 1, dtype=torch.long, device=acts_BF.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SparseCode(flat - rows * Fdim, vals, offsets)


def normalized_mse(recon_BD: Tensor, x_BD: Tensor) -> Tensor:
    """Batch FVU ``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (the sparsify form of §4.2's normalised MSE)."""
    var = (x_BD - x_BD.mean(0)).pow(2).sum()
    return (recon_BD - x_BD).pow(2).sum() / var.clamp_min(1e-12)


def auxk_loss(pre_BF: Tensor, residual_BD: Tensor, W_dec_FD: Tensor, dead_mask_F: Tensor | None,
              k_aux: int, *, signed: bool = False, scale_by_dead: bool = False,
              weight_F: Tensor | None = None) -> Tensor:
    """AuxK (§0.6): the top-``k_aux`` dead latents reconstruct the (detached) residual.

    ``L_aux = ‖ê − e‖² / ‖e − ē‖²`` over the batch, ``ê`` decoded without ``b_dec``; exactly 0
    (and no gradient) when nothing is dead. Only the dead latents' encoder columns and decoder
    rows get gradient. ``signed`` selects by ``|π|`` keeping signs (AbsTopK, §5.3);
    ``scale_by_dead`` multiplies by ``min(n_dead / k_aux, 1)`` (sparsify); ``weight_F``
    (optional, per latent) scales each latent's code, as aux_zipf_loss's deficit weighting.

    Finding the dead set costs one host sync (``nonzero``); the trainer calls this once a step.
    """
    if dead_mask_F is None:
        return pre_BF.new_zeros(())
    dead_idx = dead_mask_F.nonzero().squeeze(1)
    n_dead = dead_idx.numel()
    if n_dead == 0 or k_aux <= 0:
        return pre_BF.new_zeros(())
    e_BD = residual_BD.detach()
    k = min(k_aux, n_dead)
    p_dead = pre_BF.index_select(1, dead_idx)
    code = topk_per_token(p_dead, k, signed=signed)
    vals = code.vals
    if weight_F is not None:
        vals = vals * weight_F[dead_idx][code.idx]
    e_hat_BD = F.embedding_bag(dead_idx[code.idx], W_dec_FD, per_sample_weights=vals, mode="sum")
    loss = normalized_mse(e_hat_BD, e_BD)
    if scale_by_dead:
        loss = loss * min(n_dead / k_aux, 1.0)
    return loss
