"""Held-out evaluation of an SAE at its hook point (docs/methods.md §13.2).

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
:class:`EvalContext` and reused for many SAEs (``saelab sweep``); ``evaluate`` with a shared
context gives exactly the numbers it gives without one. The metrics themselves come from the
eval plug-ins (``saelab.evals.core``, ``.ce``, ``.density``; see ``saelab.evals.registry``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.config import DataConfig, EvalConfig
from saelab.data.corpus import iter_documents
from saelab.data.windows import drop_norm_outliers, iter_windows, keep_mask
from saelab.evals.metrics import ReconstructionMetrics, ce_metrics
from saelab.evals.registry import get_eval, metrics_of, parse_evals
from saelab.harvest import lm_loss_grads
from saelab.models.hooks import run_to_hook, splice

if TYPE_CHECKING:
    from saelab.saes.base import SAE

#: windows per LM forward in the CE evaluation
CE_BATCH_WINDOWS = 8
#: windows per truncated LM forward when collecting the held-out activations
ACT_BATCH_WINDOWS = 16
#: default memory budget for cached clean log-probabilities (rows x vocab x 4 bytes); batches
#: beyond it recompute the clean forward per SAE instead
MAX_LOGPROB_BYTES = 1 << 30


@dataclass
class EvalResult:
    metrics: dict[str, float]
    density_F: Tensor
    l0_hist: Tensor
    #: wall time of each eval (by eval name: ``core``, ``ce``, ...); not metrics
    seconds: dict[str, float] = field(default_factory=dict)
    #: each eval's typed output, by eval name
    outputs: dict[str, Any] = field(default_factory=dict)
    #: held-out windows of the activations and of the CE evaluation
    n_windows: int = 0
    n_ce_windows: int = 0


def heldout_windows(lm, data_cfg: DataConfig, n_windows: int) -> tuple[Tensor, Tensor]:
    """The first ``n_windows`` windows of the held-out split and their keep mask."""
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
    """The splice of an SAE trained on LM-loss gradients (g-SAE, docs/methods.md §7.5): its
    reconstruction ``sae(x, grad=g)`` with ``g`` from a clean forward + backward of the summed
    next-token CE over the scored positions with the true labels (the harvest's definition,
    :func:`saelab.harvest.lm_loss_grads`). The kept rows of ``g`` line up with the rows the
    splice replaces (same mask, same order)."""
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


# ---- the shared context and the evaluation ------------------------------------------------------
@dataclass
class EvalContext:
    """The SAE-independent inputs of every eval, computed once by :meth:`build` and shared by
    all SAEs evaluated at one hook (``saelab sweep``).

    Two protocols on the same held-out windows:

    - the default, SAEBench's core protocol (``keep_NT``): every position but BOS / special
      tokens is scored and spliced (SAE, zero and mean ablation);
    - the *filtered* variant (``filt_NT``), the training-time exclusion: also drops the first
      ``exclude_first_positions`` positions and positions whose norm exceeds
      ``exclude_norm_outliers`` x the batch median (massive activations); those are left clean
      in its splices and not scored. Its metrics get the ``_filtered`` suffix.

    Holds the loaded LM and hook, the held-out activations of the default protocol (in memory)
    with a per-row flag for the filtered variant, each protocol's mean activation and, unless
    built without them, each protocol's :class:`LMBaseline` of the CE windows. The
    reconstruction pass of the last SAE seen is cached, so evals that read it run the SAE once.
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
    model: Any = None
    hook: Any = None
    progress: bool = False
    #: the filtered variant: its mask, per acts batch the rows it keeps, mean and LM baseline
    filt_NT: Tensor | None = None
    in_filt: list[Tensor] = field(default_factory=list)
    mean_filt_D: Tensor | None = None
    lm_filtered: LMBaseline | None = None
    _rec: tuple[int, ReconstructionMetrics, ReconstructionMetrics] | None = field(
        default=None, repr=False)

    @classmethod
    @torch.inference_mode()
    def build(cls, lm, hook, data_cfg: DataConfig, eval_cfg: EvalConfig, skip_ce: bool = False,
              progress: bool = True, with_lm: bool = True,
              max_logprob_bytes: int = MAX_LOGPROB_BYTES) -> EvalContext:
        """Held-out windows and activations; with ``with_lm`` also the clean/ablated CE."""
        t0 = time.perf_counter()
        kept_per_window = max(1, data_cfg.context_size - data_cfg.exclude_first_positions)
        n_windows = max(eval_cfg.ce_windows, math.ceil(eval_cfg.eval_tokens / kept_per_window))
        windows_NT, filt_NT = heldout_windows(lm, data_cfg, n_windows)
        keep_NT = keep_mask(windows_NT, lm.tokenizer, 0, True)  # SAEBench: special tokens only
        kept_before = int(filt_NT.sum())
        it = list(_batches(windows_NT.shape[0], ACT_BATCH_WINDOWS))
        if progress:
            it = tqdm(it, desc="eval: activations", unit="batch", leave=False)
        acts, in_filt = [], []
        sum_D = torch.zeros(lm.d_model, dtype=torch.float64, device=lm.device)
        sum_filt_D = torch.zeros_like(sum_D)
        n = n_filt = 0
        for sl in it:
            a_BTD = run_to_hook(lm.model, windows_NT[sl].to(lm.device), hook)
            # the harvest's outlier rule, so the filtered variant scores the tokens training saw
            filt_NT[sl] = drop_norm_outliers(a_BTD, filt_NT[sl], data_cfg.exclude_norm_outliers)
            keep_BT = keep_NT[sl].to(a_BTD.device)
            x = a_BTD[keep_BT].float()
            f = filt_NT[sl].to(a_BTD.device)[keep_BT]
            acts.append(x)
            in_filt.append(f)
            # summed exactly as ReconstructionMetrics does (float64, batch by batch)
            sum_D += x.double().sum(0)
            sum_filt_D += x[f].double().sum(0)
            n += x.shape[0]
            n_filt += int(f.sum())
        if not bool((filt_NT <= keep_NT).all()):
            raise AssertionError("the filtered positions must be a subset of the scored ones")
        mean_act_D = (sum_D / max(n, 1)).float()
        mean_filt_D = (sum_filt_D / max(n_filt, 1)).float()
        n_ce = 0 if skip_ce else min(eval_cfg.ce_windows, windows_NT.shape[0])
        seconds = {"activations": time.perf_counter() - t0}
        base = base_filt = None
        if with_lm and n_ce > 0:
            t0 = time.perf_counter()
            base = lm_baseline(lm, hook, windows_NT[:n_ce], keep_NT[:n_ce], mean_act_D,
                               progress=progress, max_logprob_bytes=max_logprob_bytes)
            base_filt = lm_baseline(lm, hook, windows_NT[:n_ce], filt_NT[:n_ce], mean_filt_D,
                                    progress=progress, max_logprob_bytes=max_logprob_bytes)
            seconds["ce"] = time.perf_counter() - t0
        return cls(hook.name, data_cfg, eval_cfg, windows_NT, keep_NT, acts, kept_before,
                   mean_act_D, n_ce, base, seconds, model=lm, hook=hook, progress=progress,
                   filt_NT=filt_NT, in_filt=in_filt, mean_filt_D=mean_filt_D,
                   lm_filtered=base_filt)

    def check_matches(self, hook, data_cfg: DataConfig, eval_cfg: EvalConfig) -> None:
        mine = (self.hook_name, asdict(self.data_cfg), asdict(self.eval_cfg))
        if mine != (hook.name, asdict(data_cfg), asdict(eval_cfg)):
            raise ValueError("this EvalContext was built for another hook, data or eval config")

    def _passes(self, sae: SAE) -> tuple[ReconstructionMetrics, ReconstructionMetrics]:
        if self._rec is None or self._rec[0] != id(sae):
            dev, dt = sae.W_dec.device, sae.W_dec.dtype
            full = ReconstructionMetrics(sae.d_in, sae.d_sae, device=dev)
            filt = ReconstructionMetrics(sae.d_in, sae.d_sae, device=dev)
            with torch.inference_mode():
                for x_BD, f_B in zip(self.acts, self.in_filt, strict=True):
                    x_BD = x_BD.to(dev, dt)
                    out = sae(x_BD)
                    full.update(x_BD, out.recon, out.latents)
                    f_B = f_B.to(dev)
                    filt.update(x_BD[f_B], out.recon[f_B], out.latents[f_B])
            self._rec = (id(sae), full, filt)
        return self._rec[1], self._rec[2]

    def reconstruction(self, sae: SAE) -> ReconstructionMetrics:
        """The pooled reconstruction pass of ``sae`` over the held-out activations, default
        protocol (cached for the last SAE; an SAE is not changed while it is evaluated)."""
        return self._passes(sae)[0]

    def reconstruction_filtered(self, sae: SAE) -> ReconstructionMetrics:
        """The same pass restricted to the filtered variant's rows."""
        return self._passes(sae)[1]

    def filtered_positions(self) -> tuple[int, float]:
        """(scored positions the filtered variant drops, their share of the total variance
        Σ‖x − x̄‖² of the scored activations about their mean)."""
        mean = self.mean_act_D.double()
        total = dropped = 0.0
        n_drop = 0
        for x, f in zip(self.acts, self.in_filt, strict=True):
            dev_sq = (x.double() - mean.to(x.device)).pow(2).sum(-1)
            total += dev_sq.sum().item()
            dropped += dev_sq[~f].sum().item()
            n_drop += int((~f).sum())
        return n_drop, (dropped / total if total > 0 else float("nan"))

    def forget(self) -> None:
        """Drop the cached reconstruction pass (call when the SAE is done)."""
        self._rec = None


#: the name the sweep and older code use
EvalBaseline = EvalContext


@torch.inference_mode()
def evaluate(sae: SAE, lm, hook, data_cfg: DataConfig, eval_cfg: EvalConfig,
             skip_ce: bool = False, progress: bool = True,
             baseline: EvalContext | None = None, evals: list[str] | None = None,
             configs: dict[str, Any] | None = None) -> EvalResult:
    """Run the evals ``evals`` (default: every registered eval; ``skip_ce`` drops those that
    splice the SAE into the LM) on ``sae`` (acting on raw activations) on held-out documents.

    ``baseline``: an :class:`EvalContext` built for the same hook/data/eval settings, shared by
    many SAEs; without one, the SAE-independent parts are computed here. ``configs``: an eval's
    config instance by eval name (default: the eval's config defaults).
    """
    names = parse_evals(",".join(evals) if evals else None, skip_ce)
    needs_lm = any(get_eval(n).needs_lm for n in names)
    if baseline is None:
        # one SAE: stream the CE ablations batch by batch instead of caching log-probs
        ctx = EvalContext.build(lm, hook, data_cfg, eval_cfg, skip_ce=not needs_lm,
                                progress=progress, with_lm=False)
    else:
        baseline.check_matches(hook, data_cfg, eval_cfg)
        ctx = baseline
    ctx.model, ctx.hook, ctx.progress = lm, hook, progress
    outputs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    metrics: dict[str, float] = {}
    try:
        for name in names:
            ev = get_eval(name)
            t0 = time.perf_counter()
            outputs[name] = ev.run(ctx, sae, (configs or {}).get(name) or ev.config())
            seconds[name] = time.perf_counter() - t0
            metrics.update(metrics_of(outputs[name]))
        rec = ctx.reconstruction(sae)
        density_F, l0_hist = rec.feature_density().float().cpu(), rec.l0_hist.cpu()
    finally:
        ctx.forget()
    n_ce = ctx.n_ce if any(get_eval(n).needs_lm for n in names) else 0
    return EvalResult(metrics, density_F, l0_hist, seconds, outputs, ctx.windows_NT.shape[0],
                      n_ce)
