"""Folders written by the format-1 code (tests/fixtures/format_v1, see its README) still load
and compute what that code computed; configs rebuilt from format-1 dicts get the family's
options from the old option groups; saving writes format 2 with only the family's options."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saelab
import saelab.io as sio
from saelab.config import RunConfig, SAEConfig
from saelab.errors import ConfigError
from saelab.saes.registry import (
    architectures,
    config_from_dict,
    get_family,
    sae_config_from_dict,
    validate_sae_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
FAMILIES = sorted(p.name.removeprefix("sae_") for p in FIXTURES.glob("sae_*"))


#: families added after format 1 (no fixture can exist for them)
NEW_SINCE_FORMAT_1 = {"itda"}


def test_every_trainable_family_has_a_fixture():
    assert set(FAMILIES) == set(architectures(trainable_only=True)) - NEW_SINCE_FORMAT_1


@pytest.mark.parametrize("family", FAMILIES)
def test_format_v1_folder_loads_and_reproduces_outputs(family):
    folder = FIXTURES / f"sae_{family}"
    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["saelab"]["format_version"] == 1  # the fixture really is the old layout
    sae = sio.load_sae(folder)
    assert sae.architecture == family
    assert isinstance(sae.cfg.options, get_family(family).Options)
    # every option the family has takes the value stored in the old group of the same name
    old = {k: v for g in ("topk", "jumprelu", "choice", "matryoshka", "afa", "vsae", "gba", "gsae")
           for k, v in raw["saelab"]["config"][g].items()}
    # options added since format 1 take their defaults, which keep the old behaviour
    for f in dataclasses.fields(sae.cfg.options):
        expected = old[f.name] if f.name in old else f.default
        assert getattr(sae.cfg.options, f.name) == expected, f.name
    if hasattr(sae.cfg.options, "k"):
        assert sae.cfg.options.k == 4  # make_fixtures.py set topk.k = 4
    ref = load_file(folder / "reference.safetensors")
    sae.eval()
    with torch.no_grad():
        latents = sae.encode(ref["x"])
        recon = sae.decode(latents)
    torch.testing.assert_close(latents, ref["latents"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(recon, ref["recon"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["topk", "matryoshka", "gated", "jumprelu"])
def test_resave_writes_format_2_with_only_the_family_options(family, tmp_path):
    sae = sio.load_sae(FIXTURES / f"sae_{family}")
    sio.save_sae(sae, tmp_path / "sae")
    block = json.loads((tmp_path / "sae" / "cfg.json").read_text())["saelab"]
    assert block["format_version"] == 2
    cfg = block["config"]
    assert not {"topk", "jumprelu", "choice", "matryoshka", "afa", "vsae", "gba", "gsae"} & set(cfg)
    names = {f.name for f in dataclasses.fields(get_family(family).Options)}
    assert set(cfg["options"]) == names
    again = sio.load_sae(tmp_path / "sae")
    assert again.cfg == sae.cfg
    x = load_file(FIXTURES / f"sae_{family}" / "reference.safetensors")["x"]
    with torch.no_grad():
        assert torch.equal(again.encode(x), sae.encode(x))


def test_run_config_v1_loads_with_the_family_options():
    data = json.loads((FIXTURES / "run_topk" / "run_config.json").read_text())
    assert "topk" in data["sae"] and "options" not in data["sae"]  # format 1
    cfg = config_from_dict(RunConfig, data)
    assert isinstance(cfg, RunConfig) and cfg.sae.architecture == "topk"
    assert type(cfg.sae.options) is get_family("topk").Options
    assert cfg.sae.options.k == 8 and cfg.sae.d_sae == 64
    assert cfg.model.hook == data["model"]["hook"] and cfg.train.tokens == data["train"]["tokens"]
    validate_sae_config(cfg.sae)
    # the new layout round-trips through asdict (what the pipeline writes)
    again = config_from_dict(RunConfig, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg


def test_run_folder_sae_loads():
    sae = saelab.load_sae(FIXTURES / "run_topk")
    assert sae.architecture == "topk" and sae.cfg.options.k == 8 and sae.d_sae == 64


def test_v1_groups_map_only_the_family_fields():
    data = dataclasses.asdict(SAEConfig(architecture="jumprelu"))
    data.pop("options")
    data["jumprelu"] = {"bandwidth": 0.01, "target_l0": 7.0}
    data["topk"] = {"k": 5}  # jumprelu has no k: dropped
    cfg = sae_config_from_dict(data)
    assert cfg.options.bandwidth == 0.01 and cfg.options.target_l0 == 7.0
    assert not hasattr(cfg.options, "k")


def test_format_2_option_the_family_lacks():
    data = {"architecture": "gated", "options": {"k": 3}}
    assert sae_config_from_dict(data).options == get_family("gated").Options()  # newer keys
    with pytest.raises(ConfigError, match="--k is not an option of gated"):
        sae_config_from_dict(data, strict=True)


def test_newer_format_version_is_refused(tmp_path):
    src = FIXTURES / "sae_relu"
    dst = tmp_path / "sae"
    dst.mkdir()
    raw = json.loads((src / "cfg.json").read_text())
    raw["saelab"]["format_version"] = 99
    (dst / "cfg.json").write_text(json.dumps(raw))
    (dst / "sae_weights.safetensors").write_bytes((src / "sae_weights.safetensors").read_bytes())
    with pytest.raises(saelab.SaelabError, match="format_version 99"):
        sio.load_sae(dst)
