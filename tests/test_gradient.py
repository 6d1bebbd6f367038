"""g-SAE (docs/methods.md §7) end to end: gradient harvest, (x, g) stream, selection rule, training,
pipeline with the gradient splice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from saelab.config import (
    DataConfig,
    EvalConfig,
    HarvestConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainConfig,
)
from saelab.data import store as store_mod
from saelab.data.store import ActivationStore, StoreSpec, StoreWriter
from saelab.data.stream import ActivationStream
from saelab.errors import ConfigError, NonFiniteActivationError, StoreError
from saelab.harvest import harvest
from saelab.saes.registry import build_sae

T = 16
HOOK = "blocks.1.hook_resid_post"


# ---- helpers ---------------------------------------------------------------------------------
def harvest_cfg(tiny, out: Path, tokens: int, with_grads: bool = True, **data_kw) -> HarvestConfig:
    lm, corpus = tiny
    return HarvestConfig(
        model=ModelConfig(model=str(lm), hook=HOOK, device="cpu", model_dtype="float32"),
        data=DataConfig(dataset=str(corpus), context_size=T, exclude_first_positions=1,
                        **data_kw),
        store=str(out), tokens=tokens, shard_rows=70, lm_batch_size=4, with_grads=with_grads)


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard_*.safetensors"))}


def all_rows(store: ActivationStore, key: str) -> torch.Tensor:
    return torch.cat([store.read_shard(i)[key] for i in range(len(store.shards))])


def direct_grad(model, ids_T: torch.Tensor, keep_T: torch.Tensor) -> torch.Tensor:
    """d(summed next-token CE over kept positions)/d(hook activation), by adding a zero
    perturbation at the hook: independent of saelab's hook-leaf implementation."""
    from saelab.models.hooks import hook_module

    delta = torch.zeros(1, T, model.config.hidden_size, requires_grad=True)

    def add(_m, _a, out):
        a = out[0] if isinstance(out, tuple) else out
        return (a + delta, *out[1:]) if isinstance(out, tuple) else a + delta

    handle = hook_module(model, HOOK).register_forward_hook(add)
    try:
        logits = model(input_ids=ids_T[None], use_cache=False).logits[0]
    finally:
        handle.remove()
    score = keep_T[:-1]
    loss = torch.nn.functional.cross_entropy(logits[:-1][score], ids_T[1:][score], reduction="sum")
    (g,) = torch.autograd.grad(loss, delta)
    return g[0]


def gsae(beta=1.0, grad_norm="batch_mean_l2", d_in=16, d_sae=64, k=4, seed=0, **kw):
    cfg = SAEConfig(architecture="gsae", d_in=d_in, d_sae=d_sae,
                    options={"k": k, "beta": beta, "grad_norm": grad_norm}, **kw)
    return build_sae(cfg, generator=torch.Generator().manual_seed(seed))


def xg(n=32, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 0.5, torch.randn(n, d, generator=g) * 0.01


# ---- harvest ---------------------------------------------------------------------------------
def test_harvested_grads_equal_autograd(tiny, tmp_path):
    from saelab.data.windows import keep_mask
    from saelab.models.loading import load_model

    cfg = harvest_cfg(tiny, tmp_path / "g", tokens=150, exclude_norm_outliers=0.0)
    store = harvest(cfg, progress=False)
    assert store.has_grads and store.manifest["with_grads"] is True
    store.verify()
    plain = harvest(harvest_cfg(tiny, tmp_path / "p", tokens=150, with_grads=False,
                                exclude_norm_outliers=0.0), progress=False)
    assert not plain.has_grads and "grads" not in plain.read_shard(0)
    # the same rows as a harvest without grads
    torch.testing.assert_close(all_rows(store, "acts"), all_rows(plain, "acts"), rtol=0, atol=1e-6)
    grads, pos = all_rows(store, "grads"), all_rows(store, "pos").long()
    assert grads.shape == (150, 64) and grads.dtype == torch.float32
    # the last position scores nothing and nothing depends on it: exactly zero
    assert torch.all(grads[pos == T - 1] == 0) and grads[pos < T - 1].abs().sum(1).min() > 0

    lm = load_model(cfg.model)
    s0 = store.read_shard(0)
    for r in (0, 7, 40, 69):
        w = int(s0["window"][r]) - store.shards[0].window_start
        ids_T = s0["windows"][w].long()
        keep_T = keep_mask(ids_T[None], lm.tokenizer, 1, True)[0]
        g_TD = direct_grad(lm.model, ids_T, keep_T)
        torch.testing.assert_close(s0["grads"][r], g_TD[int(s0["pos"][r])], rtol=1e-4, atol=1e-6)


def test_grads_store_resumes_and_reuse_rules(tiny, tmp_path, monkeypatch):
    import saelab.models.loading as loading

    ref = harvest(harvest_cfg(tiny, tmp_path / "ref", tokens=200), progress=False)
    real = store_mod.atomic_write_bytes
    calls = {"n": 0}

    def crash_on_third_shard(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        harvest(harvest_cfg(tiny, tmp_path / "s", tokens=200), progress=False)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real)
    assert len(ActivationStore.open(tmp_path / "s").shards) == 2

    # a request without grads continues the store with grads (a superset), bit-identically
    store = harvest(harvest_cfg(tiny, tmp_path / "s", tokens=200, with_grads=False),
                    progress=False)
    assert store.has_grads and shard_bytes(store.path) == shard_bytes(ref.path)
    store.verify()

    # a complete store with grads is reused for a request without, with no LM work
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    again = harvest(harvest_cfg(tiny, tmp_path / "s", tokens=150, with_grads=False),
                    progress=False)
    assert again.has_grads and again.num_rows == 200
    monkeypatch.undo()

    # a store without grads is refused for a request with them
    harvest(harvest_cfg(tiny, tmp_path / "p", tokens=50, with_grads=False), progress=False)
    with pytest.raises(StoreError, match="no LM-loss gradients"):
        harvest(harvest_cfg(tiny, tmp_path / "p", tokens=50), progress=False)


SPEC = StoreSpec(model="m", hook="blocks.0.hook_resid_post", d_in=6, context_size=T,
                 exclude_first_positions=1, with_grads=True)


def write_grad_store(path: Path, n_windows: int = 60, shard_rows: int = 50) -> ActivationStore:
    """Rows with column 0 = unique id; grads = 3 * acts + 1 (so alignment is checkable)."""
    w = StoreWriter(path, SPEC, shard_rows=shard_rows)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n_windows, 6):
        n = min(6, n_windows - start)
        keep = torch.rand(n, T, generator=g) > 0.2
        keep[:, 0] = False
        w_idx, p_idx = keep.nonzero(as_tuple=True)
        acts = torch.randn(len(w_idx), 6, generator=g)
        acts[:, 0] = ((start + w_idx) * T + p_idx).float()
        w.add(torch.randint(0, 50, (n, T), generator=g), keep, acts, 3 * acts + 1)
    return w.finish()


def test_writer_checks_grads(tmp_path):
    w = StoreWriter(tmp_path / "s", SPEC, shard_rows=50)
    keep = torch.ones(1, T, dtype=torch.bool)
    acts = torch.randn(T, 6)
    with pytest.raises(ValueError, match="needs grads"):
        w.add(torch.zeros(1, T, dtype=torch.long), keep, acts)
    bad = torch.zeros(T, 6)
    bad[3, 2] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="gradient in window 0 at position 3"):
        w.add(torch.zeros(1, T, dtype=torch.long), keep, acts, bad)


def test_nan_grads_on_read_name_shard(tmp_path):
    import hashlib

    from safetensors.torch import load_file, save

    store = write_grad_store(tmp_path / "s")
    t = load_file(store.path / store.shards[1].file)
    t["grads"][5, 1] = float("inf")
    data = save(t)
    (store.path / store.shards[1].file).write_bytes(data)
    m = json.loads((store.path / "manifest.json").read_text())
    m["shards"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NonFiniteActivationError, match=r"shard_00001.* gradients at row 5"):
        ActivationStore.open(store.path).verify()


# ---- stream ----------------------------------------------------------------------------------
def test_stream_yields_aligned_pairs(tmp_path):
    store = write_grad_store(tmp_path / "s")
    kw = {"batch_size": 37, "buffer_rows": 100, "seed": 3, "drop_positions_below": 2}
    with_g = ActivationStream(store, with_grads=True, **kw)
    plain = ActivationStream(store, **kw)
    n = int(2 * with_g.batches_per_epoch) + 1  # crosses an epoch boundary
    it_g, it_p = iter(with_g), iter(plain)
    for _ in range(n):
        x, g = next(it_g)
        assert torch.equal(x, next(it_p))  # the same rows in the same order
        assert torch.equal(g, 3 * x + 1)  # each row's own gradient
    # resuming mid-stream gives the same pairs
    resumed = ActivationStream(store, with_grads=True, start_batch=5, **kw)
    fresh = iter(ActivationStream(store, with_grads=True, **kw))
    ref = [next(fresh) for _ in range(6)][-1]
    got = next(iter(resumed))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_stream_without_grads_in_store_is_a_clear_error(tmp_path):
    spec = StoreSpec(model="m", hook="blocks.0.hook_resid_post", d_in=6, context_size=T)
    w = StoreWriter(tmp_path / "s", spec, shard_rows=50)
    w.add(torch.zeros(2, T, dtype=torch.long), torch.ones(2, T, dtype=torch.bool),
          torch.randn(2 * T, 6))
    store = w.finish()
    with pytest.raises(StoreError, match="saelab harvest --with-grads"):
        ActivationStream(store, 8, 100, with_grads=True)


# ---- the SAE ---------------------------------------------------------------------------------
def test_beta_zero_is_topk_exactly():
    sae = gsae(beta=0.0)
    topk = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=64),
                     generator=torch.Generator().manual_seed(0))
    topk.cfg.options.k = 4
    topk.load_state_dict(sae.state_dict())
    x, g = xg()
    assert torch.equal(sae.encode(x, grad=g), topk.encode(x))
    assert torch.equal(sae.encode(x), topk.encode(x))
    a, b = sae.loss(x, 0, grad_BD=g), topk.loss(x, 0)
    assert torch.equal(a.total, b.total) and torch.equal(a.recon, b.recon)


@pytest.mark.parametrize("grad_norm", ["none", "per_token_l2", "batch_mean_l2"])
def test_selection_follows_score_values_from_z(grad_norm):
    sae = gsae(beta=50.0, grad_norm=grad_norm)
    x, g = xg()
    g = g * 100  # |ĝ W_decᵀ| matters for every normalisation
    with torch.no_grad():
        z = torch.relu(sae.pre_acts(x))
        gh = {"none": g, "per_token_l2": g / g.norm(dim=1, keepdim=True),
              "batch_mean_l2": g / g.norm(dim=1).mean()}[grad_norm]
        s = z + 50.0 * z * (gh @ sae.W_dec.T).abs()
        f = sae.encode(x, grad=g)
    want = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(4, dim=1).indices, True)
    assert torch.equal(f != 0, want)  # the k best scores (all z > 0 here)
    assert torch.equal(f[want], z[want])  # values from z, not from s
    assert (f != 0).sum(1).max() == 4
    assert not torch.equal(f != 0, sae.encode(x) != 0)  # the gradient changed the choice


def test_gradients_do_not_flow_through_the_score():
    sae = gsae(beta=20.0)
    x, g = xg()
    g = g.clone().requires_grad_(True)
    out = sae.loss(x, 0, grad_BD=g)
    out.total.backward()
    assert g.grad is None
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    # the same loss with the selected indices frozen: identical gradients
    sae.zero_grad()
    with torch.no_grad():
        idx = sae.select_with_grad(sae.pre_acts(x), g).idx
    pre = sae.pre_acts(x)
    recon = torch.nn.functional.embedding_bag(idx, sae.W_dec, per_sample_weights=torch.relu(
        pre.gather(1, idx)), mode="sum") + sae.b_dec
    var = (x - x.mean(0)).pow(2).sum()
    ((recon - x).pow(2).sum() / var).backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_grad_norm_invariances_and_folding():
    x, g = xg()
    row_scale = torch.rand(32, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    sae = gsae(beta=30.0, grad_norm="per_token_l2")
    assert torch.equal(sae.encode(x, grad=g) != 0, sae.encode(x, grad=g * row_scale) != 0)
    sae = gsae(beta=30.0, grad_norm="batch_mean_l2")
    assert torch.equal(sae.encode(x, grad=g) != 0, sae.encode(x, grad=g * 7.0) != 0)
    for mode in ("none", "per_token_l2", "batch_mean_l2"):
        sae = gsae(beta=30.0 if mode != "none" else 3000.0, grad_norm=mode)
        c = 2.5
        with torch.no_grad():
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(2))
            sae.b_enc.normal_(generator=torch.Generator().manual_seed(3))
            trained = sae.encode(c * x, grad=g / c)  # what the trainer feeds
            sae.fold_input_scale(c)
            raw = sae.encode(x, grad=g)
        assert torch.equal(raw != 0, trained != 0), mode
        torch.testing.assert_close(raw * c, trained, rtol=1e-5, atol=1e-5)


def test_loss_needs_grads_and_checks_options():
    sae = gsae()
    with pytest.raises(ConfigError, match="--with-grads"):
        sae.loss(xg()[0], 0)
    with pytest.raises(ConfigError, match="gsae-beta"):
        gsae(beta=-1.0)


def test_save_load_keeps_gradient_encode(tmp_path):
    from saelab.io import load_sae, read_metadata, save_sae

    sae = gsae(beta=10.0)
    save_sae(sae, tmp_path / "sae")
    assert read_metadata(tmp_path / "sae")["architecture"] == "topk"  # SAELens opens it as TopK
    loaded = load_sae(tmp_path / "sae")
    x, g = xg()
    assert loaded.architecture == "gsae" and loaded.cfg == sae.cfg
    assert torch.equal(loaded.encode(x, grad=g), sae.encode(x, grad=g))


def test_trainer_on_x_g_batches_lowers_the_loss(tmp_path):
    from saelab.train.trainer import Trainer

    D, B = 12, 64
    dirs = torch.nn.functional.normalize(torch.randn(30, D, generator=torch.Generator()
                                                     .manual_seed(9)), dim=1)

    def batches():
        i = 0
        while True:
            gen = torch.Generator().manual_seed(i)
            codes = torch.rand(B, 30, generator=gen) * (torch.rand(B, 30, generator=gen) < 0.1)
            x = codes @ dirs + 0.01 * torch.randn(B, D, generator=gen)
            yield x, torch.randn(B, D, generator=gen)
            i += 1

    sae = gsae(d_in=D, d_sae=40, k=4)
    cfg = TrainConfig(tokens=B * 40, batch_size=B, lr=3e-3, log_every=5, checkpoint_every=0,
                      lr_warmup_steps=3)
    Trainer(sae, cfg, run_dir=tmp_path, input_scale=2.0, progress=False).fit(batches())
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"] and recs[-1]["l0"] <= 4
    with pytest.raises(ConfigError, match="--with-grads"):
        Trainer(gsae(d_in=D, d_sae=40, k=4), cfg, progress=False).fit(b[0] for b in batches())


# ---- pipeline --------------------------------------------------------------------------------
def run_cfg(tiny, out: Path, **kw) -> RunConfig:
    lm, corpus = tiny
    cfg = RunConfig(
        model=ModelConfig(model=str(lm), hook=HOOK, device="cpu", model_dtype="float32"),
        data=DataConfig(dataset=str(corpus), context_size=T),
        sae=SAEConfig(architecture="gsae", d_sae=64),
        train=TrainConfig(tokens=512, batch_size=128, checkpoint_every=0, log_every=2),
        eval=EvalConfig(eval_tokens=200, ce_windows=2),
        out=str(out), **kw)
    cfg.sae.options = {"k": 4}
    return cfg


def test_pipeline_gsae_end_to_end(tiny, tmp_path, monkeypatch):
    import saelab
    import saelab.evals.evaluate as ev
    from saelab.pipeline import train_run

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    splices = {"n": 0}
    real = ev._grad_splice_fn

    def counting(*a, **k):
        splices["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ev, "_grad_splice_fn", counting)
    summary = train_run(run_cfg(tiny, tmp_path / "run"), progress=False, log=lambda *_: None)
    store = ActivationStore.open(summary.store_path)
    assert store.has_grads and "-grads-" in store.path.name
    assert splices["n"] >= 1  # the CE splice used the gradient selection
    m = summary.metrics
    for key in ("fvu", "l0", "ce_loss_recovered", "kl_score"):
        assert math.isfinite(m[key]), key  # NaN or inf fails (m[key] == m[key] let inf by)
    assert 0 < m["l0"] <= 4  # k = 4: the gradient selection keeps at most k per token
    assert m["fvu"] > 0 and m["kl_score"] <= 1 + 1e-6  # KL with the SAE is >= 0
    assert m["ce_loss_zero_ablation"] != m["ce_loss_clean"]  # the splice really changed the LM
    sae = saelab.load_sae(tmp_path / "run")
    assert sae.architecture == "gsae"

    # a user store without grads: one clear error naming the fix
    plain = harvest(harvest_cfg(tiny, tmp_path / "plain", tokens=200, with_grads=False),
                    progress=False)
    with pytest.raises(StoreError, match="saelab harvest --with-grads"):
        train_run(run_cfg(tiny, tmp_path / "run2", store=str(plain.path)), progress=False,
                  log=lambda *_: None)


def test_cli_refuses_store_without_grads(tiny, tmp_path, capsys):
    from saelab.cli import main

    lm, corpus = tiny
    plain = harvest(harvest_cfg(tiny, tmp_path / "plain", tokens=100, with_grads=False),
                    progress=False)
    code = main(["train", "--arch", "gsae", "--model", str(lm), "--dataset", str(corpus),
                 "--hook", HOOK, "--device", "cpu", "--context-size", "16", "--d-sae", "32",
                 "--k", "4", "--store", str(plain.path), "--quiet",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "saelab harvest --with-grads" in err and len(err.splitlines()) == 1

