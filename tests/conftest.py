"""Shared fixtures: tiny random LMs and a tiny tokenizer built in-process (no network)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

# Same special tokens and ids as SmolLM2: <|endoftext|> 0, <|im_start|> (BOS) 1, <|im_end|> (EOS) 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a test of the tokenizer.",
    "Sparse autoencoders find interpretable features in language model activations.",
]


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine two spinning OpenMP
    threads make each one many times slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seeded_eval_model(build):
    """``build()`` under a fixed seed, without touching the global RNG, frozen in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) trained in-process on three sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT * 5, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )


@pytest.fixture(scope="session")
def tiny_llama():
    """A 4-layer random LlamaForCausalLM (d_model 64, vocab 300) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded_eval_model(lambda: LlamaForCausalLM(cfg))


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A 3-layer random GPT2LMHeadModel: a second family, with tuple-returning blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=300,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _seeded_eval_model(lambda: GPT2LMHeadModel(cfg))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_llama, tiny_tokenizer) -> tuple[Path, Path]:
    """(model folder, corpus.txt): the random Llama + BPE tokenizer saved to disk, and a small
    text corpus, so every path that loads by name runs for real and offline."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama.save_pretrained(root / "lm")
    tiny_tokenizer.save_pretrained(root / "lm")
    words = "the quick brown fox jumps over lazy dog hello world sparse features".split()
    rng = random.Random(0)
    docs = [" ".join(rng.choices(words, k=rng.randint(3, 40))) for _ in range(80)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return root / "lm", root / "corpus.txt"
