"""Properties of the ReLU and Gated families (docs/methods.md §1, §2, §16)."""

import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.saes.registry import architectures, build_sae, validate_sae_config

D, F = 16, 48


def make(arch, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=arch, d_in=D, d_sae=F, **kw), generator=g)
    with torch.no_grad():  # non-trivial biases so the tests exercise every term
        for p in sae.parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


def test_registry_lists_trainable_families():
    names = architectures(trainable_only=True)
    assert {"gated", "relu", "jumprelu"} <= set(names)


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        make("gated", variant="nope")


def test_gated_equals_its_jumprelu_conversion():
    sae = make("gated")
    jr = sae.to_jumprelu()
    x = 2 * torch.randn(256, D)
    f_g, f_j = sae.encode(x), jr.encode(x)
    assert (f_g > 0).any() and (f_g == 0).any()
    torch.testing.assert_close(f_j, f_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jr(x).recon, sae(x).recon, rtol=1e-5, atol=1e-5)


def test_gated_to_jumprelu_formula_matches_spec():
    # §16.2: 1[π_gate>0]·ReLU(π_mag) == π_mag·1[π_mag > max(θ, 0)], θ = b_mag − e^{r_mag} b_gate
    sae = make("gated", seed=3)
    x = torch.randn(512, D)
    h = (x - sae.b_dec) @ sae.W_enc
    pi_gate = h + sae.b_gate
    pi_mag = h * sae.r_mag.exp() + sae.b_mag
    theta = sae.b_mag - sae.r_mag.exp() * sae.b_gate
    lhs = (pi_gate > 0) * torch.relu(pi_mag)
    rhs = pi_mag * (pi_mag > theta.clamp_min(0))
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), lhs, rtol=1e-5, atol=1e-5)


def _grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in sae.named_parameters()}


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_gated_loss_gradient_routing(b_dec_in):
    # §16.3: L_aux gives no gradient to W_dec/b_dec; L_reconstruct none to W_gate/b_gate.
    # With the pre-encoder bias on, b_dec also feeds the encoder input (x − b_dec), as in the
    # paper's pseudo-code and dictionary_learning; the frozen *decoder copy* still passes none.
    sae = make("gated", apply_b_dec_to_input=b_dec_in)
    x = torch.randn(128, D)
    out = sae.loss(x, step=10_000)
    g_aux = _grads(sae, out.terms["aux"])
    assert g_aux["W_dec"].abs().max() == 0
    if not b_dec_in:
        assert g_aux["b_dec"].abs().max() == 0
    else:
        expected = -(sae.W_enc @ g_aux["b_gate"])  # d/d b_dec of (x − b_dec) W_enc + b_gate
        torch.testing.assert_close(g_aux["b_dec"], expected, rtol=1e-4, atol=1e-4)
    assert g_aux["W_enc"].abs().max() > 0 and g_aux["b_gate"].abs().max() > 0
    g_rec = _grads(sae, out.terms["mse"])
    assert g_rec["b_gate"].abs().max() == 0
    assert g_rec["W_dec"].abs().max() > 0 and g_rec["b_mag"].abs().max() > 0
    # W_enc gets reconstruction gradient only through the magnitude path (W_mag = e^r W_gate).
    g_l1 = _grads(sae, out.terms["l1"])
    assert g_l1["W_dec"].abs().max() == 0 and g_l1["b_mag"].abs().max() == 0


def test_gated_april_variant_trains_decoder_through_aux():
    sae = make("gated", variant="april")
    out = sae.loss(torch.randn(64, D), step=0)
    g = _grads(sae, out.terms["aux"])
    assert g["W_dec"].abs().max() > 0
    assert not sae.unit_norm_decoder


@pytest.mark.parametrize("arch,variant", [("relu", "april"), ("relu", "tm"), ("gated", "paper"),
                                          ("gated", "april")])
def test_fold_decoder_norms_keeps_function(arch, variant):
    # §16.8
    sae = make(arch, variant=variant)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1) * 3 + 0.1)
    x = torch.randn(200, D)
    before = sae(x).recon
    sae.fold_decoder_norms()
    torch.testing.assert_close(sae(x).recon, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_fold_input_scale(arch):
    sae = make(arch, variant="tm" if arch == "relu" else None)
    x = torch.randn(100, D) * 7
    c = 0.37
    expected = sae(c * x).recon / c
    sae.fold_input_scale(c)
    torch.testing.assert_close(sae(x).recon, expected, rtol=1e-4, atol=1e-4)


def test_relu_april_penalty_is_norm_weighted():
    sae = make("relu", variant="april")
    x = torch.randn(32, D)
    out = sae.loss(x, step=10**6)
    f = sae.encode(x)
    torch.testing.assert_close(out.terms["l1"], (f * sae.W_dec.norm(dim=1)).sum(-1).mean())
    assert sae.cfg.apply_b_dec_to_input is False and not sae.unit_norm_decoder


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_b_dec_init_uses_geometric_median(arch):
    sae = make(arch)
    x = torch.randn(500, D) + 5.0
    x[:10] += 1000.0  # outliers barely move a median, unlike a mean
    sae.init_from_data(x)
    assert (sae.b_dec - 5.0).abs().max() < 0.5
    zeros = make(arch, b_dec_init="zeros")
    before = zeros.b_dec.clone()
    zeros.init_from_data(x)
    assert torch.equal(zeros.b_dec, before)


def test_sparsity_warmup():
    sae = make("gated")
    sae.sparsity_warmup_steps = 10
    assert sae.sparsity_scale(0) == pytest.approx(0.1)
    assert sae.sparsity_scale(9) == 1.0 and sae.sparsity_scale(100) == 1.0


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_fused_gated_encoder_matches_autograd(b_dec_in):
    from saelab.saes._gated_kernel import GatedEncode

    sae = make("gated", apply_b_dec_to_input=b_dec_in).double()
    x = torch.randn(64, D, dtype=torch.float64)
    params = [sae.W_enc, sae.b_dec, sae.b_gate, sae.r_mag, sae.b_mag]
    w_f = torch.randn(64, F, dtype=torch.float64)
    w_g = torch.randn(64, F, dtype=torch.float64)

    f, gate = GatedEncode.apply(x, *params, b_dec_in)
    fused = torch.autograd.grad((f * w_f).sum() + (gate * w_g).sum(), params, allow_unused=True)

    pi_gate, pi_mag = sae._pre_acts(x)
    f_ref = torch.where(pi_gate > 0, torch.relu(pi_mag), 0.0)
    ref = torch.autograd.grad((f_ref * w_f).sum() + (torch.relu(pi_gate) * w_g).sum(), params,
                              allow_unused=True)
    torch.testing.assert_close(f, f_ref)
    for a, b in zip(fused, ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


def test_threshold_estimate_is_running_mean_then_ema():
    # §4.8 estimator: a running mean of the per-batch estimates until 1/(1-β) of them, then an
    # EMA with β (a bare EMA would stay near its first value in short runs).
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=D, d_sae=F,
                              options={"threshold_beta": 0.75}))
    ests = [1.0, 2.0, 6.0, 3.0, 10.0]
    for e in ests:
        sae.update_threshold(torch.tensor(e))
    mean4 = sum(ests[:4]) / 4  # n < 1/(1-β) = 4: plain mean of the first four
    expected = 0.75 * mean4 + 0.25 * ests[4]
    torch.testing.assert_close(sae.threshold, torch.full((F,), expected))
    sae.update_threshold(torch.tensor(float("inf")))  # no estimate: unchanged
    torch.testing.assert_close(sae.threshold, torch.full((F,), expected))


def test_b_dec_init_default_is_per_family():
    # top-AFA starts b_dec at 0 like its reference (see saes/topafa.py); the rest use the median.
    afa = build_sae(SAEConfig(architecture="topafa", d_in=D, d_sae=F))
    topk = build_sae(SAEConfig(architecture="topk", d_in=D, d_sae=F))
    assert afa.cfg.b_dec_init == "zeros" and topk.cfg.b_dec_init == "geometric_median"
    x = torch.randn(200, D) + 3.0
    afa.init_from_data(x)
    assert torch.equal(afa.b_dec, torch.zeros(D))
    forced = build_sae(SAEConfig(architecture="topafa", d_in=D, d_sae=F, b_dec_init="mean"))
    forced.init_from_data(x)
    torch.testing.assert_close(forced.b_dec, x.mean(0))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "feature_choice"])
def test_encoder_init_scale_scales_the_tied_encoder(arch):
    from saelab.saes.topk import TopKOptions

    def config(scale):
        return SAEConfig(architecture=arch, d_in=8, d_sae=16,
                         options=TopKOptions(k=2, encoder_init_scale=scale))

    def build(scale):
        return build_sae(config(scale), generator=torch.Generator().manual_seed(0))

    plain, small = build(1.0), build(0.25)
    assert torch.equal(plain.W_dec, small.W_dec)  # the decoder is untouched
    torch.testing.assert_close(plain.W_enc, plain.W_dec.T)
    torch.testing.assert_close(small.W_enc, 0.25 * small.W_dec.T)
    with pytest.raises(ConfigError, match="--encoder-init-scale"):
        validate_sae_config(config(0.0))


# ---- fidelity options of the TopK family (§4.2, §0.6) and the dead-latent eps (§0.5) ---------
def _topk(seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="topk", d_in=D, d_sae=F,
                              options={"k": 4, **options}), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=g))
    return sae


def _x(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * torch.linspace(0.5, 2.0, D) + 1.5


def test_fixed_mse_normalization_divides_by_one_constant_from_the_init_sample():
    sae = _topk(mse_normalization="fixed")
    init_x, x = _x(512, 1), _x(64, 2)
    sae.init_from_data(init_x)
    out = sae.loss(x, 0)
    # float64 reference: MSE of predicting the init sample's mean, per row
    s = init_x.double()
    scale = ((s - s.mean(0)) ** 2).sum(1).mean()
    with torch.no_grad():
        recon = sae.decode(sae.encode(x)).double()
    want = ((recon - x.double()) ** 2).sum() / (x.shape[0] * scale)
    assert out.terms["nmse"].item() == pytest.approx(want.item(), rel=1e-5)
    # the batch form divides by this batch's own variance instead: a different number here
    batch = ((recon - x.double()) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
    assert abs(batch.item() - want.item()) > 1e-3
    plain = _topk()
    with torch.no_grad():
        plain.b_dec.copy_(sae.b_dec)  # init_from_data set sae's b_dec
    assert plain.loss(x, 0).terms["nmse"].item() == pytest.approx(batch.item(), rel=1e-5)
    # without an init sample the first training batch sets the constant, which then stays
    fresh = _topk(mse_normalization="fixed")
    fresh.loss(x, 0)
    first = ((x.double() - x.double().mean(0)) ** 2).sum(1).mean().item()
    assert fresh.mse_scale.item() == pytest.approx(first, rel=1e-5)
    fresh.loss(_x(64, 3), 1)
    assert fresh.mse_scale.item() == pytest.approx(first, rel=1e-5)
    assert fresh.training_state()["mse_scale"].item() == pytest.approx(first, rel=1e-5)


@pytest.mark.parametrize("norm", ["residual", "target"])
def test_auxk_normalization_by_its_own_or_the_main_target_variance(norm):
    sae = _topk(aux_normalization=norm, aux_k=3)
    x = _x(32, 4).double()
    sae = sae.double()
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    out = sae.loss(x, 0, dead_mask_F=dead)
    # naive loop: per row, the 3 largest ReLU(π) among dead latents decode the residual
    with torch.no_grad():
        pi = sae.pre_acts(x)
        e = x - out.recon
        e_hat = torch.zeros_like(x)
        idx = dead.nonzero().squeeze(1)
        for b in range(x.shape[0]):
            vals = pi[b, idx].relu()
            top = vals.argsort(descending=True)[:3]
            for j in top:
                e_hat[b] += vals[j] * sae.W_dec[idx[j]]
        sse = ((e_hat - e) ** 2).sum()
        target = x if norm == "target" else e
        want = sse / ((target - target.mean(0)) ** 2).sum()
    assert out.terms["auxk"].item() == pytest.approx(want.item(), rel=1e-6)


def test_dead_eps_counts_only_activations_above_it():
    from saelab.train.dead import DeadLatentTracker

    f = torch.zeros(4, 3)
    f[0, 0], f[1, 1], f[2, 2] = 5e-4, 2e-3, -2e-3
    for eps, fired in ((0.0, [True, True, True]), (1e-3, [False, True, True])):
        t = DeadLatentTracker(3, window_tokens=3, eps=eps)
        t.update(f)
        assert ((t.tokens_since_fired == 0).tolist()) == fired
    # families that report fired_F themselves apply the same eps
    sae = _topk()
    x = _x(16, 5)
    with torch.no_grad():
        f_BF = sae.encode(x)
    eps = f_BF[f_BF > 0].median().item()  # some latents fire only below it
    assert (f_BF > 0).any(0).sum() > (f_BF > eps).any(0).sum()
    sae.dead_eps = eps
    assert sae.loss(x, 0).fired_F.tolist() == (f_BF > eps).any(0).tolist()
    relu = make("relu")
    with torch.no_grad():
        f_r = relu.encode(x)
    relu.dead_eps = eps = f_r[f_r > 0].median().item()
    assert (f_r > 0).any(0).sum() > (f_r > eps).any(0).sum()
    assert relu.loss(x, 0).fired_F.tolist() == (f_r > eps).any(0).tolist()


# ---- deterministic checks of the TopK-style selection and AuxK (issue 9 D) -------------------
def _k_family(arch, k=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=arch, d_in=D, d_sae=F, options={"k": k}),
                    generator=g).double()
    with torch.no_grad():
        sae.b_enc.copy_(0.5 * torch.randn(F, generator=g, dtype=torch.float64))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=g, dtype=torch.float64))
    return sae


def test_abstopk_encode_equals_a_top_k_by_abs_reference():
    sae = _k_family("abstopk", k=5)
    x = 2 * torch.randn(64, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        f = sae.encode(x)
        pi = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # π by hand, b_dec subtracted (§5)
    for b in range(x.shape[0]):
        row = pi[b].tolist()
        top = sorted(range(F), key=lambda j: -abs(row[j]))[:5]  # naive: sort by |π|
        want = torch.zeros(F, dtype=torch.float64)
        for j in top:
            want[j] = row[j]  # the sign is kept, no ReLU
        torch.testing.assert_close(f[b], want, rtol=1e-9, atol=1e-9)
    assert (f < 0).any() and (f > 0).any()  # both poles really occur


def test_topk_encode_has_at_most_k_nonzeros_the_largest_relu_pre_acts():
    sae = _k_family("topk", k=4)
    x = torch.randn(128, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.sub_(1.0)  # many rows then have fewer than k positive π
        f = sae.encode(x)
        pi = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    nnz = (f != 0).sum(1)
    assert int(nnz.max()) <= 4 and int(nnz.min()) < 4  # the ReLU drops negative winners
    for b in range(x.shape[0]):
        row = pi[b].tolist()
        top = sorted(range(F), key=lambda j: -row[j])[:4]
        want = torch.zeros(F, dtype=torch.float64)
        for j in top:
            want[j] = max(row[j], 0.0)
        torch.testing.assert_close(f[b], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_auxk_gradient_reaches_only_dead_decoder_rows(arch):
    sae = _k_family(arch, k=4)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 7, 8, 20, 33, 40]] = True
    out = sae.loss(x, 0, dead_mask_F=dead)
    aux = out.terms["auxk"]
    assert aux.item() > 0
    sae.zero_grad()
    aux.backward()
    g_dec = sae.W_dec.grad
    assert g_dec[~dead].abs().max().item() == 0.0  # live rows get nothing from AuxK
    assert (g_dec[dead].abs().sum(1) > 0).sum().item() >= 3  # the dead ones do
    g_enc = sae.W_enc.grad
    assert g_enc[:, ~dead].abs().max().item() == 0.0
    assert sae.b_enc.grad[~dead].abs().max().item() == 0.0
    # b_dec reaches AuxK only through the dead latents' π = (x − b_dec) W_enc + b_enc
    torch.testing.assert_close(sae.b_dec.grad, -(sae.W_enc @ sae.b_enc.grad), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_auxk_is_exactly_zero_with_no_dead_latent(arch):
    sae = _k_family(arch, k=4)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for dead in (None, torch.zeros(F, dtype=torch.bool)):
        out = sae.loss(x, 0, dead_mask_F=dead)
        assert out.terms["auxk"].item() == 0.0
        with_aux = out.total
        sae.zero_grad()
        with_aux.backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
        # the same loss without AuxK: recompute the recon term alone
        sae.zero_grad()
        ref = sae.loss(x, 0, dead_mask_F=dead)
        (ref.total - ref.terms["auxk"]).backward()
        for n, p in sae.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0)
