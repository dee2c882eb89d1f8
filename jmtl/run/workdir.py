"""The workdir of a run: checks before anything is written, the stored config, atomic JSON files.

Layout (``jmtl train``)::

    config.json          the run's config; a re-run must match it (then it resumes)
    metrics.jsonl        train records every log_every steps, validation records every eval_every steps
    results.json         validation and test metrics of the selected model, Δm%, timing
    checkpoints/<step>/  orbax: params, best_params, train state, meta (data iterator, host state)
    tensorboard/         event files
    plots/               curves.png, weights.png, grad_cosine.png
    baselines/           (baselines="auto") baselines.json and one single-task run per task
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from jmtl.run import config as config_lib
from jmtl.run.config import ConfigError

CONFIG = "config.json"
RESULTS = "results.json"


def write_json(path: str, data: Any) -> None:
  """Writes ``data`` as JSON through a temporary file and a rename, so a kill never leaves half a file.

  Examples:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> write_json(p, {"a": 1}); read_json(p, "x")
    {'a': 1}
  """
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str, what: str) -> Any:
  """Reads a JSON file; a missing or broken file is a :class:`ConfigError` naming it.

  Examples:
    >>> read_json("/nonexistent.json", "results")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: results: /nonexistent.json does not exist
  """
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ConfigError(f"{what}: {path} does not exist") from e
  except (OSError, ValueError) as e:
    raise ConfigError(f"{what}: cannot read {path}: {e}") from e


def check_usable(workdir: str, create: bool = True) -> str:
  """The absolute workdir (created if ``create``); fails if it is missing, a file, unreadable or unwritable.

  Examples:
    >>> check_usable("/dev/null")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir /dev/null exists and is not a directory
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"workdir {path} exists and is not a directory")
  if not create and not os.path.isdir(path):
    raise ConfigError(f"workdir {path} does not exist")
  try:
    os.makedirs(path, exist_ok=True)
    os.listdir(path)
  except OSError as e:
    raise ConfigError(f"workdir {path} is not usable: {e.strerror or e}") from e
  if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
    raise ConfigError(f"workdir {path} is not readable and writable by this user")
  return path


def open_run(workdir: str, config: ml_collections.ConfigDict, *, write: bool = True) -> str:
  """Prepares ``workdir`` for a run of ``config``: new (writes config.json) or the same run (resumes).

  Nothing in the directory is changed when this fails: a different config,
  or a non-empty directory that holds no jmtl run, is refused. With
  ``write=False`` it only checks (and creates the directory).

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = open_run(d, ml_collections.ConfigDict({"lr": 0.1})); sorted(os.listdir(d))
    ['config.json']
    >>> open_run(d, ml_collections.ConfigDict({"lr": 0.2}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir ... holds a run with another config (lr: 0.1 -> 0.2); use a new --workdir
  """
  path = check_usable(workdir)
  stored = os.path.join(path, CONFIG)
  wanted = config_lib.to_dict(config)
  if os.path.exists(stored):
    have = read_json(stored, f"workdir {path}")
    diff = config_lib.differences(have, wanted)
    if diff:
      shown = ", ".join(f"{d}: {_get(have, d)!r} -> {_get(wanted, d)!r}" for d in diff[:4])
      more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
      raise ConfigError(f"workdir {path} holds a run with another config ({shown}{more}); use a new --workdir")
    return path
  if os.listdir(path):
    raise ConfigError(f"workdir {path} is not empty and holds no jmtl run (no {CONFIG}); use a new or empty directory")
  if write:
    write_json(stored, wanted)
  return path


def _get(data: dict, dotted: str) -> Any:
  for part in dotted.split("."):
    data = data.get(part) if isinstance(data, dict) else None
  return data


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored in a run's workdir (for ``jmtl eval`` and ``jmtl report``).

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp(); _ = open_run(d, ml_collections.ConfigDict({"hidden": (8, 8)}))
    >>> load_run_config(d).hidden
    (8, 8)
  """
  path = check_usable(workdir, create=False)
  stored = os.path.join(path, CONFIG)
  if not os.path.exists(stored):
    raise ConfigError(f"workdir {path} holds no jmtl run (no {CONFIG})")
  return config_lib.from_dict(read_json(stored, f"workdir {path}"))
