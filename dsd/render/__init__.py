"""Differentiable renderers: functions on tensors used by the 3D representations and priors."""

from dsd.render.gaussians import render_gaussians, viewmats_opencv

__all__ = ["render_gaussians", "viewmats_opencv"]
