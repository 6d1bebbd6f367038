"""How well a learned dictionary recovers a known one (synthetic ground truth, `saelab synth`).

For a decoder ``W_dec`` [F, d] and true unit directions [M, d]:

- ``mean_best_cos``: mean over true features of the largest cosine with any decoder row
  (``|cos|`` when codes are signed: a latent may carry a feature with flipped sign);
- ``frac_recovered``: fraction of true features whose best cosine is at least 0.9;
- ``mcc``: mean correlation coefficient. Pearson correlations between every true code and every
  latent activation on held-out data, then the one-to-one matching (Hungarian,
  ``scipy.optimize.linear_sum_assignment``) that maximises the total; the mean over true
  features of the matched correlation (``|corr|`` when signed). A true feature left without a
  latent (F < M) counts 0; a true feature that never fires in the held-out set has no defined
  correlation and is left out (``mcc_features`` says how many were scored).

Plus the pooled reconstruction metrics of :class:`ReconstructionMetrics` (FVU, L0, dead
latents...) on the same held-out rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.evals.metrics import ReconstructionMetrics

RECOVERED_COS = 0.9


def best_cosines(W_dec_FD: Tensor, true_MD: Tensor, signed: bool = False) -> Tensor:
    """[M]: for each true direction, its best cosine (``|cos|`` if ``signed``) with any row."""
    a = torch.nn.functional.normalize(W_dec_FD.detach().double(), dim=1)
    b = torch.nn.functional.normalize(true_MD.detach().double().to(a.device), dim=1)
    cos_MF = b @ a.T
    if signed:
        cos_MF = cos_MF.abs()
    return cos_MF.max(dim=1).values


def dictionary_recovery(W_dec_FD: Tensor, true_MD: Tensor, signed: bool = False,
                        threshold: float = RECOVERED_COS) -> dict[str, float]:
    best = best_cosines(W_dec_FD, true_MD, signed)
    return {"mean_best_cos": float(best.mean()),
            "frac_recovered": float((best >= threshold).double().mean())}


class CorrelationAccumulator:
    """Running sums (float64) for the Pearson correlation of every (true, learned) column pair."""

    def __init__(self, n_true: int, n_learned: int, device: torch.device | str | None = None):
        kw = {"device": device, "dtype": torch.float64}
        self.n = 0
        self.s_t, self.s_tt = torch.zeros(n_true, **kw), torch.zeros(n_true, **kw)
        self.s_l, self.s_ll = torch.zeros(n_learned, **kw), torch.zeros(n_learned, **kw)
        self.s_tl = torch.zeros(n_true, n_learned, **kw)

    @torch.no_grad()
    def update(self, true_NM: Tensor, learned_NF: Tensor) -> None:
        t, f = true_NM.double(), learned_NF.double().to(true_NM.device)
        self.n += t.shape[0]
        self.s_t += t.sum(0)
        self.s_tt += t.pow(2).sum(0)
        self.s_l += f.sum(0)
        self.s_ll += f.pow(2).sum(0)
        self.s_tl += t.T @ f

    def correlations(self) -> tuple[Tensor, Tensor]:
        """([M, F] correlations, [M] bool: true feature has variance). Columns without variance
        (dead latents, features that never fired) get correlation 0."""
        n = max(self.n, 1)
        var_t = self.s_tt / n - (self.s_t / n).pow(2)
        var_l = self.s_ll / n - (self.s_l / n).pow(2)
        cov = self.s_tl / n - torch.outer(self.s_t / n, self.s_l / n)
        eps = 1e-12
        ok_t, ok_l = var_t > eps, var_l > eps
        denom = torch.outer(var_t.clamp_min(eps).sqrt(), var_l.clamp_min(eps).sqrt())
        corr = torch.where(ok_t[:, None] & ok_l[None, :], cov / denom, 0.0)
        return corr.clamp(-1.0, 1.0), ok_t


def matched_mcc(corr_MF: Tensor, valid_M: Tensor | None = None, signed: bool = False
                ) -> tuple[float, int]:
    """MCC after the optimal one-to-one matching; returns (mcc, number of scored features)."""
    from scipy.optimize import linear_sum_assignment  # deferred: scipy only for synth recovery

    c = corr_MF.detach().double().cpu()
    if valid_M is not None:
        c = c[valid_M.cpu()]
    n_true = c.shape[0]
    if n_true == 0:
        return float("nan"), 0
    score = c.abs() if signed else c
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    # unmatched true features (fewer latents than features) add 0 to the sum
    return float(score[rows, cols].sum()) / n_true, n_true


@torch.no_grad()
def evaluate_recovery(sae, x_ND: Tensor, codes_NM: Tensor, true_MD: Tensor, *,
                      signed: bool = False, batch_size: int = 4096) -> dict[str, float]:
    """All recovery and reconstruction metrics of ``sae`` (acting on raw ``x``) on held-out rows
    with known codes. ``encode`` is the inference function of every family."""
    device = sae.W_dec.device
    dtype = sae.W_dec.dtype
    rec = ReconstructionMetrics(sae.d_in, sae.d_sae, device=device)
    acc = CorrelationAccumulator(codes_NM.shape[1], sae.d_sae, device=device)
    for start in range(0, x_ND.shape[0], batch_size):
        x = x_ND[start:start + batch_size].to(device, dtype)
        f = sae.encode(x)
        rec.update(x, sae.decode(f), f)
        acc.update(codes_NM[start:start + batch_size].to(device), f)
    corr, valid = acc.correlations()
    mcc, n_scored = matched_mcc(corr, valid, signed=signed)
    recon = rec.compute()
    return {
        **dictionary_recovery(sae.W_dec, true_MD, signed=signed),
        "mcc": mcc,
        "mcc_features": float(n_scored),
        **{k: recon[k] for k in ("fvu", "l0", "l0_std", "dead_fraction", "dense_fraction_10pct",
                                 "cosine_similarity", "relative_reconstruction_bias")},
    }
