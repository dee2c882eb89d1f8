"""The ``jmtl`` command.

Usage::

  jmtl train --config configs/multi_digits.py [--config.FIELD=VALUE ...] --workdir DIR
  jmtl eval --workdir DIR
  jmtl baselines --config configs/multi_digits.py [--config.FIELD=VALUE ...] --workdir DIR
  jmtl sweep --config configs/multi_digits.py --over weighting=equal,uncertainty,static --workdir DIR
  jmtl report --workdir DIR

Re-running ``train`` or ``sweep`` with the same arguments resumes. A wrong
field, method, value or workdir prints one line naming it and exits with 2;
SIGINT/SIGTERM saves a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys

from jmtl.run.config import ConfigError

COMMANDS = ("train", "eval", "baselines", "sweep", "report")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise ConfigError(message)


_HELP = {
  "train": "train a config in a workdir (resumes from its last checkpoint)",
  "eval": "evaluate a workdir's kept model on validation and test",
  "baselines": "train one single-task model per task, for Δm%%",
  "sweep": "one run per value of the --over fields, one table",
  "report": "print a run's or a sweep's table and write its plots again",
}


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jmtl", description="Multi-task experiments: train, evaluate, sweep, report.")
  sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
  for name in COMMANDS:
    s = sub.add_parser(name, help=_HELP[name])
    if name in ("train", "baselines", "sweep"):
      s.add_argument("--config", required=True, help="a config file, e.g. configs/multi_digits.py")
    s.add_argument("--workdir", required=True, help="the run's directory (created if needed)")
    if name == "sweep":
      s.add_argument("--over", action="append", required=True, help="FIELD=VALUE1,VALUE2,... (repeatable)")
    if name != "report":
      s.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


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
    if not item.startswith("--config.") or args.command not in ("train", "baselines", "sweep"):
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
  _quiet_libraries()
  from jmtl.run import experiment
  from jmtl.run import sweeps

  progress = not getattr(args, "no_progress", False)
  if args.command == "eval":
    experiment.evaluate_workdir(args.workdir)
    return
  if args.command == "report":
    experiment.report_workdir(args.workdir)
    return
  from jmtl.run import config as config_lib

  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  if args.command == "train":
    experiment.train(config, args.workdir, progress=progress)
  elif args.command == "baselines":
    experiment.train_baselines(config, args.workdir, progress=progress)
  else:
    sweeps.sweep(config, args.workdir, args.over, progress=progress)


def _quiet_libraries() -> None:
  # orbax and TFDS log routine steps through absl at INFO/WARNING level.
  from absl import logging

  logging.set_verbosity(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
  """The console script: returns the exit code (0, 2 for a user error, 128 + signal when interrupted)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  command = argv[0] if argv and argv[0] in COMMANDS else ""
  try:
    run(argv)
  except ConfigError as e:
    message = " ".join(str(e).split())
    print(f"{' '.join(['jmtl', command]).strip()}: error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before training started (loading, compiling): nothing to save
    print(f"{' '.join(['jmtl', command]).strip()}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:
    from jmtl.run.loop import Interrupted

    if not isinstance(e, Interrupted):
      raise
    print(f"{' '.join(['jmtl', command]).strip()}: {e}; run the same command again to resume", file=sys.stderr)
    return 128 + e.signum
  return 0


if __name__ == "__main__":
  sys.exit(main())
