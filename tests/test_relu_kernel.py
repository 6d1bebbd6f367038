"""The ReLU SAE's fused training Function against autograd through encode()/decode() (float64),
and under bf16 autocast against float32."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes.registry import build_sae

D, F, B = 12, 40, 33


def _sae(variant: str, dtype=torch.float64):
    sae = build_sae(SAEConfig(architecture="relu", d_in=D, d_sae=F, variant=variant),
                    dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # biases away from 0 so every term has a gradient
        sae.b_enc.copy_(0.3 * torch.randn(F, dtype=dtype))
        sae.b_dec.copy_(0.3 * torch.randn(D, dtype=dtype))
    return sae


def _reference_loss(sae, x, step):
    """The loss written the plain way: autograd through encode() and decode()."""
    f = sae.encode(x)
    recon = sae.decode(f)
    mse = (recon - x).pow(2).sum(-1).mean()
    if sae.cfg.variant == "april":
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    else:
        sparsity = f.sum(-1).mean()
    return mse + sae.cfg.l1_coefficient * sae.sparsity_scale(step) * sparsity, f


@pytest.mark.parametrize("variant", ["april", "tm"])
def test_fused_loss_and_gradients_match_autograd(variant):
    sae = _sae(variant)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
    out = sae.loss(x, step=10**6)
    ref, f_ref = _reference_loss(sae, x, 10**6)
    assert 0.2 < (f_ref > 0).float().mean() < 0.8  # both sides of the ReLU exercised
    torch.testing.assert_close(out.total, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.latents, f_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.fired_F, (f_ref > 0).any(0))
    for name, a, b in zip(("W_enc", "b_enc", "b_dec", "W_dec"),
                          torch.autograd.grad(out.total, params),
                          torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_under_autocast_is_close_to_float32():
    sae = _sae("april", torch.float32)
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(2))
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
    got = {}
    for on in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            out = sae.loss(x, step=10**6)
        assert out.recon.dtype == torch.float32
        got[on] = (out.total.detach(), *torch.autograd.grad(out.total, params))
    for a, b in zip(got[True], got[False], strict=True):
        assert (a - b).norm() / b.norm() < 3e-2
    assert not torch.equal(got[True][1], got[False][1])  # the bf16 path did run
