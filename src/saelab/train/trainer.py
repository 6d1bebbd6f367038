"""The training loop. It sees only an iterator of activation batches, never the LM.

The hot loop is matmuls: no ``.item()`` outside logging steps, schedules are Python floats,
dead-latent counters and running sums stay on the device.

Data-parallel (inside a ``torch.distributed`` process group, see ``saelab.train.distributed``):
every rank gets its ``B / W`` rows of the global batch, gradients are averaged over ranks
before clipping, "fired" masks are OR-ed so the dead-latent counters agree, logged metrics
are global, and only rank 0 writes checkpoints, logs and progress. Single-process runs take
the exact code path they always did.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab import dist
from saelab.config import TrainConfig
from saelab.errors import CheckpointError, ConfigError, SaelabError
from saelab.runtime import bf16_is_fast
from saelab.saes.base import SAE
from saelab.train.checkpoint import (
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from saelab.train.dead import DeadLatentTracker
from saelab.train.schedules import lr_multiplier, sparsity_warmup_steps


class TrainingDivergedError(SaelabError):
    """The loss became NaN or inf."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final: dict[str, float]


class Trainer:
    """Adam + schedules + clipping + dead-latent tracking + atomic checkpoints + JSONL log.

    ``input_scale`` multiplies every batch (input normalisation, docs/methods.md §0.3); the caller
    folds it into the weights after training.
    """

    def __init__(self, sae: SAE, cfg: TrainConfig, run_dir: Path | None = None,
                 input_scale: float = 1.0, progress: bool = True,
                 on_log: Callable[[dict[str, Any]], None] | None = None):
        self.sae, self.cfg, self.run_dir = sae, cfg, Path(run_dir) if run_dir else None
        #: ranks of the process group (1: a single process); only the main rank writes
        self.world, self.is_main = dist.world_size(), dist.is_main()
        if self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.input_scale = float(input_scale)
        self.progress, self.on_log = progress and self.is_main, on_log
        self.device = sae.W_dec.device
        self.autocast_dtype = resolve_autocast(cfg.autocast, self.device,
                                               family_auto=type(sae).autocast_auto)
        self._probe_pending = self.autocast_dtype is not None and cfg.autocast == "auto"
        self.total_steps = cfg.total_steps
        sae.sparsity_warmup_steps = sparsity_warmup_steps(self.total_steps, cfg.l1_warmup_fraction)
        sae.total_steps = self.total_steps

        defaults = type(sae).train_defaults
        lr = cfg.lr if cfg.lr is not None else defaults.get("lr", 3e-4)
        self.base_lr = float(lr(sae) if callable(lr) else lr)
        beta1 = cfg.adam_beta1 if cfg.adam_beta1 is not None else defaults.get("adam_beta1", 0.9)
        # Parameters a family adapts outside the optimiser (GBA's biases) have requires_grad off.
        self.named_params = {n: p for n, p in sae.named_parameters() if p.requires_grad}
        self.opt = torch.optim.Adam(
            list(self.named_params.values()), lr=self.base_lr, betas=(beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, **_adam_impl(self.device),
        )
        self.dead = DeadLatentTracker(sae.d_sae, cfg.dead_window(), self.device,
                                      eps=cfg.dead_activation_eps)
        sae.dead_eps = cfg.dead_activation_eps  # families that report fired_F themselves apply it
        self.step = 0
        self._wandb = _init_wandb(cfg, sae) if cfg.wandb_project and self.is_main else None

    # ---- state -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        names = {p: n for n, p in self.named_params.items()}
        tensors = {f"sae.{n}": t for n, t in self.sae.state_dict().items()}
        tensors.update({f"family.{n}": t for n, t in self.sae.training_state().items()})
        tensors.update(optimizer_tensors(self.opt, names))
        tensors["dead.tokens_since_fired"] = self.dead.tokens_since_fired
        return tensors

    def save_checkpoint(self) -> None:
        if self.run_dir is None or not self.is_main:
            return
        meta = {"input_scale": self.input_scale, "total_steps": self.total_steps,
                "batch_size": self.cfg.batch_size, "architecture": self.sae.architecture,
                "d_sae": self.sae.d_sae, "d_in": self.sae.d_in}
        save_checkpoint(self.run_dir, self.step, self.state_tensors(), meta)

    def resume(self) -> int:
        """Restore the newest checkpoint in ``run_dir``; returns the step to continue from."""
        if self.run_dir is None:
            raise CheckpointError("cannot resume without a run folder")
        ckpt = load_checkpoint(self.run_dir)
        m = ckpt.meta
        if (m.get("d_sae"), m.get("d_in"), m.get("batch_size")) != (
            self.sae.d_sae, self.sae.d_in, self.cfg.batch_size
        ):
            raise CheckpointError(
                f"checkpoint in {self.run_dir} was made with d_in={m.get('d_in')} "
                f"d_sae={m.get('d_sae')} batch_size={m.get('batch_size')}; resume with the same "
                "settings or pass --overwrite"
            )
        with torch.no_grad():
            for n, p in self.sae.state_dict().items():
                key = f"sae.{n}"
                if key not in ckpt.tensors or ckpt.tensors[key].shape != p.shape:
                    raise CheckpointError(f"damaged checkpoint: tensor {key} missing or misshapen")
                p.copy_(ckpt.tensors[key])
        prefix = "family."
        self.sae.load_training_state({k[len(prefix):]: v.to(self.device)
                                      for k, v in ckpt.tensors.items() if k.startswith(prefix)})
        restore_optimizer(self.opt, self.named_params, ckpt.tensors)
        self.dead.tokens_since_fired.copy_(ckpt.tensors["dead.tokens_since_fired"])
        self.input_scale = float(m["input_scale"])
        self.step = ckpt.step
        self._truncate_log(self.step)
        return self.step

    # ---- loop ---------------------------------------------------------------------------------
    def fit(self, batches: Iterator[Tensor], stop_after: int | None = None) -> TrainResult:
        """Train from ``self.step`` to ``total_steps`` (or for ``stop_after`` steps, for tests
        that simulate an interruption). ``batches`` must start at batch ``self.step``; a batch
        is ``x_BD`` or ``(x_BD, grad_BD)`` (LM-loss gradients, for families that use them)."""
        cfg, sae = self.cfg, self.sae
        if self.world > 1:  # every rank starts from rank 0's weights (and resumed state)
            dist.broadcast_([*sae.parameters(), *sae.buffers(), self.dead.tokens_since_fired])
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        bar = _progress(self.total_steps, self.step, self.progress)
        start_step, t0 = self.step, time.perf_counter()
        last: dict[str, float] = {}
        it = iter(batches)
        while self.step < end:
            try:
                batch = next(it)
            except StopIteration:
                raise ConfigError("the batch iterator ran out before the token budget") from None
            last = self.step_on(*self.prepare_batch(batch), end, t0, start_step, bar) or last
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        dist.barrier()  # the final checkpoint exists before any rank moves on
        secs = time.perf_counter() - t0
        tokens = (self.step - start_step) * cfg.batch_size
        return TrainResult(self.step, self.step * cfg.batch_size, secs,
                           tokens / secs if secs > 0 else 0.0, last)

    def prepare_batch(self, batch) -> tuple[Tensor, Tensor | None]:
        """A stream batch (``x_BD`` or ``(x_BD, grad_BD)``) on the device, in the SAE's dtype,
        multiplied by the input scale (``saelab.train.lockstep`` prepares one batch for several
        trainers that share device, dtype and scale)."""
        sae = self.sae
        x_BD, grad_BD = batch if isinstance(batch, tuple | list) else (batch, None)
        x_BD = x_BD.to(self.device, sae.W_dec.dtype, non_blocking=True)
        if grad_BD is not None:
            # d loss / d(c x) = (1/c) d loss / dx: the gradient at the normalised input
            grad_BD = grad_BD.to(self.device, sae.W_dec.dtype, non_blocking=True)
            if self.input_scale != 1.0:
                grad_BD = grad_BD / self.input_scale
        elif sae.uses_lm_grads:
            raise ConfigError(
                f"{sae.architecture} needs LM-loss gradients beside the activations: "
                "harvest the store with --with-grads")
        if self.input_scale != 1.0:
            x_BD = x_BD * self.input_scale
        return x_BD, grad_BD

    def step_on(self, x_BD: Tensor, grad_BD: Tensor | None, end: int, t0: float,
                start_step: int, bar=None) -> dict[str, float] | None:
        """One step of :meth:`fit` on a prepared batch: optimiser step, log line every
        ``log_every`` steps (returned), progress, checkpoint every ``checkpoint_every``."""
        cfg, rec = self.cfg, None
        out = self._train_step(x_BD, grad_BD)
        self.step += 1
        if self.step % cfg.log_every == 0 or self.step == end:
            rec = self._log(x_BD, out, t0, start_step)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4g}", l0=f"{rec['l0']:.1f}",
                                fvu=f"{rec['fvu']:.3f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < end:
            self.save_checkpoint()
        return rec

    def _train_step(self, x_BD: Tensor, grad_BD: Tensor | None = None):
        sae, cfg = self.sae, self.cfg
        if self.autocast_dtype is None:
            out = self._plain_loss_backward(x_BD, grad_BD)
        else:
            if self._probe_pending:
                self._probe_autocast(x_BD, grad_BD)
            out = (self._autocast_loss_backward(x_BD, grad_BD) if self.autocast_dtype
                   else self._plain_loss_backward(x_BD, grad_BD))
        if self.world > 1:
            dist.all_reduce_mean_grads_(self.named_params.values())
        if sae.unit_norm_decoder:
            sae.project_decoder_grad()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.named_params.values(), cfg.grad_clip, foreach=True)
        lr = self.base_lr * lr_multiplier(self.step, self.total_steps, cfg.lr_warmup_steps,
                                          cfg.lr_decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        if sae.unit_norm_decoder:
            sae.normalize_decoder()
        sae.after_step(self.step, out)
        if self.world > 1:
            fired_F = out.fired_F
            if fired_F is None:  # the tracker's own test, made before the OR over ranks
                lat = out.latents.detach()
                fired_F = (lat.amax(0) > self.dead.eps) | (lat.amin(0) < -self.dead.eps)
            self.dead.update_fired(dist.all_reduce_any(fired_F), x_BD.shape[0] * self.world)
        elif out.fired_F is not None:
            self.dead.update_fired(out.fired_F, x_BD.shape[0])
        else:
            self.dead.update(out.latents.detach())
        return out

    def _plain_loss_backward(self, x_BD: Tensor, grad_BD: Tensor | None):
        out = self.sae.loss(x_BD, self.step, dead_mask_F=self.dead.dead_mask(), grad_BD=grad_BD)
        self.opt.zero_grad(set_to_none=True)
        out.total.backward()
        return out

    def _probe_autocast(self, x_BD: Tensor, grad_BD: Tensor | None) -> None:
        """``--autocast auto``: try one step's loss and backward under autocast on a copy of the
        SAE (the real one and its state are untouched); fall back to float32 if the family's
        kernels refuse mixed dtypes."""
        self._probe_pending = False
        probe = copy.deepcopy(self.sae)
        try:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = probe.loss(x_BD, self.step, dead_mask_F=self.dead.dead_mask(),
                                 grad_BD=grad_BD)
            out.total.backward()
        except RuntimeError as e:
            if "type" not in str(e):
                raise
            self.autocast_dtype = None
        del probe

    def _autocast_loss_backward(self, x_BD: Tensor, grad_BD: Tensor | None):
        sae = self.sae
        self.opt.zero_grad(set_to_none=True)
        try:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = sae.loss(x_BD, self.step, dead_mask_F=self.dead.dead_mask(),
                               grad_BD=grad_BD)
            out.total.backward()
        except RuntimeError as e:  # a custom kernel that is not autocast-aware
            if "type" not in str(e):
                raise
            raise ConfigError(
                f"--autocast {self.cfg.autocast} is not supported by {sae.architecture} (its "
                f"kernels mix dtypes under autocast: {str(e).splitlines()[0][:100]}); use "
                "--autocast off") from None
        return out

    # ---- logging ------------------------------------------------------------------------------
    @torch.no_grad()
    def _log(self, x_BD: Tensor, out, t0: float, start_step: int) -> dict[str, float]:
        if self.world > 1:
            return self._log_global(x_BD, out, t0, start_step)
        total = out.total.item()
        if not math.isfinite(total):
            raise TrainingDivergedError(
                f"training diverged: loss is {total} at step {self.step}; lower --lr or "
                "--l1-coefficient, or check the activations"
            )
        x = x_BD.float()
        sse = (out.recon.float() - x).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
        rec = {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "loss": total,
            **{k: v.item() for k, v in out.terms.items()},
            "l0": (out.l0 if out.l0 is not None
                   else (out.latents != 0).sum(-1).float().mean()).item(),
            "fvu": (sse / var).item(),
        }
        return self._write_log(rec, t0, start_step)

    @torch.no_grad()
    def _log_global(self, x_BD: Tensor, out, t0: float, start_step: int) -> dict[str, float]:
        """The record of :meth:`_log` over the global batch (a collective: every rank calls it).

        Each rank's loss terms are its share of the global loss under the gradient-averaging
        convention (``saelab.dist``), so their rank mean is the global value; so is the mean of
        the per-token L0 (equal local batches)."""
        x = x_BD.float()
        l0 = (out.l0 if out.l0 is not None
              else (out.latents != 0).sum(-1).float().mean())
        names = list(out.terms)
        means = torch.stack([out.total.detach().float().reshape(()), l0.float().reshape(()),
                             *(out.terms[k].detach().float().reshape(()) for k in names)])
        means = dist.all_reduce_sum(means) / self.world
        sse = dist.all_reduce_sum((out.recon.float() - x).pow(2).sum())
        var = dist.global_centered_sq_sum(x)
        vals = means.tolist()
        if not math.isfinite(vals[0]):
            raise TrainingDivergedError(
                f"training diverged: loss is {vals[0]} at step {self.step}; lower --lr or "
                "--l1-coefficient, or check the activations"
            )
        rec = {"step": self.step, "tokens": self.step * self.cfg.batch_size, "loss": vals[0],
               **dict(zip(names, vals[2:], strict=True)), "l0": vals[1],
               "fvu": (sse / var).item()}
        return self._write_log(rec, t0, start_step)

    def _write_log(self, rec: dict[str, Any], t0: float, start_step: int) -> dict[str, float]:
        secs = time.perf_counter() - t0
        rec.update({
            "dead_fraction": self.dead.dead_fraction().item(),
            "lr": self.opt.param_groups[0]["lr"],
            "tokens_per_second": (self.step - start_step) * self.cfg.batch_size / max(secs, 1e-9),
        })
        if not self.is_main:
            return rec
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log(rec, step=self.step)
        if self.on_log is not None:
            self.on_log(rec)
        return rec

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if path is None or not path.exists() or not self.is_main:
            return
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


AUTOCAST_MODES = ("off", "bf16", "auto")


def resolve_autocast(mode: str, device: torch.device,
                     family_auto: bool = True) -> torch.dtype | None:
    """The autocast dtype of the SAE forward/backward, or None for plain float32.

    ``auto`` picks bf16 for families that opt in (``SAE.autocast_auto``: measured faster with
    an unchanged FVU) where :func:`saelab.runtime.bf16_is_fast` says bf16 wins on the device
    (the cached one-off micro-benchmark ``--model-dtype auto`` uses); off elsewhere. A family whose kernels are not autocast-aware then
    trains in float32 (see :meth:`Trainer._probe_autocast`)."""
    mode = (mode or "off").strip().lower()
    if mode not in AUTOCAST_MODES:
        raise ConfigError(f"unknown --autocast {mode!r}: choose one of {', '.join(AUTOCAST_MODES)}")
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if family_auto and bf16_is_fast(device) else None


def _adam_impl(device: torch.device) -> dict[str, bool]:
    """Fused Adam where torch has it (one pass per tensor; ~4x faster than foreach on a 2-core
    CPU for a 4096-latent SAE), else the foreach implementation."""
    if device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _init_wandb(cfg: TrainConfig, sae: SAE):
    try:
        import wandb  # deferred: optional (--wandb-project only), and heavy
    except ImportError:
        raise ConfigError(
            "--wandb-project was given but wandb is not installed: pip install wandb"
        ) from None
    return wandb.init(project=cfg.wandb_project, config={"train": asdict(cfg),
                                                         "sae": asdict(sae.cfg)})
