"""Matryoshka SAE (docs/methods.md §13.1): groups, the prefix loss, training, truncation, inference."""

import pytest
import torch

import saelab.io as sio
from saelab.config import SAEConfig, TrainConfig
from saelab.errors import ConfigError
from saelab.saes.matryoshka import group_ends
from saelab.saes.registry import build_sae
from saelab.saes.sparse import auxk_loss, normalized_mse
from saelab.train.trainer import Trainer

D, F, B, K = 16, 64, 128, 4
GROUPS = "1,1,2,4"  # ends 8, 16, 32, 64
N_TRUE = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed=0, groups=GROUPS, include_b_dec=True):
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture="matryoshka", d_in=D, d_sae=F)
    cfg.options = {"k": K, "group_fractions": groups, "include_b_dec_term": include_b_dec}
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
    return sae


def batches(seed=0):
    """Sparse non-negative combinations of N_TRUE fixed directions around a fixed mean."""
    g0 = torch.Generator().manual_seed(99)
    dirs = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=g0), dim=1)
    mean = 0.5 * torch.randn(D, generator=g0)
    i = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        codes = torch.rand(B, N_TRUE, generator=g) * (torch.rand(B, N_TRUE, generator=g) < 0.12)
        yield mean + codes @ dirs + 0.01 * torch.randn(B, D, generator=g)
        i += 1


def test_group_ends_normalise_and_round():
    assert group_ends("0.0625,0.0625,0.125,0.25,0.5", 36864) == [2304, 4608, 9216, 18432, 36864]
    assert group_ends("1,1,2,4", 64) == [8, 16, 32, 64]
    assert group_ends("2,2,4,8", 64) == [8, 16, 32, 64]  # only the proportions matter
    assert group_ends("0.01,0.99", 10) == [1, 10]  # every group keeps at least one latent
    assert group_ends("1,1,1", 3) == [1, 2, 3]
    with pytest.raises(ConfigError, match="4 groups"):
        group_ends("1,1,1,1", 3)
    with pytest.raises(ConfigError, match="positive"):
        group_ends("1,-1", 8)
    assert make().prefix_ends == (8, 16, 32, 64)


def naive_losses(sae, x, include_b_dec=True):
    """Per-prefix nmse with a dense BatchTopK code, one dense matmul per prefix."""
    acts = torch.relu(sae.pre_acts(x))
    vals, flat = acts.flatten().topk(K * x.shape[0])
    f = torch.zeros_like(acts).flatten().scatter(0, flat, vals).view_as(acts)
    losses = [normalized_mse(f[:, :m] @ sae.W_dec[:m] + sae.b_dec, x) for m in sae.prefix_ends]
    if include_b_dec:
        losses.insert(0, normalized_mse(sae.b_dec.expand_as(x), x))
    return torch.stack(losses), f


@pytest.mark.parametrize("include_b_dec", [True, False])
def test_loss_is_mean_of_naive_prefix_losses(include_b_dec):
    sae = make(include_b_dec=include_b_dec)
    x = next(batches())
    out = sae.loss(x, step=0)
    naive, f = naive_losses(sae, x, include_b_dec)
    torch.testing.assert_close(out.terms["matryoshka"], naive.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total, naive.mean(), rtol=1e-5, atol=1e-6)  # nothing dead
    torch.testing.assert_close(out.terms["nmse"], naive[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, f @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    assert ("nmse_prefix_0" in out.terms) == include_b_dec
    # same gradients as the dense computation
    params = [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec]
    g_sparse = torch.autograd.grad(out.total, params)
    g_dense = torch.autograd.grad(naive_losses(sae, x, include_b_dec)[0].mean(), params)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert torch.equal(out.fired_F, (f != 0).any(0))
    torch.testing.assert_close(out.l0, (f != 0).sum(1).float().mean())


def test_auxk_uses_the_full_dictionary_residual():
    sae = make()
    x = next(batches())
    dead = torch.zeros(F, dtype=torch.bool)
    dead[40:] = True
    out = sae.loss(x, step=0, dead_mask_F=dead)
    expected = auxk_loss(sae.pre_acts(x), x - out.recon, sae.W_dec, dead, sae.k_aux)
    assert out.terms["auxk"] > 0
    torch.testing.assert_close(out.terms["auxk"], expected)
    torch.testing.assert_close(
        out.total, out.terms["matryoshka"] + sae.cfg.options.aux_coefficient * expected)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    sae = make(seed=1)
    sae.cfg.options.threshold_beta = 0.9  # a short run: let the EMA threshold follow the code
    sae.init_from_data(torch.cat([next(batches(seed=7)) for _ in range(4)]))
    tr = Trainer(sae, TrainConfig(tokens=B * 150, batch_size=B, lr=3e-3, lr_warmup_steps=10,
                                  log_every=50), progress=False)
    tr.fit(batches())
    return sae.eval()


def prefix_fvus(sae, x):
    f = sae.encode(x)
    fvu = [normalized_mse(f[:, :m] @ sae.W_dec[:m] + sae.b_dec, x) for m in sae.prefix_ends]
    return normalized_mse(sae.b_dec.expand_as(x), x), torch.stack(fvu)


@torch.no_grad()
def test_every_prefix_beats_b_dec_and_larger_prefixes_are_better(trained):
    x = torch.cat([next(batches(seed=5)) for _ in range(4)])
    base, fvu = prefix_fvus(trained, x)
    assert (fvu < base).all(), (base, fvu)
    assert (fvu[1:] <= fvu[:-1] + 1e-3).all(), fvu
    assert fvu[-1] < 0.8 * fvu[0]  # the nesting is not trivial: later groups add a lot
    # an untrained SAE's first prefix is no better than the b_dec baseline
    raw_base, raw_fvu = prefix_fvus(make(seed=1).eval(), x)
    assert fvu[0] < raw_fvu[0]


@torch.no_grad()
def test_inference_threshold_is_inherited(trained):
    x = torch.cat([next(batches(seed=6)) for _ in range(4)])
    theta = trained.threshold
    assert (theta > 0).all() and torch.equal(theta, theta[0].expand_as(theta))  # one global θ
    pre = trained.pre_acts(x)
    f = trained.encode(x)
    assert torch.equal(f, torch.where(pre > theta, torch.relu(pre), 0.0))
    torch.testing.assert_close(trained.encode(x[:7]), f[:7])  # no batch dependence
    l0 = (f != 0).sum(1).float().mean()
    assert K / 2 < l0 < 2 * K
    assert trained.saelens_architecture == "jumprelu"


@torch.no_grad()
@pytest.mark.parametrize("m", [8, 16, 20, 64])
def test_truncated_equals_zeroing_later_latents(trained, m, tmp_path):
    x = next(batches(seed=8))
    small = trained.truncated(m)
    f = trained.encode(x)
    f_zeroed = f.clone()
    f_zeroed[:, m:] = 0
    assert small.d_sae == m and small.architecture == "matryoshka"
    assert small.prefix_ends == tuple(e for e in trained.prefix_ends if e < m) + (m,)
    # equal up to matmul rounding (a narrower W_enc may sum in another order)
    torch.testing.assert_close(small.encode(x), f[:, :m], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small(x).recon, trained.decode(f_zeroed), rtol=1e-6, atol=1e-6)
    loaded = sio.load_sae(sio.save_sae(small, tmp_path / "small"))
    assert torch.equal(loaded.encode(x), small.encode(x))
    with pytest.raises(ValueError):
        trained.truncated(0)
