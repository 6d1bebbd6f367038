"""Group Bias Adaptation (docs/methods.md §8, §16.14): TAF groups, the bias update and its clamps,
no optimiser updates to the biases, update timing, exact resume, training, saving."""

import pytest
import torch

import saelab.io as sio
from saelab.config import SAEConfig, TrainConfig
from saelab.saes.gba import GBAOptions, target_frequencies
from saelab.saes.registry import build_sae
from saelab.train.trainer import Trainer

D, F, B = 12, 40, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed=0, d_sae=F, **gba):
    cfg = SAEConfig(architecture="gba", d_in=D, d_sae=d_sae, options=GBAOptions(**gba))
    return build_sae(cfg, generator=torch.Generator().manual_seed(seed))


def batches(seed=0, start=0):
    """Sparse non-negative mixtures of fixed directions: batch i depends on (seed, i) only."""
    dirs = torch.nn.functional.normalize(
        torch.randn(30, D, generator=torch.Generator().manual_seed(99)), dim=1)
    i = start
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        codes = torch.rand(B, 30, generator=g) * 3 * (torch.rand(B, 30, generator=g) < 0.1)
        yield codes @ dirs + 0.01 * torch.randn(B, D, generator=g)
        i += 1


def trainer(sae, steps, run_dir=None, **kw):
    kw = {"lr": 3e-3, "lr_warmup_steps": 3, **kw}
    cfg = TrainConfig(tokens=B * steps, batch_size=B, **kw)
    return Trainer(sae, cfg, run_dir=run_dir, progress=False)


# ---- groups --------------------------------------------------------------------------------------
def test_target_frequencies_are_geometric_from_htf_to_ltf():
    p = target_frequencies(10, 0.1, 0.001)
    assert p[0] == pytest.approx(0.1) and p[-1] == pytest.approx(0.001)
    ratios = p[1:] / p[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.01 ** (1 / 9)))
    k = torch.arange(1, 11, dtype=torch.float64)  # the spec's 1-based formula
    torch.testing.assert_close(p, 0.1 * (0.001 / 0.1) ** ((k - 1) / 9))
    assert target_frequencies(1, 0.05, 0.001).tolist() == [0.05]


def test_groups_are_random_equal_sized_and_seeded():
    a, b, c = make(seed=0, groups=4), make(seed=0, groups=4), make(seed=1, groups=4)
    assert torch.bincount(a.group, minlength=4).tolist() == [10, 10, 10, 10]
    assert torch.equal(a.group, b.group) and not torch.equal(a.group, c.group)
    assert not torch.equal(a.group, torch.arange(F) % 4)  # shuffled, not striped
    sizes = torch.bincount(make(groups=3).group, minlength=3)
    assert sizes.max() - sizes.min() <= 1
    assert {"b_enc", "group"} <= set(a.state_dict())  # saved with the SAE
    assert "b_enc" not in dict(a.named_parameters())


# ---- the bias update (§16.14) ----------------------------------------------------------------------
def _with_stats(sae, b, count, max_pre, tokens):
    with torch.no_grad():
        sae.b_enc.copy_(b)
        sae.fire_count.copy_(count)
        sae.max_pre.copy_(max_pre)
    sae.buffered_tokens = tokens


def test_bias_update_rule_and_clamps():
    opts = dict(groups=1, htf=0.1, ltf=0.1, gamma_minus=0.5, gamma_plus=0.1, b_min=-1.0,
                b_max=0.0, dead_eps=1e-6)
    sae = make(d_sae=6, **opts)
    n = 1000
    #          over TAF, big r (clamped at b_min) | over TAF | dead | dead near b_max | in range
    b = torch.tensor([-0.9, -0.2, -0.8, -0.05, -0.3, -0.4])
    count = torch.tensor([500, 200, 0, 0, 50, 5])
    max_pre = torch.tensor([4.0, 0.2, -0.3, -1.0, 2.0, 1.0])
    _with_stats(sae, b, count, max_pre, n)
    sae.adapt_biases()
    new = sae.b_enc
    r_bar = (4.0 + 0.2 + 2.0 + 1.0) / 4  # mean of the positive r_m in the group
    expected = torch.tensor([-1.0, -0.2 - 0.5 * 0.2, -0.8 + 0.1 * r_bar, 0.0, -0.3, -0.4])
    torch.testing.assert_close(new, expected)
    assert new[0] < b[0] and new[0] >= -1.0  # fires too often: decreased, never below b_min
    assert new[2] > b[2] and new[3] <= 0.0  # dead: increased, never above b_max
    # the window restarts
    assert sae.buffered_tokens == 0 and sae.fire_count.sum() == 0 and sae.max_pre.sum() == 0


def test_bias_update_properties_on_random_statistics():
    g = torch.Generator().manual_seed(0)
    sae = make(d_sae=200, groups=5, htf=0.2, ltf=0.01, gamma_minus=0.3, gamma_plus=0.3,
               b_min=-0.5, b_max=0.0)
    taf = target_frequencies(5, 0.2, 0.01).float()[sae.group]
    for _ in range(20):
        n = 500
        b = -0.5 * torch.rand(200, generator=g)
        count = (torch.rand(200, generator=g) * 0.4 * n).long() * (torch.rand(200, generator=g) > 0.3)
        max_pre = 3 * torch.randn(200, generator=g)
        _with_stats(sae, b, count, max_pre, n)
        sae.adapt_biases()
        new, p_hat = sae.b_enc, count.float() / n
        over, dead = p_hat > taf, p_hat == 0
        assert (new[over] <= b[over]).all() and (new[over] >= -0.5).all()
        assert (new[dead] >= b[dead]).all() and (new[dead] <= 0.0).all()
        assert torch.equal(new[~over & ~dead], b[~over & ~dead])
        assert (new[over] < b[over]).any() and (new[dead] > b[dead]).any()


def test_biases_get_no_optimiser_updates_and_move_only_every_buffer():
    # buffer = 3 steps of 64 tokens: the bias may change only after steps 3, 6, 9, ...
    sae = make(buffer_tokens=3 * B, gamma_minus=0.05)
    tr = trainer(sae, 12, log_every=1)
    assert all(p is not sae.b_enc for g in tr.opt.param_groups for p in g["params"])
    seen = []
    tr.on_log = lambda rec: seen.append((rec["step"], sae.b_enc.clone(), sae.W_enc.clone()))
    before_b, before_w = sae.b_enc.clone(), sae.W_enc.clone()
    tr.fit(batches())
    prev_b, prev_w = before_b, before_w
    for step, b, w in seen:
        assert not torch.equal(w, prev_w)  # the weights train every step
        assert torch.equal(b, prev_b) == (step % 3 != 0), step
        prev_b, prev_w = b, w
    assert sae.b_enc.grad is None


def test_no_bias_update_before_buffer_tokens():
    sae = make(buffer_tokens=10**6)
    trainer(sae, 20).fit(batches())
    assert torch.all(sae.b_enc == 0)
    assert sae.buffered_tokens == 20 * B
    assert sae.fire_count.max() <= 20 * B and sae.fire_count.sum() > 0
    assert sae.max_pre.max() > 0


def test_window_statistics_match_the_preactivations():
    sae = make(buffer_tokens=10**6)
    xs = [next(batches(seed=3, start=i)) for i in range(3)]
    tr = trainer(sae, 1, lr_warmup_steps=0)
    expected_count, expected_max = torch.zeros(F, dtype=torch.long), torch.zeros(F)
    for x in xs:  # statistics of each step's forward pass, before its update
        with torch.no_grad():
            u = x @ sae.W_enc - sae.b_dec @ sae.W_enc + sae.b_enc
        expected_count += (u > 0).sum(0)
        expected_max = torch.maximum(expected_max, u.amax(0))
        tr._train_step(x)
    assert torch.equal(sae.fire_count, expected_count)
    torch.testing.assert_close(sae.max_pre, expected_max)


def test_resume_mid_buffer_is_exact(tmp_path):
    # buffer of 3 steps: a checkpoint after step 14 falls inside a window
    opts = dict(buffer_tokens=3 * B, gamma_minus=0.05)
    full = trainer(make(**opts), 24, run_dir=tmp_path / "full", checkpoint_every=10)
    full.fit(batches())
    part = trainer(make(**opts), 24, run_dir=tmp_path / "part", checkpoint_every=10)
    part.fit(batches(), stop_after=14)  # checkpoints at 10 and 14, both inside a window
    resumed = trainer(make(**opts), 24, run_dir=tmp_path / "part", checkpoint_every=10)
    assert resumed.resume() == 14
    assert resumed.sae.buffered_tokens == 2 * B  # two steps into the window that began at 12
    resumed.fit(batches(start=14))
    for name, t in full.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], t), name
    assert not torch.all(full.sae.b_enc == 0)


def test_training_lowers_the_loss():
    sae = make(buffer_tokens=4 * B, gamma_minus=0.05)
    x = torch.cat([next(batches(seed=7, start=i)) for i in range(4)])
    before = sae.loss(x, 0).total.item()
    trainer(sae, 80).fit(batches())
    after = sae.loss(x, 0).total.item()
    assert after < 0.5 * before
    assert (sae.b_enc < 0).any()  # the adaptation raised some thresholds


def test_higher_target_frequency_gives_higher_l0():
    """The sweep knob (options.htf) moves L0."""
    x = torch.cat([next(batches(seed=7, start=i)) for i in range(8)])

    def l0(htf):
        sae = make(groups=2, htf=htf, ltf=0.01, buffer_tokens=2 * B, gamma_minus=0.05,
                   gamma_plus=0.05)
        trainer(sae, 120).fit(batches())
        with torch.no_grad():
            return (sae.encode(x) != 0).sum(-1).float().mean().item()

    assert make().sweep_param == "options.htf"
    low, high = l0(0.01), l0(0.3)
    assert high > 1.5 * low, (low, high)


# ---- architecture ----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "jumprelu_bias_gate"])
def test_activation_forms(activation):
    sae = make(activation=activation)
    with torch.no_grad():
        sae.b_enc.copy_(-0.3 * torch.rand(F))
    x = next(batches())
    h = (x - sae.b_dec) @ sae.W_enc
    u = h + sae.b_enc
    expected = torch.relu(u) if activation == "relu" else h * (u > 0)
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.loss(x, 0).recon, sae(x).recon)


def test_tied_decoder_mirrors_unit_norm_encoder():
    sae = make(tied=True, buffer_tokens=2 * B)
    trainer(sae, 10).fit(batches())
    assert torch.equal(sae.W_dec, sae.W_enc.T)
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.ones(F))


def test_untied_decoder_rows_stay_unit_norm():
    sae = make()
    trainer(sae, 5).fit(batches())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    assert not torch.allclose(sae.W_dec, sae.W_enc.T)


def test_save_load_keeps_biases_and_groups(tmp_path):
    sae = make(groups=4)
    with torch.no_grad():
        sae.b_enc.copy_(-torch.rand(F))
    loaded = sio.load_sae(sio.save_sae(sae, tmp_path / "sae"))
    assert loaded.group.dtype == torch.long and torch.equal(loaded.group, sae.group)
    assert torch.equal(loaded.b_enc, sae.b_enc)
    x = next(batches())
    assert torch.equal(loaded.encode(x), sae.encode(x))
