"""top-AFA SAE (Lee, Davies, Canby & Hockenmaier 2025; docs/methods.md §10) and the AFA analysis tools.

Approximate Feature Activation (§10.1): if ``z = Σ_i f_i d_i`` with unit-norm, ε-quasi-orthogonal
directions (``|d_i·d_j| ≤ ε``), then ``|‖z‖² − ‖f‖²| ≤ ε(h − 1)‖f‖²`` with ``h`` the number of
(active) latents, so ``‖f‖ ≈ ‖z‖``. top-AFA turns that into the activation (§10.2, [C])::

    x_c = x − b_dec
    a   = ReLU(x_c W_enc)                       (+ b_enc if ``options.encoder_bias``)
    s_i = (a_i ‖d_i‖)²,  sorted descending;  c_j = sqrt(Σ_{t ≤ j} s_(t)),  c_M := +∞
    k*  = argmin_j |c_j − ‖x_c‖| + 1            (``options.selection = nearest``, the code)
        | first j with c_j ≥ ‖x_c‖              (``first_exceeding``)
    f   = a on its k* largest s;   x̂ = f W_dec + b_dec

so every token gets its own number of active latents and there is no ``k``. ``k*`` is also capped
at the number of positive activations (the extra entries would be zeros; this only matters for
``first_exceeding`` when no prefix reaches the target). Training loss (§10.3)::

    L = nmse(x̂, x) + α_aux · AuxK + λ_AFA · mean_b((‖f_b‖ − t_b)²) / v

- ``nmse`` is the batch-normalised MSE of the TopK family, ``Σ‖x − x̂‖² / Σ‖x − x̄‖²``. The
  reference uses elementwise MSE on per-token standardised inputs; ``v`` (the batch's
  per-dimension variance, ``Σ‖x − x̄‖² / (B·D)``) is the factor that turns elementwise MSE into
  that nmse, so dividing the AFA term by it keeps the reference's reconstruction : AFA ratio
  for any input scale.
- ``t_b`` (``options.afa_target``, detached): ``uncentered`` ``‖x_b‖`` (default, what the code
  compares to) or ``centered`` ``‖x_b − b_dec‖`` (what the selection uses). ``‖f_b‖`` uses the raw
  activations, as the code (decoder rows are unit-norm, N1).
- AuxK (§0.6) with the library's TopK options (``aux_k`` 0 = d_in/2, ``aux_coefficient``
  1/32); the reference uses k_aux = 512, dead after 5 batches, and elementwise MSE.

Deviations from the reference code, on purpose:

- **Input normalisation.** The code standardises every token (``input_unit_norm``, §0.3 mode 3)
  and de-standardises the output (``options.standardize``). By default we keep the library's
  scalar normalisation (§0.3 mode 2, folded into the weights at save time) so the saved SAE is a
  plain function of the raw activation. Consequence: under standardisation ``‖x'‖ = √(D − 1)`` for every token, so the
  code's *uncentered* AFA target is a constant; here ``‖x‖`` varies per token and includes the
  dataset mean that ``b_dec`` absorbs, which makes ``centered`` the more natural choice on
  activations with a large mean. The default stays ``uncentered`` to match the code.
- **b_enc** exists but is unused in the reference forward. ``options.encoder_bias`` (default off,
  matching the code) adds it; when off the SAE has no ``b_enc`` tensor at all.
- **b_dec init.** Not a deviation, but unlike the rest of the library: ``b_dec_init`` defaults to
  ``zeros`` here, as in the reference (``--b-dec-init`` still overrides it). With the uncentered
  target a data-initialised ``b_dec`` makes the AFA target ``‖x‖`` and the selection target
  ``‖x − b_dec‖`` disagree from step 0; the AFA term then keeps inflating activations and the
  selection keeps dropping latents (SmolLM2 layer-6, 80 steps: L0 220 → 13 with FVU rising
  0.49 → 0.67; starting from 0 both targets agree and FVU fell to 0.16).

Init (§10.4, [C]): Kaiming-uniform tied init with unit-norm decoder rows; the encoder keeps the
Kaiming column scale ``sqrt(2·d_in/d_sae)`` of the reference (its ``W_enc`` is Kaiming-uniform and
only ``W_dec`` is normalised), so at init all positive activations together carry about
``‖x_c‖``: the first steps start from large k* and training sharpens the code. Decoder: N1.

Known behaviour: **top-AFA learns dense codes**, in the reference too. Nothing in the loss rewards
fewer active latents: the selection only enforces ``‖f‖ ≈ ‖x_c‖``, and a dense code of many
smaller activations whose cross terms ``Σ_{i≠j} f_i f_j d_i·d_j`` cancel satisfies that and
reconstructs better than a sparse one. From the Kaiming init (all positive activations together
carry about ``‖x_c‖``, so k* starts at most of the positives) training lowers the
reconstruction error without concentrating the code, and the AFA term is ~0 once the selection
matches the norms. The reference's logged runs end at L0 ≈ 2,000 of 12,288 latents on GPT-2
(≈ 2.7·d, l2 ≈ 2e-4, i.e. TopK-at-k ≥ 1024 reconstruction); on `saelab synth` (d 32, true L0 4,
256 latents) this implementation ends at L0 ~75 (≈ 2.3·d), FVU 0.02, decoder at chance
(best-cos 0.47), and an independent dense float64 reimplementation of the reference code
(per-token standardisation, elementwise MSE, lr 3e-4 or 1.6e-3, λ 0 … 1/8) behaves the same
(L0 81-91, best-cos 0.46-0.50, FVU down to 2e-4). Per-token standardisation is therefore an
option (``options.standardize``, off by default): it would not change this, and with it on
``decode(f)`` returns standardised-space output (de-standardising needs the token's mean and std),
so the saved SAE is no longer a plain function of the code.

Not loadable by SAELens (the per-token k* has no SAELens equivalent); saved as
``saelab.topafa``.

Selection cost: a full per-token sort of ``[B, F]`` scores (as the reference) plus one host sync
to size the ragged code (``Σ_b k*_b`` is data-dependent). Training is otherwise sparse like the
TopK family: π is computed without autograd, only the selected entries are re-attached
(``SparsePreActs``, encoder backward B·k*·D), and decoding is an ``embedding_bag``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.config import opt
from saelab.errors import ConfigError
from saelab.saes._topk_base import AuxKMixin, AuxKOptions, aux_target_factor, topk_lr
from saelab.saes.base import SAE, LossOutput
from saelab.saes.registry import register
from saelab.saes.sparse import (
    SparseCode,
    SparsePreActs,
    attach_grad,
    auxk_loss,
    normalized_mse,
)

# ---- the top-AFA selection ---------------------------------------------------------------------


@dataclass
class AFAOptions(AuxKOptions):
    """top-AFA (docs/methods.md §10); AuxK as the TopK families (§0.6)."""

    afa_coefficient: float = opt(
        1 / 32, "lambda_AFA of the norm-alignment loss (§10.3; the code sweeps 1/128..1/16). "
        "The term is divided by the batch's per-dimension variance, so its weight relative to "
        "the reconstruction nmse is the reference's for any input scale.")
    afa_target: str = opt(
        "uncentered", "Target of the AFA loss: uncentered ||x|| (the reference code) or "
        "centered ||x - b_dec|| (what the selection uses).", choices=("uncentered", "centered"))
    selection: str = opt(
        "nearest", "k* rule: nearest cumulative norm to ||x_c|| (reference code) or the first "
        "that reaches it.", flag="afa_selection", choices=("nearest", "first_exceeding"))
    encoder_bias: bool = opt(
        False, "Add a learned b_enc to the pre-activations. Off by default: the reference "
        "forward pass never uses its b_enc, and with W_enc = W_dec^T the bias-free code of an "
        "orthonormal dictionary matches ||x_c|| exactly (§10.1-10.2).", flag="afa_encoder_bias")
    standardize: bool = opt(
        False, "Standardise every token, x' = (x - mean_d x) / (std_d x + 1e-5), before the SAE "
        "and de-standardise its output, as the reference code (input_unit_norm, §10.2). Off by "
        "default: decode(f) then needs each token's mean and std, so the saved SAE is no longer "
        "a plain function of the code, and on saelab synth it did not make the codes sparse "
        "(docs/methods.md §10.5).", flag="afa_standardize")


def afa_k(acts_BF: Tensor, dec_norm_F: Tensor, target_B: Tensor, rule: str = "nearest"
          ) -> tuple[Tensor, Tensor]:
    """Per-token ``k*`` and the latent order (by ``(a_i‖d_i‖)²`` descending), §10.2.

    Returns ``(k_B, order_BF)``; ``k_B ≥ 1`` and ``≤`` the number of positive activations
    (or 1 if there are none). No gradient.
    """
    with torch.no_grad():
        s_sorted, order = (acts_BF * dec_norm_F).square().sort(dim=1, descending=True)
        cum = s_sorted.cumsum(1).sqrt_()
        cum[:, -1] = math.inf  # k never reaches M unless forced (as the reference)
        t = target_B[:, None]
        if rule == "nearest":
            k = (cum - t).abs_().argmin(1) + 1  # first index on ties: the smaller k
        elif rule == "first_exceeding":
            k = (cum < t).sum(1) + 1  # cum is nondecreasing
        else:
            raise ValueError(f"unknown top-AFA selection rule {rule!r}")
        n_pos = (acts_BF > 0).sum(1).clamp_min(1)
        return torch.minimum(k, n_pos), order


def ragged_top(acts_BF: Tensor, k_B: Tensor, order_BF: Tensor) -> tuple[SparseCode, Tensor]:
    """The first ``k_b`` latents of ``order_BF`` in each row as a ragged code, plus each entry's
    row. One host sync: the code's length ``Σ k_b`` is data-dependent."""
    B = acts_BF.shape[0]
    offsets = torch.zeros(B + 1, dtype=torch.long, device=acts_BF.device)
    torch.cumsum(k_B, 0, out=offsets[1:])
    n = int(offsets[-1])
    rows = torch.arange(B, device=acts_BF.device).repeat_interleave(k_B, output_size=n)
    pos = torch.arange(n, device=acts_BF.device) - offsets[rows]
    idx = order_BF[rows, pos]
    return SparseCode(idx, acts_BF[rows, idx], offsets), rows


@register
class TopAFASAE(AuxKMixin, SAE):
    """top-AFA SAE: per-token k* from the AFA norm match, no k (docs/methods.md §10)."""

    architecture = "topafa"
    Options = AFAOptions
    saelens_architecture = None
    defaults = {"apply_b_dec_to_input": True, "b_dec_init": "zeros"}
    train_defaults = {"lr": topk_lr, "adam_beta1": 0.9}
    # top-AFA has no k. λ_AFA is its one loss knob (the reference sweeps {1/128 … 1/16}, §10.3),
    # but it moves L0 little and not in the direction one might guess: the reference's own logged
    # runs (GPT-2 resid_pre layers 6-8, M = 12,288, 20k steps) end at L0 315-1580 with λ = 1/128,
    # ~2,040-2,100 with 1/32 and ~2,340-2,420 with 1/16, i.e. *larger* λ, *higher* L0. Short runs
    # here disagree in sign (SmolLM2 layer 6, 80 steps: L0 288 at 1/32 vs 320 at 1/128) and on
    # synthetic data λ ∈ {0, 1/32, 1/8} all end at L0 ~88 of 256. Levels follow the reference's
    # long-run ordering, low λ (lowest L0) first.
    sweep_levels = (1 / 128, 1 / 32, 1 / 16)
    unit_norm_decoder = True

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        lam = self.cfg.options.afa_coefficient
        if not (math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"--afa-coefficient must be a finite number >= 0, got {lam}")
        if self.cfg.options.encoder_bias:
            self.b_enc = nn.Parameter(torch.zeros(self.d_sae, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.init_tied_(generator, row_norm=1.0)
        self.W_enc.mul_(math.sqrt(2 * self.d_in / self.d_sae))  # Kaiming column scale (§10.4)
        self.b_dec.zero_()
        if self.cfg.options.encoder_bias:
            self.b_enc.zero_()

    # ---- per-token standardisation (options.standardize, §10.2) -------------------------------
    def standardize(self, x_BD: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(x', mean, std)`` with ``x' = (x − mean_d x)/(std_d x + 1e-5)`` (the reference's
        unbiased std); ``(x, None, None)`` when the option is off."""
        if not self.cfg.options.standardize:
            return x_BD, None, None
        mean_B1 = x_BD.mean(-1, keepdim=True)
        std_B1 = x_BD.std(-1, keepdim=True)
        return (x_BD - mean_B1) / (std_B1 + 1e-5), mean_B1, std_B1

    @staticmethod
    def destandardize(y_BD: Tensor, mean_B1: Tensor | None, std_B1: Tensor | None) -> Tensor:
        return y_BD if mean_B1 is None else y_BD * (std_B1 + 1e-5) + mean_B1

    def forward(self, x_BD: Tensor):
        _, mean_B1, std_B1 = self.standardize(x_BD)
        out = super().forward(x_BD)
        if mean_B1 is None:
            return out
        # super().forward standardised again inside encode; decode is in standardised units
        return out._replace(recon=self.destandardize(out.recon, mean_B1, std_B1))

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        pre = self._input_for_encoder(x_BD, self.W_enc)
        return pre + self.b_enc if self.cfg.options.encoder_bias else pre

    def sparse_pre_acts(self, x_BD: Tensor) -> SparsePreActs:
        """π without autograd plus a sparse backward for the entries later selected."""
        return SparsePreActs(x_BD, self.W_enc, self.b_enc if self.cfg.options.encoder_bias else None,
                             self.b_dec if self.cfg.apply_b_dec_to_input else None)

    def select(self, x_BD: Tensor, pre_BF: Tensor) -> tuple[SparseCode, Tensor]:
        """(ragged top-AFA code, row of every entry). Values carry ``pre_BF``'s gradient, if any;
        the choice of latents carries none."""
        acts_BF = torch.relu(pre_BF)
        target_B = (x_BD - self.b_dec).detach().norm(dim=1)
        k_B, order = afa_k(acts_BF, self.decoder_norms().detach(), target_B,
                           self.cfg.options.selection)
        return ragged_top(acts_BF, k_B, order)

    def encode(self, x_BD: Tensor) -> Tensor:
        x_BD = self.standardize(x_BD)[0]
        code, _ = self.select(x_BD, self.pre_acts(x_BD))
        return code.dense(x_BD.shape[0], self.d_sae)

    def loss(self, x_BD: Tensor, step: int, *, dead_mask_F: Tensor | None = None,
             **_: Tensor | None) -> LossOutput:
        B = x_BD.shape[0]
        # standardised: the loss is in x' units, as the reference's (its MSE is on x'); the
        # reconstruction handed back is de-standardised so the trainer's logs are in x units
        x_BD, mean_B1, std_B1 = self.standardize(x_BD)
        # select on a detached π, then re-attach only the chosen entries (sparse backward)
        pre = self.sparse_pre_acts(x_BD)
        code, rows = self.select(x_BD, pre.dense)
        code = attach_grad(pre, code)
        recon_BD = code.decode(self.W_dec) + self.b_dec
        nmse = normalized_mse(recon_BD, x_BD)
        # ‖f_b‖ from the ragged code; the clamp keeps sqrt's gradient finite for empty rows
        f_norm_B = torch.zeros(B, device=x_BD.device, dtype=code.vals.dtype).index_add_(
            0, rows, code.vals.square()).clamp_min(1e-20).sqrt()
        a = self.cfg.options
        target_B = (x_BD if a.afa_target == "uncentered" else x_BD - self.b_dec).detach().norm(dim=1)
        var_per_dim = (x_BD - x_BD.mean(0)).pow(2).sum() / x_BD.numel()
        afa = (f_norm_B - target_B).square().mean() / var_per_dim.clamp_min(1e-12)
        aux = x_BD.new_zeros(())
        if self.cfg.options.aux_coefficient:
            aux = auxk_loss(pre, x_BD - recon_BD, self.W_dec, dead_mask_F, self.k_aux,
                            scale_by_dead=self.cfg.options.aux_scale_by_dead)
            if a.aux_normalization == "target":
                aux = aux * aux_target_factor(x_BD - recon_BD, x_BD)
        total = nmse + a.afa_coefficient * afa + self.cfg.options.aux_coefficient * aux
        terms = {"nmse": nmse, "afa": afa, "auxk": aux}
        if mean_B1 is not None:
            recon_BD = self.destandardize(recon_BD.detach(), mean_B1, std_B1)
        return LossOutput(total, terms, None, recon_BD, fired_F=self.fired_latents(code),
                          l0=code.l0(B))

    def bias_names(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc") if self.cfg.options.encoder_bias else ("b_dec",)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        # standardisation removes any input scale: b_dec / b_enc live in x' units, unchanged
        if not self.cfg.options.standardize:
            super().fold_input_scale(scale)

    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        super().init_from_data(self.standardize(x_ND.float())[0])


# ---- AFA analysis (§10.1) -------------------------------------------------------------------------


def coherence(W_dec_FD: Tensor) -> Tensor:
    """ε of a dictionary: the largest ``|cos(d_i, d_j)|``, i ≠ j (builds the ``[F, F]`` Gram)."""
    unit = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.T
    gram.fill_diagonal_(0)
    return gram.abs().max()


def afa_norm_bounds(norm_z: Tensor, eps: float | Tensor, h: int | Tensor) -> tuple[Tensor, Tensor]:
    """Band for ``‖f‖`` given ``‖z‖`` (§10.1): ``‖z‖/sqrt(1 + ε(h−1)) ≤ ‖f‖ ≤ ‖z‖/sqrt(1 − ε(h−1))``.

    The upper bound is +inf once ``ε(h − 1) ≥ 1``. ``h``: dictionary size, or the active count.
    """
    spread = torch.as_tensor(eps, dtype=norm_z.dtype) * (torch.as_tensor(h, dtype=norm_z.dtype) - 1)
    lo = norm_z / (1 + spread).sqrt()
    hi = torch.where(spread < 1, norm_z / (1 - spread).clamp_min(1e-30).sqrt(),
                     torch.full_like(norm_z, math.inf))
    return lo, hi


def zf_norms(x_BD: Tensor, f_BF: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor
             ) -> tuple[Tensor, Tensor]:
    """Data of the ZF plot (§10.1, [C]): per token ``(‖z‖, ‖f̃‖)``.

    ``z`` is the raw, uncentred input; ``f̃ = [f_i‖d_i‖]_i ⊕ ‖b_dec‖`` treats ``b_dec`` as an
    always-on feature with direction ``b_dec/‖b_dec‖``, so ``x̂ = Σ_j f̃_j u_j`` with unit ``u_j``.
    Points with ``‖f̃‖`` above the AFA band over-activate, below it under-activate.
    """
    norm_z = x_BD.norm(dim=1)
    f_sq = f_BF.square() @ W_dec_FD.square().sum(1)
    return norm_z, (f_sq + b_dec_D.square().sum()).sqrt()


def epsilon_lbo(norm_z: Tensor, norm_f_tilde: Tensor, h: int) -> Tensor:
    """Per-token ε_LBO = ``|‖z‖² − ‖f̃‖²| / ((h − 1)‖f̃‖²)`` (§10.1, [C]): the smallest coherence
    consistent with the observed norms; lower = better norm alignment. The authors' script uses
    ``h = d_sae``; pass ``d_sae + 1`` to count ``b_dec`` as a feature."""
    f_sq = norm_f_tilde.square()
    return (norm_z.square() - f_sq).abs() / ((h - 1) * f_sq).clamp_min(1e-30)


@torch.no_grad()
def sae_zf_norms(sae: SAE, x_BD: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`zf_norms` of any SAE on raw activations ``x_BD`` (uses ``sae.encode``)."""
    return zf_norms(x_BD, sae.encode(x_BD), sae.W_dec, sae.b_dec)
