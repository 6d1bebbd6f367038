"""SAELens cached-activation datasets: export a store, read it back, read one written by
`datasets` in SAELens's layout, and train on it through `saelab train --store`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.data.interop import SAELENS_CFG, export_saelens, import_saelens, open_store
from saelab.data.store import ActivationStore, StoreSpec, StoreWriter

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")
D, T = 8, 6


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))


def make_store(path: Path, uniform: bool, dtype: str = "float32") -> ActivationStore:
    spec = StoreSpec(model="tiny-lm", hook="blocks.1.hook_resid_post", d_in=D, context_size=T,
                     dtype=dtype, exclude_first_positions=1)
    w = StoreWriter(path, spec, shard_rows=25)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        wins = torch.randint(0, 300, (4, T), generator=g)
        keep = torch.ones(4, T, dtype=torch.bool)
        keep[:, 0] = False
        if not uniform:
            keep &= torch.rand(4, T, generator=g) > 0.3
        w.add(wins, keep, torch.randn(int(keep.sum()), D, generator=g))
    return w.finish()


def all_rows(store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [store.read_shard(i) for i in range(len(store.shards))]
    return tuple(torch.cat([p[k] for p in parts]) for k in ("acts", "tokens", "pos"))


@pytest.mark.parametrize("uniform", [True, False])
def test_export_then_read_back_gives_identical_rows(tmp_path, uniform):
    store = make_store(tmp_path / "store", uniform)
    out = export_saelens(store, tmp_path / "sl")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    # read with datasets alone, as SAELens does: one row per window, [L, D] per row
    ds = datasets.load_from_disk(str(out)).with_format("numpy")
    L = T - 1 if uniform else 1
    assert cfg["context_size"] == L and cfg["hook_name"] == store.hook
    assert cfg["seqpos_slice"] == ([1, T] if uniform else None)
    assert ds.features[store.hook].shape == (L, D)
    acts, tokens, pos = all_rows(store)
    np.testing.assert_array_equal(ds[:][store.hook].reshape(-1, D), acts.numpy())
    np.testing.assert_array_equal(ds[:]["token_ids"].reshape(-1), tokens.numpy())
    back = open_store(out)
    assert back.hook == store.hook and back.d_in == D and back.num_rows == store.num_rows
    b_acts, b_tokens, b_pos = all_rows(back)
    assert torch.equal(b_acts, acts) and torch.equal(b_tokens, tokens)
    assert torch.equal(b_pos.long(), pos.long()) and back.context_size == T
    assert back.exclude_first_positions == store.exclude_first_positions
    assert open_store(out).path == back.path  # imported once, then reused


def test_dataset_written_in_the_saelens_layout_reads_as_a_store(tmp_path):
    hook, n, L = "blocks.0.hook_mlp_out", 7, 5
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, L, D)).astype(np.float32)
    tokens = rng.integers(0, 300, (n, L)).astype(np.int32)
    features = datasets.Features({
        hook: datasets.Array2D(shape=(L, D), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=L),
    })
    folder = tmp_path / "sl"
    datasets.Dataset.from_dict({hook: acts, "token_ids": tokens},
                               features=features).save_to_disk(str(folder))
    (folder / SAELENS_CFG).write_text(json.dumps({"model_name": "gelu-1l", "hook_name": hook}))
    store = import_saelens(folder, shard_rows=10)
    assert (store.hook, store.model, store.context_size, store.num_rows) == (
        hook, "gelu-1l", L, n * L)
    got_acts, got_tokens, _ = all_rows(store)
    np.testing.assert_array_equal(got_acts.numpy(), acts.reshape(-1, D))
    np.testing.assert_array_equal(got_tokens.numpy(), tokens.reshape(-1))
    t = store.read_shard(0)
    assert t["pos"].tolist()[:L] == list(range(L)) and t["window"].tolist()[:L] == [0] * L
    assert torch.allclose(store.mean, torch.from_numpy(acts.reshape(-1, D)).double().mean(0))


def test_train_accepts_a_saelens_dataset_as_store(tiny, tmp_path):
    from saelab.cli import main

    lm, corpus = tiny
    base = ["--model", str(lm), "--dataset", str(corpus), "--hook", "blocks.1.hook_resid_post",
            "--device", "cpu", "--model-dtype", "float32", "--context-size", "16", "--quiet"]
    assert main(["harvest", *base, "--tokens", "1200", "--out", str(tmp_path / "s")]) == 0
    assert main(["export-store", str(tmp_path / "s"), "--format", "saelens",
                 "--out", str(tmp_path / "sl")]) == 0
    assert main(["train", *base, "--store", str(tmp_path / "sl"), "--d-sae", "32", "--tokens",
                 "1024", "--batch-size", "256", "--eval-tokens", "300", "--ce-windows", "4",
                 "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["fvu"])
