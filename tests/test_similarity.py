"""Similarity measures (docs/methods.md §9.4), char-span alignment and window char spans."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saelab.analysis._similarity_measures import (
    align_token_ends,
    best_matches,
    centred,
    cka_from_centred,
    jaccard,
    linear_cka,
    relative_similarity,
    svcca,
)
from saelab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _rep(n=200, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64)


def _rotation(d, seed=1):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q


def test_jaccard_on_hand_built_sets():
    a = {(0, 5), (0, 9), (1, 3)}
    b = {(0, 9), (1, 3), (2, 2), (4, 4)}
    assert jaccard(a, b) == 2 / 5
    assert jaccard(a, a) == 1.0 and jaccard(a, {(9, 9)}) == 0.0 and jaccard([], []) == 1.0


def test_cka_invariances_and_independence():
    X = _rep()
    assert linear_cka(X, X @ _rotation(24)) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, 3.0 * X + 7.0) == pytest.approx(1.0, abs=1e-10)
    # an independent representation of the same size scores far lower
    assert linear_cka(X, _rep(seed=5)) < 0.3
    # a naive float64 reference of the HSIC form: tr(K H L H) / sqrt(tr(KHKH) tr(LHLH))
    Y = _rep(seed=6)[:, :10]
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    ref = torch.trace(K @ H @ L @ H) / torch.sqrt(torch.trace(K @ H @ K @ H)
                                                  * torch.trace(L @ H @ L @ H))
    assert linear_cka(X, Y) == pytest.approx(float(ref), rel=1e-9)
    # the feature-space form `saelab similarity` uses (float32 states)
    assert cka_from_centred(*centred(X), *centred(Y)) == pytest.approx(float(ref), rel=1e-5)
    assert cka_from_centred(*centred(X), *centred(X @ _rotation(24))) == pytest.approx(1.0,
                                                                                  abs=1e-5)


def test_svcca_and_relative_under_rotation():
    X = _rep()
    assert svcca(X, X @ _rotation(24), 20) == pytest.approx(1.0, abs=1e-8)
    assert relative_similarity(X, X @ _rotation(24), 50) == pytest.approx(1.0, abs=1e-10)
    assert svcca(X, _rep(seed=9), 5) < 0.6
    assert relative_similarity(X, _rep(seed=9), 50) < relative_similarity(
        X, X + 0.1 * _rep(seed=9), 50)


def test_char_span_alignment_on_two_toy_tokenisers():
    text = "the cat sat"
    # tokeniser A: words ("the", " cat", " sat"); tokeniser B: "th","e"," c","at"," sa","t"
    ends_a = torch.tensor([3, 7, 11])
    ends_b = torch.tensor([2, 3, 5, 7, 10, 11])
    ia, ib = align_token_ends(ends_a, ends_b)
    assert ia.tolist() == [0, 1, 2] and ib.tolist() == [1, 3, 5]
    assert [text[: int(ends_a[i])] for i in ia] == [text[: int(ends_b[j])] for j in ib]
    # a shared end inside a word: B ends at 2 where A does not, and vice versa
    ia, ib = align_token_ends(torch.tensor([2, 5]), torch.tensor([1, 2, 4]))
    assert ia.tolist() == [0] and ib.tolist() == [1]


def test_best_matches_and_depth_error():
    S = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8]])
    best, err = best_matches(S)
    assert best == [0, 2] and err == [0.0, 0.0]
    best, err = best_matches(S.flip(1))
    assert best == [2, 0] and math.isclose(err[0], 1.0) and math.isclose(err[1], 1.0)


def test_window_char_spans_match_windows(tiny_tokenizer):
    from saelab.data.windows import iter_window_char_spans, iter_windows

    docs = ["the cat sat on the mat", "a dog ran far away", "birds fly high", "x y z"] * 3
    wins = list(iter_windows(docs, tiny_tokenizer, 8, True, chunk_docs=5))
    spans = list(iter_window_char_spans(docs, tiny_tokenizer, 8, True, chunk_docs=2))
    assert len(wins) == len(spans) > 0
    for w, (tok, doc, start, end) in zip(wins, spans, strict=True):
        assert torch.equal(w, tok)
        assert doc[0] == -1  # BOS head
        for t in range(1, len(w)):
            if doc[t] >= 0:  # a document token: its span decodes to its text
                piece = docs[int(doc[t])][int(start[t]):int(end[t])]
                assert tiny_tokenizer.decode([int(w[t])]).strip() == piece.strip()


def _planted_layers(n=600, d=12, seed=0):
    """Three "layers" of the same n inputs: a, a copy scaled by 2 (bitwise the same unit
    vectors, so the same ITDA) and an unrelated one."""
    a = _rep(n, d, seed).float()
    return {0: a, 1: 2.0 * a, 2: _rep(n, d, seed + 7).float()}


def test_fit_to_size_hits_the_size_from_any_start():
    from saelab.analysis.similarity import _SIZE_TOL, SimilarityConfig, _fit, fit_to_size

    cfg = SimilarityConfig(k=4, itda_batch_rows=32)
    x = _planted_layers()[0]
    sizes = {d: _fit(cfg, x, "cpu", d).d_sae for d in (1e-1, 1e-3, 1e-5)}
    assert sizes[1e-1] < 100 < 300 < sizes[1e-5]  # the search has room on both sides
    for start in (1e-1, 1e-3, 1e-6):
        sae, delta, builds = fit_to_size(cfg, x, 200, start)
        assert 200 <= sae.d_sae <= 200 * (1 + _SIZE_TOL) and 1 <= builds <= 16
        # the reported δ rebuilds that dictionary
        assert _fit(cfg, x, "cpu", delta).atom_window.tolist() == sae.atom_window.tolist()


def test_size_matched_dictionaries_and_their_jaccard_by_hand():
    from saelab.analysis.similarity import SimilarityConfig, _build_itdas, _fit, jaccard

    X = _planted_layers()
    keys = [("doc", i) for i in range(600)]
    cfg = SimilarityConfig(k=4, itda_batch_rows=32)
    res = _build_itdas(cfg, [X, X], keys, False, 150, progress=False)
    assert res["atoms"] == [[150] * 3] * 2 and all(b >= 150 for b in res["built"][0])
    for m in range(2):
        for L in X:
            # independent route: the dictionary at the reported δ, its first 150 atoms' keys
            first = _fit(cfg, X[L], "cpu", res["delta"][m][L]).atom_window[:150].tolist()
            assert res["keys"][m][L] == {keys[r] for r in first}
    k0, k2 = res["keys"][0][0], res["keys"][1][2]
    assert res["keys"][0][0] == res["keys"][1][1]  # the scaled copy: the same atoms
    inter = len(k0 & k2)
    assert 0 < inter < 150 and jaccard(k0, k2) == inter / (300 - inter)
    # one δ for every layer (the old behaviour): the sizes are the built sizes, uncropped
    old = _build_itdas(cfg, [X, X], keys, False, 0, progress=False)
    assert old["atoms"] == old["built"] and old["delta"][0] == [cfg.delta] * 3


def test_itda_atoms_option_is_checked():
    from saelab.analysis.similarity import SimilarityConfig, _atoms_target

    assert SimilarityConfig(models=["a"]).atoms_target() is None
    assert SimilarityConfig(models=["a"], itda_atoms="0").atoms_target() == 0
    for bad in ("-3", "many"):
        with pytest.raises(ConfigError, match="--itda-atoms"):
            SimilarityConfig(models=["a"], itda_atoms=bad).validate()
    X = [{0: torch.zeros(1000, 64)}, {0: torch.zeros(1000, 96)}]
    assert _atoms_target(SimilarityConfig(), X, 1000) == 96 + (1000 - 96) // 4
    with pytest.raises(ConfigError, match="d_model"):  # the bootstrap: every layer the same
        _atoms_target(SimilarityConfig(itda_atoms="96"), X, 1000)
    with pytest.raises(ConfigError, match="aligned positions"):
        _atoms_target(SimilarityConfig(itda_atoms="1000"), X, 1000)


@pytest.mark.parametrize("itda_atoms", ["auto", "0"])
def test_similarity_of_a_model_with_itself_end_to_end(tiny, tiny_tokenizer, tmp_path,
                                                      itda_atoms):
    """`saelab similarity` on a tiny LM given twice (two spellings, so it is loaded and its
    ITDAs built twice): every measure matches each layer to itself, files are written."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from saelab.analysis.similarity import MEASURES, SimilarityConfig, run

    _, corpus = tiny
    # a large init, so that every block changes the residual stream (at the usual 0.02 the
    # random model's layers are near copies of the embeddings and no measure can tell them apart)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, initializer_range=0.5))
    lm = tmp_path / "lm"
    model.save_pretrained(lm)
    tiny_tokenizer.save_pretrained(lm)
    cfg = SimilarityConfig(models=[str(lm), str(lm) + "/"], dataset=str(corpus), split="train",
                           documents=16, context_size=24, k=8, delta=2e-3, itda_batch_rows=32,
                           anchors=40, svcca_components=8, device="cpu", model_dtype="float32",
                           itda_atoms=itda_atoms)
    res = run(cfg, [], tmp_path / "sim", progress=False)
    n_rows = res.aligned_positions
    assert res.layers == [[0, 1, 2, 3], [0, 1, 2, 3]] and n_rows > 100
    if itda_atoms == "auto":
        n = 64 + (n_rows - 64) // 4
        assert res.itda_atoms == n and res.atoms == [[n] * 4] * 2
        # at one size N, J = |A∩B| / (2N - |A∩B|): every entry gives a whole overlap count
        J = torch.tensor(res.matrices["itda_jaccard"], dtype=torch.float64)
        inter = 2 * n * J / (1 + J)
        assert torch.allclose(inter, inter.round(), atol=1e-6)
    else:
        assert res.itda_atoms == 0 and res.atoms == res.atoms_built
        assert len({a for sizes in res.atoms for a in sizes}) > 1  # sizes differ by layer
    for m in MEASURES:
        mat = torch.tensor(res.matrices[m])
        assert torch.allclose(mat.diagonal(), torch.ones(4, dtype=mat.dtype), atol=1e-5), m
        off = mat.masked_fill(torch.eye(4, dtype=torch.bool), -1.0)
        assert (off.amax(1) < mat.diagonal() - 1e-3).all(), (m, mat)
        assert res.best_match[m] == [0, 1, 2, 3] and res.mean_depth_error[m] == 0.0
    saved = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    assert saved["matrices"]["cka"] == res.matrices["cka"]
    assert all(Path(p).is_file() for p in res.heatmaps.values()) and len(res.heatmaps) == 4
