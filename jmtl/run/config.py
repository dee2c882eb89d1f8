"""Experiment configs: loading (files, built-in names, variants), ``--config.FIELD=VALUE`` overrides, checks, JSON.

A config file defines ``get_config() -> ml_collections.ConfigDict`` (the flax
examples convention). Every mistake a user can make on the command line fails
here, before anything touches the workdir, with a :class:`ConfigError` whose
one-line message names the field.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import ml_collections

#: Subtrees that take keys a config file did not define: they are keyword
#: arguments checked by the function that receives them (the dataset builder,
#: the weighting factory), so a wrong key still fails with its name.
OPEN_FIELDS = ("dataset.options", "weighting_args", "optimizer.args")

#: Fields that change nothing a single-task baseline computes.
_NOT_IN_BASELINE = (
  "tasks",
  "weighting",
  "static_weights",
  "static_grid",
  "weighting_args",
  "grad",
  "sharing.soft",
  "sharing.kind",
  "baselines",
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "plots",
  "checks",
  "max_skipped_fraction",
  "skip_window",
  "relations",
  "cotrain",
)


class ConfigError(ValueError):
  """A wrong config, command line or workdir; the CLI prints its message on one line and exits with 2."""


def builtin_configs() -> list[str]:
  """The names of the configs installed with jmtl (``jmtl train --config NAME``).

  Examples:
    >>> "multi_digits" in builtin_configs()
    True
  """
  return sorted(f[:-3] for f in os.listdir(_BUILTIN) if f.endswith(".py") and not f.startswith("_"))


_BUILTIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Runs ``get_config()`` of a config named by a file, a built-in name or a module, with an optional ``:variant``.

  ``spec`` is ``WHERE`` or ``WHERE:VARIANT`` (big_vision's convention:
  ``get_config(VARIANT)`` is called with the string after the colon). ``WHERE``
  is a file (``configs/qm9.py``, ``~/exp/mine.py``), the name of a config
  installed with jmtl (``multi_digits``, :func:`builtin_configs`; the same
  files as the clone's ``configs/``, importable as ``jmtl.configs.NAME``), or a
  dotted module path (``my_project.configs.big``). A file inside a package
  directory (an ``__init__.py`` beside it) is imported as ``package.name``, so
  variants can ``from my_configs import base``; jmtl's own configs import each
  other as ``from jmtl.configs import multi_digits``.

  Examples:
    >>> load_config("synthetic").dataset.name
    'synthetic'
    >>> load_config("/nonexistent/x.py")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: config file /nonexistent/x.py does not exist
    >>> load_config("no_such_config")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: config 'no_such_config' is not a file, a built-in config (celeba, ...) or a module
  """
  where, _, variant = spec.partition(":")
  module = _config_module(where)
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # a broken config file is a user error, reported in one line
    raise ConfigError(f"config {spec} failed: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config {spec}: get_config() must return an ml_collections.ConfigDict")
  return config


def _config_module(where: str):
  """The module of a config file, built-in name or dotted module path (see :func:`load_config`)."""
  is_file = where.endswith(".py") or os.sep in where or os.path.isfile(where)
  try:
    if not is_file:
      if where in builtin_configs():
        return importlib.import_module(f"jmtl.configs.{where}")
      try:
        return importlib.import_module(where)
      except ModuleNotFoundError as e:
        if not e.name or not where.startswith(e.name):
          raise
        names = ", ".join(builtin_configs())
        raise ConfigError(f"config {where!r} is not a file, a built-in config ({names}) or a module") from None
    path = os.path.abspath(os.path.expanduser(where))
    if not os.path.isfile(path):
      raise ConfigError(f"config file {path} does not exist")
    folder, stem = os.path.split(os.path.splitext(path)[0])
    if os.path.realpath(folder) == os.path.realpath(_BUILTIN):
      return importlib.import_module(f"jmtl.configs.{stem}")
    if os.path.isfile(os.path.join(folder, "__init__.py")):
      parent, package = os.path.split(folder)
      with _on_path(parent):
        return importlib.import_module(f"{package}.{stem}")
    spec = importlib.util.spec_from_file_location(f"_jmtl_config_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"config {where} failed: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _on_path(folder: str):
  sys.path.insert(0, folder)
  try:
    yield
  finally:
    with contextlib.suppress(ValueError):
      sys.path.remove(folder)


def parse_value(text: str, current: Any) -> Any:
  """A command-line string as a value of the type of ``current``.

  Examples:
    >>> parse_value("3e-4", 0.1), parse_value("64,64", (1,)), parse_value("(8,)", ()), parse_value("mgda", "equal")
    (0.0003, (64, 64), (8,), 'mgda')
    >>> parse_value("false", True), parse_value("7", 0)
    (False, 7)
  """
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true or false, got {text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, tuple):
    if isinstance(value, list | tuple):
      return tuple(value)
    return (value,) if text.strip() else ()
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
  """Sets ``{"a.b": "text"}`` overrides on a copy of ``config``, checking each field and its type.

  Examples:
    >>> c = ml_collections.ConfigDict({"lr": 0.1, "model": {"name": "mlp"}})
    >>> apply_overrides(c, {"lr": "0.5", "model.name": "cnn"}).model.name
    'cnn'
    >>> apply_overrides(c, {"lrr": "1"})
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: unknown config field 'lrr' (fields here: lr, model)
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for field, text in overrides.items():
    node, parts = config, field.split(".")
    for i, part in enumerate(parts):
      here = ".".join(parts[: i + 1])
      is_open = any(here.startswith(f + ".") for f in OPEN_FIELDS)
      last = i == len(parts) - 1
      if part not in node:
        if not is_open:
          raise ConfigError(f"unknown config field {here!r} (fields here: {', '.join(sorted(node.keys()))})")
        node[part] = _literal(text) if last else ml_collections.ConfigDict()
      elif last:
        try:
          node[part] = parse_value(text, node[part]) if not is_open else _literal(text)
        except (TypeError, ValueError) as e:
          raise ConfigError(f"config field {here!r}: cannot set {text!r}: {e}") from e
      if not last:
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
          raise ConfigError(f"config field {here!r} is a value, not a group; cannot set {field!r}")
  return config


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON types (tuples become lists).

  Examples:
    >>> to_dict(ml_collections.ConfigDict({"a": (1, 2), "b": {"c": "x"}}))
    {'a': [1, 2], 'b': {'c': 'x'}}
  """
  return json.loads(json.dumps(config.to_dict()))


def from_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from :func:`to_dict` output; lists become tuples again.

  Examples:
    >>> from_dict({"a": [1, 2], "b": {"c": "x"}}).a
    (1, 2)
  """

  def fix(x):
    if isinstance(x, Mapping):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x

  return ml_collections.ConfigDict(fix(dict(data)))


def differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Dotted names of the fields whose values differ between two plain dicts.

  Examples:
    >>> differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0})
    ['b.c', 'd']
  """
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += differences(va, vb, f"{prefix}{key}.")
    elif va != vb:
      out.append(f"{prefix}{key}")
  return out


def baseline_config(config: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
  """The single-task run for ``task`` with the same budget: equal weighting, no soft-sharing penalty, no baselines
  (and no relations tracker).

  Examples:
    >>> c = ml_collections.ConfigDict({"tasks": "", "weighting": "famo", "static_weights": (), "baselines": "auto",
    ...                                "sharing": {"soft": 0.1}})
    >>> b = baseline_config(c, "left")
    >>> b.tasks, b.weighting, b.sharing.soft, b.baselines
    ('left', 'equal', 0.0, '')
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.tasks, c.weighting, c.static_weights, c.baselines = task, "equal", (), ""
  if "sharing" in c and "soft" in c.sharing:
    c.sharing.soft = 0.0
  if "relations" in c:  # one task: nothing to relate
    c.relations.every, c.relations.tasks = 0, ""
  if "cotrain" in c:  # one model, trained on its labels
    c.cotrain.members, c.cotrain.beta, c.cotrain.teachers = 0, 0.0, ""
  return c


def baseline_key(config: ml_collections.ConfigDict) -> str:
  """A digest of the fields that change a single-task baseline (not the method, tasks or logging).

  Examples:
    >>> a = ml_collections.ConfigDict({"weighting": "famo", "num_steps": 10, "log_every": 5})
    >>> b = ml_collections.ConfigDict({"weighting": "dwa", "num_steps": 10, "log_every": 1})
    >>> baseline_key(a) == baseline_key(b), baseline_key(a) == baseline_key(ml_collections.ConfigDict({"num_steps": 9}))
    (True, False)
  """
  data = to_dict(config)
  for field in _NOT_IN_BASELINE:
    _drop(data, field.split("."))
  return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _drop(data: dict, parts: list[str]) -> None:
  if len(parts) == 1:
    data.pop(parts[0], None)
  elif isinstance(data.get(parts[0]), dict):
    _drop(data[parts[0]], parts[1:])


def split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits at ``sep`` outside brackets: ``"a,(1,2),b" -> ["a", "(1,2)", "b"]``.

  Examples:
    >>> split_top_level("equal,(0.3,0.7),famo")
    ['equal', '(0.3,0.7)', 'famo']
  """
  parts, depth, cur = [], 0, []
  for ch in text:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts if p.strip()]


def task_subset(config: ml_collections.ConfigDict, available: Iterable[str]) -> list[str]:
  """The task names ``config.tasks`` selects (comma separated; empty for all), in the dataset's order.

  Examples:
    >>> task_subset(ml_collections.ConfigDict({"tasks": "b"}), ["a", "b"])
    ['b']
  """
  available = list(available)
  wanted = [t.strip() for t in config.tasks.split(",") if t.strip()]
  unknown = [t for t in wanted if t not in available]
  if unknown:
    raise ConfigError(f"config field 'tasks': unknown tasks {unknown}; the dataset has {available}")
  return [t for t in available if t in wanted] if wanted else available
