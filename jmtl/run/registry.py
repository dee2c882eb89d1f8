"""Names in a config -> jmtl objects: weighting methods, models, optimizers, penalties; and the config check.

Names resolve to code, with no tables kept here: a weighting method is a
built-in of :func:`jmtl.weighting.methods`, a model a constructor of
:mod:`jmtl.models`, an optimizer an attribute of :mod:`optax`, and a dotted
path (``my_package.my_module.factory``) names a user's own, with no edit here.
A named object's arguments are the config group of its last name part:
``model.name = "my_pkg.nets.wide"`` reads ``model.wide``, ``weighting =
"my_pkg.w.capped"`` reads ``weighting_args.capped`` (:func:`args_group`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jmtl import grads
from jmtl import models
from jmtl import relations as relations_lib
from jmtl import sharing
from jmtl import weighting as weighting_lib
from jmtl.run.config import ConfigError

SCHEDULES = ("constant", "cosine")


def resolve(name: str, namespace: dict[str, Callable], kind: str) -> Callable:
  """``namespace[name]``, or the object a dotted path ``package.module.attr`` names.

  Examples:
    >>> resolve("equal", weighting_lib.methods(), "weighting method").__name__
    'equal'
    >>> resolve("jmtl.weighting.last_layer", {}, "selector").__name__
    'last_layer'
  """
  if name in namespace:
    return namespace[name]
  if "." in name:
    module, _, attr = name.rpartition(".")
    try:
      obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError(f"{kind} {name!r}: cannot import it ({e})") from e
    if callable(obj):
      return obj
  raise ConfigError(f"unknown {kind} {name!r}; available: {', '.join(namespace)} (or a dotted path to your own)")


def args_group(name: str) -> str:
  """The config group that holds the arguments of the object ``name`` names: the last part of a dotted path.

  Examples:
    >>> args_group("mlp"), args_group("my_pkg.nets.wide")
    ('mlp', 'wide')
  """
  return name.rpartition(".")[2]


def model_constructors() -> dict[str, Callable]:
  """The constructors of :mod:`jmtl.models` (the public functions whose first argument is ``task_dims``).

  Examples:
    >>> {"mlp", "resnet", "mmoe"} <= set(model_constructors())
    True
  """
  out = {}
  for name in models.__all__:
    fn = getattr(models, name)
    if inspect.isfunction(fn) and next(iter(inspect.signature(fn).parameters), None) == "task_dims":
      out[name] = fn
  return out


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

  A name is a built-in method or a dotted path to a factory returning a
  :class:`~jmtl.weighting.WeightingTransform`, whose arguments are
  ``weighting_args.<last part>``. :func:`check_weighting` builds it without
  the task count, before the data is read.

  Examples:
    >>> c = ml_collections.ConfigDict({"weighting": "static", "static_weights": (1.0, 3.0), "weighting_args": {}})
    >>> make_weighting(c, 2)
    static(weights=[1.0, 3.0])
  """
  transforms = [_one_weighting(name, config, num_tasks) for name in method_names(config.weighting)]
  return transforms[0] if len(transforms) == 1 else weighting_lib.chain(*transforms)


def check_weighting(config: ml_collections.ConfigDict) -> None:
  """Builds every transform ``config.weighting`` names, with its arguments, before the task count is known.

  Everything but the number of ``static_weights`` is checked (``static``
  without weights is left to the run, or to a sweep's static grid).

  Examples:
    >>> c = ml_collections.ConfigDict({"weighting": "dwa", "static_weights": (), "weighting_args": {"dwa": {"t": 1}}})
    >>> check_weighting(c)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: weighting 'dwa' with arguments {'t': 1} (config field 'weighting_args.dwa'): ...
  """
  for name in method_names(config.weighting):
    if name != "static" or tuple(config.static_weights):
      _one_weighting(name, config, None)


def _one_weighting(name: str, config: ml_collections.ConfigDict, num_tasks: int | None):
  fn = resolve(name, weighting_lib.methods(), "weighting method")
  group = args_group(name)
  args = config.weighting_args.get(group) if "weighting_args" in config else None
  if args is not None and not isinstance(args, ml_collections.ConfigDict):
    raise ConfigError(f"config field 'weighting_args.{group}' must be a group of arguments, got {args!r}")
  kwargs = args.to_dict() if isinstance(args, ml_collections.ConfigDict) else {}
  if name == "static":
    weights = tuple(config.static_weights)
    if num_tasks is not None and len(weights) != num_tasks:
      raise ConfigError(
        f"config field 'static_weights' has {len(weights)} weights for {num_tasks} tasks; "
        f"set e.g. --config.static_weights='{tuple([1.0] * num_tasks)}'"
      )
    kwargs["weights"] = [float(w) for w in weights]
  if isinstance(kwargs.get("select"), str):  # a selector by name: last_layer, or a dotted path
    kwargs["select"] = resolve(kwargs["select"], {"last_layer": weighting_lib.last_layer}, "selector")
  where = f"weighting {name!r} with arguments {kwargs}" + (
    f" (config field 'weighting_args.{group}')" if kwargs else ""
  )
  try:
    out = fn(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from e
  if not isinstance(out, weighting_lib.WeightingTransform):
    raise ConfigError(f"{where} returned {type(out).__name__}, not a jmtl.weighting.WeightingTransform")
  return out


def make_model(config: ml_collections.ConfigDict, task_dims: Mapping[str, int]) -> models.MultiTaskModel:
  """The model ``config.model.name`` names, built from ``config.model[name]`` fields.

  The name is a constructor of :mod:`jmtl.models` or a dotted path to a
  user's ``factory(task_dims, **fields) -> MultiTaskModel``, whose fields are
  ``config.model.<last part>`` (:func:`args_group`).

  ``config.model.dtype`` (optional) is the computation dtype of models that
  take one (``"bfloat16"`` on accelerators; parameters stay float32); a model
  without a ``dtype`` argument accepts only float32. A
  constructor with a ``num_steps`` argument (a schedule laid out over the
  training length, as :func:`~jmtl.models.ltb`'s) gets ``config.num_steps``
  unless its group sets ``num_steps``.

  Examples:
    >>> c = ml_collections.ConfigDict({"model": {"name": "mlp", "mlp": {"hidden": (8,)}}})
    >>> make_model(c, {"a": 3}).task_names
    ('a',)
  """
  name = config.model.name
  constructor = resolve(name, model_constructors(), "model (config field 'model.name')")
  group = _model_group(config)
  fields = config.model.get(group)
  kwargs = fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else {}
  if "num_steps" in inspect.signature(constructor).parameters and "num_steps" not in kwargs and "num_steps" in config:
    kwargs["num_steps"] = config.num_steps
  dtype = config.model.get("dtype")
  if dtype is not None and "dtype" not in kwargs:
    try:
      dtype = jnp.dtype(dtype)
    except TypeError as e:
      raise ConfigError(f"config field 'model.dtype' = {dtype!r} is not a dtype (float32, bfloat16, ...)") from e
    if "dtype" in inspect.signature(constructor).parameters:
      kwargs["dtype"] = dtype
    elif dtype != jnp.float32:  # float32, the default, is what a model without the argument computes in
      raise ConfigError(f"config field 'model.dtype' = {dtype.name!r}: model {name!r} takes no computation dtype")
  try:
    model = constructor(dict(task_dims), **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model {name!r} with fields model.{group} = {kwargs}: {e}") from e
  if not isinstance(model, models.MultiTaskModel):
    raise ConfigError(
      f"model {name!r} returned {type(model).__name__}, not a jmtl.models.MultiTaskModel "
      "(wrap your own with jmtl.models.from_nnx, from_equinox, or build one: see the README)"
    )
  return model


def _model_group(config: ml_collections.ConfigDict) -> str:
  """``model.<group>``: the fields of ``config.model.name``'s constructor (its last name part)."""
  group = args_group(config.model.name)
  if group in ("name", "dtype"):
    raise ConfigError(f"model {config.model.name!r}: its fields would be model.{group}, a reserved field; rename it")
  return group


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer ``config.optimizer.name`` names (an attribute of optax), with its learning-rate schedule.

  ``momentum`` and ``weight_decay`` are passed when the optimizer takes them
  and they are set; ``config.optimizer.args`` (optional) holds any other
  keyword arguments of the optax function.

  Examples:
    >>> c = ml_collections.ConfigDict({"num_steps": 10, "optimizer": {"name": "sgd", "learning_rate": 0.1,
    ...   "schedule": "cosine", "warmup_steps": 2, "momentum": 0.9, "weight_decay": 0.0}})
    >>> type(make_optimizer(c)).__name__
    'GradientTransformationExtraArgs'
  """
  o = config.optimizer
  factory = getattr(optax, o.name, None) if isinstance(o.name, str) else None
  if not callable(factory) or "learning_rate" not in inspect.signature(factory).parameters:
    raise ConfigError(
      f"config field 'optimizer.name' is {o.name!r}: not an optax optimizer taking a learning_rate "
      "(e.g. adam, adamw, sgd, lion, adafactor)"
    )
  lr: Any = float(o.learning_rate)
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, o.warmup_steps, max(config.num_steps, o.warmup_steps + 1))
  elif o.warmup_steps:
    lr = optax.linear_schedule(0.0, lr, o.warmup_steps)
  accepted = inspect.signature(factory).parameters
  kwargs = {k: o[k] for k in ("momentum", "weight_decay") if k in accepted and o[k]}
  extra = o.get("args")
  kwargs.update(extra.to_dict() if isinstance(extra, ml_collections.ConfigDict) else {})
  try:
    return factory(learning_rate=lr, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"optimizer {o.name!r} with arguments {kwargs}: {e}") from e


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


#: The ``relations`` group's fields and their defaults (a config without the group tracks nothing).
RELATIONS_DEFAULTS = {
  "every": 0,
  "lookahead_lr": 0.1,
  "tasks": "",
  "chunk_size": relations_lib.CHUNK_SIZE,
  "groups": 0,
  "transfer_sigmas": 2.0,
  "transfer_min_gap": 2.0,
  "transfer_patience": 3,
}


def relations_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``relations`` fields of ``config``, with the defaults of :data:`RELATIONS_DEFAULTS` where absent.

  Examples:
    >>> relations_fields(ml_collections.ConfigDict({"relations": {"every": 5}}))["every"]
    5
  """
  group = config.get("relations")
  given = group.to_dict() if isinstance(group, ml_collections.ConfigDict) else {}
  return {**RELATIONS_DEFAULTS, **given}


def make_relations(config: ml_collections.ConfigDict, names: Sequence[str]) -> relations_lib.Relations | None:
  """The relations tracker of ``config.relations`` (``None`` when ``every`` is 0 or there is one task).

  ``lookahead_lr`` 0 means the optimizer's learning rate (TAG's choice);
  ``tasks`` is a comma-separated subset to track ("" for all).

  Examples:
    >>> c = ml_collections.ConfigDict({"relations": {"every": 10, "lookahead_lr": 0.1, "tasks": ""}})
    >>> make_relations(c, ["a", "b"])
    tracker(every=10, lookahead_lr=0.1)
    >>> make_relations(ml_collections.ConfigDict({"relations": {"every": 10, "tasks": "z"}}), ["a", "b"])
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: config field 'relations.tasks': unknown tasks ['z']; the run has ['a', 'b']
  """
  r = relations_fields(config)
  every = r["every"]
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ConfigError(f"config field 'relations.every' must be an int of at least 0 (0: off), got {every!r}")
  wanted = [t.strip() for t in str(r["tasks"]).split(",") if t.strip()]
  unknown = [t for t in wanted if t not in names]
  if unknown:
    raise ConfigError(f"config field 'relations.tasks': unknown tasks {unknown}; the run has {list(names)}")
  if every == 0 or len(names) < 2:
    return None
  lr = r["lookahead_lr"] or config.optimizer.learning_rate
  try:
    return relations_lib.tracker(every, float(lr), wanted or None, r["chunk_size"] or None)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config field 'relations': {e}") from e


def _check_relations(config: ml_collections.ConfigDict) -> None:
  """The ``relations`` group's fields, when present: types and ranges."""
  r = relations_fields(config)
  unknown = sorted(set(r) - set(RELATIONS_DEFAULTS))
  if unknown:
    raise ConfigError(f"unknown config fields {[f'relations.{u}' for u in unknown]} (see configs/multi_digits.py)")
  for field in ("every", "chunk_size", "groups", "transfer_patience"):
    v = r[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < (1 if field == "transfer_patience" else 0):
      raise ConfigError(f"config field 'relations.{field}' must be an int of at least 0 (patience: 1), got {v!r}")
  for field in ("lookahead_lr", "transfer_sigmas", "transfer_min_gap"):
    v = r[field]
    if isinstance(v, bool) or not isinstance(v, int | float) or not (v >= 0 and v < float("inf")):
      raise ConfigError(f"config field 'relations.{field}' must be a number of at least 0, got {v!r}")


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
  _check_watch_fields(config)
  _check_relations(config)
  resolve(config.model.name, model_constructors(), "model (config field 'model.name')")
  make_optimizer(config)
  _check_choice("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  _check_choice("sharing.kind", config.sharing.kind, sharing.KINDS)
  for field, choices in grads.CHOICES.items():
    _check_choice(f"grad.{field}", config.grad[field], choices)
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
  check_weighting(config)  # names and arguments, before any data is read
  group = _model_group(config)
  if not isinstance(config.model.get(group, ml_collections.ConfigDict()), ml_collections.ConfigDict):
    raise ConfigError(f"config field 'model.{group}' must be a group of model arguments")


def _check_watch_fields(config: ml_collections.ConfigDict) -> None:
  """The optional fields that watch a run (``checks``, ``max_skipped_fraction``, ``skip_window``), when present."""
  checks = config.get("checks", False)
  if not isinstance(checks, bool):
    raise ConfigError(f"config field 'checks' must be true or false, got {checks!r}")
  fraction = config.get("max_skipped_fraction", 0.1)
  if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
    raise ConfigError(
      f"config field 'max_skipped_fraction' must be a number from 0 to 1 (1: never stop), got {fraction!r}"
    )
  window = config.get("skip_window", 100)
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ConfigError(f"config field 'skip_window' must be an int of at least 1, got {window!r}")


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(f"config field {field!r} is {value!r}; choose one of {', '.join(choices)}")
