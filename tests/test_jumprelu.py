"""JumpReLU SAE: the function, folding, the registry, and the gated → JumpReLU conversion."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.registry import architectures, build_sae, get_family

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
        # latents become f_i·‖d_i‖ (METHODS §1.5): the same firing pattern, rescaled
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
    assert "jumprelu" in architectures()
    assert "jumprelu" not in architectures(trainable_only=True)
    sae = build_sae(SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE))
    assert sae.cfg.apply_b_dec_to_input is False  # Gemma Scope convention
    assert sae.saelens_architecture == "jumprelu"
    assert set(sae.bias_names()) == {"b_dec", "b_enc", "threshold"}
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert torch.all(sae.threshold == 1e-3) and torch.all(sae.b_enc == 0)
    assert sae.saelens_extra_cfg() == {"apply_b_dec_to_input": False}


def test_not_trainable():
    with pytest.raises(NotImplementedError):
        _sae().loss(_x(), step=0)


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
