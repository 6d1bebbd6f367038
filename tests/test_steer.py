"""Steering: the hook arithmetic against float64 formulas, and generation on a tiny LM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saelab.errors import ConfigError
from saelab.steer import SteerConfig, steer, steering_fn


class _ReluSAE(torch.nn.Module):
    def __init__(self, d: int, f: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d, f, generator=g) / d ** 0.5)
        self.W_dec = torch.nn.Parameter(torch.randn(f, d, generator=g) / d ** 0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=g) * 0.1)
        self.cfg = SimpleNamespace(d_in=d, d_sae=f)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def test_additive_and_clamp_against_float64():
    sae = _ReluSAE(6, 10)
    a = torch.randn(2, 5, 6)
    i, v = 3, 2.5
    add = steering_fn(sae, i, v, "additive")(a.clone())
    ref = a.double() + v * sae.W_dec[i].double()
    ref[:, 0] = a[:, 0].double()  # the attention-sink position is left alone
    assert torch.allclose(add.double(), ref, atol=1e-6)
    clamp = steering_fn(sae, i, v, "clamp")(a.clone())
    with torch.no_grad():
        f_i = sae.encode(a.double().float())[..., i].double()
    # linear decoder: x + (v - f_i) * W_dec[i]; SAE error and every other latent unchanged
    ref = a.double() + (v - f_i)[..., None] * sae.W_dec[i].double()
    ref[:, 0] = a[:, 0].double()
    assert torch.allclose(clamp.double(), ref, atol=1e-5)
    # a single decoding step (T = 1) is steered at its only position
    one = steering_fn(sae, i, v, "additive")(a[:, :1].clone())
    assert torch.allclose(one, a[:, :1] + v * sae.W_dec[i], atol=1e-6)
    with pytest.raises(ConfigError):
        steering_fn(sae, i, v, "sideways")


class _Tok:
    """Characters as tokens: enough of a tokenizer for generate + decode."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 40) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (int(t) % 26)) for t in ids if int(t) > 2)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return SimpleNamespace(model=model, tokenizer=_Tok(), device=torch.device("cpu"),
                           n_layers=2, d_model=16)


def test_steer_generation_reproducible_and_zero_is_clean(tiny_lm):
    from saelab.models.hooks import parse_hook

    sae = _ReluSAE(16, 24)
    hook = parse_hook("blocks.0.hook_resid_post", 2)
    cfg = SteerConfig(latent=5, prompt="hello there", strengths="0,40", mode="additive",
                      max_new_tokens=8)
    rows = steer(sae, tiny_lm, hook, cfg, max_act=1.0)
    assert [(r.mode, r.strength) for r in rows] == [("none", 0), ("additive", 0), ("additive", 40)]
    assert rows[1].text == rows[0].text  # S = 0 adds nothing
    assert rows[2].text != rows[0].text  # a large push changes the continuation
    again = steer(sae, tiny_lm, hook, cfg, max_act=1.0)
    assert [r.text for r in again] == [r.text for r in rows]  # greedy: reproducible
    with pytest.raises(ConfigError):
        steer(sae, tiny_lm, hook, SteerConfig(latent=99, prompt="x"), max_act=1.0)


def test_config_validation():
    with pytest.raises(ConfigError):
        SteerConfig(prompt="x").validate()  # no latent
    with pytest.raises(ConfigError):
        SteerConfig(latent=1, prompt="x", strengths="1,a").validate()
    assert SteerConfig(latent=1, prompt="x", strengths="-4,-2,0,2,4").strength_list() == [
        -4, -2, 0, 2, 4]
