"""Gradient pursuit (docs/methods.md §12.5a): against a naive per-token loop, and support recovery."""

from __future__ import annotations

import torch

from saelab.saes._gradient_pursuit import GPEncodedSAE, dense_codes, gp_encode, gradient_pursuit


def naive_gp(x_D: torch.Tensor, D_FD: torch.Tensor, steps: int) -> torch.Tensor:
    """One token, dense weights, written straight from the pseudo-code (float64)."""
    w = torch.zeros(D_FD.shape[0], dtype=torch.float64)
    for _ in range(steps):
        r = x_D - w @ D_FD
        c = D_FD @ r
        sel = w != 0
        sel[int(torch.argmax(c))] = True
        g = torch.where(sel, c, torch.zeros_like(c))
        q = g @ D_FD
        eta = float(q @ r) / float(q @ q) if float(q @ q) > 0 else 0.0
        w = torch.clamp(w + eta * g, min=0)
    return w


def test_matches_naive_loop_per_token_steps():
    gen = torch.Generator().manual_seed(0)
    D_FD = torch.randn(48, 12, generator=gen, dtype=torch.float64)
    D_FD /= D_FD.norm(dim=1, keepdim=True)
    x_BD = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    steps_B = torch.randint(0, 9, (20,), generator=gen)
    idx, val = gradient_pursuit(x_BD, D_FD, steps_B)
    got = dense_codes(idx, val, 48)
    for b in range(20):
        want = naive_gp(x_BD[b], D_FD, int(steps_B[b]))
        torch.testing.assert_close(got[b], want, atol=1e-10, rtol=1e-8)
        assert int((got[b] != 0).sum()) <= int(steps_B[b])
    assert (got >= 0).all()
    assert (got[steps_B == 0] == 0).all()


def test_recovers_support_of_sparse_nonnegative_codes():
    gen = torch.Generator().manual_seed(1)
    d, F, k, B = 64, 256, 4, 200
    D_FD = torch.randn(F, d, generator=gen)
    D_FD /= D_FD.norm(dim=1, keepdim=True)
    support = torch.stack([torch.randperm(F, generator=gen)[:k] for _ in range(B)])
    coef = 1.0 + torch.rand(B, k, generator=gen)
    codes = torch.zeros(B, F).scatter_(1, support, coef)
    x_BD = codes @ D_FD
    idx, val = gradient_pursuit(x_BD, D_FD, 3 * k)
    got = dense_codes(idx, val, F)
    top = got.topk(k, dim=1).indices.sort(1).values
    recovered = (top == support.sort(1).values).all(1).float().mean()
    assert recovered >= 0.95, recovered
    recon = got @ D_FD
    assert float((recon - x_BD).norm() / x_BD.norm()) < 0.05


class _TinySAE(torch.nn.Module):
    """ReLU SAE with non-unit decoder rows and a b_dec, for the wrapper."""

    def __init__(self, d: int, F: int, gen: torch.Generator):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.randn(d, F, generator=gen))
        self.W_dec = torch.nn.Parameter(torch.randn(F, d, generator=gen) * 3)
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=gen))
        self.b_enc = torch.nn.Parameter(-torch.ones(F) * 2)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def test_gp_wrapper_uses_sae_l0_and_rescales_to_the_decoder():
    gen = torch.Generator().manual_seed(2)
    sae = _TinySAE(10, 40, gen)
    x = torch.randn(16, 10, generator=gen) * 2
    gp = GPEncodedSAE(sae)
    with torch.no_grad():
        f = gp.encode(x)
        l0 = (sae.encode(x) != 0).sum(1)
        assert ((f != 0).sum(1) <= l0).all()
        # same as plain GP on unit atoms of x - b_dec, weights divided by the row norms
        norms = sae.W_dec.norm(dim=1)
        unit = sae.W_dec / norms[:, None]
        for b in range(16):
            w = naive_gp((x[b] - sae.b_dec).double(), unit.double(), int(l0[b]))
            torch.testing.assert_close(f[b].double(), w / norms.double(), atol=1e-4, rtol=1e-4)
        out = gp(x)
        torch.testing.assert_close(out.recon, f @ sae.W_dec + sae.b_dec)
        assert gp.W_dec is sae.W_dec
        fixed = gp_encode(x, sae.W_dec, sae.b_dec, 3)
        assert ((fixed != 0).sum(1) <= 3).all()


def test_gp_wrapper_through_the_reconstruction_eval():
    """`GPEncodedSAE(sae)` drops into the library's eval (what `--encoder gp` would run)."""
    from saelab.config import SAEConfig
    from saelab.evals.evaluate import reconstruction_eval
    from saelab.saes.registry import build_sae

    gen = torch.Generator().manual_seed(3)
    sae = build_sae(SAEConfig(architecture="topk", d_in=12, d_sae=48, options={"k": 5}),
                    generator=gen)
    x = torch.randn(64, 12, generator=gen)
    gp = GPEncodedSAE(sae)
    m = reconstruction_eval(gp, iter([x[:40], x[40:]])).compute()
    with torch.no_grad():
        recon = gp(x).recon.double()
    xd = x.double()
    fvu = float(((xd - recon) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert abs(m["fvu"] - fvu) < 1e-5
    assert m["l0"] <= 5 + 1e-9
