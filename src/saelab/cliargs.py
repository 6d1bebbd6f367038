"""Build argparse options from config dataclasses, so field help is the CLI help.

A field marked ``family_options`` (``SAEConfig.options``) becomes one help group per family
options class of the registry (each flag once, even where several families share it); its
parsed values come back as a dict, which ``saelab.saes.registry.validate_sae_config`` (or
``with_family``) turns into the chosen family's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from saelab.saes.registry import architectures, option_classes


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       skip: tuple[str, ...] = (), root: argparse.ArgumentParser | None = None
                       ) -> None:
    """Add one option per leaf field of (possibly nested) dataclass ``cls``.

    Nested dataclasses are flattened into one help group each (groups hang off ``root``:
    argparse deprecates groups inside groups); ``dest`` is the dotted path so ``build`` can
    rebuild them.
    """
    root = root or parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if path in skip:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            title = " ".join(hint.__doc__.split("\n\n")[0].split()) if hint.__doc__ else f.name
            group = root.add_argument_group(title)
            add_dataclass_args(group, hint, prefix=f"{path}.", skip=skip, root=root)  # type: ignore[arg-type]
            continue
        if f.metadata.get("family_options"):
            _add_family_options(root, prefix=f"{path}.")
            continue
        _add_leaf(parser, f, hint, path)


def _title(cls: type, fallback: str) -> str:
    return " ".join(cls.__doc__.split("\n\n")[0].split()) if cls.__doc__ else fallback


def _add_family_options(root: argparse.ArgumentParser, prefix: str) -> None:
    """One group per family options class; dest ``<prefix><field>``."""
    for klass, own in option_classes():
        owners = sorted(n for n, c in architectures().items() if issubclass(c.Options, klass))
        group = root.add_argument_group(
            f"options of {', '.join(owners)}: {_title(klass, klass.__name__).rstrip('.')}")
        hints = typing.get_type_hints(klass)
        for f in own:
            _add_leaf(group, f, hints[f.name], f"{prefix}{f.name}")  # type: ignore[arg-type]


def _add_leaf(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, path: str
              ) -> None:
    flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
    help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
    default = f.default
    kw: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS}
    base = _base_type(hint)
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
        kw["help"] = f"{help_text} (default: {default})"
    elif typing.get_origin(hint) is list:  # a repeatable flag
        kw.update(action="append", metavar=f.metadata.get("metavar") or "STR", help=help_text)
    else:
        kw["type"] = base if base in (int, float, str) else str
        kw["metavar"] = base.__name__.upper() if base in (int, float) else "STR"
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        shown = "family default" if default is None else default
        kw["help"] = f"{help_text} (default: {shown})"
    parser.add_argument(flag, **kw)


def build(cls: type, namespace: argparse.Namespace, prefix: str = "") -> Any:
    """Instantiate ``cls`` from parsed args, using field defaults for options not given."""
    hints = typing.get_type_hints(cls)
    values = vars(namespace)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = build(hint, namespace, prefix=f"{path}.")  # type: ignore[arg-type]
        elif f.metadata.get("family_options"):
            # the values given; the chosen family's options class is applied by the registry
            kwargs[f.name] = {k[len(path) + 1:]: v for k, v in values.items()
                              if k.startswith(f"{path}.")}
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def given(namespace: argparse.Namespace) -> set[str]:
    """Dotted names of the options the user actually passed."""
    return set(vars(namespace))
