"""`core` eval: reconstruction quality and L0 on the held-out activations (docs/methods.md §13.2, §2.7).

Every metric is pooled over all evaluation tokens (sums first, ratio last), see
:class:`saelab.evals.metrics.ReconstructionMetrics`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

from saelab.evals.registry import Eval, metric, register_eval


@dataclass
class CoreEvalConfig:
    """Settings of the `core` eval (none yet: it reads the shared held-out activations)."""


@dataclass
class CoreOutput:
    """Pooled reconstruction metrics of one SAE."""

    n_tokens: float = metric("eval tokens", "Held-out activation rows scored.", "{:,.0f}")
    mse: float = metric("MSE (per element)", "Mean squared error per activation element.",
                        "{:.4g}", summary=30)
    sse_per_token: float = metric("SSE per token", "Squared reconstruction error per token.")
    fvu: float = metric(
        "FVU (pooled)", "Fraction of variance unexplained: sum of squared errors over the "
        "total variance of the held-out activations about their mean.", "{:.4f}", summary=20,
        summary_filtered=21, column=20, short="FVU",
        pareto=("pareto_fvu.png", "FVU (fraction of variance unexplained)", False))
    explained_variance: float = metric("explained variance", "1 - FVU.", "{:.4f}")
    relative_mse: float = metric("relative MSE", "Mean over tokens of |x - x_hat|^2 / |x|^2.")
    cosine_similarity: float = metric("cosine(x, x_hat)", "Mean cosine of input and "
                                      "reconstruction.", "{:.4f}", summary=40)
    l2_ratio: float = metric("L2 ratio", "Mean over tokens of |x_hat| / |x|.", "{:.4f}")
    l2_norm_in: float = metric("mean |x|", "Mean L2 norm of the input activations.", "{:.4g}")
    l2_norm_out: float = metric("mean |x_hat|", "Mean L2 norm of the reconstructions.",
                                "{:.4g}")
    relative_reconstruction_bias: float = metric(
        "shrinkage gamma", "Sum |x_hat|^2 / sum x_hat.x: 1 = unbiased, < 1 = shrinkage.",
        "{:.4f}", summary=50, column=70, column_name="gamma", short="gamma",
        short_fmt="{:.3f}")
    l0: float = metric("L0 (mean active latents)", "Mean number of nonzero latents per token.",
                       "{:.1f}", summary=10, column=10, short="L0")
    l1: float = metric("L1 (mean sum |f|)", "Mean over tokens of the summed absolute latent "
                       "activations.", "{:.4g}")
    l0_std: float = metric("L0 std", "Standard deviation of the per-token L0.", "{:.2f}")
    l0_median: float = metric("L0 median", "Median per-token L0.", "{:.0f}")
    l0_p90: float = metric("L0 p90", "90th percentile of the per-token L0.", "{:.0f}")
    eval_positions_dropped_as_outliers: float = metric(
        "positions dropped (norm outliers)", "Held-out positions the filtered variant drops by "
        "the norm-outlier rule (--exclude-norm-outliers).", "{:,.0f}")
    eval_positions_filtered: float = metric(
        "positions filtered", "Scored positions of the default protocol that the filtered "
        "variant leaves out (leading positions and norm outliers).", "{:,.0f}")
    filtered_variance_share: float = metric(
        "variance share of filtered positions", "Share of the total variance (about the mean) "
        "of the scored activations carried by the positions the filtered variant drops.",
        "{:.2%}", summary=25)
    #: [d_sae + 1] histogram of the per-token L0 (not a metric)
    l0_hist: Tensor | None = None
    #: the same metrics under the filtered variant (keys with the ``_filtered`` suffix)
    filtered: CoreOutput | None = None


def _from_pass(rec) -> CoreOutput:
    values = rec.compute()
    return CoreOutput(**{f.name: values[f.name] for f in dataclasses.fields(CoreOutput)
                         if f.name in values}, l0_hist=rec.l0_hist.cpu())


def run(ctx, sae, cfg: CoreEvalConfig) -> CoreOutput:
    """Default protocol (SAEBench core: every non-special position) and the filtered variant."""
    out = _from_pass(ctx.reconstruction(sae))
    filt = ctx.reconstruction_filtered(sae)
    if filt.n > 0:
        out.filtered = _from_pass(filt)
    out.eval_positions_dropped_as_outliers = float(ctx.kept_before - int(ctx.filt_NT.sum()))
    n_drop, share = ctx.filtered_positions()
    out.eval_positions_filtered, out.filtered_variance_share = float(n_drop), share
    return out


CORE = register_eval(Eval("core", CoreEvalConfig, CoreOutput, run,
                          help="reconstruction: FVU, MSE, cosine, shrinkage, L0", order=10))
