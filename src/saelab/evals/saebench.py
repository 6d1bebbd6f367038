"""``saebench_core.json``: a run's metrics in SAEBench's core-eval output schema.

Field names follow SAEBench's ``CoreEvalOutput`` (``sae_bench/evals/core/eval_output.py``) and
``CoreEvalConfig`` (``eval_config.py``): ``eval_type_id``, ``eval_config``, ``eval_id``,
``datetime_epoch_millis``, ``eval_result_metrics`` (groups ``model_behavior_preservation``,
``model_performance_preservation``, ``reconstruction_quality``, ``shrinkage``, ``sparsity``,
``token_stats``, ``misc_metrics``), ``eval_result_details`` (one entry per latent),
``sae_bench_commit_hash``, ``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version``,
``sae_cfg_dict`` and ``eval_result_unstructured``. The values are saelab's own measurements
under the default (SAEBench core) protocol; what SAEBench defines differently is said in
``eval_result_unstructured["notes"]``. SAEBench writes -1 for a value it could not compute; so
does this file.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import torch
from torch import Tensor

EVAL_TYPE_ID_CORE = "core"
#: rows of the decoder / encoder cosine matrix computed at once
_COS_CHUNK = 1024

NOTES = (
    "saelab measurements, default protocol: every position but BOS / special tokens is "
    "scored and spliced (SAE, zero and mean ablation); SAEBench's zero ablation also zeroes "
    "the special positions.",
    "mse is per activation element; explained_variance = 1 - pooled FVU (total variance about "
    "the mean of the scored activations); explained_variance_legacy and "
    "consistent_activation_heuristic are not measured (-1).",
    "total_tokens_eval_reconstruction counts the scored tokens of the CE windows.",
)


def _num(v: Any) -> float:
    """SAEBench's convention: a value that could not be computed is -1."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return -1.0
    return float(v)


def max_other_cosine(W_FD: Tensor) -> Tensor:
    """[F]: each row's largest cosine with any *other* row (chunked: F x F never in memory)."""
    w = torch.nn.functional.normalize(W_FD.detach().float(), dim=1)
    out = torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], _COS_CHUNK):
        cos = w[i:i + _COS_CHUNK] @ w.T
        idx = torch.arange(i, min(i + _COS_CHUNK, w.shape[0]), device=w.device)
        cos[idx - i, idx] = -math.inf  # a row with itself
        out[i:i + _COS_CHUNK] = cos.max(dim=1).values
    return out


def feature_details(sae, density_F: Tensor) -> list[dict[str, float]]:
    """One ``CoreFeatureMetric`` per latent (weight-based fields and the feature density)."""
    W_enc_DF, W_dec_FD = sae.W_enc.detach().float(), sae.W_dec.detach().float()
    b_enc = getattr(sae, "b_enc", None)
    b_enc = b_enc.detach().float() if b_enc is not None else None
    enc_norm = W_enc_DF.norm(dim=0)
    cos_ed = torch.nn.functional.cosine_similarity(W_enc_DF.T, W_dec_FD, dim=1)
    max_dec, max_enc = max_other_cosine(W_dec_FD), max_other_cosine(W_enc_DF.T)
    rows = []
    for i in range(W_dec_FD.shape[0]):
        rows.append({
            "index": i,
            "feature_density": _num(float(density_F[i])),
            "consistent_activation_heuristic": -1.0,
            "encoder_bias": _num(float(b_enc[i])) if b_enc is not None else -1.0,
            "encoder_norm": _num(float(enc_norm[i])),
            "encoder_decoder_cosine_sim": _num(float(cos_ed[i])),
            "max_decoder_cosine_sim": _num(float(max_dec[i])),
            "max_encoder_cosine_sim": _num(float(max_enc[i])),
        })
    return rows


def core_output(metrics: dict[str, float], sae, density_F: Tensor, *, model_name: str,
                llm_dtype: str, dataset: str, context_size: int, batch_windows: int,
                n_ce_windows: int, n_act_windows: int, act_batch_windows: int,
                sae_cfg_dict: dict[str, Any] | None = None,
                saelab_version: str = "") -> dict[str, Any]:
    """The ``CoreEvalOutput`` dict of one evaluated SAE (``metrics``: its metrics.json)."""
    m = metrics.get
    has_ce = "ce_loss_recovered" in metrics
    d = density_F.double()
    total = d.sum().item()

    def norm_freq(threshold: float) -> float:
        return d[d > threshold].sum().item() / total if total > 0 else 0.0

    details = feature_details(sae, density_F)
    return {
        "eval_type_id": EVAL_TYPE_ID_CORE,
        "eval_config": {
            "model_name": model_name,
            "llm_dtype": llm_dtype,
            "batch_size_prompts": batch_windows,
            "n_eval_reconstruction_batches": math.ceil(n_ce_windows / batch_windows),
            "n_eval_sparsity_variance_batches": math.ceil(n_act_windows / act_batch_windows),
            "dataset": dataset,
            "context_size": context_size,
            "compute_kl": has_ce,
            "compute_ce_loss": has_ce,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": True,
            "verbose": False,
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            "model_behavior_preservation": {
                "kl_div_score": _num(m("kl_score")),
                "kl_div_with_ablation": _num(m("kl_zero_ablation")),
                "kl_div_with_sae": _num(m("kl_with_sae")),
            },
            "model_performance_preservation": {
                "ce_loss_score": _num(m("ce_loss_recovered")),
                "ce_loss_with_ablation": _num(m("ce_loss_zero_ablation")),
                "ce_loss_with_sae": _num(m("ce_loss_with_sae")),
                "ce_loss_without_sae": _num(m("ce_loss_clean")),
            },
            "reconstruction_quality": {
                "explained_variance": _num(m("explained_variance")),
                "explained_variance_legacy": -1.0,
                "mse": _num(m("mse")),
                "cossim": _num(m("cosine_similarity")),
            },
            "shrinkage": {
                "l2_norm_in": _num(m("l2_norm_in")),
                "l2_norm_out": _num(m("l2_norm_out")),
                "l2_ratio": _num(m("l2_ratio")),
                "relative_reconstruction_bias": _num(m("relative_reconstruction_bias")),
            },
            "sparsity": {"l0": _num(m("l0")), "l1": _num(m("l1"))},
            "token_stats": {
                "total_tokens_eval_reconstruction": int(m("ce_n_tokens") or 0),
                "total_tokens_eval_sparsity_variance": int(m("n_tokens") or 0),
            },
            "misc_metrics": {
                "freq_over_1_percent": (d > 0.01).double().mean().item(),
                "freq_over_10_percent": (d > 0.10).double().mean().item(),
                "normalized_freq_over_1_percent": norm_freq(0.01),
                "normalized_freq_over_10_percent": norm_freq(0.10),
                "average_max_encoder_cosine_sim": sum(r["max_encoder_cosine_sim"]
                                                      for r in details) / len(details),
                "average_max_decoder_cosine_sim": sum(r["max_decoder_cosine_sim"]
                                                      for r in details) / len(details),
                "frac_alive": (d > 0).double().mean().item(),
            },
        },
        "eval_result_details": details,
        "sae_bench_commit_hash": "",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg_dict,
        "eval_result_unstructured": {"producer": f"saelab {saelab_version}".strip(),
                                     "notes": list(NOTES)},
    }
