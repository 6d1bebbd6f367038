"""Cut a document stream into fixed-length token windows, and mask positions to skip.

Documents are tokenised without special tokens, joined into one stream with a separator token
after each document, and cut into consecutive windows. With ``prepend_bos`` each window is
``[bos] + (context_size - 1)`` stream tokens, so every window starts like a fresh sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

_DOC_SEPARATOR = "<|endoftext|>"


def separator_id(tokenizer: Any) -> int:
    """Token between documents: ``<|endoftext|>`` if the vocabulary has it, else EOS."""
    token_id = _token_id(tokenizer, _DOC_SEPARATOR)
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(
            "tokenizer has neither <|endoftext|> nor an EOS token to separate documents"
        )
    return int(token_id)


def bos_id(tokenizer: Any) -> int:
    """Token starting each window: BOS, else EOS (GPT-2 style models have no separate BOS)."""
    token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if token_id is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token: use prepend_bos=False")
    return int(token_id)


def iter_windows(
    docs: Iterable[str],
    tokenizer: Any,
    context_size: int,
    prepend_bos: bool,
    chunk_docs: int = 64,
) -> Iterator[Tensor]:
    """Yield LongTensor windows of shape ``[context_size]``; a trailing partial window is dropped.

    Tokenises ``chunk_docs`` documents per tokenizer call: batched calls are much faster than
    one per document, and bounded chunks keep memory flat (one call on a 10 MB corpus peaks
    at ~3 GB).
    """
    body = context_size - 1 if prepend_bos else context_size
    if body < 1:
        raise ValueError(f"context_size must be at least {2 if prepend_bos else 1}")
    sep = separator_id(tokenizer)
    head = np.array([bos_id(tokenizer)] if prepend_bos else [], dtype=np.int64)
    leftover = np.zeros(0, dtype=np.int64)
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) < chunk_docs:
            continue
        leftover, windows_NB = _cut(leftover, _tokenize(tokenizer, chunk, sep), body)
        chunk = []
        yield from _with_head(windows_NB, head)
    if chunk:
        leftover, windows_NB = _cut(leftover, _tokenize(tokenizer, chunk, sep), body)
        yield from _with_head(windows_NB, head)


def iter_window_char_spans(
    docs: Iterable[str],
    tokenizer: Any,
    context_size: int,
    prepend_bos: bool,
    chunk_docs: int = 64,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per window of :func:`iter_windows` (same documents, same settings, same order):
    ``(tokens_T, doc_T, char_start_T, char_end_T)``, the document index (0-based, in ``docs``
    order) and character span of every position, from the tokenizer's offset mapping; -1 at
    the BOS head and at document separators. Needs a fast tokenizer. ``tokens_T`` equals the
    :func:`iter_windows` window (callers can check the alignment).
    """
    body = context_size - 1 if prepend_bos else context_size
    sep = separator_id(tokenizer)
    head = np.array([[bos_id(tokenizer), -1, -1, -1]] if prepend_bos else [],
                    dtype=np.int64).reshape(-1, 4)
    leftover = np.zeros((0, 4), dtype=np.int64)
    first_doc = 0
    chunk: list[str] = []

    def flush() -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        nonlocal leftover, first_doc
        enc = tokenizer(chunk, add_special_tokens=False, verbose=False,
                        return_offsets_mapping=True)
        parts = [leftover]
        for j, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"],
                                               strict=True)):
            rows = np.empty((len(ids) + 1, 4), dtype=np.int64)
            rows[:-1, 0] = ids
            rows[:-1, 1] = first_doc + j
            rows[:-1, 2:] = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            rows[-1] = (sep, -1, -1, -1)
            parts.append(rows)
        first_doc += len(chunk)
        stream = np.concatenate(parts)
        n = len(stream) // body
        leftover = stream[n * body :].copy()
        for w in stream[: n * body].reshape(n, body, 4):
            full = torch.from_numpy(np.concatenate([head, w]))
            yield full[:, 0], full[:, 1], full[:, 2], full[:, 3]

    for doc in docs:
        chunk.append(doc)
        if len(chunk) == chunk_docs:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def batch_windows(windows: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stack windows into ``[B, T]`` batches (the last batch may be smaller)."""
    batch: list[Tensor] = []
    for window_T in windows:
        batch.append(window_T)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def keep_mask(
    windows_BT: Tensor,
    tokenizer: Any,
    exclude_first_positions: int,
    exclude_special_tokens: bool,
) -> Tensor:
    """BoolTensor ``[B, T]``: False at the first N positions (attention sinks) and, optionally,
    at special tokens (BOS / EOS / document separators)."""
    keep_BT = torch.ones_like(windows_BT, dtype=torch.bool)
    keep_BT[:, :exclude_first_positions] = False
    if exclude_special_tokens:
        special = sorted(set(tokenizer.all_special_ids) | {separator_id(tokenizer)})
        special_ids = torch.tensor(special, dtype=windows_BT.dtype, device=windows_BT.device)
        keep_BT &= ~torch.isin(windows_BT, special_ids)
    return keep_BT


def _tokenize(tokenizer: Any, docs: list[str], sep: int) -> np.ndarray:
    """One flat int64 stream: doc tokens followed by the separator, for each document."""
    # verbose=False: long documents must not trigger the "longer than model_max_length" warning.
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    parts = []
    for doc_ids in ids:
        parts.append(np.asarray(doc_ids, dtype=np.int64))
        parts.append(np.array([sep], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _cut(leftover: np.ndarray, stream: np.ndarray, body: int) -> tuple[np.ndarray, np.ndarray]:
    stream = np.concatenate([leftover, stream])
    n = len(stream) // body
    return stream[n * body :].copy(), stream[: n * body].reshape(n, body)


def _with_head(windows_NB: np.ndarray, head: np.ndarray) -> Iterator[Tensor]:
    for row in windows_NB:
        yield torch.from_numpy(np.concatenate([head, row]))


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if it is a real vocabulary entry (not mapped to UNK)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def drop_norm_outliers(acts_BTD: Tensor, keep_BT: Tensor, factor: float) -> Tensor:
    """``keep_BT`` without positions whose activation norm exceeds ``factor`` x the median norm
    of the kept positions (massive activations, attention sinks); ``factor`` 0 disables."""
    if factor <= 0 or not bool(keep_BT.any()):
        return keep_BT
    keep = keep_BT.to(acts_BTD.device)
    norms_BT = torch.linalg.vector_norm(acts_BTD.float(), dim=-1)
    limit = factor * norms_BT[keep].median()
    return (keep & (norms_BT <= limit)).to(keep_BT.device)
