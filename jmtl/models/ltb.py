"""Learning to Branch (LTB): K branches per layer, each picking its parent by Gumbel-softmax; a tree once trained.

Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020.
:func:`ltb` is the model searched during training (every layer has one copy,
a *branch*, per task; every branch and every task head picks one parent in
the layer below), :func:`ltb_export` the tree it settles on (branches that
end up with the same ancestry are one shared layer) as a model of its own.
The pieces: :func:`hard_gumbel_softmax` (the sampling rule),
:func:`ltb_temperature` (the default temperature curve), :func:`ltb_schedule`
(warm-up and temperature from a model's arguments), :func:`ltb_mixing` (the
rule at one step) and :func:`ltb_tree` (the tree read off the parameters).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl.models import _common
from jmtl.models import _experts_common as _ec
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any

_WHERE = "ltb"


def ltb_temperature(step: Any, initial_temperature: float = 5.0, decay_steps: float = 30.0) -> Array:
  """The default Gumbel-softmax temperature at a training step: ``τ(s) = τ₀ / √(1 + s / decay_steps)``.

  LibMTL's LTB uses ``τ = (E/20) / √(e + 1)`` at epoch ``e`` of ``E``; with
  ``decay_steps`` the steps of one epoch and ``τ₀ = E/20`` this is the same
  curve in steps (continuous rather than constant within an epoch). The
  defaults of :func:`ltb` take ``E = 100``: ``τ₀ = 5`` and ``decay_steps =
  num_steps / 100``, so ``τ`` falls from 5 (3.5 when the 1 % warm-up ends)
  to 0.5 at the last step.

  Args:
    step: the training step ``s`` (an int or an int array).
    initial_temperature: ``τ₀ = τ(0)``, positive.
    decay_steps: the steps over which ``τ`` falls by ``√2`` the first time, positive.

  Returns:
    ``τ(s)`` as a float32 array.

  >>> [round(float(ltb_temperature(s, 5.0, 30.0)), 4) for s in (0, 30, 90, 2970)]
  [5.0, 3.5355, 2.5, 0.5]
  """
  s = jnp.asarray(step, jnp.float32)
  return jnp.asarray(initial_temperature, jnp.float32) / jnp.sqrt(1.0 + s / decay_steps)


def hard_gumbel_softmax(logits: Array, key: Array, temperature: Any) -> Array:
  """One parent per row: a one-hot sample from ``softmax(logits)`` with the soft relaxation's gradient.

  With Gumbel noise ``g`` (i.i.d. ``Gumbel(0, 1)``, one per entry), the soft
  sample is ``y = softmax((logits + g) / τ)`` along the last axis and the hard
  one ``h = onehot(argmax(logits + g))``; this returns ``h + (y −
  stop_gradient(y))``: exactly ``h`` in the forward pass, ``∂y/∂logits`` in
  the backward pass (the straight-through estimator of Jang, Gu & Poole,
  2017). ``h`` is a sample of the categorical ``softmax(logits)`` whatever
  ``τ`` (the Gumbel-max trick); ``τ`` sets how close ``y`` is to ``h``: a
  small ``τ`` gives a less biased but higher-variance gradient, a large one a
  smoother, more biased one.

  Args:
    logits: ``(..., n)`` unnormalised log-probabilities.
    key: the PRNG key of the noise.
    temperature: ``τ > 0``, a scalar (or an array that broadcasts).

  Returns:
    ``(..., n)`` rows that are one-hot in value, in the dtype of ``logits``.

  >>> import jax, jax.numpy as jnp
  >>> y = hard_gumbel_softmax(jnp.array([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]]), jax.random.key(0), 1.0)
  >>> y.tolist()
  [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
  """
  logits = jnp.asarray(logits)
  noisy = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  soft = jax.nn.softmax(noisy / jnp.asarray(temperature, logits.dtype), axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(noisy, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))  # the bracket is exactly 0 in value


def ltb_mixing(
  alpha: Array,
  step: Any,
  key: Array,
  *,
  train: bool,
  warmup_steps: int,
  temperature: Callable[[Array], Array],
) -> Array:
  """The mixing matrix ``M`` of one level: child ``t``'s input is ``Σⱼ M[t, j] · (parent j's output)``.

  * ``train=True`` and ``step < warmup_steps``: the uniform ``M = 1/K`` (every
    child reads the mean of the K parents; ``alpha`` gets no gradient);
  * ``train=True`` after that: ``M = hard_gumbel_softmax(alpha, key,
    temperature(step))``, one sampled parent per row;
  * ``train=False``: ``M = onehot(argmax alpha)``, the most probable parent
    of each row (the exported tree's).

  Args:
    alpha: ``(K, K)`` parent logits; row ``t`` is child ``t``'s.
    step: the training step (an int or an int array).
    key: the PRNG key of this level's noise (``train=True`` only).
    train: sample (``True``) or take the argmax (``False``).
    warmup_steps: steps of uniform mixing at the start of training.
    temperature: ``temperature(step) -> τ``.

  Returns:
    ``M``, ``(K, K)`` in the dtype of ``alpha``.

  >>> import jax, jax.numpy as jnp
  >>> a = jnp.array([[0.0, 1.0], [3.0, 0.0]])
  >>> ltb_mixing(a, 0, None, train=False, warmup_steps=10, temperature=ltb_temperature).tolist()
  [[0.0, 1.0], [1.0, 0.0]]
  >>> ltb_mixing(a, 3, jax.random.key(0), train=True, warmup_steps=10, temperature=ltb_temperature).tolist()
  [[0.5, 0.5], [0.5, 0.5]]
  """
  alpha = jnp.asarray(alpha)
  k = alpha.shape[-1]
  if not train:
    return jax.nn.one_hot(jnp.argmax(alpha, axis=-1), k, dtype=alpha.dtype)
  step = jnp.asarray(step)
  sampled = hard_gumbel_softmax(alpha, key, temperature(step))
  return jnp.where(step < warmup_steps, jnp.full_like(alpha, 1.0 / k), sampled)


class LTBSchedule(NamedTuple):
  """When an LTB model samples its parents, and how soft their gradient is: see :func:`ltb_schedule`."""

  warmup_steps: int  # training steps of uniform mixing first
  temperature: Callable[[Any], Array]  # step -> τ


def ltb_schedule(
  num_steps: int | None = None,
  warmup_steps: int | None = None,
  temperature: float | Callable[[Any], Array] = 5.0,
  decay_steps: float | None = None,
) -> LTBSchedule:
  """The warm-up length and temperature schedule of :func:`ltb` from its arguments (checked).

  ``warmup_steps`` defaults to ``num_steps // 100``; a float ``temperature``
  is ``τ₀`` of ``τ(s) = τ₀ / √(1 + s / decay_steps)`` (:func:`ltb_temperature`)
  with ``decay_steps`` defaulting to ``max(num_steps / 100, 1)``; a callable
  ``temperature(step) -> τ`` is used as it is. ``num_steps`` is needed only
  for a default.

  Raises:
    ValueError: naming the argument that is missing or out of range.

  >>> s = ltb_schedule(num_steps=3000)
  >>> s.warmup_steps, round(float(s.temperature(30)), 4), round(float(s.temperature(2970)), 4)
  (30, 3.5355, 0.5)
  """
  if num_steps is not None:
    num_steps = _common.positive_int(num_steps, "num_steps", _WHERE)
  if warmup_steps is None:
    if num_steps is None:
      raise ValueError(f"{_WHERE}: num_steps is None: give num_steps (the training length) or warmup_steps")
    warmup_steps = num_steps // 100
  warmup_steps = _common.positive_int(warmup_steps, "warmup_steps", _WHERE, minimum=0)
  if callable(temperature):
    if decay_steps is not None:
      raise ValueError(f"{_WHERE}: decay_steps is for the default schedule; a callable temperature replaces it")
    return LTBSchedule(warmup_steps, temperature)
  tau0 = _number(temperature, "temperature")
  if decay_steps is None:
    if num_steps is None:
      raise ValueError(f"{_WHERE}: num_steps is None: give num_steps (the training length) or decay_steps")
    decay_steps = max(num_steps / 100, 1.0)
  decay = _number(decay_steps, "decay_steps")
  return LTBSchedule(warmup_steps, lambda step: ltb_temperature(step, tau0, decay))


class LTBTree(NamedTuple):
  """The discrete architecture of an LTB model: every node's most probable parent, and the tree it makes.

  Attributes:
    task_names: the tasks, in order.
    parents: one tuple per level ``dense_1, ..., dense_{L-1}``, then the
      heads: ``parents[i][j]`` is the branch of the layer below that child
      ``j`` of level ``i`` reads (``argmax`` of its row of ``alpha``).
    paths: ``paths[k][i]`` is the branch of layer ``i`` on task ``k``'s way
      from the input to its head (followed down from the head).
  """

  task_names: tuple[str, ...]
  parents: tuple[tuple[int, ...], ...]
  paths: tuple[tuple[int, ...], ...]

  def groups(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Per layer, the groups of tasks that share one node (ordered by branch index).

    >>> LTBTree(("a", "b", "c"), ((0, 0, 2), (0, 0, 2)), ((0, 0), (0, 0), (0, 2))).groups()
    ((('a', 'b', 'c'),), (('a', 'b'), ('c',)))
    """
    out = []
    for i in range(len(self.paths[0])):
      by_branch: dict[int, list[str]] = {}
      for name, path in zip(self.task_names, self.paths):
        by_branch.setdefault(path[i], []).append(name)
      out.append(tuple(tuple(by_branch[b]) for b in sorted(by_branch)))
    return tuple(out)

  def describe(self) -> str:
    """One line per layer: the task groups sharing a node.

    >>> print(LTBTree(("a", "b", "c"), ((0, 0, 2), (0, 0, 2)), ((0, 0), (0, 0), (0, 2))).describe())
    dense_0: [a b c]
    dense_1: [a b] [c]
    """
    lines = []
    for i, groups in enumerate(self.groups()):
      lines.append(f"dense_{i}: " + " ".join("[" + " ".join(g) + "]" for g in groups))
    return "\n".join(lines)


class _Spec(NamedTuple):
  dims: dict[str, int]
  hidden: tuple[int, ...]
  activation: Callable[[Array], Array]
  dtype: Any
  param_dtype: Any


# The constructor arguments of every LTB model, by its ``apply``, for :func:`ltb_export`.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mix_levels(num_layers: int) -> tuple[str, ...]:
  """The names of the parent-logit matrices: ``dense_1 .. dense_{L-1}``, then ``head``."""
  return (*(f"dense_{i}" for i in range(1, num_layers)), "head")


def _number(value: Any, field: str) -> float:
  """Checks a positive finite number (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"{_WHERE}: {field} must be a positive finite number, got {value!r}")
  return float(value)


def ltb(
  task_dims: Mapping[str, int],
  hidden: Sequence[int] = (256, 256),
  *,
  num_steps: int | None = None,
  warmup_steps: int | None = None,
  temperature: float | Callable[[Array], Array] = 5.0,
  decay_steps: float | None = None,
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Learning to Branch: an MLP with one branch per task at every layer, each branch choosing its parent.

  Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML
  2020. The inputs are flattened to ``x``. Layer ``i`` (width ``hidden[i]``,
  ``i = 0 … L−1``) has K branches ``f_{i,1} … f_{i,K}`` (``Dense +
  activation``), and there is one linear head per task. Every branch of
  layer 0 reads ``x``; branch ``t`` of layer ``i ≥ 1`` and task ``t``'s head
  (level ``L``) read a mix of the outputs ``h_{i−1,j}`` of the layer below::

      h_{0,t} = f_{0,t}(x)
      h_{i,t} = f_{i,t}(Σⱼ M⁽ⁱ⁾[t, j] · h_{i−1,j})         i = 1 … L−1
      ŷ_t     = head_t(Σⱼ M⁽ᴸ⁾[t, j] · h_{L−1,j})

  with one ``(K, K)`` logit matrix ``α⁽ⁱ⁾`` per level (row ``t``: child
  ``t``'s preference over parents) and ``M⁽ⁱ⁾`` from :func:`ltb_mixing`:

  * training, ``s < warmup_steps``: ``M = 1/K`` (every child reads the mean
    of its K candidate parents; LibMTL uses all-ones, their sum);
  * training, ``s ≥ warmup_steps``: ``M = hard_gumbel_softmax(α, ·, τ(s))``,
    one parent ``argmax_j(α[t, j] + g_tj)``, ``g ~ Gumbel(0, 1)``, sampled per
    child and per step (the same for every example of the step), with the
    straight-through gradient of ``softmax((α + g)/τ)``;
  * inference (``train=False``): ``M = onehot(argmax α)``, the final tree.

  The schedule ``τ(s)``: with a float ``temperature``, ``τ(s) = temperature /
  √(1 + s / decay_steps)`` (:func:`ltb_temperature`); a callable
  ``temperature(step) -> τ`` (an optax schedule, say) replaces it. The
  defaults (:func:`ltb_schedule`) are LibMTL's schedule with E = 100 epochs
  spread over ``num_steps``: warm-up for the first 1 % of training, then
  ``τ(s) = 5 / √(1 + 100 s / num_steps)``, from 3.5 down to 0.5 (the paper
  anneals ``τ``; these values are LibMTL's, not the paper's). The sampled
  parent is distributed as ``softmax(α)`` at any ``τ`` (the Gumbel-max trick:
  ``τ`` shapes the gradient, not the sample), so branching becomes
  deterministic as training sharpens ``α``.

  The training step reaches the model through its state: ``model_state =
  {"step": int32, "seed": uint32}`` (``init_state`` draws the seed from its
  key). ``apply(..., train=True)`` draws the step's noise from
  ``fold_in(key(seed), step)`` and returns the state with ``step + 1``; in
  inference mode the state is passed through unchanged (and not read). The
  model is therefore ``stateful``: :func:`jmtl.make_train_step` threads the
  state; a step skipped for a non-finite gradient keeps the old state, so
  ``step`` counts the updates applied. Every device of a data-parallel step
  holds the same state, so all of them sample the same architecture.

  Parameters::

      {"shared": {"branches": {"dense_i": {"kernel": (K, in_i, hidden[i]), "bias": (K, hidden[i])}, ...},
                  "alpha": {"dense_1": (K, K), ..., "dense_{L-1}": (K, K), "head": (K, K)}},
       "tasks": {name: {"head": {"dense_0": {"kernel": (hidden[-1], dim), "bias": (dim,)}}}}}

  Branches and ``α`` are ``shared``: branch ``t`` of a layer is not task
  ``t``'s own (any task whose path reaches it trains it, and after export it
  is the shared layer of every task below it), and every task's loss reaches
  the ``α`` of the levels on its path. Only the heads are per task. (Row
  ``t`` of ``α["head"]`` is read by task ``t`` alone, as cross-stitch's last
  stitch row is; it stays with the other logits.) ``α`` starts at zero: all
  parents equally likely. There is no single shared representation:
  ``encode = head = None`` and the gradient engine takes its general path.
  To train ``α`` at a learning rate of its own, use
  ``optax.multi_transform`` over ``params["shared"]["alpha"]``.

  As in LibMTL's version, every layer has K nodes, one per task; the layers
  here are ``Dense`` on flattened inputs (LibMTL branches the blocks of a
  ResNet encoder, and the paper's experiments use convolutional networks).

  Args:
    task_dims: task name -> output dimension; the order fixes the task order
      (branch ``t`` and row ``t`` of every ``α`` are task ``t``'s).
    hidden: the layer widths, at least one layer.
    num_steps: the training length the default schedule is laid out over
      (``warmup_steps = num_steps // 100``, ``decay_steps = num_steps / 100``);
      needed only for those defaults. The runner passes its ``num_steps``.
    warmup_steps: training steps of uniform mixing first (``>= 0``).
    temperature: ``τ₀`` of the default schedule (``> 0``), or a callable
      ``step -> τ``.
    decay_steps: the default schedule's time scale (``> 0``).
    activation: the branches' nonlinearity.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype (``α`` too).

  Returns:
    A stateful :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: naming the argument, on bad ``task_dims``, widths, steps or
      temperature; in ``apply`` when inputs, params or (in training) the
      model state do not match.

  >>> import jax, jax.numpy as jnp
  >>> model = ltb({"a": 3, "b": 2}, hidden=(8, 8), num_steps=1000)
  >>> x = jnp.ones((4, 5))
  >>> params, state = model.init(jax.random.key(0), x), model.init_state(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, params["shared"]["alpha"])
  {'dense_1': (2, 2), 'head': (2, 2)}
  >>> params["shared"]["branches"]["dense_0"]["kernel"].shape
  (2, 5, 8)
  >>> preds, state = model.apply(params, x, state, train=True)
  >>> {k: v.shape for k, v in preds.items()}, int(state["step"]), model.stateful
  ({'a': (4, 3), 'b': (4, 2)}, 1, True)
  """
  dims = _common.validate_task_dims(task_dims, _WHERE)
  hidden = _common.validate_sizes(hidden, "hidden", _WHERE)
  if not hidden:
    raise ValueError(f"{_WHERE}: hidden must have at least one layer width, got ()")
  _common.check_activation(activation, _WHERE)
  warmup_steps, schedule = ltb_schedule(num_steps, warmup_steps, temperature, decay_steps)
  names = tuple(dims)
  k, num_layers = len(names), len(hidden)
  levels = _mix_levels(num_layers)
  branch = _common.MLP(features=hidden, activation=activation, activate_last=True, dtype=dtype, param_dtype=param_dtype)
  layers = [nn.Dense(h, dtype=dtype, param_dtype=param_dtype) for h in hidden]
  heads = _common.dense_heads(dims, (), activation, dtype, param_dtype)
  uniform = len(set(dims.values())) == 1
  first_head = heads[names[0]]

  def init(key: Array, inputs: Array) -> Params:
    shape, in_dtype = _ec.flat_shape(inputs)
    branch_key, head_key = jax.random.split(key)
    branches = _ec.init_stack(branch, branch_key, k, shape, in_dtype)
    z = _ec.out_spec(branch, branches, shape[1], in_dtype)
    alpha = {name: jnp.zeros((k, k), param_dtype) for name in levels}
    head_ps = _common.init_heads(heads, jax.random.split(head_key, k), z.shape, z.dtype)
    return {
      "shared": {"branches": branches, "alpha": alpha},
      "tasks": {name: {"head": head_ps[name]} for name in names},
    }

  def init_state(key: Array, inputs: Any) -> dict[str, Array]:
    del inputs
    return {"step": jnp.zeros((), jnp.int32), "seed": jax.random.bits(jax.random.fold_in(key, 1), (), jnp.uint32)}

  def check(params: Params, x: Array, inputs: Any) -> None:
    _common.check_tasks(params, names, _WHERE)
    shared = params.get("shared")
    if not isinstance(shared, Mapping) or not isinstance(shared.get("alpha"), Mapping) or "branches" not in shared:
      raise ValueError(f"{_WHERE}: params['shared'] must hold 'branches' and 'alpha' (see ltb's docstring)")
    for name in levels:
      got = shared["alpha"].get(name)
      if got is None or tuple(jnp.shape(got)) != (k, k):
        got_shape = None if got is None else tuple(jnp.shape(got))
        raise ValueError(f"{_WHERE}: params['shared']['alpha']['{name}'] must have shape {(k, k)}, got {got_shape}")
    kernel = shared["branches"]["dense_0"]["kernel"]
    if kernel.shape[0] != k or kernel.shape[1] != x.shape[1]:
      raise ValueError(
        f"{_WHERE}: inputs of shape {tuple(jnp.shape(inputs))} flatten to {x.shape[1]} features for {k} "
        f"branches, but the branches' dense_0 kernel has shape {tuple(kernel.shape)}"
      )

  def mixings(params: Params, model_state: Any, train: bool) -> tuple[list[Array], Any]:
    alpha = params["shared"]["alpha"]
    if not train:
      return [ltb_mixing(alpha[n], 0, None, train=False, warmup_steps=0, temperature=schedule) for n in levels], None
    if not isinstance(model_state, Mapping) or "step" not in model_state or "seed" not in model_state:
      got = sorted(model_state) if isinstance(model_state, Mapping) else type(model_state).__name__
      raise ValueError(
        f"{_WHERE}: train=True needs the model state {{'step', 'seed'}} of model.init_state (jmtl.TrainState."
        f"from_model creates it), got {got}"
      )
    step = jnp.asarray(model_state["step"])
    base = jax.random.fold_in(jax.random.key(model_state["seed"]), step)
    rule = dict(train=True, warmup_steps=warmup_steps, temperature=schedule)
    out = [ltb_mixing(alpha[n], step, jax.random.fold_in(base, i), **rule) for i, n in enumerate(levels)]
    return out, {**model_state, "step": step + 1}

  def mix(m: Array, h: Array) -> Array:
    """``Σⱼ M[t, j] h[j]`` over the branch axis of ``h`` (K, B, H)."""
    return jnp.einsum("tj,jbh->tbh", m.astype(h.dtype), h)

  def apply(params: Params, inputs: Any, model_state: Any, *, train: bool = False, axis_name=None):
    del axis_name
    x = _common.flatten_batch(inputs)
    check(params, x, inputs)
    ms, new_state = mixings(params, model_state, train)
    branches = params["shared"]["branches"]
    h = None
    for i, layer in enumerate(layers):
      run = lambda p, a, layer=layer: activation(layer.apply({"params": p}, a))
      h = jax.vmap(run, in_axes=(0, None if i == 0 else 0))(branches[f"dense_{i}"], x if i == 0 else mix(ms[i - 1], h))
    z = mix(ms[-1], h)  # (K, B, hidden[-1]): row t is task t's head input
    if uniform:
      head_stack = _common.stack_trees([params["tasks"][name]["head"] for name in names])
      ys = jax.vmap(lambda p, a: first_head.apply({"params": p}, a))(head_stack, z)
      preds = {name: ys[t] for t, name in enumerate(names)}
    else:
      preds = {name: heads[name].apply({"params": params["tasks"][name]["head"]}, z[t]) for t, name in enumerate(names)}
    return preds, (model_state if new_state is None else new_state)

  model = MultiTaskModel(
    init=init, apply=apply, encode=None, head=None, task_names=names, init_state=init_state, stateful=True
  )
  _SPECS[apply] = _Spec(dims, hidden, activation, dtype, param_dtype)
  return model


def ltb_tree(params: Params, task_names: Sequence[str]) -> LTBTree:
  """The discrete architecture of LTB parameters: every node's ``argmax`` parent, and each task's path.

  Args:
    params: parameters of an :func:`ltb` model (only ``params["shared"]["alpha"]`` is read).
    task_names: the model's tasks, in order.

  Returns:
    An :class:`LTBTree`.

  >>> import jax.numpy as jnp
  >>> alpha = {"dense_1": jnp.array([[1.0, 0.0], [1.0, 0.0]]), "head": jnp.eye(2)}
  >>> print(ltb_tree({"shared": {"alpha": alpha}}, ("a", "b")).describe())
  dense_0: [a b]
  dense_1: [a] [b]
  """
  names = tuple(task_names)
  alpha = params["shared"]["alpha"]
  num_layers = len(alpha)
  levels = _mix_levels(num_layers)
  if set(alpha) != set(levels):
    raise ValueError(f"{_WHERE}: params['shared']['alpha'] must have the levels {list(levels)}, got {sorted(alpha)}")
  parents = tuple(tuple(int(p) for p in jax.device_get(jnp.argmax(alpha[n], axis=-1))) for n in levels)
  if any(len(row) != len(names) for row in parents):
    raise ValueError(f"{_WHERE}: the alpha matrices are not ({len(names)}, {len(names)}) for tasks {list(names)}")
  paths = []
  for t in range(len(names)):
    path = [parents[-1][t]]  # the branch of the last layer that head t reads
    for level in range(num_layers - 2, -1, -1):  # parents[level] are dense_{level+1}'s
      path.append(parents[level][path[-1]])
    paths.append(tuple(reversed(path)))
  return LTBTree(names, parents, tuple(paths))


def ltb_export(model: MultiTaskModel, params: Params) -> tuple[LTBTree, MultiTaskModel, Params]:
  """The tree an LTB model has settled on, as a model of its own with its parameters.

  Every node keeps its most probable parent (``argmax α``); the nodes on
  some task's path remain, the others go. A node on the paths of two or more
  tasks is a shared layer, a node on one task's path that task's own::

      {"shared": {"dense_i": {"branch_j": {"kernel", "bias"}}, ...},        # nodes of >= 2 tasks
       "tasks": {name: {"dense_i": {"kernel", "bias"}, ..., "head": {"dense_0": ...}}}}

  (``shared`` is ``{}`` when no node is shared: then only loss-level
  weightings apply.) The exported model is stateless and deterministic, its
  ``init`` makes fresh parameters of this layout (to retrain the tree from
  scratch), and with the returned parameters its predictions are those of
  ``model.apply(params, x, state, train=False)``. ``encode = head = None``.

  Args:
    model: a model made by :func:`ltb`.
    params: its parameters.

  Returns:
    ``(tree, exported_model, exported_params)``.

  Raises:
    ValueError: when ``model`` was not made by :func:`ltb` or ``params`` do not fit it.

  >>> import jax, jax.numpy as jnp
  >>> model = ltb({"a": 3, "b": 2, "c": 2}, hidden=(4, 4), num_steps=100)
  >>> x = jnp.ones((2, 5))
  >>> params = model.init(jax.random.key(0), x)
  >>> tree, tree_model, tree_params = ltb_export(model, params)  # alpha = 0: every argmax is branch 0
  >>> print(tree.describe())
  dense_0: [a b c]
  dense_1: [a b c]
  >>> sorted(tree_params["shared"]), sorted(tree_params["tasks"]["a"])
  (['dense_0', 'dense_1'], ['head'])
  """
  spec = _SPECS.get(model.apply) if isinstance(model, MultiTaskModel) else None
  if spec is None:
    raise ValueError(f"ltb_export: model must be made by jmtl.models.ltb, got {type(model).__name__}")
  names = model.task_names
  _common.check_tasks(params, names, "ltb_export")
  tree = ltb_tree(params, names)
  model_out = _tree_model(spec, tree)
  branches = params["shared"]["branches"]
  shared: dict[str, Any] = {}
  tasks: dict[str, Any] = {name: {} for name in names}
  for i, groups in enumerate(tree.groups()):
    for group in groups:
      b = tree.paths[names.index(group[0])][i]
      p = jax.tree.map(lambda a, b=b: a[b], branches[f"dense_{i}"])
      if len(group) > 1:
        shared.setdefault(f"dense_{i}", {})[f"branch_{b}"] = p
      else:
        tasks[group[0]][f"dense_{i}"] = p
  for name in names:
    tasks[name]["head"] = params["tasks"][name]["head"]
  return tree, model_out, {"shared": shared, "tasks": tasks}


def _tree_model(spec: _Spec, tree: LTBTree) -> MultiTaskModel:
  """The stateless model of a fixed tree: each node one ``Dense + activation``, run once for all its tasks."""
  where = "ltb_export"
  names = tree.task_names
  layers = [nn.Dense(h, dtype=spec.dtype, param_dtype=spec.param_dtype) for h in spec.hidden]
  heads = _common.dense_heads(spec.dims, (), spec.activation, spec.dtype, spec.param_dtype)
  groups = tree.groups()
  # (layer, branch) -> where its parameters live: ("shared", "dense_i", "branch_j") or ("tasks", name, "dense_i").
  owner: dict[tuple[int, int], tuple[str, str, str]] = {}
  for i, layer_groups in enumerate(groups):
    for group in layer_groups:
      b = tree.paths[names.index(group[0])][i]
      owner[(i, b)] = ("shared", f"dense_{i}", f"branch_{b}") if len(group) > 1 else ("tasks", group[0], f"dense_{i}")

  def node_params(params: Params, node: tuple[int, int]) -> Params:
    part, a, b = owner[node]
    return params[part][a][b]

  def init(key: Array, inputs: Any) -> Params:
    shape, in_dtype = _ec.flat_shape(inputs)
    keys = jax.random.split(key, len(owner) + len(names))
    shared: dict[str, Any] = {}
    tasks: dict[str, Any] = {name: {} for name in names}
    for n, (node, (part, a, b)) in enumerate(sorted(owner.items())):
      i = node[0]
      in_shape = shape if i == 0 else (shape[0], spec.hidden[i - 1])
      p = _common.init_module(layers[i], keys[n], in_shape, in_dtype)
      (shared.setdefault(a, {}) if part == "shared" else tasks[a])[b] = p
    z_shape = (shape[0], spec.hidden[-1])
    z_dtype = jnp.result_type(in_dtype, spec.param_dtype) if spec.dtype is None else spec.dtype
    head_ps = _common.init_heads(heads, keys[len(owner) :], z_shape, z_dtype)
    for name in names:
      tasks[name]["head"] = head_ps[name]
    return {"shared": shared, "tasks": tasks}

  def predict(params: Params, inputs: Any) -> dict[str, Array]:
    x = _common.flatten_batch(inputs)
    _common.check_tasks(params, names, where)
    first = next(node for node in owner if node[0] == 0)
    expected = node_params(params, first)["kernel"].shape[0]
    if x.shape[1] != expected:
      raise ValueError(
        f"{where}: inputs of shape {tuple(jnp.shape(inputs))} flatten to {x.shape[1]} features, "
        f"but the dense_0 kernels expect {expected}"
      )
    outs: dict[tuple[int, int], Array] = {}
    preds = {}
    for t, name in enumerate(names):
      h = x
      for i, b in enumerate(tree.paths[t]):
        if (i, b) not in outs:  # a tree: a node's input is the same for every task through it
          outs[(i, b)] = spec.activation(layers[i].apply({"params": node_params(params, (i, b))}, h))
        h = outs[(i, b)]
      preds[name] = heads[name].apply({"params": params["tasks"][name]["head"]}, h)
    return preds

  return MultiTaskModel(init=init, apply=stateless(predict), encode=None, head=None, task_names=names)
