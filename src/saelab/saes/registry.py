"""Name → SAE family. Every family module registers itself on import."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saelab.saes.base import SAE

_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make ``cls`` available under ``cls.architecture``."""
    name = cls.architecture
    if not name:
        raise TypeError(f"{cls.__name__} has no architecture name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"architecture {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


#: modules of saelab.saes that hold shared parts, not families
_NOT_FAMILIES = {"base", "registry", "sparse"}


def _load_families() -> None:
    """Import every family module of ``saelab.saes`` (one file per family registers itself).

    Lazy, so `saelab.config` can validate names without an import cycle."""
    import importlib
    import pkgutil

    import saelab.saes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name not in _NOT_FAMILIES:
            importlib.import_module(f"saelab.saes.{mod.name}")


def architectures(trainable_only: bool = False) -> dict[str, type[SAE]]:
    _load_families()
    return {k: v for k, v in _REGISTRY.items() if v.trainable or not trainable_only}


def get_family(name: str) -> type[SAE]:
    from saelab.errors import ConfigError

    families = architectures()
    if name not in families:
        raise ConfigError(
            f"unknown architecture {name!r}: choose one of {', '.join(sorted(families))}"
        )
    return families[name]


def build_sae(cfg, device=None, dtype=None, generator=None) -> SAE:
    """Build and initialise an SAE of ``cfg.architecture``."""
    import torch

    cls = get_family(cfg.architecture)
    sae = cls(cfg, device=device, dtype=dtype or torch.float32)
    sae.reset_parameters(generator)
    return sae
