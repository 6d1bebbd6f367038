"""Dead-latent tracking with the window measured in tokens (docs/methods.md §0.5)."""

from __future__ import annotations

import torch
from torch import Tensor


class DeadLatentTracker:
    """Counts, per latent, training tokens since it last fired (``|activation| > eps``).

    ``eps`` is ``TrainConfig.dead_activation_eps`` (``--dead-activation-eps``): 0 by default
    (any nonzero activation, the spec's definition, §0.5); the OpenAI TopK code counts a latent as firing only above
    1e-3 [C]. Families that report ``fired_F`` themselves apply the same ``eps``
    (``SAE.fired_latents`` / ``SAE.fired_dense``).

    Updated with tensor ops only, so it never forces a host sync in the training loop.
    """

    def __init__(self, d_sae: int, window_tokens: int, device: torch.device | str | None = None,
                 eps: float = 0.0):
        self.window_tokens = window_tokens
        self.eps = eps
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, latents_BF: Tensor) -> None:
        # |f| > eps so signed families (AbsTopK) count negative codes as firing; two column
        # reductions instead of materialising |f| and a [B, F] mask
        fired_F = (latents_BF.amax(0) > self.eps) | (latents_BF.amin(0) < -self.eps)
        self.update_fired(fired_F, latents_BF.shape[0])

    @torch.no_grad()
    def update_fired(self, fired_F: Tensor, n_tokens: int) -> None:
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired_F, 0)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired > self.window_tokens

    def dead_fraction(self) -> Tensor:
        return self.dead_mask().float().mean()
