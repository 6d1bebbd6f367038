"""`saelab darkmatter RUN [RUN ...] --out DIR`: the SAE dark-matter analysis (docs/methods.md §12;
Engels, Riggs & Tegmark, "Decomposing The Dark Matter of Sparse Autoencoders", TMLR 2025).

On held-out activation rows (documents the SAEs never trained on; rows shuffled with the seed,
least squares fitted on one part, every R² and FVU reported on the rest):

1. decomposition ``x = x̂ + e_lin + e_nl`` with ``e_lin = x A*`` (least squares, no intercept
   by default): R² of the error vector and of ‖e‖², FVU of x̂ and of x̂ + e_lin, and the
   reference code's baselines for the norm (‖x‖, the per-token-id mean, the SAE's L0);
2. per-token scaling across widths (the extra RUNs, or ``--widths`` TopK SAEs trained on the
   training store): R² matrix of ‖e_j‖ on [‖e_i‖, 1], the share of the rest explained by
   ‖e_nl,i‖, and FVU against width split into linear and nonlinear parts with ``c + a·W^-m``;
3. downstream CE with x̂ + e_lin, x̂ + e_nl, x̂ and the clean activations spliced in;
4. TopK SAEs of the same width and k trained on e_lin and on e_nl (and on x, as a control);
5. gradient pursuit on the SAE's decoder as the encoder (each token to its own L0), and the
   nonlinear error before and after;
6. linear maps from other components (layer L−1 residual, same-layer MLP and attention
   outputs; stores aligned by (window, position)) to the layer-L error and nonlinear error.

Writes ``darkmatter.json`` (everything, plus the claims table), plots, and prints the claims
table: the paper's numbers beside ours.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.analysis import _dark_matter_core as core
from saelab.analysis._dark_matter_plots import write_plots
from saelab.analysis.registry import Analysis, register_analysis
from saelab.config import (
    DataConfig,
    HarvestConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainConfig,
    from_dict,
    opt,
)
from saelab.data.store import ActivationStore
from saelab.data.stream import ActivationStream, norm_scale_of_rows
from saelab.errors import ConfigError
from saelab.evals.evaluate import heldout_windows
from saelab.fsutil import atomic_write_json
from saelab.harvest import default_store_path, harvest
from saelab.io import load_sae, read_metadata, save_sae
from saelab.models.hooks import parse_hook, splice
from saelab.models.loading import load_model
from saelab.runtime import cache_root, resolve_device
from saelab.saes.registry import build_sae
from saelab.train.trainer import Trainer


@dataclass
class DarkMatterConfig:
    """Settings of `saelab darkmatter` (the first RUN is the SAE analysed)."""

    tokens: int = opt(300_000, "Held-out activation rows (both halves together; the paper's "
                      "300k). Fewer are used when the held-out split has fewer.")
    fit_fraction: float = opt(0.5, "Fraction of the rows the least squares are fitted on; the "
                              "rest are held out for every reported R² and FVU.")
    seed: int = opt(0, "Seed of the row shuffle and of every SAE trained here.")
    fit_intercept: bool = opt(False, "Fit e ≈ x A + b with an intercept (the reference code "
                              "fits none).")
    store: str = opt("", "Activation store of held-out rows at the first RUN's hook (split "
                     "eval); default: harvest one into the saelab cache.")
    device: str = opt("auto", "Device of the analysis (auto, cpu, cuda, ...).")
    chunk_rows: int = opt(4096, "Rows per chunk on the device (memory bound).")
    widths: str = opt("", "Comma-separated widths, e.g. 256,512,1024,2048: train TopK SAEs of "
                      "these widths at one k on the training store for the per-width scaling "
                      "(kept under DIR/widths/ and reused); default: scale over the given RUNs.")
    widths_k: int = opt(0, "k of the --widths SAEs; 0 = the first RUN's held-out mean L0.")
    widths_tokens: int = opt(150_000, "Training tokens of each --widths SAE.")
    train_store: str = opt("", "Training-split store for the --widths SAEs; default: the first "
                           "RUN's own store (its --store, or the cached one it was trained on).")
    batch_size: int = opt(1024, "Batch size of the SAEs trained here.")
    ce_windows: int = opt(32, "Held-out windows for the CE splices (x̂, x̂ + e_lin, x̂ + e_nl, "
                          "clean); 0 skips part 3.")
    parts_tokens: int = opt(300_000, "Training tokens of each TopK SAE trained on e_lin, on e_nl "
                            "and on x (the fitting rows, repeated); 0 skips part 4.")
    gp_tokens: int = opt(50_000, "Held-out rows for gradient pursuit (the same split); 0 skips "
                         "part 5.")
    prev_layer_run: str = opt("", "Run (or SAE folder) of an SAE at the residual stream of the "
                              "layer before, for part 6.")
    mlp_run: str = opt("", "Run of an SAE at the same layer's MLP output, for part 6.")
    attn_run: str = opt("", "Run of an SAE at the same layer's attention output, for part 6.")
    source_stores: list[str] = opt(
        [], "NAME=STORE: held-out store for a part-6 source (NAME prev_layer, mlp or attn); "
        "default: harvest it with the first RUN's data settings. Repeatable.",
        metavar="NAME=STORE")
    plots: bool = opt(True, "Write the PNG plots.")

    def validate(self) -> None:
        if self.tokens < 8:
            raise ConfigError(f"--tokens must be at least 8, got {self.tokens}")
        if not 0 < self.fit_fraction < 1:
            raise ConfigError(f"--fit-fraction must be in (0, 1), got {self.fit_fraction}")
        for name in ("chunk_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("widths_k", "widths_tokens", "ce_windows", "parts_tokens", "gp_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        self.width_list()
        self.source_store_map()

    def width_list(self) -> list[int]:
        try:
            ws = [int(w) for w in self.widths.replace(" ", "").split(",") if w]
        except ValueError:
            raise ConfigError(f"--widths must be comma-separated integers, got {self.widths!r}"
                              ) from None
        if any(w < 1 for w in ws):
            raise ConfigError(f"--widths must be positive, got {self.widths!r}")
        return sorted(set(ws))

    def source_store_map(self) -> dict[str, str]:
        out = {}
        for item in self.source_stores:
            name, sep, path = item.partition("=")
            if not sep or name not in SOURCES:
                raise ConfigError(f"--source-stores wants NAME=STORE with NAME one of "
                                  f"{', '.join(SOURCES)}, got {item!r}")
            out[name] = path
        return out


SOURCES = ("prev_layer", "mlp", "attn")


@dataclass
class DarkMatterOutput:
    """What `saelab darkmatter` found: everything in ``results`` (also in darkmatter.json) and
    the claims table (paper's claim, paper's number, ours)."""

    path: str
    results: dict[str, Any] = field(default_factory=dict)
    claims: list[dict[str, str]] = field(default_factory=list)


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class _Run:
    path: Path
    sae_dir: Path
    model: Any  # ModelConfig
    data: Any  # DataConfig
    run_cfg: Any | None  # RunConfig of a run folder


def _load_run(path: str | Path) -> _Run:
    path = Path(path)
    if (path / "run_config.json").exists():
        cfg = from_dict(RunConfig, json.loads((path / "run_config.json").read_text()))
        if not (path / "sae" / "cfg.json").exists():
            raise ConfigError(f"{path} holds no finished SAE (sae/cfg.json missing): finish "
                              f"training with `saelab train --resume --out {path}`")
        return _Run(path, path / "sae", cfg.model, cfg.data, cfg)
    if not (path / "cfg.json").exists():
        raise ConfigError(f"{path} is neither a run folder (run_config.json) nor an SAE folder "
                          "(cfg.json): give a folder written by `saelab train`")
    meta = read_metadata(path).get("metadata", {})
    name = meta.get("model_name") or ""
    model = ModelConfig(model="embedded" if name == "SmolLM2-135M-Instruct" else name,
                        hook=meta.get("hook_name") or "")
    data = DataConfig(context_size=int(meta.get("context_size") or 128),
                      prepend_bos=bool(meta.get("prepend_bos", True)),
                      exclude_first_positions=int(meta.get("exclude_first_positions", 1)))
    return _Run(path, path, model, data, None)


class _LM:
    """The LM, loaded on first use (harvests and CE splices only)."""

    def __init__(self, model_cfg):
        self.model_cfg, self._lm = model_cfg, None

    def get(self):
        if self._lm is None:
            self._lm = load_model(self.model_cfg)
        return self._lm


def _eval_store(run: _Run, data, hook: str, tokens: int, given: str, lm: _LM, progress: bool):
    """The held-out store at ``hook`` (given, or harvested into the cache with ``data``)."""
    if given:
        store = ActivationStore.open(given)
    else:
        model = run.model
        fields = {"model": model.model, "hook": hook, "dtype": model.model_dtype,
                  "data": asdict(data), "tokens": tokens, "split": "eval"}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        path = (cache_root() / "stores" /
                f"{Path(model.model).name}-{hook}-eval-{tokens}-{digest}")
        mcfg = type(model)(**{**asdict(model), "hook": hook})
        store = harvest(HarvestConfig(model=mcfg, data=data, store=str(path), tokens=tokens,
                                      split="eval"), progress=progress, lm=lm.get())
    if store.split and store.split != "eval":
        warnings.warn(f"store {store.path} is split {store.split!r}, not the held-out 'eval' "
                      "split: the SAE may have trained on these rows", stacklevel=2)
    return store


def _keys(store) -> Tensor:
    """(window, position) of every row as one int64 key, in store order."""
    T = store.context_size
    return torch.cat([store.read_tensor(i, "window").long() * T + store.read_tensor(i, "pos").long()
                      for i in range(len(store.shards))])


def _gather_rows(store, rows: Tensor) -> Tensor:
    """float32 rows ``rows`` (global store indices, any order) of a store."""
    out = torch.empty(len(rows), store.d_in)
    start = 0
    order = torch.argsort(rows)
    sorted_rows = rows[order]
    for i, s in enumerate(store.shards):
        lo, hi = start, start + s.rows
        a = int(torch.searchsorted(sorted_rows, lo))
        b = int(torch.searchsorted(sorted_rows, hi))
        if b > a:
            acts = store.read_shard(i)["acts"]
            out[order[a:b]] = acts[sorted_rows[a:b] - lo].float()
        start = hi
    return out


def _select_rows(target_store, source_stores: dict, n_tokens: int, seed: int):
    """Rows of the target store (and the same (window, pos) rows of every source store),
    shuffled with the seed, at most ``n_tokens``. Returns (x_ND, tokens_N, {name: x_ND})."""
    keys = _keys(target_store)
    ok = torch.ones(len(keys), dtype=torch.bool)
    src_pos = {}
    for name, st in source_stores.items():
        if st.context_size != target_store.context_size:
            raise ConfigError(f"the {name} store has context size {st.context_size}, the target "
                              f"{target_store.context_size}: harvest both with the same data")
        k2 = _keys(st)
        order = torch.argsort(k2)
        k2s = k2[order]
        pos = torch.searchsorted(k2s, keys).clamp_max(len(k2s) - 1)
        hit = k2s[pos] == keys
        ok &= hit
        src_pos[name] = order[pos]
    idx = ok.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    idx = idx[torch.randperm(len(idx), generator=g)][:n_tokens]
    x = _gather_rows(target_store, idx)
    tokens = torch.cat([target_store.read_tensor(i, "tokens").long()
                        for i in range(len(target_store.shards))])[idx]
    src = {name: _gather_rows(source_stores[name], src_pos[name][idx]) for name in source_stores}
    return x, tokens, src


# ---- training TopK SAEs (on a tensor or a store) -----------------------------------------------
def _tensor_batches(x_ND: Tensor, batch: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x_ND.shape[0], generator=g)
        for a in range(0, len(perm) - batch + 1, batch):
            yield x_ND[perm[a:a + batch]].to(device)
        if len(perm) < batch:
            raise ConfigError(f"need at least {batch} rows to train on, got {len(perm)}")


def train_topk(source, d_in: int, d_sae: int, k: int, tokens: int, *, batch_size: int = 1024,
               seed: int = 0, device="cpu", drop_positions_below: int = 0,
               progress: bool = False):
    """A TopK SAE (the library's defaults) trained on a tensor ``[N, d_in]`` or a store; returned
    acting on raw activations (input scale folded in)."""
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, options={"k": k})
    gen = torch.Generator().manual_seed(seed)
    sae = build_sae(cfg, device=device, generator=gen)
    if isinstance(source, Tensor):
        sample = source[torch.randperm(len(source), generator=gen)[:32_768]]
        batches = _tensor_batches(source, batch_size, seed, device)
    else:
        stream = ActivationStream(source, batch_size, 262_144, seed=seed, device=device,
                                  drop_positions_below=drop_positions_below)
        sample = stream.sample(min(32_768, source.num_rows), seed=seed).cpu()
        batches = iter(stream)
    scale = norm_scale_of_rows(sample.float(), sae.cfg.normalize_activations)
    sae.init_from_data(sample.to(device) * scale)
    tcfg = TrainConfig(tokens=tokens, batch_size=batch_size, seed=seed, checkpoint_every=0,
                       log_every=50)
    Trainer(sae, tcfg, run_dir=None, input_scale=scale, progress=progress).fit(batches)
    # as the pipeline exports a trained SAE: input scale folded in, frozen, eval mode
    sae = sae.eval()
    sae.fold_input_scale(scale)
    if not sae.unit_norm_decoder:
        sae.fold_decoder_norms()
    return sae.requires_grad_(False)


def _width_saes(cfg: DarkMatterConfig, target: _Run, k: int, d_in: int, out: Path, device,
                progress: bool, log) -> list[tuple[str, Any]]:
    """The --widths TopK SAEs, trained on the training store (or read back from DIR/widths)."""
    store = None
    res = []
    for w in cfg.width_list():
        folder = out / "widths" / f"topk_w{w}_k{k}_t{cfg.widths_tokens}_s{cfg.seed}"
        if (folder / "cfg.json").exists():
            res.append((f"topk-{w}", load_sae(folder, device=device)))
            continue
        if store is None:
            store = ActivationStore.open(_train_store_path(cfg, target))
            store.check_compatible(d_in=d_in)
        log(f"darkmatter: training TopK width {w}, k {k}, {cfg.widths_tokens:,} tokens")
        sae = train_topk(store, d_in, w, k, cfg.widths_tokens, batch_size=cfg.batch_size,
                         seed=cfg.seed, device=device,
                         drop_positions_below=target.data.exclude_first_positions,
                         progress=progress)
        save_sae(sae, folder, metadata={"hook_name": store.hook, "model_name": store.model})
        res.append((f"topk-{w}", sae))
    return res


def _train_store_path(cfg: DarkMatterConfig, target: _Run) -> str:
    if cfg.train_store:
        return cfg.train_store
    if target.run_cfg is not None:
        rc = target.run_cfg
        if rc.store:
            return rc.store
        p = default_store_path(rc, rc.harvest_rows())
        if (p / "manifest.json").exists():
            return str(p)
    raise ConfigError("--widths needs a training store: pass --train-store STORE (a train-split "
                      "store at the first RUN's hook)")


# ---- CE splices ----------------------------------------------------------------------------
@torch.no_grad()
def splice_ce(lm, hook, windows_NT: Tensor, keep_NT: Tensor,
              fns: dict[str, Any], batch_windows: int = 8) -> dict[str, float]:
    """Mean next-token CE (nats) with each ``fn(acts_ND) -> acts_ND`` applied to the kept
    positions of the hook's output (``None``: clean); predictions from kept positions scored."""
    sums = dict.fromkeys(fns, 0.0)
    n = 0
    for a in range(0, windows_NT.shape[0], batch_windows):
        ids = windows_NT[a:a + batch_windows].to(lm.device)
        keep = keep_NT[a:a + batch_windows].to(lm.device)
        score = keep[:, :-1]
        targets = ids[:, 1:][score]
        n += int(score.sum())
        for name, fn in fns.items():
            def repl(acts, fn=fn, keep=keep):
                out = acts.clone()
                out[keep] = fn(acts[keep].float()).to(acts.dtype)
                return out
            if fn is None:
                logits = lm.model(ids, use_cache=False).logits
            else:
                with splice(lm.model, hook, repl):
                    logits = lm.model(ids, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1][score].float(), dim=-1)
            sums[name] += -float(logp.gather(1, targets[:, None]).sum())
    return {k: v / max(n, 1) for k, v in sums.items()} | {"n_tokens": float(n)}


def _ce_part(lm, target: _Run, sae, dec, n_windows: int, device) -> dict[str, float]:
    hook = parse_hook(target.model.hook, lm.n_layers)
    windows, keep = heldout_windows(lm, target.data, n_windows)
    dev, dt = sae.W_dec.device, sae.W_dec.dtype

    def recon(a):
        return sae.decode(sae.encode(a.to(dev, dt))).float()

    def e_lin(a):
        return dec.error_map.apply(a.to(dev).double()).float()

    fns = {
        "clean": None,
        "sae": lambda a: recon(a),
        "sae_plus_linear": lambda a: recon(a) + e_lin(a),  # x̂ + e_lin = x − e_nl
        "sae_plus_nonlinear": lambda a: a.to(dev).float() - e_lin(a),  # x̂ + e_nl = x − e_lin
    }
    ce = splice_ce(lm, hook, windows, keep, fns)
    d_sae = ce["sae"] - ce["clean"]
    out = {f"ce_{k}": v for k, v in ce.items() if k != "n_tokens"}
    out["ce_n_tokens"] = ce["n_tokens"]
    out["delta_ce_sae"] = d_sae
    # x̂ + e_lin lacks only e_nl; x̂ + e_nl lacks only e_lin
    out["delta_ce_without_nonlinear"] = ce["sae_plus_linear"] - ce["clean"]
    out["delta_ce_without_linear"] = ce["sae_plus_nonlinear"] - ce["clean"]
    if d_sae > 0:
        out["ce_share_nonlinear"] = out["delta_ce_without_nonlinear"] / d_sae
        out["ce_share_linear"] = out["delta_ce_without_linear"] / d_sae
    return out


# ---- the analysis ----------------------------------------------------------------------------
def run_darkmatter(cfg: DarkMatterConfig, runs: list[Path], out: Path,
                   progress: bool = True, log=print) -> DarkMatterOutput:
    """Run every part the config enables; see the module docstring."""
    cfg.validate()
    if not runs:
        raise ConfigError("give at least one RUN (the SAE to analyse)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    target = _load_run(runs[0])
    lm = _LM(type(target.model)(**{**asdict(target.model), "device": cfg.device}))
    sae = load_sae(target.sae_dir, device=device).eval()
    hook = target.model.hook
    store = _eval_store(target, target.data, hook, cfg.tokens, cfg.store, lm, progress)
    if store.d_in != sae.d_in:
        raise ConfigError(f"store {store.path} has d_in {store.d_in}, the SAE {sae.d_in}: give "
                          "a store made at the SAE's hook")
    given_stores = cfg.source_store_map()
    src_runs = {name: _load_run(p) for name, p in
                (("prev_layer", cfg.prev_layer_run), ("mlp", cfg.mlp_run),
                 ("attn", cfg.attn_run)) if p}
    src_stores = {name: _eval_store(r, target.data, r.model.hook, cfg.tokens,
                                    given_stores.get(name, ""), lm, progress)
                  for name, r in src_runs.items()}

    t0 = time.perf_counter()
    x, tokens, src_x = _select_rows(store, src_stores, cfg.tokens, cfg.seed)
    N = x.shape[0]
    n_fit = int(round(N * cfg.fit_fraction))
    if n_fit <= x.shape[1] or N - n_fit < 2:
        raise ConfigError(f"only {N} held-out rows ({n_fit} to fit a {x.shape[1]}-dim map): "
                          "raise --tokens or harvest a larger held-out store")
    seconds["rows"] = time.perf_counter() - t0
    log(f"darkmatter: {N:,} held-out rows ({n_fit:,} fit, {N - n_fit:,} eval) from {store.path}")
    kw = {"intercept": cfg.fit_intercept, "chunk_rows": cfg.chunk_rows, "device": device}
    done = _finished_parts(out, cfg, runs)
    results: dict[str, Any] = {
        "config": asdict(cfg), "runs": [str(r) for r in runs], "store": str(store.path),
        "hook": store.hook, "model": store.model, "n_rows": N, "n_fit": n_fit,
        "sae": {"path": str(target.sae_dir), "architecture": sae.cfg.architecture,
                "d_sae": sae.d_sae, "d_in": sae.d_in},
        "seconds": seconds,
    }

    # 1. decomposition
    t0 = time.perf_counter()
    fn = core.sae_recon_fn(sae)
    dec = core.decompose(x, n_fit, fn, **kw)
    results["decomposition"] = {**dec.metrics, **core.norm_baselines(dec, tokens, n_fit)}
    seconds["decomposition"] = time.perf_counter() - t0
    log(f"darkmatter: R² error vector {dec.metrics['r2_error_vector']:.3f}, ‖e‖² "
        f"{dec.metrics['r2_error_sq_norm']:.3f}, FVU {dec.metrics['fvu']:.4f} "
        f"(nonlinear {dec.metrics['fvu_nonlinear']:.4f})")

    # 2. per-token scaling across widths
    t0 = time.perf_counter()
    scale_saes: list[tuple[str, Any]] = []
    if cfg.width_list():
        k = cfg.widths_k or max(1, int(round(dec.metrics["l0"])))
        scale_saes = _width_saes(cfg, target, k, sae.d_in, out, device, progress, log)
    elif len(runs) > 1:
        scale_saes = [(f"run{i}", load_sae(_load_run(r).sae_dir, device=device).eval())
                      for i, r in enumerate(runs)]
    if scale_saes:
        scale_saes.sort(key=lambda t: t[1].d_sae)
        decs = [core.decompose(x, n_fit, core.sae_recon_fn(s), **kw) for _, s in scale_saes]
        widths = [float(s.d_sae) for _, s in scale_saes]
        mats = core.scaling_matrices(decs, n_fit)
        fvu = [d.metrics["fvu"] for d in decs]
        fvu_nl = [d.metrics["fvu_nonlinear"] for d in decs]
        results["scaling"] = {
            "names": [n for n, _ in scale_saes], "widths": widths,
            "l0": [d.metrics["l0"] for d in decs], "fvu": fvu, "fvu_nonlinear": fvu_nl,
            "fvu_linear": [d.metrics["fvu_linear"] for d in decs],
            "r2_error_vector": [d.metrics["r2_error_vector"] for d in decs],
            "r2_error_sq_norm": [d.metrics["r2_error_sq_norm"] for d in decs],
            **mats,
            "fit_fvu": core.power_law_fit(widths, fvu),
            "fit_fvu_nonlinear": core.power_law_fit(widths, fvu_nl),
        }
    seconds["scaling"] = time.perf_counter() - t0

    save = _saver(out, results)
    save()

    # 3. downstream CE
    if "ce" in done:
        results["ce"] = done["ce"]
    elif cfg.ce_windows > 0:
        t0 = time.perf_counter()
        results["ce"] = _ce_part(lm.get(), target, sae, dec, cfg.ce_windows, device)
        results["ce"]["variance_share_nonlinear"] = dec.metrics["nonlinear_share_of_error"]
        seconds["ce"] = time.perf_counter() - t0
        save()

    # 4. SAEs trained on the parts
    if "trained_on_parts" in done:
        results["trained_on_parts"] = done["trained_on_parts"]
    elif cfg.parts_tokens > 0:
        t0 = time.perf_counter()
        k = max(1, int(round(dec.metrics["l0"])))
        fit_parts = core.part_rows(x, fn, dec, slice(0, n_fit), cfg.chunk_rows, device)
        ev_parts = core.part_rows(x, fn, dec, slice(n_fit, N), cfg.chunk_rows, device)
        fit_parts["x"], ev_parts["x"] = x[:n_fit], x[n_fit:]
        parts = {"d_sae": sae.d_sae, "k": k, "tokens": cfg.parts_tokens}
        for name in ("e_lin", "e_nl", "x"):
            log(f"darkmatter: training TopK on {name} (width {sae.d_sae}, k {k})")
            s = train_topk(fit_parts[name], sae.d_in, sae.d_sae, k, cfg.parts_tokens,
                           batch_size=cfg.batch_size, seed=cfg.seed, device=device,
                           progress=progress)
            parts[f"fvu_{name}"] = core.fvu_of(s, ev_parts[name], cfg.chunk_rows)
        results["trained_on_parts"] = parts
        seconds["trained_on_parts"] = time.perf_counter() - t0
        save()

    # 5. gradient pursuit
    if "gradient_pursuit" in done:
        results["gradient_pursuit"] = done["gradient_pursuit"]
    elif cfg.gp_tokens > 0:
        t0 = time.perf_counter()
        n_gp = min(N, cfg.gp_tokens)
        # the map needs more fitting rows than dimensions: take at least 2·d_in when there
        gp_fit = min(n_fit, max(int(round(n_gp * cfg.fit_fraction)), 2 * sae.d_in))
        gp_ev = max(1, min(N - n_fit, n_gp - gp_fit))
        xg = torch.cat([x[:gp_fit], x[n_fit:n_fit + gp_ev]])
        before = core.decompose(xg, gp_fit, fn, **kw)
        after = core.decompose(xg, gp_fit, core.gp_recon_fn(sae, min(cfg.chunk_rows, 1024)),
                               **kw)
        results["gradient_pursuit"] = {
            "n_fit": gp_fit, "n_eval": gp_ev,
            "sae": {k: before.metrics[k] for k in ("fvu", "fvu_nonlinear", "fvu_linear", "l0")},
            "gp": {k: after.metrics[k] for k in ("fvu", "fvu_nonlinear", "fvu_linear", "l0")},
            "nonlinear_reduction": 1 - after.metrics["fvu_nonlinear"]
            / max(before.metrics["fvu_nonlinear"], 1e-30),
        }
        seconds["gradient_pursuit"] = time.perf_counter() - t0
        save()

    # 6. linear maps from other components
    if "component_maps" in done:
        results["component_maps"] = done["component_maps"]
    elif src_runs:
        t0 = time.perf_counter()
        sources = {"self": (x, fn, dec)}
        for name, r in src_runs.items():
            s = load_sae(r.sae_dir, device=device).eval()
            sfn = core.sae_recon_fn(s)
            sources[name] = (src_x[name], sfn, core.decompose(src_x[name], n_fit, sfn, **kw))
        results["component_maps"] = {
            "hooks": {name: r.model.hook for name, r in src_runs.items()},
            "fvu_nonlinear": dec.metrics["fvu_nonlinear"],
            "r2": core.cross_maps(x, n_fit, (fn, dec), sources, **kw)}
        seconds["component_maps"] = time.perf_counter() - t0

    seconds["total"] = time.perf_counter() - t_start
    claims = claims_table(results)
    res = DarkMatterOutput(str(out), results, claims)
    if cfg.plots:
        results["plots"] = write_plots(results, dec, n_fit, out)
    atomic_write_json(out / "darkmatter.json", _jsonable(asdict(res)))
    return res


_REUSABLE = ("ce", "trained_on_parts", "gradient_pursuit", "component_maps")


def _finished_parts(out: Path, cfg: DarkMatterConfig, runs: list[Path]) -> dict:
    """Parts 3-6 of an earlier (possibly interrupted) run into ``out`` with the same config and
    runs: reused instead of recomputed (parts 1-2 are cheap and always recomputed)."""
    path = out / "darkmatter.json"
    try:
        prev = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    same = (prev.get("config") == _jsonable(asdict(cfg))
            and prev.get("runs") == [str(r) for r in runs])
    return {k: prev[k] for k in _REUSABLE if same and k in prev}


def _saver(out: Path, results: dict):
    """Write the results so far (``darkmatter.json`` without the claims table), so that an
    interrupted analysis keeps its finished parts."""
    def save() -> None:
        atomic_write_json(out / "darkmatter.json", _jsonable({"path": str(out),
                                                              "results": results, "claims": []}))
    return save


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---- the claims table ------------------------------------------------------------------------
def _f(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def claims_table(r: dict) -> list[dict[str, str]]:
    """The paper's claims (docs/methods.md §12.6) beside our numbers; 'not run' where a part was off."""
    d = r["decomposition"]
    rows = [
        {"claim": "(a) R² of the error vector from x", "paper": "≈ 0.5",
         "ours": _f(d["r2_error_vector"])},
        {"claim": "(a) R² of ‖e‖² from x", "paper": "> 0.9", "ours": _f(d["r2_error_sq_norm"])},
        {"claim": "(a) baselines for ‖e‖²: ‖x‖ / token id / L0", "paper": "below x",
         "ours": " / ".join(_f(d[f"r2_error_sq_norm_from_{k}"])
                            for k in ("act_norm", "token_id", "l0"))},
        {"claim": "(a) FVU of x̂ / of x̂ + e_lin (nonlinear)", "paper": "-",
         "ours": f"{_f(d['fvu'], '{:.4f}')} / {_f(d['fvu_nonlinear'], '{:.4f}')}"},
    ]
    s = r.get("scaling")
    if s:
        n = len(s["widths"])
        off = [s["r2"][i][j] for i in range(n) for j in range(i + 1, n)]
        adj = [s["r2"][i][i + 1] for i in range(n - 1)]
        pct = [s["nonlinear_pct_of_remaining"][i][j] for i in range(n) for j in range(i + 1, n)]
        fit = s.get("fit_fvu") or {}
        rows += [
            {"claim": f"(b) per-token R² of ‖e_j‖ on ‖e_i‖, i<j ({n} widths "
                      f"{int(s['widths'][0])}..{int(s['widths'][-1])})",
             "paper": "high (larger SAEs fail on the same tokens)",
             "ours": f"min {_f(min(off) if off else None)}, neighbours mean "
                     f"{_f(sum(adj) / len(adj) if adj else None)}"},
            {"claim": "(b) % of the rest explained by adding ‖e_nl,i‖", "paper": "> 0",
             "ours": f"mean {_f(sum(pct) / len(pct) if pct else None, '{:.1f}')}%"},
            {"claim": "(b) FVU ≈ c + a·W^-m; nonlinear FVU across widths", "paper":
             "nonlinear part ~flat",
             "ours": (f"c {_f(fit.get('c'), '{:.4f}')}, m {_f(fit.get('m'), '{:.2f}')}; e_nl FVU "
                      f"{_f(s['fvu_nonlinear'][0], '{:.4f}')}→"
                      f"{_f(s['fvu_nonlinear'][-1], '{:.4f}')}")},
        ]
    else:
        rows.append({"claim": "(b) per-token scaling across widths", "paper": "high R²",
                     "ours": "not run"})
    ce = r.get("ce")
    rows.append({"claim": "(c) CE increase without e_nl / without e_lin, share of x̂'s",
                 "paper": "e_nl: proportional share",
                 "ours": (f"{_f(ce.get('ce_share_nonlinear'), '{:.2f}')} / "
                          f"{_f(ce.get('ce_share_linear'), '{:.2f}')} of ΔCE "
                          f"{_f(ce['delta_ce_sae'], '{:.3f}')} (e_nl is "
                          f"{_f(ce['variance_share_nonlinear'], '{:.2f}')} of ‖e‖²)")
                 if ce else "not run"})
    p = r.get("trained_on_parts")
    rows.append({"claim": "(d) FVU of TopK SAEs trained on e_lin / e_nl (x control)",
                 "paper": "e_nl SAE worse",
                 "ours": (f"{_f(p['fvu_e_lin'], '{:.4f}')} / {_f(p['fvu_e_nl'], '{:.4f}')} "
                          f"({_f(p['fvu_x'], '{:.4f}')})") if p else "not run"})
    g = r.get("gradient_pursuit")
    rows.append({"claim": "(e) GP encoder: nonlinear FVU before → after", "paper": "very slight "
                 "decrease",
                 "ours": (f"{_f(g['sae']['fvu_nonlinear'], '{:.4f}')} → "
                          f"{_f(g['gp']['fvu_nonlinear'], '{:.4f}')} "
                          f"({_f(100 * g['nonlinear_reduction'], '{:.1f}')}%)") if g else "not run"})
    cm = r.get("component_maps")
    if cm:
        best = max(((src, v["x_hat"]["e_nl"]["reduction"]) for src, v in cm["r2"].items()
                    if src != "self"), key=lambda t: t[1])
        rows.append({"claim": "(f) e_nl removed by a linear map of an earlier x̂ (best source)",
                     "paper": "more than GP",
                     "ours": f"{_f(100 * best[1], '{:.1f}')}% ({best[0]})"})
    else:
        rows.append({"claim": "(f) earlier-component linear maps", "paper": "more than GP",
                     "ours": "not run"})
    return rows


def format_claims(claims: list[dict[str, str]]) -> str:
    w0 = max(len(c["claim"]) for c in claims)
    w1 = max(len(c["paper"]) for c in claims)
    lines = [f"  {'claim':<{w0}}  {'paper':<{w1}}  ours", "  " + "-" * (w0 + w1 + 10)]
    lines += [f"  {c['claim']:<{w0}}  {c['paper']:<{w1}}  {c['ours']}" for c in claims]
    return "\n".join(lines)


def summary(res: DarkMatterOutput) -> str:
    r = res.results
    head = (f"dark matter of {r['sae']['architecture']} SAE (d_sae {r['sae']['d_sae']}) at "
            f"{r['hook']}: {r['n_rows']:,} held-out rows ({r['n_fit']:,} fit)")
    return f"{head}\n{format_claims(res.claims)}\n\nresults: {Path(res.path) / 'darkmatter.json'}"


def _run(cfg: DarkMatterConfig, runs: list[Path], out: Path, progress: bool) -> DarkMatterOutput:
    return run_darkmatter(cfg, runs, out, progress=progress)


register_analysis(Analysis(
    verb="darkmatter", config=DarkMatterConfig, output=DarkMatterOutput, run=_run,
    summary=summary,
    help="SAE dark matter (Engels et al. 2025): the linear and nonlinear parts of the SAE "
         "error on held-out rows, per-token scaling across widths, CE with each part spliced "
         "in, SAEs trained on the parts, gradient pursuit, and maps from other components; "
         "writes DIR/darkmatter.json, plots and a table of the paper's claims.",
))
