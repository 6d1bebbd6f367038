"""The sparse training path of the L1 families (relu, gated): once few latents are active, their
loss decodes and differentiates over the active entries only. It must give the loss and the
gradients of plain autograd through the dense model (written out here, independently of the
families' kernels), and the trainer must get the same L0 and fired latents."""

import copy

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes.registry import build_sae, with_family

D, F, B = 12, 48, 40


def _sae(arch: str, variant: str, sub: bool, b_act: float):
    cfg = with_family(SAEConfig(architecture=arch, d_in=D, d_sae=F, variant=variant,
                                apply_b_dec_to_input=sub), strict=False)
    torch.manual_seed(0)
    sae = build_sae(cfg).double()
    sae.init_from_data(torch.randn(B, D, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every vector off its init so each gradient term matters
        for p in sae.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        # b_act sets the density: the gate / encoder bias shifts how many latents are active
        (sae.b_gate if arch == "gated" else sae.b_enc).add_(b_act)
        sae.W_dec.mul_(1 + 0.5 * torch.rand(F, 1, generator=g, dtype=torch.float64))
    return sae


def _reference_loss(sae, x, step):
    """The family's loss by autograd through dense tensors (docs/methods.md §1, §2)."""
    lam = sae.cfg.l1_coefficient * sae.sparsity_scale(step)
    W_dec, b_dec = sae.W_dec, sae.b_dec
    h = (x - b_dec if sae.cfg.apply_b_dec_to_input else x) @ sae.W_enc
    if sae.architecture == "relu":
        f = torch.relu(h + sae.b_enc)
        recon = f @ W_dec + b_dec
        l1 = (f @ W_dec.norm(dim=1)).mean() if sae.cfg.variant == "april" else f.sum(-1).mean()
        return ((recon - x) ** 2).sum(-1).mean() + lam * l1, f
    pi_gate = h + sae.b_gate
    pi_mag = h * sae.r_mag.exp() + sae.b_mag
    f = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
    g = torch.relu(pi_gate)
    recon = f @ W_dec + b_dec
    if sae.cfg.variant == "paper":
        l1, aux_recon = g.sum(-1).mean(), g @ W_dec.detach() + b_dec.detach()
    else:
        l1, aux_recon = (g @ W_dec.norm(dim=1)).mean(), g @ W_dec + b_dec
    mse = ((recon - x) ** 2).sum(-1).mean()
    return mse + lam * l1 + ((aux_recon - x) ** 2).sum(-1).mean(), f


CASES = [("relu", "april", False), ("relu", "tm", True), ("gated", "paper", True),
         ("gated", "paper", False), ("gated", "april", True)]


@pytest.mark.parametrize("arch,variant,sub", CASES)
def test_sparse_path_matches_dense_autograd(arch, variant, sub):
    sae = _sae(arch, variant, sub, b_act=-0.4)
    sae.sparsity_warmup_steps = 10
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    sae.sparse_density = 1.0  # always the sparse path
    out = sae.loss(x, step=3)
    assert out.latents is None  # the sparse path ran
    out.total.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}

    ref_sae = copy.deepcopy(sae)
    ref_sae.zero_grad(set_to_none=True)
    total, f_ref = _reference_loss(ref_sae, x, step=3)
    total.backward()
    assert 0 < (f_ref > 0).sum() < f_ref.numel() / 2  # a sparse code, with gradient everywhere
    torch.testing.assert_close(out.total, total)
    for n, p in ref_sae.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=f"d{n}")
    torch.testing.assert_close(out.recon, f_ref @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.l0, (f_ref > 0).sum(-1).double().mean().to(out.l0))
    assert torch.equal(out.fired_F, (f_ref > 0).any(0))


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_path_follows_the_density(arch):
    x = torch.randn(B, D, dtype=torch.float64)
    variant = "april" if arch == "relu" else "paper"
    sparse = _sae(arch, variant, True, b_act=-3.0)  # almost nothing active
    dense = _sae(arch, variant, True, b_act=+3.0)  # almost everything active
    assert sparse.loss(x, 0).latents is None
    out = dense.loss(x, 0)
    assert out.latents is not None and out.latents.shape == (B, F)


@pytest.mark.parametrize("arch,variant,sub", [CASES[0], CASES[2]])
def test_sparse_path_under_autocast_is_close_to_dense(arch, variant, sub):
    sae = _sae(arch, variant, sub, b_act=-0.4).float()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3)) * 2
    grads = []
    for density in (0.0, 1.0):
        s = copy.deepcopy(sae)
        s.sparse_density = density
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = s.loss(x, step=3)
        out.total.backward()
        grads.append((out.total.detach(), {n: p.grad for n, p in s.named_parameters()}))
    (t0, g0), (t1, g1) = grads
    torch.testing.assert_close(t1, t0, rtol=2e-2, atol=0)
    for n in g0:
        scale = g0[n].abs().max()
        assert (g1[n] - g0[n]).abs().max() <= 0.05 * scale, n
