"""saelab.io: SAELens-format save/load, SAELens-written fixtures, bad folders, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab.io as sio
from saelab.config import SAEConfig
from saelab.errors import SAEFormatError
from saelab.saes.registry import architectures, build_sae

FIXTURES = Path(__file__).parent / "fixtures"
D_IN, D_SAE = 8, 16


def _cases() -> list[tuple[str, str | None]]:
    return [
        (name, v)
        for name, cls in sorted(architectures().items())
        for v in (cls.variants or (None,))
    ]


def _random_sae(arch: str, variant: str | None = None, seed: int = 0, **kw):
    """An SAE whose every parameter is random and matters (thresholds set so some latents fire)."""
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, variant=variant, **kw)
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(cfg, generator=g)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if name == "threshold":
                p.abs_()
    return sae


def _x(n: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 2


# ---- roundtrip ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "variant"), _cases())
def test_roundtrip_same_outputs_and_config(tmp_path, arch, variant):
    sae = _random_sae(arch, variant)
    sparsity = torch.linspace(-5, 0, D_SAE)
    meta = {"model_name": "m", "hook_name": "blocks.3.hook_resid_post", "context_size": 128}
    out = sio.save_sae(
        sae,
        tmp_path / "sae",
        metadata=meta,
        sparsity_log10_F=sparsity,
        metrics={"fvu": 0.25, "nan_metric": float("nan"), "t": torch.tensor(2.0)},
    )
    loaded = sio.load_sae(out)

    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x).recon, sae(x).recon)
    for name, p in loaded.named_parameters():
        assert p.device.type == "cpu" and p.requires_grad, name

    cfg = sio.read_metadata(out)
    assert cfg["architecture"] == (sae.saelens_architecture or f"saelab.{arch}")
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] == sae.cfg.apply_b_dec_to_input
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    assert cfg["saelab"]["architecture"] == arch
    assert torch.equal(sio.read_sparsity(out), sparsity)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"fvu": 0.25, "nan_metric": None, "t": 2.0}


def test_saved_tensor_names_are_saelens_names(tmp_path):
    expected = {
        "relu": {"W_enc", "b_enc", "W_dec", "b_dec"},
        "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
        "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    }
    for arch, names in expected.items():
        if arch not in architectures():
            continue
        out = sio.save_sae(_random_sae(arch), tmp_path / arch)
        assert set(load_file(out / sio.WEIGHTS_FILENAME)) == names


def test_dtype_roundtrip_and_override(tmp_path):
    sae = _random_sae("jumprelu").to(torch.bfloat16)
    out = sio.save_sae(sae, tmp_path / "bf16")
    assert sio.read_metadata(out)["dtype"] == "bfloat16"
    assert sio.load_sae(out).W_enc.dtype == torch.bfloat16
    assert sio.load_sae(out, dtype="float32").W_enc.dtype == torch.float32
    assert sio.load_sae(out, dtype=torch.float16).b_enc.dtype == torch.float16


def test_overwrite_replaces_folder_and_leaves_nothing_behind(tmp_path):
    sio.save_sae(_random_sae("jumprelu", seed=1), tmp_path / "sae", metrics={"a": 1})
    sae2 = _random_sae("jumprelu", seed=2)
    sio.save_sae(sae2, tmp_path / "sae")
    assert torch.equal(sio.load_sae(tmp_path / "sae").W_enc, sae2.W_enc)
    assert not (tmp_path / "sae" / "metrics.json").exists()  # stale files do not survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_failed_save_keeps_existing_folder(tmp_path, monkeypatch):
    old = _random_sae("jumprelu", seed=1)
    target = sio.save_sae(old, tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_save_file = sio.save_file

    def fail_midway(tensors, path, *a, **kw):
        if Path(path).name == sio.SPARSITY_FILENAME:  # the weights are already written
            raise OSError("disk full")
        return real_save_file(tensors, path, *a, **kw)

    monkeypatch.setattr(sio, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        sio.save_sae(_random_sae("jumprelu", seed=2), target, sparsity_log10_F=torch.zeros(D_SAE))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # temp folder cleaned up
    assert torch.equal(sio.load_sae(target).threshold, old.threshold)


def test_load_falls_back_to_old_folder_left_by_a_crash(tmp_path):
    sae = _random_sae("jumprelu")
    sio.save_sae(sae, tmp_path / "sae")
    (tmp_path / "sae").rename(tmp_path / "sae.old")  # crash between the two renames
    assert torch.equal(sio.load_sae(tmp_path / "sae").W_dec, sae.W_dec)


def test_load_accepts_path_to_cfg_file(tmp_path):
    out = sio.save_sae(_random_sae("jumprelu"), tmp_path / "sae")
    assert sio.load_sae(out / "cfg.json").d_sae == D_SAE


def test_save_rejects_wrong_sparsity_shape(tmp_path):
    with pytest.raises(ValueError, match="sparsity_log10_F"):
        sio.save_sae(_random_sae("jumprelu"), tmp_path / "s", sparsity_log10_F=torch.zeros(3))
    assert not (tmp_path / "s").exists()


# ---- SAELens-written folders ---------------------------------------------------------------------
FIXTURE_ARCHS = {
    "saelens_standard": "relu",
    "saelens_gated": "gated",
    "saelens_jumprelu": "jumprelu",
    "saelens_topk": "topk",
}


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCHS))
def test_load_saelens_written_fixture(name):
    """Folders written by SAELens 6.54.12 ``save_model`` (benchmarks/saelens_compat.py)."""
    folder = FIXTURES / name
    sae = sio.load_sae(folder)
    assert sae.architecture == FIXTURE_ARCHS[name]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert "saelab" not in cfg
    assert sae.cfg.apply_b_dec_to_input == cfg["apply_b_dec_to_input"]
    ref = load_file(folder / "compat.safetensors")
    with torch.no_grad():
        latents = sae.encode(ref["x"])
        torch.testing.assert_close(latents, ref["latents"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(latents), ref["recon"], atol=1e-5, rtol=1e-5)
    assert 0 < (ref["latents"] != 0).float().mean() < 1  # the fixture exercises the gating
    assert sio.read_sparsity(folder).shape == (sae.d_sae,)
    assert sio.read_metadata(folder)["metadata"]["hook_name"] == "blocks.0.hook_resid_post"


def _write_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder


def _standard_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }


def test_load_pre_6_saelens_config(tmp_path):
    # SAELens 3-5 layout: no architecture (= standard), no metadata block, old key names.
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cuda",
        "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre",
        "hook_point_head_index": None,
        "context_size": 128,
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
        "sae_lens_training_version": "3.0.0",
    }
    t = _standard_tensors()
    folder = _write_folder(tmp_path / "old", cfg, t)
    sae = sio.load_sae(folder)
    assert sae.architecture == "relu" and sae.cfg.apply_b_dec_to_input
    assert sae.W_enc.device.type == "cpu"
    x = _x()
    expected = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    torch.testing.assert_close(sae.encode(x), expected)
    meta = sio.read_metadata(folder)["metadata"]
    assert meta["model_name"] == "gpt2-small"
    assert meta["hook_name"] == "blocks.8.hook_resid_pre"
    assert meta["context_size"] == 128


def test_load_old_jumprelu_log_threshold(tmp_path):
    t = _standard_tensors()
    log_thr = torch.randn(D_SAE) * 0.3
    t["log_threshold"] = log_thr
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "metadata": {"sae_lens_version": "5.9.0"},
    }
    sae = sio.load_sae(_write_folder(tmp_path / "jr", cfg, t))
    torch.testing.assert_close(sae.threshold.detach(), log_thr.exp())


def test_load_old_finetuning_scaling_factor_is_folded(tmp_path):
    t = _standard_tensors()
    scale = torch.rand(D_SAE) + 0.5
    t["scaling_factor"] = scale
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "finetuning_scaling_factor": True,
        "apply_b_dec_to_input": False,
    }
    sae = sio.load_sae(_write_folder(tmp_path / "ft", cfg, t))
    x = _x()
    f = torch.relu(x @ t["W_enc"] + t["b_enc"])
    with torch.no_grad():
        torch.testing.assert_close(sae(x).recon, (f * scale) @ t["W_dec"] + t["b_dec"])


def test_old_topk_labelled_standard_is_rejected(tmp_path):
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
    }
    folder = _write_folder(tmp_path / "topk", cfg, _standard_tensors())
    with pytest.raises(SAEFormatError, match="activation_fn 'topk'"):
        sio.load_sae(folder)


def test_runtime_normalisation_is_rejected_and_unfolded_scale_warns(tmp_path):
    base = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32"}
    folder = _write_folder(
        tmp_path / "ln", {**base, "normalize_activations": "layer_norm"}, _standard_tensors()
    )
    with pytest.raises(SAEFormatError, match="layer_norm"):
        sio.load_sae(folder)
    folder = _write_folder(
        tmp_path / "avg",
        {**base, "normalize_activations": "expected_average_only_in"},
        _standard_tensors(),
    )
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        sio.load_sae(folder)


# ---- bad folders --------------------------------------------------------------------------------
def _good(tmp_path: Path, arch: str = "jumprelu") -> Path:
    return sio.save_sae(_random_sae(arch), tmp_path / "sae")


def test_missing_folder(tmp_path):
    with pytest.raises(SAEFormatError, match="does not exist"):
        sio.load_sae(tmp_path / "nope")


def test_path_is_a_plain_file(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(SAEFormatError, match="not a folder"):
        sio.load_sae(tmp_path / "f.bin")


def test_missing_cfg(tmp_path):
    folder = _good(tmp_path)
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match=r"cfg\.json is missing"):
        sio.load_sae(folder)


@pytest.mark.parametrize(
    ("text", "match"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")]
)
def test_bad_cfg_json(tmp_path, text, match):
    folder = _good(tmp_path)
    (folder / "cfg.json").write_text(text)
    with pytest.raises(SAEFormatError, match=match):
        sio.load_sae(folder)


def test_missing_weights(tmp_path):
    folder = _good(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors is missing"):
        sio.load_sae(folder)


def test_corrupt_weights(tmp_path):
    folder = _good(tmp_path)
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="corrupt"):
        sio.load_sae(folder)


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_unknown_saelens_architecture(tmp_path):
    folder = _good(tmp_path)
    _edit_cfg(folder, saelab=None, architecture="matching_pursuit")
    with pytest.raises(SAEFormatError, match="unknown architecture 'matching_pursuit'"):
        sio.load_sae(folder)


def test_unknown_saelab_architecture(tmp_path):
    folder = _good(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["saelab"]["architecture"] = "wavelet"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="unknown architecture 'wavelet'"):
        sio.load_sae(folder)


def test_bad_width_in_cfg(tmp_path):
    folder = _good(tmp_path)
    _edit_cfg(folder, d_sae="16")
    with pytest.raises(SAEFormatError, match="d_sae must be a positive integer"):
        sio.load_sae(folder)


def test_wrong_shape_names_the_tensor(tmp_path):
    folder = _good(tmp_path)
    t = load_file(folder / "sae_weights.safetensors")
    t["W_dec"] = torch.zeros(D_SAE, D_IN + 1)
    save_file(t, folder / "sae_weights.safetensors")
    with pytest.raises(
        SAEFormatError, match=r"tensor W_dec has shape \[16, 9\], expected \[16, 8\]"
    ):
        sio.load_sae(folder)


def test_width_mismatch_between_cfg_and_weights(tmp_path):
    folder = _good(tmp_path)
    _edit_cfg(folder, d_sae=D_SAE * 2)
    with pytest.raises(
        SAEFormatError, match=r"tensor W_enc has shape \[8, 16\], expected \[8, 32\]"
    ):
        sio.load_sae(folder)


def test_missing_and_unexpected_tensors(tmp_path):
    folder = _good(tmp_path)
    t = load_file(folder / "sae_weights.safetensors")
    thr = t.pop("threshold")
    save_file(t, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="missing tensor.*threshold"):
        sio.load_sae(folder)
    t["threshold"], t["W_extra"] = thr, thr.clone()
    save_file(t, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="unexpected tensor.*W_extra"):
        sio.load_sae(folder)


def test_error_messages_are_one_line(tmp_path):
    folder = _good(tmp_path)
    (folder / "cfg.json").write_text("{\n  bad")
    with pytest.raises(SAEFormatError) as info:
        sio.load_sae(folder)
    assert "\n" not in str(info.value)


def test_saelens_topk_options_are_checked(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}
    base = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32"}
    ok = sio.load_sae(_write_folder(tmp_path / "ok", {**base, "k": 3}, tensors))
    assert ok.cfg.options.k == 3 and ((ok.encode(_x()) != 0).sum(1) <= 3).all()
    with pytest.raises(SAEFormatError, match="positive integer k"):
        sio.load_sae(_write_folder(tmp_path / "nok", base, tensors))
    with pytest.raises(SAEFormatError, match="rescale_acts_by_decoder_norm"):
        sio.load_sae(_write_folder(tmp_path / "rescale",
                                   {**base, "k": 3, "rescale_acts_by_decoder_norm": True}, tensors))
