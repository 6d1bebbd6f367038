"""Mutual Choice SAE (Ayonrinde 2024; docs/methods.md §6.3): the global top ``k·B`` entries of the
batch's token-latent affinities, i.e. BatchTopK under its own name, with BatchTopK's scalar
inference threshold (§4.8); saves as SAELens ``jumprelu``. Options and ``aux_zipf_loss`` are in
``_choice_base.py``."""

from __future__ import annotations

from torch import Tensor

from saelab.saes._choice_base import ChoiceOptions, ZipfUsageMixin
from saelab.saes._topk_base import BatchTopKBaseSAE
from saelab.saes.registry import register
from saelab.saes.sparse import SparseCode


@register
class MutualChoiceSAE(ZipfUsageMixin, BatchTopKBaseSAE):
    """Mutual Choice: BatchTopK's global top-k·B under its own name (docs/methods.md §6.3)."""

    architecture = "mutual_choice"
    Options = ChoiceOptions
    sweep_param = "options.k"
    sweep_levels = (16, 32, 64)

    def select_train(self, pre_BF: Tensor, step: int) -> SparseCode:
        code = super().select_train(pre_BF, step)
        self.track_firing(code, pre_BF.shape[0])
        return code
