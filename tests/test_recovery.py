"""Dictionary-recovery metrics (saelab.evals.recovery) on cases with known answers."""

import numpy as np
import pytest
import torch

from saelab.config import SAEConfig
from saelab.evals.recovery import (
    CorrelationAccumulator,
    best_cosines,
    dictionary_recovery,
    evaluate_recovery,
    matched_mcc,
)
from saelab.saes.registry import build_sae

D, M = 32, 96


def unit_rows(n, d, seed):
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def sparse_codes(n, m, seed, signed=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.1)
    if signed:
        codes = codes * torch.where(torch.rand(n, m, generator=g) < 0.5, -1.0, 1.0)
    return codes


def mcc_of(true_codes, latents, signed=False):
    acc = CorrelationAccumulator(true_codes.shape[1], latents.shape[1])
    for s in range(0, len(true_codes), 500):  # several batches: the sums must pool correctly
        acc.update(true_codes[s:s + 500], latents[s:s + 500])
    corr, valid = acc.correlations()
    return matched_mcc(corr, valid, signed=signed)[0]


def test_true_dictionary_scores_one():
    true = unit_rows(M, D, 0)
    rec = dictionary_recovery(true, true)
    assert rec["mean_best_cos"] == pytest.approx(1.0, abs=1e-9)
    assert rec["frac_recovered"] == 1.0
    codes = sparse_codes(2000, M, 1)
    assert mcc_of(codes, codes) == pytest.approx(1.0, abs=1e-9)


def test_random_dictionary_scores_low():
    true = unit_rows(M, D, 0)
    rec = dictionary_recovery(unit_rows(M, D, 7), true)
    # random unit vectors in 32 dims: the best of 96 has |cos| ~ 0.5, never near 0.9
    assert rec["mean_best_cos"] < 0.65
    assert rec["frac_recovered"] == 0.0
    codes = sparse_codes(2000, M, 1)
    assert mcc_of(codes, sparse_codes(2000, M, 2)) < 0.15


def test_permuted_and_sign_flipped_dictionary():
    true = unit_rows(M, D, 0)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(3))
    signs = torch.where(torch.arange(M) % 2 == 0, 1.0, -1.0)
    learned = 2.5 * signs[:, None] * true[perm]  # also rescaled: cosines ignore row norms
    rec = dictionary_recovery(learned, true, signed=True)
    assert rec["mean_best_cos"] == pytest.approx(1.0, abs=1e-9)
    assert rec["frac_recovered"] == 1.0
    # without |cos| the flipped half is not recovered
    assert dictionary_recovery(learned, true, signed=False)["frac_recovered"] == pytest.approx(0.5)
    codes = sparse_codes(2000, M, 1, signed=True)
    latents = 3.0 * codes[:, perm] * signs  # permuted, rescaled, sign-flipped activations
    assert mcc_of(codes, latents, signed=True) == pytest.approx(1.0, abs=1e-9)


def test_best_cosines_picks_the_best_row():
    true = torch.eye(3)
    learned = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    torch.testing.assert_close(best_cosines(learned, true),
                               torch.tensor([2**-0.5, 2**-0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(best_cosines(learned, true, signed=True),
                               torch.tensor([2**-0.5, 2**-0.5, 1.0], dtype=torch.float64))


def test_matching_is_optimal_not_greedy():
    # greedy takes 0.9 then is left with 0.1 (mean 0.5); the optimum pairs crosswise (0.8)
    corr = torch.tensor([[0.9, 0.8], [0.8, 0.1]], dtype=torch.float64)
    assert matched_mcc(corr)[0] == pytest.approx(0.8)


def test_unmatched_features_count_zero_and_silent_features_are_skipped():
    codes = sparse_codes(2000, M, 1)
    assert mcc_of(codes, codes[:, : M // 2]) == pytest.approx(0.5, abs=1e-9)
    codes[:, 0] = 0  # never fires in the held-out set: correlation undefined, not scored
    acc = CorrelationAccumulator(M, M)
    acc.update(codes, codes)
    corr, valid = acc.correlations()
    mcc, scored = matched_mcc(corr, valid)
    assert scored == M - 1 and mcc == pytest.approx(1.0, abs=1e-9)


def test_correlations_match_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(700, 5, generator=g), torch.randn(700, 4, generator=g)
    b[:, 0] += a[:, 2]
    acc = CorrelationAccumulator(5, 4)
    acc.update(a[:300], b[:300])
    acc.update(a[300:], b[300:])
    corr, _ = acc.correlations()
    expected = np.corrcoef(a.numpy().T, b.numpy().T)[:5, 5:]
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-5)


def test_evaluate_recovery_of_an_exact_sae():
    # orthonormal true dictionary (M <= d): a ReLU SAE with W_enc = D^T, W_dec = D and zero
    # biases reconstructs non-negative codes and its latents are the codes (b_enc = -1e-4 cuts
    # the float round-off of x D^T on inactive features; active codes are >= 0.5)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    true = q[:20]
    codes = sparse_codes(3000, 20, 4)
    codes = torch.where(codes > 0, codes + 0.5, 0.0)
    x = codes @ true
    sae = build_sae(SAEConfig(architecture="relu", d_in=D, d_sae=20))
    with torch.no_grad():
        sae.W_dec.copy_(true)
        sae.W_enc.copy_(true.T)
        sae.b_enc.fill_(-1e-4)
        sae.b_dec.zero_()
    m = evaluate_recovery(sae, x, codes, true, batch_size=1000)
    assert m["mean_best_cos"] == pytest.approx(1.0, abs=1e-6)
    assert m["frac_recovered"] == 1.0 and m["mcc"] == pytest.approx(1.0, abs=1e-5)
    assert m["fvu"] < 1e-6
    assert m["l0"] == pytest.approx(float((codes != 0).sum(1).double().mean()))
