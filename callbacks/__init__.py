"""Lightning callbacks: robustness evaluation during training."""

from .ara_evaluation import ARAEvaluation
from .interrupt_checkpoint import InterruptCheckpoint
from .time_budget import TimeBudget

__all__ = ["ARAEvaluation", "InterruptCheckpoint", "TimeBudget"]
