"""Hook points on Hugging Face decoder models: parse names, read and replace activations.

Names follow TransformerLens: ``blocks.{L}.hook_resid_post`` (output of decoder block ``L``,
0-indexed), ``blocks.{L}.hook_attn_out`` (attention output after its output projection) and
``blocks.{L}.hook_mlp_out`` (MLP output). Short forms: ``resid_post.L``, ``attn_out.L``,
``mlp_out.L``. Blocks are found generically (llama/mistral/qwen, gpt2, gpt_neox, opt, ...), so
any family with a list of blocks holding an attention module and an MLP works.

Sandwich-norm blocks (Gemma 2/3: ``h += post_attention_layernorm(attn(input_layernorm(h)))``,
then ``h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``): ``hook_attn_out``
and ``hook_mlp_out`` are the outputs of the *post* norms, i.e. what each sublayer adds to the
residual stream (as in TransformerLens), so ``resid_post[L] = resid_post[L-1] + attn_out[L] +
mlp_out[L]`` holds for them as for llama. (In llama ``post_attention_layernorm`` is the pre-MLP
norm; the sandwich layout is recognised by ``pre_/post_feedforward_layernorm``.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.errors import HookError

KINDS = ("resid_post", "attn_out", "mlp_out")
_LONG = re.compile(r"blocks\.(-?\d+)\.hook_([a-z_]+)")
_SHORT = re.compile(r"([a-z_]+)\.(-?\d+)")
_USAGE = (
    "use blocks.L.hook_resid_post, blocks.L.hook_attn_out, blocks.L.hook_mlp_out or resid_post.L"
)

# Where the decoder blocks live, relative to the top-level model (first match wins).
_BLOCK_PATHS = (
    "model.layers",  # llama, mistral, qwen2, gemma, phi3 (ForCausalLM)
    "transformer.h",  # gpt2, gptj, bloom, falcon
    "gpt_neox.layers",  # pythia
    "model.decoder.layers",  # opt
    "layers",  # bare LlamaModel etc.
    "h",  # bare GPT2Model
)
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
#: norms of a sandwich-norm block (Gemma 2/3), whose post norms' outputs are the hooks
_SANDWICH_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")


@dataclass(frozen=True)
class HookPoint:
    kind: str  # one of KINDS
    layer: int

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return self.name


def parse_hook(name: str, n_layers: int | None = None) -> HookPoint:
    """Parse a long or short hook name; checks the layer against ``n_layers`` if given (not 0)."""
    text = name.strip()
    if m := _LONG.fullmatch(text):
        layer, kind = int(m.group(1)), m.group(2)
    elif m := _SHORT.fullmatch(text):
        kind, layer = m.group(1), int(m.group(2))
    else:
        raise HookError(f"unknown hook {name!r}: {_USAGE}")
    if kind not in KINDS:
        raise HookError(f"unknown hook {name!r}: {_USAGE}")
    if layer < 0 or (n_layers and layer >= n_layers):
        if n_layers:
            raise HookError(
                f"layer {layer} out of range: the model has {n_layers} layers (0-{n_layers - 1})"
            )
        raise HookError(f"layer {layer} out of range: layers are numbered from 0")
    return HookPoint(kind, layer)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    for path in _BLOCK_PATHS:
        module = _get_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    # Unknown family: the ModuleList whose length matches the configured layer count.
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers:
            return module
    raise HookError(f"cannot find the decoder blocks of {type(model).__name__}")


def hook_module(model: nn.Module, hook: HookPoint | str) -> nn.Module:
    """The module whose output is the hook's activation."""
    blocks = find_blocks(model)
    hook = hook if isinstance(hook, HookPoint) else parse_hook(hook, len(blocks))
    if hook.layer >= len(blocks):
        parse_hook(hook.name, len(blocks))  # raises the standard out-of-range message
    block = blocks[hook.layer]
    if hook.kind == "resid_post":
        return block
    if all(isinstance(getattr(block, n, None), nn.Module) for n in _SANDWICH_NORMS):
        return getattr(block, "post_attention_layernorm" if hook.kind == "attn_out"
                       else "post_feedforward_layernorm")
    names = _ATTN_NAMES if hook.kind == "attn_out" else _MLP_NAMES
    for attr in names:
        if isinstance(sub := getattr(block, attr, None), nn.Module):
            return sub
    raise HookError(
        f"hook {hook.name!r}: block type {type(block).__name__} has none of {', '.join(names)}"
    )


class _StopForward(Exception):
    """Raised from a forward hook to abandon the rest of the forward pass."""


def run_to_hook(
    model: nn.Module,
    input_ids_BT: Tensor,
    hook: HookPoint | str,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Activation ``[B, T, D]`` at ``hook``, running the model only up to the hooked module.

    Runs under ``torch.no_grad`` itself (not inference_mode: the result stays an ordinary tensor
    that may later enter autograd, e.g. SAE training on live activations).
    """
    module = hook_module(model, hook)
    captured: list[Tensor] = []

    def stop(_mod: nn.Module, _args: object, output: object) -> None:
        captured.append(_activation(output))
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            model(input_ids=input_ids_BT, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise HookError(f"hook {hook}: the hooked module did not run in the forward pass")
    return captured[0]


@contextmanager
def splice(
    model: nn.Module, hook: HookPoint | str, fn: Callable[[Tensor], Tensor]
) -> Iterator[None]:
    """Within the block, the hook's activation ``acts_BTD`` is replaced by ``fn(acts_BTD)``.

    The result is cast to the activation's dtype (an fp32 SAE can splice into a bf16 LM) and
    must keep its shape. Tuple outputs (attention modules) keep their other elements.
    """
    module = hook_module(model, hook)

    def replace(_mod: nn.Module, _args: object, output: object) -> object:
        acts_BTD = _activation(output)
        new_BTD = fn(acts_BTD)
        if new_BTD.shape != acts_BTD.shape:
            raise HookError(
                f"splice at {hook}: fn returned shape {tuple(new_BTD.shape)}, "
                f"expected {tuple(acts_BTD.shape)}"
            )
        new_BTD = new_BTD.to(acts_BTD.dtype)
        if isinstance(output, tuple):
            return (new_BTD, *output[1:])
        return new_BTD

    handle = module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


class Capture:
    """Holder filled by :func:`capture`: ``acts`` is the last activation seen (detached)."""

    acts: Tensor | None = None


@contextmanager
def capture(model: nn.Module, hook: HookPoint | str) -> Iterator[Capture]:
    """Record the hook's activation during ordinary (full) forward passes."""
    module = hook_module(model, hook)
    holder = Capture()

    def record(_mod: nn.Module, _args: object, output: object) -> None:
        holder.acts = _activation(output).detach()

    handle = module.register_forward_hook(record)
    try:
        yield holder
    finally:
        handle.remove()


def _activation(output: object) -> Tensor:
    """The activation tensor of a module output (attention modules return (out, weights))."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise HookError(f"unsupported module output type {type(output).__name__} at hook")


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None
