"""GPU paths (skipped without CUDA; run them where a GPU is): training on the device matches the
CPU run, and `auto` picks a dtype the device supports."""

import pytest
import torch
from test_trainer import B, D, F, synthetic_batches

from saelab.config import SAEConfig, TrainConfig
from saelab.runtime import resolve_model_dtype
from saelab.saes.registry import build_sae
from saelab.train.trainer import Trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _train(arch: str, device: str, tmp_path) -> dict[str, torch.Tensor]:
    sae = build_sae(SAEConfig(architecture=arch, d_in=D, d_sae=F, options={"k": 4}
                              if arch in ("topk", "batchtopk") else None),
                    device=device, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(tokens=B * 20, batch_size=B, lr=1e-3, log_every=5, checkpoint_every=0,
                      lr_warmup_steps=3)
    Trainer(sae, cfg, run_dir=tmp_path / device, progress=False).fit(synthetic_batches())
    return {k: v.detach().cpu() for k, v in sae.state_dict().items()}


@pytest.mark.parametrize("arch", ["topk", "gated", "batchtopk"])
def test_cuda_training_matches_cpu(arch, tmp_path):
    cpu, gpu = _train(arch, "cpu", tmp_path), _train(arch, "cuda", tmp_path)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], atol=2e-3, rtol=2e-3, msg=name)


def test_auto_model_dtype_on_cuda():
    dtype = resolve_model_dtype("auto", "cuda")
    assert dtype in (torch.bfloat16, torch.float32)
    if not torch.cuda.is_bf16_supported():
        assert dtype == torch.float32


def test_cuda_fused_relu_and_auxk_gradients_match_cpu():
    """The fused ReLU step (_relu_kernel) and AuxK's dense regime (_DeadColumnsDecode) give the
    CPU's float64 loss and gradients on the GPU."""
    from saelab.saes.sparse import SparsePreActs, auxk_loss

    def grads(device: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        sae = build_sae(SAEConfig(architecture="relu", d_in=D, d_sae=F), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)).to(device)
        x = torch.randn(B, D, generator=g, dtype=torch.float64).to(device)
        dead = (torch.arange(F) % 3 == 0).to(device)
        resid = torch.randn(B, D, generator=g, dtype=torch.float64).to(device)
        params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
        aux = auxk_loss(SparsePreActs(x, sae.W_enc, sae.b_enc, sae.b_dec), resid, sae.W_dec,
                        dead, k_aux=F // 3)  # k_aux = n_dead: the dense regime
        total = sae.loss(x, step=10**6).total + aux
        return [t.cpu() for t in (total, *torch.autograd.grad(total, params))]

    for a, b in zip(grads("cuda"), grads("cpu"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
