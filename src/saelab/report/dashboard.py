"""Feature dashboards: what every latent of an SAE fires on, from held-out store rows.

Per latent (SAEDashboard / Neuronpedia feature pages): the top activating examples with
``±context`` tokens and the latent's value at every one of them, ``n_bins`` equal-width
activation bins on ``(0, max]`` with ``per_bin`` examples drawn uniformly from each, an
activation histogram, density, and the logit lens (top / bottom tokens of ``W_dec[i] · W_U``).
Signed codes (a latent that takes negative values anywhere, e.g. AbsTopK, ITDA) get the same
for the negative pole, on ``-f``.

Three streaming passes over the rows, each tensorised over (rows x latents) with the running
state kept on the SAE's device (so memory is bounded by ``latents x examples``, not by rows):

1. max / min / firing count of every latent (needed for ``top:N`` and for the bin edges);
2. for the chosen latents, from the chunk's nonzero entries only: a running top-k merge for
   the top examples, histogram counts, and bin samples (a uniform sample without replacement
   per bin = the ``per_bin`` smallest of i.i.d. uniform keys), merged by sorts per chunk;
3. the latent's value at every context token of every chosen example: the rows those contexts
   cover are gathered and encoded once (a context token not stored as a row, e.g. the BOS
   position the harvest leaves out, shows value 0).

The JSON export follows SAEDashboard's ``NeuronpediaDashboardFeature`` fields (see
:func:`feature_json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.config import DataConfig, HarvestConfig, ModelConfig, from_dict, opt
from saelab.data.store import ActivationStore
from saelab.errors import ConfigError, RunFolderError
from saelab.fsutil import atomic_write_bytes, json_safe
from saelab.harvest import harvest
from saelab.io import load_sae, read_metadata
from saelab.models.loading import load_model
from saelab.report.html import dashboard_html
from saelab.runtime import cache_root, resolve_device

#: name of the data file embedded in (and written beside) the dashboard
DASHBOARD_HTML = "dashboard.html"
FEATURES_DIR = "features"


@dataclass
class DashboardConfig:
    """Feature dashboard settings (`saelab dashboard`)."""

    latents: str = opt(
        "0-99",
        "Latents to show: indices and ranges ('0-99,120'), 'top:N' (the N that fire most "
        "often on the scanned rows), 'random:N' (N at random, --seed) or 'all'.")
    tokens: int = opt(
        100_000, "Held-out activation rows to scan (the first N rows of the held-out store).")
    store: str = opt(
        "",
        "Activation store of held-out rows to scan (made by `saelab harvest --split eval` for "
        "the run's model and hook); default: harvest (or reuse) one in $SAELAB_CACHE.")
    top_k: int = opt(20, "Top activating examples per latent.")
    context: int = opt(8, "Tokens of context shown on each side of an example's token.")
    n_bins: int = opt(10, "Equal-width activation bins on (0, max] with examples of each.")
    per_bin: int = opt(5, "Examples drawn (uniformly, seeded) from each activation bin.")
    hist_bins: int = opt(40, "Bars of the activation histogram on (0, max].")
    logit_k: int = opt(10, "Top and bottom logit-lens tokens per latent.")
    batch_rows: int = opt(4096, "Rows encoded per chunk (bounds memory: rows x d_sae floats).")
    seed: int = opt(0, "Seed of the bin sampling and of --latents random:N.")
    device: str = opt("auto", "Torch device for the SAE and the running state.")
    write_json: bool = opt(
        True, "Also write one Neuronpedia/SAEDashboard-schema JSON per latent under features/.",
        flag="json")

    def validate(self) -> None:
        for name in ("tokens", "top_k", "n_bins", "per_bin", "hist_bins", "batch_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, "
                                  f"got {getattr(self, name)}")
        for name in ("context", "logit_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, "
                                  f"got {getattr(self, name)}")


# ---- rows to scan --------------------------------------------------------------------------------
class RowSource:
    """Held-out activation rows with their token context.

    ``window_N``/``pos_N``: where row ``r`` sits; ``windows_WT``: the token windows (global
    window ids index its first axis). Subclasses provide ``chunks`` and ``gather``.
    """

    window_N: Tensor
    pos_N: Tensor
    windows_WT: Tensor

    @property
    def n_rows(self) -> int:
        return int(self.window_N.shape[0])

    def chunks(self, batch_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(rows_B, x_BD)`` over every row in order (rows as global int64 indices)."""
        raise NotImplementedError

    def gather(self, rows: Tensor) -> Tensor:
        """Activations ``[len(rows), D]`` of the given (sorted, unique) rows."""
        raise NotImplementedError

    def row_map(self) -> Tensor:
        """``[W, T]`` int64: the row stored at (window, position), -1 where none is."""
        m = torch.full(self.windows_WT.shape, -1, dtype=torch.int64)
        m[self.window_N.long(), self.pos_N.long()] = torch.arange(self.n_rows)
        return m


class TensorRows(RowSource):
    """Rows held in memory (tests, small scans)."""

    def __init__(self, x_ND: Tensor, window_N: Tensor, pos_N: Tensor, windows_WT: Tensor):
        self.x_ND, self.window_N, self.pos_N, self.windows_WT = x_ND, window_N, pos_N, windows_WT

    def chunks(self, batch_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
        for r0 in range(0, self.n_rows, batch_rows):
            r1 = min(self.n_rows, r0 + batch_rows)
            yield torch.arange(r0, r1), self.x_ND[r0:r1]

    def gather(self, rows: Tensor) -> Tensor:
        return self.x_ND[rows]


class StoreRows(RowSource):
    """The first ``n_rows`` rows of an activation store (shards memory-mapped, read in order)."""

    def __init__(self, store, n_rows: int | None = None):
        self.store = store
        limit = store.num_rows if n_rows is None else min(n_rows, store.num_rows)
        self._shards: list[tuple[int, int, int]] = []  # (shard, first global row, rows used)
        windows, win, pos = [], [], []
        r = 0
        for i, info in enumerate(store.shards):
            if r >= limit:
                break
            use = min(info.rows, limit - r)
            self._shards.append((i, r, use))
            win.append(store.read_tensor(i, "window")[:use].long())
            pos.append(store.read_tensor(i, "pos")[:use].long())
            windows.append(store.read_tensor(i, "windows"))
            r += use
        if r == 0:
            raise ConfigError(f"store {store.path} holds no rows: harvest it again")
        self.window_N, self.pos_N = torch.cat(win), torch.cat(pos)
        self.windows_WT = torch.cat(windows).long()

    def _acts(self, i: int) -> Tensor:
        return self.store.read_shard(i)["acts"]

    def chunks(self, batch_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i, first, use in self._shards:
            acts = self._acts(i)
            for a in range(0, use, batch_rows):
                b = min(use, a + batch_rows)
                yield torch.arange(first + a, first + b), acts[a:b]

    def gather(self, rows: Tensor) -> Tensor:
        parts = []
        for i, first, use in self._shards:
            lo, hi = torch.searchsorted(rows, torch.tensor([first, first + use]))
            if hi > lo:
                parts.append(self._acts(i)[rows[lo:hi] - first])
        return torch.cat(parts)


# ---- collection ----------------------------------------------------------------------------------
@dataclass
class ExampleSet:
    """Examples of every chosen latent: ``rows [L, E]`` (-1 = empty slot), the latent's value
    at the example token ``vals [L, E]`` and, after pass 3, the context ``ctx_tokens [L, E, C]``
    (-1 outside the window) and ``ctx_vals [L, E, C]``."""

    rows: Tensor
    vals: Tensor
    ctx_tokens: Tensor | None = None
    ctx_vals: Tensor | None = None


@dataclass
class SideData:
    """One pole of the chosen latents (sign +1: f; sign -1: -f, values reported as f)."""

    sign: int
    top: ExampleSet
    hist_counts: Tensor  # [L, H] counts of s*f in (j, j+1] * max/H
    bins: ExampleSet  # rows [L, NB * S], bin j holds slots j*S .. j*S+S-1
    bin_counts: Tensor  # [L, NB]
    extreme: Tensor  # [L] max of s*f (0 if the pole never fires)


@dataclass
class DashboardData:
    latents: Tensor  # [L] latent indices
    n_rows: int
    density: Tensor  # [L] fraction of rows where f != 0
    max_act: Tensor  # [L]
    min_act: Tensor  # [L]
    signed: bool
    sides: list[SideData]
    n_bins: int
    per_bin: int
    context: int
    density_all: Tensor  # [F] density of every latent (index sorting, density histogram)
    logits: dict[str, Tensor] = field(default_factory=dict)  # pos_ids/pos_vals/neg_ids/neg_vals
    seconds: dict[str, float] = field(default_factory=dict)


def parse_latents(spec: str, d_sae: int, density_F: Tensor | None = None,
                  seed: int = 0) -> Tensor:
    """``--latents`` -> sorted unique indices (``top:N`` needs ``density_F``)."""
    text = spec.strip().lower()
    usage = "use e.g. 0-99, 3,17,200, top:50, random:50 or all"
    if text == "all":
        return torch.arange(d_sae)
    if text.startswith(("top:", "random:")):
        kind, _, n = text.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--latents {spec!r}: {kind}:N needs a positive N; {usage}")
        n = min(int(n), d_sae)
        if kind == "random":
            g = torch.Generator().manual_seed(seed)
            return torch.randperm(d_sae, generator=g)[:n].sort().values
        if density_F is None:
            raise ValueError("top:N needs the latents' densities")
        # stable: ties keep the lower index
        order = torch.sort(density_F.double().cpu(), descending=True, stable=True).indices
        return order[:n].sort().values
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        a, dash, b = part.partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ConfigError(f"--latents {spec!r}: cannot read {part!r}; {usage}")
        lo, hi = int(a), int(b) if dash else int(a)
        if lo > hi or hi >= d_sae:
            raise ConfigError(f"--latents {spec!r}: {part!r} is outside 0-{d_sae - 1} (the "
                              f"SAE has {d_sae} latents); {usage}")
        out.extend(range(lo, hi + 1))
    return torch.tensor(sorted(set(out)), dtype=torch.int64)


class _Smallest:
    """Per group, the ``cap`` entries with the smallest keys seen so far (ties: first seen).

    Flat ``(group, key, row)`` tensors sorted by group, then key; merging a chunk is two
    stable sorts of the kept entries plus the new ones, so the state never exceeds
    ``groups x cap`` entries and no Python loop touches a row."""

    def __init__(self, n_groups: int, cap: int, dev, key_dtype=torch.float32):
        self.n_groups, self.cap = n_groups, cap
        self.group = torch.zeros(0, dtype=torch.int64, device=dev)
        self.key = torch.zeros(0, dtype=key_dtype, device=dev)
        self.row = torch.zeros(0, dtype=torch.int64, device=dev)

    def add(self, group: Tensor, key: Tensor, row: Tensor) -> None:
        g = torch.cat([self.group, group])
        k = torch.cat([self.key, key.to(self.key.dtype)])
        r = torch.cat([self.row, row])
        o = torch.argsort(k, stable=True)
        g, k, r = g[o], k[o], r[o]
        o = torch.argsort(g, stable=True)
        g, k, r = g[o], k[o], r[o]
        keep = self._rank(g) < self.cap
        self.group, self.key, self.row = g[keep], k[keep], r[keep]

    @staticmethod
    def _rank(g: Tensor) -> Tensor:
        return torch.arange(g.shape[0], device=g.device) - torch.searchsorted(g, g)

    def worst_key(self) -> Tensor:
        """[n_groups]: the largest kept key of a full group, +inf for groups not yet full."""
        out = torch.full((self.n_groups,), math.inf, dtype=self.key.dtype,
                         device=self.key.device)
        last = self._rank(self.group) == self.cap - 1
        out[self.group[last]] = self.key[last]
        return out

    def slots(self) -> tuple[Tensor, Tensor]:
        """``rows, keys`` as ``[n_groups, cap]`` (-1 / +inf in empty slots), ordered by key."""
        rows = torch.full((self.n_groups * self.cap,), -1, dtype=torch.int64,
                          device=self.row.device)
        keys = torch.full((self.n_groups * self.cap,), math.inf, dtype=self.key.dtype,
                          device=self.key.device)
        at = self.group * self.cap + self._rank(self.group)
        rows[at], keys[at] = self.row, self.key
        return rows.view(self.n_groups, self.cap), keys.view(self.n_groups, self.cap)


def _bin_index(v: Tensor, edge: Tensor, n: int) -> Tensor:
    """Bin of ``v`` in ``n`` equal-width bins on ``(0, edge]`` (right-closed), 0..n-1."""
    return (torch.ceil(v / edge * n) - 1).clamp_(0, n - 1).long()


class _SideCollector:
    """Pass-2 state of one pole: running top-k, histogram, bin samples.

    Everything is computed from the chunk's positive entries only: the top-k keeps the
    ``top_k`` smallest ``-v`` per latent (entries not above a full latent's current k-th value
    are dropped before the merge); a bin's sample is the ``per_bin`` smallest of i.i.d. uniform
    keys among its entries, i.e. a uniform sample without replacement over the whole scan."""

    def __init__(self, sign: int, extreme_L: Tensor, cfg: DashboardConfig, dev):
        L = extreme_L.shape[0]
        self.sign, self.cfg, self.extreme = sign, cfg, extreme_L.to(dev)
        # positive safe divisor (a pole that never fires has no entries anyway)
        self.edge = torch.where(self.extreme > 0, self.extreme, torch.ones_like(self.extreme))
        self.top = _Smallest(L, cfg.top_k, dev)
        self.samples = _Smallest(L * cfg.n_bins, cfg.per_bin, dev, key_dtype=torch.float64)
        self.hist = torch.zeros(L * cfg.hist_bins, dtype=torch.int64, device=dev)
        self.bin_counts = torch.zeros(L * cfg.n_bins, dtype=torch.int64, device=dev)

    def update(self, v_BL: Tensor, rows_B: Tensor, gen: torch.Generator) -> None:
        cfg = self.cfg
        b, lat = (v_BL > 0).nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        v, rows = v_BL[b, lat], rows_B[b]
        better = -v < self.top.worst_key()[lat]
        self.top.add(lat[better], -v[better], rows[better])
        e = self.edge[lat]
        self.hist.index_add_(0, lat * cfg.hist_bins + _bin_index(v, e, cfg.hist_bins),
                             torch.ones_like(lat))
        group = lat * cfg.n_bins + _bin_index(v, e, cfg.n_bins)
        self.bin_counts.index_add_(0, group, torch.ones_like(group))
        key = torch.rand(group.shape[0], generator=gen, dtype=torch.float64).to(v.device)
        self.samples.add(group, key, rows)

    def finish(self) -> SideData:
        cfg, L = self.cfg, self.extreme.shape[0]
        top_rows, neg_v = self.top.slots()
        top_vals = torch.where(top_rows >= 0, -neg_v, 0.0)
        bin_rows, _ = self.samples.slots()
        s = self.sign
        return SideData(
            sign=s,
            top=ExampleSet(top_rows.cpu(), (s * top_vals).float().cpu()),
            hist_counts=self.hist.view(L, cfg.hist_bins).cpu(),
            bins=ExampleSet(bin_rows.reshape(L, cfg.n_bins * cfg.per_bin).cpu(), torch.zeros(0)),
            bin_counts=self.bin_counts.view(L, cfg.n_bins).cpu(),
            extreme=self.extreme.cpu(),
        )


@torch.inference_mode()
def collect(encode: Callable[[Tensor], Tensor], d_sae: int, source: RowSource,
            cfg: DashboardConfig, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, progress: bool = False) -> DashboardData:
    """Run the three passes (module docstring) of ``encode`` over ``source``."""
    cfg.validate()
    dev = torch.device(device)
    seconds: dict[str, float] = {}
    n_chunks = math.ceil(source.n_rows / cfg.batch_rows)

    def chunks(desc: str):
        it = source.chunks(cfg.batch_rows)
        if progress:
            it = tqdm(it, total=n_chunks, desc=desc, unit="chunk", leave=False)
        for rows_B, x_BD in it:
            yield rows_B.to(dev), encode(x_BD.to(dev, dtype)).float()

    # pass 1: every latent's max, min and firing count
    t0 = time.perf_counter()
    mx = torch.zeros(d_sae, device=dev)
    mn = torch.zeros(d_sae, device=dev)
    fires = torch.zeros(d_sae, dtype=torch.int64, device=dev)
    for _, f_BF in chunks("dashboard 1/3: ranges"):
        mx = torch.maximum(mx, f_BF.amax(0))
        mn = torch.minimum(mn, f_BF.amin(0))
        fires += (f_BF != 0).sum(0)
    density_all = (fires.double() / source.n_rows).cpu()
    latents = parse_latents(cfg.latents, d_sae, density_all, cfg.seed)
    lat_dev = latents.to(dev)
    signed = bool((mn < 0).any())
    seconds["ranges"] = time.perf_counter() - t0

    # pass 2: top examples, histograms, bin samples of the chosen latents
    t0 = time.perf_counter()
    sides = [_SideCollector(1, mx[lat_dev], cfg, dev)]
    if signed:
        sides.append(_SideCollector(-1, -mn[lat_dev], cfg, dev))
    gen = torch.Generator().manual_seed(cfg.seed)
    for rows_B, f_BF in chunks("dashboard 2/3: examples"):
        f_BL = f_BF[:, lat_dev]
        for side in sides:
            side.update(f_BL if side.sign > 0 else -f_BL, rows_B, gen)
    done = [s.finish() for s in sides]
    seconds["examples"] = time.perf_counter() - t0

    # pass 3: the latent's value at every context token of every example
    t0 = time.perf_counter()
    _fill_contexts(encode, source, done, latents, cfg, dev, dtype)
    seconds["contexts"] = time.perf_counter() - t0
    return DashboardData(
        latents=latents, n_rows=source.n_rows, density=density_all[latents].float(),
        max_act=mx[lat_dev].cpu(), min_act=mn[lat_dev].cpu(), signed=signed, sides=done,
        n_bins=cfg.n_bins, per_bin=cfg.per_bin, context=cfg.context,
        density_all=density_all.float(), seconds=seconds)


def _fill_contexts(encode, source: RowSource, sides: list[SideData], latents: Tensor,
                   cfg: DashboardConfig, dev, dtype) -> None:
    c = cfg.context
    offsets = torch.arange(-c, c + 1)
    row_map = source.row_map()
    T = source.windows_WT.shape[1]
    sets = [es for s in sides for es in (s.top, s.bins)]
    L = latents.shape[0]
    ctx_rows_all = []
    for es in sets:
        valid = es.rows >= 0
        r = es.rows.clamp(min=0)
        w, p = source.window_N[r], source.pos_N[r]
        q = p[..., None] + offsets  # [L, E, C]
        inside = valid[..., None] & (q >= 0) & (q < T)
        qc = q.clamp(0, T - 1)
        wq = w[..., None].expand_as(qc)
        es.ctx_tokens = torch.where(inside, source.windows_WT[wq, qc], -1)
        ctx_rows = torch.where(inside, row_map[wq, qc], -1)
        ctx_rows_all.append(ctx_rows)
        es.ctx_vals = torch.zeros(ctx_rows.shape)
    # (latent, row) pairs to evaluate: encode each needed row once
    lat_idx = [torch.arange(L)[:, None, None].expand_as(cr) for cr in ctx_rows_all]
    flat_rows = torch.cat([cr.flatten() for cr in ctx_rows_all])
    flat_lat = torch.cat([li.flatten() for li in lat_idx])
    need = flat_rows >= 0
    uniq, inv = torch.unique(flat_rows[need], return_inverse=True)
    vals = torch.zeros(flat_rows.shape[0])
    if uniq.numel():
        order = torch.argsort(inv)
        inv_sorted, lat_sorted = inv[order], flat_lat[need][order]
        got = torch.zeros(inv.shape[0])
        lat_dev = latents.to(dev)
        for u0 in range(0, uniq.shape[0], cfg.batch_rows):
            u1 = min(uniq.shape[0], u0 + cfg.batch_rows)
            f_UL = encode(source.gather(uniq[u0:u1]).to(dev, dtype)).float()[:, lat_dev].cpu()
            lo, hi = torch.searchsorted(inv_sorted, torch.tensor([u0, u1]))
            got[order[lo:hi]] = f_UL[inv_sorted[lo:hi] - u0, lat_sorted[lo:hi]]
        vals[need] = got
    i = 0
    for es in sets:
        n = es.ctx_vals.numel()
        es.ctx_vals = vals[i:i + n].view(es.ctx_vals.shape)
        i += n
        # the example token is the centre of its context
        es.vals = es.ctx_vals[:, :, c].clone()


# ---- logit lens ----------------------------------------------------------------------------------
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                "model.decoder.final_layer_norm", "norm", "ln_f")


def final_norm(model) -> tuple[Any, str]:
    """The final norm module of an HF causal LM (applied before the unembedding) and its path."""
    for path in _FINAL_NORMS:
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None and hasattr(m, "weight"):
            return m, path
    return None, ""


@torch.inference_mode()
def logit_lens(W_dec_LD: Tensor, model, k: int = 10, hist_bins: int = 40,
               batch: int = 256) -> dict[str, Any]:
    """Top / bottom ``k`` tokens of ``W_dec[i] · W_U`` per row, through the final norm's
    weight (and centring, for a LayerNorm), as TransformerLens's ``fold_ln`` does: the
    norm's division by the RMS / std is one positive scalar per direction, so it changes no
    ranking and is left out. Also a ``hist_bins``-bar histogram of each row's logits."""
    W_U = model.get_output_embeddings().weight  # [V, D]
    norm, path = final_norm(model)
    dev, dt = W_U.device, W_U.dtype
    out: dict[str, list[Tensor]] = {k_: [] for k_ in
                                    ("pos_ids", "pos_vals", "neg_ids", "neg_vals",
                                     "hist_counts", "hist_lo", "hist_hi")}
    for d in W_dec_LD.split(batch):
        d = d.to(dev, dt)
        if norm is not None:
            if isinstance(norm, torch.nn.LayerNorm):
                d = d - d.mean(-1, keepdim=True)
            d = d * norm.weight
        logits = (d @ W_U.T).float()  # [b, V]
        kk = min(k, logits.shape[1])
        top, bot = logits.topk(kk, dim=1), logits.topk(kk, dim=1, largest=False)
        out["pos_ids"].append(top.indices.cpu())
        out["pos_vals"].append(top.values.cpu())
        out["neg_ids"].append(bot.indices.cpu())
        out["neg_vals"].append(bot.values.cpu())
        lo, hi = bot.values[:, :1], top.values[:, :1]
        width = (hi - lo).clamp(min=1e-12)
        j = ((logits - lo) / width * hist_bins).long().clamp_(0, hist_bins - 1)
        j += torch.arange(j.shape[0], device=j.device)[:, None] * hist_bins
        counts = torch.bincount(j.flatten(), minlength=j.shape[0] * hist_bins)
        out["hist_counts"].append(counts.view(-1, hist_bins).cpu())
        out["hist_lo"].append(lo[:, 0].cpu())
        out["hist_hi"].append(hi[:, 0].cpu())
    res: dict[str, Any] = {k_: torch.cat(v) for k_, v in out.items()}
    res["path"] = (f"W_dec[i] * {path}.weight @ W_U^T" if norm is not None
                   else "W_dec[i] @ W_U^T (no final norm found)")
    return res


# ---- text ----------------------------------------------------------------------------------------
class TokenText:
    """Display strings of token ids (each decoded once)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i]) if self.tok is not None else f"<{i}>"
        return self.cache[i]


def _r(x: float, nd: int = 3) -> float:
    return float(f"{float(x):.{nd}g}") if math.isfinite(float(x)) else 0.0


# ---- export --------------------------------------------------------------------------------------
@dataclass
class DashboardMeta:
    model: str = ""
    hook: str = ""
    architecture: str = ""
    d_sae: int = 0
    dataset: str = ""
    context_size: int = 0
    n_windows: int = 0
    store: str = ""
    logit_lens: str = ""
    run: str = ""


def _examples(es: ExampleSet, li: int, text: TokenText, c: int) -> list[dict]:
    out = []
    assert es.ctx_tokens is not None and es.ctx_vals is not None
    for e in range(es.rows.shape[1]):
        if int(es.rows[li, e]) < 0:
            out.append({})
            continue
        toks, vals = es.ctx_tokens[li, e], es.ctx_vals[li, e]
        inside = toks >= 0
        first = int(inside.nonzero()[0]) if bool(inside.any()) else 0
        toks, vals = toks[inside], vals[inside]
        out.append({"row": int(es.rows[li, e]), "tokens": [text(t) for t in toks.tolist()],
                    "values": [_r(v) for v in vals.tolist()], "center": c - first})
    return out


def latent_records(data: DashboardData, text: TokenText, meta: DashboardMeta,
                   atoms: dict[int, dict] | None = None) -> list[dict]:
    """One plain dict per chosen latent (what the HTML page renders)."""
    recs = []
    lg = data.logits
    for li, lat in enumerate(data.latents.tolist()):
        rec: dict[str, Any] = {
            "index": lat, "density": float(data.density[li]),
            "max": _r(data.max_act[li], 4), "min": _r(data.min_act[li], 4), "sides": []}
        for side in data.sides:
            ext = float(side.extreme[li])
            nb, s = data.n_bins, data.per_bin
            bins = []
            ex = _examples(side.bins, li, text, data.context)
            total = max(1, int(side.bin_counts[li].sum()))
            for j in range(nb):
                lo, hi = ext * j / nb, ext * (j + 1) / nb
                bins.append({"lo": _r(side.sign * lo, 4), "hi": _r(side.sign * hi, 4),
                             "count": int(side.bin_counts[li, j]),
                             "frac": _r(int(side.bin_counts[li, j]) / total, 4),
                             "examples": [x for x in ex[j * s:(j + 1) * s] if x]})
            H = side.hist_counts.shape[1]
            rec["sides"].append({
                "sign": side.sign, "extreme": _r(side.sign * ext, 4),
                "top": [x for x in _examples(side.top, li, text, data.context) if x],
                "bins": bins,
                "hist": {"counts": side.hist_counts[li].tolist(),
                         "centers": [_r(side.sign * ext * (j + 0.5) / H, 4) for j in range(H)]},
            })
        if lg:
            rec["logits"] = {
                "pos": [[text(t), _r(v)] for t, v in zip(lg["pos_ids"][li].tolist(),
                                                         lg["pos_vals"][li].tolist(), strict=True)],
                "neg": [[text(t), _r(v)] for t, v in zip(lg["neg_ids"][li].tolist(),
                                                         lg["neg_vals"][li].tolist(), strict=True)],
                "hist": {"counts": lg["hist_counts"][li].tolist(),
                         "lo": _r(lg["hist_lo"][li]), "hi": _r(lg["hist_hi"][li])},
            }
        top_tokens = []
        for x in rec["sides"][0]["top"]:
            t = x["tokens"][x["center"]]
            if t not in top_tokens:
                top_tokens.append(t)
        rec["top_tokens"] = top_tokens[:8]
        if atoms and lat in atoms:
            rec["atom"] = atoms[lat]
        recs.append(rec)
    return recs


def feature_json(rec: dict, meta: DashboardMeta, n_rows: int) -> dict:
    """A latent in the feature schema of SAEDashboard's Neuronpedia export
    (``NeuronpediaDashboardFeature.to_dict``): ``feature_index``, ``pos_str``/``pos_values``,
    ``neg_str``/``neg_values`` (logit lens), ``frac_nonzero``, ``freq_hist_data_bar_values`` /
    ``_bar_heights`` (activation histogram: bar centres / counts), ``logits_hist_data_bar_*``,
    ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset`` and ``activations``: one entry per
    example with ``tokens``, ``values``, ``bin_min``, ``bin_max``, ``bin_contains`` (top
    examples: ``-1, max, -1``, as SAEDashboard's "TOP ACTIVATIONS" group; bin examples: the
    bin's edges and the fraction of firing tokens in it), plus Neuronpedia's per-activation
    ``maxValue``, ``maxValueTokenIndex`` and ``minValue``. Examples are ``±context`` snippets,
    so ``n_tokens_in_prompt`` is the snippet length, not the window's. saelab-only facts sit
    under ``saelab``."""
    side0 = rec["sides"][0]
    acts = []
    for side in rec["sides"]:
        for x in side["top"]:
            acts.append(_np_activation(x, -1, side["extreme"], -1))
        for b in side["bins"]:
            for x in b["examples"]:
                acts.append(_np_activation(x, b["lo"], b["hi"], b["frac"]))
    out: dict[str, Any] = {
        "feature_index": rec["index"],
        "pos_str": [t for t, _ in rec.get("logits", {}).get("pos", [])],
        "pos_values": [v for _, v in rec.get("logits", {}).get("pos", [])],
        "neg_str": [t for t, _ in rec.get("logits", {}).get("neg", [])],
        "neg_values": [v for _, v in rec.get("logits", {}).get("neg", [])],
        "frac_nonzero": rec["density"],
        "freq_hist_data_bar_values": side0["hist"]["centers"],
        "freq_hist_data_bar_heights": side0["hist"]["counts"],
        "logits_hist_data_bar_values": [],
        "logits_hist_data_bar_heights": [],
        "n_prompts_total": meta.n_windows,
        "n_tokens_in_prompt": 0,
        "dataset": meta.dataset,
        "activations": acts,
        "maxActApprox": rec["max"],
    }
    if "logits" in rec:
        h = rec["logits"]["hist"]
        n = len(h["counts"])
        out["logits_hist_data_bar_heights"] = h["counts"]
        out["logits_hist_data_bar_values"] = [
            _r(h["lo"] + (h["hi"] - h["lo"]) * (j + 0.5) / n) for j in range(n)]
    if acts:
        out["n_tokens_in_prompt"] = max(len(a["tokens"]) for a in acts)
    out["saelab"] = {**asdict(meta), "n_rows": n_rows, "min": rec["min"],
                     **({"atom": rec["atom"]} if "atom" in rec else {})}
    if len(rec["sides"]) > 1:
        s1 = rec["sides"][1]
        out["saelab"]["neg_hist"] = {"bar_values": s1["hist"]["centers"],
                                     "bar_heights": s1["hist"]["counts"]}
    return out


def _np_activation(x: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    vals = x["values"]
    i_max = max(range(len(vals)), key=lambda i: vals[i]) if vals else 0
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": x["tokens"], "values": vals, "maxValue": vals[i_max] if vals else 0.0,
            "maxValueTokenIndex": i_max, "minValue": min(vals) if vals else 0.0}


# ---- the run-level entry point -------------------------------------------------------------------
@dataclass
class DashboardResult:
    html: Path
    features_dir: Path | None
    n_latents: int
    n_rows: int
    seconds: dict[str, float]


def heldout_store_path(model_cfg, data_cfg, tokens: int) -> Path:
    """Cache folder of the held-out store a dashboard scans (keyed like training stores)."""
    fields = {"model": model_cfg.model, "hook": model_cfg.hook, "dtype": model_cfg.model_dtype,
              "data": asdict(data_cfg), "tokens": tokens, "split": "eval"}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "stores" / (f"{Path(model_cfg.model).name}-{model_cfg.hook}-eval-"
                                      f"{tokens}-{digest}")


def run_configs(run: Path):
    """(ModelConfig, DataConfig, store, SAE folder) of a run folder or a bare SAE folder."""
    run = Path(run)
    if (run / "run_config.json").exists():
        raw = json.loads((run / "run_config.json").read_text())
        model = from_dict(ModelConfig, raw.get("model", {}))
        data = from_dict(DataConfig, raw.get("data", {}))
        sae_dir = run / "sae"
        if not (sae_dir / "cfg.json").exists():
            raise RunFolderError(f"{run} holds no finished SAE ({sae_dir}/cfg.json missing): "
                                 f"finish training with `saelab train --resume --out {run}`")
        return model, data, raw.get("store", ""), sae_dir
    if not (run / "cfg.json").exists():
        raise RunFolderError(f"{run} is neither a run folder (run_config.json) nor an SAE "
                             f"folder (cfg.json): pass a folder written by `saelab train`")
    meta = read_metadata(run).get("metadata", {})
    name = meta.get("model_name") or ""
    model = ModelConfig(model="embedded" if name == "SmolLM2-135M-Instruct" else name,
                        hook=meta.get("hook_name") or "")
    data = DataConfig(context_size=int(meta.get("context_size") or 128),
                      prepend_bos=bool(meta.get("prepend_bos", True)))
    return model, data, "", run


def _atom_contexts(sae, latents: Tensor, train_store: str, text: TokenText,
                   c: int) -> dict[int, dict]:
    """ITDA: the context each chosen atom was taken from, if the SAE records it.

    Convention: an SAE whose dictionary atoms are activations carries ``atom_window [F]`` and
    ``atom_pos [F]`` (global window id and position in its training store) as tensors; the
    tokens are read from that store's ``windows`` (when the store is still there)."""
    aw, ap = getattr(sae, "atom_window", None), getattr(sae, "atom_pos", None)
    if not isinstance(aw, Tensor) or not isinstance(ap, Tensor):
        return {}
    out = {int(i): {"window": int(aw[i]), "pos": int(ap[i])} for i in latents.tolist()}
    if not train_store or not (Path(train_store) / "manifest.json").exists():
        return out
    store = ActivationStore.open(train_store)
    for i, info in enumerate(store.shards):
        here = [lat for lat, a in out.items() if info.window_start <= a["window"] < info.window_end]
        if not here:
            continue
        win = store.read_tensor(i, "windows")
        for lat in here:
            a = out[lat]
            row = win[a["window"] - info.window_start]
            lo, hi = max(0, a["pos"] - c), min(row.shape[0], a["pos"] + c + 1)
            a["tokens"] = [text(t) for t in row[lo:hi].tolist()]
            a["center"] = a["pos"] - lo
    return out


def build_dashboard(run: str | Path, out: str | Path, cfg: DashboardConfig,
                    progress: bool = True, lm=None, log=print) -> DashboardResult:
    """`saelab dashboard RUN --out DIR`: scan held-out rows, write ``DIR/dashboard.html`` (one
    self-contained file) and, with ``cfg.write_json``, ``DIR/features/<i>.json``."""
    cfg.validate()
    t_all = time.perf_counter()
    model_cfg, data_cfg, train_store, sae_dir = run_configs(Path(run))
    device = resolve_device(cfg.device)
    sae = load_sae(sae_dir, device=device)
    sae.requires_grad_(False)
    parse_latents(cfg.latents, sae.cfg.d_sae, torch.zeros(sae.cfg.d_sae), cfg.seed)  # early check
    lm = lm or load_model(model_cfg)
    if cfg.store:
        store = ActivationStore.open(cfg.store)
    else:
        path = heldout_store_path(model_cfg, data_cfg, cfg.tokens)
        store = harvest(HarvestConfig(model=model_cfg, data=data_cfg, store=str(path),
                                      tokens=cfg.tokens, split="eval"), progress=progress, lm=lm)
    store.check_compatible(model=lm.name, d_in=sae.cfg.d_in)
    if store.split and store.split != "eval":
        log(f"note: store {store.path} holds {store.split!r} rows, not held-out ones")
    source = StoreRows(store, cfg.tokens)
    dt = sae.W_dec.dtype
    data = collect(sae.encode, sae.cfg.d_sae, source, cfg, device=device, dtype=dt,
                   progress=progress)
    t0 = time.perf_counter()
    data.logits = logit_lens(sae.W_dec[data.latents.to(sae.W_dec.device)], lm.model,
                             k=cfg.logit_k, hist_bins=cfg.hist_bins)
    data.seconds["logit_lens"] = time.perf_counter() - t0
    log("dashboard: " + ", ".join(f"{k} {v:.1f} s" for k, v in data.seconds.items()))
    text = TokenText(lm.tokenizer)
    meta = DashboardMeta(
        model=lm.name, hook=store.hook, architecture=sae.architecture, d_sae=sae.cfg.d_sae,
        dataset=store.dataset, context_size=store.context_size,
        n_windows=int(source.window_N.unique().numel()), store=str(store.path),
        logit_lens=data.logits.pop("path"), run=str(run))
    atoms = _atom_contexts(sae, data.latents, train_store, text, cfg.context)
    t0 = time.perf_counter()
    recs = latent_records(data, text, meta, atoms)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html = out / DASHBOARD_HTML
    atomic_write_bytes(html, dashboard_html(recs, meta, data).encode())
    fdir = None
    if cfg.write_json:
        fdir = out / FEATURES_DIR
        fdir.mkdir(exist_ok=True)
        for rec in recs:
            # compact: an indented file puts every context value on its own line
            text_js = json.dumps(json_safe(feature_json(rec, meta, data.n_rows)),
                                 separators=(",", ":"), ensure_ascii=False)
            atomic_write_bytes(fdir / f"{rec['index']}.json", text_js.encode())
    data.seconds["write"] = time.perf_counter() - t0
    data.seconds["total"] = time.perf_counter() - t_all
    return DashboardResult(html, fdir, len(recs), data.n_rows, data.seconds)
