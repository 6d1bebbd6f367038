"""JumpReLU SAE (docs/methods.md §3): the function, folding, the registry, the gated → JumpReLU
conversion, the straight-through estimators (§16.4) and training with each sparsity loss."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import ConfigError
from saelab.saes.jumprelu import (
    THRESHOLD_FLOOR,
    JumpReLUFunction,
    JumpReLUOptions,
    JumpReLUSAE,
    StepCount,
)
from saelab.saes.registry import architectures, build_sae, get_family, validate_sae_config
from saelab.train.trainer import Trainer

D_IN, D_SAE = 12, 48


def _sae(apply_b_dec_to_input: bool = False, seed: int = 0) -> JumpReLUSAE:
    cfg = SAEConfig(
        architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec_to_input
    )
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) * 2 + 0.2)  # non-unit decoder norms
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
        sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 1.5)
    return sae


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_encode_is_pi_times_step(b_dec_in):
    sae = _sae(b_dec_in)
    x = _x()
    x_in = x - sae.b_dec if b_dec_in else x
    pi = x_in @ sae.W_enc + sae.b_enc
    expected = pi * (pi > sae.threshold).float()
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f, expected)
        torch.testing.assert_close(sae(x).recon, f @ sae.W_dec + sae.b_dec)
    frac = (f != 0).float().mean()
    assert 0.05 < frac < 0.95  # the threshold actually gates
    assert (f[f != 0] > 0).all()


def test_negative_threshold_acts_as_relu():
    # SAELens computes ReLU(π)·1[π > θ]; a negative θ must not let negative π through.
    sae = _sae()
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
        x = _x()
        torch.testing.assert_close(sae.encode(x), torch.relu(sae.pre_acts(x)))


def test_fold_decoder_norms_keeps_function():
    sae = _sae(True)
    x = _x()
    with torch.no_grad():
        f_before, recon_before = sae.encode(x), sae(x).recon
        norms = sae.W_dec.norm(dim=1)
        sae.fold_decoder_norms()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
        torch.testing.assert_close(sae(x).recon, recon_before, atol=1e-4, rtol=0)
        # latents become f_i·‖d_i‖ (docs/methods.md §1.5): the same firing pattern, rescaled
        torch.testing.assert_close(sae.encode(x), f_before * norms, atol=1e-4, rtol=1e-5)


def test_fold_input_scale():
    sae = _sae(True)
    c = 3.7
    x = _x()
    with torch.no_grad():
        f_before, recon_before = sae.encode(c * x), sae(c * x).recon
        sae.fold_input_scale(c)
        torch.testing.assert_close(sae(x).recon, recon_before / c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.encode(x), f_before / c, atol=1e-5, rtol=1e-5)


def test_registry_defaults_and_init():
    assert get_family("jumprelu") is JumpReLUSAE
    assert "jumprelu" in architectures(trainable_only=True)
    sae = build_sae(SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE))
    assert sae.cfg.apply_b_dec_to_input is False  # Gemma Scope convention
    assert sae.cfg.normalize_activations == "scalar_unit_mean_sq_norm"  # §3.4
    assert sae.unit_norm_decoder  # N1, §3.5
    assert JumpReLUSAE.train_defaults["adam_beta1"] == 0.0  # §3.6
    assert sae.saelens_architecture == "jumprelu"
    assert set(sae.bias_names()) == {"b_dec", "b_enc", "threshold"}
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert torch.all(sae.threshold == 1e-3) and torch.all(sae.b_enc == 0)
    assert sae.saelens_extra_cfg() == {"apply_b_dec_to_input": False}
    levels = JumpReLUSAE.sweep_levels
    assert len(levels) == 3 and list(levels) == sorted(levels, reverse=True)  # high λ first
    assert levels[0] > sae.cfg.l1_coefficient > levels[-1]


def test_default_lambda_depends_on_sparsity_loss():
    def lam(loss):
        cfg = SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE,
                        options=JumpReLUOptions(sparsity_loss=loss))
        return build_sae(cfg).cfg.l1_coefficient

    assert lam("target_l0") == 1.0  # dictionary_learning's coefficient [C]
    assert lam("l0") != lam("target_l0")
    explicit = SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.3)
    assert build_sae(explicit).cfg.l1_coefficient == 0.3


@pytest.mark.parametrize("opts", [{"sparsity_loss": "l1"}, {"target_l0": 0.0},
                                  {"bandwidth": -1.0}, {"pre_act_coefficient": -1.0}])
def test_bad_options_are_config_errors(opts):
    cfg = SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE,
                    options=JumpReLUOptions(**opts))
    with pytest.raises(ConfigError):
        validate_sae_config(cfg)
    with pytest.raises(ConfigError):
        build_sae(cfg)


def test_init_threshold_option():
    cfg = SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE,
                    options=JumpReLUOptions(init_threshold=0.05))
    assert torch.all(build_sae(cfg).threshold == 0.05)


@pytest.mark.skipif("gated" not in architectures(), reason="gated family not present")
def test_gated_to_jumprelu_is_exact():
    cfg = SAEConfig(architecture="gated", d_in=D_IN, d_sae=D_SAE)
    g = torch.Generator().manual_seed(3)
    gated = build_sae(cfg, generator=g)
    with torch.no_grad():
        for name in ("b_gate", "b_mag", "r_mag", "b_dec"):
            getattr(gated, name).copy_(
                torch.randn(D_SAE if name != "b_dec" else D_IN, generator=g) * 0.5
            )
    jr = gated.to_jumprelu()
    assert isinstance(jr, JumpReLUSAE)
    assert jr.cfg.apply_b_dec_to_input == gated.cfg.apply_b_dec_to_input
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(jr.encode(x), gated.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(jr(x).recon, gated(x).recon, atol=1e-5, rtol=1e-5)


# ---- straight-through estimators (docs/methods.md §3.3, §16.4) -------------------------------------------
EPS = 1e-3


def _pi_near_theta(n: int = 400, f: int = 6, seed: int = 0):
    """float64 pre-activations spread over θ ± 3ε, so some fall inside the kernel window.

    Values within 2e-5 of a window edge or of θ are nudged away, so finite differences with a
    step of 1e-6 never cross a discontinuity.
    """
    g = torch.Generator().manual_seed(seed)
    theta = (0.05 + 0.1 * torch.rand(f, generator=g, dtype=torch.float64))
    pi = theta + (torch.rand(n, f, generator=g, dtype=torch.float64) - 0.5) * 6 * EPS
    for edge in (-0.5 * EPS, 0.0, 0.5 * EPS):
        d = pi - theta - edge
        pi = torch.where(d.abs() < 2e-5, pi + 4e-5 * torch.sign(d + 1e-12), pi)
    return pi, theta


def test_l0_term_sends_no_gradient_to_the_encoder():
    sae = _sae(seed=4)
    with torch.no_grad():
        sae.threshold.copy_(sae.pre_acts(_x()).median(0).values)  # half of the batch fires
    out = sae.loss(_x(), step=10**6)
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec, sae.threshold]
    grads = torch.autograd.grad(out.terms["sparsity"], params, allow_unused=True,
                                materialize_grads=True, retain_graph=True)
    for name, g in zip(("W_enc", "b_enc", "b_dec", "W_dec"), grads[:4], strict=True):
        assert torch.all(g == 0), name
    assert (grads[4] != 0).any()  # ...but it does reach θ
    # the reconstruction term does reach the encoder (the check above is not vacuous)
    g_enc = torch.autograd.grad(out.terms["mse"], sae.W_enc)[0]
    assert g_enc.abs().sum() > 0


@pytest.mark.parametrize("fn", [JumpReLUFunction, StepCount])
def test_theta_gradient_only_from_samples_in_the_window(fn):
    pi, theta = _pi_near_theta(n=60)
    in_win = (pi - theta).abs() < EPS / 2
    assert in_win.any() and (~in_win).any()
    for b in range(pi.shape[0]):
        th = theta.clone().requires_grad_(True)
        out = fn.apply(pi[b:b + 1], th, EPS)
        g = torch.autograd.grad(out.sum(), th)[0]
        assert torch.equal(g != 0, in_win[b]), b


def test_l0_pseudo_gradient_matches_smoothed_step_by_finite_differences():
    # H(π − θ) → rectangle-kernel CDF clip((π − θ)/ε + ½, 0, 1); its exact θ-derivative is the
    # pseudo-gradient −(1/ε)K((π − θ)/ε) (§16.4).
    pi, theta = _pi_near_theta()
    weights = torch.rand(theta.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)

    def smoothed(th):
        return (((pi - th) / EPS + 0.5).clamp(0, 1).sum(0) * weights).sum()

    th = theta.clone().requires_grad_(True)
    pseudo = torch.autograd.grad((StepCount.apply(pi, th, EPS) * weights).sum(), th)[0]
    h = 1e-6
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        fd = (smoothed(theta + e) - smoothed(theta - e)) / (2 * h)
        assert fd != 0
        torch.testing.assert_close(pseudo[i], fd, rtol=1e-6, atol=0)


def test_jumprelu_pseudo_gradient_matches_smoothed_derivative_to_eps_over_theta():
    # The smoothed output π·CDF((π − θ)/ε) has θ-derivative −(π/ε)K; the pseudo-gradient uses θ
    # for π, so they agree to a relative error below ε/(2θ) (§16.4).
    pi, theta = _pi_near_theta(seed=2)
    g_out = torch.rand(pi.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def smoothed(th):
        return (pi * ((pi - th) / EPS + 0.5).clamp(0, 1) * g_out).sum()

    th = theta.clone().requires_grad_(True)
    pseudo = torch.autograd.grad((JumpReLUFunction.apply(pi, th, EPS) * g_out).sum(), th)[0]
    h = 1e-6
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        fd = (smoothed(theta + e) - smoothed(theta - e)) / (2 * h)
        assert fd < 0
        rel = ((pseudo[i] - fd) / fd).abs()
        assert rel < EPS / theta[i], (i, rel)
    # π's gradient is the true derivative 1[π > θ], with no STE
    p = pi.clone().requires_grad_(True)
    g_pi = torch.autograd.grad((JumpReLUFunction.apply(p, theta, EPS) * g_out).sum(), p)[0]
    torch.testing.assert_close(g_pi, g_out * (pi > theta))


def test_loss_terms_and_outputs():
    sae = _sae(seed=5)
    with torch.no_grad():
        sae.threshold.copy_(sae.pre_acts(_x()).quantile(0.7, dim=0))
    x = _x()
    out = sae.loss(x, step=10**6)
    f = sae.encode(x)
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.terms["mse"], (sae(x).recon - x).pow(2).sum(-1).mean())
    l0 = (f != 0).sum(-1).float().mean()
    torch.testing.assert_close(out.l0, l0)
    torch.testing.assert_close(out.terms["sparsity"], l0)
    assert torch.equal(out.fired_F, (f != 0).any(0))
    torch.testing.assert_close(out.total, out.terms["mse"] + sae.cfg.l1_coefficient * l0)


# ---- training -----------------------------------------------------------------------------------
D, N_FEAT, F, B = 16, 32, 64, 128


def _sparse_batches(seed: int = 0):
    """Sparse superposition data (~2 of 32 unit directions per row), E‖x‖² ≈ 1."""
    dirs = torch.nn.functional.normalize(
        torch.randn(N_FEAT, D, generator=torch.Generator().manual_seed(7)), dim=1)
    i = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        codes = (torch.rand(B, N_FEAT, generator=g) < 0.06) * (0.5 + torch.rand(B, N_FEAT,
                                                                                 generator=g))
        yield codes @ dirs / 1.5
        i += 1


def _train(steps: int, lam: float | None, lr: float | None = None,
           **opts) -> tuple[JumpReLUSAE, dict, dict]:
    cfg = SAEConfig(architecture="jumprelu", d_in=D, d_sae=F, l1_coefficient=lam,
                    options=JumpReLUOptions(**opts))
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0))
    x = next(_sparse_batches(seed=99))
    sae.init_from_data(x)

    def evaluate():
        with torch.no_grad():
            o = sae.loss(x, step=10**9)
        return {"total": o.total.item(), "mse": o.terms["mse"].item(), "l0": o.l0.item()}

    before = evaluate()
    tcfg = TrainConfig(tokens=B * steps, batch_size=B, lr=lr, lr_warmup_steps=5, log_every=10**9,
                       dead_window_tokens=B * 5)
    Trainer(sae, tcfg, progress=False).fit(_sparse_batches())
    return sae, before, evaluate()


def test_training_lowers_loss_and_l0():
    sae, before, after = _train(120, lam=0.02)
    assert after["total"] < 0.5 * before["total"]
    assert after["mse"] < before["mse"]
    assert after["l0"] < 0.5 * before["l0"]
    assert sae.threshold.min() > 0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F), atol=1e-5, rtol=0)
    # the exported SAE (N3 fold + input-scale fold) still computes the same function
    x = next(_sparse_batches(seed=5))
    with torch.no_grad():
        recon = sae(x).recon
        sae.fold_decoder_norms()
        torch.testing.assert_close(sae(x).recon, recon, atol=1e-4, rtol=1e-4)


def test_target_l0_moves_l0_toward_target():
    target = 4.0
    # LR 3e-3: Adam moves θ about one LR per step, and 120 steps at 1e-3 do not get there
    sae, before, after = _train(120, lam=None, lr=3e-3, sparsity_loss="target_l0",
                                target_l0=target)
    assert sae.cfg.l1_coefficient == 1.0
    assert before["l0"] > 4 * target  # starts far from the target
    assert abs(after["l0"] - target) < 0.35 * abs(before["l0"] - target)
    assert after["total"] < before["total"]


def test_tanh_variant_trains_with_pre_act_loss():
    sae, before, after = _train(80, lam=0.02, sparsity_loss="tanh", pre_act_coefficient=1e-2)
    assert after["total"] < 0.5 * before["total"]
    assert after["l0"] < before["l0"]
    assert sae.threshold.min() > 0


def test_pre_act_loss_only_touches_dead_latents():
    sae = _sae(seed=6)
    sae.cfg.options.pre_act_coefficient = 1.0
    x = _x()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:5] = True
    out = sae.loss(x, step=10**6, dead_mask_F=dead)
    pi = sae.pre_acts(x)
    expected = ((sae.threshold - pi).relu()[:, :5] * sae.W_dec.norm(dim=1)[:5]).sum(-1).mean()
    torch.testing.assert_close(out.terms["pre_act"], expected)
    g = torch.autograd.grad(out.terms["pre_act"], sae.W_enc)[0]
    assert (g[:, :5] != 0).any() and torch.all(g[:, 5:] == 0)
    assert "pre_act" not in sae.loss(x, step=0).terms  # no dead mask: no term


def test_threshold_stays_positive_without_sparsity_pressure():
    # λ = 0: the reconstruction pseudo-gradient only ever lowers θ, so without the clamp it would
    # cross zero within a few dozen steps at this LR.
    sae, _, _ = _train(60, lam=0.0)
    assert sae.threshold.min() >= THRESHOLD_FLOOR
    assert (sae.threshold == THRESHOLD_FLOOR).any()  # the clamp was actually needed
