"""ITDA: Inference-Time Decomposition of Activations (docs/methods.md §9; Leask, Nanda & Al Moubayed,
ICML 2025). No encoder is learned: the dictionary is a set of real, unit-normalised
activations, each labelled with where it came from, and every input is decomposed by matching
pursuit (MP) with target L0 ``itda_k``.

Construction follows the reference code (pleask/itda ``train.py``), batch by batch:

1. *bootstrap*: while the dictionary holds fewer than ``d_in`` atoms, take the batch's most
   frequent unique activations (ties: first occurrence), up to the number missing;
2. encode the batch with MP at L0 ``itda_k`` and measure, per token, the reference's error
   ``mean_d (x/‖x‖ - x̂/‖x̂‖)²`` (note: a *mean* over dimensions, so δ is ``‖·‖² / d_in``);
3. append every token whose error exceeds ``delta`` at once, after dropping duplicates within
   the batch; stop at ``max_atoms`` (0: no limit).

Atoms (unit norm) are ``W_dec``; ``W_enc`` is ``W_decᵀ`` only for the SAELens shape, ``encode``
runs MP. Each atom keeps its label in the saved safetensors: ``atom_window``, ``atom_pos``,
``atom_token`` (store window id, position in the window, token id) and ``atom_doc``,
``atom_char_start``, ``atom_char_end`` (document index within its split and the character
span of the token; -1 until :meth:`ITDA.attach_char_spans` fills them).

The dictionary grows inside preallocated buffers with doubling capacity (atoms, labels and the
Gram matrix ``D Dᵀ`` of the MP kernel, extended by the new rows only), so building never copies
the whole dictionary per batch. Past ``gram_max_atoms`` the Gram matrix is dropped and MP
recomputes ``r Dᵀ`` every step (slower, no ``N²`` memory).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.config import DataConfig, ModelConfig, opt
from saelab.data.corpus import iter_documents
from saelab.data.windows import iter_window_char_spans
from saelab.errors import ConfigError
from saelab.models.loading import load_tokenizer
from saelab.saes._matching_pursuit import (
    dense_code,
    matching_pursuit,
    normalised_error,
    padded_gram,
    padded_width,
)
from saelab.saes.base import SAE, LossOutput, SAEOutput
from saelab.saes.registry import register

LABELS = ("atom_window", "atom_pos", "atom_token", "atom_doc", "atom_char_start", "atom_char_end")


@dataclass
class ITDAOptions:
    """ITDA (docs/methods.md §9): matching-pursuit L0 and the greedy dictionary rule."""

    # not `k`: a name means one option across families, and TopK's k is another knob
    itda_k: int = opt(40, "Target L0 of matching pursuit, in construction and inference (the "
                      "reference's default 40).")
    delta: float = opt(
        0.0004, "Error threshold: a token joins the dictionary when mean_d (x/|x| - "
        "xhat/|xhat|)^2 exceeds it (the reference's loss_threshold, a mean over dimensions; "
        "0.0004 is its GPT-2 layer-similarity value). Larger gives a smaller dictionary; the "
        "sweep knob.", flag="itda_delta")
    max_atoms: int = opt(0, "Stop adding atoms at this dictionary size; 0 = no limit.",
                         flag="itda_max_atoms")
    nonneg: bool = opt(False, "Non-negative MP (largest positive correlation, stop when none "
                       "is positive) instead of the reference's signed MP.", flag="itda_nonneg")
    batch_rows: int = opt(4096, "Activation rows per construction batch (all failing tokens "
                          "of a batch are added at once).", flag="itda_batch_rows")
    gram_max_atoms: int = opt(
        16384, "Keep the Gram matrix D D^T (N^2 entries; 1 GiB at 16k atoms in float32) for "
        "fast MP up to this many atoms; beyond it MP recomputes r D^T each step.",
        flag="itda_gram_max_atoms")

    def validate(self) -> None:
        if self.itda_k < 1:
            raise ConfigError(f"--itda-k must be at least 1, got {self.itda_k}")
        if not self.delta >= 0:
            raise ConfigError(f"--itda-delta must be >= 0, got {self.delta}")
        if self.max_atoms < 0 or self.batch_rows < 1 or self.gram_max_atoms < 0:
            raise ConfigError("--itda-max-atoms and --itda-gram-max-atoms must be >= 0 and "
                              "--itda-batch-rows >= 1")


class LabelledRows(NamedTuple):
    """Activation rows with their store labels (any label may be None: unknown, saved -1)."""

    acts: Tensor  # [B, D]
    window: Tensor | None = None  # [B] global window id
    pos: Tensor | None = None  # [B] position in the window
    token: Tensor | None = None  # [B] token id


def iter_store_rows(store, batch_rows: int, *, drop_positions_below: int = 0,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    max_rows: int | None = None) -> Iterator[LabelledRows]:
    """A store's rows in order (shard by shard), labelled, in batches of ``batch_rows``."""
    parts: list[list[Tensor]] = []
    held = seen = 0
    for i in range(len(store.shards)):
        t = store.read_shard(i)
        keep = t["pos"].long() >= drop_positions_below
        cols = [t["acts"][keep], t["window"][keep].long(), t["pos"][keep].long(),
                t["tokens"][keep].long()]
        if max_rows is not None:
            cols = [c[: max(0, max_rows - seen)] for c in cols]
        seen += len(cols[0])
        parts.append(cols)
        held += len(cols[0])
        while held >= batch_rows:
            cat = [torch.cat([p[j] for p in parts]) for j in range(4)]
            yield _rows(cat, batch_rows, device, dtype)
            parts = [[c[batch_rows:] for c in cat]]
            held -= batch_rows
        if max_rows is not None and seen >= max_rows:
            break
    if held:
        cat = [torch.cat([p[j] for p in parts]) for j in range(4)]
        yield _rows(cat, held, device, dtype)


def _rows(cat: list[Tensor], n: int, device, dtype) -> LabelledRows:
    return LabelledRows(cat[0][:n].to(device, dtype), *(c[:n].to(device) for c in cat[1:]))


class _Growing:
    """Preallocated rows with doubling capacity: appends copy only the new rows."""

    def __init__(self, width: tuple[int, ...], dtype, device, capacity: int = 1024):
        self.n = 0
        self.buf = torch.empty(capacity, *width, dtype=dtype, device=device)

    def reserve(self, n: int) -> None:
        if n > len(self.buf):
            cap = len(self.buf)
            while cap < n:
                cap *= 2
            new = torch.empty(cap, *self.buf.shape[1:], dtype=self.buf.dtype,
                              device=self.buf.device)
            new[: self.n] = self.buf[: self.n]
            self.buf = new

    def append(self, rows: Tensor) -> None:
        self.reserve(self.n + len(rows))
        self.buf[self.n : self.n + len(rows)] = rows
        self.n += len(rows)

    @property
    def data(self) -> Tensor:
        return self.buf[: self.n]


@register
class ITDA(SAE):
    """Matching pursuit over a dictionary of labelled activations (see module docstring)."""

    architecture: ClassVar[str] = "itda"
    Options: ClassVar[type] = ITDAOptions
    sweep_param: ClassVar[str] = "options.delta"
    #: ~1k-14k atoms from 131k SmolLM2 tokens (docs/methods.md §9.3); size grows steeply below 4e-4
    sweep_levels: ClassVar[tuple[float, ...]] = (0.0005, 0.0004, 0.0003, 0.0002)
    # MP is scale-equivariant and δ compares unit vectors: no input scaling, no bias
    defaults: ClassVar[dict[str, Any]] = {"normalize_activations": "none",
                                          "b_dec_init": "zeros", "apply_b_dec_to_input": False}
    unit_norm_decoder = True
    #: the pipeline calls :meth:`fit_from_store` (store rows in order, labelled) instead of
    #: streaming it shuffled, unlabelled batches
    wants_labelled_rows: ClassVar[bool] = True

    def __init__(self, cfg, device=None, dtype=torch.float32, options: ITDAOptions | None = None):
        if options is not None:
            cfg = dataclasses.replace(cfg, options=options)
        super().__init__(cfg, device=device, dtype=dtype)
        #: the family's options (``cfg.options``; the same object, so saving records them)
        self.options = _options_of(self.cfg)
        self.cfg.options = self.options
        self.options.validate()
        for name in LABELS:
            self.register_buffer(name, torch.full((self.d_sae,), -1, dtype=torch.long,
                                                  device=device))
        # the MP settings travel with the weights, so a loaded SAE encodes as it was built
        self.register_buffer("itda_k", torch.tensor([self.options.itda_k], device=device))
        self.register_buffer("itda_nonneg", torch.tensor([int(self.options.nonneg)],
                                                         device=device))
        self._gram: Tensor | None = None
        self._gram_key: tuple | None = None
        #: facts of the last build: tokens used, seconds, atoms (not saved in the weights)
        self.build_stats: dict[str, float] = {}

    # ---- parameters ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Until built, the dictionary is random unit rows (only so an unbuilt SAE is valid)."""
        self.init_tied_(generator)
        self.b_dec.zero_()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # load_sae casts every tensor to the float dtype; labels are integers (exact < 2^24)
        # (io.load_sae keeps integer dtypes; files written by older code hold float labels)
        state = dict(state_dict)
        for name in (*LABELS, "itda_k", "itda_nonneg"):
            if name in state and state[name].is_floating_point():
                state[name] = state[name].round().long()
        out = super().load_state_dict(state, strict=strict, assign=assign)
        if "itda_k" in state and not state["itda_k"].is_meta:
            self.options.itda_k = int(state["itda_k"][0])
            self.options.nonneg = bool(state["itda_nonneg"][0])
        return out

    def saelens_extra_cfg(self) -> dict[str, Any]:
        return {**super().saelens_extra_cfg(), "k": self.options.itda_k}

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Atoms are unit norm already."""

    def init_from_data(self, x_ND: Tensor) -> None:
        """No data-dependent init: the dictionary is the data."""

    # ---- inference -------------------------------------------------------------------------
    def gram(self) -> Tensor | None:
        """``W_dec W_decᵀ`` (zero-padded), cached while ``W_dec`` is unchanged."""
        if self.d_sae > self.options.gram_max_atoms:
            return None
        W = self.W_dec
        key = (W.data_ptr(), W._version, tuple(W.shape), W.device, W.dtype)
        if self._gram_key != key:
            self._gram = padded_gram(W.detach())
            self._gram_key = key
        return self._gram

    @torch.no_grad()
    def mp(self, x_BD: Tensor):
        return matching_pursuit(x_BD.to(self.W_dec.dtype), self.W_dec.detach(),
                                self.options.itda_k,
                                nonneg=self.options.nonneg, gram_NN=self.gram())

    def encode(self, x_BD: Tensor) -> Tensor:
        res = self.mp(x_BD)
        return dense_code(res.idx_BK, res.coef_BK, self.d_sae)

    def forward(self, x_BD: Tensor) -> SAEOutput:
        res = self.mp(x_BD)
        return SAEOutput(res.recon_BD + self.b_dec, dense_code(res.idx_BK, res.coef_BK,
                                                               self.d_sae))

    def loss(self, x_BD: Tensor, step: int, **_: Any) -> LossOutput:
        raise NotImplementedError("itda is built by fit_from_batches, not by gradient steps")

    # ---- construction ----------------------------------------------------------------------
    @torch.no_grad()
    def fit_from_batches(self, batches: Iterable[Tensor | LabelledRows], total_rows: int,
                         progress: bool = False) -> None:
        """Build the dictionary from up to ``total_rows`` activation rows (tensors, or
        :class:`LabelledRows` to keep labels) and install it as ``W_dec``."""
        opts = self.options
        dev, dt, d = self.W_dec.device, self.W_dec.dtype, self.d_in
        atoms = _Growing((d,), dt, dev)
        labels = _Growing((3,), torch.long, dev)
        gram: _Growing | None = _Growing((padded_width(1024),), dt, dev)
        gram.buf.zero_()  # the padding columns must read 0 (see _matching_pursuit._pick)
        used, t0 = 0, time.perf_counter()
        bar = tqdm(total=total_rows, unit="tok", disable=not progress, desc="itda")
        for batch in _rebatch(batches, opts.batch_rows):
            rows = batch if isinstance(batch, LabelledRows) else LabelledRows(batch)
            x = rows.acts.to(dev, dt)[: total_rows - used]
            if len(x) == 0:
                break
            lab = _labels(rows, len(x), dev)
            used += len(x)
            bar.update(len(x))
            if atoms.n < d:
                take = _most_frequent_unique(x, d - atoms.n)
                gram = self._add(atoms, labels, gram, x[take], lab[take])
            res = matching_pursuit(x, atoms.data, opts.itda_k, nonneg=opts.nonneg,
                                   gram_NN=None if gram is None else gram.data)
            bad = (normalised_error(x, res.recon_BD) > opts.delta).nonzero().squeeze(1)
            if len(bad):
                bad = bad[_first_unique(x[bad])]
                if opts.max_atoms:
                    bad = bad[: max(0, opts.max_atoms - atoms.n)]
                gram = self._add(atoms, labels, gram, x[bad], lab[bad])
            bar.set_postfix(atoms=atoms.n)
            if used >= total_rows or (opts.max_atoms and atoms.n >= opts.max_atoms):
                break
        bar.close()
        self._install(atoms.data, labels.data)
        self.build_stats = {"build_tokens": used, "build_seconds": time.perf_counter() - t0,
                            "atoms": atoms.n}

    @torch.no_grad()
    def fit_from_store(self, store, total_rows: int, *, scale: float = 1.0,
                       drop_positions_below: int = 0, progress: bool = False,
                       tokenizer: Any = None, log=print) -> None:
        """Build from ``store``'s rows in order (at most one pass, ``total_rows`` rows), keeping
        each atom's window, position and token, then its document and character span (from
        the store's corpus settings and ``tokenizer``, default: the store model's)."""
        rows = iter_store_rows(store, self.options.batch_rows,
                               drop_positions_below=drop_positions_below,
                               device=self.W_dec.device, dtype=self.W_dec.dtype,
                               max_rows=total_rows)
        scaled = (r._replace(acts=r.acts * scale) if scale != 1.0 else r for r in rows)
        self.fit_from_batches(scaled, min(total_rows, store.num_rows), progress)
        try:
            if tokenizer is None:
                tokenizer = load_tokenizer(ModelConfig(model=store.spec.model_spec))
            self.attach_char_spans(store_char_spans(store, tokenizer, self.atom_window.tolist()),
                                   check_tokens=True)
        except Exception as e:  # labels are a convenience: the dictionary stands without them
            log(f"note: itda atoms keep no document/char spans ({type(e).__name__}: {e})")

    def _add(self, atoms: _Growing, labels: _Growing, gram: _Growing | None, new_MD: Tensor,
             lab_M3: Tensor) -> _Growing | None:
        if len(new_MD) == 0:
            return gram
        n0 = atoms.n
        atoms.append(new_MD / new_MD.norm(dim=1, keepdim=True).clamp_min(1e-12))
        labels.append(lab_M3)
        n = atoms.n
        if gram is None or n > self.options.gram_max_atoms:
            return None
        width = padded_width(n)
        if width > gram.buf.shape[1] or n > len(gram.buf):
            # grow both ways at once, to the next power-of-two capacity
            cap = max(len(gram.buf), 1)
            while cap < n:
                cap *= 2
            new = gram.buf.new_zeros(cap, max(padded_width(cap), gram.buf.shape[1]))
            new[:n0, : gram.buf.shape[1]] = gram.buf[:n0]
            gram.buf, gram.n = new, n0
        D = atoms.data
        block = D[n0:n] @ D.T  # [m, n]: only the new rows and columns are computed
        gram.buf[n0:n, :n] = block
        gram.buf[:n0, n0:n] = block[:, :n0].T
        gram.n = n
        return gram

    @torch.no_grad()
    def _install(self, atoms_ND: Tensor, labels_N3: Tensor) -> None:
        n = len(atoms_ND)
        if n == 0:
            raise ConfigError("itda built an empty dictionary: give it more tokens")
        self.cfg = dataclasses.replace(self.cfg, d_sae=n)
        self.W_dec = nn.Parameter(atoms_ND.clone(), requires_grad=False)
        self.W_enc = nn.Parameter(atoms_ND.T.clone(), requires_grad=False)
        self.atom_window = labels_N3[:, 0].clone()
        self.atom_pos = labels_N3[:, 1].clone()
        self.atom_token = labels_N3[:, 2].clone()
        for name in LABELS[3:]:
            setattr(self, name, torch.full((n,), -1, dtype=torch.long, device=atoms_ND.device))

    @torch.no_grad()
    def attach_char_spans(self, spans_by_window: dict[int, tuple[Tensor, ...]],
                          check_tokens: bool = False) -> None:
        """Fill ``atom_doc``/``atom_char_*`` from ``{window id: (doc_T, start_T, end_T)}`` or
        ``{window id: (tokens_T, doc_T, start_T, end_T)}`` (see :func:`store_char_spans`).
        ``check_tokens``: raise if a window's token at an atom's position is not the atom's
        token (the windows are not the store's)."""
        for a in range(self.d_sae):
            w, p = int(self.atom_window[a]), int(self.atom_pos[a])
            if w in spans_by_window and p >= 0:
                cols = spans_by_window[w]
                if len(cols) == 4:
                    tokens, *cols = cols
                    if check_tokens and int(tokens[p]) != int(self.atom_token[a]):
                        raise ValueError(f"window {w} position {p} holds token {int(tokens[p])}"
                                         f", the atom token {int(self.atom_token[a])}: these "
                                         "are not the store's windows")
                doc, start, end = cols
                self.atom_doc[a], self.atom_char_start[a], self.atom_char_end[a] = (
                    int(doc[p]), int(start[p]), int(end[p]))

    def atom_labels(self) -> list[dict[str, int]]:
        cols = [getattr(self, n).tolist() for n in LABELS]
        return [dict(zip(LABELS, vals, strict=True)) for vals in zip(*cols, strict=True)]


def store_char_spans(store, tokenizer: Any, windows: Iterable[int]
                     ) -> dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``{window id: (tokens_T, doc_T, char_start_T, char_end_T)}`` for the given global window
    ids of ``store``: its corpus windows re-cut, in order, with the tokenizer's offsets."""
    want = {int(w) for w in windows if int(w) >= 0}
    if not want:
        return {}
    spec = store.spec
    data = DataConfig(dataset=spec.dataset, text_column=spec.text_column,
                      context_size=spec.context_size, prepend_bos=spec.prepend_bos,
                      eval_fraction=spec.eval_fraction)
    out: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
    last = max(want)
    spans = iter_window_char_spans(iter_documents(data, spec.split), tokenizer,
                                   spec.context_size, spec.prepend_bos)
    for w, cols in enumerate(spans):
        if w in want:
            out[w] = cols
        if w >= last:
            break
    return out


def _options_of(cfg) -> ITDAOptions:
    """The family's options from the config (``cfg.options`` once families own their option
    dataclasses), else the defaults."""
    found = getattr(cfg, "options", None)
    if isinstance(found, ITDAOptions):
        return dataclasses.replace(found)
    if isinstance(found, dict):
        return ITDAOptions(**found)
    return ITDAOptions()


def _rebatch(batches: Iterable[Tensor | LabelledRows], rows: int) -> Iterator[Any]:
    """Batches as given when they are at least ``rows`` long, else concatenated up to it."""
    pending: list[LabelledRows] = []
    held = 0
    for b in batches:
        b = b if isinstance(b, LabelledRows) else LabelledRows(b)
        pending.append(b)
        held += len(b.acts)
        if held >= rows:
            yield _concat(pending)
            pending, held = [], 0
    if pending:
        yield _concat(pending)


def _concat(parts: list[LabelledRows]) -> LabelledRows:
    if len(parts) == 1:
        return parts[0]
    fields = []
    for j in range(4):
        vals = [p[j] for p in parts]
        fields.append(None if any(v is None for v in vals) else torch.cat(vals))
    return LabelledRows(*fields)


def _labels(rows: LabelledRows, n: int, device) -> Tensor:
    out = torch.full((n, 3), -1, dtype=torch.long, device=device)
    for j, col in enumerate((rows.window, rows.pos, rows.token)):
        if col is not None:
            out[:, j] = col[:n].to(device).long()
    return out


def _first_unique(x_BD: Tensor) -> Tensor:
    """Indices of the first occurrence of each distinct row, in order."""
    _, inv, counts = torch.unique(x_BD, dim=0, return_inverse=True, return_counts=True)
    if len(counts) == len(x_BD):
        return torch.arange(len(x_BD), device=x_BD.device)
    first = torch.full((len(counts),), len(x_BD), dtype=torch.long, device=x_BD.device)
    first.scatter_reduce_(0, inv, torch.arange(len(x_BD), device=x_BD.device), "amin")
    return first.sort().values


def _most_frequent_unique(x_BD: Tensor, n: int) -> Tensor:
    """Indices (first occurrences) of the ``n`` most frequent distinct rows; ties by order."""
    _, inv, counts = torch.unique(x_BD, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(counts),), len(x_BD), dtype=torch.long, device=x_BD.device)
    first.scatter_reduce_(0, inv, torch.arange(len(x_BD), device=x_BD.device), "amin")
    # sort by (-count, first occurrence): a stable sort on first, then on -count
    order = torch.argsort(first, stable=True)
    order = order[torch.argsort(-counts[order], stable=True)]
    return first[order[:n]]
