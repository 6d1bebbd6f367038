"""Held-out evaluation of an SAE at its hook point (METHODS.md §13.2).

Two parts, both on documents the training split never sees:

1. reconstruction metrics (FVU, MSE, γ, L0, density, ...) on ``eval_tokens`` activation rows from
   truncated forwards;
2. LM-level metrics on ``ce_windows`` windows: the hook's output is replaced by the SAE
   reconstruction, by zeros and by the held-out mean activation, and the next-token CE and
   KL(P_clean ‖ P_spliced) are pooled over tokens.

Positions excluded from training (the attention sink, special tokens) are left clean in every
splice and are not scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.config import DataConfig, EvalConfig
from saelab.evals.metrics import ReconstructionMetrics, ce_metrics
from saelab.saes.base import SAE


@dataclass
class EvalResult:
    metrics: dict[str, float]
    density_F: Tensor
    l0_hist: Tensor


def heldout_windows(lm, data_cfg: DataConfig, n_windows: int) -> tuple[Tensor, Tensor]:
    """The first ``n_windows`` windows of the held-out split and their keep mask."""
    from saelab.data.corpus import iter_documents
    from saelab.data.windows import iter_windows, keep_mask

    windows = []
    for w in iter_windows(iter_documents(data_cfg, "eval"), lm.tokenizer, data_cfg.context_size,
                          data_cfg.prepend_bos):
        windows.append(w)
        if len(windows) >= n_windows:
            break
    if not windows:
        raise ValueError("the held-out split produced no token windows")
    windows_NT = torch.stack(windows)
    keep_NT = keep_mask(windows_NT, lm.tokenizer, data_cfg.exclude_first_positions,
                        data_cfg.exclude_special_tokens)
    return windows_NT, keep_NT


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.inference_mode()
def reconstruction_eval(sae: SAE, acts_batches: Iterator[Tensor]) -> ReconstructionMetrics:
    """Pool reconstruction metrics over batches of raw activations ``[B, D]``."""
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    m = ReconstructionMetrics(sae.d_in, sae.d_sae, device=dev)
    for x_BD in acts_batches:
        x_BD = x_BD.to(dev, dt)
        out = sae(x_BD)
        m.update(x_BD, out.recon, out.latents)
    return m


def _replace_kept(keep_BT: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def splice_fn(acts_BTD: Tensor) -> Tensor:
        out = acts_BTD.clone()
        out[keep_BT] = fn(acts_BTD[keep_BT]).to(acts_BTD.dtype)
        return out

    return splice_fn


@torch.inference_mode()
def lm_eval(sae: SAE, lm, hook, windows_NT: Tensor, keep_NT: Tensor, mean_act_D: Tensor,
            batch_windows: int = 8, progress: bool = False) -> dict[str, float]:
    """CE loss recovered, delta LM loss and KL score with the SAE spliced into the LM."""
    from saelab.models.hooks import splice

    model, dev = lm.model, lm.device
    sae_dev, sae_dt = sae.W_dec.device, sae.W_dec.dtype
    ablations: dict[str, Callable[[Tensor], Tensor]] = {
        "sae": lambda a: sae(a.to(sae_dev, sae_dt)).recon,
        "zero": lambda a: torch.zeros_like(a),
        "mean": lambda a: mean_act_D.to(a.device, a.dtype).expand_as(a),
    }
    ce_sum = {k: 0.0 for k in ("clean", *ablations)}
    kl_sum = {k: 0.0 for k in ablations}
    n_tok = 0
    batches = list(_batches(windows_NT.shape[0], batch_windows))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval: LM splices", unit="batch", leave=False)
    for sl in batches:
        ids_BT = windows_NT[sl].to(dev)
        keep_BT = keep_NT[sl].to(dev)
        # Score predictions made from spliced positions: logits at t predict token t+1.
        score_BT = keep_BT[:, :-1]
        targets = ids_BT[:, 1:][score_BT]
        n_tok += int(score_BT.sum())
        logp_clean = _logprobs(model(ids_BT, use_cache=False).logits, score_BT)
        ce_sum["clean"] += -logp_clean.gather(1, targets[:, None]).sum().item()
        for name, fn in ablations.items():
            with splice(model, hook, _replace_kept(keep_BT, fn)):
                logp = _logprobs(model(ids_BT, use_cache=False).logits, score_BT)
            ce_sum[name] += -logp.gather(1, targets[:, None]).sum().item()
            kl_sum[name] += (logp_clean.exp() * (logp_clean - logp)).sum().item()
    if n_tok == 0:
        raise ValueError("no scored positions in the CE evaluation windows")
    ce = {k: v / n_tok for k, v in ce_sum.items()}
    kl = {k: v / n_tok for k, v in kl_sum.items()}
    out = ce_metrics(ce["clean"], ce["sae"], ce["zero"], ce["mean"], kl["sae"], kl["zero"],
                     kl["mean"])
    out["ce_n_tokens"] = float(n_tok)
    return out


def _logprobs(logits_BTV: Tensor, score_BT: Tensor) -> Tensor:
    return torch.log_softmax(logits_BTV[:, :-1][score_BT].float(), dim=-1)


@torch.inference_mode()
def evaluate(sae: SAE, lm, hook, data_cfg: DataConfig, eval_cfg: EvalConfig,
             skip_ce: bool = False, progress: bool = True) -> EvalResult:
    """Evaluate ``sae`` (acting on raw activations) on held-out documents."""
    from saelab.data.windows import drop_norm_outliers
    from saelab.models.hooks import run_to_hook

    kept_per_window = max(1, data_cfg.context_size - data_cfg.exclude_first_positions)
    n_windows = max(eval_cfg.ce_windows, math.ceil(eval_cfg.eval_tokens / kept_per_window))
    windows_NT, keep_NT = heldout_windows(lm, data_cfg, n_windows)
    kept_before = int(keep_NT.sum())

    def acts() -> Iterator[Tensor]:
        it = _batches(windows_NT.shape[0], 16)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(list(it), desc="eval: activations", unit="batch", leave=False)
        for sl in it:
            a_BTD = run_to_hook(lm.model, windows_NT[sl].to(lm.device), hook)
            # The same outlier rule as the harvest, so eval scores the tokens training saw;
            # dropped positions are also left clean in the LM splices below.
            keep_NT[sl] = drop_norm_outliers(a_BTD, keep_NT[sl], data_cfg.exclude_norm_outliers)
            yield a_BTD[keep_NT[sl].to(a_BTD.device)].float()

    rec = reconstruction_eval(sae, acts())
    metrics = rec.compute()
    metrics["eval_positions_dropped_as_outliers"] = float(kept_before - int(keep_NT.sum()))
    if not skip_ce and eval_cfg.ce_windows > 0:
        mean_act_D = (rec.sum_x_D / rec.n).float()
        n_ce = min(eval_cfg.ce_windows, windows_NT.shape[0])
        metrics.update(lm_eval(sae, lm, hook, windows_NT[:n_ce], keep_NT[:n_ce], mean_act_D,
                               progress=progress))
    return EvalResult(metrics, rec.feature_density().float().cpu(), rec.l0_hist.cpu())
