"""Variational TopK SAE (docs/methods.md §11): KL formulas, deterministic inference, reproducible
training noise, the fixed-variance modes, training, and the KL's effect on dead latents."""

import math

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.saes.registry import build_sae, validate_sae_config
from saelab.saes.vsae import VSAEOptions
from saelab.train.trainer import Trainer

D, F, K, B = 16, 64, 4, 128


def make(seed=0, k=K, d_sae=F, **vsae):
    cfg = SAEConfig(architecture="vsae", d_in=D, d_sae=d_sae, options=VSAEOptions(k=k, **vsae))
    return build_sae(cfg, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_batches(seed=0, n_feat=24, batch=B):
    """Sparse non-negative mixtures of fixed unit directions: batch i depends on (seed, i)."""
    dirs = torch.nn.functional.normalize(
        torch.randn(n_feat, D, generator=torch.Generator().manual_seed(99)), dim=1)
    i = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        on = torch.rand(batch, n_feat, generator=g) < 0.15
        yield (torch.rand(batch, n_feat, generator=g) * 3 * on) @ dirs
        i += 1


def test_defaults_follow_the_spec():
    sae = make()
    assert sae.cfg.apply_b_dec_to_input is False  # April mode (§11.2)
    assert torch.all(sae.b_var == -2.0)
    assert sae.unit_norm_decoder
    assert sae.saelens_architecture is None
    assert sae.sweep_param == "options.k" and len(sae.sweep_levels) == 3


def test_kl_learned_variance_matches_closed_form():
    sae = make()
    x = torch.randn(B, D) * 3
    mu = torch.relu(x @ sae.W_enc + sae.b_enc)
    lv = (x @ sae.W_var + sae.b_var).clamp(-6, 2)
    # per-latent KL(N(μ, σ²) || N(0, 1)) from the densities, by numerical integration
    t = torch.linspace(-30, 30, 20001, dtype=torch.float64)
    i, j = 3, 5
    m, s2 = mu[i, j].double().clamp(-10, 10), lv[i, j].double().exp()
    q = torch.exp(-(t - m) ** 2 / (2 * s2)) / torch.sqrt(2 * math.pi * s2)
    p = torch.exp(-(t**2) / 2) / math.sqrt(2 * math.pi)
    numeric = torch.trapezoid(q * (torch.log(q.clamp_min(1e-300)) - torch.log(p)), t)
    closed = 0.5 * (m**2 + s2 - 1 - s2.log())
    torch.testing.assert_close(closed, numeric, rtol=1e-4, atol=1e-6)
    expected = 0.5 * (mu.clamp(-10, 10) ** 2 + lv.exp() - 1 - lv).sum(-1).mean()
    torch.testing.assert_close(sae.kl(mu, lv), expected)
    assert torch.equal(sae.log_var(x), lv)


def test_log_variance_and_mean_are_clamped_in_the_kl():
    sae = make()
    lv = torch.tensor([[-50.0, 50.0]])
    mu = torch.tensor([[100.0, 0.0]])
    kl = sae.kl(mu, lv.clamp(-6, 2))
    expected = 0.5 * ((100 + math.exp(-6) - 1 + 6) + (0 + math.exp(2) - 1 - 2))
    torch.testing.assert_close(kl, torch.tensor(expected))
    with torch.no_grad():
        sae.b_var.fill_(1e3)
    assert sae.log_var(torch.randn(4, D)).max() == 2.0


@pytest.mark.parametrize("sampling", ["off", "unit_variance"])
def test_kl_fixed_variance_is_half_squared_mean(sampling):
    sae = make(variance="fixed", fixed_var_sampling=sampling)
    assert not hasattr(sae, "W_var")
    x = torch.randn(B, D) * 3
    mu = sae.pre_acts(x)
    out = sae.loss(x, step=10**6)
    torch.testing.assert_close(out.terms["kl"], 0.5 * mu.pow(2).sum(-1).mean())


def test_encode_is_deterministic_topk_by_abs_mean():
    sae = make()
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(F))
    x = torch.randn(B, D) * 3
    f1, f2 = sae.encode(x), sae.encode(x)
    assert torch.equal(f1, f2)
    mu = torch.relu(x @ sae.W_enc + sae.b_enc)
    idx = mu.abs().topk(K, dim=-1).indices
    expected = torch.zeros_like(mu).scatter_(1, idx, mu.gather(1, idx))
    torch.testing.assert_close(f1, expected)
    assert ((f1 != 0).sum(-1) <= K).all() and (f1 != 0).sum() > B  # ≤ k, and not all zero


def test_training_noise_is_reproducible_from_the_step():
    x = torch.randn(B, D) * 3
    sae = make(seed=3)
    a = sae.loss(x, step=7)
    torch.manual_seed(123)  # the global RNG must not matter
    b = sae.loss(x, step=7)
    c = sae.loss(x, step=8)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.total, b.total)
    assert not torch.equal(a.recon, c.recon)
    # a fresh SAE from the same seed, or one whose noise_seed came from a checkpoint, agrees
    assert torch.equal(make(seed=3).loss(x, step=7).recon, a.recon)
    other = make(seed=4)
    other.load_state_dict(sae.state_dict())
    assert not torch.equal(other.loss(x, step=7).recon, a.recon)
    other.load_training_state(sae.training_state())
    assert torch.equal(other.loss(x, step=7).recon, a.recon)


def test_resumed_training_is_exact(tmp_path):
    def trainer(folder):
        cfg = TrainConfig(tokens=B * 16, batch_size=B, lr=3e-3, checkpoint_every=10,
                          lr_warmup_steps=3)
        return Trainer(make(seed=0), cfg, run_dir=folder, progress=False)

    def batches_from(i):
        it = sparse_batches()
        for _ in range(i):
            next(it)
        return it

    full = trainer(tmp_path / "full")
    full.fit(sparse_batches())
    trainer(tmp_path / "part").fit(sparse_batches(), stop_after=7)
    resumed = trainer(tmp_path / "part")
    resumed.sae.noise_seed = -1  # must come back from the checkpoint
    assert resumed.resume() == 7 and resumed.sae.noise_seed == full.sae.noise_seed
    resumed.fit(batches_from(7))
    for name, t in full.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], t), name


def test_no_sampling_outside_training_mode():
    sae = make().eval()
    x = torch.randn(B, D) * 3
    out = sae.loss(x, step=5)
    torch.testing.assert_close(out.recon, sae(x).recon)


def test_fixed_variance_sampling_modes():
    x = torch.randn(B, D) * 3
    off = make(variance="fixed", fixed_var_sampling="off")
    mu = off.pre_acts(x)
    assert torch.equal(off.sample(mu, None, step=3), mu)  # code's var_flag=0: z = μ
    torch.testing.assert_close(off.loss(x, step=3).recon, off(x).recon)  # training = inference
    unit = make(variance="fixed", fixed_var_sampling="unit_variance")
    mu = unit.pre_acts(x)
    eps = unit.sample(mu, None, step=3) - mu
    assert abs(eps.mean().item()) < 0.05 and abs(eps.var().item() - 1.0) < 0.05
    assert (unit.loss(x, step=3).recon - unit(x).recon).abs().max() > 0.1


def test_learned_variance_noise_scale_follows_log_var():
    sae = make()
    x = torch.randn(B, D) * 3
    mu = sae.pre_acts(x)
    lv = torch.full_like(mu, -4.0)
    eps = (sae.sample(mu, lv, step=1) - mu) / math.exp(-2.0)
    assert abs(eps.var().item() - 1.0) < 0.05


def test_kl_warmup_is_linear_from_zero():
    sae = make(kl_warmup_fraction=0.1)
    sae.total_steps = 200
    assert [sae.kl_scale(s) for s in (0, 10, 20, 100)] == [0.0, 0.5, 1.0, 1.0]
    x = torch.randn(B, D) * 3
    out = sae.loss(x, step=0)
    torch.testing.assert_close(out.total, out.terms["sse"] + out.terms["auxk"] / 32)


def _train(steps=100, **vsae):
    # fewer latents than data features, so every latent is useful unless the KL kills it
    sae = make(seed=0, k=K, d_sae=32, **vsae)
    cfg = TrainConfig(tokens=B * steps, batch_size=B, lr=1e-2, log_every=steps,
                      lr_warmup_steps=5, dead_window_tokens=B * 20)
    Trainer(sae, cfg, progress=False).fit(sparse_batches(n_feat=48))
    return sae


def _eval_batch():
    return torch.cat([b for _, b in zip(range(8), sparse_batches(seed=5, n_feat=48),
                                        strict=False)])


def test_training_lowers_the_loss():
    x = _eval_batch()
    before = make(seed=0, k=K, d_sae=32, kl_coefficient=1e-3).eval().loss(x, step=10**6)
    after = _train(kl_coefficient=1e-3).eval().loss(x, step=10**6)
    assert after.terms["sse"] < 0.5 * before.terms["sse"]
    assert after.total < before.total


def test_large_kl_coefficient_kills_more_latents():
    """§11.6: the KL term sharply reduces the fraction of live latents. Every data feature
    occurs on 15% of tokens; a latent firing on under 1% of held-out tokens is counted dead
    (in a 100-step toy run strictly never-firing latents are too few to compare)."""
    x = _eval_batch()

    def dead_fraction(sae):
        with torch.no_grad():
            density_F = (sae.encode(x) != 0).float().mean(0)
        return (density_F < 0.01).float().mean().item()

    small, large = dead_fraction(_train(kl_coefficient=1e-3)), dead_fraction(
        _train(kl_coefficient=10.0))
    assert large > small + 0.4, (small, large)


def test_bad_kl_options_are_config_errors():
    from saelab.errors import ConfigError

    for bad in (dict(kl_coefficient=-1.0), dict(kl_coefficient=float("nan")),
                dict(kl_warmup_fraction=1.5)):
        with pytest.raises(ConfigError, match="--vsae-kl"):
            validate_sae_config(SAEConfig(architecture="vsae", options=VSAEOptions(**bad)))
    validate_sae_config(SAEConfig(architecture="vsae"))
