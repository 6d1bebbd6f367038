"""TopK SAE (Gao et al. 2024; docs/methods.md §4): ``ReLU(TopK_k(π))`` per token with AuxK, optional
Multi-TopK. Saves as (and loads) SAELens ``topk``. The recipe is in ``_topk_base.py``."""

from __future__ import annotations

from saelab.saes._topk_base import TopKBaseSAE, TopKOptions
from saelab.saes.registry import register

__all__ = ["TopKOptions", "TopKSAE"]


@register
class TopKSAE(TopKBaseSAE):
    """TopK SAE with AuxK (docs/methods.md §4.1-4.7, §0.6)."""

    architecture = "topk"
    Options = TopKOptions
    saelens_architecture = "topk"
    saelens_loads = ("topk",)
