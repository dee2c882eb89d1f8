"""The experiment runner behind the ``jmtl`` command: configs, training loop, checkpoints, logs, baselines, plots.

Everything below it (the train step, the gradient engine, the weightings,
the models) is pure functions of arrays; the runner is what reads configs,
writes workdirs (checkpoints, logs, plots, results), prints and times -- the
dataset builders of :mod:`jmtl.data` are the one other writer, preparing
datasets on disk (``docs/design.md``, "Layers" and "The runner"). The commands
are functions too::

  from jmtl import run
  config = run.load_config("configs/synthetic.py")
  results = run.train(config, "/tmp/syn")          # prints the table; returns results.json's content

See :mod:`jmtl.run.cli` for the command line and :mod:`jmtl.run.workdir` for
the files a run writes.
"""

from jmtl.run.config import ConfigError
from jmtl.run.config import apply_overrides
from jmtl.run.config import load_config
from jmtl.run.experiment import evaluate_workdir
from jmtl.run.experiment import report_workdir
from jmtl.run.experiment import train
from jmtl.run.experiment import train_baselines
from jmtl.run.grouping import group
from jmtl.run.loop import Interrupted
from jmtl.run.loop import TooManySkipped
from jmtl.run.loop import create_train_state
from jmtl.run.loop import train_and_evaluate
from jmtl.run.relations import analyze_workdir
from jmtl.run.sweeps import sweep

__all__ = [
  "ConfigError",
  "Interrupted",
  "TooManySkipped",
  "analyze_workdir",
  "apply_overrides",
  "create_train_state",
  "evaluate_workdir",
  "group",
  "load_config",
  "report_workdir",
  "sweep",
  "train",
  "train_and_evaluate",
  "train_baselines",
]
