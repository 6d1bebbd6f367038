"""Build argparse options from config dataclasses, so field help is the CLI help."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


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
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def given(namespace: argparse.Namespace) -> set[str]:
    """Dotted names of the options the user actually passed."""
    return set(vars(namespace))
