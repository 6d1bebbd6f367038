"""Corpus sources, encoding repair, the stable train/eval split, token windows and masks."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch

from saelab.config import DataConfig
from saelab.data.corpus import clean_text, embedded_corpus_path, in_eval_split, iter_documents
from saelab.data.windows import batch_windows, bos_id, iter_windows, keep_mask, separator_id
from saelab.errors import ConfigError, DatasetNotAvailableError

# --- clean_text on real damage from NewsArticles.csv --------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            'The Senate voted on DeVos"?highly contentious nomination',
            "The Senate voted on DeVos' highly contentious nomination",
        ),
        (
            '"It is hard to imagine a worse choice,"?Sen. Elizabeth Warren, D-Mass., said',
            '"It is hard to imagine a worse choice," Sen. Elizabeth Warren, D-Mass., said',
        ),
        ('vehement opposition from teachers"?unions', "vehement opposition from teachers' unions"),
        (
            'called Heinz an "idiot"?and "devious"?in a Senate',
            'called Heinz an "idiot" and "devious" in a Senate',
        ),
        (
            'migrants aboard the raft "?including several children',
            "migrants aboard the raft — including several children",
        ),
        ('Women shouldn"t need to', "Women shouldn't need to"),
        ("they'r not entitled to their own facts", "they're not entitled to their own facts"),
        ("Sinn F\ufffd\ufffdin and Fianna F\ufffd\ufffdil", "Sinn Féin and Fianna Fáil"),
        ('Sgt O"\ufffdBrien was fined \ufffd10,000', "Sgt O'Brien was fined €10,000"),
        ('Lots of "\ufffdYou Go Momma."?While Ferris', 'Lots of "You Go Momma." While Ferris'),
        (
            "the public education system.     She was panned",
            "the public education system.\nShe was panned",
        ),
        ("Nano\u2122\xa0based  cars\u200b", "Nano\u2122 based cars"),
        (
            'Plain text: it\'s fine, "quoted" - and (unchanged).',
            'Plain text: it\'s fine, "quoted" - and (unchanged).',
        ),
    ],
)
def test_clean_text_repairs_real_damage(raw, clean):
    assert clean_text(raw) == clean


# --- embedded corpus and the split ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_splits():
    cfg = DataConfig()
    return list(iter_documents(cfg, "train")), list(iter_documents(cfg, "eval"))


def test_embedded_corpus(embedded_splits):
    train, evals = embedded_splits
    assert embedded_corpus_path().name == "NewsArticles.zip"
    # 3,824 articles minus 42 duplicate texts and one empty one; the counts pin the split.
    assert (len(train), len(evals)) == (3581, 200)
    assert not set(train) & set(evals)
    assert train[0].startswith("Betsy DeVos Confirmed as Education Secretary")
    assert "DeVos' highly contentious" in train[0]
    assert not any('"?' in d or "\ufffd" in d for d in train + evals)


def test_split_is_deterministic(embedded_splits):
    again = list(itertools.islice(iter_documents(DataConfig(), "train"), 50))
    assert again == embedded_splits[0][:50]
    # Fixed hash: these must never change (stores and eval numbers depend on them).
    held_out = [k for k in map(str, range(200)) if in_eval_split(k, 0.05)]
    assert held_out == [
        "9",
        "17",
        "28",
        "43",
        "93",
        "122",
        "125",
        "127",
        "154",
        "157",
        "161",
        "175",
    ]
    assert in_eval_split("a", 0.999) and not in_eval_split("a", 1e-9)


def test_bad_split():
    with pytest.raises(ConfigError, match="unknown split"):
        next(iter_documents(DataConfig(), "test"))


# --- local files and Hugging Face ---------------------------------------------------------------


def test_local_txt_and_jsonl(tmp_path):
    docs = [f"Document number {i}.\nSecond line of {i}." for i in range(200)]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n\n".join(docs) + "\n")
    cfg = DataConfig(dataset=str(txt), eval_fraction=0.2)
    train, evals = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "eval"))
    assert sorted(train + evals) == sorted(docs) and 10 < len(evals) < 70
    assert train == [d for d in docs if d in set(train)]  # source order kept

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    cfg = DataConfig(dataset=str(jsonl), text_column="body", eval_fraction=0.2)
    assert list(iter_documents(cfg, "eval")) == evals  # same texts -> same split
    with pytest.raises(ConfigError, match="no 'text' field .*--text-column"):
        next(iter_documents(DataConfig(dataset=str(jsonl)), "train"))


def test_missing_sources(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotAvailableError, match="no such file"):
        next(iter_documents(DataConfig(dataset=str(tmp_path / "none.txt")), "train"))
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(DatasetNotAvailableError, match=r"\.txt"):
        next(iter_documents(DataConfig(dataset=str(tmp_path / "c.csv")), "train"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetNotAvailableError, match="pip install datasets"):
        next(iter_documents(DataConfig(dataset="someone/some-corpus"), "train"))


# --- windows ------------------------------------------------------------------------------------

DOCS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find features.",
] * 7


def stream(tokenizer) -> list[int]:
    out = []
    for doc in DOCS:
        out += tokenizer(doc, add_special_tokens=False).input_ids + [separator_id(tokenizer)]
    return out


@pytest.mark.parametrize("chunk_docs", [1, 4, 64])
def test_windows_with_bos(tiny_tokenizer, chunk_docs):
    tok = tiny_tokenizer
    assert (bos_id(tok), separator_id(tok)) == (1, 0)
    windows = list(iter_windows(DOCS, tok, context_size=9, prepend_bos=True, chunk_docs=chunk_docs))
    expected = stream(tok)
    assert len(windows) == len(expected) // 8
    for i, w in enumerate(windows):
        assert w.dtype == torch.long and w.shape == (9,)
        assert w[0] == 1 and w[1:].tolist() == expected[8 * i : 8 * i + 8]


def test_windows_without_bos(tiny_tokenizer):
    windows = torch.stack(list(iter_windows(DOCS, tiny_tokenizer, 10, prepend_bos=False)))
    expected = stream(tiny_tokenizer)
    assert windows.flatten().tolist() == expected[: windows.numel()]
    assert (windows == 0).sum() > 5  # document separators inside windows


def test_separator_falls_back_to_eos():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    assert separator_id(tok) == 2 and bos_id(tok) == 2  # no BOS: EOS starts windows
    windows = list(iter_windows(["a b a", "b"], tok, 3, prepend_bos=True))
    assert [w.tolist() for w in windows] == [[2, 3, 4], [2, 3, 2], [2, 4, 2]]


def test_keep_mask(tiny_tokenizer):
    windows_BT = torch.tensor([[1, 5, 0, 6, 2, 7], [1, 8, 9, 10, 11, 12]])
    keep = keep_mask(
        windows_BT, tiny_tokenizer, exclude_first_positions=2, exclude_special_tokens=True
    )
    assert keep.dtype == torch.bool
    assert keep.tolist() == [
        [False, False, False, True, False, True],
        [False, False, True, True, True, True],
    ]
    keep = keep_mask(windows_BT, tiny_tokenizer, 0, exclude_special_tokens=False)
    assert keep.all()


def test_batch_windows(tiny_tokenizer):
    windows = list(iter_windows(DOCS, tiny_tokenizer, 8, True))
    batches = list(batch_windows(windows, 4))
    assert all(b.shape == (4, 8) for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
    assert torch.equal(torch.cat(batches), torch.stack(windows))
