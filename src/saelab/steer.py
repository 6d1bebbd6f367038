"""Steer an LM with one SAE latent and compare generations with and without it.

Two interventions at the SAE's hook, applied at every position but the first (the attention
sink, which the SAE never saw in training) of the prompt and of every generated token:

- ``additive``: ``acts + S * max_act * W_dec[i]``, where ``max_act`` is the latent's largest
  activation on held-out tokens (the SAELens steering tutorial adds ``coeff * W_dec[i]``;
  Neuronpedia's additive mode scales the strength by the feature's max activation, as here);
- ``clamp``: encode, set latent ``i`` to ``S * max_act``, decode, and add back the SAE error
  ``acts - decode(encode(acts))``, so everything the SAE does not touch stays as it was:
  ``acts + decode(f') - decode(f)``.

Generation is greedy by default (reproducible); with sampling the seed is set before each
generation, so the same seed gives the same text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saelab.config import opt
from saelab.errors import ConfigError
from saelab.evals.evaluate import heldout_windows
from saelab.io import load_sae
from saelab.models.hooks import parse_hook, run_to_hook, splice
from saelab.models.loading import load_model
from saelab.report.dashboard import run_configs
from saelab.runtime import resolve_device

MODES = ("additive", "clamp")


@dataclass
class SteerConfig:
    """Steering settings (`saelab steer`)."""

    latent: int = opt(-1, "Latent to steer with (required).")
    prompt: str = opt("", "Prompt to continue (required).")
    strength: float = opt(
        4.0, "Steering strength S in units of the latent's max held-out activation: additive "
        "mode adds S * max_act * W_dec[latent]; clamp mode sets the latent to S * max_act.")
    strengths: str = opt(
        "", "Comma-separated strengths for a table (e.g. -4,-2,0,2,4); overrides --strength.")
    mode: str = opt("additive", "additive, clamp, or both.", choices=("additive", "clamp", "both"))
    max_new_tokens: int = opt(32, "Tokens to generate per continuation.")
    greedy: bool = opt(True, "Greedy decoding (reproducible); --no-greedy samples.")
    temperature: float = opt(1.0, "Sampling temperature (with --no-greedy).")
    seed: int = opt(0, "Seed set before every generation (matters with --no-greedy).")
    max_act: float = opt(
        0.0, "The latent's max activation that S is scaled by; 0 = read it from the run's "
        "dashboard JSON if there is one, else measure it on --max-act-tokens held-out tokens.")
    max_act_tokens: int = opt(8192, "Held-out tokens to measure the max activation on.")
    device: str = opt("auto", "Torch device.")

    def strength_list(self) -> list[float]:
        if not self.strengths.strip():
            return [self.strength]
        try:
            return [float(s) for s in self.strengths.split(",") if s.strip()]
        except ValueError as e:
            raise ConfigError(f"--strengths {self.strengths!r}: give numbers separated by "
                              f"commas, e.g. -4,-2,0,2,4") from e

    def modes(self) -> tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)

    def validate(self) -> None:
        if self.latent < 0:
            raise ConfigError("--latent is required: the index of the latent to steer with")
        if not self.prompt:
            raise ConfigError('--prompt is required, e.g. --prompt "The weather today"')
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        self.strength_list()


@dataclass
class SteerRow:
    mode: str  # "none" for the unsteered baseline
    strength: float
    text: str  # the continuation only


def steering_fn(sae, latent: int, value: float, mode: str,
                skip_first: bool = True) -> Callable[[Tensor], Tensor]:
    """The hook replacement ``acts_BTD -> steered acts_BTD`` of one intervention.

    ``value``: the added coefficient (additive: ``value * W_dec[latent]``) or the clamped
    latent value (clamp). ``skip_first``: leave position 0 alone in a multi-token forward
    (the prompt's attention sink); single-token decoding steps are always steered."""
    if mode not in MODES:
        raise ConfigError(f"unknown steering mode {mode!r}: choose one of {', '.join(MODES)}")
    dev, dt = sae.W_dec.device, sae.W_dec.dtype

    def fn(acts_BTD: Tensor) -> Tensor:
        a = acts_BTD.to(dev, dt)
        if mode == "additive":
            new = a + value * sae.W_dec[latent]
        else:
            shape = a.shape
            x = a.reshape(-1, shape[-1])
            f = sae.encode(x)
            f2 = f.clone()
            f2[:, latent] = value
            new = (x + sae.decode(f2) - sae.decode(f)).view(shape)
        if skip_first and new.shape[1] > 1:
            new[:, 0] = a[:, 0]
        return new.to(acts_BTD.device)

    return fn


def _prompt_ids(tokenizer, prompt: str, prepend_bos: bool) -> Tensor:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return torch.tensor([ids], dtype=torch.long)


@torch.inference_mode()
def generate(lm, ids_1T: Tensor, cfg: SteerConfig, fn: Callable[[Tensor], Tensor] | None,
             hook) -> str:
    """One continuation of ``ids_1T``, steered by ``fn`` at ``hook`` (None: clean)."""
    torch.manual_seed(cfg.seed)
    kw = {"do_sample": False} if cfg.greedy else {"do_sample": True,
                                                  "temperature": cfg.temperature}
    pad = lm.tokenizer.pad_token_id
    if pad is None:
        pad = lm.tokenizer.eos_token_id
    ids = ids_1T.to(lm.device)
    with splice(lm.model, hook, fn) if fn is not None else nullcontext():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                                top_k=None, top_p=None, **kw)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def steer(sae, lm, hook, cfg: SteerConfig, max_act: float,
          prepend_bos: bool = True) -> list[SteerRow]:
    """The unsteered continuation, then one per (mode, strength) of ``cfg``."""
    cfg.validate()
    if not 0 <= cfg.latent < sae.cfg.d_sae:
        raise ConfigError(f"--latent {cfg.latent} is out of range: the SAE has "
                          f"{sae.cfg.d_sae} latents (0-{sae.cfg.d_sae - 1})")
    ids = _prompt_ids(lm.tokenizer, cfg.prompt, prepend_bos)
    rows = [SteerRow("none", 0.0, generate(lm, ids, cfg, None, hook))]
    for mode in cfg.modes():
        for s in cfg.strength_list():
            fn = steering_fn(sae, cfg.latent, s * max_act, mode)
            rows.append(SteerRow(mode, s, generate(lm, ids, cfg, fn, hook)))
    return rows


@torch.inference_mode()
def measure_max_act(sae, lm, hook, data_cfg, latent: int, tokens: int) -> float:
    """Largest activation of ``latent`` on the first ``tokens`` held-out tokens."""
    per = max(1, data_cfg.context_size - data_cfg.exclude_first_positions)
    windows_NT, keep_NT = heldout_windows(lm, data_cfg, max(1, math.ceil(tokens / per)))
    best = 0.0
    for i in range(0, windows_NT.shape[0], 8):
        a = run_to_hook(lm.model, windows_NT[i:i + 8].to(lm.device), hook)
        x = a[keep_NT[i:i + 8].to(a.device)].to(sae.W_dec.device, sae.W_dec.dtype)
        best = max(best, float(sae.encode(x)[:, latent].abs().max()))
    return best


def _dashboard_max_act(run: Path, latent: int) -> float | None:
    for p in (run / "dashboard" / "features" / f"{latent}.json",
              run.parent / "dashboard" / "features" / f"{latent}.json"):
        if p.is_file():
            try:
                return float(json.loads(p.read_text())["maxActApprox"])
            except (OSError, ValueError, KeyError):
                return None
    return None


def steer_run(run: str | Path, cfg: SteerConfig, log=print) -> tuple[list[SteerRow], float]:
    """`saelab steer RUN`: load the run's SAE and LM and steer; returns (rows, max_act)."""
    cfg.validate()
    run = Path(run)
    model_cfg, data_cfg, _, sae_dir = run_configs(run)
    model_cfg.device = cfg.device if cfg.device != "auto" else model_cfg.device
    sae = load_sae(sae_dir, device=resolve_device(cfg.device))
    lm = load_model(model_cfg)
    hook = parse_hook(model_cfg.hook, lm.n_layers)
    if not 0 <= cfg.latent < sae.cfg.d_sae:
        raise ConfigError(f"--latent {cfg.latent} is out of range: the SAE has "
                          f"{sae.cfg.d_sae} latents (0-{sae.cfg.d_sae - 1})")
    max_act = cfg.max_act or _dashboard_max_act(run, cfg.latent)
    if not max_act:
        max_act = measure_max_act(sae, lm, hook, data_cfg, cfg.latent, cfg.max_act_tokens)
        log(f"latent {cfg.latent}: max activation {max_act:.4g} on "
            f"{cfg.max_act_tokens:,} held-out tokens")
    if max_act == 0:
        log(f"note: latent {cfg.latent} never fired on held-out tokens; pass --max-act")
    return steer(sae, lm, hook, cfg, max_act, prepend_bos=data_cfg.prepend_bos), max_act


def steer_table(rows: list[SteerRow], cfg: SteerConfig, max_act: float) -> str:
    lines = [f"latent {cfg.latent} · max activation {max_act:.4g} · prompt {cfg.prompt!r}",
             f"{'mode':9s} {'S':>6s}  continuation"]
    for r in rows:
        text = r.text.replace("\n", "\\n")
        s = "" if r.mode == "none" else f"{r.strength:g}"
        lines.append(f"{r.mode:9s} {s:>6s}  {text}")
    return "\n".join(lines)
