"""Optimizable representations; each module registers itself with `dsd.registry.register`."""

from dsd.representations.base import Representation

__all__ = ["Representation"]
