"""dsd: Diverse Score Distillation experiment runner."""

__version__ = "0.1.0"
