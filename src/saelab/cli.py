"""`saelab <verb>`: a thin layer over the Python API.

Every user mistake surfaces as one line ``error: ...`` and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn

import saelab
from saelab import dist
from saelab.analysis.registry import analyses
from saelab.cliargs import add_dataclass_args, build, given
from saelab.config import EvalConfig, HarvestConfig, RunConfig, SweepConfig, SynthConfig
from saelab.data.interop import export_saelens
from saelab.errors import ConfigError, PeerError, SaelabError
from saelab.evals.registry import evals, parse_evals
from saelab.harvest import harvest_hooks
from saelab.io import read_metadata
from saelab.pipeline import evaluate_run, train_run
from saelab.report.dashboard import DashboardConfig, build_dashboard
from saelab.report.run_report import write_report
from saelab.report.table import summary_table
from saelab.saes.registry import architectures, family_file, validate_sae_config
from saelab.steer import SteerConfig, steer_run, steer_table
from saelab.sweep import run_sweep
from saelab.synth import run_synth, synth_table
from saelab.train.distributed import init_from_env, launched_by_torchrun, relaunch, shutdown

EXIT_USER_ERROR = 2
_ARGV: list[str] = []  # the command line of the running `main` call
# errors of the file system the user controls (not bugs): printed as one line, exit 2
_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
               errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: saelab train: ... (see saelab train --help)``
    instead of the usage block (subparsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="saelab",
        description="Sparse dictionary learning on language-model activations.",
    )
    p.add_argument("--version", action="version", version=f"saelab {_version()}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser(
        "train", help="harvest (or reuse) activations, train an SAE, evaluate it, save it",
        description="Train an SAE end to end. With no flags: Gated SAE on the embedded "
                    "SmolLM2-135M-Instruct (blocks.12.hook_resid_post) over the embedded news "
                    "corpus; writes the run folder given by --out.",
    )
    add_dataclass_args(t, RunConfig)
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    h = sub.add_parser("harvest", help="write LM activations at a hook into an activation store")
    add_dataclass_args(h, HarvestConfig, skip=("model.hook",))  # --hook is HarvestConfig.hooks
    h.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a trained run (or a saved SAE folder) again")
    e.add_argument("run", help="run folder written by `saelab train` (or an SAE folder)")
    add_dataclass_args(e, EvalConfig)
    e.add_argument("--evals", default="", metavar="NAME,NAME,...",
                   help="evals to run (default: all): " + "; ".join(
                       f"{name}: {ev.help}" for name, ev in evals().items()))
    e.add_argument("--skip-ce", action="store_true",
                   help="skip the LM-splice CE/KL metrics (drops ce from --evals)")
    e.add_argument("--encoder", choices=("sae", "gp"), default="sae",
                   help="sae: the SAE's own encoder; gp: gradient pursuit on its decoder, each "
                        "token to the L0 the SAE gives it (writes metrics_gp.json, leaves the "
                        "run's metrics.json alone)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    x = sub.add_parser(
        "export-store", help="write an activation store in another tool's layout",
        description="Write a saelab activation store as a SAELens cached-activation dataset "
                    "(Hugging Face datasets on Arrow: one column per hook plus token_ids), so "
                    "SAELens can train on it. `saelab train --store DIR` reads such folders.")
    x.add_argument("store", help="activation store folder (written by `saelab harvest`)")
    x.add_argument("--format", dest="export_format", choices=("saelens",), default="saelens",
                   help="layout to write (default: saelens)")
    x.add_argument("--out", dest="export_out", required=True, metavar="DIR",
                   help="new or empty folder to write the dataset to")
    x.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_sweep_parser(sub)
    _add_synth_parser(sub)
    sub.add_parser("archs", help="list SAE architectures")
    _add_analysis_parsers(sub)
    _add_view_parsers(sub)
    return p


def _version() -> str:
    try:
        return version("saelab")
    except PackageNotFoundError:
        return saelab.__version__


def _add_view_parsers(sub) -> None:
    """`dashboard`, `report`, `steer`: look at a trained SAE's latents and runs."""
    d = sub.add_parser(
        "dashboard", help="feature dashboard of a run: one self-contained HTML + JSON per latent",
        description="Scan held-out activation rows and write DIR/dashboard.html (index of "
                    "latents, a card per latent: top examples with context, activation bins, "
                    "histogram, logit lens; works from file://) and DIR/features/<i>.json in "
                    "SAEDashboard/Neuronpedia's feature schema.")
    d.add_argument("run", help="run folder written by `saelab train` (or an SAE folder)")
    d.add_argument("--out", dest="view_out", default=None, metavar="DIR",
                   help="output folder (default: RUN/dashboard)")
    add_dataclass_args(d, DashboardConfig)
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="write report.html beside a run or a sweep",
                       description="Write RUN/report.html (configuration, metrics with their "
                                   "meaning, training curves, density histogram, dashboard "
                                   "link) or SWEEP_DIR/report.html (table, Pareto plots, a "
                                   "link per run).")
    r.add_argument("run", metavar="RUN|SWEEP_DIR", help="run folder or sweep folder")

    s = sub.add_parser("steer", help="generate with and without one latent (additive / clamp)",
                       description="Generate from --prompt without steering and with latent "
                                   "--latent added (S x max activation x W_dec[i]) or clamped "
                                   "(set to S x max activation, SAE error added back); greedy "
                                   "and seeded by default.")
    s.add_argument("run", help="run folder written by `saelab train` (or an SAE folder)")
    add_dataclass_args(s, SteerConfig)


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
    s = sub.add_parser(
        "synth", help="benchmark SAE families on synthetic data with a known dictionary",
        description="Generate activations from a known dictionary (Zipf feature frequencies, "
                    "superposition), train every family in --arch on them with its defaults, "
                    "and score how well each recovers the true features (best cosine, fraction "
                    "recovered, MCC) besides FVU, L0 and dead latents on held-out samples. "
                    "Writes DIR/synth.json and prints one row per family.",
    )
    add_dataclass_args(s, SynthConfig)
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sweep_parser(sub) -> None:
    s = sub.add_parser(
        "sweep", help="train SAE families at several sparsity levels on one store; Pareto plots",
        description="Train every family in --arch at each of its sparsity levels (the family's "
                    "default sweep levels, or --levels FAMILY=V1,V2,...) on one shared "
                    "activation store with the same budget, evaluate every SAE on the same "
                    "held-out data, and write sweep.csv, sweep.json and Pareto plots (L0 vs "
                    "FVU, CE loss recovered, delta LM loss). Rerun the same command to continue "
                    "an interrupted sweep.",
    )
    add_dataclass_args(s, SweepConfig, skip=("sae.architecture",))
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def archs_table() -> str:
    """`saelab archs`: one aligned row per family (name, trainable, sweep knob, file, doc)."""
    rows = [("name", "trainable", "sweep knob", "file", "description")]
    for name, cls in sorted(architectures().items()):
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        rows.append((name, "yes" if cls.trainable else "no (inference/loading only)",
                     cls.sweep_param if cls.trainable else "-", family_file(cls),
                     doc[0] if doc else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
                     for r in rows)


def _dispatch_view(args: argparse.Namespace, progress: bool) -> int:
    if args.verb == "dashboard":
        cfg = build(DashboardConfig, args)
        out = Path(args.view_out) if args.view_out else Path(args.run) / "dashboard"
        res = build_dashboard(Path(args.run), out, cfg, progress=progress)
        print(f"dashboard: {res.html}  ({res.n_latents} latents, {res.n_rows:,} held-out "
              f"tokens, {res.seconds['total']:.0f} s)"
              + (f"\nfeature JSON: {res.features_dir}/" if res.features_dir else ""))
        return 0
    if args.verb == "report":
        print(f"report: {write_report(Path(args.run))}")
        return 0

    cfg = build(SteerConfig, args)
    rows, max_act = steer_run(Path(args.run), cfg)
    print(steer_table(rows, cfg, max_act))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc` relaunch
    try:
        return _dispatch(args)
    except PeerError:  # rank 0 of this torchrun job reports it
        return EXIT_USER_ERROR
    except SaelabError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror}: choose a writable folder with space left",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        how = "the same command" if args.verb == "sweep" else "the same command with --resume"
        print(f"interrupted: rerun {how} to continue", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    """A message as one line (an error quoting a multi-line library message stays one line)."""
    return " ".join(message.split()) if "\n" in message else message


def _dispatch(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False)
    if args.verb == "archs":
        print(archs_table())
        return 0
    if args.verb == "train":
        cfg = build(RunConfig, args)
        cfg.validate()
        validate_sae_config(cfg.sae)

        if cfg.train.nproc > 1 and not launched_by_torchrun():
            if not cfg.store and not cfg.resume:
                raise ConfigError("--nproc needs an existing activation store: harvest one "
                                  "with `saelab harvest --out STORE ...` and pass --store STORE")
            return relaunch(_ARGV, cfg.train.nproc)
        if cfg.resume and os.environ.get("RANK", "0") == "0":  # once, not per torchrun rank
            ignored = sorted(given(args) - {"out", "resume", "quiet", "verb"})
            if ignored:
                print(f"note: a resumed run keeps its saved config; ignoring "
                      f"{', '.join('--' + k.split('.')[-1].replace('_', '-') for k in ignored)}",
                      file=sys.stderr)
        summary = train_run(cfg, progress=progress)

        main_rank = dist.is_main()
        shutdown()  # no collectives after training (rank 0 evaluates alone)
        if not main_rank:  # data-parallel rank > 0: rank 0 reports
            return 0
        used = summary.config or cfg  # a resumed run reports the config it was trained with
        # the saved width: a greedy family (itda) sets its own d_sae
        d_sae = read_metadata(summary.run_dir / "sae").get("d_sae", used.sae.d_sae)
        print(summary_table(summary.metrics,
                            title=f"\n{used.sae.architecture} SAE, d_sae {d_sae} — held-out eval"))
        print(f"\nrun folder: {summary.run_dir}  (SAE in {summary.run_dir / 'sae'}, "
              f"metrics.json, metrics.jsonl, feature_density.png)")
        return 0
    if args.verb == "harvest":
        cfg = build(HarvestConfig, args)
        cfg.validate()
        if cfg.nproc > 1 and not launched_by_torchrun():
            return relaunch(_ARGV, cfg.nproc)
        init_from_env(cfg.model.device)
        try:
            stores = harvest_hooks(cfg, progress=progress)
        finally:
            main_rank = dist.is_main()
            shutdown()
        if main_rank:
            for store in stores.values():
                print(f"store: {store.path}  rows {store.num_rows:,}  d_in {store.d_in}  "
                      f"hook {store.hook}  model {store.model}")
        return 0
    if args.verb == "export-store":
        out = export_saelens(args.store, args.export_out, progress=progress)
        print(f"wrote {out} ({args.export_format} layout)")
        return 0
    if args.verb == "eval":
        ecfg = build(EvalConfig, args)
        ecfg.validate()

        names = parse_evals(args.evals, skip_ce=args.skip_ce)
        metrics = evaluate_run(Path(args.run), ecfg, skip_ce=args.skip_ce, progress=progress,
                               evals=names, encoder=args.encoder)
        print(summary_table(metrics, title=f"held-out eval of {args.run}"))
        print(json.dumps({k: metrics[k] for k in ("l0", "fvu") if k in metrics}))
        return 0
    if args.verb == "sweep":
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
        cfg = build(SynthConfig, args)
        cfg.validate()
        res = run_synth(cfg, progress=progress)
        print(synth_table(res))
        print(f"\nresults: {res.path}")
        return 1 if res.failed else 0
    if args.verb in ("dashboard", "report", "steer"):
        return _dispatch_view(args, progress)
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
