"""Dark-matter analysis (docs/methods.md §12, §16.13): streamed least squares, the decomposition on
planted data, per-token scaling, cross-component maps, and the `saelab darkmatter` plug-in."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.analysis._dark_matter_core import (
    cross_maps,
    decompose,
    norm_baselines,
    power_law_fit,
    scaling_matrices,
)
from saelab.analysis._dark_matter_lstsq import NormalEquations, R2Accumulator

F64 = torch.float64


def test_streamed_normal_equations_match_torch_lstsq():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 20, generator=gen, dtype=F64) * torch.linspace(0.1, 10, 20, dtype=F64)
    Y = X @ torch.randn(20, 7, generator=gen, dtype=F64) + torch.randn(3000, 7, generator=gen,
                                                                        dtype=F64)
    ne = NormalEquations(20, 7)
    for a in range(0, 3000, 256):  # streamed in uneven batches, float32 inputs upcast
        ne.update(X[a:a + 256], Y[a:a + 256])
    got = ne.solve()
    want = torch.linalg.lstsq(X, Y, rcond=None, driver="gelsd").solution
    torch.testing.assert_close(got.A_KM, want, atol=1e-10, rtol=1e-9)
    assert float(got.b_M.abs().max()) == 0
    # with an intercept: the same as lstsq on [X, 1]
    got_i = ne.solve(intercept=True)
    want_i = torch.linalg.lstsq(torch.cat([X, torch.ones(3000, 1, dtype=F64)], 1), Y,
                                driver="gelsd").solution
    torch.testing.assert_close(got_i.A_KM, want_i[:-1], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_i.b_M, want_i[-1], atol=1e-10, rtol=1e-9)


def test_rank_deficient_regressors_give_the_min_norm_solution():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(500, 6, generator=gen, dtype=F64)
    X = torch.cat([a, a[:, :2] + a[:, 2:4]], 1)  # two exactly dependent columns
    Y = torch.randn(500, 3, generator=gen, dtype=F64)
    ne = NormalEquations(8, 3)
    ne.update(X, Y)
    want = torch.linalg.pinv(X) @ Y
    torch.testing.assert_close(ne.solve().A_KM, want, atol=1e-8, rtol=1e-7)


def test_r2_accumulator_against_direct_formula():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(1000, 5, generator=gen, dtype=F64) * 3 + 100  # offset: no cancellation
    p = y + torch.randn(1000, 5, generator=gen, dtype=F64)
    acc = R2Accumulator()
    for a in range(0, 1000, 300):
        acc.update(y[a:a + 300], p[a:a + 300])
    per = 1 - ((y - p) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    assert math.isclose(acc.mean(), float(per.mean()), rel_tol=1e-10)
    pooled = 1 - ((y - p) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert math.isclose(acc.pooled(), float(pooled), rel_tol=1e-10)


def _planted(n: int, d: int, kind: str, seed: int = 0):
    """Rows and a reconstruction function whose error is exactly linear in x, or independent
    noise, or zero on a planted sparse part."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.5, 2, d)
    A = torch.randn(d, d, generator=gen) * 0.1
    noise = torch.randn(n, d, generator=gen) * 0.3

    if kind == "linear":  # x̂ = x − x A: e = x A exactly
        def fn(xb):
            return xb - xb @ A, torch.full((xb.shape[0],), 3)
    else:  # x̂ = x − noise(row): e independent of x; look rows up by content
        lookup = {tuple(x[i, :2].tolist()): i for i in range(n)}

        def fn(xb):
            idx = torch.tensor([lookup[tuple(r[:2].tolist())] for r in xb])
            return xb - noise[idx].to(xb.dtype), torch.full((xb.shape[0],), 3)
    return x, fn, A


def test_decomposition_identity_and_linear_error_recovered_exactly():
    x, fn, A = _planted(2000, 16, "linear")
    dec = decompose(x, 1000, fn, chunk_rows=300)
    m = dec.metrics
    assert m["identity_max_rel_error"] < 1e-12
    assert m["r2_error_vector"] > 1 - 1e-6
    assert m["fvu_nonlinear"] < 1e-8
    torch.testing.assert_close(dec.error_map.A_KM.float(), A, atol=1e-4, rtol=1e-4)
    # FVU of x̂ and its split: total = linear + nonlinear, total equals the direct formula
    xe, e = x[1000:].double(), (x[1000:] @ A).double()
    direct = float((e ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum())
    assert math.isclose(m["fvu"], direct, rel_tol=1e-6)
    assert math.isclose(m["fvu_linear"] + m["fvu_nonlinear"], m["fvu"], rel_tol=1e-12)
    # the parts add back to x exactly for fresh rows too
    p = dec.parts(x[:5].double(), fn(x[:5])[0].double())
    torch.testing.assert_close(p["x_hat"] + p["e_lin"] + p["e_nl"], x[:5].double())


def test_independent_noise_error_is_not_linearly_predictable_held_out():
    x, fn, _ = _planted(4000, 16, "noise")
    dec = decompose(x, 2000, fn)
    m = dec.metrics
    assert abs(m["r2_error_vector"]) < 0.03  # ≈ 0 held out (fit R² is > 0 by overfitting)
    assert m["fvu_nonlinear"] / m["fvu"] > 0.97
    assert m["identity_max_rel_error"] < 1e-12


def test_squared_norm_r2_and_baselines_on_planted_norms():
    gen = torch.Generator().manual_seed(3)
    n, d = 4000, 8
    tokens = torch.randint(0, 5, (n,), generator=gen)
    u = torch.rand(d, generator=gen) + 0.1
    x_pos = torch.rand(n, d, generator=gen) + 0.5  # positive rows: x·u > 0

    def make(f):
        def fn(xb):  # error along a fixed direction with ‖e‖² = f(x)
            return xb - f(xb).sqrt()[:, None] * torch.eye(d)[0], torch.ones(xb.shape[0])
        return fn
    lin = decompose(x_pos, n // 2, make(lambda xb: xb @ u))  # ‖e‖² exactly linear in x
    assert lin.metrics["r2_error_sq_norm"] > 1 - 1e-5
    torch.testing.assert_close(lin.scalars["err_sq"], (x_pos @ u).double(), atol=1e-4, rtol=1e-5)
    x = torch.randn(n, d, generator=gen)
    nonlin = decompose(x, n // 2, make(lambda xb: (xb @ u).abs() + 1.0), intercept=True)
    assert nonlin.metrics["r2_error_sq_norm"] < 0.9  # |x·u| is not linear in x
    base = norm_baselines(nonlin, tokens, n // 2)
    assert abs(base["r2_error_sq_norm_from_token_id"]) < 0.02  # tokens carry no signal
    assert -0.02 < base["r2_error_sq_norm_from_l0"] <= 1e-12  # L0 is constant: the mean only
    # ‖x‖ carries part of |x·u|: a positive held-out R² below the perfect one
    assert 0.05 < base["r2_error_sq_norm_from_act_norm"] < 0.9


def test_scaling_matrix_same_tokens_vs_independent():
    gen = torch.Generator().manual_seed(4)
    n, d = 3000, 8
    x = torch.randn(n, d, generator=gen)
    hard = torch.rand(n, generator=gen) * 2  # per-token difficulty shared by both "SAEs"
    other = torch.rand(n, generator=gen) * 2
    dirs = torch.randn(3, d, generator=gen)

    def make(h, j):
        lookup = {tuple(x[i, :2].tolist()): i for i in range(n)}

        def fn(xb):
            idx = torch.tensor([lookup[tuple(r[:2].tolist())] for r in xb])
            return xb - h[idx, None] * dirs[j], torch.ones(xb.shape[0])
        return fn
    decs = [decompose(x, n // 2, make(hard, 0)), decompose(x, n // 2, make(hard * 0.5, 1)),
            decompose(x, n // 2, make(other, 2))]
    mats = scaling_matrices(decs, n // 2)
    assert mats["r2"][0][1] > 0.999  # same hard tokens: perfectly predictable
    assert abs(mats["r2"][0][2]) < 0.02  # independent difficulty: not predictable
    assert mats["r2"][2][2] > 0.999


def test_power_law_fit_recovers_planted_constants():
    w = [256, 512, 1024, 2048, 4096]
    y = [0.05 + 3.0 * v ** -0.6 for v in w]
    fit = power_law_fit(w, y)
    assert abs(fit["m"] - 0.6) < 0.01 and abs(fit["c"] - 0.05) < 0.003
    assert power_law_fit(w[:2], y[:2]) == {}


def test_cross_maps_find_a_planted_upstream_source():
    gen = torch.Generator().manual_seed(5)
    n, d = 4000, 6
    x = torch.randn(n, d, generator=gen)
    src = torch.randn(n, d, generator=gen)  # an "earlier layer"
    B = torch.randn(d, d, generator=gen)
    lookup = {tuple(x[i, :2].tolist()): i for i in range(n)}

    def tgt_fn(xb):  # target error = src B: nonlinear in x, linear in the source's x̂
        idx = torch.tensor([lookup[tuple(r[:2].tolist())] for r in xb])
        return xb - src[idx].to(xb.dtype) @ B.to(xb.dtype), torch.ones(xb.shape[0])

    def src_fn(xb):  # source SAE reconstructs perfectly: x̂' = x'
        return xb.clone(), torch.ones(xb.shape[0])
    t_dec = decompose(x, n // 2, tgt_fn)
    s_dec = decompose(src, n // 2, src_fn)
    out = cross_maps(x, n // 2, (tgt_fn, t_dec), {"self": (x, tgt_fn, t_dec),
                                                   "prev": (src, src_fn, s_dec)})
    assert out["prev"]["x_hat"]["e_nl"]["r2"] > 0.99
    assert out["prev"]["x_hat"]["e_nl"]["reduction"] > 0.99
    assert abs(out["self"]["x"]["e_nl"]["r2"]) < 0.02


# ---- the plug-in end to end on a tiny synthetic store ----------------------------------------
def _store(path, hook: str, d: int, seed: int):
    """A held-out store of 40 windows x 32 positions (position 0 dropped) of sparse codes on a
    random dictionary plus noise; stores with the same layout align by (window, position)."""
    from saelab.data.store import StoreSpec, StoreWriter

    T, n_windows = 32, 40
    spec = StoreSpec(model="tiny", hook=hook, d_in=d, context_size=T, split="eval",
                     exclude_first_positions=1)
    w = StoreWriter(path, spec, shard_rows=300)
    g = torch.Generator().manual_seed(seed)
    dict_FD = torch.randn(64, d, generator=g)
    for _ in range(0, n_windows, 8):
        keep = torch.ones(8, T, dtype=torch.bool)
        keep[:, 0] = False
        n = int(keep.sum())
        codes = (torch.rand(n, 64, generator=g) < 0.06) * torch.rand(n, 64, generator=g) * 3
        acts = codes @ dict_FD + 0.1 * torch.randn(n, d, generator=g)
        w.add(torch.randint(3, 50, (8, T), generator=g), keep, acts)
    return w.finish()


def _sae_folder(path, d: int, width: int, k: int, seed: int, hook: str):
    from saelab.config import SAEConfig
    from saelab.io import save_sae
    from saelab.saes.registry import build_sae

    cfg = SAEConfig(architecture="topk", d_in=d, d_sae=width, options={"k": k})
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(seed))
    sae.init_from_data(torch.randn(256, d, generator=torch.Generator().manual_seed(seed)))
    return save_sae(sae, path, metadata={"hook_name": hook, "model_name": "tiny",
                                         "context_size": 32})


@pytest.mark.usefixtures("one_thread")
def test_darkmatter_plugin_end_to_end(tmp_path, monkeypatch):
    from saelab.analysis.dark_matter import DarkMatterConfig, run_darkmatter

    d = 16
    store = _store(tmp_path / "st", "blocks.1.hook_resid_post", d, 0)
    prev = _store(tmp_path / "prev", "blocks.0.hook_resid_post", d, 1)
    runs = [_sae_folder(tmp_path / f"sae{w}", d, w, 4, w, "blocks.1.hook_resid_post")
            for w in (64, 16, 32)]
    prev_sae = _sae_folder(tmp_path / "prev_sae", d, 32, 4, 7, "blocks.0.hook_resid_post")
    cfg = DarkMatterConfig(tokens=1000, store=str(store.path), device="cpu", ce_windows=0,
                           parts_tokens=1024, batch_size=256, gp_tokens=300, chunk_rows=300,
                           prev_layer_run=str(prev_sae),
                           source_stores=[f"prev_layer={prev.path}"])
    res = run_darkmatter(cfg, runs, tmp_path / "out", progress=False, log=lambda *_: None)
    r = res.results
    assert r["n_rows"] == 1000 and r["n_fit"] == 500
    dm = r["decomposition"]
    assert dm["identity_max_rel_error"] < 1e-10
    assert 0 <= dm["fvu_nonlinear"] <= dm["fvu"] + 0.05
    assert r["scaling"]["widths"] == [16.0, 32.0, 64.0]
    assert len(r["scaling"]["r2"]) == 3 and r["scaling"]["r2"][1][1] > 0.999  # i == j
    assert set(r["trained_on_parts"]) >= {"fvu_e_lin", "fvu_e_nl", "fvu_x"}
    assert r["gradient_pursuit"]["gp"]["l0"] <= r["gradient_pursuit"]["sae"]["l0"] + 1e-9
    assert set(r["component_maps"]["r2"]) == {"self", "prev_layer"}
    on_disk = json.loads((tmp_path / "out" / "darkmatter.json").read_text())
    assert on_disk["claims"] and len(on_disk["claims"]) == len(res.claims)
    assert all(c["ours"] != "not run" for c in res.claims if not c["claim"].startswith("(c)"))
    for f in ("error_norm_prediction.png", "per_token_scaling.png", "fvu_vs_width.png",
              "gradient_pursuit.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    # a rerun with the same config reuses the finished parts 3-6 instead of recomputing them
    import saelab.analysis.dark_matter as dm

    def boom(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(dm, "train_topk", boom)
    again = run_darkmatter(cfg, runs, tmp_path / "out", progress=False, log=lambda *_: None)
    assert again.results["trained_on_parts"] == json.loads(json.dumps(r["trained_on_parts"]))
    with pytest.raises(AssertionError, match="trained again"):  # another config: recomputed
        run_darkmatter(DarkMatterConfig(**{**cfg.__dict__, "seed": 1}), runs, tmp_path / "out",
                       progress=False, log=lambda *_: None)


@pytest.mark.usefixtures("one_thread")
def test_darkmatter_cli_with_widths_and_errors(tmp_path, capsys):
    from saelab.cli import main

    d = 16
    store = _store(tmp_path / "st", "blocks.1.hook_resid_post", d, 0)
    run = _sae_folder(tmp_path / "sae", d, 32, 4, 0, "blocks.1.hook_resid_post")
    args = ["darkmatter", str(run), "--out", str(tmp_path / "out"), "--store", str(store.path),
            "--tokens", "800", "--device", "cpu", "--ce-windows", "0", "--parts-tokens", "0",
            "--gp-tokens", "0", "--widths", "16,32,64", "--widths-tokens", "1024",
            "--batch-size", "256", "--train-store", str(store.path), "--no-plots", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(a) R² of the error vector" in printed and "(b) per-token" in printed
    r = json.loads((tmp_path / "out" / "darkmatter.json").read_text())["results"]
    assert r["scaling"]["widths"] == [16.0, 32.0, 64.0]
    assert len(list((tmp_path / "out" / "widths").iterdir())) == 3
    assert main(["darkmatter", str(run), "--out", str(tmp_path / "o2"), "--widths", "a,b"]) == 2
    assert "--widths" in capsys.readouterr().err
    assert main(["darkmatter", str(tmp_path), "--out", str(tmp_path / "o3")]) == 2
