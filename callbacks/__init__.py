"""Lightning callbacks: robustness evaluation during training."""

from .ara_evaluation import ARAEvaluation
from .time_budget import TimeBudget

__all__ = ["ARAEvaluation", "TimeBudget"]
