"""BatchTopK SAE (docs/methods.md §4.8): the ``k·B`` largest ``ReLU(π)`` of a batch in training, one
global threshold at inference; saves as SAELens ``jumprelu``. The recipe is in
``_topk_base.py``."""

from __future__ import annotations

from saelab.saes._topk_base import BatchTopKBaseSAE, TopKOptions
from saelab.saes.registry import register


@register
class BatchTopKSAE(BatchTopKBaseSAE):
    """BatchTopK SAE: top k·B activations per batch, global inference threshold (docs/methods.md §4.8)."""

    architecture = "batchtopk"
    Options = TopKOptions
