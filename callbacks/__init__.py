"""Lightning callbacks: robustness evaluation during training."""

from .ara_evaluation import ARAEvaluation

__all__ = ["ARAEvaluation"]
