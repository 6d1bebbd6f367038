"""Batched matching pursuit against a naive per-row float64 loop (docs/methods.md §9.2)."""

from __future__ import annotations

import pytest
import torch

from saelab.saes._matching_pursuit import (
    BLOCK,
    dense_code,
    matching_pursuit,
    normalised_error,
    padded_gram,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_mp(x_D, D_ND, k, nonneg):
    """The spec's loop, one row, float64, Python scalars for the choice."""
    r = x_D.clone()
    code = torch.zeros(D_ND.shape[0], dtype=torch.float64)
    for _ in range(k):
        c = D_ND @ r
        if nonneg:
            i = int(torch.argmax(c))
            a = max(float(c[i]), 0.0)
        else:
            i = int(torch.argmax(c.abs()))
            a = float(c[i])
        code[i] += a
        r = r - a * D_ND[i]
    return code, x_D - r


def _data(n_atoms, d=12, rows=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=g, dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return x, D


@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("n_atoms", [7, BLOCK, BLOCK + 3])  # padding below, at and above a block
@pytest.mark.parametrize("use_gram", [False, True])
def test_mp_matches_naive_loop(nonneg, n_atoms, use_gram):
    x, D = _data(n_atoms)
    k = 6
    gram = padded_gram(D) if use_gram else None
    res = matching_pursuit(x, D, k, nonneg=nonneg, gram_NN=gram, chunk_rows=4)
    code = dense_code(res.idx_BK, res.coef_BK, n_atoms)
    for b in range(x.shape[0]):
        ref_code, ref_recon = naive_mp(x[b], D, k, nonneg)
        torch.testing.assert_close(code[b], ref_code, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res.recon_BD[b], ref_recon, rtol=1e-9, atol=1e-9)
    if nonneg:
        assert (res.coef_BK >= 0).all()


def test_nonneg_stops_when_nothing_positive():
    # x = -atom 0 and atoms pairwise orthogonal: no positive correlation, nothing is added
    D = torch.eye(4, dtype=torch.float64)
    x = -D[:1].clone()
    res = matching_pursuit(x, D, 3, nonneg=True, gram_NN=padded_gram(D))
    assert torch.all(res.coef_BK == 0) and torch.all(res.recon_BD == 0)
    signed = matching_pursuit(x, D, 3, nonneg=False, gram_NN=padded_gram(D))
    torch.testing.assert_close(signed.recon_BD, x)


def test_gram_view_into_capacity_buffer_and_float32():
    x, D = _data(40, rows=33, seed=3)
    cap = torch.zeros(64, 2 * BLOCK, dtype=torch.float64)
    cap[:40, :40] = D @ D.T
    a = matching_pursuit(x, D, 5, gram_NN=cap)  # a view into a bigger zero-padded buffer
    b = matching_pursuit(x, D, 5)
    torch.testing.assert_close(a.recon_BD, b.recon_BD)
    f = matching_pursuit(x.float(), D.float(), 5, gram_NN=padded_gram(D.float()))
    torch.testing.assert_close(f.recon_BD.double(), b.recon_BD, rtol=1e-4, atol=1e-4)


def test_exact_recovery_of_orthonormal_code():
    # with an orthonormal dictionary, MP with k >= support recovers the code exactly
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(1)))
    code = torch.zeros(5, 16, dtype=torch.float64)
    code[:, [1, 4, 9]] = torch.tensor([2.0, -1.5, 0.7], dtype=torch.float64)
    x = code @ q.T.contiguous()
    res = matching_pursuit(x, q.T.contiguous(), 3, gram_NN=padded_gram(q.T.contiguous()))
    torch.testing.assert_close(dense_code(res.idx_BK, res.coef_BK, 16), code)


def test_normalised_error_reference():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    xh = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # x/|x| = (0.6, 0.8); mean((0.6-1)^2, 0.8^2) = (0.16 + 0.64) / 2
    torch.testing.assert_close(normalised_error(x, xh), torch.tensor([0.4], dtype=torch.float64))


def test_low_precision_gram_keeps_a_consistent_decomposition():
    """A bf16 Gram (half the bytes per step) still returns recon = sum of coef x atom, and
    its residual is about as small as exact MP's."""
    from saelab.saes._matching_pursuit import padded_gram

    g = torch.Generator().manual_seed(3)
    D = torch.nn.functional.normalize(torch.randn(300, 24, generator=g), dim=1)
    x = torch.randn(50, 2, generator=g) @ D[:2] * 3 + 0.05 * torch.randn(50, 24, generator=g)
    exact = matching_pursuit(x, D, 6, gram_NN=padded_gram(D))
    low = matching_pursuit(x, D, 6, gram_NN=padded_gram(D, torch.bfloat16))
    naive = torch.zeros_like(x)
    for b in range(len(x)):
        for t in range(6):
            naive[b] += low.coef_BK[b, t] * D[low.idx_BK[b, t]]
    torch.testing.assert_close(low.recon_BD, naive, rtol=1e-5, atol=1e-5)
    err = lambda r: (x - r.recon_BD).norm(dim=1).mean()  # noqa: E731
    assert err(low) < 1.5 * err(exact) + 1e-3 and err(low) < 0.2 * x.norm(dim=1).mean()
