"""Held-out evaluation of an SAE at its hook point (METHODS.md §13.2).

Two parts, both on documents the training split never sees:

1. reconstruction metrics (FVU, MSE, γ, L0, density, ...) on ``eval_tokens`` activation rows from
   truncated forwards;
2. LM-level metrics on ``ce_windows`` windows: the hook's output is replaced by the SAE
   reconstruction, by zeros and by the held-out mean activation, and the next-token CE and
   KL(P_clean ‖ P_spliced) are pooled over tokens.

Positions excluded from training (the attention sink, special tokens) are left clean in every
splice and are not scored.

Everything that does not depend on the SAE (the held-out windows and activations, the clean,
zero- and mean-ablation CE/KL and the clean log-probabilities) can be computed once as an
:class:`EvalBaseline` and reused for many SAEs (``saelab sweep``); ``evaluate`` with a shared
baseline gives exactly the numbers it gives without one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.config import DataConfig, EvalConfig
from saelab.evals.metrics import ReconstructionMetrics, ce_metrics
from saelab.saes.base import SAE

#: windows per LM forward in the CE evaluation
CE_BATCH_WINDOWS = 8
#: default memory budget for cached clean log-probabilities (rows x vocab x 4 bytes); batches
#: beyond it recompute the clean forward per SAE instead
MAX_LOGPROB_BYTES = 1 << 30


@dataclass
class EvalResult:
    metrics: dict[str, float]
    density_F: Tensor
    l0_hist: Tensor
    #: wall time of the parts of this evaluation (``reconstruction``, ``ce``); not metrics
    seconds: dict[str, float] = field(default_factory=dict)


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


def _grad_splice_fn(sae: SAE, model, hook, ids_BT: Tensor,
                    keep_BT: Tensor) -> Callable[[Tensor], Tensor]:
    """The splice of an SAE trained on LM-loss gradients (g-SAE, METHODS §7.5): its
    reconstruction ``sae(x, grad=g)`` with ``g`` from a clean forward + backward of the summed
    next-token CE over the scored positions with the true labels (the harvest's definition,
    :func:`saelab.harvest.lm_loss_grads`). The kept rows of ``g`` line up with the rows the
    splice replaces (same mask, same order)."""
    from saelab.harvest import lm_loss_grads

    _, grads_BTD, _ = lm_loss_grads(model, ids_BT, hook, lambda _acts: keep_BT)
    g_ND = grads_BTD[keep_BT.to(grads_BTD.device)].to(sae.W_dec.device, sae.W_dec.dtype)
    return lambda a: sae(a.to(g_ND.device, g_ND.dtype), grad=g_ND).recon


def _replace_kept(keep_BT: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def splice_fn(acts_BTD: Tensor) -> Tensor:
        out = acts_BTD.clone()
        out[keep_BT] = fn(acts_BTD[keep_BT]).to(acts_BTD.dtype)
        return out

    return splice_fn


# ---- the SAE-independent part of the LM evaluation ----------------------------------------------
@dataclass
class LMBatchBaseline:
    """One CE batch's clean and ablated sums (nats, summed over its scored tokens)."""

    window_slice: slice
    n_tok: int
    ce_sum: dict[str, float]  # clean, zero, mean
    kl_sum: dict[str, float]  # zero, mean
    logp_clean: Tensor | None  # [n_scored, V]; None: recomputed per SAE (memory budget)


@dataclass
class LMBaseline:
    """Clean / zero- / mean-ablation CE and KL of every CE batch, for reuse across SAEs."""

    batches: list[LMBatchBaseline]
    batch_windows: int


def _ce_inputs(windows_NT: Tensor, keep_NT: Tensor, sl: slice, dev) -> tuple[Tensor, ...]:
    ids_BT = windows_NT[sl].to(dev)
    keep_BT = keep_NT[sl].to(dev)
    # Score predictions made from spliced positions: logits at t predict token t+1.
    score_BT = keep_BT[:, :-1]
    targets = ids_BT[:, 1:][score_BT]
    return ids_BT, keep_BT, score_BT, targets


def _ablation_fns(mean_act_D: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    return {
        "zero": lambda a: torch.zeros_like(a),
        "mean": lambda a: mean_act_D.to(a.device, a.dtype).expand_as(a),
    }


def _batch_baseline(lm, hook, ids_BT: Tensor, keep_BT: Tensor, score_BT: Tensor,
                    targets: Tensor, logp_clean: Tensor, mean_act_D: Tensor, sl: slice,
                    keep_logprobs: bool) -> LMBatchBaseline:
    from saelab.models.hooks import splice

    ce = {"clean": -logp_clean.gather(1, targets[:, None]).sum().item()}
    kl = {}
    for name, fn in _ablation_fns(mean_act_D).items():
        with splice(lm.model, hook, _replace_kept(keep_BT, fn)):
            logp = _logprobs(lm.model(ids_BT, use_cache=False).logits, score_BT)
        ce[name] = -logp.gather(1, targets[:, None]).sum().item()
        kl[name] = (logp_clean.exp() * (logp_clean - logp)).sum().item()
    return LMBatchBaseline(sl, int(score_BT.sum()), ce, kl, logp_clean if keep_logprobs else None)


@torch.inference_mode()
def lm_baseline(lm, hook, windows_NT: Tensor, keep_NT: Tensor, mean_act_D: Tensor,
                batch_windows: int = CE_BATCH_WINDOWS, progress: bool = False,
                max_logprob_bytes: int = MAX_LOGPROB_BYTES) -> LMBaseline:
    """Compute the SAE-independent part of :func:`lm_eval` once.

    Clean log-probabilities are kept (so each SAE costs one spliced forward per batch) while
    they fit in ``max_logprob_bytes``; later batches recompute the clean forward per SAE.
    """
    budget = max_logprob_bytes
    out = []
    batches = list(_batches(windows_NT.shape[0], batch_windows))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval baseline: LM ablations", unit="batch", leave=False)
    for sl in batches:
        ids_BT, keep_BT, score_BT, targets = _ce_inputs(windows_NT, keep_NT, sl, lm.device)
        logp_clean = _logprobs(lm.model(ids_BT, use_cache=False).logits, score_BT)
        nbytes = logp_clean.numel() * logp_clean.element_size()
        keep = nbytes <= budget
        budget -= nbytes if keep else 0
        out.append(_batch_baseline(lm, hook, ids_BT, keep_BT, score_BT, targets, logp_clean,
                                   mean_act_D, sl, keep))
    return LMBaseline(out, batch_windows)


@torch.inference_mode()
def lm_eval(sae: SAE, lm, hook, windows_NT: Tensor, keep_NT: Tensor, mean_act_D: Tensor,
            batch_windows: int = CE_BATCH_WINDOWS, progress: bool = False,
            baseline: LMBaseline | None = None) -> dict[str, float]:
    """CE loss recovered, delta LM loss and KL score with the SAE spliced into the LM.

    ``baseline``: the clean/ablation part from :func:`lm_baseline` on the same windows, keep
    mask and mean (computed here, batch by batch, when None).
    """
    from saelab.models.hooks import splice

    model, dev = lm.model, lm.device
    sae_dev, sae_dt = sae.W_dec.device, sae.W_dec.dtype
    ablations: dict[str, Callable[[Tensor], Tensor]] = {
        "sae": lambda a: sae(a.to(sae_dev, sae_dt)).recon,
    }
    ce_sum = {k: 0.0 for k in ("clean", "sae", "zero", "mean")}
    kl_sum = {k: 0.0 for k in ("sae", "zero", "mean")}
    n_tok = 0
    batches = list(_batches(windows_NT.shape[0], batch_windows))
    if baseline is not None and [b.window_slice for b in baseline.batches] != batches:
        raise ValueError("the LM baseline was computed on other CE windows or batch sizes")
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval: LM splices", unit="batch", leave=False)
    for i, sl in enumerate(batches):
        ids_BT, keep_BT, score_BT, targets = _ce_inputs(windows_NT, keep_NT, sl, dev)
        base = baseline.batches[i] if baseline is not None else None
        if base is not None and base.logp_clean is not None:
            logp_clean = base.logp_clean
        else:
            logp_clean = _logprobs(model(ids_BT, use_cache=False).logits, score_BT)
        if base is None:
            base = _batch_baseline(lm, hook, ids_BT, keep_BT, score_BT, targets, logp_clean,
                                   mean_act_D, sl, keep_logprobs=False)
        n_tok += base.n_tok
        for name, v in base.ce_sum.items():
            ce_sum[name] += v
        for name, v in base.kl_sum.items():
            kl_sum[name] += v
        if sae.uses_lm_grads:  # g-SAE: select with this batch's LM-loss gradient (§7.5)
            ablations["sae"] = _grad_splice_fn(sae, model, hook, ids_BT, keep_BT)
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


# ---- the shared baseline and the evaluation ----------------------------------------------------
@dataclass
class EvalBaseline:
    """The SAE-independent inputs of :func:`evaluate`, computed once by :meth:`build`.

    Holds the held-out windows, their keep mask (after the outlier rule), the held-out
    activations (``eval_tokens`` x d_in floats, in memory), their mean and, unless built without
    it, the :class:`LMBaseline` of the CE windows.
    """

    hook_name: str
    data_cfg: DataConfig
    eval_cfg: EvalConfig
    windows_NT: Tensor
    keep_NT: Tensor
    acts: list[Tensor]
    kept_before: int
    mean_act_D: Tensor
    n_ce: int
    lm: LMBaseline | None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    @torch.inference_mode()
    def build(cls, lm, hook, data_cfg: DataConfig, eval_cfg: EvalConfig, skip_ce: bool = False,
              progress: bool = True, with_lm: bool = True,
              max_logprob_bytes: int = MAX_LOGPROB_BYTES) -> EvalBaseline:
        """Held-out windows and activations; with ``with_lm`` also the clean/ablated CE."""
        from saelab.data.windows import drop_norm_outliers
        from saelab.models.hooks import run_to_hook

        t0 = time.perf_counter()
        kept_per_window = max(1, data_cfg.context_size - data_cfg.exclude_first_positions)
        n_windows = max(eval_cfg.ce_windows, math.ceil(eval_cfg.eval_tokens / kept_per_window))
        windows_NT, keep_NT = heldout_windows(lm, data_cfg, n_windows)
        kept_before = int(keep_NT.sum())
        it = list(_batches(windows_NT.shape[0], 16))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="eval: activations", unit="batch", leave=False)
        acts = []
        sum_D = torch.zeros(lm.d_model, dtype=torch.float64, device=lm.device)
        n = 0
        for sl in it:
            a_BTD = run_to_hook(lm.model, windows_NT[sl].to(lm.device), hook)
            # The same outlier rule as the harvest, so eval scores the tokens training saw;
            # dropped positions are also left clean in the LM splices.
            keep_NT[sl] = drop_norm_outliers(a_BTD, keep_NT[sl], data_cfg.exclude_norm_outliers)
            x = a_BTD[keep_NT[sl].to(a_BTD.device)].float()
            acts.append(x)
            # summed exactly as ReconstructionMetrics does (float64, batch by batch)
            sum_D += x.double().sum(0)
            n += x.shape[0]
        mean_act_D = (sum_D / max(n, 1)).float()
        n_ce = 0 if skip_ce else min(eval_cfg.ce_windows, windows_NT.shape[0])
        seconds = {"activations": time.perf_counter() - t0}
        base = None
        if with_lm and n_ce > 0:
            t0 = time.perf_counter()
            base = lm_baseline(lm, hook, windows_NT[:n_ce], keep_NT[:n_ce], mean_act_D,
                               progress=progress, max_logprob_bytes=max_logprob_bytes)
            seconds["ce"] = time.perf_counter() - t0
        return cls(hook.name, data_cfg, eval_cfg, windows_NT, keep_NT, acts, kept_before,
                   mean_act_D, n_ce, base, seconds)

    def check_matches(self, hook, data_cfg: DataConfig, eval_cfg: EvalConfig) -> None:
        from dataclasses import asdict

        mine = (self.hook_name, asdict(self.data_cfg), asdict(self.eval_cfg))
        if mine != (hook.name, asdict(data_cfg), asdict(eval_cfg)):
            raise ValueError("this EvalBaseline was built for another hook, data or eval config")


@torch.inference_mode()
def evaluate(sae: SAE, lm, hook, data_cfg: DataConfig, eval_cfg: EvalConfig,
             skip_ce: bool = False, progress: bool = True,
             baseline: EvalBaseline | None = None) -> EvalResult:
    """Evaluate ``sae`` (acting on raw activations) on held-out documents.

    ``baseline``: an :class:`EvalBaseline` built for the same hook/data/eval settings, shared by
    many SAEs; without one, the SAE-independent parts are computed here.
    """
    if baseline is None:
        # one SAE: stream the CE ablations batch by batch instead of caching log-probs
        baseline = EvalBaseline.build(lm, hook, data_cfg, eval_cfg, skip_ce=skip_ce,
                                      progress=progress, with_lm=False)
    else:
        baseline.check_matches(hook, data_cfg, eval_cfg)
    t0 = time.perf_counter()
    rec = reconstruction_eval(sae, iter(baseline.acts))
    metrics = rec.compute()
    metrics["eval_positions_dropped_as_outliers"] = float(
        baseline.kept_before - int(baseline.keep_NT.sum()))
    seconds = {"reconstruction": time.perf_counter() - t0}
    n_ce = baseline.n_ce if not skip_ce else 0
    if n_ce > 0:
        t0 = time.perf_counter()
        metrics.update(lm_eval(sae, lm, hook, baseline.windows_NT[:n_ce],
                               baseline.keep_NT[:n_ce], baseline.mean_act_D,
                               progress=progress, baseline=baseline.lm))
        seconds["ce"] = time.perf_counter() - t0
    return EvalResult(metrics, rec.feature_density().float().cpu(), rec.l0_hist.cpu(), seconds)
