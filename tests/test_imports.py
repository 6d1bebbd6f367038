"""Import layering of saelab (docs/architecture.md, "Layering"), checked by parsing the source.

Every ``import`` / ``from ... import`` under ``src/saelab`` is read with :mod:`ast`, at module
level and inside functions, relative forms resolved. Three rules, all violations reported at once:

(a) no import cycle between saelab modules (and none between the top-level components, e.g.
    ``saes`` ↔ ``data``);
(b) no import that goes *up* the layers of :data:`LAYERS`;
(c) no function-level import of a saelab module or of a light package: deferring an import is
    allowed only for the heavy optional packages of :data:`LAZY_OK`, and each such line carries
    its reason as a trailing comment or a comment on the line above. The package ``__init__``
    is the one exception for saelab modules (it re-exports the API lazily so ``import saelab``
    stays light), again with a reason comment.

``if TYPE_CHECKING:`` imports never run, so they cannot close an import cycle and are left out of
rule (a); they still count for rule (b) (a type dependency on a higher layer is still a
dependency) and are flagged "type-only" there. Imports done by name at run time
(``importlib.import_module``, the registries' auto-discovery) are not seen by the parser; the
registries only import downward (a package's own plug-in modules).
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "saelab"

#: layer of each top-level component (first name after ``saelab.``); "" is the package __init__.
#: A module may import its own layer or lower ones, never a higher one.
LAYERS: dict[str, int] = {
    # 0: foundations, no saelab dependency beyond each other
    # (dist: torch.distributed helpers; locks: advisory file locks; runtime: device/env checks;
    # plotting: headless matplotlib, loaded on use, for every layer that draws)
    "errors": 0, "fsutil": 0, "dtypes": 0, "config": 0, "runtime": 0, "dist": 0, "locks": 0,
    "plotting": 0,
    "plugins": 0,
    # 1: the three kinds of things saelab handles: models, activations, SAEs (+ their file format)
    "models": 1, "data": 1, "saes": 1, "io": 1,
    # 2: the stages: harvest activations (LM -> store), train, evaluate, analyse. harvest needs
    # only models and data, and evals (g-SAE splice) and analyses call it
    "harvest": 2, "train": 2, "evals": 2, "analysis": 2,
    # 3: jobs that compose the stages (steer: `saelab steer`, uses evals and report.dashboard)
    "pipeline": 3, "runfolder": 3, "sweep": 3, "report": 3, "synth": 3, "steer": 3,
    # 4: entry points (cliargs builds argparse from the config and family registries, for cli)
    "cli": 4, "cliargs": 4, "": 4, "__main__": 4,
}

#: heavy or optional third-party packages whose import may be deferred into a function
LAZY_OK = frozenset({
    "matplotlib", "transformers", "datasets", "wandb", "scipy", "selenium", "gguf",
    "accelerate", "huggingface_hub", "sae_lens", "sparsify", "pandas", "sklearn", "plotly",
})

#: saelab modules allowed to import saelab modules inside functions (with a reason comment)
LAZY_SAELAB_OK = frozenset({"saelab"})


@dataclass(frozen=True)
class Imp:
    importer: str  # dotted module name, e.g. "saelab.saes.topk"
    target: str  # dotted name: a saelab module, or the top-level name of another package
    line: int
    in_function: bool
    type_only: bool
    has_reason: bool
    path: Path

    def internal(self, package: str) -> bool:
        return self.target == package or self.target.startswith(package + ".")

    def where(self) -> str:
        """``pkg/sub/mod.py:LINE``."""
        parts = self.importer.split(".")
        rel = "/".join(parts) + ("/__init__.py" if self.path.name == "__init__.py" else ".py")
        return f"{rel}:{self.line}"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the package folder ``root``."""
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*.py")):
        parts = [package, *p.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _comment_lines(source: str) -> tuple[set[int], set[int]]:
    """(lines holding a comment, lines that are only a comment)."""
    with_comment: set[int] = set()
    only_comment: set[int] = set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            with_comment.add(row)
            if lines[row - 1].lstrip().startswith("#"):
                only_comment.add(row)
    return with_comment, only_comment


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def collect_imports(root: Path, package: str) -> list[Imp]:
    """Every import statement of every module of ``package`` (folder ``root``)."""
    modules = module_names(root, package)
    found: list[Imp] = []
    for name, path in modules.items():
        found += _file_imports(name, path, modules, package)
    return found


def _file_imports(name: str, path: Path, modules: dict[str, Path], package: str) -> list[Imp]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    with_comment, only_comment = _comment_lines(source)
    # the package a relative import is relative to
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[Imp] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = here[: len(here) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    visit_one(sub, fn, True)
                for sub in child.orelse:
                    visit_one(sub, fn, type_only)
                continue
            visit_one(child, fn, type_only)

    def visit_one(child: ast.AST, fn: bool, type_only: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            end = child.end_lineno or child.lineno
            reason = any(r in with_comment for r in range(child.lineno, end + 1)) or (
                child.lineno - 1 in only_comment)
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            else:
                mod = resolve(child)
                # `from pkg import sub` imports the module pkg.sub; `from pkg.m import f` pkg.m
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                           for a in child.names]
            for t in dict.fromkeys(targets):
                if not (t == package or t.startswith(package + ".")):
                    t = t.split(".")[0]
                else:  # `import pkg.m.Name`-style dotted names: trim to the module
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                found.append(Imp(name, t, child.lineno, fn, type_only, reason, path))
        visit(child, fn, type_only)

    visit(tree, False, False)
    return found


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # recursion depth ≤ number of modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in sccs:
        members = set(comp)
        start = comp[0]
        # BFS from start back to start inside the component
        prev: dict[str, str] = {}
        frontier = [start]
        done = False
        while frontier and not done:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w not in members:
                        continue
                    if w == start:
                        path = [v]
                        while path[-1] != start:
                            path.append(prev[path[-1]])
                        cycles.append([start, *reversed(path[:-1]), start])
                        done = True
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if done:
                    break
            frontier = nxt
    return cycles


def check(root: Path, package: str = "saelab", layers: dict[str, int] | None = None,
          lazy_ok: frozenset[str] = LAZY_OK,
          lazy_saelab_ok: frozenset[str] = LAZY_SAELAB_OK) -> dict[str, list[str]]:
    """All violations of the three rules, by kind: "cycle", "upward", "function-level"."""
    layers = LAYERS if layers is None else layers
    imps = collect_imports(root, package)
    internal = [i for i in imps if i.internal(package) and i.target != i.importer]
    out: dict[str, list[str]] = {"cycle": [], "upward": [], "function-level": []}

    graph: dict[str, set[str]] = {}
    for i in internal:
        if not i.type_only:
            graph.setdefault(i.importer, set()).add(i.target)
    for cyc in _cycles(graph):
        out["cycle"].append("module cycle: " + " -> ".join(cyc))
    comp_graph: dict[str, set[str]] = {}
    for i in internal:
        if i.type_only:
            continue
        a, b = component(i.importer), component(i.target)
        if a != b and a and b:  # the package __init__ is the top, not a component
            comp_graph.setdefault(a, set()).add(b)
    for cyc in _cycles(comp_graph):
        out["cycle"].append("component cycle: " + " -> ".join(cyc))

    for i in internal:
        a, b = component(i.importer), component(i.target)
        la, lb = layers.get(a), layers.get(b)
        if la is None or lb is None:
            missing = a if la is None else b
            out["upward"].append(f"{i.where()}: component {missing!r} has no layer in LAYERS")
        elif lb > la:
            tag = " (type-only)" if i.type_only else ""
            out["upward"].append(f"{i.where()}: {i.importer} (layer {la}) imports {i.target} "
                                 f"(layer {lb}){tag}")

    for i in imps:
        if not i.in_function:
            continue
        if i.internal(package):
            if i.importer in lazy_saelab_ok and i.has_reason:
                continue
            out["function-level"].append(f"{i.where()}: {i.importer} imports {package} module "
                                         f"{i.target} inside a function")
        elif i.target not in lazy_ok:
            out["function-level"].append(f"{i.where()}: {i.importer} imports {i.target} inside a "
                                         f"function (not a heavy optional package: import it at "
                                         f"the top)")
        elif not i.has_reason:
            out["function-level"].append(f"{i.where()}: {i.importer} defers {i.target} without a "
                                         f"'# reason' comment")
    for k in out:
        out[k] = list(dict.fromkeys(out[k]))
    return out


def report(violations: dict[str, list[str]]) -> str:
    counts = ", ".join(f"{len(v)} {k}" for k, v in violations.items())
    lines = [f"import rules violated: {counts}"]
    for kind, items in violations.items():
        lines += [f"[{kind}] {m}" for m in items]
    return "\n".join(lines)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


# ---- the checker itself, on planted packages ----------------------------------------------------

PLANT_LAYERS = {"low": 0, "a": 1, "b": 1, "high": 2, "": 3}


def test_planted_function_level_cycle_is_reported(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b  # reason\n    return b\n",
        "b.py": "def g():\n    from . import a\n    return a\n",
    })
    v = check(root, "pkg", PLANT_LAYERS)
    assert any(m.startswith("module cycle: ") and "pkg.a" in m and "pkg.b" in m
               for m in v["cycle"]), v
    cyc = next(m for m in v["cycle"] if m.startswith("module cycle"))
    path = cyc.split(": ", 1)[1].split(" -> ")
    assert path[0] == path[-1] and set(path) == {"pkg.a", "pkg.b"}
    # both deferred saelab-internal imports are also function-level violations
    assert len(v["function-level"]) == 2, v
    assert not v["upward"]


def test_planted_three_module_cycle_relative_and_absolute(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "import pkg.sub.c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import b\n",
        "b.py": "from pkg.a import thing\n",
    })
    v = check(root, "pkg", {**PLANT_LAYERS, "sub": 1})
    mods = [m for m in v["cycle"] if m.startswith("module cycle")]
    assert mods == ["module cycle: pkg.a -> pkg.sub.c -> pkg.b -> pkg.a"], v


def test_planted_upward_import_is_reported(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "low.py": "import os\nfrom pkg.high import helper\n",
        "high.py": "from pkg import low\n",
    })
    v = check(root, "pkg", PLANT_LAYERS)
    assert v["upward"] == ["pkg/low.py:2: pkg.low (layer 0) imports pkg.high (layer 2)"], v
    assert v["cycle"], "low <-> high is also a cycle"


def test_planted_type_only_upward_import_and_unknown_component(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "low.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from pkg.high import T\n"),
        "high.py": "",
        "stray.py": "import pkg.low\n",
    })
    v = check(root, "pkg", PLANT_LAYERS)
    assert "pkg/low.py:3: pkg.low (layer 0) imports pkg.high (layer 2) (type-only)" in v["upward"]
    assert any("'stray' has no layer" in m for m in v["upward"]), v


def test_type_only_back_edge_is_not_a_cycle(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg.b import B\n",
        "b.py": ("from __future__ import annotations\nimport typing\n"
                 "if typing.TYPE_CHECKING:\n    from pkg.a import A\n"),
    })
    assert check(root, "pkg", PLANT_LAYERS)["cycle"] == []
    # the same import at run time closes the cycle
    (root / "b.py").write_text("from pkg.a import A\n")
    assert check(root, "pkg", PLANT_LAYERS)["cycle"] == [
        "module cycle: pkg.a -> pkg.b -> pkg.a", "component cycle: a -> b -> a"]


def test_function_level_rules(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "def api():\n    from pkg.a import x  # keep `import pkg` light\n",
        "a.py": (
            "import json\n"
            "def ok():\n    import matplotlib.pyplot as plt  # heavy, only for plots\n"
            "def ok_above():\n    # scipy is only needed for the matching\n"
            "    from scipy.optimize import linear_sum_assignment\n"
            "def no_reason():\n    import wandb\n"
            "def light():\n    import numpy  # reason given, still not allowed\n"
            "class C:\n    import math\n"  # class bodies run at import time: module level
        ),
    })
    v = check(root, "pkg", PLANT_LAYERS, lazy_saelab_ok=frozenset({"pkg"}))
    assert v["function-level"] == [
        "pkg/a.py:8: pkg.a defers wandb without a '# reason' comment",
        "pkg/a.py:10: pkg.a imports numpy inside a function (not a heavy optional package: import "
        "it at the top)",
    ], v
    assert not v["cycle"] and not v["upward"]


def test_clean_planted_package_passes(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.high import api\n",
        "low.py": "import os\n",
        "a.py": "from pkg import low\nfrom . import b\n",
        "b.py": "from pkg.low import x\n",
        "high.py": "from pkg.a import y\n",
    })
    assert check(root, "pkg", PLANT_LAYERS) == {"cycle": [], "upward": [], "function-level": []}


# ---- the real tree ----------------------------------------------------------------------------


def test_every_component_has_a_layer():
    comps = {component(m) for m in module_names(SRC, "saelab")}
    assert comps <= set(LAYERS), f"give these a layer in LAYERS: {sorted(comps - set(LAYERS))}"


def test_saelab_import_layering():
    v = check(SRC)
    assert not any(v.values()), report(v)
