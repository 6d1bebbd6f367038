"""top-AFA SAE and the AFA analysis functions (docs/methods.md §10, §16.10, §16.11)."""

import copy

import pytest
import torch

import saelab.io as sio
from saelab.config import SAEConfig, TrainConfig
from saelab.saes.registry import build_sae
from saelab.saes.sparse import auxk_loss, normalized_mse
from saelab.saes.topafa import (
    afa_norm_bounds,
    coherence,
    epsilon_lbo,
    sae_zf_norms,
    zf_norms,
)
from saelab.train.trainer import Trainer

D, F, B = 16, 48, 128


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(seed=0, d_in=D, d_sae=F, **afa):
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture="topafa", d_in=d_in, d_sae=d_sae, options=afa)
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
        # non-unit decoder rows, so the ‖d_i‖ scaling of the selection is exercised
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g) + 0.5)
    return sae


def naive_cumnorms(a, dec_norm):
    """Cumulative norms of the decoder-scaled activations, sorted descending (no +inf)."""
    s = (a * dec_norm) ** 2
    order = sorted(range(len(s)), key=lambda i: -float(s[i]))
    return order, torch.stack([s[order[: j + 1]].sum().sqrt() for j in range(len(s))])


@torch.no_grad()
@pytest.mark.parametrize("rule", ["nearest", "first_exceeding"])
def test_chosen_k_minimises_distance_to_centred_norm(rule):
    # §16.10: k* minimises |cumnorm_k − ‖x_c‖| (over k < M; the reference bars k = M)
    sae = make(selection=rule)
    x = randn(40, D, seed=11) * 2
    f = sae.encode(x)
    a = torch.relu(sae.pre_acts(x))
    dn = sae.W_dec.norm(dim=1)
    checked = 0
    for b in range(len(x)):
        n_pos = int((a[b] > 0).sum())
        order, cum = naive_cumnorms(a[b], dn)
        target = (x[b] - sae.b_dec).norm()
        k = int((f[b] != 0).sum())
        assert set(f[b].nonzero().flatten().tolist()) == set(order[:k])  # the top-k* by s
        torch.testing.assert_close(f[b, order[:k]], a[b, order[:k]])
        if rule == "nearest":
            best = (cum[:-1] - target).abs().min()
            assert (cum[k - 1] - target).abs() <= best + 1e-5
        else:
            assert cum[k - 1] >= target - 1e-5 or k == n_pos  # reaches ‖x_c‖ (or uses all)
            assert k == 1 or cum[k - 2] < target + 1e-5  # and is the first to do so
        checked += k < n_pos  # a real choice, not "all positives"
    assert checked > 10
    assert len(set((f != 0).sum(1).tolist())) > 3  # k* differs between tokens


@torch.no_grad()
def test_orthonormal_decoder_gives_norm_of_centred_input():
    # §16.10: with orthonormal decoder rows and W_enc = W_dec^T, ‖f‖ = ‖x_c‖
    d_in, d_sae = 32, 16
    sae = make(d_in=d_in, d_sae=d_sae)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(1)))
    sae.W_dec.copy_(q.T)
    sae.W_enc.copy_(q)
    g = torch.Generator().manual_seed(2)
    c = torch.rand(64, d_sae, generator=g) * (torch.rand(64, d_sae, generator=g) < 0.3)
    c[:, 0] += 0.1  # at least one active latent per token
    x = sae.b_dec + c @ sae.W_dec
    f = sae.encode(x)
    xc_norm = (x - sae.b_dec).norm(dim=1)
    torch.testing.assert_close(f.norm(dim=1), xc_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, c, rtol=1e-4, atol=1e-5)
    # with noise off the dictionary's span the norms still agree closely
    xn = x + 0.01 * torch.randn(x.shape, generator=g)
    ratio = sae.encode(xn).norm(dim=1) / (xn - sae.b_dec).norm(dim=1)
    assert (ratio - 1).abs().max() < 0.05


def random_unit_dictionary(h, d, seed=0):
    return torch.nn.functional.normalize(
        torch.randn(h, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
        dim=1)


@pytest.mark.parametrize("signed", [False, True])
def test_afa_bound_for_a_random_dictionary(signed):
    # §16.11: |‖Σ f_i d_i‖² − ‖f‖²| ≤ ε(h − 1)‖f‖², h = dictionary size or active count
    h, d, active = 64, 1024, 6
    dictionary = random_unit_dictionary(h, d)
    eps = coherence(dictionary)
    gram = dictionary @ dictionary.T
    torch.testing.assert_close(eps, (gram - torch.eye(h, dtype=gram.dtype)).abs().max())
    g = torch.Generator().manual_seed(3)
    f = torch.rand(500, h, generator=g, dtype=torch.float64)
    if signed:
        f = f * torch.randn(500, h, generator=g, dtype=torch.float64).sign()
    keep = torch.rand(500, h, generator=g).argsort(1) < active
    for code, count in ((f, h), (f * keep, active)):
        z = code @ dictionary
        gap = (z.square().sum(1) - code.square().sum(1)).abs()
        assert (gap <= eps * (count - 1) * code.square().sum(1) + 1e-12).all()
        lo, hi = afa_norm_bounds(z.norm(dim=1), eps, count)
        f_norm = code.norm(dim=1)
        assert (lo <= f_norm + 1e-12).all() and (f_norm <= hi + 1e-12).all()
        # ε_LBO with the same h is the smallest ε the norms allow, so it never exceeds ε
        assert (epsilon_lbo(z.norm(dim=1), f_norm, count) <= eps + 1e-12).all()
    assert eps * (active - 1) < 1  # the active-count band is not vacuous
    _, hi_full = afa_norm_bounds(torch.ones(1, dtype=torch.float64), eps, h)
    assert torch.isinf(hi_full).all() == bool(eps * (h - 1) >= 1)


@torch.no_grad()
def test_zf_norms_treat_b_dec_as_a_feature():
    sae = make(seed=4)
    x = randn(32, D, seed=12)
    f = sae.encode(x)
    norm_z, norm_ft = sae_zf_norms(sae, x)
    torch.testing.assert_close(norm_z, x.norm(dim=1))
    dn = sae.W_dec.norm(dim=1)
    f_tilde = torch.cat([f * dn, sae.b_dec.norm().expand(len(x), 1)], dim=1)
    torch.testing.assert_close(norm_ft, f_tilde.norm(dim=1))
    units = torch.cat([sae.W_dec / dn[:, None], (sae.b_dec / sae.b_dec.norm())[None]])
    torch.testing.assert_close(f_tilde @ units, sae(x).recon, rtol=1e-5, atol=1e-5)
    # a token reconstructed exactly by a dictionary of coherence ε has ε_LBO ≤ ε (h = M + 1)
    dictionary = random_unit_dictionary(20, 2048, seed=5)
    code = torch.rand(10, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    z = code @ dictionary[:19] + dictionary[19]
    _, nft = zf_norms(z, code, dictionary[:19], dictionary[19])
    assert (epsilon_lbo(z.norm(dim=1), nft, 20) <= coherence(dictionary) + 1e-12).all()


@pytest.mark.parametrize("target", ["uncentered", "centered"])
def test_loss_terms_match_their_formulas(target):
    sae = make(afa_target=target, afa_coefficient=0.25)
    x = randn(B, D, seed=13) + 1.0
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    out = sae.loss(x, step=0, dead_mask_F=dead)
    f = sae.encode(x)
    recon = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.recon, recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.terms["nmse"], normalized_mse(recon, x))
    t = x.norm(dim=1) if target == "uncentered" else (x - sae.b_dec).norm(dim=1)
    var_per_dim = (x - x.mean(0)).pow(2).mean()
    afa = ((f.norm(dim=1) - t) ** 2).mean() / var_per_dim
    torch.testing.assert_close(out.terms["afa"], afa)
    aux = auxk_loss(sae.pre_acts(x), x - recon, sae.W_dec, dead, sae.k_aux)
    torch.testing.assert_close(out.terms["auxk"], aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total, out.terms["nmse"] + 0.25 * afa + aux / 32)
    torch.testing.assert_close(out.l0, (f != 0).sum(1).float().mean())
    assert torch.equal(out.fired_F, (f != 0).any(0))
    # the sparse encoder backward gives autograd's gradients through the dense π
    mask = f != 0
    f_dense = torch.relu(sae.pre_acts(x)) * mask
    recon_d = f_dense @ sae.W_dec + sae.b_dec
    t_d = t if target == "uncentered" else t.detach()
    dense = (normalized_mse(recon_d, x) + 0.25 * ((f_dense.norm(dim=1) - t_d) ** 2).mean()
             / var_per_dim + auxk_loss(sae.pre_acts(x), x - recon_d, sae.W_dec, dead,
                                       sae.k_aux) / 32)
    params = [sae.W_enc, sae.W_dec, sae.b_dec]
    for a, b in zip(torch.autograd.grad(out.total, params), torch.autograd.grad(dense, params),
                    strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_encoder_bias_option_and_input_scale_folding(tmp_path):
    plain = make()
    assert "b_enc" not in dict(plain.named_parameters())
    sae = make(encoder_bias=True)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * randn(F, seed=14))
    x = randn(64, D, seed=15)
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(3.0)
    with torch.no_grad():  # top-AFA is scale-equivariant: k* does not change under folding
        torch.testing.assert_close(folded.encode(x), sae.encode(3.0 * x) / 3.0)
        loaded = sio.load_sae(sio.save_sae(sae, tmp_path / "sae"))
        assert torch.equal(loaded.encode(x), sae.encode(x))


def batches(seed=0):
    """Tokens with a varying number (1-8) of active true features around a mean."""
    g0 = torch.Generator().manual_seed(99)
    dirs = torch.nn.functional.normalize(torch.randn(32, D, generator=g0), dim=1)
    i = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        n_active = torch.randint(1, 9, (B, 1), generator=g)
        keep = torch.rand(B, 32, generator=g).argsort(1) < n_active
        codes = (0.5 + torch.rand(B, 32, generator=g)) * keep
        yield 0.3 + codes @ dirs + 0.01 * torch.randn(B, D, generator=g)
        i += 1


def test_short_training_lowers_loss_and_l0_varies_per_token():
    sae = build_sae(SAEConfig(architecture="topafa", d_in=D, d_sae=F),
                    generator=torch.Generator().manual_seed(0))
    x = torch.cat([next(batches(seed=5)) for _ in range(2)])
    with torch.no_grad():
        before = sae.loss(x, step=0)
    Trainer(sae, TrainConfig(tokens=B * 120, batch_size=B, lr=3e-3, lr_warmup_steps=10,
                             log_every=40), progress=False).fit(batches())
    with torch.no_grad():
        after = sae.loss(x, step=0)
        l0_B = (sae.encode(x) != 0).sum(1).float()
    assert after.total < 0.7 * before.total
    assert after.terms["nmse"] < before.terms["nmse"]
    assert l0_B.std() > 0.5 and l0_B.min() < l0_B.max() - 2
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F), atol=1e-5, rtol=0)  # N1


def test_standardize_option_works_on_per_token_standardised_inputs():
    sae = make(standardize=True)
    x = randn(32, D, seed=7) * 3 + randn(32, 1, seed=8)
    # reference standardisation (unbiased std, as the reference code's torch.std)
    xd = x.double()
    mean, std = xd.mean(1, keepdim=True), xd.std(1, keepdim=True)
    xs = ((xd - mean) / (std + 1e-5)).float()
    plain = make()  # same weights, no standardisation, fed the standardised input
    plain.load_state_dict(sae.state_dict())
    torch.testing.assert_close(sae.encode(x), plain.encode(xs))
    # the code ignores each token's scale and shift; the output is de-standardised
    torch.testing.assert_close(sae.encode(x * 2.5 + 4.0), sae.encode(x), atol=1e-4, rtol=1e-4)
    want = (plain(xs).recon.double() * (std + 1e-5) + mean).float()
    torch.testing.assert_close(sae(x).recon, want)
    out = sae.loss(x, 0)
    torch.testing.assert_close(out.terms["nmse"], normalized_mse(plain(xs).recon, xs))
    torch.testing.assert_close(out.recon, want)
    # folding an input scale changes nothing: the SAE already ignores it
    before = sae(x).recon
    sae.fold_input_scale(4.0)
    torch.testing.assert_close(sae(x).recon, before)
