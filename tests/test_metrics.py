"""Metric definitions (docs/methods.md §2.7, §13.2, §16.1, §16.12)."""

import pytest
import torch

from saelab.evals.metrics import ReconstructionMetrics, ce_metrics, log10_density


def _pooled(x, xh, f, chunks=3):
    m = ReconstructionMetrics(x.shape[1], f.shape[1])
    for xs, xhs, fs in zip(x.chunk(chunks), xh.chunk(chunks), f.chunk(chunks), strict=True):
        m.update(xs, xhs, fs)
    return m


def test_gamma_identity_and_grid_search():
    # §16.1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=g).double()
    xh = 0.8 * x + 0.1 * torch.randn(2000, 32, generator=g).double()
    gamma = _pooled(x, xh, torch.zeros(2000, 4)).compute()["relative_reconstruction_bias"]
    sx2, sxh2, se2 = x.pow(2).sum(), xh.pow(2).sum(), (xh - x).pow(2).sum()
    assert gamma == pytest.approx((2 * sxh2 / (sxh2 + sx2 - se2)).item(), rel=1e-9)
    grid = torch.linspace(0.7, 1.0, 1501, dtype=torch.float64)
    losses = torch.stack([(xh / gm - x).pow(2).sum() for gm in grid])
    assert gamma == pytest.approx(grid[losses.argmin()].item(), abs=2e-4)
    assert gamma < 1  # shrinkage


def test_fvu_is_pooled_and_equals_one_minus_explained_variance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(999, 8, generator=g) * torch.arange(1, 9) + 3.0
    xh = x + 0.5 * torch.randn(999, 8, generator=g)
    m = _pooled(x, xh, torch.zeros(999, 4), chunks=7).compute()
    expected = ((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert m["fvu"] == pytest.approx(expected, rel=1e-6)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"], rel=1e-12)
    assert m["mse"] == pytest.approx((x - xh).pow(2).mean().item(), rel=1e-6)


def test_perfect_reconstruction():
    x = torch.randn(100, 6)
    m = _pooled(x, x.clone(), torch.ones(100, 3)).compute()
    assert m["fvu"] == pytest.approx(0, abs=1e-12)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert m["cosine_similarity"] == pytest.approx(1.0)


def test_l0_density_and_dead():
    f = torch.zeros(10, 5)
    f[:, 0] = 1.0  # fires on every token
    f[:3, 1] = 2.0  # 30% of tokens
    f[0, 2] = -1.0  # negative codes count as active (AbsTopK)
    m = _pooled(torch.randn(10, 4), torch.randn(10, 4), f, chunks=2)
    out = m.compute()
    assert out["l0"] == pytest.approx((10 + 3 + 1) / 10)
    assert out["dead_fraction"] == pytest.approx(2 / 5)
    assert out["dense_fraction_10pct"] == pytest.approx(2 / 5)
    torch.testing.assert_close(m.feature_density(), torch.tensor([1.0, 0.3, 0.1, 0, 0],
                                                                dtype=torch.float64))
    assert log10_density(torch.tensor([0.0, 1.0]))[0] == pytest.approx(-10.0)
    assert out["l0_median"] == 1.0


def test_ce_loss_recovered_endpoints():
    # §16.12: 1 when x̂ = x, 0 when x̂ is the ablation baseline.
    perfect = ce_metrics(2.0, 2.0, 6.0, 4.0, 0.0, 3.0, 1.0)
    assert perfect["ce_loss_recovered"] == 1.0 and perfect["kl_score"] == 1.0
    assert perfect["delta_lm_loss"] == 0.0
    ablated = ce_metrics(2.0, 6.0, 6.0, 4.0, 3.0, 3.0, 1.0)
    assert ablated["ce_loss_recovered"] == 0.0 and ablated["kl_score"] == 0.0
    mean_abl = ce_metrics(2.0, 4.0, 6.0, 4.0, 1.0, 3.0, 1.0)
    assert mean_abl["ce_loss_recovered_mean_ablation"] == 0.0


def test_ce_metrics_interior_values_against_the_formulas():
    # §13.2 by hand (float64 fractions), at points that are not endpoints: a formula with the
    # wrong reference loss, a swapped sign or a mean/zero mix-up gives another number here
    clean, sae, zero, mean = 3.0, 3.5, 9.0, 5.0
    kl_sae, kl_zero, kl_mean = 0.25, 4.0, 2.0
    m = ce_metrics(clean, sae, zero, mean, kl_sae, kl_zero, kl_mean)
    assert m["ce_loss_recovered"] == pytest.approx(5.5 / 6.0, rel=1e-12)  # (9-3.5)/(9-3)
    assert m["ce_loss_recovered_mean_ablation"] == pytest.approx(1.5 / 2.0, rel=1e-12)
    assert m["delta_lm_loss"] == pytest.approx(0.5, rel=1e-12)
    assert m["kl_score"] == pytest.approx(3.75 / 4.0, rel=1e-12)
    assert m["kl_score_mean_ablation"] == pytest.approx(1.75 / 2.0, rel=1e-12)
    # an SAE worse than zero-ablating the layer recovers a negative fraction
    worse = ce_metrics(3.0, 10.0, 9.0, 5.0, 5.0, 4.0, 2.0)
    assert worse["ce_loss_recovered"] == pytest.approx(-1 / 6, rel=1e-12)
    assert worse["kl_score"] == pytest.approx(-0.25, rel=1e-12)
    # no gap between clean and ablated: undefined, reported as NaN rather than a fake number
    flat = ce_metrics(3.0, 3.2, 3.0, 3.0, 0.1, 0.0, 0.0)
    assert flat["ce_loss_recovered"] != flat["ce_loss_recovered"]
    assert flat["kl_score"] != flat["kl_score"]


def test_reconstruction_metrics_against_a_float64_per_row_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(301, 6, generator=g) * 3 + 1
    xh = 0.9 * x + 0.3 * torch.randn(301, 6, generator=g)
    f = torch.relu(torch.randn(301, 10, generator=g) - 0.5)
    out = _pooled(x, xh, f, chunks=5).compute()
    xd, xhd = x.double(), xh.double()
    cos = [torch.dot(xd[i], xhd[i]) / (xd[i].norm() * xhd[i].norm()) for i in range(301)]
    l0 = [int((f[i] != 0).sum()) for i in range(301)]
    assert out["cosine_similarity"] == pytest.approx(float(sum(cos) / 301), rel=1e-5)
    assert out["l0"] == pytest.approx(sum(l0) / 301, rel=1e-9)
    assert out["mse"] == pytest.approx(float(((xd - xhd) ** 2).mean()), rel=1e-5)
