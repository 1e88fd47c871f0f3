"""The training engine: Kohya datasets, caching, LoRA steps, samples, saves, stop/resume.

    run_training(config, *, bundle=None, on_event=None, stop=None) -> TrainResult
    plan_training(config) -> TrainingPlan
"""

from .engine import run_training
from .events import ProgressEvent, TrainingPlan, TrainResult
from .planning import plan_training
from .usermeta import write_user_metadata

__all__ = ["ProgressEvent", "TrainResult", "TrainingPlan", "plan_training", "run_training", "write_user_metadata"]
