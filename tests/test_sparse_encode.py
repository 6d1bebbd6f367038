"""The sparse encoder backward of the TopK family (saes/sparse.py) gives autograd's exact
gradients, and TopK-family training through it still learns (docs/methods.md §4, §5, §0.6)."""

import copy

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.saes._topk_base import TopKBaseSAE, TopKOptions
from saelab.saes.registry import architectures, build_sae
from saelab.saes.sparse import (
    SparseCode,
    SparsePreActs,
    attach_grad,
    auxk_loss,
    scatter_rows,
    topk_encode,
    topk_per_batch,
    topk_per_token,
)
from saelab.train.trainer import Trainer

B, D, F, K = 64, 24, 96, 5
f64 = torch.float64


def _params(seed, *, x_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=f64).requires_grad_(x_grad)
    W = torch.randn(D, F, generator=g, dtype=f64).requires_grad_()
    b_enc = (0.3 * torch.randn(F, generator=g, dtype=f64)).requires_grad_()
    b_dec = (0.3 * torch.randn(D, generator=g, dtype=f64)).requires_grad_()
    W_dec = torch.randn(F, D, generator=g, dtype=f64).requires_grad_()
    return x, W, b_enc, b_dec, W_dec


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _downstream(code, W_dec, x):
    """A loss that weights every selected value differently (decode + FVU)."""
    recon = code.decode(W_dec)
    return ((recon - x.detach()) ** 2).sum() + (code.vals ** 3).sum()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("pre_bias", [True, False])
def test_topk_encode_matches_dense_autograd(signed, pre_bias):
    x, W, b_enc, b_dec, W_dec = _params(1, x_grad=True)
    bd = b_dec if pre_bias else None
    code, pre = topk_encode(x, W, b_enc, bd, K, signed=signed)
    wrt = [x, W, b_enc, W_dec] + ([b_dec] if pre_bias else [])
    sparse = _grads(_downstream(code, W_dec, x), wrt)

    pi = ((x - b_dec) if pre_bias else x) @ W + b_enc
    dense_code = topk_per_token(pi, K, signed=signed)
    dense = _grads(_downstream(dense_code, W_dec, x), wrt)

    torch.testing.assert_close(pre.dense, pi.detach())
    assert torch.equal(code.idx, dense_code.idx)
    torch.testing.assert_close(code.vals, dense_code.vals)
    if signed:
        assert (code.vals < 0).any()  # the test exercises negative (signed) codes
    else:
        assert (code.vals == 0).any() or (pi.topk(K).values > 0).all()
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ragged_codes_and_missing_biases_match_dense_autograd():
    """Batch-level (ragged) selection, no b_enc, selection-zeroed entries stay zero."""
    x, W, _, b_dec, W_dec = _params(2)
    pre = SparsePreActs(x, W, None, b_dec)
    code = topk_per_batch(torch.relu(pre.dense), K * B)
    # zero some selected entries, as Feature Choice does for unmatched slots
    drop = torch.arange(code.vals.numel()) % 7 == 0
    code = code._replace(vals=torch.where(drop, 0.0, code.vals))
    sparse_code = attach_grad(pre, code)
    assert (sparse_code.vals[drop] == 0).all()
    sparse = _grads(_downstream(sparse_code, W_dec, x), [W, b_dec, W_dec])

    pi = (x - b_dec) @ W
    rows = code.rows()
    dense_code = code._replace(vals=torch.where(drop, 0.0, torch.relu(pi[rows, code.idx])))
    dense = _grads(_downstream(dense_code, W_dec, x), [W, b_dec, W_dec])
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dense_decode", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_auxk_sparse_path_matches_dense(signed, dense_decode, monkeypatch):
    import saelab.saes.sparse as sp

    x, W, b_enc, b_dec, W_dec = _params(3)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    resid = torch.randn(B, D, dtype=f64)
    wrt = [W, b_enc, b_dec, W_dec]
    weight = torch.rand(F, dtype=f64) + 0.5
    # candidate: sparse encoder backward, decode forced dense-over-dead or sparse;
    # reference: autograd through the dense π and the sparse (embedding_bag-form) decode
    monkeypatch.setattr(sp, "_AUX_DENSE_DENSITY", 0.0 if dense_decode else 2.0)
    sparse = auxk_loss(SparsePreActs(x, W, b_enc, b_dec), resid, W_dec, dead, 7, signed=signed,
                       scale_by_dead=True, weight_F=weight)
    monkeypatch.setattr(sp, "_AUX_DENSE_DENSITY", 2.0)
    dense = auxk_loss((x - b_dec) @ W + b_enc, resid, W_dec, dead, 7, signed=signed,
                      scale_by_dead=True, weight_F=weight)
    torch.testing.assert_close(sparse, dense)
    g_s, g_d = _grads(sparse, wrt), _grads(dense, wrt)
    for a, b in zip(g_s, g_d, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # only dead latents' encoder columns get gradient
    assert (g_s[0][:, ~dead] == 0).all() and (g_s[0][:, dead] != 0).any()


def test_scatter_rows_is_the_embedding_bag_weight_gradient():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(B, D, generator=g, dtype=f64)
    code = topk_per_token(torch.randn(B, F, generator=g, dtype=f64), K)
    w = torch.randn(B, K, generator=g, dtype=f64)
    ref = torch.zeros(F, D, dtype=f64).index_add_(0, code.idx.flatten(),
                                                  (w[:, :, None] * rows[:, None]).reshape(-1, D))
    torch.testing.assert_close(scatter_rows(code.idx, None, w, rows, F), ref)
    ragged = topk_per_batch(torch.rand(B, F, generator=g, dtype=f64), K * B)
    wr = torch.randn(ragged.idx.numel(), generator=g, dtype=f64)
    ref_r = torch.zeros(F, D, dtype=f64).index_add_(0, ragged.idx, wr[:, None] * rows[ragged.rows()])
    torch.testing.assert_close(scatter_rows(ragged.idx, ragged.offsets, wr, rows, F), ref_r)


@pytest.mark.parametrize("ragged", [False, True])
def test_sparse_decode_matches_embedding_bag_autograd(ragged):
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(B, F, generator=g, dtype=f64)
    code = topk_per_batch(pre.relu(), K * B) if ragged else topk_per_token(pre, K)
    vals = code.vals.clone().requires_grad_()
    W_dec = torch.randn(F, D, generator=g, dtype=f64, requires_grad=True)
    target = torch.randn(B, D, generator=g, dtype=f64)
    ours = code._replace(vals=vals).decode(W_dec)
    offs = None if code.offsets is None else code.offsets[:-1]
    ref = torch.nn.functional.embedding_bag(code.idx, W_dec, offs, per_sample_weights=vals,
                                            mode="sum")
    torch.testing.assert_close(ours, ref)
    g_ours = _grads(((ours - target) ** 2).sum(), [vals, W_dec])
    g_ref = _grads(((ref - target) ** 2).sum(), [vals, W_dec])
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [4096, 4099])
def test_batch_topk_selection_is_exact(n):
    """The chunked flat top-k (BatchTopK) selects exactly the k largest entries."""
    from saelab.saes.sparse import _topk_flat

    v = torch.randn(n, generator=torch.Generator().manual_seed(8), dtype=f64) ** 3
    for k in (1, 100, 300, 2000):
        vals, pos = _topk_flat(v, k)
        assert torch.equal(v[pos], vals) and pos.unique().numel() == k
        assert torch.equal(vals.sort().values, v.topk(k).values.sort().values)
    pre = torch.randn(B, F, generator=torch.Generator().manual_seed(9), dtype=f64)
    a, b = topk_per_batch(pre, K * B, relu=True), topk_per_batch(pre.relu(), K * B)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.idx, b.idx)
    torch.testing.assert_close(a.vals, b.vals)


def test_scatter_rows_sums_repeated_entries():
    idx = torch.tensor([[1, 1, 2], [0, 1, 1]])
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=f64)
    rows = torch.randn(2, 3, dtype=f64)
    ref = torch.zeros(3, 3, dtype=f64).index_add_(0, idx.flatten(),
                                                  (w[:, :, None] * rows[:, None]).reshape(-1, 3))
    torch.testing.assert_close(scatter_rows(idx, None, w, rows, 3), ref)
    torch.testing.assert_close(scatter_rows(idx, None, w, rows, 3, transpose=True), ref.T)


def test_decoder_gradient_projection_is_tangent():
    """N1 (§0.4): g ← g − (g·d̂)d̂ row-wise, so each row's gradient is orthogonal to the row."""
    sae = build_sae(SAEConfig(architecture="topk", d_in=D, d_sae=F), dtype=f64)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1, dtype=f64) + 0.5)  # not unit norm
    g = torch.randn(F, D, dtype=f64)
    sae.W_dec.grad = g.clone()
    sae.project_decoder_grad()
    d_hat = sae.W_dec / (sae.W_dec.norm(dim=1, keepdim=True) + 1e-8)
    torch.testing.assert_close(sae.W_dec.grad, g - (g * d_hat).sum(1, keepdim=True) * d_hat)
    assert (sae.W_dec.grad * d_hat).sum(1).abs().max() < 1e-6  # eps in the norm


def test_fired_counts_only_nonzero_codes():
    idx = torch.tensor([[0, 1], [1, 2]])
    vals = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    fired = SparseCode(idx, vals).fired(4)
    assert fired.tolist() == [False, True, True, False]


def _sparse_families():
    return sorted(name for name, cls in architectures(trainable_only=True).items()
                  if issubclass(cls, TopKBaseSAE) and cls.loss is TopKBaseSAE.loss
                  and cls.sparse_encoder_grad)


@pytest.mark.parametrize("arch", _sparse_families())
def test_family_loss_gradients_equal_dense_path(arch):
    """Every family that trains through TopKBaseSAE.loss gets the dense path's exact gradients,
    AuxK (dead latents) and Multi-TopK included."""
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=F,
                    options=TopKOptions(k=K, aux_k=6, multi_topk=True))
    sae = build_sae(cfg, dtype=f64, generator=torch.Generator().manual_seed(5))
    sae.total_steps = 100
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(F, dtype=f64))
        sae.b_dec.copy_(0.2 * torch.randn(D, dtype=f64))
    x = torch.randn(B, D, dtype=f64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::4] = True

    def run(model, sparse):
        model.sparse_encoder_grad = sparse
        out = model.loss(x, 50, dead_mask_F=dead)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.total, [p for p in model.parameters() if p.requires_grad],
                                    allow_unused=True)
        return out, dict(zip(names, grads, strict=True))

    out_s, g_s = run(copy.deepcopy(sae), True)
    out_d, g_d = run(copy.deepcopy(sae), False)
    torch.testing.assert_close(out_s.total, out_d.total)
    assert out_s.terms["auxk"] > 0
    assert torch.equal(out_s.fired_F, out_d.fired_F)
    for name in g_d:
        if g_d[name] is None:
            assert g_s[name] is None or (g_s[name] == 0).all(), name
        else:
            torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_topk_training_reduces_fvu(arch):
    g = torch.Generator().manual_seed(6)
    dirs = torch.randn(32, D, generator=g)
    codes = torch.rand(2048, 32, generator=g) * (torch.rand(2048, 32, generator=g) < 0.1)
    data = codes @ dirs + 0.01 * torch.randn(2048, D, generator=g)
    sae = build_sae(SAEConfig(architecture=arch, d_in=D, d_sae=64, options=TopKOptions(k=4)),
                    generator=g)
    sae.init_from_data(data)
    x0 = data[:512]
    with torch.no_grad():
        fvu0 = sae.loss(x0, 0).terms["nmse"].item()
    tr = Trainer(sae, TrainConfig(tokens=256 * 50, batch_size=256, log_every=10**9,
                                  checkpoint_every=0, lr=5e-3), progress=False)
    tr.fit(data[(i * 256) % 1792:][:256] for i in range(50))
    with torch.no_grad():
        fvu1 = sae.loss(x0, 0).terms["nmse"].item()
    assert fvu1 < 0.7 * fvu0


def _naive_batch_topk_loss(sae, x, dead):
    """docs/methods.md §4.8 / §13.1 / §0.6 written densely with plain autograd: the global top k·B of
    ReLU(π), batch FVU per prefix (Matryoshka) or of the full code, plus α·AuxK."""
    W, b_enc, b_dec, W_dec = sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec
    acts = torch.relu(((x - b_dec) if sae.cfg.apply_b_dec_to_input else x) @ W + b_enc)
    n, m = acts.shape
    keep = torch.zeros(n * m, dtype=torch.bool)
    keep[acts.detach().flatten().topk(sae.k * n).indices] = True
    f = torch.where(keep.view(n, m), acts, 0.0)
    var = ((x - x.mean(0)) ** 2).sum()
    ends = getattr(sae, "prefix_ends", (m,))
    recon = [f[:, :e] @ W_dec[:e] + b_dec for e in ends]
    fvu = [((r - x) ** 2).sum() / var for r in recon]
    if hasattr(sae, "prefix_ends") and sae.cfg.options.include_b_dec_term:
        fvu.append(((b_dec - x) ** 2).sum() / var)
    main = torch.stack(fvu).mean()
    e = (x - recon[-1]).detach()
    p_dead = torch.where(dead, acts, -torch.inf)
    v, i = p_dead.topk(min(sae.k_aux, int(dead.sum())), dim=1)
    e_hat = torch.zeros_like(acts).scatter(1, i, torch.relu(v)) @ W_dec
    aux = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return main + sae.cfg.options.aux_coefficient * aux, f


@pytest.mark.parametrize("pre_bias", [True, False])
@pytest.mark.parametrize("arch", ["batchtopk", "mutual_choice", "matryoshka"])
def test_batch_level_loss_matches_naive_spec(arch, pre_bias):
    """The full training loss of the batch-level families (ragged codes, sparse encoder
    backward, sparse decode, AuxK) equals a naive dense float64 implementation of the spec,
    in value and in every parameter gradient, on a batch whose rows get from 0 to > 3k
    latents."""
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=F, apply_b_dec_to_input=pre_bias,
                    options=TopKOptions(k=K, aux_k=6))
    sae = build_sae(cfg, dtype=f64, generator=torch.Generator().manual_seed(8))
    sae.total_steps = 100
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(F, generator=g, dtype=f64))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g, dtype=f64))
    # row norms spread over 3 orders of magnitude: small rows lose the global selection
    x = torch.randn(B, D, generator=g, dtype=f64) * torch.logspace(-2, 1, B, dtype=f64)[:, None]
    dead = torch.zeros(F, dtype=torch.bool)
    dead[2::5] = True
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]

    out = sae.loss(x, 0, dead_mask_F=dead)
    ref, f_ref = _naive_batch_topk_loss(sae, x, dead)
    row_l0 = (f_ref != 0).sum(1)
    assert row_l0.min() == 0 and row_l0.max() > 3 * K  # the ragged layout is exercised
    assert out.l0 == K and (f_ref != 0).sum() == K * B  # training L0 is exactly k
    assert torch.equal(out.fired_F, (f_ref != 0).any(0))
    assert out.terms["auxk"] > 0
    torch.testing.assert_close(out.total, ref, rtol=1e-10, atol=1e-12)
    ours = torch.autograd.grad(out.total, params)
    naive = torch.autograd.grad(ref, params)
    for name, a, b in zip(("W_enc", "b_enc", "b_dec", "W_dec"), ours, naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False), (False, False)])
def test_dead_columns_decode_backward_matches_dense_autograd(biases):
    """AuxK's fused dense regime ``(m ⊙ π[:, cols]) @ W_dec[cols]``: exact gradients for x,
    W_enc, b_enc, b_dec and W_dec at the chosen columns (zero elsewhere), either bias absent."""
    x, W, b_enc, b_dec, W_dec = _params(7, x_grad=True)
    has_enc, has_dec = biases
    be, bd = (b_enc if has_enc else None), (b_dec if has_dec else None)
    cols = torch.tensor([3, 50, 7, 95, 0, 41])
    g = torch.Generator().manual_seed(8)
    m_BN = torch.rand(B, len(cols), generator=g, dtype=f64) * (torch.rand(B, len(cols), generator=g) > 0.4)
    w_BD = torch.randn(B, D, generator=g, dtype=f64)
    wrt = [x, W, W_dec] + ([b_enc] if has_enc else []) + ([b_dec] if has_dec else [])
    e_hat = SparsePreActs(x, W, be, bd).decode_columns(cols, m_BN, W_dec)
    cand = _grads((e_hat**2 * w_BD).sum(), wrt)
    pi = ((x - b_dec) if has_dec else x) @ W + (b_enc if has_enc else 0)
    ref_e = (pi[:, cols] * m_BN) @ W_dec[cols]
    torch.testing.assert_close(e_hat, ref_e, rtol=1e-12, atol=1e-12)
    ref = _grads((ref_e**2 * w_BD).sum(), wrt)
    for a, b in zip(cand, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    other = torch.ones(F, dtype=torch.bool)
    other[cols] = False
    assert (cand[1][:, other] == 0).all() and (cand[2][other] == 0).all()
    assert (cand[1][:, cols] != 0).any() and (cand[2][cols] != 0).any()


def test_dead_columns_decode_under_autocast_is_close_to_float32():
    """Under bf16 autocast both directions run their GEMMs in bf16 and return float32 within
    bf16 rounding of the float32 result (the backward replays the autocast state)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=g)
    W = torch.randn(32, 96, generator=g, requires_grad=True)
    W_dec = torch.randn(96, 32, generator=g, requires_grad=True)
    cols = torch.arange(0, 96, 3)
    m_BN = (torch.rand(64, len(cols), generator=g) > 0.5).float()
    out = {}
    for mode in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode):
            pre = SparsePreActs(x, W)
            e = pre.decode_columns(cols, m_BN, W_dec)
            loss = (e.float() ** 2).sum()
        assert e.dtype == torch.float32
        out[mode] = (e.detach(), *torch.autograd.grad(loss, [W, W_dec]))
    for a, b in zip(out[True], out[False], strict=True):
        assert ((a - b).norm() / b.norm()) < 2e-2
    assert not torch.equal(out[True][1], out[False][1])  # the backward did run in bf16


def test_auxk_matches_naive_loop():
    """AuxK in both regimes against a per-row loop over the dead latents (float64)."""
    import saelab.saes.sparse as sp

    x, W, b_enc, b_dec, W_dec = _params(9)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[5::2] = True
    resid = torch.randn(B, D, dtype=f64)
    k_aux = 6
    pi = ((x - b_dec) @ W + b_enc).detach()
    e_hat = torch.zeros(B, D, dtype=f64)
    for b in range(B):
        dead_ids = [i for i in range(F) if dead[i]]
        best = sorted(dead_ids, key=lambda i: -float(pi[b, i]))[:k_aux]
        for i in best:
            e_hat[b] += max(float(pi[b, i]), 0.0) * W_dec[i].detach()
    want = ((e_hat - resid) ** 2).sum() / ((resid - resid.mean(0)) ** 2).sum()
    for density in (0.0, 2.0):
        sp_density = sp._AUX_DENSE_DENSITY
        sp._AUX_DENSE_DENSITY = density
        try:
            got = auxk_loss(SparsePreActs(x, W, b_enc, b_dec), resid, W_dec, dead, k_aux)
        finally:
            sp._AUX_DENSE_DENSITY = sp_density
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_gsae_sparse_loss_gradients_equal_dense_path(beta):
    """g-SAE's sparse encoder backward (selection by the gradient score on a detached π) gives
    the gradients of autograd through the dense π, AuxK included (float64)."""
    cfg = SAEConfig(architecture="gsae", d_in=D, d_sae=F,
                    options={"k": K, "aux_k": 6, "beta": beta, "grad_norm": "per_token_l2"})
    sae = build_sae(cfg, dtype=f64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(F, dtype=f64))
        sae.b_dec.copy_(0.2 * torch.randn(D, dtype=f64))
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, D, generator=g, dtype=f64)
    lm_grad = torch.randn(B, D, generator=g, dtype=f64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[2::5] = True

    def run(model, sparse):
        model.sparse_encoder_grad = sparse
        out = model.loss(x, 3, dead_mask_F=dead, grad_BD=lm_grad)
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out.total, params)

    out_s, g_s = run(copy.deepcopy(sae), True)
    out_d, g_d = run(copy.deepcopy(sae), False)
    torch.testing.assert_close(out_s.total, out_d.total)
    assert out_s.terms["auxk"] > 0
    for a, b in zip(g_s, g_d, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
