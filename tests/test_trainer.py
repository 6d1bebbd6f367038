"""Trainer mechanics on synthetic data: decoder constraint, resume exactness, checkpoints."""

import json

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import CheckpointError
from saelab.saes.registry import build_sae, get_family, with_family
from saelab.train.dead import DeadLatentTracker
from saelab.train.schedules import lr_multiplier
from saelab.train.trainer import Trainer, TrainingDivergedError

D, F, B = 12, 40, 64


def synthetic_batches(seed=0, start=0):
    """Deterministic sparse-feature data: batch i depends only on (seed, i)."""
    dirs = torch.nn.functional.normalize(torch.randn(30, D, generator=torch.Generator().manual_seed(99)), dim=1)
    i = start
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        codes = torch.rand(B, 30, generator=g) * (torch.rand(B, 30, generator=g) < 0.1)
        yield codes @ dirs + 0.01 * torch.randn(B, D, generator=g)
        i += 1


def make_trainer(tmp_path, arch="gated", steps=30, **train_kw):
    sae = build_sae(SAEConfig(architecture=arch, d_in=D, d_sae=F),
                    generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(tokens=B * steps, batch_size=B, lr=1e-3, log_every=5, checkpoint_every=10,
                      lr_warmup_steps=3, **train_kw)
    return Trainer(sae, cfg, run_dir=tmp_path, progress=False)


def test_unit_norm_decoder_after_every_step(tmp_path):
    tr = make_trainer(tmp_path, steps=5)
    tr.fit(synthetic_batches())
    norms = tr.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(F), atol=1e-5, rtol=0)


def test_projected_gradient_is_orthogonal_to_rows():
    sae = build_sae(SAEConfig(architecture="gated", d_in=D, d_sae=F))
    out = sae.loss(next(synthetic_batches()), step=0)
    out.total.backward()
    sae.project_decoder_grad()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-5


def held_out_fvu(sae, x):
    """FVU by hand (float64) on a batch the trainer never saw."""
    with torch.no_grad():
        r = sae(x).recon.double()
    x = x.double()
    return float(((r - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_training_reduces_loss_and_logs(tmp_path):
    tr = make_trainer(tmp_path, steps=60)
    held_out = next(synthetic_batches(seed=7))
    before = held_out_fvu(tr.sae, held_out)
    tr.fit(synthetic_batches())
    after = held_out_fvu(tr.sae, held_out)
    # measured: ~1.97 at init, ~0.40 after 60 steps; predicting the mean would give 1.0
    assert before > 1.2 and after < 0.6 and after < 0.35 * before, (before, after)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(5, 61, 5))
    first, last = [r["mse"] for r in recs[:3]], [r["mse"] for r in recs[-3:]]
    assert sum(last) < 0.35 * sum(first)  # the logged loss really fell, not one lucky batch
    assert {"loss", "l0", "fvu", "dead_fraction", "aux", "l1", "lr"} <= set(recs[-1])


@pytest.mark.parametrize("arch", ["gated", "relu"])
def test_resume_gives_identical_weights(tmp_path, arch):
    full = make_trainer(tmp_path / "full", arch=arch)
    full.fit(synthetic_batches())

    part = make_trainer(tmp_path / "part", arch=arch)
    part.fit(synthetic_batches(), stop_after=17)  # "crash" after step 17; checkpoint at 10
    resumed = make_trainer(tmp_path / "part", arch=arch)
    start = resumed.resume()
    assert start == 17  # fit() checkpoints when it stops
    resumed.fit(synthetic_batches(start=start))
    for (n, p), q in zip(full.sae.named_parameters(), resumed.sae.parameters(), strict=True):
        assert torch.equal(p, q), n
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated log lines after resuming


def test_resume_after_a_crash_between_checkpoints(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.fit(synthetic_batches())

    def crashing():
        for i, x in enumerate(synthetic_batches()):
            if i == 14:
                raise RuntimeError("simulated crash")
            yield x

    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "crash").fit(crashing())
    resumed = make_trainer(tmp_path / "crash")
    assert resumed.resume() == 10  # the last periodic checkpoint
    resumed.fit(synthetic_batches(start=10))
    assert torch.equal(resumed.sae.W_dec, full.sae.W_dec)
    assert torch.equal(resumed.sae.b_gate, full.sae.b_gate)


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    tr = make_trainer(tmp_path, steps=10)
    tr.fit(synthetic_batches())
    state = tmp_path / "checkpoint" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        make_trainer(tmp_path, steps=10).resume()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        make_trainer(tmp_path).resume()


def test_divergence_is_reported(tmp_path):
    tr = make_trainer(tmp_path, steps=10)

    def bad():
        while True:
            yield torch.full((B, D), float("nan"))

    with pytest.raises(TrainingDivergedError, match="step 5"):
        tr.fit(bad())


def test_dead_tracker_counts_tokens():
    t = DeadLatentTracker(3, window_tokens=100)
    fire_first = torch.tensor([[1.0, 0.0, 0.0]] * 60)
    t.update(fire_first)
    t.update(torch.zeros(60, 3))
    assert t.tokens_since_fired.tolist() == [60, 120, 120]
    assert t.dead_mask().tolist() == [False, True, True]


def test_lr_schedule_shape():
    m = [lr_multiplier(s, 100, warmup_steps=10, decay_fraction=0.2) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[50] == 1.0
    assert m[80] == 1.0 and m[90] == pytest.approx(0.5) and m[99] == pytest.approx(0.05)


def test_autocast_modes():
    from saelab.errors import ConfigError
    from saelab.train.trainer import resolve_autocast

    cpu = torch.device("cpu")
    assert resolve_autocast("off", cpu) is None
    assert resolve_autocast("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="autocast"):
        resolve_autocast("fp8", cpu)
    with pytest.raises(ConfigError, match="autocast"):
        TrainConfig(autocast="fp8").validate()


@pytest.mark.parametrize("arch", ["relu", "topk", "gated"])
def test_bf16_autocast_trains_like_float32(arch):
    """Under bf16 autocast (relu: every matmul; topk: the selection product, values re-attached
    in float32; gated: its fused kernel replays autocast in the backward) parameters and their
    gradients stay float32 and the FVU after 60 steps is within 2% of the float32 run's."""
    def run(mode):
        torch.manual_seed(0)
        dirs = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        batches = (torch.relu(torch.randn(256, 96, generator=g) - 1.2) @ dirs for _ in range(60))
        sae = build_sae(with_family(SAEConfig(architecture=arch, d_in=32, d_sae=128,
                                              options={"k": 8}), strict=False),
                        generator=torch.Generator().manual_seed(0))
        tr = Trainer(sae, TrainConfig(tokens=256 * 60, batch_size=256, autocast=mode,
                                      log_every=60), progress=False)
        res = tr.fit(batches)
        assert tr.autocast_dtype == (torch.bfloat16 if mode == "bf16" else None)
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        return res.final["fvu"]

    fp32, bf16 = run("off"), run("bf16")
    assert fp32 < 0.95  # it learnt
    assert abs(bf16 - fp32) / fp32 < 0.02


def test_autocast_auto_is_per_family_and_measured(monkeypatch):
    """auto: bf16 only for opted-in families, and only where the bf16 benchmark says it wins."""
    from saelab.train import trainer as trainer_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_mod, "bf16_is_fast", lambda device: True)
    assert trainer_mod.resolve_autocast("auto", cpu, family_auto=True) is torch.bfloat16
    assert trainer_mod.resolve_autocast("auto", cpu, family_auto=False) is None
    monkeypatch.setattr(trainer_mod, "bf16_is_fast", lambda device: False)
    assert trainer_mod.resolve_autocast("auto", cpu, family_auto=True) is None
    assert all(get_family(a).autocast_auto for a in ("topk", "batchtopk", "relu", "gated"))
    assert not get_family("vsae").autocast_auto and not get_family("jumprelu").autocast_auto


def test_autocast_auto_falls_back_for_kernels_that_refuse_it(tmp_path, monkeypatch):
    """A kernel that refuses bf16: explicit bf16 is a one-line error; auto probes once on a copy
    and then trains in float32 exactly as off does."""
    from saelab.errors import ConfigError
    from saelab.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "bf16_is_fast", lambda device: True)
    cls = get_family("topk")
    plain_loss = cls.loss

    def picky_loss(self, x_BD, *a, **kw):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("expected scalar type Float but found BFloat16")
        return plain_loss(self, x_BD, *a, **kw)

    monkeypatch.setattr(cls, "loss", picky_loss)

    def run(mode, steps=8):
        tr = make_trainer(tmp_path / mode, "topk", steps=steps, autocast=mode)
        tr.fit(synthetic_batches())
        return tr

    with pytest.raises(ConfigError, match="autocast bf16 is not supported by topk"):
        run("bf16")
    off, auto = run("off"), run("auto")
    assert auto.autocast_dtype is None and not auto._probe_pending
    for a, b in zip(off.sae.parameters(), auto.sae.parameters(), strict=True):
        assert torch.equal(a, b)
