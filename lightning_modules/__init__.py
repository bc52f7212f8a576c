"""Lightning glue: thin modules that call the framework-free core in :mod:`robustx`."""

from .robust_classifier import RobustClassifier

__all__ = ["RobustClassifier"]
