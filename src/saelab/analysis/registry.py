"""Analyses as plug-ins, in the shape of an eval: a typed config, a typed output and ``run``.

An analysis module registers itself at import with :func:`register_analysis`; every public
module of ``saelab.analysis`` is imported by :func:`analyses`, and the CLI builds one verb per
analysis (``saelab <verb> [RUN ...] --out DIR [config flags]``) from the config dataclass, whose
field help becomes the CLI help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import saelab.analysis as _pkg
from saelab.errors import ConfigError
from saelab.plugins import import_plugins


@dataclass(frozen=True)
class Analysis:
    """One registered analysis.

    ``run(cfg, runs, out, progress)`` takes the built config, the positional paths (run or SAE
    folders; empty when ``positional`` is None), the output folder, and whether to show
    progress bars; it writes its files under ``out`` and returns an ``output`` instance.
    ``summary(output)`` is what the CLI prints (a table of the headline numbers).
    """

    verb: str
    config: type
    output: type
    run: Callable[[Any, list[Path], Path, bool], Any]
    summary: Callable[[Any], str]
    help: str
    #: metavar of the positional paths, e.g. "RUN" (one or more); None: the verb takes none
    positional: str | None = "RUN"


_REGISTRY: dict[str, Analysis] = {}


def register_analysis(analysis: Analysis) -> Analysis:
    if not (dataclasses.is_dataclass(analysis.config) and dataclasses.is_dataclass(analysis.output)):
        raise TypeError(f"analysis {analysis.verb!r}: config and output must be dataclasses")
    if analysis.verb in _REGISTRY and _REGISTRY[analysis.verb] != analysis:
        raise TypeError(f"analysis {analysis.verb!r} registered twice")
    _REGISTRY[analysis.verb] = analysis
    return analysis


def analyses() -> dict[str, Analysis]:
    import_plugins(_pkg, skip={"registry"})
    return dict(sorted(_REGISTRY.items()))


def get_analysis(verb: str) -> Analysis:
    found = analyses()
    if verb not in found:
        raise ConfigError(f"unknown analysis {verb!r}: choose one of {', '.join(found) or 'none'}")
    return found[verb]
