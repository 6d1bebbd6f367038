"""Harvest with a tiny random Llama and a local corpus: exact rows, resume, reuse, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import saelab.harvest as harvest_mod
from saelab.config import DataConfig, HarvestConfig, ModelConfig
from saelab.data import store as store_mod
from saelab.data.store import ActivationStore
from saelab.errors import StoreError
from saelab.harvest import harvest, harvest_hooks

T = 16


def make_cfg(tiny, out: Path, tokens: int, **kw) -> HarvestConfig:
    lm, corpus = tiny
    return HarvestConfig(
        model=ModelConfig(
            model=str(lm), hook="blocks.1.hook_resid_post", device="cpu", model_dtype="float32"
        ),
        data=DataConfig(dataset=str(corpus), context_size=T, exclude_first_positions=1),
        store=str(out),
        tokens=tokens,
        shard_rows=kw.pop("shard_rows", 70),
        lm_batch_size=kw.pop("lm_batch_size", 4),
        **kw,
    )


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard_*.safetensors"))}


def count_lm_windows(monkeypatch) -> dict:
    """Count windows run through the LM by harvest."""
    import saelab.harvest as harvest_mod

    seen = {"windows": 0}
    real = harvest_mod.run_to_hooks

    def counting(model, ids, hooks):
        seen["windows"] += len(ids)
        return real(model, ids, hooks)

    monkeypatch.setattr(harvest_mod, "run_to_hooks", counting)
    return seen


def test_rows_match_the_lm(tiny, tmp_path):
    from saelab.data.corpus import iter_documents
    from saelab.data.windows import iter_windows, keep_mask
    from saelab.models.hooks import parse_hook, run_to_hook
    from saelab.models.loading import load_model

    cfg = make_cfg(tiny, tmp_path / "s", tokens=333)
    store = harvest(cfg, progress=False)
    assert store.num_rows == 333 and store.complete and not store.exhausted
    assert store.d_in == 64 and store.hook == "blocks.1.hook_resid_post"
    assert store.manifest["harvest_stats"]["tokens_per_s"] > 0
    store.verify()

    lm = load_model(cfg.model)
    hook = parse_hook(cfg.model.hook, lm.n_layers)
    shards = [store.read_shard(i) for i in range(len(store.shards))]
    windows = torch.cat([s["windows"] for s in shards]).long()
    expected = list(iter_windows(iter_documents(cfg.data, "train"), lm.tokenizer, T, True))
    assert torch.equal(windows, torch.stack(expected[: len(windows)]))
    with torch.inference_mode():
        acts_BTD = run_to_hook(lm.model, windows, hook)
    keep = keep_mask(windows, lm.tokenizer, 1, True)
    got = torch.cat([s["acts"] for s in shards])
    # harvest stops mid-window at `tokens`: compare with the first 333 kept positions
    torch.testing.assert_close(got, acts_BTD[keep][:333], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([s["tokens"] for s in shards]).long(), windows[keep][:333])
    assert (torch.cat([s["pos"] for s in shards]) >= 1).all()


def test_resume_after_crash_is_identical(tiny, tmp_path, monkeypatch):
    ref = harvest(make_cfg(tiny, tmp_path / "ref", tokens=500), progress=False)

    real = store_mod.atomic_write_bytes
    calls = {"n": 0}

    def crash_on_third_shard(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like Ctrl-C mid-write
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        harvest(make_cfg(tiny, tmp_path / "s", tokens=500), progress=False)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real)
    partial = ActivationStore.open(tmp_path / "s")
    assert not partial.complete and len(partial.shards) == 2

    seen = count_lm_windows(monkeypatch)
    store = harvest(make_cfg(tiny, tmp_path / "s", tokens=500), progress=False)
    assert shard_bytes(store.path) == shard_bytes(ref.path)
    assert store.manifest["stats"] == ref.manifest["stats"]
    # only windows after the stored ones ran (plus at most one batch for alignment)
    assert seen["windows"] <= ref.num_windows - partial.num_windows + 4


def test_reuse_complete_store_does_no_lm_work(tiny, tmp_path, monkeypatch):
    import saelab.models.loading as loading

    first = harvest(make_cfg(tiny, tmp_path / "s", tokens=200), progress=False)

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(harvest_mod, "load_model", boom)
    again = harvest(make_cfg(tiny, tmp_path / "s", tokens=150), progress=False)
    assert again.num_rows == first.num_rows == 200
    assert shard_bytes(again.path) == shard_bytes(first.path)


def test_extending_equals_fresh(tiny, tmp_path):
    harvest(make_cfg(tiny, tmp_path / "s", tokens=150), progress=False)
    grown = harvest(make_cfg(tiny, tmp_path / "s", tokens=400), progress=False)
    fresh = harvest(make_cfg(tiny, tmp_path / "f", tokens=400), progress=False)
    assert grown.num_rows == 400
    assert shard_bytes(grown.path) == shard_bytes(fresh.path)


def test_corpus_runs_out(tiny, tmp_path):
    cfg = make_cfg(tiny, tmp_path / "s", tokens=10**7, shard_rows=2000, lm_batch_size=64)
    with pytest.warns(UserWarning, match="corpus ran out"):
        store = harvest(cfg, progress=False)
    assert store.complete and store.exhausted and 0 < store.num_rows < 10**7
    with pytest.warns(UserWarning, match="corpus ran out"):
        again = harvest(cfg, progress=False)
    assert again.num_rows == store.num_rows


def test_refuses_other_settings_and_foreign_folders(tiny, tmp_path):
    harvest(make_cfg(tiny, tmp_path / "s", tokens=100), progress=False)
    other = make_cfg(tiny, tmp_path / "s", tokens=100)
    other.model.hook = "blocks.0.hook_mlp_out"
    with pytest.raises(StoreError, match="other settings: hook="):
        harvest(other, progress=False)
    other = make_cfg(tiny, tmp_path / "s", tokens=100)
    other.data.context_size = 12
    with pytest.raises(StoreError, match="context_size=16"):
        harvest(other, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not an activation store"):
        harvest(make_cfg(tiny, tmp_path / "mine", tokens=100), progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert harvest(make_cfg(tiny, tmp_path / "empty", tokens=50), progress=False).complete


def test_damaged_complete_store_is_verified_and_repaired(tiny, tmp_path, monkeypatch):
    cfg = make_cfg(tiny, tmp_path / "s", tokens=400)
    ref = harvest(cfg, progress=False)
    good = shard_bytes(ref.path)
    victim = ref.path / ref.shards[2].file
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size, wrong bytes: only the checksum can tell
    victim.write_bytes(bytes(data))
    seen = count_lm_windows(monkeypatch)
    with pytest.warns(UserWarning, match="damaged shard.*shard_00002"):
        store = harvest(cfg, progress=False)
    assert shard_bytes(store.path) == good
    store.verify()
    # only the windows from the damaged shard on ran again (plus one batch for alignment)
    assert 0 < seen["windows"] <= ref.num_windows - ref.shards[2].window_start + 4


def _rows(store: ActivationStore) -> dict[tuple[int, int], torch.Tensor]:
    out = {}
    for i in range(len(store.shards)):
        t = store.read_shard(i)
        for w, p, a in zip(t["window"].tolist(), t["pos"].tolist(), t["acts"], strict=True):
            out[(w, p)] = a
    return out


HOOKS = ["blocks.2.hook_resid_post", "blocks.0.hook_mlp_out", "attn_out.1"]
LONG = ["blocks.2.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"]


@pytest.mark.parametrize("outliers", [0.0, 1.3])
def test_multi_hook_harvest_one_forward_aligned_rows(tiny, tmp_path, monkeypatch, outliers):
    def cfg_for(out, hooks):
        c = make_cfg(tiny, out, tokens=300, hooks=hooks)
        c.data.exclude_norm_outliers = outliers
        return c

    seen = count_lm_windows(monkeypatch)
    calls = []
    real = harvest_mod.run_to_hooks
    monkeypatch.setattr(harvest_mod, "run_to_hooks",
                        lambda m, ids, hooks: calls.append([h.name for h in hooks])
                        or real(m, ids, hooks))
    stores = harvest_hooks(cfg_for(tmp_path / "multi", HOOKS), progress=False)
    assert list(stores) == LONG
    # one forward per batch for all three hooks, in depth order (it stops at the deepest)
    assert calls and all(c == [LONG[1], LONG[2], LONG[0]] for c in calls)
    n_forward = seen["windows"]
    assert {s.path for s in stores.values()} == {tmp_path / "multi" / n for n in LONG}
    keys = [sorted(_rows(s)) for s in stores.values()]
    assert keys[0] == keys[1] == keys[2]  # rows align by (window, position)
    singles = {n: harvest(cfg_for(tmp_path / n, [n]), progress=False) for n in LONG}
    assert seen["windows"] > n_forward  # the single harvests forwarded again
    for n in LONG:
        multi, single = _rows(stores[n]), _rows(singles[n])
        if outliers == 0:
            assert sorted(multi) == sorted(single)
        else:  # a row survives only if it is no outlier at any hook (compared on the windows
            # every store holds whole: the 300-row budget ends each store at another window)
            last = min(s.num_windows for s in [*singles.values(), stores[n]]) - 1
            def whole(keys, last=last):
                return {k for k in keys if k[0] < last}

            expect = set.intersection(*(whole(_rows(s)) for s in singles.values()))
            assert whole(multi) == expect and len(expect) < len(whole(single))
        for key, a in multi.items():
            if key in single:
                assert torch.equal(a, single[key]), (n, key)
    if outliers:
        assert stores[LONG[0]].manifest["outlier_hooks"] == ",".join(LONG)
    # a rerun reuses every store without touching the LM
    before = seen["windows"]
    again = harvest_hooks(cfg_for(tmp_path / "multi", HOOKS), progress=False)
    assert seen["windows"] == before and list(again) == LONG
