"""Metrics a run records beside its evals: training speed and wall times (not re-measured by
`saelab eval`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from saelab.evals.registry import metric, register_facts


@dataclass
class RunFacts:
    train_tokens_per_second: float = metric(
        "training tokens/s", "Training throughput (activation rows per second).", "{:,.0f}",
        summary=200, column=100, short="train tok/s")
    train_seconds: float = metric("training seconds", "Wall time of training.", "{:.1f}")
    eval_seconds: float = metric("eval seconds", "Wall time of the evaluation.", "{:.1f}")
    eval_ce_seconds: float = metric("LM splice seconds", "Wall time of the CE eval.", "{:.1f}")

    @classmethod
    def from_metrics(cls, metrics: dict[str, float]) -> RunFacts:
        return cls(**{f.name: metrics.get(f.name) for f in fields(cls)})

    @staticmethod
    def wall_seconds(metrics: dict[str, float]) -> float:
        """Training + evaluation wall time of a run (NaN without its training time)."""
        t = RunFacts.from_metrics(metrics)
        train = math.nan if t.train_seconds is None else t.train_seconds
        return train + (t.eval_seconds or 0.0)


register_facts(RunFacts)

