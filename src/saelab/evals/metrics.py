"""Reconstruction and sparsity metrics from running sums (docs/methods.md §13.2, §2.7).

Every metric is pooled over all evaluation tokens (sums first, ratio last), never a mean of
per-batch ratios. Sums are float64 so millions of tokens do not lose precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ReconstructionMetrics:
    """Accumulate ``x``, ``x̂`` and ``f`` batches; ``compute()`` returns the metric dict."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str | None = None):
        kw = {"device": device, "dtype": torch.float64}
        self.n = 0
        self.sum_x_D = torch.zeros(d_in, **kw)
        self.sum_x_sq = torch.zeros((), **kw)  # Σ‖x‖²
        self.sse = torch.zeros((), **kw)  # Σ‖x − x̂‖²
        self.sum_xhat_sq = torch.zeros((), **kw)  # Σ‖x̂‖²
        self.sum_xhat_dot_x = torch.zeros((), **kw)  # Σ x̂·x
        self.sum_rel_mse = torch.zeros((), **kw)  # Σ ‖x − x̂‖²/‖x‖²
        self.sum_cos = torch.zeros((), **kw)
        self.sum_l2_ratio = torch.zeros((), **kw)
        self.sum_x_norm = torch.zeros((), **kw)  # Σ‖x‖
        self.sum_xhat_norm = torch.zeros((), **kw)  # Σ‖x̂‖
        self.sum_l1 = torch.zeros((), **kw)  # Σ Σ_j |f_j|
        self.fire_count_F = torch.zeros(d_sae, device=device, dtype=torch.int64)
        self.l0_hist = torch.zeros(d_sae + 1, device=device, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x_BD: Tensor, recon_BD: Tensor, latents_BF: Tensor) -> None:
        x, xh = x_BD.double(), recon_BD.double()
        err_sq_B = (x - xh).pow(2).sum(-1)
        x_sq_B = x.pow(2).sum(-1)
        xh_sq_B = xh.pow(2).sum(-1)
        dot_B = (x * xh).sum(-1)
        self.n += x.shape[0]
        self.sum_x_D += x.sum(0)
        self.sum_x_sq += x_sq_B.sum()
        self.sse += err_sq_B.sum()
        self.sum_xhat_sq += xh_sq_B.sum()
        self.sum_xhat_dot_x += dot_B.sum()
        eps = 1e-12
        self.sum_rel_mse += (err_sq_B / x_sq_B.clamp_min(eps)).sum()
        self.sum_cos += (dot_B / (x_sq_B.sqrt() * xh_sq_B.sqrt()).clamp_min(eps)).sum()
        self.sum_l2_ratio += (xh_sq_B.sqrt() / x_sq_B.sqrt().clamp_min(eps)).sum()
        self.sum_x_norm += x_sq_B.sqrt().sum()
        self.sum_xhat_norm += xh_sq_B.sqrt().sum()
        self.sum_l1 += latents_BF.double().abs().sum()
        active_BF = latents_BF != 0
        self.fire_count_F += active_BF.sum(0)
        self.l0_hist += torch.bincount(active_BF.sum(-1), minlength=self.l0_hist.numel())

    def feature_density(self) -> Tensor:
        """ρ_j: fraction of evaluation tokens on which latent j is nonzero."""
        return self.fire_count_F.double() / max(self.n, 1)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no evaluation tokens were accumulated")
        n = self.n
        # Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖²
        total_var = self.sum_x_sq - self.sum_x_D.pow(2).sum() / n
        fvu = (self.sse / total_var).item()
        density = self.feature_density()
        l0_values = torch.arange(self.l0_hist.numel(), device=self.l0_hist.device, dtype=torch.float64)
        l0 = (self.l0_hist.double() * l0_values).sum().item() / n
        return {
            "n_tokens": float(n),
            "mse": self.sse.item() / (n * self.sum_x_D.numel()),
            "sse_per_token": self.sse.item() / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "relative_mse": self.sum_rel_mse.item() / n,
            "cosine_similarity": self.sum_cos.item() / n,
            "l2_ratio": self.sum_l2_ratio.item() / n,
            "l2_norm_in": self.sum_x_norm.item() / n,
            "l2_norm_out": self.sum_xhat_norm.item() / n,
            # γ = Σ‖x̂‖² / Σ x̂·x (§2.7); 1 = unbiased, < 1 = shrinkage
            "relative_reconstruction_bias": _safe_div(self.sum_xhat_sq.item(),
                                                      self.sum_xhat_dot_x.item()),
            "l0": l0,
            "l1": self.sum_l1.item() / n,
            "l0_std": math.sqrt(max(0.0, (self.l0_hist.double() * l0_values.pow(2)).sum().item() / n
                                    - l0 * l0)),
            "l0_median": float(_hist_quantile(self.l0_hist, 0.5)),
            "l0_p90": float(_hist_quantile(self.l0_hist, 0.9)),
            "dead_fraction": (density == 0).double().mean().item(),
            "dense_fraction_1pct": (density > 0.01).double().mean().item(),
            "dense_fraction_10pct": (density > 0.10).double().mean().item(),
        }


def _safe_div(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def _hist_quantile(hist: Tensor, q: float) -> int:
    cdf = hist.cumsum(0).double() / hist.sum().clamp_min(1)
    return int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64, device=cdf.device)))


def log10_density(density_F: Tensor) -> Tensor:
    """``log10(ρ + 1e-10)``: dead latents collect at the floor (−10), as SAELens stores it."""
    return torch.log10(density_F.double() + 1e-10).float()


def ce_metrics(ce_clean: float, ce_sae: float, ce_zero: float, ce_mean: float,
               kl_sae: float, kl_zero: float, kl_mean: float) -> dict[str, float]:
    """Loss recovered, delta LM loss and KL score (§13.2) from the pooled per-token means."""
    return {
        "ce_loss_clean": ce_clean,
        "ce_loss_with_sae": ce_sae,
        "ce_loss_zero_ablation": ce_zero,
        "ce_loss_mean_ablation": ce_mean,
        "ce_loss_recovered": _safe_div(ce_zero - ce_sae, ce_zero - ce_clean),
        "ce_loss_recovered_mean_ablation": _safe_div(ce_mean - ce_sae, ce_mean - ce_clean),
        "delta_lm_loss": ce_sae - ce_clean,
        "kl_with_sae": kl_sae,
        "kl_zero_ablation": kl_zero,
        "kl_mean_ablation": kl_mean,
        "kl_score": _safe_div(kl_zero - kl_sae, kl_zero),
        "kl_score_mean_ablation": _safe_div(kl_mean - kl_sae, kl_mean),
    }
