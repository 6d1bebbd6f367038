"""`ce` eval: the SAE spliced into the LM (docs/methods.md §13.2).

On ``ce_windows`` held-out windows the hook's output is replaced by the SAE reconstruction, by
zeros and by the held-out mean activation; next-token CE and KL(P_clean || P_spliced) are
pooled over the scored tokens. Default protocol (SAEBench core): every position but BOS /
special tokens is spliced and scored; the filtered variant (``_filtered`` keys) also leaves
the training-time exclusions (leading positions, norm outliers) clean and unscored. The clean / ablated passes come from the shared
:class:`~saelab.evals.evaluate.EvalContext` when it has them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from saelab.evals.evaluate import lm_eval
from saelab.evals.registry import Eval, metric, register_eval


@dataclass
class CEEvalConfig:
    """Settings of the `ce` eval (the window count is ``--ce-windows``)."""


@dataclass
class CEOutput:
    """CE loss recovered, delta LM loss and KL score (nats per scored token)."""

    ce_loss_clean: float = metric("CE clean (nats/token)", "Next-token CE of the clean LM.",
                                  "{:.4f}", summary=80)
    ce_loss_with_sae: float = metric("CE with SAE", "CE with the SAE reconstruction spliced "
                                     "in.", "{:.4f}")
    ce_loss_zero_ablation: float = metric("CE zero ablation", "CE with the hook output "
                                          "replaced by zeros.", "{:.4f}")
    ce_loss_mean_ablation: float = metric("CE mean ablation", "CE with the hook output "
                                          "replaced by the held-out mean activation.", "{:.4f}")
    ce_loss_recovered: float = metric(
        "CE loss recovered (zero abl.)", "(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = the "
        "SAE costs nothing, 0 = as bad as zeroing the hook.", "{:.2%}", summary=60,
        summary_filtered=61, column=30, short="CE rec",
        pareto=("pareto_ce.png", "CE loss recovered (zero ablation)", True))
    ce_loss_recovered_mean_ablation: float = metric(
        "CE loss recovered (mean abl.)", "(CE_mean - CE_sae) / (CE_mean - CE_clean).",
        "{:.2%}", summary=65, column=40, short="CE rec (mean)")
    delta_lm_loss: float = metric(
        "delta LM loss (nats)", "CE_sae - CE_clean.", "{:.4f}", summary=70, column=50,
        short="dLM", pareto=("pareto_delta_lm.png", "delta LM loss (nats/token)", False))
    kl_with_sae: float = metric("KL with SAE", "KL(P_clean || P_sae) per token.", "{:.4f}")
    kl_zero_ablation: float = metric("KL zero ablation", "KL(P_clean || P_zero) per token.",
                                     "{:.4f}")
    kl_mean_ablation: float = metric("KL mean ablation", "KL(P_clean || P_mean) per token.",
                                     "{:.4f}")
    kl_score: float = metric(
        "KL score (zero abl.)", "(KL_zero - KL_sae) / KL_zero.", "{:.4f}", summary=90,
        column=60, short="KL score")
    kl_score_mean_ablation: float = metric("KL score (mean abl.)",
                                           "(KL_mean - KL_sae) / KL_mean.", "{:.4f}")
    ce_n_tokens: float = metric("CE tokens", "Scored tokens of the CE windows.", "{:,.0f}")
    #: the same metrics under the filtered variant (keys with the ``_filtered`` suffix)
    filtered: CEOutput | None = None


def run(ctx, sae, cfg: CEEvalConfig) -> CEOutput:
    if ctx.n_ce == 0:
        return CEOutput()
    n = ctx.n_ce

    def one(keep_NT, mean_D, baseline) -> CEOutput:
        values = lm_eval(sae, ctx.model, ctx.hook, ctx.windows_NT[:n], keep_NT[:n], mean_D,
                         progress=ctx.progress, baseline=baseline)
        return CEOutput(**{f.name: values[f.name] for f in fields(CEOutput) if f.name in values})

    out = one(ctx.keep_NT, ctx.mean_act_D, ctx.lm)
    out.filtered = one(ctx.filt_NT, ctx.mean_filt_D, ctx.lm_filtered)
    return out


CE = register_eval(Eval("ce", CEEvalConfig, CEOutput, run,
                        help="CE / KL with the SAE spliced into the LM (zero / mean ablation)",
                        needs_lm=True, order=20))
