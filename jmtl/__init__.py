"""jmtl: multi-task learning for JAX."""

from jmtl import checks
from jmtl import cotrain
from jmtl import data
from jmtl import grads
from jmtl import losses
from jmtl import metrics
from jmtl import models
from jmtl import parallel
from jmtl import relations
from jmtl import sharing
from jmtl import tasks
from jmtl import weighting
from jmtl.checks import checked
from jmtl.tasks import Task
from jmtl.train import StepMetrics
from jmtl.train import TrainState
from jmtl.train import compute_metrics
from jmtl.train import evaluate
from jmtl.train import make_eval_step
from jmtl.train import make_train_step

__version__ = "0.1.0"

__all__ = [
  "StepMetrics",
  "Task",
  "TrainState",
  "checked",
  "checks",
  "compute_metrics",
  "cotrain",
  "data",
  "evaluate",
  "grads",
  "losses",
  "make_eval_step",
  "make_train_step",
  "metrics",
  "models",
  "parallel",
  "relations",
  "sharing",
  "tasks",
  "weighting",
]
