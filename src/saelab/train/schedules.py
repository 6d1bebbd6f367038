"""Learning-rate and sparsity schedules (docs/methods.md §0.8), as pure functions of the step."""

from __future__ import annotations


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the last
    ``decay_fraction`` of training."""
    m = 1.0
    if warmup_steps > 0:
        m = min(m, (step + 1) / warmup_steps)
    decay_steps = int(round(total_steps * decay_fraction))
    if decay_steps > 0:
        decay_start = total_steps - decay_steps
        if step >= decay_start:
            m = min(m, max(0.0, (total_steps - step) / decay_steps))
    return m


def sparsity_warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return int(round(total_steps * warmup_fraction))
