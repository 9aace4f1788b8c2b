"""Guidance methods, one module each; each registers itself with `dsd.registry.register`."""

from dsd.guidance.base import Guidance, GuidanceContext

__all__ = ["Guidance", "GuidanceContext"]
