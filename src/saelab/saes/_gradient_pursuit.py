"""Gradient pursuit (GP) as an inference-time encoder for any SAE's decoder (docs/methods.md §12.5a).

Non-negative GP with an exact line search, batched over tokens, one step per selected atom:

    w = 0
    repeat L times:
        r = x − w D                  # residual
        c = r Dᵀ ; S ← S ∪ {argmax c} # most positively correlated atom (non-negative codes)
        g = c on S (0 elsewhere)     # gradient of ½‖r‖² on the active set
        q = g D ; η = (q·r)/(q·q)    # exact line search along g
        w ← max(0, w + η g)          # clip to non-negative

The active set is the atoms with a nonzero weight plus the newly chosen one, as in the
reference code (JoshEngels/SAE-Dark-Matter, encoder_pursuit.py): an atom clipped to zero drops
out until it is chosen again. Each token runs its own number of steps ``L`` (e.g. the L0 its SAE
encoder gives it). Codes are kept compactly (one slot per step), so a step costs one dense
``[B, D] x [D, F]`` product plus gathers of at most ``L`` decoder rows per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saelab.saes.base import SAEOutput


@torch.no_grad()
def gradient_pursuit(x_BD: Tensor, dict_FD: Tensor, steps_B: Tensor | int) -> tuple[Tensor, Tensor]:
    """Non-negative gradient pursuit of each row of ``x_BD`` on the atoms (rows) of ``dict_FD``.

    ``steps_B``: steps (atoms selected) per row, an int or a ``[B]`` integer tensor; a row with
    0 steps gets no atoms. Returns ``(idx_BL, val_BL)``: the atom index and non-negative weight
    of every slot (``L = max steps``); slots with weight 0 are empty. The selection uses raw
    inner products, so the atoms should have comparable (ideally unit) norms.
    """
    B, D = x_BD.shape
    dev, dt = x_BD.device, x_BD.dtype
    D_FD = dict_FD.to(dev, dt)
    steps_B = (torch.full((B,), int(steps_B), device=dev) if isinstance(steps_B, int)
               else steps_B.to(dev).long())
    L = int(steps_B.max()) if B else 0
    idx_BL = torch.zeros(B, L, dtype=torch.long, device=dev)
    val_BL = torch.zeros(B, L, dtype=dt, device=dev)
    if L == 0:
        return idx_BL, val_BL
    r_BD = x_BD.clone()
    for s in range(L):
        c_BF = r_BD @ D_FD.T
        i_B = c_BF.argmax(dim=1)
        # a chosen atom already active keeps its slot; otherwise it takes slot s
        already_B = ((idx_BL[:, :s] == i_B[:, None]) & (val_BL[:, :s] != 0)).any(dim=1)
        new_idx_BL = idx_BL.clone()
        new_idx_BL[:, s] = i_B
        active_BL = val_BL != 0
        active_BL[:, s] = ~already_B
        g_BL = torch.where(active_BL, c_BF.gather(1, new_idx_BL), torch.zeros((), dtype=dt,
                                                                               device=dev))
        atoms_BLD = D_FD[new_idx_BL[:, : s + 1]]  # [B, s+1, D]
        q_BD = torch.einsum("bl,bld->bd", g_BL[:, : s + 1], atoms_BLD)
        qq_B = (q_BD * q_BD).sum(1)
        eta_B = torch.where(qq_B > 0, (q_BD * r_BD).sum(1) / qq_B.clamp_min(torch.finfo(dt).tiny),
                            torch.zeros((), dtype=dt, device=dev))
        new_val_BL = (val_BL + eta_B[:, None] * g_BL).clamp_min(0)
        run_B = steps_B > s  # rows past their step count keep their codes
        idx_BL = torch.where(run_B[:, None], new_idx_BL, idx_BL)
        val_BL = torch.where(run_B[:, None], new_val_BL, val_BL)
        if s + 1 < L:
            recon_BD = torch.einsum("bl,bld->bd", val_BL[:, : s + 1], D_FD[idx_BL[:, : s + 1]])
            r_BD = x_BD - recon_BD
    return idx_BL, val_BL


def dense_codes(idx_BL: Tensor, val_BL: Tensor, n_atoms: int) -> Tensor:
    """Scatter compact GP codes into a dense ``[B, F]`` code (duplicate slots add up)."""
    out_BF = torch.zeros(idx_BL.shape[0], n_atoms, dtype=val_BL.dtype, device=val_BL.device)
    return out_BF.scatter_add_(1, idx_BL, val_BL)


def gp_encode(x_BD: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor, steps_B: Tensor | int,
              chunk_rows: int = 1024) -> Tensor:
    """Dense codes ``[B, F]`` such that ``codes @ W_dec + b_dec`` is the GP reconstruction of
    ``x`` on the SAE decoder: GP on ``x − b_dec`` [U: centring convention, as the reference
    code], with atoms normalised to unit norm for the selection and the weights rescaled back
    by the row norms (identical to plain GP when the decoder rows are unit norm)."""
    norms_F = W_dec_FD.norm(dim=1).clamp_min(1e-12)
    unit_FD = W_dec_FD / norms_F[:, None]
    steps = steps_B if isinstance(steps_B, int) else steps_B.to(x_BD.device)
    out = []
    for a in range(0, x_BD.shape[0], chunk_rows):
        sl = slice(a, a + chunk_rows)
        st = steps if isinstance(steps, int) else steps[sl]
        idx, val = gradient_pursuit(x_BD[sl] - b_dec_D.to(x_BD.dtype), unit_FD.to(x_BD.dtype), st)
        out.append(dense_codes(idx, val, W_dec_FD.shape[0]) / norms_F.to(x_BD.dtype))
    return torch.cat(out) if out else x_BD.new_zeros(0, W_dec_FD.shape[0])


class GPEncodedSAE(nn.Module):
    """An SAE whose encoder is replaced by gradient pursuit on its own decoder.

    ``steps``: ``"sae"`` (each token gets the L0 the SAE's own encoder gives it) or a fixed
    number of atoms per token. ``decode``, ``W_dec``, ``b_dec`` and ``cfg`` are the wrapped
    SAE's, so it drops into code that takes an SAE (``saelab eval --encoder gp``).
    """

    def __init__(self, sae: nn.Module, steps: str | int = "sae", chunk_rows: int = 1024):
        super().__init__()
        self.sae = sae
        self.steps = steps
        self.chunk_rows = chunk_rows

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["sae"], name)

    @torch.no_grad()
    def encode(self, x_BD: Tensor) -> Tensor:
        if self.steps == "sae":
            steps = (self.sae.encode(x_BD) != 0).sum(dim=1)
        else:
            steps = int(self.steps)
        return gp_encode(x_BD, self.sae.W_dec, self.sae.b_dec, steps, self.chunk_rows)

    def decode(self, f_BF: Tensor) -> Tensor:
        return self.sae.decode(f_BF)

    def forward(self, x_BD: Tensor):
        f_BF = self.encode(x_BD)
        return SAEOutput(self.decode(f_BF), f_BF)
