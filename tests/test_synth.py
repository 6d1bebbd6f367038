"""Synthetic ground truth (saelab.data.synthetic) and `saelab synth`: generator properties, the
command's outputs, and that every trainable family learns the known dictionary."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.cli import main
from saelab.config import SynthConfig, SyntheticDataOptions
from saelab.data.synthetic import SyntheticData, key_seed, zipf_probabilities
from saelab.errors import ConfigError
from saelab.saes.registry import architectures
from saelab.synth import random_baseline, train_family

OPTS = SyntheticDataOptions(d=16, n_features=48, mean_active=3.0, offset_norm=0.5)


def binomial_tolerance(p: torch.Tensor, n: int, sigmas: float = 5.0) -> torch.Tensor:
    return sigmas * (p * (1 - p) / n).sqrt() + 1e-4


# ---- generator -------------------------------------------------------------------------------
def test_directions_are_unit_and_fixed_by_the_seed():
    a, b, c = SyntheticData(OPTS, seed=1), SyntheticData(OPTS, seed=1), SyntheticData(OPTS, 2)
    torch.testing.assert_close(a.directions_MD.norm(dim=1), torch.ones(48))
    assert torch.equal(a.directions_MD, b.directions_MD)
    assert not torch.equal(a.directions_MD, c.directions_MD)
    assert a.offset_D.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_firing_probabilities_follow_the_zipf_profile():
    s, cap = 0.8, 0.3
    opts = SyntheticDataOptions(d=16, n_features=64, mean_active=4.0, frequency_exponent=s,
                                max_firing_prob=cap)
    data = SyntheticData(opts, seed=0)
    p = data.firing_prob_M.double()
    assert p.sum().item() == pytest.approx(4.0, rel=1e-6)
    capped = p >= cap - 1e-7
    assert capped[0] and not capped.all() and p.max() <= cap + 1e-7  # the cap is exercised
    # uncapped features: p_i * (i+1)^s is one constant
    ranks = torch.arange(64, dtype=torch.float64) + 1
    scaled = (p * ranks.pow(s))[~capped]
    torch.testing.assert_close(scaled, scaled.mean().expand_as(scaled), rtol=1e-5, atol=0)
    # empirical firing frequencies match p (binomial tolerance) and the log-log slope is -s
    n = 40_000
    freq = (data.sample(n, "test").codes != 0).double().mean(0)
    assert ((freq - p).abs() <= binomial_tolerance(p, n)).all()
    slope = torch.linalg.lstsq(torch.stack([ranks.log(), torch.ones(64, dtype=torch.float64)], 1)
                               [~capped], freq[~capped].log()[:, None]).solution[0, 0]
    assert slope.item() == pytest.approx(-s, abs=0.08)
    l0 = (data.sample(n, "test").codes != 0).sum(1).double().mean().item()
    assert l0 == pytest.approx(data.true_l0, abs=0.05)


def test_zipf_probabilities_reject_an_impossible_mean():
    with pytest.raises(ValueError):
        zipf_probabilities(10, 6.0, 1.0, cap=0.5)
    with pytest.raises(ConfigError, match="mean-active"):
        SyntheticData(SyntheticDataOptions(n_features=10, mean_active=6.0))


def test_batch_i_is_a_pure_function_of_seed_and_index():
    data = SyntheticData(OPTS, seed=3)
    b5 = data.batch(5, 64).x
    assert torch.equal(b5, SyntheticData(OPTS, seed=3).batch(5, 64).x)
    it = data.batches(64, start=5)
    assert torch.equal(next(it), b5)  # a stream started at 5 (a resumed trainer) sees batch 5
    assert torch.equal(next(it), data.batch(6, 64).x)
    assert not torch.equal(data.batch(6, 64).x, b5)
    assert not torch.equal(SyntheticData(OPTS, seed=4).batch(5, 64).x, b5)


def test_heldout_comes_from_its_own_seed_stream():
    data = SyntheticData(OPTS, seed=0)
    held = data.heldout(512)
    train = torch.cat([data.batch(i, 512).x for i in range(4)])
    assert torch.cdist(held.x, train).min() > 1e-4  # no training row reappears
    assert torch.equal(held.codes, SyntheticData(OPTS, seed=0).heldout(512).codes)
    held_seed = key_seed("sample", 0, "heldout")
    train_seeds = {key_seed("sample", 0, "train", 512, i) for i in range(10_000)}
    assert held_seed not in train_seeds and key_seed("sample", 0, "init") not in train_seeds


def test_x_is_codes_times_dictionary_plus_offset_plus_noise():
    data = SyntheticData(OPTS, seed=0)
    s = data.sample(1000, "t")
    torch.testing.assert_close(s.x, s.codes @ data.directions_MD + data.offset_D)
    noisy = SyntheticData(SyntheticDataOptions(**{**vars(OPTS), "noise_std": 0.1}), seed=0)
    s = noisy.sample(4000, "t")
    resid = s.x - s.codes @ noisy.directions_MD - noisy.offset_D
    assert resid.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("signed", [False, True])
def test_signed_option_gives_negative_codes(signed):
    data = SyntheticData(SyntheticDataOptions(**{**vars(OPTS), "signed": signed}), seed=0)
    codes = data.sample(4000, "t").codes
    active = codes[codes != 0]
    assert ((active.abs() >= 0.5) & (active.abs() <= 1.5)).all()  # U(0.5, 1.5) magnitudes
    neg = (active < 0).double().mean().item()
    if signed:
        assert neg == pytest.approx(0.5, abs=0.03)
    else:
        assert neg == 0.0


def test_coherence_sets_the_mean_pairwise_cosine():
    for c in (0.0, 0.3):
        dirs = SyntheticData(SyntheticDataOptions(d=64, n_features=200, coherence=c), 0).directions_MD
        cos = dirs @ dirs.T
        mean_off = (cos.sum() - cos.diagonal().sum()) / (200 * 199)
        assert mean_off.item() == pytest.approx(c, abs=0.03)


def test_groups_co_fire_and_keep_their_marginals():
    opts = SyntheticDataOptions(d=16, n_features=48, mean_active=4.0, group_size=4,
                                group_correlation=0.8)
    data = SyntheticData(opts, seed=0)
    n = 20_000
    active = (data.sample(n, "t").codes != 0).double()
    corr = torch.corrcoef(active.T)
    assert corr[8, 9] > 0.2 and corr[8, 10] > 0.2  # same group (features 8-11)
    assert abs(corr[8, 12]) < 0.05 and abs(corr[9, 20]) < 0.05  # different groups
    p = data.firing_prob_M.double()
    assert ((active.mean(0) - p).abs() <= binomial_tolerance(p, n)).all()


def test_readout_gradient_is_the_gradient_of_the_readout_loss():
    data = SyntheticData(OPTS, seed=0)
    x = data.batch(0, 32).x.requires_grad_()
    data.readout_loss(x).sum().backward()
    torch.testing.assert_close(data.readout_grad(x.detach()), x.grad)
    x2, g2 = next(data.batches(32, with_grads=True))
    assert torch.equal(x2, x.detach()) and torch.equal(g2, data.readout_grad(x2))
    # importances differ across features: some matter far more than others
    assert data.importance_M.max() / data.importance_M.min() > 10


# ---- the command -------------------------------------------------------------------------------
SMALL = ["--d", "16", "--n-features", "32", "--mean-active", "2", "--d-sae", "64",
         "--tokens", "6400", "--batch-size", "256", "--eval-tokens", "1024", "--quiet"]


def test_command_writes_synth_json_and_a_table(tmp_path, capsys, one_thread):
    out = tmp_path / "synth"
    args = ["synth", "--arch", "topk,relu", "--out", str(out), "--levels", "relu=2", *SMALL]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = {ln.split()[0] for ln in printed.splitlines() if ln.strip()}
    assert {"topk", "relu", "random"} <= rows and "MCC" in printed
    payload = json.loads((out / "synth.json").read_text())
    assert payload["complete"] and payload["config"]["data"]["d"] == 16
    assert payload["ground_truth"]["true_l0"] == pytest.approx(2.0)
    recs = {r["arch"]: r for r in payload["results"]}
    assert list(recs) == ["topk", "relu"]
    for r in recs.values():
        for key in ("mean_best_cos", "frac_recovered", "mcc", "fvu", "l0", "dead_fraction",
                    "train_seconds"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert recs["topk"]["sae_config"]["options"]["k"] == 2  # k defaults to the true mean L0
    assert recs["relu"]["sparsity_param"] == "l1_coefficient"
    assert recs["relu"]["sparsity_value"] == 2.0 == recs["relu"]["sae_config"]["l1_coefficient"]
    assert main(args) == 2  # an existing synth.json needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--arch", "topk", "--tokens", "2560"]) == 0
    assert [r["arch"] for r in json.loads((out / "synth.json").read_text())["results"]] == ["topk"]


def test_a_failing_family_is_recorded_and_the_others_still_run(tmp_path, capsys, monkeypatch,
                                                               one_thread):
    import saelab.synth as synth

    real = synth.train_family

    def relu_breaks(name, *args, **kwargs):
        if name == "relu":
            raise RuntimeError("boom")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(synth, "train_family", relu_breaks)
    out = tmp_path / "s"
    assert main(["synth", "--arch", "relu,topk", "--out", str(out), *SMALL,
                 "--tokens", "2560"]) == 1
    assert "FAILED: RuntimeError: boom" in capsys.readouterr().out
    recs = json.loads((out / "synth.json").read_text())["results"]
    assert recs[0] == {"arch": "relu", "error": "RuntimeError: boom"}
    assert recs[1]["arch"] == "topk" and math.isfinite(recs[1]["mean_best_cos"])


@pytest.mark.parametrize("bad", [["--arch", "nope"], ["--levels", "relu"],
                                 ["--levels", "nope=1"], ["--mean-active", "40"]])
def test_command_rejects_bad_input(tmp_path, capsys, bad):
    assert main(["synth", "--out", str(tmp_path / "s"), *SMALL, *bad]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "s" / "synth.json").exists()


# ---- every family learns ------------------------------------------------------------------------
# 2x superposition in 16 dims, true L0 2; 400 steps at lr 3e-3 for every family (3x most family
# defaults, which assume LM activations and ~500-step runs: at 1e-3 the decoders are still
# rotating into place after 400 steps, and this test must stay a few seconds per family).
LEARN = SynthConfig(data=SyntheticDataOptions(d=16, n_features=32, mean_active=2.0),
                    d_sae=64, tokens=256 * 400, batch_size=256, eval_tokens=2048, lr=3e-3,
                    out="unused")

# Families whose default sparsity setting does not fit this data get one that does. These are
# hyperparameters, not bounds: the assertions are the same for every family. (JumpReLU's
# target_l0 loss is the benchmark's own setting now, synth.SYNTH_SETTINGS.)
LEARN_OVERRIDES = {
    # default lambda 5.0 (tuned on LM activations) shrinks codes so much that FVU stays ~0.85
    # although the dictionary is recovered; lambda 2 gives L0 ~5 and FVU ~0.3
    "relu": {"l1_coefficient": 2.0},
    # biases adapt once per 4,096 tokens by default: 25 times in this 102,400-token run
    "gba": {"options.buffer_tokens": 2048, "options.gamma_minus": 0.05, "options.gamma_plus": 0.05},
}

# Known failures, reported rather than hidden (strict: an XPASS fails, so the mark must go once
# the family learns). top-AFA stays dense here (L0 ~20 for a true L0 of 2, best-cos at chance),
# also with the centered AFA target, lambda_AFA 0 to 1/8, no offset, 4x the steps, or d = 128.
# This is the method, not a bug: the selection and the loss gradients match brute-force float64
# references, an independent reimplementation of the reference code (per-token standardised)
# behaves the same, and the reference's own logged GPT-2 runs end at L0 ~2,000 of 12,288
# (saes/topafa.py, "Known behaviour"; docs/methods.md §10.5).
KNOWN_FAILURES = {
    "topafa": "top-AFA learns dense codes, as in the reference runs (L0 ~20 vs 2)",
}


@pytest.fixture(scope="module")
def learn_data():
    data = SyntheticData(LEARN.data, seed=LEARN.seed)
    return data, data.heldout(LEARN.eval_tokens)


def _family_params():
    for name in sorted(architectures(trainable_only=True)):
        marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name])]
                 if name in KNOWN_FAILURES else [])
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("arch", list(_family_params()))
def test_every_family_learns_the_ground_truth(arch, learn_data, one_thread):
    data, held = learn_data
    rec = train_family(arch, LEARN, data, held, k=2, progress=False,
                       overrides=LEARN_OVERRIDES.get(arch))
    chance = random_baseline(LEARN.d_sae, data, signed=rec["abs_matching"])["mean_best_cos"]
    summary = {k: round(rec[k], 3) for k in ("l0", "fvu", "mean_best_cos", "frac_recovered",
                                              "mcc", "dead_fraction")}
    # closes at least half the gap between a random dictionary (~0.59) and perfect recovery
    assert rec["mean_best_cos"] > chance + 0.5 * (1 - chance), summary
    assert rec["fvu"] < 0.5, summary
    # (no MCC bound: with 2x superposition, dense latents of an untrained SAE already match the
    # codes at MCC ~0.5, so only best-cos has a clean chance level)


# ---- every family at the `saelab synth` defaults (issue 9 A.5) ---------------------------------
# The full default benchmark (d 32, 128 true features, true L0 4, 256 latents, 1M samples in
# batches of 256 = 3,906 steps, each family's own defaults plus the benchmark's settings): mean
# best cosine >= 0.8 for every family. Not a reduced budget: at 976 steps (batch 1024) batchtopk,
# matryoshka, jumprelu and gba were still below 0.8, so a smaller run would test a different
# claim. One family per test; slow (tens of seconds each on 2 CPU cores).
SYNTH_DEFAULT_KNOWN_FAILURES = {
    "topafa": "top-AFA learns dense codes at the synth defaults (measured: L0 88 of 256, "
              "best-cos 0.461, chance 0.48; docs/methods.md §10.5)",
}


# Not run at the synth defaults: ITDA does not learn a dictionary by gradient descent; it keeps
# whole (normalised) activations as atoms, each a mixture of ~4 true features here, so feature
# recovery is not what it claims, and its greedy build over the default 1M samples (no atom cap)
# did not finish in 25 minutes on 2 cores. Its construction rule is tested on planted directions
# in tests/test_itda.py.
SYNTH_DEFAULT_NOT_RUN = {"itda"}


def _default_params():
    for name in sorted(architectures(trainable_only=True)):
        if name in SYNTH_DEFAULT_NOT_RUN:
            continue
        marks = [pytest.mark.slow]
        if name in SYNTH_DEFAULT_KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=SYNTH_DEFAULT_KNOWN_FAILURES[name]))
        yield pytest.param(name, marks=marks, id=name)


@pytest.fixture(scope="module")
def default_data():
    cfg = SynthConfig(out="unused")
    data = SyntheticData(cfg.data, seed=cfg.seed)
    return cfg, data, data.heldout(cfg.eval_tokens)


@pytest.mark.parametrize("arch", list(_default_params()))
def test_every_family_recovers_the_features_at_the_synth_defaults(arch, default_data, one_thread):
    cfg, data, held = default_data
    k = max(1, round(data.true_l0))
    rec = train_family(arch, cfg, data, held, k=k, progress=False)
    chance = random_baseline(cfg.d_sae, data, signed=rec["abs_matching"])["mean_best_cos"]
    summary = {key: round(rec[key], 3) for key in ("l0", "fvu", "mean_best_cos",
                                                   "frac_recovered", "dead_fraction")}
    assert chance < 0.55, chance  # the bound below is far above a random dictionary
    assert rec["mean_best_cos"] >= 0.8, summary
