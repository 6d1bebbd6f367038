"""`saelab <verb>`: a thin layer over the Python API.

Every user mistake surfaces as one line ``error: ...`` and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from saelab.analysis.registry import analyses
from saelab.cliargs import add_dataclass_args, build, given
from saelab.config import EvalConfig, HarvestConfig, RunConfig
from saelab.errors import SaelabError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saelab",
        description="Sparse dictionary learning on language-model activations.",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser(
        "train", help="harvest (or reuse) activations, train an SAE, evaluate it, save it",
        description="Train an SAE end to end. With no flags: Gated SAE on the embedded "
                    "SmolLM2-135M-Instruct (blocks.12.hook_resid_post) over the embedded news "
                    "corpus; writes the run folder given by --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_args(t, RunConfig)
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    h = sub.add_parser("harvest", help="write LM activations at a hook into an activation store")
    add_dataclass_args(h, HarvestConfig)
    h.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a trained run (or a saved SAE folder) again")
    e.add_argument("run", help="run folder written by `saelab train` (or an SAE folder)")
    add_dataclass_args(e, EvalConfig)
    e.add_argument("--skip-ce", action="store_true", help="skip the LM-splice CE/KL metrics")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_sweep_parser(sub)
    _add_synth_parser(sub)
    sub.add_parser("archs", help="list SAE architectures")
    _add_analysis_parsers(sub)
    return p


def _add_analysis_parsers(sub) -> None:
    """One verb per registered analysis plug-in, its flags from the analysis config."""
    for a in analyses().values():
        ap = sub.add_parser(a.verb, help=a.help, description=a.help)
        if a.positional:
            ap.add_argument("runs", nargs="+", metavar=a.positional,
                            help="run folders written by `saelab train` (or SAE folders)")
        ap.add_argument("--out", dest="analysis_out", required=True, metavar="DIR",
                        help="folder to write the analysis outputs to")
        add_dataclass_args(ap, a.config)
        ap.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_synth_parser(sub) -> None:
    from saelab.config import SynthConfig

    s = sub.add_parser(
        "synth", help="benchmark SAE families on synthetic data with a known dictionary",
        description="Generate activations from a known dictionary (Zipf feature frequencies, "
                    "superposition), train every family in --arch on them with its defaults, "
                    "and score how well each recovers the true features (best cosine, fraction "
                    "recovered, MCC) besides FVU, L0 and dead latents on held-out samples. "
                    "Writes DIR/synth.json and prints one row per family.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_args(s, SynthConfig)
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sweep_parser(sub) -> None:
    from saelab.config import SweepConfig

    s = sub.add_parser(
        "sweep", help="train SAE families at several sparsity levels on one store; Pareto plots",
        description="Train every family in --arch at each of its sparsity levels (the family's "
                    "default sweep levels, or --levels FAMILY=V1,V2,...) on one shared "
                    "activation store with the same budget, evaluate every SAE on the same "
                    "held-out data, and write sweep.csv, sweep.json and Pareto plots (L0 vs "
                    "FVU, CE loss recovered, delta LM loss). Rerun the same command to continue "
                    "an interrupted sweep.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_args(s, SweepConfig, skip=("sae.architecture",))
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SaelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        how = "the same command" if args.verb == "sweep" else "the same command with --resume"
        print(f"interrupted: rerun {how} to continue", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False)
    if args.verb == "archs":
        from saelab.saes.registry import architectures

        for name, cls in sorted(architectures().items()):
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            flag = "" if cls.trainable else "  [inference/loading only]"
            print(f"{name:10s} {doc}{flag}")
        return 0
    if args.verb == "train":
        from saelab.pipeline import train_run
        from saelab.report.table import summary_table

        cfg = build(RunConfig, args)
        cfg.validate()
        if cfg.resume:
            ignored = sorted(given(args) - {"out", "resume", "quiet", "verb"})
            if ignored:
                print(f"note: a resumed run keeps its saved config; ignoring "
                      f"{', '.join('--' + k.split('.')[-1].replace('_', '-') for k in ignored)}",
                      file=sys.stderr)
        summary = train_run(cfg, progress=progress)
        print(summary_table(summary.metrics,
                            title=f"\n{cfg.sae.architecture} SAE, d_sae {cfg.sae.d_sae} — held-out eval"))
        print(f"\nrun folder: {summary.run_dir}  (SAE in {summary.run_dir / 'sae'}, "
              f"metrics.json, metrics.jsonl, feature_density.png)")
        return 0
    if args.verb == "harvest":
        from saelab.harvest import harvest

        cfg = build(HarvestConfig, args)
        cfg.validate()
        store = harvest(cfg, progress=progress)
        print(f"store: {store.path}  rows {store.num_rows:,}  d_in {store.d_in}  "
              f"hook {store.hook}  model {store.model}")
        return 0
    if args.verb == "eval":
        from saelab.pipeline import evaluate_run
        from saelab.report.table import summary_table

        ecfg = build(EvalConfig, args)
        ecfg.validate()
        metrics = evaluate_run(Path(args.run), ecfg, skip_ce=args.skip_ce, progress=progress)
        print(summary_table(metrics, title=f"held-out eval of {args.run}"))
        print(json.dumps({k: metrics[k] for k in ("l0", "fvu") if k in metrics}))
        return 0
    if args.verb == "sweep":
        from saelab.config import SweepConfig
        from saelab.sweep import run_sweep

        cfg = build(SweepConfig, args)
        cfg.validate()
        result = run_sweep(cfg, progress=progress)
        print(f"\nsweep: {len(result.rows)} runs finished"
              + (f", {len(result.failed)} failed" if result.failed else "") + "\n")
        print(result.table())
        print(f"\nsweep folder: {result.out}  (sweep.csv, sweep.json, pareto_fvu.png, "
              f"pareto_ce.png, pareto_delta_lm.png, runs/)")
        return 1 if result.failed else 0
    if args.verb == "synth":
        from saelab.config import SynthConfig
        from saelab.synth import run_synth, synth_table

        cfg = build(SynthConfig, args)
        cfg.validate()
        res = run_synth(cfg, progress=progress)
        print(synth_table(res))
        print(f"\nresults: {res.path}")
        return 1 if res.failed else 0
    if args.verb in analyses():
        a = analyses()[args.verb]
        acfg = build(a.config, args)
        if hasattr(acfg, "validate"):
            acfg.validate()
        result = a.run(acfg, [Path(r) for r in getattr(args, "runs", [])],
                       Path(args.analysis_out), progress)
        print(a.summary(result))
        return 0
    raise AssertionError(args.verb)


if __name__ == "__main__":
    sys.exit(main())
