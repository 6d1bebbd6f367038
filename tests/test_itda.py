"""ITDA (docs/methods.md §9): the greedy rule on planted data, labels, growth, save/load."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes._matching_pursuit import matching_pursuit
from saelab.saes.itda import ITDA, ITDAOptions, LabelledRows, _most_frequent_unique

pytestmark = pytest.mark.usefixtures("one_thread")


def _itda(d, dtype=torch.float64, **opts):
    return ITDA(SAEConfig(architecture="itda", d_in=d, d_sae=4), dtype=dtype,
                options=ITDAOptions(**opts))


def _planted(d=16, K=40, n=1200, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(K, d, generator=g, dtype=torch.float64)
    U /= U.norm(dim=1, keepdim=True)
    which = torch.randint(0, K, (n,), generator=g)
    scale = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
    x = scale * U[which] + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, U


def test_greedy_rule_recovers_planted_directions():
    d, K = 16, 40  # more directions than dimensions: the bootstrap alone cannot hold them
    x, U = _planted(d, K)
    sae = _itda(d, itda_k=1, delta=1e-3, batch_rows=8)
    sae.fit_from_batches(iter(x.split(100)), total_rows=len(x))
    best_cos = (U @ sae.W_dec.T).abs().amax(dim=1)
    assert (best_cos > 0.99).all(), best_cos.min()
    # the greedy rule adds a direction once it is missing, not every token of it
    assert d + K <= sae.d_sae + d and sae.d_sae < d + 3 * K
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae, dtype=torch.float64))
    # and every planted token now reconstructs to within the threshold's scale
    res = matching_pursuit(x, sae.W_dec, 1)
    fvu = (x - res.recon_BD).square().sum() / (x - x.mean(0)).square().sum()
    assert fvu < 0.01


def test_bootstrap_takes_most_frequent_unique_rows():
    x = torch.tensor([[1.0, 0], [0, 1], [0, 1], [2, 2], [0, 1], [2, 2], [3, 0]])
    idx = _most_frequent_unique(x, 3)
    # [0,1] x3 (first at 1), [2,2] x2 (first at 3), then the singletons by first occurrence
    assert idx.tolist() == [1, 3, 0]


def test_labels_follow_atoms_and_duplicates_are_dropped():
    d = 8
    x, _ = _planted(d, K=20, n=400, seed=1)
    x = torch.cat([x[:50], x[:50]])  # every row twice: duplicates must not become atoms twice
    n = len(x)
    rows = LabelledRows(x, window=torch.arange(n) // 10, pos=torch.arange(n) % 10,
                        token=torch.arange(n) + 1000)
    sae = _itda(d, itda_k=2, delta=1e-4, batch_rows=100)
    sae.fit_from_batches([rows], total_rows=n)
    assert sae.build_stats["build_tokens"] == n
    assert len(torch.unique(sae.W_dec, dim=0)) == sae.d_sae
    for a in range(sae.d_sae):
        r = int(sae.atom_token[a]) - 1000  # the row this atom came from
        assert int(sae.atom_window[a]) == r // 10 and int(sae.atom_pos[a]) == r % 10
        torch.testing.assert_close(sae.W_dec[a], x[r] / x[r].norm())


def test_gram_growth_equals_residual_path():
    d = 12
    x, _ = _planted(d, K=30, n=600, seed=2)
    a = _itda(d, itda_k=3, delta=2e-3, batch_rows=50)
    b = _itda(d, itda_k=3, delta=2e-3, batch_rows=50, gram_max_atoms=0)
    a.fit_from_batches(iter(x.split(50)), len(x))
    b.fit_from_batches(iter(x.split(50)), len(x))
    assert a.d_sae == b.d_sae
    torch.testing.assert_close(a.W_dec, b.W_dec)


def test_max_atoms_and_token_budget():
    x, _ = _planted(16, K=40, seed=3)
    sae = _itda(16, itda_k=1, delta=1e-3, batch_rows=8, max_atoms=20)
    sae.fit_from_batches(iter(x.split(8)), total_rows=len(x))
    assert sae.d_sae == 20
    sae = _itda(16, itda_k=1, delta=1e-3, batch_rows=8)
    sae.fit_from_batches(iter(x.split(8)), total_rows=100)
    assert sae.build_stats["build_tokens"] == 100


def test_save_load_roundtrip(tmp_path):
    from saelab.io import load_sae, save_sae

    x, _ = _planted(16, K=40, seed=4)
    n = len(x)
    rows = LabelledRows(x.float(), window=torch.arange(n) + 70_000, pos=torch.arange(n) % 128,
                        token=torch.arange(n) + 200_000)
    sae = _itda(16, dtype=torch.float32, itda_k=3, delta=1e-3, batch_rows=64, nonneg=True)
    sae.fit_from_batches([rows], n)
    save_sae(sae, tmp_path / "itda")
    back = load_sae(tmp_path / "itda")
    assert back.architecture == "itda" and back.d_sae == sae.d_sae
    assert back.options.itda_k == 3 and back.options.nonneg
    torch.testing.assert_close(back.W_dec, sae.W_dec)
    for name in ("atom_window", "atom_pos", "atom_token", "atom_doc"):
        assert getattr(back, name).dtype == torch.long
        assert torch.equal(getattr(back, name), getattr(sae, name))
    torch.testing.assert_close(back(x[:20].float()).recon, sae(x[:20].float()).recon)



def test_folder_saved_with_old_option_name_k_loads_its_l0(tmp_path):
    """ITDA's MP L0 was the option `k` before it became `itda_k` (so it no longer clashes with
    TopK's --k): such a cfg.json still loads, its L0 taken from the saved `itda_k` tensor."""
    import json

    from saelab.io import load_sae, save_sae

    x, _ = _planted(16, K=40, seed=4)
    sae = _itda(16, dtype=torch.float32, itda_k=5, delta=1e-3, batch_rows=64)
    sae.fit_from_batches([x.float()], len(x))
    save_sae(sae, tmp_path / "itda")
    cfg_path = tmp_path / "itda" / "cfg.json"
    raw = cfg_path.read_text()
    assert raw.count('"itda_k": 5') == 1, raw
    cfg_path.write_text(raw.replace('"itda_k": 5', '"k": 5'))
    assert "itda_k" not in json.loads(cfg_path.read_text())["saelab"]["config"]["options"]
    back = load_sae(tmp_path / "itda")
    assert back.options.itda_k == 5
    # MP at L0 5: at most 5 atoms per token, as in the built SAE
    l0 = (back.encode(x[:50].float()) != 0).sum(1)
    assert int(l0.max()) == 5 and torch.equal(l0, (sae.encode(x[:50].float()) != 0).sum(1))

def test_integer_labels_survive_save_load_exactly(tmp_path):
    """io keeps integer tensors' dtype: a label beyond float32's exact range comes back."""
    from saelab.io import load_sae, save_sae

    x, _ = _planted(16, K=40, seed=5)
    big = 2**40 + 3  # float32 would round this
    rows = LabelledRows(x.float(), window=torch.full((len(x),), big), pos=torch.arange(len(x)),
                        token=torch.arange(len(x)))
    sae = _itda(16, dtype=torch.float32, itda_k=3, delta=1e-3, batch_rows=64)
    sae.fit_from_batches([rows], len(x))
    save_sae(sae, tmp_path / "itda")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "itda" / "sae_weights.safetensors")["atom_window"].dtype == (
        torch.int64)
    back = load_sae(tmp_path / "itda")
    assert int(back.atom_window[0]) == big and back.atom_window.dtype == torch.long


def test_pipeline_builds_itda_from_labelled_store_rows(tiny, tmp_path):
    """`saelab train --arch itda`: the store is read in order with its labels, and every atom
    carries its document and character span, which decode to the atom's token."""
    import saelab
    from saelab.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
    from saelab.data.corpus import iter_documents
    from saelab.models.loading import load_tokenizer
    from saelab.pipeline import train_run

    lm, corpus = tiny
    data = DataConfig(dataset=str(corpus), context_size=16)
    cfg = RunConfig(
        model=ModelConfig(model=str(lm), hook="blocks.1.hook_resid_post", device="cpu",
                          model_dtype="float32"),
        data=data, sae=SAEConfig(architecture="itda", d_sae=1,
                                 options=ITDAOptions(itda_k=4, delta=1e-3, batch_rows=64)),
        train=TrainConfig(tokens=600, batch_size=100), eval=EvalConfig(200, 2),
        out=str(tmp_path / "run"))
    summary = train_run(cfg, progress=False, log=lambda *_: None)
    assert summary.metrics["fvu"] < 1.0
    sae = saelab.load_sae(tmp_path / "run")
    assert sae.architecture == "itda" and sae.d_sae > 64  # bootstrap (d_in 64) plus failures
    docs = list(iter_documents(data, "train"))
    tok = load_tokenizer(cfg.model)
    assert (sae.atom_window >= 0).all() and (sae.atom_doc >= 0).all()
    for a in range(sae.d_sae):
        text = docs[int(sae.atom_doc[a])][int(sae.atom_char_start[a]):int(sae.atom_char_end[a])]
        assert tok.decode([int(sae.atom_token[a])]).strip() == text.strip()
