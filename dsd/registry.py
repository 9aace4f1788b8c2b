"""Name -> (class, config dataclass) registries for the config groups.

Adding a method is one module (decorated with `register`) plus one yaml in dsd/conf/<group>/;
`load_all` imports every module of the group packages so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from hydra.core.config_store import ConfigStore

GROUPS = ("guidance", "prior", "representation")
_REGISTRY: dict[str, dict[str, tuple[type, type]]] = {g: {} for g in GROUPS}


def register(group: str, name: str, config_cls: type):
    """Class decorator: make `cls` buildable as `<group>=<name>` with typed config `config_cls`."""

    def decorate(cls: type) -> type:
        _REGISTRY[group][name] = (cls, config_cls)
        # The yaml in dsd/conf/<group>/<name>.yaml starts from this schema, so unknown keys and
        # wrong types are rejected by OmegaConf at composition time.
        ConfigStore.instance().store(group=f"schema/{group}", name=name, node=config_cls)
        return cls

    return decorate


def names(group: str) -> list[str]:
    return sorted(_REGISTRY[group])


def lookup(group: str, name: str) -> type:
    """The class registered as `<group>=<name>`."""
    from dsd.errors import UserError

    try:
        return _REGISTRY[group][name][0]
    except KeyError:
        raise UserError(
            f"{group}.name={name!r} is not a known {group}; accepted: {', '.join(names(group))}."
        ) from None


def build(group: str, cfg: Any, **kwargs: Any) -> Any:
    return lookup(group, cfg.name)(cfg, **kwargs)


def load_all() -> None:
    """Import every module of the group packages (each registers itself)."""
    for package_name in ("dsd.priors", "dsd.guidance", "dsd.representations"):
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
