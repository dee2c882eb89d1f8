"""The ``jmtl`` command.

Usage::

  jmtl train --config configs/multi_digits.py [--config.FIELD=VALUE ...] --workdir DIR
  jmtl eval --workdir DIR [--out DIR]
  jmtl baselines --config configs/multi_digits.py [--config.FIELD=VALUE ...] --workdir DIR
  jmtl sweep --config configs/multi_digits.py --over weighting=equal,uncertainty,static --workdir DIR [--folds K]
  jmtl tune --config multi_digits --space optimizer.learning_rate=loguniform(1e-4,1e-2) --trials N --workdir DIR
  jmtl report --workdir DIR [--out DIR]
  jmtl analyze --workdir DIR [--groups G]
  jmtl group --config configs/planted.py [--config.FIELD=VALUE ...] --groups G --workdir DIR

Multi-process (``jax.distributed``): ``train``, ``eval``, ``baselines``,
``sweep`` and ``group`` take ``--coordinator HOST:PORT --num_processes N --process_id I``
(or ``JMTL_COORDINATOR``, ``JMTL_NUM_PROCESSES``, ``JMTL_PROCESS_ID``), or
``--distributed`` (``JMTL_DISTRIBUTED=1``) to let JAX detect them (SLURM, Open
MPI, Cloud TPU, Kubernetes); every process runs the same command.

Re-running ``train`` or ``sweep`` with the same arguments resumes. Every
failure a user can cause prints one line naming it:

* exit 2 -- a wrong field, method, value or workdir, or bad data (a label
  out of range, NaN or inf, a mask outside [0, 1]), before anything is written;
* exit 1 -- the run stopped: too many skipped steps (``max_skipped_fraction``,
  after writing a checkpoint), a failed ``--config.checks=true`` check, or a
  full disk (the same command resumes once there is space);
* exit 128 + the signal number -- SIGINT/SIGTERM, at any moment after start
  (during training: after saving a checkpoint; during start-up: at the next
  safe point, nothing to save); a second signal stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Mapping

from jmtl.run import signals
from jmtl.run.config import ConfigError

COMMANDS = ("train", "eval", "baselines", "sweep", "tune", "report", "analyze", "group")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise ConfigError(message)


_HELP = {
  "train": "train a config in a workdir (resumes from its last checkpoint)",
  "eval": "evaluate a workdir's kept model on validation and test",
  "baselines": "train one single-task model per task, for Δm%%",
  "sweep": "one run per value of the --over fields, one table",
  "tune": "hyper-parameter search with Optuna (TPE, median pruning; a resumable study)",
  "report": "print a run's or a sweep's table and write its plots again",
  "analyze": "a run's task relations (affinity, gradient cosine, conflicts), grouping and negative transfer",
  "group": "train all tasks, group them by affinity, train one model per group, compare",
}
_CONFIGURED = ("train", "baselines", "sweep", "tune", "group")  # the commands that take --config (and overrides)

_EPILOG = """config fields:
  --config.FIELD=VALUE    set any field of the config (repeatable), e.g. --config.num_steps=500,
                          --config.optimizer.learning_rate=3e-4, --config.weighting_args.dwa.temperature=1.0,
                          --config.dataset.options.num_train=2000 (the fields: the config file, or
                          python -c "from jmtl.run import load_config; print(load_config('multi_digits'))")
  your own code           model.name, dataset.name and weighting take an import path (my_pkg.nets.wide);
                          its arguments are the group of its last part (model.wide, dataset.options,
                          weighting_args.<last part>); README "Bring your own model, data and weighting"
"""


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jmtl", description="Multi-task experiments: train, evaluate, sweep, report.")
  sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
  for name in COMMANDS:
    configured = {"epilog": _EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}
    s = sub.add_parser(name, help=_HELP[name], **(configured if name in _CONFIGURED else {}))
    if name in _CONFIGURED:
      s.add_argument(
        "--config",
        required=True,
        help="a file (configs/qm9.py), a built-in name (multi_digits) or a module path; optionally :VARIANT",
      )
    s.add_argument("--workdir", required=True, help="the run's directory (created if needed)")
    if name in ("eval", "report"):
      s.add_argument(
        "--out", metavar="DIR", help="write eval.json / plots here, not into the (maybe read-only) workdir"
      )
    if name == "sweep":
      s.add_argument("--over", action="append", required=True, help="FIELD=VALUE1,VALUE2,... (repeatable)")
    if name == "tune":
      _tune_arguments(s)
    if name in ("sweep", "tune"):
      s.add_argument("--folds", type=int, default=0, metavar="K", help="k-fold cross-validation on the training split")
    if name == "group":
      s.add_argument("--groups", type=int, required=True, metavar="G", help="at most G groups of tasks")
    if name == "analyze":
      s.add_argument("--groups", type=int, metavar="G", help="at most G suggested groups (default: config's, or K)")
    if name not in ("report", "analyze"):
      s.add_argument("--no-progress", action="store_true", help="no progress bar")
      _distributed_arguments(s)
  return p


def _tune_arguments(s: argparse.ArgumentParser) -> None:
  s.add_argument(
    "--space",
    action="append",
    required=True,
    help="FIELD=float(lo,hi)|loguniform(lo,hi)|int(lo,hi)|logint(lo,hi)|choice(a,b,...), or static_weights=simplex",
  )
  s.add_argument("--trials", type=int, required=True, metavar="N", help="finished trials the study should hold")
  s.add_argument("--objective", default="delta_m", help="delta_m (validation Δm%%), score, or TASK/METRIC")
  s.add_argument("--storage", help="an Optuna RDB URL shared by many workers (default: sqlite in the workdir)")
  s.add_argument("--study", default="jmtl", help="the study's name in the storage")
  s.add_argument("--prune_startup", type=int, default=3, metavar="N", help="finished trials before pruning starts")
  s.add_argument("--no-prune", action="store_true", help="no median pruning")


# Flag -> the environment variables read when it is not given (the first one set).
_ENV = {
  "coordinator": ("JMTL_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
  "num_processes": ("JMTL_NUM_PROCESSES",),
  "process_id": ("JMTL_PROCESS_ID",),
}


def _distributed_arguments(s: argparse.ArgumentParser) -> None:
  g = s.add_argument_group("multi-process runs (jax.distributed; every process runs the same command)")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port (JMTL_COORDINATOR)")
  g.add_argument("--num_processes", type=int, metavar="N", help="the number of processes (JMTL_NUM_PROCESSES)")
  g.add_argument("--process_id", type=int, metavar="I", help="this process, 0 to N-1 (JMTL_PROCESS_ID)")
  g.add_argument(
    "--distributed",
    action="store_true",
    help="start jax.distributed with what JAX detects: SLURM, Open MPI, Cloud TPU, Kubernetes (JMTL_DISTRIBUTED=1)",
  )


def distributed_settings(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> dict | None:
  """The ``jax.distributed`` settings of a command (flags first, then the environment), or ``None`` for one process.

  Unset fields (``None``) are left to JAX's cluster detection.

  Examples:
    >>> args, _ = parse(["train", "--config", "c.py", "--workdir", "w", "--process_id", "1"])
    >>> distributed_settings(args, {"JMTL_COORDINATOR": "host0:1234", "JMTL_NUM_PROCESSES": "2"})
    {'coordinator': 'host0:1234', 'num_processes': 2, 'process_id': 1}
    >>> distributed_settings(parse(["eval", "--workdir", "w"])[0], {}) is None
    True
  """
  found = {}
  for field, names in _ENV.items():
    value = getattr(args, field, None)
    name = next((n for n in names if environ.get(n)), None)
    if value is None and name is not None:
      value = environ[name]
      if field != "coordinator":
        try:
          value = int(value)
        except ValueError:
          raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None
    found[field] = value
  auto = getattr(args, "distributed", False) or environ.get("JMTL_DISTRIBUTED", "") not in ("", "0")
  return found if auto or any(v is not None for v in found.values()) else None


def _start_distributed(settings: dict | None) -> None:
  if settings is None:
    return
  import jax

  import jmtl.parallel

  if jax.distributed.is_initialized():  # started by the caller already (a script calling main): use it
    return
  try:
    jmtl.parallel.initialize_distributed(settings["coordinator"], settings["num_processes"], settings["process_id"])
  except (ValueError, TypeError, RuntimeError) as e:
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None) or "detected by JAX"
    raise ConfigError(f"cannot start jax.distributed ({shown}): {e}") from e


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
  """The parsed arguments and the ``--config.FIELD=VALUE`` overrides.

  Examples:
    >>> args, overrides = parse(["train", "--config", "c.py", "--config.num_steps=10", "--workdir", "/tmp/x"])
    >>> args.command, overrides
    ('train', {'num_steps': '10'})
  """
  args, rest = _parser().parse_known_args(argv)
  if args.command is None:
    raise ConfigError(f"missing command; choose one of {', '.join(COMMANDS)}")
  overrides, i = {}, 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith("--config.") or args.command not in _CONFIGURED:
      raise ConfigError(f"unrecognized argument {item!r}")
    field, sep, value = item[len("--config.") :].partition("=")
    if not sep:  # --config.FIELD VALUE
      if i + 1 >= len(rest):
        raise ConfigError(f"{item} needs a value")
      i, value = i + 1, rest[i + 1]
    overrides[field] = value
    i += 1
  return args, overrides


def run(argv: list[str]) -> None:
  """Runs one command (raises :class:`ConfigError` on user errors)."""
  args, overrides = parse(argv)
  _start_distributed(distributed_settings(args))  # before any other JAX call
  _quiet_libraries()
  from jmtl.run import experiment
  from jmtl.run import sweeps

  progress = not getattr(args, "no_progress", False)
  if args.command == "eval":
    experiment.evaluate_workdir(args.workdir, out=args.out)
    return
  if args.command == "report":
    experiment.report_workdir(args.workdir, out=args.out)
    return
  if args.command == "analyze":
    from jmtl.run import relations

    relations.analyze_workdir(args.workdir, groups=args.groups)
    return
  from jmtl.run import config as config_lib

  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  signals.check("while reading the config")
  if args.command in ("train", "sweep", "tune"):
    from jmtl.run import cotrain

    cotrain.sequential_cpu_scheduler(config)  # before the first computation
  if args.command == "train":
    experiment.train(config, args.workdir, progress=progress)
  elif args.command == "baselines":
    experiment.train_baselines(config, args.workdir, progress=progress)
  elif args.command == "group":
    from jmtl.run import grouping

    grouping.group(config, args.workdir, args.groups, progress=progress)
  elif args.command == "tune":
    from jmtl.run import tune

    tune.tune(
      config,
      args.workdir,
      args.space,
      args.trials,
      folds=args.folds,
      objective=args.objective,
      study=tune.Study(args.storage, args.study, not args.no_prune, args.prune_startup),
      progress=progress,
    )
  else:
    sweeps.sweep(config, args.workdir, args.over, folds=args.folds, progress=progress)


def _quiet_libraries() -> None:
  # orbax and TFDS log routine steps through absl at INFO/WARNING level.
  from absl import logging

  logging.set_verbosity(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
  """The console script: returns the exit code (0; 2 for a user error; 1 when the run stopped; 128 + signal)."""
  console = argv is None  # the process ends when this returns: the handlers stay through the interpreter's teardown
  argv = sys.argv[1:] if argv is None else list(argv)
  command = argv[0] if argv and argv[0] in COMMANDS else ""
  prefix = " ".join(["jmtl", command]).strip()
  with signals.deferred(hard_exit=True, prefix=prefix, restore=not console), _quiet_disk_full(restore=not console):
    code = _main(argv, prefix)
    signum = signals.caught()
    if code == 0 and signum is not None:  # came after the last safe point: the command's work is done
      name = signal.Signals(signum).name
      print(f"{prefix}: interrupted by {name} as the command ended; its work is done and written", file=sys.stderr)
      code = 128 + signum
  return code


def _main(argv: list[str], prefix: str) -> int:
  def say(message: str) -> None:
    print(f"{prefix}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)

  try:
    run(argv)
  except ConfigError as e:
    say(f"error: {e}")
    return 2
  except signals.Interrupted as e:
    say(f"{e}; run the same command again to resume")
    return 128 + e.signum
  except KeyboardInterrupt:  # outside the main thread, where signals cannot be deferred
    say("interrupted")
    return 130
  except Exception as e:
    message = _stopped(e, argv)
    if message is None:
      raise
    say(f"error: {message}")
    return 1
  return 0


def _stopped(error: Exception, argv: list[str]) -> str | None:
  """The one-line message of a run that stopped (exit 1), or ``None`` for an error that is a bug (a traceback)."""
  from jmtl.checks import CheckError
  from jmtl.run.loop import TooManySkipped

  if isinstance(error, TooManySkipped):
    return f"{error}; find the first bad batch with --config.checks=true (in a new --workdir)"
  if isinstance(error, CheckError):
    return f"check failed: {error} (the last checkpoint is kept)"
  full = disk_full(error)
  return None if full is None else _disk_full_message(full, _workdir(argv))


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def disk_full(error: BaseException) -> BaseException | None:
  """The error in ``error``'s chain that says the disk (or quota) is full, or ``None``.

  An ``OSError`` with ``ENOSPC``/``EDQUOT``, or -- as orbax and TensorStore
  report their failed writes -- an error whose message says so.

  Examples:
    >>> disk_full(RuntimeError("save failed")) is None
    True
    >>> full = OSError(errno.ENOSPC, "No space left on device", "/w/config.json")
    >>> error = RuntimeError("save failed"); error.__cause__ = full
    >>> disk_full(error) is full
    True
  """
  found, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno in _FULL) or any(t in str(error) for t in _FULL_TEXT):
      found.append(error)
    error = error.__cause__ or error.__context__
  # The one that names the file, if any (a later close of another file may have raised over it).
  return next((e for e in found if _full_path(e)), found[0] if found else None)


def _full_path(error: BaseException) -> str | None:
  """The file a full-disk error names: ``OSError.filename``, or the first quoted absolute path of its message."""
  if getattr(error, "filename", None):
    return str(error.filename)
  match = re.search(r'"(/[^"]+)"', str(error))
  return match.group(1) if match else None


#: What orbax's background writers, TensorStore's callbacks and tensorboardX's writer thread print after a write
#: failed for lack of space: each failed write with a traceback, then the consequences (event loops, executors and
#: queues closed under them), which only ever follow an error reported on its own.
_NOISE = (*_FULL_TEXT, "os_error_code='28'", "Event loop is closed", "cannot schedule new futures", "handle is closed")


def _noise(error: BaseException | None) -> bool:
  return error is not None and (disk_full(error) is not None or any(n in str(error) for n in _NOISE))


class _NoiseFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (_noise(exc) or any(n in record.getMessage() for n in _NOISE))


@contextlib.contextmanager
def _quiet_disk_full(restore: bool = True):
  """Drops the tracebacks libraries print from their threads when the disk is full (log records, uncaught thread
  exceptions, errors printed from TensorStore callbacks, atexit flushes): the command says it in one line.

  Anything else passes through unchanged. With ``restore=False`` the hooks stay for the interpreter's teardown
  (where tensorboardX flushes its files again).
  """
  log_filter = _NoiseFilter()
  handlers = list(logging.getLogger().handlers)
  for h in handlers:
    h.addFilter(log_filter)
  hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, value, tb: None if _noise(value) else hooks[0](kind, value, tb)
  threading.excepthook = lambda args: None if _noise(args.exc_value) else hooks[1](args)
  sys.unraisablehook = lambda u: None if _noise(u.exc_value) else hooks[2](u)
  try:
    yield
  finally:
    if restore:
      sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
      for h in handlers:
        h.removeFilter(log_filter)


def _workdir(argv: list[str]) -> str | None:
  try:
    return os.path.abspath(parse(argv)[0].workdir)
  except (ConfigError, AttributeError, TypeError):
    return None


def _megabytes(n: float) -> str:
  return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _disk_full_message(error: BaseException, workdir: str | None) -> str:
  """``disk full writing <file>: workdir <dir> (<free> free; a checkpoint of this run takes <size>); ...``."""
  where = _full_path(error)
  text = f"disk full writing {where}" if where else f"disk full ({' '.join(str(error).split())[:200]})"
  if workdir is None:
    return f"{text}; free some space and run the same command again to resume"
  notes = []
  with contextlib.suppress(OSError):
    notes.append(f"{_megabytes(shutil.disk_usage(workdir).free)} free")
  size = _checkpoint_size(workdir)
  if size:
    notes.append(f"a checkpoint of this run takes {_megabytes(size)}")
  shown = f" ({'; '.join(notes)})" if notes else ""
  return f"{text}: workdir {workdir}{shown}; free some space and run the same command again to resume"


def _checkpoint_size(workdir: str) -> int:
  """The size in bytes of the largest step directory under any ``checkpoints/`` below ``workdir`` (0 if none)."""
  largest = 0
  for root, dirs, _ in os.walk(workdir):
    if os.path.basename(root) != "checkpoints":
      continue
    for d in dirs:
      if d.isdigit():
        total = 0
        for sub, _, files in os.walk(os.path.join(root, d)):
          for f in files:
            with contextlib.suppress(OSError):
              total += os.stat(os.path.join(sub, f)).st_blocks * 512  # the space it takes, not its length
        largest = max(largest, total)
    dirs[:] = []
  return largest


if __name__ == "__main__":
  sys.exit(main())
