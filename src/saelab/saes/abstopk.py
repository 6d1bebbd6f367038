"""AbsTopK SAE (docs/methods.md §5): the k largest ``|π|`` per token with their signs, no ReLU; the
pre-encoder bias and AuxK (selected by ``|π|``, signed) are [U] options kept on by default
(§5.3). The recipe is in ``_topk_base.py``."""

from __future__ import annotations

from saelab.saes._topk_base import TopKBaseSAE, TopKOptions
from saelab.saes.registry import register


@register
class AbsTopKSAE(TopKBaseSAE):
    """AbsTopK SAE: k largest |pre-activations| per token, signs kept (docs/methods.md §5)."""

    architecture = "abstopk"
    Options = TopKOptions
    saelens_architecture = None
    signed = True
