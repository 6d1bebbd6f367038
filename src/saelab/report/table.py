"""Plain-text summary tables for the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SUMMARY_KEYS: Sequence[tuple[str, str, str]] = (
    ("l0", "L0 (mean active latents)", "{:.1f}"),
    ("fvu", "FVU (pooled)", "{:.4f}"),
    ("mse", "MSE (per element)", "{:.4g}"),
    ("cosine_similarity", "cosine(x, x_hat)", "{:.4f}"),
    ("relative_reconstruction_bias", "shrinkage gamma", "{:.4f}"),
    ("ce_loss_recovered", "CE loss recovered (zero abl.)", "{:.2%}"),
    ("ce_loss_recovered_mean_ablation", "CE loss recovered (mean abl.)", "{:.2%}"),
    ("delta_lm_loss", "delta LM loss (nats)", "{:.4f}"),
    ("ce_loss_clean", "CE clean (nats/token)", "{:.4f}"),
    ("kl_score", "KL score (zero abl.)", "{:.4f}"),
    ("dead_fraction", "dead latents (eval)", "{:.2%}"),
    ("dense_fraction_1pct", "dense latents (>1% tokens)", "{:.2%}"),
    ("train_tokens_per_second", "training tokens/s", "{:,.0f}"),
)


def summary_table(metrics: Mapping[str, float], title: str = "") -> str:
    rows = [(label, fmt.format(metrics[key])) for key, label, fmt in SUMMARY_KEYS
            if key in metrics]
    width = max(len(label) for label, _ in rows) if rows else 0
    lines = [title] if title else []
    lines += [f"  {label:<{width}}  {value:>12}" for label, value in rows]
    return "\n".join(lines)


def comparison_table(runs: Mapping[str, Mapping[str, float]]) -> str:
    """One column per run, one row per summary metric present in every run."""
    names = list(runs)
    keys = [(k, lbl, f) for k, lbl, f in SUMMARY_KEYS if all(k in runs[n] for n in names)]
    width = max((len(lbl) for _, lbl, _ in keys), default=0)
    col = max(12, *(len(n) for n in names))
    lines = [" " * (width + 2) + "".join(f"  {n:>{col}}" for n in names)]
    for key, label, fmt in keys:
        lines.append(f"  {label:<{width}}" + "".join(f"  {fmt.format(runs[n][key]):>{col}}"
                                                    for n in names))
    return "\n".join(lines)
