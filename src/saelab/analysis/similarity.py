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
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.analysis._similarity_measures import (
    align_token_ends,
    best_matches,
    centred_gram,
    cka_from_grams,
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
    delta: float = opt(0.0004, "ITDA error threshold (the reference's GPT-2 layer-similarity "
                       "value).", flag="itda_delta")
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


@dataclass
class SimilarityOutput:
    models: list[str]
    layers: list[list[int]]
    aligned_positions: int
    atoms: list[list[int]]  # ITDA size per layer, per model
    matrices: dict[str, list[list[float]]]  # measure -> [layers A x layers B]
    best_match: dict[str, list[int]]  # measure -> best layer of B for each layer of A
    mean_depth_error: dict[str, float]  # measure -> mean |relative depth difference|
    heatmaps: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


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


@torch.no_grad()
def _hidden(lm, ids: list[int], layers: list[int]) -> dict[int, torch.Tensor]:
    """resid_post of ``layers`` for one window (BOS + ids), all hooked in one forward."""
    blocks = find_blocks(lm.model)
    out: dict[int, torch.Tensor] = {}
    handles = [blocks[L].register_forward_hook(
        lambda _m, _a, o, L=L: out.__setitem__(L, (o[0] if isinstance(o, tuple) else o)[0]))
        for L in layers]
    try:
        x = torch.tensor([[bos_id(lm.tokenizer), *ids]], device=lm.device)
        lm.model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {L: v[1:].float().cpu() for L, v in out.items()}  # drop the BOS position


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

    acts: list[dict[int, list[torch.Tensor]]] = [{L: [] for L in ls} for ls in layers]
    keys: list[tuple] = []
    docs = iter_documents(DataConfig(dataset=cfg.dataset), cfg.split)
    bar = tqdm(total=cfg.documents, unit="doc", disable=not progress, desc="forward")
    for d, text in enumerate(docs):
        if d >= cfg.documents:
            break
        enc = [_encode(lm.tokenizer, text) for lm in lms]
        if not all(ends for _, ends in enc):
            bar.update(1)
            continue
        body = cfg.context_size - 1
        # the characters both tokenisations cover within one window
        limit = min(ends[min(body, len(ends)) - 1] for _, ends in enc)
        cut = [([i for i, e in zip(ids, ends, strict=True) if e <= limit],
                torch.tensor([e for e in ends if e <= limit])) for ids, ends in enc]
        ia, ib = align_token_ends(cut[0][1], cut[1][1])
        if len(ia):
            hid_a = _hidden(lms[0], cut[0][0], layers[0])
            hid_b = hid_a if same else _hidden(lms[1], cut[1][0], layers[1])
            for L in layers[0]:
                acts[0][L].append(hid_a[L][ia])
            for L in layers[1]:
                acts[1][L].append(hid_b[L][ib])
            for i in ia.tolist():
                keys.append((d, int(cut[0][1][i])) if cfg.key == "char_span" else
                            (d, i) if cfg.key == "position" else (cut[0][0][i],))
        bar.update(1)
    bar.close()
    X = [{L: torch.cat(v) for L, v in a.items()} for a in acts]
    n_rows = len(keys)
    if n_rows < 2:
        raise ConfigError("fewer than 2 aligned positions: give more --documents")

    atom_keys, atoms = _build_itdas(cfg, X, keys, same, progress)
    LA, LB = layers
    # per-layer state, computed once (the pairs then cost N² or less each): centred kernels
    # for CKA, SVCCA bases, relative vectors; one model compared with itself shares them
    state = [_layer_state(cfg, X[0], progress)]
    state.append(state[0] if same else _layer_state(cfg, X[1], progress))
    mats: dict[str, list[list[float]]] = {m: [] for m in MEASURES}
    for La in tqdm(LA, desc="measures", disable=not progress):
        row: dict[str, list[float]] = {m: [] for m in MEASURES}
        for Lb in LB:
            a, b = state[0][La], state[1][Lb]
            row["itda_jaccard"].append(jaccard(atom_keys[0][La], atom_keys[1][Lb]))
            row["cka"].append(cka_from_grams(a["gram"], b["gram"]))
            row["svcca"].append(svcca_from_bases(a["basis"], b["basis"]))
            row["relative"].append(float((a["rel"] * b["rel"]).sum(1).mean()))
        for m in MEASURES:
            mats[m].append(row[m])
    best, depth_err = {}, {}
    for m in MEASURES:
        idx, err = best_matches(torch.tensor(mats[m]))
        best[m] = [LB[j] for j in idx]
        depth_err[m] = sum(err) / len(err)
    out.mkdir(parents=True, exist_ok=True)
    result = SimilarityOutput(
        models=[canonical_model_name(n) for n in names], layers=[LA, LB],
        aligned_positions=n_rows, atoms=atoms, matrices=mats, best_match=best,
        mean_depth_error=depth_err, seconds=time.perf_counter() - t0)
    result.heatmaps = _heatmaps(result, out)
    (out / "similarity.json").write_text(json.dumps({**asdict(result), "config": asdict(cfg),
                                                     "summary": _summary_rows(result)},
                                                    indent=1) + "\n")
    return result


def _layer_state(cfg, X_m: dict[int, torch.Tensor], progress: bool) -> dict[int, dict]:
    return {L: {"gram": centred_gram(x), "basis": svcca_basis(x, cfg.svcca_components),
                "rel": relative_vectors(x, cfg.anchors, cfg.seed).float()}
            for L, x in tqdm(X_m.items(), desc="layer state", disable=not progress)}


def _build_itdas(cfg, X, keys, same: bool, progress: bool):
    """One ITDA per layer, all over the same aligned inputs in the same order (each layer's
    build reads only its own rows, so building them one after another gives the dictionaries
    of a lockstep build); a model compared with itself builds its ITDAs once."""
    dev = resolve_device(cfg.device)
    atom_keys: list[dict[int, set]] = [{}, {}]
    atoms: list[list[int]] = [[], []]
    row_ids = torch.arange(len(keys))
    for m in range(2):
        if m == 1 and same:
            atom_keys[1], atoms[1] = atom_keys[0], atoms[0]
            break
        for L, x in tqdm(X[m].items(), desc=f"itda model {m + 1}", disable=not progress):
            sae = ITDA(SAEConfig(architecture="itda", d_in=x.shape[1], d_sae=1), device=dev,
                       options=ITDAOptions(itda_k=cfg.k, delta=cfg.delta,
                                           batch_rows=cfg.itda_batch_rows))
            sae.fit_from_batches([LabelledRows(x, window=row_ids)], len(x))
            atom_keys[m][L] = {keys[int(r)] for r in sae.atom_window.tolist()}
            atoms[m].append(sae.d_sae)
    return atom_keys, atoms


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
    lines.append(f"{'mean |depth error|':<18} " + " ".join(
        f"{res.mean_depth_error[m]:>14.3f}" for m in MEASURES))
    return "\n".join(lines)


register_analysis(Analysis(
    verb="similarity", config=SimilarityConfig, output=SimilarityOutput, run=run,
    summary=summary, positional=None,
    help="Which layers of two models represent alike: ITDA Jaccard, CKA, SVCCA, relative."))
