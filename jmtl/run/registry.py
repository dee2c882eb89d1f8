"""Names in a config -> jmtl objects: weighting methods, models, optimizers, penalties; and the config check.

The method table is built from the attributes :mod:`jmtl.weighting` has at
run time, so a method another module adds later appears here without an edit,
and a listed method this jmtl lacks fails with a clear message.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from jmtl import models
from jmtl import sharing
from jmtl import weighting as weighting_lib
from jmtl.run.config import ConfigError

#: method name -> (attribute of :mod:`jmtl.weighting`, default keyword arguments).
#: ``"select": "last"`` means the Gramian is over the last shared layer only.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
  "equal": ("equal", {}),
  "static": ("static", {}),
  "uncertainty": ("uncertainty", {}),
  "dwa": ("dwa", {}),
  "rlw": ("rlw", {}),
  "gls": ("gls", {}),
  "famo": ("famo", {}),
  "imtl_l": ("imtl_l", {}),
  "pcgrad": ("pcgrad", {}),
  "imtl_g": ("imtl_g", {}),
  "aligned_mtl": ("aligned_mtl", {}),
  "gradvac": ("gradvac", {}),
  "gradnorm": ("gradnorm", {"select": "last"}),
  "graddrop": ("graddrop", {}),
  "mgda": ("mgda", {}),
  "upgrad": ("upgrad", {}),
  "dualproj": ("dualproj", {}),
  "cagrad": ("cagrad", {}),
  "nash_mtl": ("nash_mtl", {}),
}

MODELS = ("mlp", "cnn", "resnet", "mtan", "soft_mlp", "cross_stitch", "mmoe", "cgc", "ple", "dselect_k")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def available_methods() -> list[str]:
  """The method names this jmtl provides (the table's entries whose factory exists).

  Examples:
    >>> {"equal", "famo", "pcgrad"} <= set(available_methods())
    True
  """
  return [name for name, (attr, _) in METHODS.items() if callable(getattr(weighting_lib, attr, None))]


def _factory(name: str):
  attr, defaults = METHODS.get(name, (name, {}))
  fn = getattr(weighting_lib, attr, None)
  if name not in METHODS and not (callable(fn) and inspect.isfunction(fn)):
    fn = None
  if fn is None:
    known = ", ".join(available_methods())
    missing = " (listed, but this jmtl does not provide it yet)" if name in METHODS else ""
    raise ConfigError(f"unknown weighting method {name!r}{missing}; available: {known}")
  return fn, dict(defaults)


def method_names(spec: str) -> list[str]:
  """``"uncertainty+static"`` -> ``["uncertainty", "static"]`` (a chain, applied left to right).

  Examples:
    >>> method_names("uncertainty + static")
    ['uncertainty', 'static']
  """
  names = [n.strip() for n in spec.split("+")]
  if not all(names):
    raise ConfigError(f"config field 'weighting': bad method {spec!r}; use a name or names joined by '+'")
  return names


def make_weighting(config: ml_collections.ConfigDict, num_tasks: int) -> weighting_lib.WeightingTransform:
  """The weighting transform ``config.weighting`` names, with ``config.weighting_args[name]`` as arguments.

  Examples:
    >>> c = ml_collections.ConfigDict({"weighting": "static", "static_weights": (1.0, 3.0), "weighting_args": {}})
    >>> make_weighting(c, 2).needs
    'losses'
  """
  transforms = [_one_weighting(name, config, num_tasks) for name in method_names(config.weighting)]
  return transforms[0] if len(transforms) == 1 else weighting_lib.chain(*transforms)


def _one_weighting(name: str, config: ml_collections.ConfigDict, num_tasks: int):
  fn, kwargs = _factory(name)
  args = config.weighting_args.get(name) if "weighting_args" in config else None
  kwargs.update(args.to_dict() if isinstance(args, ml_collections.ConfigDict) else {})
  if name == "static":
    weights = tuple(config.static_weights)
    if len(weights) != num_tasks:
      raise ConfigError(
        f"config field 'static_weights' has {len(weights)} weights for {num_tasks} tasks; "
        f"set e.g. --config.static_weights='{tuple([1.0] * num_tasks)}'"
      )
    kwargs["weights"] = [float(w) for w in weights]
  if kwargs.get("select") == "last":
    kwargs["select"] = last_layer
  try:
    return fn(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"weighting {name!r} with arguments {kwargs}: {e}") from e


def last_layer(shared: Mapping[str, Any]) -> dict[str, Any]:
  """The last top-level layer of the shared parameters (``dense_10`` after ``dense_9``).

  Examples:
    >>> sorted(last_layer({"dense_0": 1, "dense_10": 2, "dense_9": 3}))
    ['dense_10']
  """
  key = max(shared, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
  return {key: shared[key]}


def make_model(config: ml_collections.ConfigDict, task_dims: Mapping[str, int]) -> models.MultiTaskModel:
  """The model ``config.model.name`` names, built from ``config.model[name]`` fields.

  Examples:
    >>> c = ml_collections.ConfigDict({"model": {"name": "mlp", "mlp": {"hidden": (8,)}}})
    >>> make_model(c, {"a": 3}).task_names
    ('a',)
  """
  name = config.model.name
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r} in config field 'model.name'; available: {', '.join(MODELS)}")
  fields = config.model.get(name)
  kwargs = fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else {}
  try:
    return getattr(models, name)(dict(task_dims), **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model {name!r} with fields model.{name} = {kwargs}: {e}") from e


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer of ``config.optimizer`` (name, learning_rate, schedule, warmup_steps, ...).

  Examples:
    >>> c = ml_collections.ConfigDict({"num_steps": 10, "optimizer": {"name": "sgd", "learning_rate": 0.1,
    ...   "schedule": "cosine", "warmup_steps": 2, "momentum": 0.9, "weight_decay": 0.0}})
    >>> type(make_optimizer(c)).__name__
    'GradientTransformationExtraArgs'
  """
  o = config.optimizer
  lr: Any = float(o.learning_rate)
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, o.warmup_steps, max(config.num_steps, o.warmup_steps + 1))
  elif o.warmup_steps:
    lr = optax.linear_schedule(0.0, lr, o.warmup_steps)
  if o.name == "adam":
    return optax.adam(lr)
  if o.name == "adamw":
    return optax.adamw(lr, weight_decay=o.weight_decay)
  return optax.sgd(lr, momentum=o.momentum or None)


def make_penalty(config: ml_collections.ConfigDict) -> list[sharing.Penalty]:
  """The regularisers: the soft-sharing penalty (soft_mlp towers) and coupled weight decay.

  Examples:
    >>> c = ml_collections.ConfigDict({"model": {"name": "mlp"}, "sharing": {"soft": 0.0, "kind": "pairwise",
    ...                                "weight_decay": 1e-4}})
    >>> len(make_penalty(c))
    1
  """
  s, out = config.sharing, []
  if s.soft:
    out.append(sharing.soft_sharing(s.soft, models.tower_params, s.kind))
  if s.weight_decay:
    out.append(sharing.weight_decay(s.weight_decay))
  return out


_REQUIRED = {
  "seed": int,
  "tasks": str,
  "weighting": str,
  "static_weights": tuple,
  "num_steps": int,
  "batch_size": int,
  "eval_batch_size": int,
  "log_every": int,
  "eval_every": int,
  "checkpoint_every": int,
  "keep_checkpoints": int,
  "select": str,
  "select_metric": str,
  "baselines": str,
  "plots": bool,
}
_GROUPS = {
  "dataset": ("name", "config", "data_dir", "options", "in_memory", "standardize_inputs", "workers", "splits"),
  "model": ("name",),
  "optimizer": ("name", "learning_rate", "schedule", "warmup_steps", "momentum", "weight_decay"),
  "sharing": ("soft", "kind", "weight_decay"),
  "grad": ("level", "heads", "chunk_size", "cross_device"),
}


def check(config: ml_collections.ConfigDict) -> None:
  """Checks fields, types, names and ranges; raises :class:`ConfigError` naming the first wrong field.

  Examples:
    >>> check(ml_collections.ConfigDict({"seed": 0}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: the config has no field 'tasks' ...
  """
  for field, kind in _REQUIRED.items():
    if field not in config:
      raise ConfigError(f"the config has no field {field!r} (is it a jmtl config? see configs/multi_digits.py)")
    value = config[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ConfigError(f"config field {field!r} must be {kind.__name__}, got {value!r}")
  for group, fields in _GROUPS.items():
    for field in fields:
      if group not in config or field not in config[group]:
        raise ConfigError(f"the config has no field '{group}.{field}' (see configs/multi_digits.py)")
  for field in ("num_steps", "batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every"):
    if config[field] < 1:
      raise ConfigError(f"config field {field!r} must be at least 1, got {config[field]}")
  for field in ("eval_every", "checkpoint_every"):
    if config[field] % config.log_every:
      raise ConfigError(
        f"config field {field!r} ({config[field]}) must be a multiple of log_every ({config.log_every})"
      )
  _check_choice("select", config.select, ("best", "final"))
  _check_choice("model.name", config.model.name, MODELS)
  _check_choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  _check_choice("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  _check_choice("sharing.kind", config.sharing.kind, ("pairwise", "mean"))
  _check_choice("grad.level", config.grad.level, ("parameter", "representation"))
  _check_choice("grad.heads", config.grad.heads, ("weighted", "own"))
  _check_choice("grad.cross_device", config.grad.cross_device, ("exact", "approximate"))
  devices = config.get("devices", 1)
  if isinstance(devices, bool) or not isinstance(devices, int) or not 0 <= devices <= jax.device_count():
    raise ConfigError(
      f"config field 'devices' must be an int from 0 (all) to {jax.device_count()} (this machine's devices), "
      f"got {devices!r}"
    )
  n = devices or jax.device_count()
  if config.batch_size % n:
    raise ConfigError(f"config field 'batch_size' ({config.batch_size}) must be a multiple of devices ({n})")
  if config.sharing.soft and config.model.name != "soft_mlp":
    raise ConfigError(f"config field 'sharing.soft' = {config.sharing.soft} needs model.name='soft_mlp'")
  for name in method_names(config.weighting):
    _factory(name)
  if not isinstance(config.model.get(config.model.name, ml_collections.ConfigDict()), ml_collections.ConfigDict):
    raise ConfigError(f"config field 'model.{config.model.name}' must be a group of model arguments")


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(f"config field {field!r} is {value!r}; choose one of {', '.join(choices)}")
