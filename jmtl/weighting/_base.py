"""The weighting-transform protocol: ``WeightingTransform``, ``chain``, ``named_chain`` and ``aggregate``.

A weighting transform maps per-task losses (and whatever else the engine
gives it) to task weights ``w`` of shape ``(K,)``; the train step then follows
``∇θ Σₖ stop_gradient(wₖ) Lₖ``. The type is modelled on optax's
``GradientTransformationExtraArgs``: a NamedTuple of pure functions whose
``update`` takes keyword *inputs* and ignores those it does not read, so a
new input (a second batch, validation losses, the step) never touches the
existing transforms. See ``docs/design.md`` ("The weighting protocol").
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
WeightingState = Any

#: What a transform must see, cheapest first: the level of per-task gradient
#: information the engine computes for it. A transform that needs the
#: Jacobian can also be given the Gramian, so the order is a total one.
NEEDS = ("losses", "gramian", "jacobian")

#: The inputs the train step passes to ``update`` (by keyword). ``gramian`` (with
#: ``gramian_exponent``: the Gramian is ``gramian · 2**gramian_exponent``, see
#: :func:`scaled_gramian`) and ``jacobian`` only when the transform's ``needs``
#: asks for them; ``key`` (a fresh PRNG key), ``step`` (the int32 step count)
#: and ``present`` (``(K,)`` bool: the tasks with at least one label in the
#: global batch) always; anything a user adds with
#: ``make_train_step(..., weighting_inputs=...)`` too.
INPUTS = ("gramian", "gramian_exponent", "jacobian", "key", "step", "present")

#: Jacobians whose largest entry lies within ``2**±RANGE`` give their Gramian
#: unscaled (``gramian_exponent = 0``): float32's squares stay far from its
#: limits (``2**±126``, ``2**128``) for any realistic number of parameters.
RANGE = 24

#: What a transform may ask the engine for beyond ``needs``, in its ``requires``:
#: ``"cross_gramian"``: ``update`` also gets ``cross_gramian``, ``J_a J_bᵀ`` of
#: the per-task gradients of two disjoint halves of the batch (double sampling,
#: MoDo and SDMGrad); ``"gradient_shapes"``: ``init`` also gets ``shapes``, a
#: pytree of ``jax.ShapeDtypeStruct`` shaped like one task's gradient (of the
#: selected shared parameters), for a state that tracks gradients (MoCo, DB-MTL);
#: ``"validation"``: ``update`` also gets ``meta_gradient(w, lr, val_weights=None)``,
#: the derivative in ``w`` of the validation losses after one virtual SGD step on
#: ``Σ wₖ Lₖ`` (Auto-λ); the batch must carry ``batch["validation"]``.
REQUIRES = ("cross_gramian", "gradient_shapes", "validation")

#: The head rules a transform may declare (``heads``), as in
#: :class:`jmtl.grads.GradientOptions`.
HEADS = ("weighted", "own")


class InitFn(Protocol):
  def __call__(self, num_tasks: int) -> WeightingState:
    """Returns the initial state for ``num_tasks`` tasks (and ``shapes=`` if ``requires`` has ``"gradient_shapes"``)."""


class UpdateFn(Protocol):
  def __call__(self, losses: Array, state: WeightingState, **inputs: Any) -> tuple[Array, WeightingState]:
    """Returns task weights of shape ``(K,)`` and the new state; ignores inputs it does not read."""


class WeightingTransform(NamedTuple):
  """A pair of pure functions that choose task weights, plus what they need.

  Attributes:
    init: ``init(num_tasks) -> state``.
    update: ``update(losses, state, **inputs) -> (weights, state)``.
      ``losses`` has shape ``(K,)``; the inputs (:data:`INPUTS`) are
      ``gramian``, the ``(K, K)`` matrix ``J Jᵀ`` of the shared-parameter
      gradients, divided by ``2**gramian_exponent`` (0 unless the gradients
      are beyond ``2**±RANGE``: :func:`scaled_gramian`); ``present``, which
      tasks have labels in the batch (:func:`present_of`); ``jacobian``, ``J`` stacked on a leading task axis (an array
      ``(K, P)`` or a pytree of ``(K, ...)`` leaves); ``key``, a PRNG key;
      ``step``, the step count; and whatever else the caller adds. A
      transform reads what it needs and ignores the rest. A ``"jacobian"``
      transform may return element-wise weights instead of ``(K,)`` ones (see
      :func:`combine_jacobian`); it goes last in a :func:`chain`.
    needs: one of :data:`NEEDS`: what the engine must compute for ``update``.
    select: ``None`` (the Gramian/Jacobian is over all of ``params["shared"]``)
      or ``select(shared_params) -> subtree``: the part it is over, e.g.
      :func:`last_layer` for GradNorm.
    label: what ``repr`` shows, e.g. ``"cagrad(c=0.5, rescale=True, max_iter=64)"``
      (set by the built-ins; ``None`` shows the tuple).
    requires: what the engine must provide beyond ``needs`` (:data:`REQUIRES`):
      ``"cross_gramian"`` and ``"validation"`` (inputs of ``update``),
      ``"gradient_shapes"`` (an argument of ``init``).
    heads: ``None`` (the step's :class:`~jmtl.grads.GradientOptions` decide
      how task parameters move) or a rule of :data:`HEADS` that the method's
      paper defines: ``"own"``, each task's parameters along their own
      unweighted gradient (RGW).
  """

  init: InitFn
  update: UpdateFn
  needs: str = "losses"
  select: Callable[[Any], Any] | None = None
  label: str | None = None
  requires: tuple[str, ...] = ()
  heads: str | None = None

  def __repr__(self) -> str:
    if self.label is not None:
      return self.label
    return f"WeightingTransform(needs={self.needs!r}, select={_short(self.select)})"


class EmptyState(NamedTuple):
  """State of a stateless transform."""


class Direction(NamedTuple):
  """What a Jacobian-level transform returns when its update is not ``Σₖ wₖ Jₖ`` of this step's gradients.

  A method that follows *tracked* gradients (MoCo, DB-MTL: moving averages
  of past per-task gradients, kept in its state) returns the shared-parameter
  direction itself. It goes last in a :func:`chain`.

  Attributes:
    shared: the update direction of the (selected) shared parameters, shaped
      like one row of the Jacobian (a descent direction, as ``Σₖ wₖ Jₖ`` is).
    weights: ``(K,)`` task weights: reported in the step's metrics and applied
      to each task's own parameters (under the step's head rule).
  """

  shared: Any
  weights: Array


def init_state(transform: WeightingTransform, num_tasks: int, shared: Any = None) -> WeightingState:
  """``transform.init(num_tasks)``, given the gradient shapes when it requires them.

  ``shared`` is the shared-parameter pytree (arrays or
  :class:`jax.ShapeDtypeStruct`); a transform whose ``requires`` has
  ``"gradient_shapes"`` gets ``shapes``, the part it selects as
  ``ShapeDtypeStruct`` leaves. What :class:`jmtl.TrainState` calls.
  """
  if "gradient_shapes" not in transform.requires:
    return transform.init(num_tasks)
  if shared is None:
    raise ValueError(
      f"{transform!r} keeps per-task gradients in its state: its init needs the shared parameters' shapes "
      "(TrainState.create(params=...) gives them)"
    )
  part = shared if transform.select is None else transform.select(shared)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), part)
  return transform.init(num_tasks, shapes=shapes)


# ---------------------------------------------------------------------------------------------------------------------
# The method registry: every built-in is a factory decorated with ``method``.

_METHODS: dict[str, Callable[..., WeightingTransform]] = {}
_STATIC: dict[str, tuple[str, ...]] = {}


def _short(value) -> str:
  """A one-line repr of a hyper-parameter value."""
  if value is None or isinstance(value, bool | int | float | str):
    return repr(value)
  if isinstance(value, WeightingTransform):
    return repr(value)
  if isinstance(value, tuple | list) and all(isinstance(v, bool | int | float) for v in value):
    return repr(list(value))
  if isinstance(value, np.ndarray | jax.Array) and not isinstance(value, jax.core.Tracer):
    return repr(np.asarray(value).tolist())
  if callable(value) and hasattr(value, "__name__"):
    return value.__name__
  return type(value).__name__ + "(...)"


def method(*, static: Sequence[str] = ()):
  """Registers a weighting factory as a built-in method and labels what it returns.

  The returned transform's ``repr`` shows the factory's name and every
  argument, defaults included. ``static`` names the numeric arguments that
  fix a program's structure (iteration caps, periods) and so cannot be
  injected by :func:`inject_hyperparams`.
  """

  def decorate(factory):
    name = factory.__name__
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args, **kwargs) -> WeightingTransform:
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      t = factory(*args, **kwargs)
      label = f"{name}({', '.join(f'{k}={_short(v)}' for k, v in bound.arguments.items())})"
      return t._replace(label=label)

    _METHODS[name] = build
    _STATIC[name] = tuple(static)
    return build

  return decorate


def methods() -> dict[str, Callable[..., WeightingTransform]]:
  """The built-in weighting methods, name -> factory (what the runner's ``weighting`` names).

  Examples:
    >>> import jmtl
    >>> {"equal", "upgrad", "famo"} <= set(jmtl.weighting.methods())
    True
    >>> jmtl.weighting.methods()["cagrad"](0.4)
    cagrad(c=0.4, rescale=True, max_iter=64)
  """
  return dict(sorted(_METHODS.items()))


def static_args_of(factory) -> tuple[str, ...]:
  """The arguments of a registered method that :func:`inject_hyperparams` leaves as Python values."""
  return _STATIC.get(getattr(factory, "__name__", ""), ())


def is_concrete(*values) -> bool:
  """Whether no leaf of ``values`` is a tracer: argument checks run only on concrete values.

  Under :func:`inject_hyperparams` a factory is called with traced
  hyper-parameters inside the jitted step; its checks ran already, on the
  initial values, when the wrapper was built.
  """
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


# ---------------------------------------------------------------------------------------------------------------------
# Helpers for transforms.


def stateless(weight_fn, needs: str = "losses") -> WeightingTransform:
  """Builds a transform from ``weight_fn(losses, **inputs)``.

  ``weight_fn`` is called with every input the caller gives, and with
  ``gramian``, ``jacobian`` and ``key`` set to ``None`` when absent, so it can
  name the ones it reads and take the rest as ``**_``.

  Args:
    weight_fn: a pure function of the losses (and of whatever ``needs``
      provides) that returns weights of shape ``(K,)``.
    needs: what ``weight_fn`` reads, one of :data:`NEEDS`.

  Returns:
    A :class:`WeightingTransform` with an empty state.

  Examples:
    A weighting that favours the task with the largest loss, in three lines,
    chained after a built-in one:

    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> focus = jmtl.weighting.stateless(
    ...     lambda losses, **_: jax.nn.softmax(jax.lax.stop_gradient(losses)))
    >>> t = jmtl.weighting.chain(jmtl.weighting.static([1.0, 2.0]), focus)
    >>> w, _ = jax.jit(t.update)(jnp.array([1.0, 1.0]), t.init(2))
    >>> [round(float(x), 3) for x in w]
    [0.269, 1.462]
  """
  _check_needs(needs)

  def init_fn(num_tasks):
    del num_tasks
    return EmptyState()

  def update_fn(losses, state, **inputs):
    w = weight_fn(losses, **{"gramian": None, "jacobian": None, "key": None, **inputs})
    return jax.tree.map(lambda x: jnp.asarray(x, losses.dtype), w), state

  return WeightingTransform(init_fn, update_fn, needs)


def _check_needs(needs):
  if needs not in NEEDS:
    raise ValueError(f"needs={needs!r} is not one of {NEEDS}")


def needs_of(*transforms: WeightingTransform) -> str:
  """The most expensive requirement among ``transforms``."""
  for t in transforms:
    _check_needs(t.needs)
  return max((t.needs for t in transforms), key=NEEDS.index, default="losses")


def checked_gramian(name: str, losses: Array, gramian: Array | None) -> Array:
  """The Gramian a transform reads: checked against the losses, without gradient, symmetric, widened.

  A Gramian accumulated leaf by leaf can differ from its transpose in the
  last bits; eigen-solvers and pairwise rules assume symmetry. It is float32
  at least, and float64 whenever ``jax_enable_x64`` is on: the ``K×K``
  problem is then solved in float64 (negligible cost next to the step) even
  when the step computes in float32, which is what an ill-conditioned
  Gramian needs (see each method's float32 accuracy).

  Examples:
    >>> import jax.numpy as jnp
    >>> checked_gramian("demo", jnp.ones(2), jnp.array([[1.0, 2.0], [0.0, 1.0]])).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
  """
  if gramian is None:
    raise ValueError(f"{name} weighs tasks from the Gramian of their gradients: pass gramian=(K, K) to update")
  k = losses.shape[0] if losses.ndim == 1 else -1
  if gramian.shape != (k, k):
    raise ValueError(
      f"{name}: losses have shape {losses.shape}, so the gramian must be ({k}, {k}); got {gramian.shape}"
    )
  g = jax.lax.stop_gradient(gramian)
  wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  g = g.astype(jnp.promote_types(g.dtype, wide))
  return (g + g.T) / 2


def present_of(losses: Array, present: Array | None) -> Array:
  """The ``present`` input as a ``(K,)`` bool array (every task, when the caller gave none).

  A task without a label in the batch has loss 0 and a zero gradient; a
  built-in method leaves it out of that step: its weight is 0, the others are
  weighed among themselves as if it did not exist, and whatever the method
  keeps per task in its state is left as it was (``docs/design.md``, "Tasks
  without labels").

  Examples:
    >>> import jax.numpy as jnp
    >>> present_of(jnp.ones(3), None).tolist(), present_of(jnp.ones(2), jnp.array([1, 0])).tolist()
    ([True, True, True], [True, False])
  """
  if present is None:
    return jnp.ones(jnp.shape(losses)[:1], bool)
  present = jnp.asarray(present)
  if present.shape != jnp.shape(losses)[:1]:
    raise ValueError(f"present must have shape {jnp.shape(losses)[:1]} (one flag per task), got {present.shape}")
  return present.astype(bool)


def only_present(weights, present: Array):
  """``weights`` with every absent task's weight set to 0: a ``(K,)`` vector, element-wise weights or a Direction.

  Examples:
    >>> import jax.numpy as jnp
    >>> only_present(jnp.array([0.5, 2.0]), jnp.array([True, False])).tolist()
    [0.5, 0.0]
  """
  if isinstance(weights, Direction):
    return Direction(weights.shared, only_present(weights.weights, present))
  if is_task_vector(weights):
    return jnp.where(present, weights, jnp.zeros_like(weights))
  return scale_jacobian(present, weights)


def masked_softmax(x: Array, present: Array) -> Array:
  """``softmax`` over the present entries of ``x`` (0 at the others; all 0 when none is present).

  Examples:
    >>> import jax.numpy as jnp
    >>> masked_softmax(jnp.array([0.0, 5.0, 0.0]), jnp.array([True, False, True])).tolist()
    [0.5, 0.0, 0.5]
  """
  z = jnp.where(present, x, -jnp.inf)
  top = jnp.max(jnp.where(present, x, jnp.finfo(x.dtype).min))
  e = jnp.where(present, jnp.exp(z - top), 0)
  total = jnp.sum(e)
  return e / jnp.where(total > 0, total, 1)


def decoupled(gramian: Array, present: Array) -> Array:
  """The Gramian with each absent task replaced by a unit gradient orthogonal to every other one.

  ``G`` on the present block, ``1`` on an absent task's diagonal, 0 between
  an absent task and any other: a solver whose problem separates over
  orthogonal tasks (Nash-MTL's ``Gα = 1/α``, a lower-bound QP with bound 0)
  then solves the present tasks' problem exactly, as if the absent ones did
  not exist; their weights are set to 0 afterwards.

  Examples:
    >>> import jax.numpy as jnp
    >>> decoupled(jnp.array([[4.0, 2.0], [2.0, 3.0]]), jnp.array([True, False])).tolist()
    [[4.0, 0.0], [0.0, 1.0]]
  """
  return restricted(gramian, present) + jnp.diag(jnp.where(present, 0, 1).astype(gramian.dtype))


def restricted(gramian: Array, present: Array) -> Array:
  """The Gramian with the rows and columns of absent tasks set to 0 (the Gramian the engine gives, made sure).

  Examples:
    >>> import jax.numpy as jnp
    >>> restricted(jnp.array([[4.0, 2.0], [2.0, 3.0]]), jnp.array([True, False])).tolist()
    [[4.0, 0.0], [0.0, 0.0]]
  """
  return jnp.where(present[:, None] & present[None, :], gramian, 0)


def keep_absent(new, old, present: Array):
  """``new`` with the entries of absent tasks taken from ``old``: per-task state that an absent task must not move.

  Every leaf whose leading axis has length ``K`` is treated as one entry per
  task; other leaves (counters, scalars) come from ``new``.

  Examples:
    >>> import jax.numpy as jnp
    >>> keep_absent({"s": jnp.array([1.0, 2.0]), "n": 5}, {"s": jnp.array([0.0, 0.0]), "n": 4},
    ...             jnp.array([True, False]))["s"].tolist()
    [1.0, 0.0]
  """
  k = present.shape[0]

  def pick(a, b):
    if jnp.ndim(a) >= 1 and jnp.shape(a)[0] == k and jnp.shape(a) == jnp.shape(b):
      return jnp.where(present.reshape((k,) + (1,) * (jnp.ndim(a) - 1)), a, b)
    return a

  return jax.tree.map(pick, new, old)


def checked_jacobian(name: str, losses: Array, jacobian, state_leaves=None):
  """``jacobian`` if it is a stacked Jacobian for ``losses`` (every leaf ``(K, ...)``), else a ``ValueError``.

  ``state_leaves``: a pytree the Jacobian must match leaf for leaf (a state
  that keeps per-task gradients), named in the error.

  Examples:
    >>> import jax.numpy as jnp
    >>> checked_jacobian("demo", jnp.ones(2), jnp.ones((3, 4)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: demo: got losses of shape (2,) and Jacobian leaves of shapes [(3, 4)]; every leaf needs ...
  """
  if jacobian is None:
    raise ValueError(f"{name} needs the Jacobian: pass jacobian=... (an array (K, ...) or a pytree of them)")
  k = losses.shape[0] if losses.ndim == 1 else -1
  shapes = [leaf.shape for leaf in jax.tree.leaves(jacobian)]
  if k < 0 or any(s[:1] != (k,) for s in shapes):
    raise ValueError(
      f"{name}: got losses of shape {losses.shape} and Jacobian leaves of shapes {shapes}; every leaf needs a leading "
      "axis of size K"
    )
  if state_leaves is not None:
    want = [leaf.shape for leaf in jax.tree.leaves(state_leaves)]
    if jax.tree.structure(jacobian) != jax.tree.structure(state_leaves) or shapes != want:
      raise ValueError(
        f"{name}: the state keeps {want[0][0] if want else 0} tasks' gradients of leaf shapes {want}, got a Jacobian "
        f"of leaf shapes {shapes}"
      )
  return jacobian


def required_key(name: str, key: Array | None, why: str) -> Array:
  """``key``, or a ``ValueError`` saying that ``name`` needs one and why."""
  if key is None:
    raise ValueError(f"{name} {why}: pass key=... (a PRNG key, fresh every step) to update")
  return key


def scale_jacobian(weights: Array, jacobian):
  """Rows of a stacked Jacobian (array or pytree) multiplied by ``weights``."""
  return jax.tree.map(
    lambda j: j * weights.reshape((-1,) + (1,) * (j.ndim - 1)).astype(j.dtype),
    jacobian,
  )


def gramian_of(jacobian) -> Array:
  """``J Jᵀ`` of a stacked Jacobian: an array ``(K, ...)`` or a pytree of them.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting import gramian_of
    >>> gramian_of({"a": jnp.eye(2), "b": jnp.ones((2, 3))}).tolist()
    [[4.0, 3.0], [3.0, 4.0]]
  """
  leaves = jax.tree.leaves(jacobian)
  k = leaves[0].shape[0]
  flat = [leaf.reshape(k, -1) for leaf in leaves]
  return sum(f @ f.T for f in flat)


def power_of_two_scale(tree, axis_name: str | None = None) -> Array:
  """``k`` (int32) such that ``2**-k`` brings the largest entry of ``tree`` to about 1, or 0 when it is already
  within ``2**±RANGE`` (or is 0 or not finite); the same on every device of ``axis_name``.

  Examples:
    >>> import jax.numpy as jnp
    >>> int(power_of_two_scale(jnp.array([3e30, -1.0]))), int(power_of_two_scale(jnp.array([5.0])))
    (101, 0)
  """
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)]))
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  usable = (top > 0) & jnp.isfinite(top)
  # Within ±126, 2**k is a normal float32, so scaling by it is exact.
  k = jnp.clip(jnp.round(jnp.log2(jnp.where(usable, top, 1))), -126, 126).astype(jnp.int32)
  return jnp.where(usable & (jnp.abs(k) > RANGE), k, 0)


def power_of_two(k: Array, dtype=jnp.float32) -> Array:
  """``2**k`` exactly (``jnp.exp2`` rounds), as a scalar of ``dtype`` (0 or inf beyond its range).

  Examples:
    >>> float(power_of_two(-3)), float(power_of_two(40)) == 2.0**40
    (0.125, True)
  """
  return jnp.ldexp(jnp.ones((), jnp.float32), jnp.asarray(k, jnp.int32)).astype(dtype)


def times_power_of_two(tree, k: Array):
  """Every leaf of ``tree`` times ``2**k`` (``|k| ≤ 126``): exact, unless a result leaves the dtype's range."""
  factor = power_of_two(k)
  return jax.tree.map(lambda x: x * factor.astype(x.dtype), tree)


def scaled_gramian(jacobian, k: Array | None = None) -> tuple[Array, Array]:
  """``(G / 2**e, e)`` with ``G = J Jᵀ``: the Gramian of a stacked Jacobian in float32's range whenever ``J`` is.

  ``J``'s entries are squared in ``G``, so a Jacobian of 1e±20 gives a
  Gramian outside float32 (1e±38): ``inf``, or zeros and subnormals. The rows
  are first multiplied by ``2**-k`` (exact), with ``k`` from
  :func:`power_of_two_scale` unless given, and ``e = 2k``. ``k = 0`` for any
  Jacobian within ``2**±RANGE``, so ordinary Gramians are exactly
  :func:`gramian_of`'s. The engine passes ``e`` as the input
  ``gramian_exponent``; every built-in method is either scale-free (MGDA,
  UPGrad, CAGrad, ...: the weights do not change with ``G → cG``) or reads it
  (Nash-MTL, FairGrad, MoDo, GradNorm).

  Examples:
    >>> import jax.numpy as jnp
    >>> g, e = scaled_gramian(jnp.array([[1e30, 0.0], [0.0, 2e30]]))
    >>> [round(float(x), 3) for x in jnp.diagonal(g)], int(e)
    ([0.156, 0.622], 202)
  """
  if k is None:
    k = power_of_two_scale(jacobian)
  return gramian_of(times_power_of_two(jacobian, -k)), 2 * k


def combine_jacobian(weights, jacobian):
  """``Σₖ wₖ Jₖ`` for a stacked Jacobian (array or pytree).

  ``weights`` is a ``(K,)`` vector of task weights, or *element-wise* weights
  (what a Jacobian-level transform such as GradDrop returns): a pytree with
  the structure and leaf shapes of ``jacobian``, combined as ``Σₖ Wₖ ⊙ Jₖ``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting import combine_jacobian
    >>> J = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> combine_jacobian(jnp.array([1.0, 0.5]), J).tolist()
    [2.5, 4.0]
    >>> combine_jacobian(jnp.array([[1.0, 0.0], [0.0, 1.0]]), J).tolist()
    [1.0, 4.0]
  """
  if is_task_vector(weights):
    return jax.tree.map(lambda j: jnp.tensordot(weights.astype(j.dtype), j, 1), jacobian)
  return jax.tree.map(lambda w, j: jnp.sum(w.astype(j.dtype) * j, axis=0), weights, jacobian)


def is_task_vector(weights) -> bool:
  """Whether ``weights`` is one ``(K,)`` vector (not element-wise weights)."""
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(weights)) and jnp.ndim(weights) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Composition.


class ChainState(NamedTuple):
  inner: tuple  # one state per chained transform


def _rescaled(inputs: dict, w: Array, key) -> dict:
  """The inputs as the next transform of a chain sees them, after weights ``w`` so far."""
  out = dict(inputs)
  for name in ("gramian", "cross_gramian"):
    if out.get(name) is not None:
      out[name] = out[name] * jnp.outer(w, w).astype(out[name].dtype)
  if out.get("jacobian") is not None:
    out["jacobian"] = scale_jacobian(w, out["jacobian"])
  if "key" in out:
    out["key"] = key
  return out


def _chain_parts(transforms: Sequence[WeightingTransform]):
  """``(needs, select, requires, heads)`` of a chain of ``transforms``, checked."""
  needs = needs_of(*transforms)
  selects = {t.select for t in transforms if t.select is not None}
  if len(selects) > 1:
    raise ValueError("chain: the transforms select different parameter subsets for their Gramian/Jacobian")
  requires = tuple(r for r in REQUIRES if any(r in t.requires for t in transforms))
  heads = {t.heads for t in transforms if t.heads is not None}
  if len(heads) > 1:
    raise ValueError(f"chain: the transforms declare different head rules {sorted(heads)}")
  return needs, (selects.pop() if selects else None), requires, (heads.pop() if heads else None)


def _chain_init(transforms, num_tasks, shapes):
  tracked = [("gradient_shapes" in t.requires) for t in transforms]
  return [t.init(num_tasks, shapes=shapes) if r else t.init(num_tasks) for t, r in zip(transforms, tracked)]


def _chain_update(transforms, states, losses, inputs):
  """Runs ``transforms`` in sequence; returns the product of their weights and their new states."""
  key = inputs.get("key")
  keys = [None] * len(transforms) if key is None else list(jax.random.split(key, len(transforms)))
  w = jnp.ones_like(losses)
  new_states = []
  for i, (t, s, k) in enumerate(zip(transforms, states, keys)):
    if not is_task_vector(w):
      raise ValueError(
        f"chain: {transforms[i - 1]!r} returns element-wise weights or a Direction, so it must be the last "
        f"transform of the chain; {t!r} follows it"
      )
    wt, new_state = t.update(w * losses, s, **_rescaled(inputs, w, k))
    # A Jacobian-level transform may answer with element-wise weights or a
    # Direction; they absorb the task weights so far (and it goes last).
    if isinstance(wt, Direction):
      w = Direction(wt.shared, w * wt.weights)
    elif jnp.ndim(wt) == 1 and wt.shape == w.shape:
      w = w * wt
    else:
      w = scale_jacobian(w, wt)
    new_states.append(new_state)
  return w, new_states


def chain(*transforms: WeightingTransform) -> WeightingTransform:
  """Applies transforms in sequence; the weights multiply.

  Transform ``b`` after ``a`` sees the problem as ``a`` weighted it: losses
  ``w_a·L``, Gramian (and cross-Gramian) ``diag(w_a) G diag(w_a)``, Jacobian
  rows ``w_a,k Jₖ``; every other input passes through unchanged (a ``key`` is split, one part
  per transform). The chained weights are ``w_a·w_b`` (element-wise), so the
  update direction is ``Σₖ w_a,k w_b,k ∇Lₖ`` -- what ``b`` would choose on the
  rescaled problem.

  Args:
    *transforms: the transforms, applied left to right.

  Returns:
    A :class:`WeightingTransform` whose ``needs`` is the most expensive of the
    parts' and whose state is a :class:`ChainState` (read it by position, or
    use :func:`named_chain` to read it by name).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.chain(jmtl.weighting.static([2.0, 1.0]),
    ...                          jmtl.weighting.static([0.5, 3.0]))
    >>> w, _ = t.update(jnp.array([0.3, 0.7]), t.init(2))
    >>> w.tolist()
    [1.0, 3.0]
    >>> t
    chain(static(weights=[2.0, 1.0]), static(weights=[0.5, 3.0]))
  """
  needs, select, requires, heads = _chain_parts(transforms)

  def init_fn(num_tasks, shapes=None):
    return ChainState(tuple(_chain_init(transforms, num_tasks, shapes)))

  def update_fn(losses, state, **inputs):
    w, states = _chain_update(transforms, state.inner, losses, inputs)
    return w, ChainState(tuple(states))

  label = f"chain({', '.join(map(repr, transforms))})"
  return WeightingTransform(init_fn, update_fn, needs, select, label, requires, heads)


def named_chain(*named: tuple[str, WeightingTransform]) -> WeightingTransform:
  """:func:`chain` whose state is a dict, read by name: ``state["upgrad"]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.named_chain(("prior", jmtl.weighting.static([1.0, 2.0])),
    ...                                ("dwa", jmtl.weighting.dwa()))
    >>> w, state = t.update(jnp.array([1.0, 1.0]), t.init(2))
    >>> w.tolist(), int(state["dwa"].count)
    ([1.0, 2.0], 0)
  """
  names = [n for n, _ in named]
  if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"named_chain: names must be distinct non-empty strings, got {names}")
  transforms = [t for _, t in named]
  needs, select, requires, heads = _chain_parts(transforms)

  def init_fn(num_tasks, shapes=None):
    return dict(zip(names, _chain_init(transforms, num_tasks, shapes)))

  def update_fn(losses, state, **inputs):
    w, states = _chain_update(transforms, [state[n] for n in names], losses, inputs)
    return w, dict(zip(names, states))

  label = f"named_chain({', '.join(f'({n!r}, {t!r})' for n, t in named)})"
  return WeightingTransform(init_fn, update_fn, needs, select, label, requires, heads)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduled hyper-parameters.


class InjectHyperparamsState(NamedTuple):
  """State of :func:`inject_hyperparams`."""

  count: Array  # () int32: update calls so far (a schedule's argument)
  hyperparams: dict  # name -> () or (n,) float array: the values used at the last call
  inner_state: WeightingState  # the wrapped transform's state


def _is_numeric(value) -> bool:
  if isinstance(value, bool) or value is None:
    return False
  if isinstance(value, int | float | np.ndarray | jax.Array):
    return True
  return (
    isinstance(value, tuple | list)
    and len(value) > 0
    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
  )


def inject_hyperparams(factory, *, static_args: Sequence[str] = ()):
  """Wraps a weighting factory so that its numeric arguments live in the state, and may be scheduled.

  The analogue of :func:`optax.inject_hyperparams`: ``inject_hyperparams(
  cagrad)(c=schedule)`` builds a transform whose state holds the current
  ``c``; a numeric argument given as a callable ``count -> value`` is a
  schedule, evaluated at every call (``count`` = calls so far). On each call
  the factory is rebuilt with the current values, so any method (or a user's
  factory) works unchanged. Arguments named in ``static_args`` -- and those a
  built-in declares static, such as ``max_iter`` -- stay Python values.

  Args:
    factory: a function of hyper-parameters that returns a
      :class:`WeightingTransform` (any built-in, or a user's).
    static_args: argument names never injected.

  Returns:
    A function with the factory's arguments that returns a
    :class:`WeightingTransform` with state :class:`InjectHyperparamsState`.

  Examples:
    Anneal CAGrad's ``c`` from 0 (equal weighting) to 0.5 over 100 calls:

    >>> import jax.numpy as jnp, optax
    >>> import jmtl
    >>> t = jmtl.weighting.inject_hyperparams(jmtl.weighting.cagrad)(c=optax.linear_schedule(0.0, 0.5, 100))
    >>> state = t.init(2)
    >>> w, state = t.update(jnp.ones(2), state, gramian=jnp.array([[1.0, -0.5], [-0.5, 1.0]]))
    >>> w.tolist(), float(state.hyperparams["c"])
    ([0.5, 0.5], 0.0)
    >>> t
    inject_hyperparams(cagrad(c=schedule(...), rescale=True, max_iter=64))
  """
  signature = inspect.signature(factory)
  static = set(static_args) | set(static_args_of(factory))

  def wrapped(*args, **kwargs) -> WeightingTransform:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    injected = {
      k: v
      for k, v in values.items()
      if k not in static and (_is_numeric(v) or (callable(v) and _takes_numbers(signature.parameters[k])))
    }
    fixed = {k: v for k, v in values.items() if k not in injected}
    first = {k: (v(0) if callable(v) else v) for k, v in injected.items()}
    template = factory(**fixed, **first)  # checks the arguments once, on concrete values
    dtype = jax.dtypes.canonicalize_dtype(float)

    def current(count, stored):
      return {k: (jnp.asarray(v(count), dtype) if callable(v) else stored[k]) for k, v in injected.items()}

    def init_fn(num_tasks, **shapes):
      hyperparams = {k: jnp.asarray(v, dtype) for k, v in first.items()}
      return InjectHyperparamsState(jnp.zeros((), jnp.int32), hyperparams, template.init(num_tasks, **shapes))

    def update_fn(losses, state, **inputs):
      hyperparams = current(state.count, state.hyperparams)
      w, inner = factory(**fixed, **hyperparams).update(losses, state.inner_state, **inputs)
      return w, InjectHyperparamsState(state.count + 1, hyperparams, inner)

    shown = ", ".join(f"{k}={_short_hp(v)}" for k, v in values.items())
    label = f"inject_hyperparams({getattr(factory, '__name__', 'factory')}({shown}))"
    return template._replace(init=init_fn, update=update_fn, label=label)

  return wrapped


def _takes_numbers(parameter: inspect.Parameter) -> bool:
  """Whether a callable given for ``parameter`` is a schedule: its default is a number, or it has none."""
  return parameter.default is inspect.Parameter.empty or _is_numeric(parameter.default)


def _short_hp(value) -> str:
  return f"{value.__name__}(...)" if callable(value) and not isinstance(value, WeightingTransform) else _short(value)


# ---------------------------------------------------------------------------------------------------------------------
# Applying a transform to a stacked Jacobian.


def _direction(transform, jacobian, state, losses, inputs):
  """``(Σₖ wₖ Jₖ, new state)`` of one ``update`` on a stacked Jacobian."""
  first = jax.tree.leaves(jacobian)[0]
  if losses is None:
    losses = jnp.ones((first.shape[0],), first.dtype)
  if transform.needs != "losses":
    inputs["gramian"], inputs["gramian_exponent"] = scaled_gramian(jacobian)
  if transform.needs == "jacobian":
    inputs["jacobian"] = jacobian
  w, state = transform.update(losses, state, **inputs)
  return (w.shared if isinstance(w, Direction) else combine_jacobian(w, jacobian)), state


def aggregate(
  transform: WeightingTransform,
  jacobian,
  *,
  losses: Array | None = None,
  state: WeightingState | None = None,
  **inputs,
):
  """Applies ``transform`` once to a stacked Jacobian and returns the direction.

  Args:
    transform: any weighting transform.
    jacobian: per-task gradients stacked on a leading axis: an array ``(K, P)``
      or a pytree of ``(K, ...)`` leaves.
    losses: the per-task losses, for transforms that read them (ones if not
      given).
    state: the transform's state (a fresh one if not given).
    **inputs: further inputs, e.g. ``key`` for stochastic transforms.

  Returns:
    ``Σₖ wₖ Jₖ``, shaped like one row of ``jacobian``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> jmtl.weighting.aggregate(jmtl.weighting.static([1.0, 0.5]), J).tolist()
    [1.0, 1.0]
  """
  if state is None:
    state = init_state(transform, jax.tree.leaves(jacobian)[0].shape[0], _row(jacobian))
  return _direction(transform, jacobian, state, losses, inputs)[0]


def as_aggregator(transform: WeightingTransform, num_tasks: int):
  """Wraps ``transform`` as an :class:`optax.experimental.aggregating.Aggregator`.

  The aggregator's ``update(per_task_grads, state, params=None, *, losses=None,
  **inputs)`` takes gradients stacked on a leading task axis and returns their
  weighted sum, so a weighting transform can sit inside
  ``optax.experimental.aggregating.process``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> agg = jmtl.weighting.as_aggregator(jmtl.weighting.equal(), 2)
    >>> d, _ = agg.update({"w": jnp.array([[1.0], [3.0]])}, agg.init(None))
    >>> d["w"].tolist()
    [4.0]
  """
  from optax.experimental import aggregating

  def init_fn(params):
    return init_state(transform, num_tasks, params)

  def update_fn(per_task_grads, state, params=None, *, losses=None, **inputs):
    del params
    return _direction(transform, per_task_grads, state, losses, inputs)

  return aggregating.Aggregator(init_fn, update_fn)


def _row(jacobian):
  """One row of a stacked Jacobian, as shapes."""
  return jax.tree.map(lambda j: jax.ShapeDtypeStruct(j.shape[1:], j.dtype), jacobian)


def last_layer(shared) -> dict:
  """The last top-level layer of the shared parameters (``dense_10`` after ``dense_9``).

  GradNorm's default parameter subset ``W`` (the paper's "last shared layer").

  Examples:
    >>> sorted(last_layer({"dense_0": 1, "dense_10": 2, "dense_9": 3}))
    ['dense_10']
  """
  if not isinstance(shared, dict) or not shared:
    raise ValueError(
      f"last_layer: the shared parameters must be a non-empty dict of layers, got {type(shared).__name__}"
    )
  key = max(shared, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(k))])
  return {key: shared[key]}
