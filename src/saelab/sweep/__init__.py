"""`saelab sweep`: SAE families x sparsity levels, trained and evaluated the same way.

Every run is an ordinary run folder ``OUT/runs/<family>-<param>-<level>/`` made by the pipeline
(:func:`saelab.pipeline.train_run`) with the same model, store, seed, token budget, batch size,
width and evaluation. What does not depend on the SAE is done once per sweep: one LM load, one
store (harvested or reused by the pipeline's cache; families that need LM gradients get the
store the pipeline picks for them), one :class:`~saelab.evals.evaluate.EvalContext` (held-out
activations, clean / zero- / mean-ablation CE and clean log-probabilities).

Resumable: a run folder with ``metrics.json`` is finished and read back; one with a checkpoint
resumes from it; anything else restarts. ``sweep.csv``, ``sweep.json`` and the Pareto plots are
rewritten after every finished run. ``OUT/sweep_config.json`` records the settings every run
shares; a rerun with other shared settings is refused unless ``overwrite``. Changing only
``--arch`` / ``--levels`` extends (or narrows) the sweep and keeps the finished runs.

Three parts: :mod:`.plan` (the grid and the settings checks), :mod:`.run` (training and
evaluating the runs), :mod:`.report` (CSV, JSON, table and Pareto plots).
"""

from saelab.sweep.plan import RUNS, SWEEP_CONFIG, SweepRun, plan_runs
from saelab.sweep.report import csv_columns, format_table, to_csv
from saelab.sweep.run import SweepResult, run_sweep

__all__ = ["RUNS", "SWEEP_CONFIG", "SweepResult", "SweepRun", "csv_columns", "format_table",
           "plan_runs", "run_sweep", "to_csv"]
