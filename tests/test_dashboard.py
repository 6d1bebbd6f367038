"""Dashboard collection against naive float64 loops on planted rows."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.report.dashboard import (
    DashboardConfig,
    DashboardMeta,
    TensorRows,
    TokenText,
    _SideCollector,
    collect,
    feature_json,
    latent_records,
    logit_lens,
    parse_latents,
)

W, T, D, F = 12, 16, 8, 24


def _planted(signed: bool, seed: int = 0):
    """Windows of T tokens; every position but 0 is a stored row (as the harvest drops BOS)."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 50, (W, T), generator=g)
    win = torch.arange(W).repeat_interleave(T - 1)
    pos = torch.arange(1, T).repeat(W)
    x = torch.randn(len(win), D, generator=g, dtype=torch.float64)
    enc = torch.randn(D, F, generator=g, dtype=torch.float64)
    bias = -1.0

    def encode64(x_BD):
        pre = x_BD.double() @ enc
        if signed:  # soft threshold keeps the sign: a code with both poles
            return torch.sign(pre) * torch.relu(pre.abs() + bias)
        return torch.relu(pre + bias)

    return TensorRows(x.float(), win, pos, windows), x, encode64


def _naive_bin(v: float, edge: float, n: int) -> int:
    return min(n - 1, max(0, math.ceil(v / edge * n) - 1))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("batch_rows", [7, 4096])
def test_collect_matches_naive_loops(signed, batch_rows):
    src, x64, encode64 = _planted(signed)
    cfg = DashboardConfig(latents="all", top_k=5, context=3, n_bins=4, per_bin=3, hist_bins=6,
                          batch_rows=batch_rows, seed=1)
    data = collect(lambda x: encode64(x).float(), F, src, cfg)
    f64 = encode64(x64)  # [N, F], float64 reference
    N = f64.shape[0]
    assert data.signed == signed and data.n_rows == N
    row_of = {(int(w), int(p)): r for r, (w, p) in enumerate(zip(src.window_N, src.pos_N,
                                                                  strict=True))}
    for li in range(F):
        col = f64[:, li]
        assert data.density[li].item() == pytest.approx((col != 0).double().mean().item())
        assert data.max_act[li].item() == pytest.approx(max(col.max().item(), 0.0), rel=1e-5)
        assert data.min_act[li].item() == pytest.approx(min(col.min().item(), 0.0), rel=1e-5)
        for side in data.sides:
            s = side.sign
            sv = s * col
            firing = [r for r in range(N) if sv[r] > 0]
            # top examples: the k largest of s*f, in order
            want = sorted(firing, key=lambda r: -sv[r].item())[:cfg.top_k]
            got = [r for r in side.top.rows[li].tolist() if r >= 0]
            assert got == want
            assert torch.allclose(side.top.vals[li, :len(got)].double(), col[want], rtol=1e-5)
            # histogram and bins: naive bucket loops in float64
            ext = sv.max().item() if firing else 1.0
            hist = [0] * cfg.hist_bins
            members: dict[int, set[int]] = {j: set() for j in range(cfg.n_bins)}
            for r in firing:
                hist[_naive_bin(sv[r].item(), ext, cfg.hist_bins)] += 1
                members[_naive_bin(sv[r].item(), ext, cfg.n_bins)].add(r)
            assert side.hist_counts[li].tolist() == hist
            assert side.bin_counts[li].tolist() == [len(members[j]) for j in range(cfg.n_bins)]
            slots = side.bins.rows[li].view(cfg.n_bins, cfg.per_bin)
            for j in range(cfg.n_bins):
                picked = [r for r in slots[j].tolist() if r >= 0]
                assert len(picked) == len(set(picked)) == min(cfg.per_bin, len(members[j]))
                assert set(picked) <= members[j]
            # contexts: the window's tokens and the latent's value at each stored neighbour
            for es in (side.top, side.bins):
                for e, r in enumerate(es.rows[li].tolist()):
                    if r < 0:
                        continue
                    w, p = int(src.window_N[r]), int(src.pos_N[r])
                    for j, q in enumerate(range(p - cfg.context, p + cfg.context + 1)):
                        tok, val = int(es.ctx_tokens[li, e, j]), float(es.ctx_vals[li, e, j])
                        if not 0 <= q < T:
                            assert tok == -1 and val == 0.0
                            continue
                        assert tok == int(src.windows_WT[w, q])
                        ref = f64[row_of[(w, q)], li].item() if (w, q) in row_of else 0.0
                        assert val == pytest.approx(ref, rel=1e-5, abs=1e-5)
                    assert float(es.vals[li, e]) == pytest.approx(col[r].item(), rel=1e-5, abs=1e-5)


def test_bin_sampling_is_uniform_over_chunks():
    """Each of 40 members of one bin, spread over 4 chunks, is picked 4/40 of the time."""
    n, per, trials = 40, 4, 400
    cfg = DashboardConfig(top_k=1, n_bins=1, per_bin=per, hist_bins=1)
    counts = torch.zeros(n)
    for seed in range(trials):
        side = _SideCollector(1, torch.tensor([2.0]), cfg, "cpu")
        gen = torch.Generator().manual_seed(seed)
        for c in range(4):
            rows = torch.arange(c * 10, c * 10 + 10)
            side.update(torch.full((10, 1), 1.0), rows, gen)
        picked = side.finish().bins.rows[0]
        assert len(set(picked.tolist())) == per
        counts[picked] += 1
    freq = counts / trials
    assert (freq - per / n).abs().max() < 0.07, freq


def test_parse_latents():
    assert parse_latents("0-3,7, 5", 10).tolist() == [0, 1, 2, 3, 5, 7]
    dens = torch.tensor([0.1, 0.5, 0.0, 0.5, 0.9])
    assert parse_latents("top:3", 5, dens).tolist() == [1, 3, 4]
    a, b = parse_latents("random:3", 100, seed=4), parse_latents("random:3", 100, seed=4)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3
    assert parse_latents("all", 4).tolist() == [0, 1, 2, 3]
    for bad in ("0-10", "x", "top:0", "5-2"):
        with pytest.raises(ConfigError):
            parse_latents(bad, 10, dens)


class _StubLM(torch.nn.Module):
    """The two pieces the logit lens reads: a final RMSNorm weight and an unembedding."""

    def __init__(self, g, d, v):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.rand(d, generator=g) + 0.5)
        self.lm_head = torch.nn.Linear(d, v, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(v, d, generator=g))

    def get_output_embeddings(self):
        return self.lm_head


def test_logit_lens_against_float64():
    g = torch.Generator().manual_seed(0)
    lm = _StubLM(g, 8, 30)
    W_dec = torch.randn(5, 8, generator=g)
    res = logit_lens(W_dec, lm, k=4, hist_bins=5, batch=2)
    ref = (W_dec.double() * lm.model.norm.weight.double()) @ lm.lm_head.weight.double().T
    assert res["pos_ids"].tolist() == ref.topk(4, dim=1).indices.tolist()
    assert res["neg_ids"].tolist() == ref.topk(4, dim=1, largest=False).indices.tolist()
    assert torch.allclose(res["pos_vals"].double(), ref.topk(4, dim=1).values, atol=1e-4)
    assert res["hist_counts"].sum(1).tolist() == [30] * 5
    assert "model.norm.weight" in res["path"]


def test_feature_json_schema():
    src, _, encode64 = _planted(signed=True)
    cfg = DashboardConfig(latents="0-2", top_k=3, context=2, n_bins=2, per_bin=2, hist_bins=4)
    data = collect(lambda x: encode64(x).float(), F, src, cfg)
    recs = latent_records(data, TokenText(None), DashboardMeta(dataset="planted", n_windows=W))
    assert [r["index"] for r in recs] == [0, 1, 2]
    js = feature_json(recs[0], DashboardMeta(dataset="planted", n_windows=W), data.n_rows)
    for key in ("feature_index", "pos_str", "neg_str", "pos_values", "neg_values",
                "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
                "n_prompts_total", "n_tokens_in_prompt", "dataset", "activations"):
        assert key in js
    top = [a for a in js["activations"] if a["bin_min"] == -1]
    assert top and all(a["bin_contains"] == -1 for a in top)
    # the first top example peaks at the example token and equals the latent's max
    a0 = top[0]
    assert a0["maxValue"] == pytest.approx(recs[0]["max"], rel=1e-2)
    assert len(a0["tokens"]) == len(a0["values"]) <= 2 * cfg.context + 1
    assert sum(js["freq_hist_data_bar_heights"]) == round(data.density[0].item() * data.n_rows
                                                          ) - sum(js["saelab"]["neg_hist"]
                                                                  ["bar_heights"])


@pytest.mark.slow
def test_dashboard_and_steer_on_embedded_model(tmp_path, capsys):
    """The CLI verbs end to end on the real embedded LM, a fixture run and 2k held-out rows."""
    import json
    import shutil
    from pathlib import Path

    from saelab.cli import main

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "format_v1" / "run_topk", run)
    store = tmp_path / "store"
    assert main(["harvest", "--out", str(store), "--split", "eval", "--tokens", "1024",
                 "--hook", "blocks.2.hook_resid_post", "--quiet"]) == 0
    out = run / "dashboard"  # the default --out, where steer finds the max activations
    assert main(["dashboard", str(run), "--store", str(store), "--tokens", "1024",
                 "--latents", "top:5", "--quiet"]) == 0
    html = (out / "dashboard.html").read_text()
    assert "<script src" not in html and "model.norm.weight" in html
    feats = sorted((out / "features").glob("*.json"))
    assert len(feats) == 5
    js = json.loads(feats[0].read_text())
    top = [a for a in js["activations"] if a["bin_min"] == -1]
    assert top[0]["maxValue"] == pytest.approx(js["maxActApprox"], rel=1e-2)
    assert len(js["pos_str"]) == len(js["neg_str"]) == 10
    assert js["n_tokens_in_prompt"] == 17 and js["dataset"] == "embedded"
    lat = js["feature_index"]
    from saelab.steer import SteerConfig, steer_run

    rows, max_act = steer_run(run, SteerConfig(latent=lat, prompt="The market", strengths="0,20",
                                               max_new_tokens=6), log=lambda *_: None)
    assert max_act == pytest.approx(js["maxActApprox"])
    assert [r.mode for r in rows] == ["none", "additive", "additive"]
    assert rows[1].text == rows[0].text and rows[2].text != rows[0].text
    capsys.readouterr()
    assert main(["steer", str(run), "--latent", str(lat), "--prompt", "The market",
                 "--strengths", "0", "--max-new-tokens", "6", "--max-act", "1"]) == 0
    assert rows[0].text.replace("\n", "\\n") in capsys.readouterr().out
