"""Sweep planning: the grid of (family, level) runs, and the checks that a sweep folder (and
each run folder in it) was made with the same shared settings."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from saelab.config import PipelineConfig, RunConfig, SweepConfig
from saelab.data.store import ActivationStore
from saelab.errors import ConfigError, RunFolderError
from saelab.fsutil import atomic_write_json
from saelab.runfolder import RunFolder
from saelab.saes import registry
from saelab.saes.registry import (
    get_family,
    parse_levels,
    set_dotted,
    validate_sae_config,
    with_family,
)

SWEEP_CONFIG = "sweep_config.json"
RUNS = "runs"


def fmt_level(v: float | int) -> str:
    return format(v, "g")


@dataclass
class SweepRun:
    """One point of the grid: a family at one level of its sparsity knob."""

    family: str
    param: str  # dotted SAEConfig path (the family's sweep_param)
    level: float | int
    cfg: RunConfig

    @property
    def name(self) -> str:
        return f"{self.family}-{self.param.split('.')[-1]}-{fmt_level(self.level)}"

    @property
    def label(self) -> str:
        return f"{self.family} {self.param.split('.')[-1]}={fmt_level(self.level)}"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)


# ---- the grid -----------------------------------------------------------------------------------
def families(cfg: SweepConfig) -> list[str]:
    """The families of ``--arch``, checked against the registry, with their ``--levels``."""
    names = registry.parse_arch_list(cfg.archs)
    registry.check_trainable(names)
    for name in level_overrides(cfg):
        if name not in names:
            raise ConfigError(f"--levels names {name!r}, which is not in --arch "
                              f"({', '.join(names)})")
    if hasattr(registry, "check_shared_options"):
        registry.check_shared_options(cfg.sae.options, names)
    return names


def level_overrides(cfg: SweepConfig) -> dict[str, list[float]]:
    return parse_levels(cfg.levels, many=True)


def plan_runs(cfg: SweepConfig) -> list[SweepRun]:
    """Every (family, level) run of ``cfg`` with its full, validated RunConfig."""
    explicit = cfg.archs.strip() != "all"
    overrides = level_overrides(cfg)
    runs = []
    for family in families(cfg):
        cls = get_family(family)
        levels = overrides.get(family, list(cls.sweep_levels))
        if not levels:
            if explicit:
                raise ConfigError(f"{family} declares no default sweep levels: give them with "
                                  f"--levels {family}=V1,V2,...")
            continue
        for value in levels:
            # shared option values apply where the family has them
            sae = with_family(cfg.sae, family, strict=False)
            level = set_dotted(sae, cls.sweep_param, value)
            # every setting train and sweep share, with this run's SAE and the sweep's rows
            shared = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(PipelineConfig)}
            run = SweepRun(family, cls.sweep_param, level, RunConfig(
                **{**shared, "sae": sae, "out": "", "harvest_tokens": cfg.harvest_rows()}))
            run.cfg.out = str(Path(cfg.out) / RUNS / run.name)
            try:
                run.cfg.validate()
                validate_sae_config(run.cfg.sae)
            except ConfigError as e:
                raise ConfigError(f"run {run.label}: {e}") from None
            runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("--levels repeats a value: every run needs its own level")
    if not runs:
        raise ConfigError("nothing to sweep: no family in --arch has sweep levels")
    return runs


def runs_the_store_can_serve(cfg: SweepConfig, runs: list[SweepRun], log) -> list[SweepRun]:
    """With --store: families that train on LM-loss gradients need a store that has them.
    Named explicitly they are an error (before anything is trained); under 'all' they are left
    out with a note. Without --store the pipeline harvests a store with gradients for them."""
    needs = [r for r in runs if get_family(r.family).uses_lm_grads]
    if not cfg.store or not needs or ActivationStore.open(cfg.store).has_grads:
        return runs
    names = ", ".join(dict.fromkeys(r.family for r in needs))
    if cfg.archs.strip() != "all":
        raise ConfigError(f"{names} train(s) on LM-loss gradients but --store {cfg.store} has "
                          "none: drop them from --arch, or give a store harvested with "
                          "--with-grads")
    log(f"note: leaving out {names}: --store {cfg.store} has no LM-loss gradients "
        "(harvest one with --with-grads)")
    skip = {r.name for r in needs}
    return [r for r in runs if r.name not in skip]


# ---- settings checks ----------------------------------------------------------------------------
def comparable(d: dict) -> dict:
    """A run's or sweep's settings without what may change between invocations."""
    d = copy.deepcopy(d)
    for key in ("out", "resume", "overwrite", "archs", "levels", "lockstep"):
        d.pop(key, None)
    d.get("model", {}).pop("device", None)
    d.get("train", {}).pop("wandb_project", None)
    if d.get("store"):
        d["store"] = str(Path(d["store"]).expanduser().resolve())
    return d


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys only one side has are options added or removed by
    another saelab version: they are not counted (as from_dict fills them with defaults)."""
    keys = []
    for k in sorted(set(a) & set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def prepare_out(cfg: SweepConfig, outputs: tuple[str, ...]) -> None:
    """Create OUT, or check that it holds a sweep with the same shared settings; ``outputs``:
    the sweep's own files, removed (with ``runs/``) by ``--overwrite``."""
    out = Path(cfg.out)
    settings = comparable(asdict(cfg))
    marker = out / SWEEP_CONFIG
    if marker.exists():
        saved = json.loads(marker.read_text()).get("settings")
        if cfg.overwrite:
            _clear_sweep(out, outputs)
        elif diff := diff_keys(saved or {}, settings):
            raise RunFolderError(
                f"{out} holds a sweep made with other settings "
                f"({', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''}): pass "
                f"--overwrite to replace it, or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise RunFolderError(f"{out} is not empty and holds no saelab sweep: choose another "
                             "--out (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"settings": settings})


def _clear_sweep(out: Path, outputs: tuple[str, ...]) -> None:
    """Remove what a sweep writes (and only that)."""
    shutil.rmtree(out / RUNS, ignore_errors=True)
    for name in (SWEEP_CONFIG, *outputs):
        (out / name).unlink(missing_ok=True)


def check_run_matches(run: SweepRun) -> None:
    """A run folder found in the sweep was made with this run's settings."""
    mine = comparable(asdict(run.cfg))
    theirs: dict[str, Any] = comparable(asdict(run.folder.load_config()))
    if diff := diff_keys(theirs, mine):
        raise RunFolderError(
            f"{run.run_dir} holds a run made with other settings ({', '.join(diff[:4])}): "
            "pass --overwrite to replace the sweep, or choose another --out")
