"""Name → SAE family, and what needs every family: their options, config validation, configs
rebuilt from saved dicts (both cfg.json / run_config.json layouts) and CLI parsing helpers.

Every family module (``saes/<arch>.py``) registers itself on import; modules whose name starts
with ``_`` and the shared modules below hold shared parts, not families.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import TYPE_CHECKING, Any

import saelab.saes as pkg
from saelab.config import SAEConfig, from_dict
from saelab.errors import ConfigError
from saelab.plugins import import_plugins

if TYPE_CHECKING:
    import torch

    from saelab.saes.base import SAE

_REGISTRY: dict[str, type[SAE]] = {}

#: modules of saelab.saes that hold shared parts, not families (besides ``_*`` modules)
_NOT_FAMILIES = {"base", "registry", "sparse"}

#: the option groups of SAEConfig in format 1 (cfg.json ``saelab.format_version`` 1 and
#: run_config.json before it): every group was stored for every family
_V1_GROUPS = ("topk", "jumprelu", "choice", "matryoshka", "afa", "vsae", "gba", "gsae")


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make ``cls`` available under ``cls.architecture``."""
    name = cls.architecture
    if not name:
        raise TypeError(f"{cls.__name__} has no architecture name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"architecture {name!r} registered twice")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[name] = cls
    return cls


def _load_families() -> None:
    """Import every family module of ``saelab.saes`` (one file per family registers itself).

    Lazy, at first use: the family modules import this one (for ``register``)."""
    import_plugins(pkg, skip=_NOT_FAMILIES)


def architectures(trainable_only: bool = False) -> dict[str, type[SAE]]:
    _load_families()
    return {k: v for k, v in _REGISTRY.items() if v.trainable or not trainable_only}


def get_family(name: str) -> type[SAE]:
    families = architectures()
    if name not in families:
        raise ConfigError(
            f"unknown architecture {name!r}: choose one of {', '.join(sorted(families))}"
        )
    return families[name]


def build_sae(cfg: SAEConfig, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> SAE:
    """Build and initialise an SAE of ``cfg.architecture``."""
    cls = get_family(cfg.architecture)
    kw = {} if dtype is None else {"dtype": dtype}
    sae = cls(cfg, device=device, **kw)
    sae.reset_parameters(generator)
    return sae


def family_file(cls: type) -> str:
    """The file of ``cls`` relative to the saelab package, e.g. ``saes/topk.py``."""
    return cls.__module__.removeprefix("saelab.").replace(".", "/") + ".py"


# ---- family options ---------------------------------------------------------------------------
def option_flag(f: dataclasses.Field) -> str:
    """The CLI flag of an options field (``flag`` metadata, else the field name)."""
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def option_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every family option by field name: (its field, the families that have it, sorted).

    A name means one option everywhere: families sharing a name share the field (usually
    through a shared options base class), so the CLI shows each flag once."""
    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, cls in sorted(architectures().items()):
        for f in dataclasses.fields(cls.Options):
            if f.name in out:
                first = out[f.name][0]
                if option_flag(first) != option_flag(f):
                    raise TypeError(f"option {f.name!r} of {name} has flag {option_flag(f)}, "
                                    f"another family's has {option_flag(first)}")
                out[f.name][1].append(name)
            else:
                out[f.name] = (f, [name])
    return out


def option_classes() -> list[tuple[type, list[dataclasses.Field]]]:
    """Options classes of all families with the fields each declares itself (inherited ones
    belong to the base class), bases first; classes that declare no field are left out."""
    seen: set[type] = set()
    names: set[str] = set()
    out: list[tuple[type, list[dataclasses.Field]]] = []
    for _, cls in sorted(architectures().items()):
        for klass in reversed(cls.Options.__mro__):
            if klass in seen or not dataclasses.is_dataclass(klass):
                continue
            seen.add(klass)
            own = [f for f in dataclasses.fields(klass) if f.name not in names]
            names.update(f.name for f in own)
            if own:
                out.append((klass, own))
    return out


def unknown_options_error(family: str, names: list[str]) -> ConfigError:
    """ConfigError for options ``names`` given to ``family``, which lacks them."""
    owners = option_fields()
    parts = []
    for name in names:
        if name in owners:
            f, fams = owners[name]
            parts.append(f"{option_flag(f)} is not an option of {family} (it belongs to "
                         f"{', '.join(fams)})")
        else:
            parts.append(f"{name!r} is not an option of {family} (no family has it)")
    return ConfigError("; ".join(parts) + ": drop it or pick a family that has it")


def with_family(cfg: SAEConfig, architecture: str | None = None, *,
                strict: bool = True) -> SAEConfig:
    """A copy of ``cfg`` for family ``architecture`` (default: ``cfg.architecture``) whose
    ``options`` is an instance of that family's options class, built from ``cfg.options``
    (None, a dict of given values or an options instance). ``strict=False`` drops the values
    the family has no field for (``saelab sweep``: shared flags apply where they exist)."""
    name = architecture or cfg.architecture
    cls = get_family(name)
    out = copy.deepcopy(cfg)
    out.architecture = name
    out.options = cls.make_options(cfg.options, strict=strict)
    return out


def validate_sae_config(cfg: SAEConfig) -> SAEConfig:
    """Everything about ``cfg`` that needs the registry, after ``cfg.validate()`` (the shared
    fields): the family exists, ``cfg.options`` becomes (in place) an instance of its options
    class (a value it lacks is an error), the options' own ``validate()`` and the family's
    ``validate_config`` (e.g. ``k <= d_sae``). Returns ``cfg``."""
    cls = get_family(cfg.architecture)
    cfg.validate()
    cfg.options = cls.make_options(cfg.options, strict=True)
    if hasattr(cfg.options, "validate"):
        cfg.options.validate()
    cls.validate_config(cfg)
    return cfg


def check_shared_options(options: Any, families: list[str]) -> None:
    """``saelab sweep``: every option value in ``options`` (a dict) must belong to at least
    one of ``families``."""
    if not isinstance(options, dict) or not options:
        return
    owners = option_fields()
    for name in options:
        f, fams = owners.get(name, (None, []))
        if not set(fams) & set(families):
            flag = option_flag(f) if f is not None else repr(name)
            where = f" (it belongs to {', '.join(fams)})" if fams else ""
            raise ConfigError(f"{flag} is not an option of any family in --arch "
                              f"({', '.join(families)}){where}: drop it or add such a family")


# ---- configs from saved dicts (format 1 and 2) -----------------------------------------------
def sae_config_from_dict(data: dict[str, Any], *, strict: bool = False) -> SAEConfig:
    """Rebuild an SAEConfig from ``dataclasses.asdict`` output of any format: format 2 has the
    family's options under ``options``; format 1 has every family's option group (``topk``,
    ``jumprelu``, ...), mapped here to the family's options by field name. Unknown keys (from
    newer versions) are ignored; ``strict`` makes an option the family lacks an error."""
    data = dict(data)
    options = data.get("options")
    old = {g: data.pop(g) for g in _V1_GROUPS if isinstance(data.get(g), dict)}
    cfg = from_dict(SAEConfig, data)
    cls = get_family(cfg.architecture)
    if options is None and old:
        names = {f.name for f in dataclasses.fields(cls.Options)}
        # field names are unique across the format-1 groups, so the flat merge is exact
        flat = {k: v for group in old.values() for k, v in group.items()}
        options = {k: v for k, v in flat.items() if k in names}
    cfg.options = cls.make_options(options, strict=strict)
    return cfg


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild config dataclass ``cls`` (RunConfig, SweepConfig, SAEConfig, ...) from a saved
    dict of any format: like :func:`saelab.config.from_dict`, but every SAEConfig field gets
    its family's options (see :func:`sae_config_from_dict`)."""
    if issubclass(cls, SAEConfig):
        sae = sae_config_from_dict(data)
        return sae if cls is SAEConfig else cls(**{f.name: getattr(sae, f.name)
                                                   for f in dataclasses.fields(sae)})
    obj = from_dict(cls, data)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if (isinstance(hint, type) and issubclass(hint, SAEConfig)
                and isinstance(data.get(f.name), dict)):
            setattr(obj, f.name, config_from_dict(hint, data[f.name]))
    return obj


# ---- CLI parsing helpers ------------------------------------------------------------------------
def parse_arch_list(text: str) -> list[str]:
    """``--arch A,B`` -> ["A", "B"] in the order given (deduplicated); 'all' -> every trainable
    family, sorted."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if names == ["all"]:
        return sorted(architectures(trainable_only=True))
    if not names:
        raise ConfigError("--arch is empty: give family names or 'all'")
    return list(dict.fromkeys(names))


def check_trainable(names: list[str]) -> None:
    """Every name in ``names`` is a trainable family (for ``--arch`` lists)."""
    trainable = architectures(trainable_only=True)
    for name in names:
        if name not in trainable:
            raise ConfigError(f"unknown or untrainable architecture {name!r} in --arch: "
                              f"choose from all, {', '.join(sorted(trainable))}")


def resolve_families(archs: str, levels: list[str], *, many: bool
                     ) -> tuple[list[str], dict[str, list[float]]]:
    """``--arch`` text and ``--levels`` items -> (trainable families, {family: levels}).

    ``many`` (``saelab sweep``): several levels per family, each named family must be in
    --arch; otherwise (``saelab synth``) one level per family, any trainable family."""
    trainable = architectures(trainable_only=True)
    families = parse_arch_list(archs)
    check_trainable(families)
    overrides = parse_levels(levels, many=many)
    for name in overrides:
        if many and name not in families:
            raise ConfigError(f"--levels names {name!r}, which is not in --arch "
                              f"({', '.join(families)})")
        if not many and name not in trainable:
            raise ConfigError(f"--levels names {name!r}, not a trainable family")
    return families, overrides


def parse_levels(items: list[str], many: bool) -> dict[str, list[float]]:
    """``--levels FAMILY=V1,V2`` items -> {family: [values]}; a family given twice keeps its
    last entry. ``many=False`` allows one value per family."""
    shape = "FAMILY=NUMBER,NUMBER,..." if many else "FAMILY=NUMBER (one level per family)"
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = str(item).partition("=")
        try:
            parsed = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            parsed = []
        if (not sep or not name.strip() or not parsed or not all(map(math.isfinite, parsed))
                or (not many and len(parsed) > 1)):
            raise ConfigError(f"--levels {item!r} is not {shape}")
        out[name.strip()] = parsed
    return out


def set_dotted(cfg: Any, path: str, value: Any) -> Any:
    """Set the (nested) dataclass field ``path`` (e.g. ``options.k``, ``l1_coefficient``);
    a whole number given to an int field becomes an int, a number given to a float field a
    float (also where the default is None). Returns the value set."""
    *parents, name = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p, None)
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"no config field {path!r}")
    hint = typing.get_type_hints(type(obj))[name]
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if base[0] is int and isinstance(value, float):
        if value != int(value):
            raise ConfigError(f"--levels: {path} takes whole numbers, got {value:g}")
        value = int(value)
    elif base[0] is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    setattr(obj, name, value)
    return value


def get_dotted(cfg: Any, path: str) -> Any:
    """The value at dotted path ``path`` (None where a part is missing)."""
    obj = cfg
    for p in path.split("."):
        obj = getattr(obj, p, None)
    return obj
