"""Diffusion priors. Each module registers itself with `dsd.registry.register("prior", ...)`."""

from dsd.priors.base import Condition, Prior

__all__ = ["Condition", "Prior"]
