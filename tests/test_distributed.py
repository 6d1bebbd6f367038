"""Data-parallel training: 2 ranks x batch B/2 (gloo, CPU) reach the weights of 1 process x
batch B; rank 0 alone writes; an interrupted 2-rank run resumes to the same weights."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from saelab import dist
from saelab.config import RunConfig, SAEConfig, TrainConfig
from saelab.data.store import ActivationStore, StoreSpec, StoreWriter
from saelab.saes.registry import build_sae, get_family

D, T = 16, 17
B, STEPS = 128, 12
#: case name -> (architecture, options)
CASES = {
    "topk": ("topk", {"k": 4}),
    "gated": ("gated", None),
    "batchtopk": ("batchtopk", {"k": 4}),
    "matryoshka": ("matryoshka", {"k": 4}),
    "mutual_choice": ("mutual_choice", {"k": 4}),
    "feature_choice": ("feature_choice", {"k": 4}),
    "feature_choice_zipf": ("feature_choice", {"k": 4, "capacity": "zipf"}),
    # 384 of the 1,536 tokens per window: 4 bias updates in the 12 steps
    "gba": ("gba", {"buffer_tokens": 384}),
    # the sparse training path of the L1 families (docs/methods.md §0.10), forced on
    "gated_sparse": ("gated", None),
    "relu_sparse": ("relu", None),
}
FORCE_SPARSE = {"gated_sparse", "relu_sparse"}


@contextlib.contextmanager
def _training_path(case: str):
    """Force the sparse training path for the FORCE_SPARSE cases (a class attribute)."""
    if case not in FORCE_SPARSE:
        yield
        return
    cls = get_family(CASES[case][0])
    cls.sparse_density = 1.0
    try:
        yield
    finally:
        cls.sparse_density = None


def _write_store(path: Path) -> ActivationStore:
    """Sparse non-negative codes of 48 random directions: every family learns something."""
    spec = StoreSpec(model="m", hook="blocks.0.hook_resid_post", d_in=D, context_size=T,
                     exclude_first_positions=1, dtype="float32")
    w = StoreWriter(path, spec, shard_rows=400)
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, D, generator=g)
    for _ in range(12):
        keep = torch.ones(16, T, dtype=torch.bool)
        keep[:, 0] = False
        codes = torch.relu(torch.randn(16 * (T - 1), 48, generator=g) - 1.2)
        w.add(torch.zeros(16, T, dtype=torch.long), keep, codes @ dirs)
    return w.finish()


def _cfg(case: str, store: Path, out: Path, steps: int = STEPS, batch: int = B) -> RunConfig:
    arch, options = CASES[case]
    cfg = RunConfig(sae=SAEConfig(architecture=arch, d_sae=64, options=options),
                    train=TrainConfig(tokens=batch * steps, batch_size=batch, log_every=3,
                                      checkpoint_every=0, shuffle_buffer_rows=1000,
                                      lr_warmup_steps=2,
                                      # float32: bf16 rounding of the selection product
                                      # depends on how the GEMM blocks its rows
                                      autocast="off"),
                    store=str(store), out=str(out))
    cfg.model.device = "cpu"
    return cfg


def _fit(cfg: RunConfig, stop_after: int | None = None) -> dict[str, torch.Tensor]:
    """``fit_sae`` as the pipeline runs it; ``stop_after`` simulates an interruption."""
    from saelab.pipeline import fit_sae
    from saelab.train.trainer import Trainer

    fit = Trainer.fit
    if stop_after is not None:
        n = stop_after
        Trainer.fit = lambda self, batches, stop_after=None: fit(self, batches, stop_after=n)
    try:
        sae, _ = fit_sae(cfg, ActivationStore.open(cfg.store), Path(cfg.out), progress=False,
                         log=lambda *_: None)
    finally:
        Trainer.fit = fit
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def _worker(rank: int, world: int, port: int, jobs: list, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, cfg, stop_after in jobs:
            with _training_path(name):
                state = _fit(cfg, stop_after)
            torch.save(state, Path(result_dir) / f"{name}-rank{rank}.pt")
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, jobs: list, result_dir: Path) -> dict[str, dict]:
    mp.spawn(_worker, args=(world, _free_port(), jobs, str(result_dir)), nprocs=world,
             join=True)
    out = {}
    for name, _, _ in jobs:
        states = [torch.load(result_dir / f"{name}-rank{r}.pt") for r in range(world)]
        for s in states[1:]:  # every rank ends with rank 0's weights, bit for bit
            assert all(torch.equal(s[k], states[0][k]) for k in s), name
        out[name] = states[0]
    return out


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dstore") / "store"
    _write_store(path)
    return path


def _assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (
            k, (a[k] - b[k]).abs().max().item())


def test_helpers_are_single_process_noops():
    x = torch.randn(7, 3, dtype=torch.float64)
    assert not dist.is_distributed() and dist.world_size() == 1 and dist.is_main()
    assert dist.all_reduce_sum(x) is x and dist.all_reduce_min(x) is x
    xc = x - x.mean(0)
    assert torch.allclose(dist.global_centered_sq_sum(x), (xc * xc).sum())
    v = torch.randn(100)
    assert dist.global_kth_largest(v, 10) == v.sort(descending=True).values[9]
    a_KC = torch.randn(9, 5)
    k_C = torch.tensor([1, 3, 9, 12, 2])
    want = [sorted(a_KC[:, c].tolist(), reverse=True)[min(int(k), 9) - 1]
            for c, k in enumerate(k_C)]
    assert dist.global_column_kth_largest(a_KC, k_C).tolist() == want


@pytest.mark.slow
def test_two_ranks_match_one_process(store_path, tmp_path):
    """topk (global FVU denominator, AuxK), gated (batch means), batchtopk (selection over the
    global batch, global threshold estimate), matryoshka (prefix FVUs), mutual_choice
    (global firing frequencies), feature_choice with uniform and zipf capacities (global
    capacities, per-column selection and thresholds) and gba (global window statistics) after
    12 steps, fresh from the same seed."""
    single = {}
    for a in CASES:
        with _training_path(a):
            single[a] = _fit(_cfg(a, store_path, tmp_path / f"one-{a}"))
    jobs = [(a, _cfg(a, store_path, tmp_path / f"two-{a}"), None) for a in CASES]
    two = _run_ranks(2, jobs, tmp_path)
    for a in CASES:
        _assert_same(single[a], two[a])
        # training moved the weights away from their seeded init (no vacuous match)
        cfg = _cfg(a, store_path, tmp_path)
        cfg.sae.d_in = D
        init = build_sae(cfg.sae, generator=torch.Generator().manual_seed(cfg.train.seed))
        assert not torch.allclose(init.W_dec.detach(), two[a]["W_dec"], atol=1e-3)
        # rank 0 alone logged: one record per log step, global metrics
        recs = [json.loads(ln) for ln in (tmp_path / f"two-{a}" / "metrics.jsonl").open()]
        one = [json.loads(ln) for ln in (tmp_path / f"one-{a}" / "metrics.jsonl").open()]
        assert [r["step"] for r in recs] == [r["step"] for r in one] == [3, 6, 9, 12]
        for r2, r1 in zip(recs, one, strict=True):
            for key in ("loss", "fvu", "l0", "dead_fraction"):
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (a, key)
    for a in ("batchtopk", "feature_choice", "feature_choice_zipf"):
        assert single[a]["threshold"].abs().sum() > 0  # the estimate ran (and matched, above)
    # a threshold per latent (the m_j-th largest of its column), not one scalar
    assert single["feature_choice"]["threshold"].unique().numel() > 1
    # the adapted biases moved from their init of 0 (and matched, above)
    assert (single["gba"]["b_enc"] != 0).sum() > 0


#: feature_choice selection cases: (capacity, k) at global batch FC_B; zipf with k·B < M has
#: zero-capacity latents, uniform k = 40 has m_j = 20 > the 16 rows a rank holds
FC_B, FC_CASES = 32, (("zipf", 1), ("uniform", 40))


def _fc_sae(capacity: str, k: int):
    from saelab.saes.feature_choice import ChoiceOptions

    cfg = SAEConfig(architecture="feature_choice", d_in=D, d_sae=64,
                    options=ChoiceOptions(k=k, capacity=capacity, threshold_start_fraction=0))
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0)).train()
    with torch.no_grad():  # distinct frequencies in a random order: ranks are not index order
        sae.firing_freq.copy_(torch.rand(64, generator=torch.Generator().manual_seed(1)))
        sae.freq_updates.fill_(1)
    # ties-free affinities, about a third positive: some columns have fewer than m_j
    pre_BF = torch.randn(FC_B, 64, generator=torch.Generator().manual_seed(2)) - 0.5
    return sae, pre_BF


def _fc_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for capacity, k in FC_CASES:
            sae, pre_BF = _fc_sae(capacity, k)
            n = FC_B // world
            code = sae.select_train(pre_BF[rank * n:(rank + 1) * n], step=0)
            out[capacity] = (code.dense(n, 64), sae.threshold.clone(), sae.firing_freq.clone())
        torch.save(out, Path(result_dir) / f"fc-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_rank_feature_choice_selection_matches_naive(tmp_path):
    """One FC selection on 2 ranks x 16 rows against a naive per-column loop over the global
    32 rows: the kept entries, the first threshold estimate (the m_j-th largest of the global
    column, its max where m_j = 0) and the firing frequencies."""
    mp.spawn(_fc_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"fc-rank{r}.pt") for r in range(2)]
    for capacity, k in FC_CASES:
        sae, pre_BF = _fc_sae(capacity, k)
        cap_F = sae.capacities(FC_B).tolist()
        acts_BF = torch.relu(pre_BF).double()
        want_BF = torch.zeros_like(acts_BF)
        thr_F = torch.zeros(64, dtype=torch.float64)
        for j in range(64):
            col = sorted(((float(acts_BF[i, j]), i) for i in range(FC_B)), reverse=True)
            for v, i in col[:cap_F[j]]:
                want_BF[i, j] = v
            thr_F[j] = col[cap_F[j] - 1][0] if cap_F[j] > 0 else col[0][0]
        assert sum(cap_F) == min(k * FC_B, 64 * FC_B)
        assert (torch.tensor(cap_F) == 0).any() == (capacity == "zipf")
        assert max(cap_F) > FC_B // 2 or capacity == "zipf"
        got_BF = torch.cat([r[capacity][0] for r in ranks]).double()
        assert torch.equal(got_BF, want_BF), capacity
        for r in ranks:
            assert torch.allclose(r[capacity][1].double(), thr_F, atol=1e-6, rtol=0), capacity
            # one EMA step of the firing rate over the global batch
            beta = sae.cfg.options.zipf_freq_beta
            freq_F = (beta * sae.firing_freq.double()
                      + (1 - beta) * (want_BF != 0).double().sum(0) / FC_B)
            assert torch.allclose(r[capacity][2].double(), freq_F, atol=1e-6), capacity


@pytest.mark.slow
def test_two_rank_resume_matches_uninterrupted(store_path, tmp_path):
    """A 2-rank run stopped after 5 of 12 steps and resumed on 2 ranks ends where one
    uninterrupted process does."""
    ref = _fit(_cfg("topk", store_path, tmp_path / "ref"))
    cfg = _cfg("topk", store_path, tmp_path / "two")
    resumed = _cfg("topk", store_path, tmp_path / "two")
    resumed.resume = True
    out = _run_ranks(2, [("part", cfg, 5), ("resumed", resumed, None)], tmp_path)
    assert not torch.allclose(out["part"]["W_dec"], ref["W_dec"], atol=1e-4)
    _assert_same(ref, out["resumed"])


def test_launcher_command_and_config_checks():
    from saelab.errors import ConfigError
    from saelab.train.distributed import strip_nproc, torchrun_command

    argv = ["train", "--nproc", "2", "--store", "S", "--nproc=3", "--out", "R"]
    assert strip_nproc(argv) == ["train", "--store", "S", "--out", "R"]
    cmd = torchrun_command(argv, 2)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-7:] == ["-m", "saelab", "train", "--store", "S", "--out", "R"]
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig(batch_size=1000, nproc=3).validate()
    with pytest.raises(ConfigError, match="nproc"):
        TrainConfig(nproc=0).validate()


def test_cli_nproc_needs_a_store(tmp_path, capsys):
    from saelab.cli import main

    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--store" in capsys.readouterr().err


class _FakeTorchrun:
    def __init__(self, chunks: list[bytes], rc: int):
        self._chunks, self._rc = list(chunks), rc
        self.stderr = self

    def read1(self, _n: int) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""

    def wait(self) -> int:
        return self._rc


_AGENT = b"torch/distributed/elastic/multiprocessing/api.py:1002]"


def test_torchrun_report_dropped_only_after_a_user_error():
    """``--nproc`` relays the workers' stderr; torchrun's failure report goes when every failed
    worker exited 2 (it printed its one error line), and stays for a crash."""
    import io

    from saelab.train.distributed import _relay_stderr

    bar = b"harvest: 50%|#####     | 1/2\r"
    user = [bar, b"error: bad --out\nW1202 01:05:39.3 9 " + _AGENT[:-6] + b"1028] Sending process "
            b"5 closing signal SIGTERM\nE1202 01:05:39.4 9 ",
            _AGENT + b" failed (exitcode: 2) local_rank: 0\nTraceback...\nChildFailedError\n"]
    out = io.BytesIO()
    assert _relay_stderr(_FakeTorchrun(user, 1), out) == 2
    assert out.getvalue() == bar + b"error: bad --out\n"
    crash = [b"Segmentation fault\nE1202 01:05:39.4 9 " + _AGENT
             + b" failed (exitcode: -11) local_rank: 1\nTraceback...\n"]
    out = io.BytesIO()
    assert _relay_stderr(_FakeTorchrun(crash, 1), out) == 1
    assert out.getvalue() == b"".join(crash)
