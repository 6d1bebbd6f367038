"""Hook points, truncated forwards, splicing, model loading and runtime helpers."""

from __future__ import annotations

import time

import pytest
import torch

from saelab.config import ModelConfig
from saelab.errors import ConfigError, HookError, ModelNotAvailableError
from saelab.models.hooks import (
    HookPoint,
    capture,
    find_blocks,
    hook_module,
    parse_hook,
    run_to_hook,
    splice,
)
from saelab.runtime import parse_dtype, resolve_device, resolve_model_dtype, tune_malloc


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 300, (batch, seq), generator=torch.Generator().manual_seed(0))


def n_hooks(module: torch.nn.Module) -> int:
    """Forward hooks on a module (transformers installs some of its own)."""
    return len(module._forward_hooks)


# --- parse_hook ---------------------------------------------------------------------------------


def test_parse_hook_long_and_short_forms():
    assert parse_hook("blocks.3.hook_resid_post", 30) == HookPoint("resid_post", 3)
    assert parse_hook("mlp_out.29", 30) == HookPoint("mlp_out", 29)
    assert parse_hook(" attn_out.0 ").name == "blocks.0.hook_attn_out"
    assert str(parse_hook("resid_post.12")) == "blocks.12.hook_resid_post"


@pytest.mark.parametrize(
    "bad", ["x", "blocks.3.hook_resid_pre", "resid.3", "blocks.a.hook_mlp_out"]
)
def test_parse_hook_unknown(bad):
    with pytest.raises(HookError, match=r"unknown hook .*use blocks\.L\.hook_resid_post"):
        parse_hook(bad, 30)


def test_parse_hook_layer_out_of_range():
    with pytest.raises(HookError, match=r"layer 40 out of range: the model has 30 layers \(0-29\)"):
        parse_hook("blocks.40.hook_resid_post", 30)
    with pytest.raises(HookError, match="out of range"):
        parse_hook("resid_post.-1")
    assert parse_hook("resid_post.40", 0).layer == 40  # 0 / None: layer count unknown


# --- finding modules ----------------------------------------------------------------------------


def test_find_blocks_is_generic(tiny_llama, tiny_gpt2):
    assert find_blocks(tiny_llama) is tiny_llama.model.layers
    assert find_blocks(tiny_gpt2) is tiny_gpt2.transformer.h
    assert find_blocks(tiny_llama.model) is tiny_llama.model.layers  # bare decoder
    assert hook_module(tiny_llama, "attn_out.1") is tiny_llama.model.layers[1].self_attn
    assert hook_module(tiny_gpt2, "mlp_out.2") is tiny_gpt2.transformer.h[2].mlp
    with pytest.raises(HookError, match="the model has 4 layers"):
        hook_module(tiny_llama, "resid_post.4")


# --- run_to_hook --------------------------------------------------------------------------------


def test_resid_post_equals_hidden_states(lm):
    x = ids()
    with torch.no_grad():
        hidden = lm(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    for layer in (0, 1):  # not the last layer: HF applies the final norm to hidden_states[-1]
        acts_BTD = run_to_hook(lm, x, f"resid_post.{layer}")
        assert acts_BTD.shape == (2, 12, 64)
        torch.testing.assert_close(acts_BTD, hidden[layer + 1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["attn_out", "mlp_out", "resid_post"])
def test_run_to_hook_matches_full_forward_capture(lm, kind):
    x = ids()
    hook = parse_hook(f"{kind}.1")
    before = n_hooks(hook_module(lm, hook))
    with capture(lm, hook) as cap, torch.no_grad():
        lm(input_ids=x, use_cache=False)
    torch.testing.assert_close(run_to_hook(lm, x, hook), cap.acts, rtol=0, atol=0)
    assert n_hooks(hook_module(lm, hook)) == before  # capture and run_to_hook removed theirs


def test_run_to_hook_stops_early(lm):
    calls = []
    later = find_blocks(lm)[2]
    before = n_hooks(find_blocks(lm)[1])
    handles = [
        later.register_forward_hook(lambda *_: calls.append("block2")),
        lm.get_output_embeddings().register_forward_hook(lambda *_: calls.append("head")),
    ]
    try:
        run_to_hook(lm, ids(), "resid_post.1")
        assert calls == []
        with torch.no_grad():
            lm(input_ids=ids(), use_cache=False)
        assert calls == ["block2", "head"]
    finally:
        for h in handles:
            h.remove()
    assert n_hooks(find_blocks(lm)[1]) == before


def test_run_to_hook_respects_attention_mask(tiny_llama):
    x = ids(1, 8)
    mask = torch.ones_like(x)
    mask[:, :3] = 0  # left padding
    masked = run_to_hook(tiny_llama, x, "resid_post.1", attention_mask=mask)
    plain = run_to_hook(tiny_llama, x, "resid_post.1")
    assert not torch.allclose(masked[:, 3:], plain[:, 3:])
    solo = run_to_hook(tiny_llama, x[:, 3:], "resid_post.1")
    torch.testing.assert_close(masked[:, 3:], solo, rtol=1e-4, atol=1e-5)


# --- splice -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out"])
def test_splice_identity_and_zeros(lm, kind):
    x = ids()
    with torch.no_grad():
        clean = lm(input_ids=x, use_cache=False).logits
        with splice(lm, f"{kind}.1", lambda a: a):
            same = lm(input_ids=x, use_cache=False).logits
        with splice(lm, f"{kind}.1", torch.zeros_like):
            zeroed = lm(input_ids=x, use_cache=False).logits
        after = lm(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (zeroed - clean).abs().max() > 1e-3
    torch.testing.assert_close(after, clean, rtol=0, atol=0)  # hook removed on exit


def test_splice_casts_dtype_checks_shape_and_cleans_up(tiny_llama):
    model = tiny_llama
    x = ids()
    before = n_hooks(find_blocks(model)[1])
    with torch.no_grad(), splice(model, "resid_post.1", lambda a: a.double()):
        model(input_ids=x, use_cache=False)  # float64 result cast back to float32
    with (
        pytest.raises(HookError, match="expected"),
        torch.no_grad(),
        splice(model, "resid_post.1", lambda a: a[:, :1]),
    ):
        model(input_ids=x, use_cache=False)
    assert n_hooks(find_blocks(model)[1]) == before


# --- loading ------------------------------------------------------------------------------------


def test_load_local_folder(tmp_path, tiny_llama, tiny_tokenizer):
    from saelab.models.loading import load_model

    tiny_llama.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    lm = load_model(ModelConfig(model=str(tmp_path / "lm"), device="cpu", model_dtype="bfloat16"))
    assert (lm.n_layers, lm.d_model, lm.name) == (4, 64, str(tmp_path / "lm"))
    assert lm.dtype == torch.bfloat16 and lm.device == torch.device("cpu")
    assert not lm.model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.bos_token_id == 1
    assert run_to_hook(lm.model, ids(), "resid_post.3").dtype == torch.bfloat16


def test_missing_models_fail_fast_with_one_line(monkeypatch, tmp_path):
    import saelab.models.loading as loading

    cfg = ModelConfig(model="saelab-tests/no-such-model", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        loading.load_model(cfg)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg and "embedded" in msg

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    with pytest.raises(ModelNotAvailableError, match="unreachable"):
        loading.load_tokenizer(cfg)
    with pytest.raises(ModelNotAvailableError, match="no such folder"):
        loading.load_model(ModelConfig(model=str(tmp_path / "nope"), device="cpu"))


def test_hub_probe_does_not_hang():
    from saelab.runtime import hub_reachable

    start = time.perf_counter()
    hub_reachable(timeout=2)
    assert time.perf_counter() - start < 4


def test_canonical_name():
    from saelab.models.loading import canonical_model_name

    assert canonical_model_name("embedded") == "SmolLM2-135M-Instruct"
    assert canonical_model_name("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


# --- runtime ------------------------------------------------------------------------------------


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("int8")
    assert resolve_model_dtype("float16", "cpu") is torch.float16
    assert resolve_model_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_tune_malloc_is_idempotent():
    first = tune_malloc()
    assert tune_malloc() is first
    torch.ones(8192, 8192).sum()  # big allocations still work


# --- the real embedded model --------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model():
    from saelab.data.windows import bos_id, separator_id
    from saelab.models.loading import load_model

    cfg = ModelConfig(model="embedded", device="cpu", model_dtype="float32")
    load_model(cfg)  # builds the cache on a fresh machine (~25 s)
    start = time.perf_counter()
    lm = load_model(cfg)
    assert time.perf_counter() - start < 10  # from the cache (~1 s)
    assert (lm.name, lm.n_layers, lm.d_model) == ("SmolLM2-135M-Instruct", 30, 576)
    tok = lm.tokenizer
    assert (bos_id(tok), separator_id(tok), tok.eos_token_id) == (1, 0, 2)

    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    x = torch.tensor([[bos_id(tok)] + tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = lm.model(input_ids=x, labels=x, output_hidden_states=True, use_cache=False)
    assert out.loss.item() < 4.0
    acts_BTD = run_to_hook(lm.model, x, "resid_post.12")
    torch.testing.assert_close(acts_BTD, out.hidden_states[13], rtol=0, atol=0)


@pytest.mark.slow
def test_gemma3_270m():
    """The second embedded model: shape, clean CE on plain English, and the sandwich-norm hooks
    (attn_out / mlp_out are what each sublayer adds to the residual stream)."""
    from saelab.data.windows import bos_id
    from saelab.models.loading import load_model

    try:
        lm = load_model(ModelConfig(model="gemma3-270m", device="cpu", model_dtype="float32"))
    except ModelNotAvailableError as e:
        pytest.skip(str(e))
    assert (lm.name, lm.n_layers, lm.d_model) == ("gemma-3-270m", 18, 640)
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    tok = lm.tokenizer
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    x = torch.tensor([[bos_id(tok)] + tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = lm.model(input_ids=x, labels=x, output_hidden_states=True, use_cache=False)
    assert out.loss.item() < 4.0
    L = 5
    block = find_blocks(lm.model)[L]
    assert hook_module(lm.model, f"attn_out.{L}") is block.post_attention_layernorm
    assert hook_module(lm.model, f"mlp_out.{L}") is block.post_feedforward_layernorm
    with capture(lm.model, f"attn_out.{L}") as a, capture(lm.model, f"mlp_out.{L}") as m, \
            torch.no_grad():
        lm.model(input_ids=x, use_cache=False)
    pre, post = out.hidden_states[L], out.hidden_states[L + 1]
    torch.testing.assert_close(pre + a.acts + m.acts, post, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(run_to_hook(lm.model, x, f"resid_post.{L}"), post)


def test_sandwich_norm_hooks_on_a_tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, sliding_window=8)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 9))
    # layer 1 of 3: hidden_states of the last layer are after the final norm
    with capture(model, "attn_out.1") as a, capture(model, "mlp_out.1") as m, torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(out.hidden_states[1] + a.acts + m.acts, out.hidden_states[2])
