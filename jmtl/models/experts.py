"""Multi-gate mixtures of experts: MMoE, CGC and PLE.

All three mix MLP experts with per-task softmax gates, so every task sees its
own combination of the experts: there is no single shared representation and
``encode = head = None`` (the gradient engine uses its general path). The
experts of one group (all shared experts of a level, or one task's experts)
are identically shaped; their parameters are stacked on a leading expert axis
and evaluated with one :func:`jax.vmap`, i.e. one batched kernel per layer.
The building blocks live in :mod:`jmtl.models._experts_common`;
:func:`jmtl.models.dselect_k` uses them too, with a sparse gate.

Gates are affine maps followed by a softmax, ``softmax(W x + b)``: the papers
write ``W x``; the bias adds an input-independent preference per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl.models import _common
from jmtl.models import _experts_common as _ec
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any


# --- MMoE ---------------------------------------------------------------------


def mmoe(
  task_dims: Mapping[str, int],
  num_experts: int = 4,
  expert_hidden: Sequence[int] = (64,),
  tower_hidden: Sequence[int] = (),
  *,
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Multi-gate Mixture-of-Experts: shared experts, one softmax gate and tower per task.

  Ma, Zhao, Yi, Chen, Hong, Chi (2018), "Modeling Task Relationships in
  Multi-task Learning with Multi-gate Mixture-of-Experts", KDD.

  With ``x`` the flattened input, experts ``fᵢ`` (MLPs of widths
  ``expert_hidden``, every layer activated) and per-task gates
  ``gₖ(x) = softmax(Wₖ x + bₖ)`` over the experts, task ``k`` predicts
  ``yₖ = hₖ(Σᵢ gₖ(x)ᵢ fᵢ(x))`` with ``hₖ`` an MLP tower of widths
  ``(*tower_hidden, task_dims[k])`` (no activation on the output). Parameters::

      {"shared": {"experts": {"dense_0": {"kernel": (E, F, H0), "bias": (E, H0)}, ...}},
       "tasks": {name: {"gate": {"kernel": (F, E), "bias": (E,)}, "tower": {"dense_0": ...}}}}

  The experts run as one :func:`jax.vmap` over the stacked parameters. With
  ``num_experts=1`` the gate is the constant 1 and the model is hard sharing
  with the expert as trunk. ``encode``/``head`` are ``None``: each task mixes
  the experts differently, so there is no one shared representation.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    num_experts: number of shared experts ``E``.
    expert_hidden: expert layer widths (at least one); the last is the
      expert output size.
    tower_hidden: hidden widths of each task tower; ``()`` for linear towers.
    activation: nonlinearity of the experts and of hidden tower layers.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: on bad ``task_dims``, sizes or counts, and in ``apply`` when
      the inputs do not match the parameters or a task is missing.

  >>> import jax, jax.numpy as jnp
  >>> model = mmoe({"a": 3, "b": 2}, num_experts=4, expert_hidden=(8,))
  >>> x = jnp.ones((5, 2, 3))
  >>> params = model.init(jax.random.key(0), x)
  >>> params["shared"]["experts"]["dense_0"]["kernel"].shape, params["tasks"]["a"]["gate"]["kernel"].shape
  ((4, 6, 8), (6, 4))
  >>> preds, _ = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}
  {'a': (5, 3), 'b': (5, 2)}
  """
  layers = _ec.LayerSpec(activation, dtype, param_dtype)
  sizes = {"expert_hidden": expert_hidden, "tower_hidden": tower_hidden}
  return _mmoe_parts("mmoe", task_dims, num_experts=num_experts, **sizes, layers=layers)[0]


def _mmoe_parts(
  where: str,
  task_dims: Mapping[str, int],
  *,
  num_experts: int,
  expert_hidden: Sequence[int],
  tower_hidden: Sequence[int],
  layers: _ec.LayerSpec = _ec.DEFAULT_LAYERS,
) -> tuple[MultiTaskModel, Callable]:
  """The MMoE model and its ``forward`` (predictions and gates ``{task: (B, E)}``)."""
  activation, dtype, param_dtype = layers
  dims = _common.validate_task_dims(task_dims, where)
  num_experts = _common.positive_int(num_experts, "num_experts", where)
  sizes = _ec.expert_sizes(expert_hidden, where)
  tower_hidden = _common.validate_sizes(tower_hidden, "tower_hidden", where)
  _common.check_activation(activation, where)
  names = tuple(dims)
  expert = _ec.expert_module(sizes, activation, dtype, param_dtype)
  gate = nn.Dense(num_experts, dtype=dtype, param_dtype=param_dtype)
  towers = _common.dense_heads(dims, tower_hidden, activation, dtype, param_dtype)

  def init(key: Array, inputs: Array) -> Params:
    shape, in_dtype = _ec.flat_shape(inputs)
    keys = jax.random.split(key, 1 + 2 * len(names))
    experts = _ec.init_stack(expert, keys[0], num_experts, shape, in_dtype)
    z = _ec.out_spec(expert, experts, shape[1], in_dtype)
    tasks = {
      name: {
        "gate": _common.init_module(gate, keys[1 + i], shape, in_dtype),
        "tower": _common.init_module(towers[name], keys[1 + len(names) + i], z.shape, z.dtype),
      }
      for i, name in enumerate(names)
    }
    return {"shared": {"experts": experts}, "tasks": tasks}

  def forward(params: Params, inputs: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    _common.check_tasks(params, names, where)
    stacked = params["shared"]["experts"]
    x = _ec.flat_input(inputs, where, _ec.in_features(stacked))
    outs = _ec.run_stack(expert, stacked, x)  # (E, B, H)
    gates = {name: _ec.softmax_gate(gate, params["tasks"][name]["gate"], x) for name in names}
    preds = {
      name: towers[name].apply({"params": params["tasks"][name]["tower"]}, _ec.mix(gates[name], outs)) for name in names
    }
    return preds, gates

  apply = stateless(lambda params, inputs: forward(params, inputs)[0])
  model = MultiTaskModel(init=init, apply=apply, encode=None, head=None, task_names=names)
  return model, forward


# --- CGC / PLE ----------------------------------------------------------------


def _extraction(
  where: str,
  task_dims: Mapping[str, int],
  *,
  num_levels: int,
  num_shared_experts: int,
  num_task_experts: int,
  expert_hidden: Sequence[int],
  tower_hidden: Sequence[int],
  layers: _ec.LayerSpec = _ec.DEFAULT_LAYERS,
) -> tuple[MultiTaskModel, Callable]:
  """The PLE model (CGC when ``num_levels == 1``) and its ``forward`` (predictions and gates)."""
  activation, dtype, param_dtype = layers
  dims = _common.validate_task_dims(task_dims, where)
  num_levels = _common.positive_int(num_levels, "num_levels", where)
  n_s = _common.positive_int(num_shared_experts, "num_shared_experts", where)
  n_t = _common.positive_int(num_task_experts, "num_task_experts", where)
  sizes = _ec.expert_sizes(expert_hidden, where)
  tower_hidden = _common.validate_sizes(tower_hidden, "tower_hidden", where)
  _common.check_activation(activation, where)
  names = tuple(dims)
  num_tasks = len(names)
  expert = _ec.expert_module(sizes, activation, dtype, param_dtype)
  task_gate = nn.Dense(n_t + n_s, dtype=dtype, param_dtype=param_dtype)
  shared_gate = nn.Dense(num_tasks * n_t + n_s, dtype=dtype, param_dtype=param_dtype)
  towers = _common.dense_heads(dims, tower_hidden, activation, dtype, param_dtype)
  levels = [f"level_{i}" for i in range(num_levels)]

  def init(key: Array, inputs: Array) -> Params:
    shape, in_dtype = _ec.flat_shape(inputs)
    # Per level: shared experts, shared gate, then per task experts and gate; then the towers.
    keys = iter(jax.random.split(key, num_levels * (2 + 2 * num_tasks) + num_tasks))
    shared: dict[str, Params] = {}
    tasks: dict[str, dict[str, Params]] = {name: {} for name in names}
    for lvl_index, lvl in enumerate(levels):
      shared[lvl] = {"experts": _ec.init_stack(expert, next(keys), n_s, shape, in_dtype)}
      gate_key = next(keys)
      if lvl_index < num_levels - 1:
        shared[lvl]["gate"] = _common.init_module(shared_gate, gate_key, shape, in_dtype)
      for name in names:
        tasks[name][lvl] = {
          "experts": _ec.init_stack(expert, next(keys), n_t, shape, in_dtype),
          "gate": _common.init_module(task_gate, next(keys), shape, in_dtype),
        }
      z = _ec.out_spec(expert, shared[lvl]["experts"], shape[1], in_dtype)
      shape, in_dtype = (shape[0], z.shape[1]), z.dtype
    for name in names:
      tasks[name]["tower"] = _common.init_module(towers[name], next(keys), shape, in_dtype)
    return {"shared": shared, "tasks": tasks}

  def forward(params: Params, inputs: Array) -> tuple[dict[str, Array], list[dict[str, Array]]]:
    """Predictions, and per level the gate values ``{task: (B, n_t + n_s)}`` (plus ``"shared"``)."""
    _common.check_tasks(params, names, where)
    shared, tasks = params["shared"], params["tasks"]
    x = _ec.flat_input(inputs, where, _ec.in_features(shared[levels[0]]["experts"]))
    task_in = dict.fromkeys(names, x)
    shared_in = x
    all_gates = []
    for lvl_index, lvl in enumerate(levels):
      shared_out = _ec.run_stack(expert, shared[lvl]["experts"], shared_in)  # (n_s, B, H)
      task_out = {name: _ec.run_stack(expert, tasks[name][lvl]["experts"], task_in[name]) for name in names}
      gates = {name: _ec.softmax_gate(task_gate, tasks[name][lvl]["gate"], task_in[name]) for name in names}
      next_in = {name: _ec.mix(gates[name], jnp.concatenate([task_out[name], shared_out])) for name in names}
      if lvl_index < num_levels - 1:
        # The shared path mixes every task's experts: this is what couples the tasks in PLE.
        gates["shared"] = _ec.softmax_gate(shared_gate, shared[lvl]["gate"], shared_in)
        shared_in = _ec.mix(gates["shared"], jnp.concatenate([*(task_out[n] for n in names), shared_out]))
      task_in = next_in
      all_gates.append(gates)
    preds = {name: towers[name].apply({"params": tasks[name]["tower"]}, task_in[name]) for name in names}
    return preds, all_gates

  apply = stateless(lambda params, inputs: forward(params, inputs)[0])
  model = MultiTaskModel(init=init, apply=apply, encode=None, head=None, task_names=names)
  return model, forward


def cgc(
  task_dims: Mapping[str, int],
  num_shared_experts: int = 2,
  num_task_experts: int = 1,
  expert_hidden: Sequence[int] = (64,),
  tower_hidden: Sequence[int] = (),
  *,
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Customized Gate Control: shared and task-specific experts, one gate per task.

  Tang, Liu, Zhao, Gong (2020), "Progressive Layered Extraction (PLE): A Novel
  Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys.

  Task ``k`` owns ``num_task_experts`` experts and a gate
  ``gₖ(x) = softmax(Wₖ x + bₖ)`` over ``[its own experts, the shared
  experts]`` (in that order); its tower reads the gated mixture. CGC is
  :func:`ple` with ``num_levels=1`` and has its parameter layout::

      {"shared": {"level_0": {"experts": stacked (n_s, ...)}},
       "tasks": {name: {"level_0": {"experts": stacked (n_t, ...), "gate": {...}}, "tower": {...}}}}

  The split is separable: ``tasks[a]`` never changes the prediction of task
  ``b`` (task experts only feed their own task's gate).

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    num_shared_experts: shared experts ``n_s`` (at least one).
    num_task_experts: experts per task ``n_t`` (at least one).
    expert_hidden: expert layer widths (at least one, every layer activated).
    tower_hidden: hidden widths of each task tower.
    activation: nonlinearity of experts and hidden tower layers.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: on bad ``task_dims``, sizes or counts, and in ``apply`` when
      the inputs do not match the parameters or a task is missing.

  >>> import jax, jax.numpy as jnp
  >>> model = cgc({"a": 3, "b": 2}, num_shared_experts=2, num_task_experts=1, expert_hidden=(8,))
  >>> x = jnp.ones((5, 6))
  >>> params = model.init(jax.random.key(0), x)
  >>> params["tasks"]["a"]["level_0"]["gate"]["kernel"].shape
  (6, 3)
  >>> preds, _ = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}
  {'a': (5, 3), 'b': (5, 2)}
  """
  experts = {"num_shared_experts": num_shared_experts, "num_task_experts": num_task_experts}
  sizes = {"expert_hidden": expert_hidden, "tower_hidden": tower_hidden}
  layers = _ec.LayerSpec(activation, dtype, param_dtype)
  return _extraction("cgc", task_dims, num_levels=1, **experts, **sizes, layers=layers)[0]


def ple(
  task_dims: Mapping[str, int],
  num_levels: int = 2,
  num_shared_experts: int = 2,
  num_task_experts: int = 1,
  expert_hidden: Sequence[int] = (64,),
  *,
  tower_hidden: Sequence[int] = (),
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Progressive Layered Extraction: stacked CGC levels with a shared path.

  Tang, Liu, Zhao, Gong (2020), "Progressive Layered Extraction (PLE): A Novel
  Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys.

  Every level has shared experts and ``num_task_experts`` experts per task.
  Level 0 reads the flattened input ``x`` on every path. At level ``l``,
  task ``k``'s experts read task ``k``'s previous output and its gate
  (``softmax`` of an affine map of that same input) mixes ``[task k experts,
  shared experts]``; the shared experts read the shared path's previous
  output and, at every level but the last, a shared gate mixes ``[task 1
  experts, ..., task K experts, shared experts]`` into the next shared input.
  The last level has task gates only (it is a CGC), and each tower reads its
  task's last output. Parameters::

      {"shared": {"level_0": {"experts": stacked (n_s, ...), "gate": {...}}, ...,
                  "level_{L-1}": {"experts": ...}},
       "tasks": {name: {"level_0": {"experts": stacked (n_t, ...), "gate": {...}}, ...,
                        "tower": {...}}}}

  Not separable when ``num_levels > 1``: task ``a``'s experts at level ``l <
  L-1`` feed the shared gate, whose output feeds every task at level
  ``l + 1``, so ``params["tasks"][a]`` changes the prediction of task ``b``.
  Gradient-based weightings still see only the ``shared`` Jacobian (the
  convention), so a task's loss also moves other tasks' parameters.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    num_levels: extraction levels ``L`` (1 gives :func:`cgc`).
    num_shared_experts: shared experts per level ``n_s`` (at least one).
    num_task_experts: experts per task per level ``n_t`` (at least one).
    expert_hidden: expert layer widths, the same at every level.
    tower_hidden: hidden widths of each task tower.
    activation: nonlinearity of experts and hidden tower layers.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: on bad ``task_dims``, sizes or counts, and in ``apply`` when
      the inputs do not match the parameters or a task is missing.

  >>> import jax, jax.numpy as jnp
  >>> model = ple({"a": 3, "b": 2}, num_levels=2, expert_hidden=(8,))
  >>> x = jnp.ones((5, 6))
  >>> params = model.init(jax.random.key(0), x)
  >>> sorted(params["shared"]["level_0"]), sorted(params["shared"]["level_1"])
  (['experts', 'gate'], ['experts'])
  >>> params["shared"]["level_0"]["gate"]["kernel"].shape  # over 2 tasks x 1 + 2 shared experts
  (6, 4)
  >>> preds, _ = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}
  {'a': (5, 3), 'b': (5, 2)}
  """
  experts = {"num_shared_experts": num_shared_experts, "num_task_experts": num_task_experts}
  sizes = {"expert_hidden": expert_hidden, "tower_hidden": tower_hidden}
  layers = _ec.LayerSpec(activation, dtype, param_dtype)
  return _extraction("ple", task_dims, num_levels=num_levels, **experts, **sizes, layers=layers)[0]
