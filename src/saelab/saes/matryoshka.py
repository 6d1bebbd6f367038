"""Matryoshka SAE over BatchTopK (Bussmann, Nabeshima, Karvonen & Nanda 2025; docs/methods.md §13.1).

The ``d_sae`` latents are split into ordered groups with prefix ends ``m_1 < … < m_G = d_sae``
(``options.group_fractions``, normalised; integer sizes are accepted too, e.g. ``"1,1,2,4"``).
Selection is BatchTopK over *all* latents (§4.8, inherited: ``k·B`` largest ``ReLU(π)`` of the
batch in training, one global EMA threshold at inference, saved as SAELens ``jumprelu``). Every
prefix must reconstruct the input on its own::

    x̂^(j) = f_{1:m_j} W_dec[1:m_j] + b_dec
    L     = mean_j nmse(x̂^(j), x)  +  α · AuxK(x − x̂^(G))

``nmse`` is the batch-normalised MSE (``Σ‖x − x̂‖² / Σ‖x − x̄‖²``) the whole TopK family uses,
not the official repo's elementwise MSE: per batch the two differ by one positive factor, so the
weighting between prefixes is the same and α keeps the meaning it has for TopK/BatchTopK.
``options.include_b_dec_term`` (on by default, as in the official repo [C]) adds the
``b_dec``-only reconstruction (j = 0) to the mean. AuxK uses the full-dictionary residual.

The prefix reconstructions are built without a dense code: one ``embedding_bag`` decodes each
(token, group) pair into its own bag, giving a ``[B, G, D]`` per-group decode whose cumulative sum
over groups is every prefix at once (B·k·D work in total, as a single decode). The encoder side
uses the TopK family's sparse backward (selection on a detached π, chosen entries re-attached).

:meth:`MatryoshkaSAE.truncated` gives the smaller SAE made of the first ``m`` latents (§13.1
"prefix truncation"). With the per-latent inference threshold it is exact: its code equals the
full code with latents ``≥ m`` zeroed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab import dist
from saelab.config import opt
from saelab.errors import ConfigError
from saelab.saes._topk_base import BatchTopKBaseSAE, TopKOptions
from saelab.saes.base import LossOutput
from saelab.saes.registry import register
from saelab.saes.sparse import SparseCode, SparsePreActs, attach_grad


@dataclass
class MatryoshkaOptions(TopKOptions):
    """Matryoshka SAE over BatchTopK (docs/methods.md §13.1)."""

    group_fractions: str = opt(
        "0.0625,0.0625,0.125,0.25,0.5",
        "Comma-separated fractions of d_sae per nested group, in order (official example "
        "[M/16, M/16, M/8, M/4, M/2]); normalised to sum to 1, so integer group sizes work too. "
        "Every group gets at least one latent.")
    include_b_dec_term: bool = opt(
        True, "Include the b_dec-only reconstruction (j = 0) in the mean over prefixes, as the "
        "official repo does.")

    def validate(self) -> None:
        super().validate()
        fracs = parse_fractions(self.group_fractions)
        if not fracs or any(f <= 0 for f in fracs):
            raise ConfigError(
                f"--group-fractions must be positive comma-separated numbers, got "
                f"{self.group_fractions!r}")


def parse_fractions(text: str) -> list[float]:
    """'0.25,0.75' -> [0.25, 0.75]; [] if unparsable."""
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        return []


def group_ends(fractions: str, d_sae: int) -> list[int]:
    """Prefix ends ``m_1 < … < m_G = d_sae`` from comma-separated group weights.

    Weights are normalised and parsed exactly (``Fraction``), each end is the rounded cumulative
    share of ``d_sae``, and every group is forced to hold at least one latent.
    """
    try:
        weights = [Fraction(v.strip()) for v in str(fractions).split(",") if v.strip()]
    except ValueError:
        weights = []
    if not weights or any(w <= 0 for w in weights):
        raise ConfigError(f"--group-fractions must be positive comma-separated numbers, got "
                          f"{fractions!r}")
    n = len(weights)
    if n > d_sae:
        raise ConfigError(f"--group-fractions has {n} groups but --d-sae is only {d_sae}")
    total = sum(weights)
    ends, cum = [], Fraction(0)
    for w in weights:
        cum += w
        ends.append(round(cum / total * d_sae))
    ends[-1] = d_sae
    for j in range(n):  # at least one latent per group, without overrunning d_sae
        ends[j] = min(max(ends[j], (ends[j - 1] if j else 0) + 1), d_sae - (n - 1 - j))
    return ends


@register
class MatryoshkaSAE(BatchTopKBaseSAE):
    """BatchTopK SAE trained so that every prefix of the dictionary reconstructs (docs/methods.md §13.1)."""

    architecture = "matryoshka"
    Options = MatryoshkaOptions
    sweep_param = "options.k"
    sweep_levels = (16, 32, 64)

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        #: prefix ends m_1 < … < m_G = d_sae
        self.prefix_ends: tuple[int, ...] = tuple(
            group_ends(self.cfg.options.group_fractions, self.d_sae))
        ends = torch.tensor(self.prefix_ends, device=device)
        # group of every latent (a pure function of the config: not saved)
        self.register_buffer("group_of_F", torch.bucketize(
            torch.arange(self.d_sae, device=device), ends, right=True), persistent=False)

    @property
    def n_groups(self) -> int:
        return len(self.prefix_ends)

    # ---- prefix reconstructions ---------------------------------------------------------------
    def group_decodes(self, code: SparseCode, batch: int) -> Tensor:
        """``[B, G, D]``: each token's code decoded one group at a time (no bias).

        Entry (b, g) is ``Σ_{i in group g} f_bi d_i``; the cumulative sum over g gives the prefix
        reconstructions minus ``b_dec``. One embedding_bag whose bags are (token, group) pairs.
        """
        G = self.n_groups
        n = code.idx.numel()
        if code.offsets is None:
            rows = torch.arange(batch, device=code.idx.device).repeat_interleave(code.idx.shape[1])
        else:  # output_size given: no host sync
            rows = torch.arange(batch, device=code.idx.device).repeat_interleave(
                code.offsets.diff(), output_size=n)
        idx, vals = code.idx.reshape(-1), code.vals.reshape(-1)
        bag = rows * G + self.group_of_F[idx]
        bag, order = bag.sort(stable=True)  # bags must be contiguous
        # start of every bag (empty bags included); searchsorted, unlike bincount, needs no sync
        offsets = torch.searchsorted(bag, torch.arange(batch * G, device=idx.device))
        out = F.embedding_bag(idx[order], self.W_dec, offsets, per_sample_weights=vals[order],
                              mode="sum")
        return out.view(batch, G, self.d_in)

    def prefix_losses(self, x_BD: Tensor, code: SparseCode) -> tuple[Tensor, Tensor]:
        """(nmse of every prefix ``[G]``, full reconstruction ``[B, D]``)."""
        prefix_BGD = self.group_decodes(code, x_BD.shape[0]).cumsum(1) + self.b_dec
        if self.cfg.options.mse_normalization == "fixed":  # §4.2 fixed scale, rank-local
            var = x_BD.shape[0] * self.fixed_mse_scale(x_BD)
        elif dist.is_distributed():  # global FVU denominator, W x this rank's share (dist.py)
            var = dist.global_centered_sq_sum(x_BD).clamp_min(1e-12) / dist.world_size()
        else:
            var = (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        sse_G = (prefix_BGD - x_BD[:, None, :]).pow(2).sum(dim=(0, 2))
        return sse_G / var, prefix_BGD[:, -1]

    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             **_: Tensor | None) -> LossOutput:
        pre: Tensor | SparsePreActs
        if self.sparse_encoder_grad:  # select on a detached π, re-attach the chosen entries
            pre = self.sparse_pre_acts(x_BD)
            code = attach_grad(pre, self.select_train(pre.dense, step))
        else:
            pre = self.pre_acts(x_BD)
            code = self.select_train(pre, step)
        nmse_G, recon_BD = self.prefix_losses(x_BD, code)
        terms = {f"nmse_prefix_{j + 1}": nmse_G[j] for j in range(self.n_groups - 1)}
        terms["nmse"] = nmse_G[-1]
        if self.cfg.options.include_b_dec_term:
            terms["nmse_prefix_0"] = self.recon_loss(self.b_dec.expand_as(x_BD), x_BD)
            matryoshka = (nmse_G.sum() + terms["nmse_prefix_0"]) / (self.n_groups + 1)
        else:
            matryoshka = nmse_G.mean()
        terms["matryoshka"] = matryoshka
        aux = self.aux_loss(pre, x_BD - recon_BD, dead_mask_F, x_BD)
        terms["auxk"] = aux
        total = matryoshka + self.cfg.options.aux_coefficient * aux
        return LossOutput(total, terms, None, recon_BD, fired_F=self.fired_latents(code),
                          l0=code.l0(x_BD.shape[0]))

    # ---- prefix truncation ----------------------------------------------------------------------
    @torch.no_grad()
    def truncated(self, m: int) -> MatryoshkaSAE:
        """A new SAE of the first ``m`` latents (parameters copied, inference threshold kept).

        Its ``encode`` equals this SAE's ``encode`` with latents ``≥ m`` zeroed; its groups are
        this SAE's groups cut at ``m``. Prefix ends (``prefix_ends``) are the trained sizes.
        """
        if not 1 <= m <= self.d_sae:
            raise ValueError(f"truncation width must be in [1, {self.d_sae}], got {m}")
        starts = (0, *self.prefix_ends[:-1])
        sizes = [min(e, m) - s for s, e in zip(starts, self.prefix_ends, strict=True) if s < m]
        cfg = dataclasses.replace(
            self.cfg, d_sae=m,
            options=dataclasses.replace(self.cfg.options, k=min(self.cfg.options.k, m),
                                        group_fractions=",".join(map(str, sizes))))
        small = type(self)(cfg, device=self.W_dec.device, dtype=self.W_dec.dtype)
        small.W_enc.copy_(self.W_enc[:, :m])
        small.W_dec.copy_(self.W_dec[:m])
        small.b_enc.copy_(self.b_enc[:m])
        small.b_dec.copy_(self.b_dec)
        small.threshold.copy_(self.threshold[:m])
        small.threshold_updates.copy_(self.threshold_updates)
        small.total_steps = self.total_steps
        return small.train(self.training)
