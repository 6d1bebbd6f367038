"""Check that saelab's SAE folders and SAELens' are interchangeable, both ways.

SAELens is not a saelab dependency, so this runs in two interpreters (SAELens in a scratch
venv, e.g. ``python3 -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install
torch==2.13.0 sae-lens``)::

    # saelab → SAELens
    .venv/bin/python benchmarks/saelens_compat.py make /tmp/compat
    /tmp/saelens-venv/bin/python benchmarks/saelens_compat.py check /tmp/compat/*/

    # SAELens → saelab (also how tests/fixtures/saelens_* were made, with --tiny)
    /tmp/saelens-venv/bin/python benchmarks/saelens_compat.py saelens-save /tmp/compat-sl
    .venv/bin/python benchmarks/saelens_compat.py saelab-check /tmp/compat-sl/*/

Each folder carries ``compat.safetensors`` (``x``, and the writer's ``latents`` and ``recon``
for it); the reader recomputes them and prints the max abs differences. Exit status 1 on any
mismatch. Weights are random but non-trivial (random biases, r_mag and thresholds set so that
roughly half the latents fire), so every parameter affects the outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMPAT_FILE = "compat.safetensors"
# Relative to the largest reference value: float32 matmuls in a different order differ ~1e-7.
RTOL = 1e-5


def _inputs(d_in: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) * 2.0 + torch.randn(d_in, generator=g)


def _randomise(params: dict, d_in: int, seed: int, x) -> None:
    """Fill SAELens-named parameters in place with random, non-degenerate values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d_sae = params["W_enc"].shape[1]
        params["W_enc"].copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        params["W_dec"].copy_(torch.randn(d_sae, d_in, generator=g) * 0.3)
        params["b_dec"].copy_(torch.randn(d_in, generator=g) * 0.5)
        for name in ("b_enc", "b_gate", "b_mag"):
            if name in params:
                params[name].copy_(torch.randn(d_sae, generator=g) * 0.5)
        if "r_mag" in params:
            params["r_mag"].copy_(torch.randn(d_sae, generator=g) * 0.5)
        if "threshold" in params:
            # Median of each latent's positive pre-activations: about half of them fire.
            h = x @ params["W_enc"] + params["b_enc"]
            pos = torch.where(h > 0, h, torch.nan)
            thr = pos.nanmedian(dim=0).values.nan_to_num(0.5)
            params["threshold"].copy_(thr * (0.5 + torch.rand(d_sae, generator=g)))


def _compare(name: str, ref: dict, got: dict) -> bool:
    ok = True
    parts = []
    for key in ("latents", "recon", "forward"):
        r = ref["recon" if key == "forward" else key]
        diff = (got[key].float() - r.float()).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        ok &= diff <= RTOL * scale
        parts.append(f"{key} {diff:.3e}")
    l0 = (ref["latents"] != 0).float().sum(-1).mean().item()
    flips = ((ref["latents"] != 0) != (got["latents"] != 0)).sum().item()
    status = "OK" if ok and flips == 0 else "MISMATCH"
    print(
        f"{status:8s} {name}: max abs diff {', '.join(parts)}; "
        f"mean L0 {l0:.1f}/{ref['latents'].shape[1]}, firing flips {flips}"
    )
    return ok and flips == 0


# ---- saelab side (project venv) --------------------------------------------------------------
def cmd_make(out: Path, tiny: bool) -> int:
    import torch

    from saelab.config import SAEConfig
    from saelab.io import save_sae
    from saelab.saes.registry import architectures, build_sae

    d_in, d_sae = (8, 16) if tiny else (64, 256)
    x = _inputs(d_in, 64, seed=1)
    cases = [
        ("relu", "april", False),
        ("relu", "tm", True),
        ("gated", "paper", True),
        ("jumprelu", None, False),
        ("jumprelu", None, True),
        # TopK-family folders SAELens opens: topk as `topk`; the batch-selected families (and
        # g-SAE's grad-free inference) through their thresholded/TopK inference functions.
        ("topk", None, True),
        ("gsae", None, True),
        ("batchtopk", None, True),
        ("mutual_choice", None, True),
        ("feature_choice", None, True),
        ("matryoshka", None, True),
    ]
    for i, (arch, variant, b_dec_in) in enumerate(cases):
        if arch not in architectures():
            print(f"skip {arch}: not registered")
            continue
        cfg = SAEConfig(
            architecture=arch,
            d_in=d_in,
            d_sae=d_sae,
            variant=variant,
            apply_b_dec_to_input=b_dec_in,
        )
        sae = build_sae(cfg, generator=torch.Generator().manual_seed(i))
        # thresholds of the batch-selected families are buffers, not parameters
        _randomise({**dict(sae.named_parameters()), **dict(sae.named_buffers())}, d_in,
                   seed=100 + i, x=x)
        folder = out / f"saelab_{arch}_{variant or 'default'}_bdec{int(b_dec_in)}"
        _save_with_outputs(sae, folder, x, save_sae)
        if arch == "gated":  # the exact gated → JumpReLU conversion must survive SAELens too
            _save_with_outputs(sae.to_jumprelu(), out / "saelab_gated_to_jumprelu", x, save_sae)
    return 0


def _save_with_outputs(sae, folder: Path, x, save_sae) -> None:
    import torch
    from safetensors.torch import save_file

    meta = {
        "model_name": "compat-test",
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 16,
        "dataset_path": "random",
    }
    sparsity = torch.full((sae.d_sae,), -2.0)
    save_sae(sae, folder, metadata=meta, sparsity_log10_F=sparsity, metrics={"note": "compat"})
    with torch.no_grad():
        latents = sae.encode(x)
        recon = sae.decode(latents)
    save_file(
        {"x": x, "latents": latents.contiguous(), "recon": recon.contiguous()}, folder / COMPAT_FILE
    )
    print(f"wrote {folder}")


def cmd_saelab_check(folders: list[Path]) -> int:
    import torch
    from safetensors.torch import load_file

    from saelab.io import load_sae

    ok = True
    for folder in folders:
        ref = load_file(folder / COMPAT_FILE)
        sae = load_sae(folder)
        with torch.no_grad():
            latents = sae.encode(ref["x"])
            got = {"latents": latents, "recon": sae.decode(latents), "forward": sae(ref["x"]).recon}
        ok &= _compare(f"{folder.name} → saelab {sae.architecture}", ref, got)
    return 0 if ok else 1


# ---- SAELens side (scratch venv) -------------------------------------------------------------
def cmd_check(folders: list[Path]) -> int:
    import sae_lens
    import torch
    from safetensors.torch import load_file

    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    ok = True
    for folder in folders:
        ref = load_file(folder / COMPAT_FILE)
        sae = sae_lens.SAE.load_from_disk(folder)
        with torch.no_grad():
            latents = sae.encode(ref["x"])
            got = {"latents": latents, "recon": sae.decode(latents), "forward": sae(ref["x"])}
        ok &= _compare(f"{folder.name} → SAELens {type(sae).__name__}", ref, got)
    return 0 if ok else 1


def cmd_saelens_save(out: Path, tiny: bool) -> int:
    import torch
    from sae_lens import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata
    from safetensors.torch import save_file

    d_in, d_sae = (8, 16) if tiny else (64, 256)
    x = _inputs(d_in, 16 if tiny else 64, seed=2)
    cases = [
        (StandardSAE, StandardSAEConfig, True),
        (GatedSAE, GatedSAEConfig, True),
        (JumpReLUSAE, JumpReLUSAEConfig, False),
        (TopKSAE, TopKSAEConfig, True),
    ]
    for i, (sae_cls, cfg_cls, b_dec_in) in enumerate(cases):
        meta = SAEMetadata(
            model_name="compat-test",
            hook_name="blocks.0.hook_resid_post",
            hook_head_index=None,
            prepend_bos=True,
            context_size=16,
            dataset_path="random",
        )
        extra = {"k": max(1, d_sae // 4)} if cfg_cls is TopKSAEConfig else {}
        cfg = cfg_cls(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=b_dec_in, metadata=meta,
                      **extra)
        sae = sae_cls(cfg)
        _randomise(dict(sae.named_parameters()), d_in, seed=200 + i, x=x)
        folder = out / f"saelens_{cfg.architecture()}"
        sae.save_model(folder)
        with torch.no_grad():
            latents = sae.encode(x)
            recon = sae.decode(latents)
            density = (latents != 0).float().mean(0)
        save_file({"sparsity": torch.log10(density + 1e-10)}, folder / "sparsity.safetensors")
        save_file(
            {"x": x, "latents": latents.contiguous(), "recon": recon.contiguous()},
            folder / COMPAT_FILE,
        )
        print(f"wrote {folder} (sae_lens {cfg.metadata.sae_lens_version})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("make", "saelab: save random SAEs + outputs (project venv)"),
        ("saelens-save", "SAELens: save random SAEs + outputs (SAELens venv)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("out", type=Path)
        s.add_argument("--tiny", action="store_true", help="d_in 8, d_sae 16 (test fixtures)")
    for name, help_ in (
        ("check", "open folders with SAELens and compare (SAELens venv)"),
        ("saelab-check", "open folders with saelab and compare (project venv)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("folders", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "make":
        return cmd_make(args.out, args.tiny)
    if args.cmd == "saelens-save":
        return cmd_saelens_save(args.out, args.tiny)
    if args.cmd == "check":
        return cmd_check(args.folders)
    return cmd_saelab_check(args.folders)


if __name__ == "__main__":
    sys.exit(main())
