"""`saelab similarity`: which layers of two models represent alike (docs/methods.md §9.4).

One forward per model over the same documents (every requested block's residual stream hooked
at once), an ITDA per layer built in lockstep over the same inputs, and the Jaccard index of
the atoms' label sets for every layer pair, beside linear CKA, SVCCA and relative
representations on the same inputs.

Inputs: the first ``documents`` documents of the split, each cut to the characters both
tokenisers cover within ``context_size`` tokens. Models with different tokenisers are compared
on the positions where both tokenisations end a token at the same character (found from the
offset mappings); identical tokenisers align everywhere. The ITDA label key is configurable:
``char_span`` (document, end character; works across tokenisers), ``position`` (document,
token position; needs one tokeniser, the reference's key) or ``token_id`` (needs one
tokeniser).

Dictionary sizes: at one δ the sizes differ widely by layer and model (a model whose unit
activations are alike, such as Gemma 3 with its few huge residual dimensions, stays near its
bootstrap), and Jaccard then favours the large dictionaries. By default every layer's
dictionary is therefore *size-matched* (``--itda-atoms``): its own δ is found by bisection so
that it holds N atoms (at most ``_SIZE_TOL`` more, cropped to N in data order, as the reference's
``crop_dict_size`` crops). At one N the union is ``2N - |A ∩ B|``, so Jaccard ranks pairs by
their overlap alone. ``--itda-atoms 0`` keeps one δ for every layer (the reference's way).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.analysis._similarity_measures import (
    align_token_ends,
    best_matches,
    centred,
    cka_from_centred,
    jaccard,
    relative_vectors,
    svcca_basis,
    svcca_from_bases,
)
from saelab.analysis.registry import Analysis, register_analysis
from saelab.config import DataConfig, ModelConfig, SAEConfig, opt
from saelab.data.corpus import iter_documents
from saelab.data.windows import bos_id
from saelab.errors import ConfigError
from saelab.models.hooks import find_blocks
from saelab.models.loading import canonical_model_name, load_model
from saelab.plotting import pyplot
from saelab.runtime import resolve_device
from saelab.saes.itda import ITDA, ITDAOptions, LabelledRows

MEASURES = ("itda_jaccard", "cka", "svcca", "relative")
#: size matching: a layer's dictionary may exceed N by this fraction before it is cropped to N
_SIZE_TOL = 0.03
#: size matching: ITDA builds per layer at most (bracketing by factors of 4, then bisection)
_MAX_BUILDS = 16
#: size matching: the smallest δ tried before N is declared out of reach
_MIN_DELTA = 1e-10


@dataclass
class SimilarityConfig:
    """Layer-by-layer similarity of two models (ITDA Jaccard and baselines)."""

    models: list[str] = opt([], "Model to compare; give it twice (--model A --model B). One "
                            "model compares it with itself.", flag="model")
    layers: str = opt("all", "Blocks whose residual stream (resid_post) is compared: all, or "
                      "comma-separated indices (applied to both models).")
    dataset: str = opt("embedded", "Corpus (as for `saelab train --dataset`).")
    split: str = opt("eval", "Corpus split to read documents from.", choices=("train", "eval"))
    documents: int = opt(24, "Documents read (one window each). The default (~3k aligned "
                         "positions) keeps a 30-layer comparison to a few minutes on a 2-core "
                         "CPU; the pairwise cost of every measure grows with the square of it.")
    context_size: int = opt(128, "Tokens per window, BOS included (both models).")
    key: str = opt("char_span", "ITDA atom label key: char_span (document, end character), "
                   "position (document, token position; one tokeniser) or token_id.",
                   choices=("char_span", "position", "token_id"))
    k: int = opt(40, "ITDA matching-pursuit L0.", flag="itda_k")
    delta: float = opt(0.0004, "ITDA error threshold with --itda-atoms 0 (the reference's GPT-2 "
                       "layer-similarity value); with size matching, where each layer's δ "
                       "search starts.", flag="itda_delta")
    itda_atoms: str = opt(
        "auto", "Size-matched ITDAs: every layer's dictionary holds exactly N atoms, its δ "
        "found per layer by bisection (the dictionary at the δ just under N atoms, cropped to "
        "N in data order). auto: the wider model's d_model (the bootstrap atoms) plus a "
        "quarter of the remaining aligned positions. 0: off, one --itda-delta for every "
        "layer (the reference's way; sizes then differ by layer and Jaccard favours large "
        "dictionaries).")
    itda_batch_rows: int = opt(256, "ITDA construction batch (rows whose failing tokens are "
                               "added at once); small, so the dictionary grows greedily.")
    svcca_components: int = opt(20, "SVCCA: singular directions kept per side.")
    anchors: int = opt(300, "Relative representations: random anchor inputs.")
    seed: int = opt(0, "Seed of the anchor choice.")
    device: str = opt("auto", "Torch device for the LMs and ITDAs.")
    model_dtype: str = opt("auto", "dtype of the LM forwards (auto: bfloat16 where the "
                           "device has fast bf16 matmuls, else float32).",
                           choices=("auto", "float32", "bfloat16", "float16"))

    def validate(self) -> None:
        if not 1 <= len(self.models) <= 2:
            raise ConfigError("give one or two models: --model A [--model B]")
        if self.documents < 1 or self.context_size < 4:
            raise ConfigError("--documents must be >= 1 and --context-size >= 4")
        if self.k < 1 or self.delta < 0 or self.itda_batch_rows < 1:
            raise ConfigError("--itda-k and --itda-batch-rows must be >= 1 and --itda-delta >= 0")
        self.atoms_target()

    def atoms_target(self) -> int | None:
        """``--itda-atoms`` as a count: None for auto, 0 for off."""
        v = str(self.itda_atoms).strip().lower()
        if v == "auto":
            return None
        try:
            n = int(v)
        except ValueError:
            n = -1
        if n < 0:
            raise ConfigError(f"--itda-atoms must be auto, 0 (one δ for every layer) or an atom "
                              f"count, got {self.itda_atoms!r}")
        return n


@dataclass
class SimilarityOutput:
    models: list[str]
    layers: list[list[int]]
    aligned_positions: int
    atoms: list[list[int]]  # ITDA atoms compared per layer, per model (after the crop)
    matrices: dict[str, list[list[float]]]  # measure -> [layers A x layers B]
    best_match: dict[str, list[int]]  # measure -> best layer of B for each layer of A
    mean_depth_error: dict[str, float]  # measure -> mean |relative depth difference|
    heatmaps: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    itda_atoms: int = 0  # the size every layer was matched to; 0: one δ for every layer
    atoms_built: list[list[int]] = field(default_factory=list)  # sizes before the crop
    itda_delta: list[list[float]] = field(default_factory=list)  # δ per layer, per model
    itda_builds: list[list[int]] = field(default_factory=list)  # builds per layer (δ search)
    documents: int = 0  # documents that gave aligned positions
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def _layers(spec: str, n: int) -> list[int]:
    if spec.strip().lower() == "all":
        return list(range(n))
    try:
        out = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--layers must be 'all' or comma-separated integers, got {spec!r}"
                          ) from None
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise ConfigError(f"--layers {bad} out of range: the model has {n} layers")
    return out


def _encode(tok: Any, text: str) -> tuple[list[int], list[int]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return list(enc["input_ids"]), [int(e) for _, e in enc["offset_mapping"]]


class _Stop(Exception):
    """Raised after the last hooked block: the rest of the forward (and the LM head) is skipped."""


@torch.no_grad()
def _hidden(lm, ids: list[int], layers: list[int]) -> dict[int, torch.Tensor]:
    """resid_post of ``layers`` for one window (BOS + ids), all hooked in one forward."""
    blocks = find_blocks(lm.model)
    out: dict[int, torch.Tensor] = {}
    last = max(layers)

    def grab(_m, _a, o, L):
        out[L] = (o[0] if isinstance(o, tuple) else o)[0]
        if L == last:
            raise _Stop

    handles = [blocks[L].register_forward_hook(lambda m, a, o, L=L: grab(m, a, o, L))
               for L in layers]
    try:
        x = torch.tensor([[bos_id(lm.tokenizer), *ids]], device=lm.device)
        lm.model(input_ids=x, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return {L: v[1:].float().cpu() for L, v in out.items()}  # drop the BOS position


def _collect(cfg: SimilarityConfig, lms, layers: list[list[int]], same: bool, progress: bool):
    """Aligned activations ``[{layer: X_PD}] * 2``, their keys and the documents used."""
    acts: list[dict[int, list[torch.Tensor]]] = [{L: [] for L in ls} for ls in layers]
    keys: list[tuple] = []
    used = 0
    docs = iter_documents(DataConfig(dataset=cfg.dataset), cfg.split)
    bar = tqdm(total=cfg.documents, unit="doc", disable=not progress, desc="forward")
    for d, text in enumerate(docs):
        if d >= cfg.documents:
            break
        bar.update(1)
        enc = [_encode(lm.tokenizer, text) for lm in lms]
        if not all(ends for _, ends in enc):
            continue
        body = cfg.context_size - 1
        # the characters both tokenisations cover within one window
        limit = min(ends[min(body, len(ends)) - 1] for _, ends in enc)
        cut = [([i for i, e in zip(ids, ends, strict=True) if e <= limit],
                torch.tensor([e for e in ends if e <= limit])) for ids, ends in enc]
        ia, ib = align_token_ends(cut[0][1], cut[1][1])
        if not len(ia):
            continue
        used += 1
        hid_a = _hidden(lms[0], cut[0][0], layers[0])
        hid_b = hid_a if same else _hidden(lms[1], cut[1][0], layers[1])
        for L in layers[0]:
            acts[0][L].append(hid_a[L][ia])
        for L in layers[1]:
            acts[1][L].append(hid_b[L][ib])
        for i in ia.tolist():
            keys.append((d, int(cut[0][1][i])) if cfg.key == "char_span" else
                        (d, i) if cfg.key == "position" else (cut[0][0][i],))
    bar.close()
    return [{L: torch.cat(v) for L, v in a.items()} for a in acts], keys, used


def run(cfg: SimilarityConfig, _runs: list[Path], out: Path, progress: bool) -> SimilarityOutput:
    cfg.validate()
    t0 = time.perf_counter()
    names = list(cfg.models) if len(cfg.models) == 2 else [cfg.models[0]] * 2
    same = canonical_model_name(names[0]) == canonical_model_name(names[1])
    lms = [load_model(ModelConfig(model=names[0], device=cfg.device,
                                  model_dtype=cfg.model_dtype))]
    lms.append(lms[0] if same else load_model(ModelConfig(
        model=names[1], device=cfg.device, model_dtype=cfg.model_dtype)))
    same_tok = same or lms[0].tokenizer.get_vocab() == lms[1].tokenizer.get_vocab()
    if cfg.key != "char_span" and not same_tok:
        raise ConfigError(f"--key {cfg.key} needs one tokeniser, and these models have two: "
                          "use --key char_span")
    layers = [_layers(cfg.layers, lm.n_layers) for lm in lms]
    timings = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    X, keys, n_docs = _collect(cfg, lms, layers, same, progress)
    timings["forward"] = time.perf_counter() - t
    n_rows = len(keys)
    if n_rows < 2:
        raise ConfigError("fewer than 2 aligned positions: give more --documents")
    n_atoms = _atoms_target(cfg, X, n_rows)

    t = time.perf_counter()
    itda = _build_itdas(cfg, X, keys, same, n_atoms, progress)
    timings["itda"] = time.perf_counter() - t
    LA, LB = layers
    t = time.perf_counter()
    # per-layer state, computed once (a pair then costs N·D·E or less): centred activations
    # for CKA, SVCCA bases, relative vectors; one model compared with itself shares them
    state = [_layer_state(cfg, X[0], progress)]
    state.append(state[0] if same else _layer_state(cfg, X[1], progress))
    del X
    mats: dict[str, list[list[float]]] = {m: [] for m in MEASURES}
    for La in tqdm(LA, desc="measures", disable=not progress):
        row: dict[str, list[float]] = {m: [] for m in MEASURES}
        for Lb in LB:
            a, b = state[0][La], state[1][Lb]
            row["itda_jaccard"].append(jaccard(itda["keys"][0][La], itda["keys"][1][Lb]))
            row["cka"].append(cka_from_centred(a["xc"], a["nx"], b["xc"], b["nx"]))
            row["svcca"].append(svcca_from_bases(a["basis"], b["basis"]))
            row["relative"].append(float((a["rel"] * b["rel"]).sum(1).mean()))
        for m in MEASURES:
            mats[m].append(row[m])
    timings["measures"] = time.perf_counter() - t
    best, depth_err = {}, {}
    for m in MEASURES:
        idx, err = best_matches(torch.tensor(mats[m]))
        best[m] = [LB[j] for j in idx]
        depth_err[m] = sum(err) / len(err)
    out.mkdir(parents=True, exist_ok=True)
    result = SimilarityOutput(
        models=[canonical_model_name(n) for n in names], layers=[LA, LB],
        aligned_positions=n_rows, atoms=itda["atoms"], matrices=mats, best_match=best,
        mean_depth_error=depth_err, seconds=time.perf_counter() - t0, itda_atoms=n_atoms,
        atoms_built=itda["built"], itda_delta=itda["delta"], itda_builds=itda["builds"],
        documents=n_docs, timings=timings)
    result.heatmaps = _heatmaps(result, out)
    (out / "similarity.json").write_text(json.dumps({**asdict(result), "config": asdict(cfg),
                                                     "summary": _summary_rows(result)},
                                                    indent=1) + "\n")
    return result


def _atoms_target(cfg: SimilarityConfig, X, n_rows: int) -> int:
    """The size-matched dictionary size (0: off), checked against the bootstrap and the rows."""
    n = cfg.atoms_target()
    if n == 0:
        return 0
    d_max = max(next(iter(x.values())).shape[1] for x in X)
    if n is None:
        n = d_max + (n_rows - d_max) // 4
    # the first d_model atoms of every layer are the bootstrap, the same rows for every layer
    if n <= d_max:
        raise ConfigError(f"--itda-atoms {n} must exceed the models' d_model ({d_max}): the "
                          "first d_model atoms of every layer are the same bootstrap rows; "
                          "give more atoms or more --documents")
    if n >= n_rows:
        raise ConfigError(f"--itda-atoms {n} must be below the {n_rows} aligned positions: "
                          "give fewer atoms or more --documents")
    return n


def _layer_state(cfg, X_m: dict[int, torch.Tensor], progress: bool) -> dict[int, dict]:
    out = {}
    for L, x in tqdm(X_m.items(), desc="layer state", disable=not progress):
        xc, nx = centred(x)
        out[L] = {"xc": xc, "nx": nx, "basis": svcca_basis(x, cfg.svcca_components),
                  "rel": relative_vectors(x, cfg.anchors, cfg.seed).float()}
    return out


def _fit(cfg: SimilarityConfig, x: torch.Tensor, dev, delta: float) -> ITDA:
    sae = ITDA(SAEConfig(architecture="itda", d_in=x.shape[1], d_sae=1), device=dev,
               options=ITDAOptions(itda_k=cfg.k, delta=delta, batch_rows=cfg.itda_batch_rows))
    sae.fit_from_batches([LabelledRows(x, window=torch.arange(len(x)))], len(x))
    return sae


def fit_to_size(cfg: SimilarityConfig, x: torch.Tensor, n: int, start: float,
                dev: torch.device | str = "cpu") -> tuple[ITDA, float, int]:
    """An ITDA of ``x`` with between ``n`` and ``n·(1 + _SIZE_TOL)`` atoms, its δ and the builds
    it took: δ bracketed by factors of 4 from ``start``, then bisected in log δ (the size
    falls as δ grows, not always strictly). The caller crops it to ``n``."""
    hi_n = n * (1 + _SIZE_TOL)
    lo: tuple[float, ITDA] | None = None  # the largest δ seen with >= n atoms
    hi: float | None = None  # the smallest δ seen with < n atoms
    d, builds = max(start, _MIN_DELTA), 0
    while lo is None or hi is None:
        sae = _fit(cfg, x, dev, d)
        builds += 1
        if sae.d_sae >= n:
            lo = (d, sae)
            if sae.d_sae <= hi_n:
                return sae, d, builds
            d *= 4
        else:
            hi = d
            if d <= _MIN_DELTA:
                raise ConfigError(f"--itda-atoms {n}: even δ {d:g} builds only {sae.d_sae} "
                                  "atoms on this layer; give fewer atoms or more --documents")
            d = max(d / 4, _MIN_DELTA)
    while lo[1].d_sae > hi_n and builds < _MAX_BUILDS:
        mid = math.sqrt(lo[0] * hi)
        sae = _fit(cfg, x, dev, mid)
        builds += 1
        if sae.d_sae >= n:
            lo = (mid, sae)
        else:
            hi = mid
    return lo[1], lo[0], builds


def _build_itdas(cfg, X, keys, same: bool, n_atoms: int, progress: bool) -> dict[str, list]:
    """One ITDA per layer, all over the same aligned inputs in the same order (each layer's
    build reads only its own rows, so building them one after another gives the dictionaries
    of a lockstep build); a model compared with itself builds its ITDAs once. With
    ``n_atoms`` every dictionary is size-matched (:func:`fit_to_size`) and cropped to it."""
    dev = resolve_device(cfg.device)
    res: dict[str, list] = {k: [[], []] for k in ("atoms", "built", "delta", "builds")}
    res["keys"] = [{}, {}]
    for m in range(2):
        if m == 1 and same:
            for k in res:
                res[k][1] = res[k][0]
            break
        start = cfg.delta
        for L, x in tqdm(X[m].items(), desc=f"itda model {m + 1}", disable=not progress):
            if n_atoms:
                # adjacent layers need similar δ: each search starts from the last one's
                sae, start, builds = fit_to_size(cfg, x, n_atoms, start, dev)
                delta = start
            else:
                sae, delta, builds = _fit(cfg, x, dev, cfg.delta), cfg.delta, 1
            rows = sae.atom_window.tolist()[: n_atoms or None]
            res["keys"][m][L] = {keys[int(r)] for r in rows}
            res["atoms"][m].append(len(rows))
            res["built"][m].append(sae.d_sae)
            res["delta"][m].append(delta)
            res["builds"][m].append(builds)
    return res


def _heatmaps(res: SimilarityOutput, out: Path) -> dict[str, str]:
    plt = pyplot()
    paths = {}
    for m, mat in res.matrices.items():
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(torch.tensor(mat).numpy(), origin="lower", aspect="auto", cmap="viridis")
        ax.set_xlabel(f"{res.models[1]} layer")
        ax.set_ylabel(f"{res.models[0]} layer")
        ax.set_xticks(range(len(res.layers[1])), res.layers[1], fontsize=6)
        ax.set_yticks(range(len(res.layers[0])), res.layers[0], fontsize=6)
        ax.set_title(f"{m} (mean |depth error| {res.mean_depth_error[m]:.3f})")
        fig.colorbar(im)
        path = out / f"heatmap_{m}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[m] = str(path)
    return paths


def _summary_rows(res: SimilarityOutput) -> list[dict[str, Any]]:
    nA, nB = max(res.layers[0]) + 1, max(res.layers[1]) + 1
    rows = []
    for i, La in enumerate(res.layers[0]):
        row: dict[str, Any] = {"layer": La, "depth": round(La / max(nA - 1, 1), 3)}
        for m in MEASURES:
            Lb = res.best_match[m][i]
            row[m] = {"layer": Lb, "depth": round(Lb / max(nB - 1, 1), 3)}
        rows.append(row)
    return rows


def summary(res: SimilarityOutput) -> str:
    lines = [f"{res.models[0]} vs {res.models[1]}: {res.aligned_positions:,} aligned positions",
             "best-matching layer of B (relative depth) for each layer of A:",
             f"{'layer A':>8} " + " ".join(f"{m:>14}" for m in MEASURES)]
    for row in _summary_rows(res):
        cells = [f"{row[m]['layer']:>6} ({row[m]['depth']:.2f})" for m in MEASURES]
        lines.append(f"{row['layer']:>8} " + " ".join(f"{c:>14}" for c in cells))
    if res.itda_atoms:
        lines.append(f"ITDA dictionaries size-matched to {res.itda_atoms} atoms per layer")
    else:
        lines.append("ITDA atoms per layer at one δ: " + "; ".join(
            f"{min(a)}-{max(a)}" for a in res.atoms))
    lines.append(f"{'mean |depth error|':<18} " + " ".join(
        f"{res.mean_depth_error[m]:>14.3f}" for m in MEASURES))
    return "\n".join(lines)


register_analysis(Analysis(
    verb="similarity", config=SimilarityConfig, output=SimilarityOutput, run=run,
    summary=summary, positional=None,
    help="Which layers of two models represent alike: ITDA Jaccard, CKA, SVCCA, relative."))
