"""The weighting-transform protocol, ``chain`` and ``aggregate``.

A weighting transform maps per-task losses (and, when it asks for them, the
Gramian or the Jacobian of the shared parameters) to task weights ``w`` of
shape ``(K,)``. The train step then follows ``∇θ Σₖ stop_gradient(wₖ) Lₖ``.
The type is modelled on :class:`optax.GradientTransformation`: a NamedTuple of
pure functions, so transforms are values that jit, vmap and compose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
WeightingState = Any

#: What a transform must see, cheapest first. A transform that needs the
#: Jacobian can also be given the Gramian, so the order is a total one.
NEEDS = ("losses", "gramian", "jacobian")


class InitFn(Protocol):
  def __call__(self, num_tasks: int) -> WeightingState:
    """Returns the initial state for ``num_tasks`` tasks."""


class UpdateFn(Protocol):
  def __call__(
    self,
    losses: Array,
    state: WeightingState,
    *,
    gramian: Array | None = None,
    jacobian: Any = None,
    key: Array | None = None,
  ) -> tuple[Array, WeightingState]:
    """Returns task weights of shape ``(K,)`` and the new state."""


class WeightingTransform(NamedTuple):
  """A pair of pure functions that choose task weights, plus what they need.

  Attributes:
    init: ``init(num_tasks) -> state``.
    update: ``update(losses, state, *, gramian=None, jacobian=None, key=None)
      -> (weights, state)``. ``losses`` has shape ``(K,)``; ``gramian`` is the
      ``(K, K)`` matrix ``J Jᵀ`` of the shared-parameter gradients; ``jacobian``
      is ``J`` stacked on a leading task axis (an array ``(K, P)`` or a pytree
      whose leaves are ``(K, ...)``); ``key`` is a PRNG key for stochastic
      methods. A ``"jacobian"`` transform may return element-wise weights
      instead of ``(K,)`` ones (see :func:`combine_jacobian`); it goes last in
      a :func:`chain`.
    needs: one of :data:`NEEDS`: what the engine must compute for ``update``.
    select: ``None`` (the Gramian/Jacobian is over all of ``params["shared"]``)
      or ``select(shared_params) -> subtree``: the part it is over, e.g. the
      last shared layer for GradNorm.
  """

  init: InitFn
  update: UpdateFn
  needs: str = "losses"
  select: Callable[[Any], Any] | None = None


class EmptyState(NamedTuple):
  """State of a stateless transform."""


def stateless(weight_fn, needs: str = "losses") -> WeightingTransform:
  """Builds a transform from ``weight_fn(losses, gramian=, jacobian=, key=)``.

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

  def update_fn(losses, state, *, gramian=None, jacobian=None, key=None):
    w = weight_fn(losses, gramian=gramian, jacobian=jacobian, key=key)
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
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(weights)) and jnp.ndim(weights) == 1:
    return jax.tree.map(lambda j: jnp.tensordot(weights.astype(j.dtype), j, 1), jacobian)
  return jax.tree.map(lambda w, j: jnp.sum(w.astype(j.dtype) * j, axis=0), weights, jacobian)


class ChainState(NamedTuple):
  inner: tuple  # one state per chained transform


def chain(*transforms: WeightingTransform) -> WeightingTransform:
  """Applies transforms in sequence; the weights multiply.

  Transform ``b`` after ``a`` sees the problem as ``a`` weighted it: losses
  ``w_a·L``, Gramian ``diag(w_a) G diag(w_a)``, Jacobian rows ``w_a,k Jₖ``. The
  chained weights are ``w_a·w_b`` (element-wise), so the update direction is
  ``Σₖ w_a,k w_b,k ∇Lₖ`` -- what ``b`` would choose on the rescaled problem.

  Args:
    *transforms: the transforms, applied left to right.

  Returns:
    A :class:`WeightingTransform` whose ``needs`` is the most expensive of the
    parts'.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.chain(jmtl.weighting.static([2.0, 1.0]),
    ...                          jmtl.weighting.static([0.5, 3.0]))
    >>> w, _ = t.update(jnp.array([0.3, 0.7]), t.init(2))
    >>> w.tolist()
    [1.0, 3.0]
  """
  needs = needs_of(*transforms)
  selects = {t.select for t in transforms if t.select is not None}
  if len(selects) > 1:
    raise ValueError("chain: the transforms select different parameter subsets for their Gramian/Jacobian")
  select = selects.pop() if selects else None

  def init_fn(num_tasks):
    return ChainState(tuple(t.init(num_tasks) for t in transforms))

  def update_fn(losses, state, *, gramian=None, jacobian=None, key=None):
    keys = [None] * len(transforms) if key is None else list(jax.random.split(key, len(transforms)))
    w = jnp.ones_like(losses)
    new_states = []
    for t, s, k in zip(transforms, state.inner, keys):
      wt, new_state = t.update(
        w * losses,
        s,
        gramian=None if gramian is None else gramian * jnp.outer(w, w),
        jacobian=None if jacobian is None else scale_jacobian(w, jacobian),
        key=k,
      )
      # A Jacobian-level transform may answer with element-wise weights; they
      # absorb the task weights so far (and such a transform goes last).
      w = w * wt if jnp.ndim(wt) == 1 and wt.shape == w.shape else scale_jacobian(w, wt)
      new_states.append(new_state)
    return w, ChainState(tuple(new_states))

  return WeightingTransform(init_fn, update_fn, needs, select)


def aggregate(
  transform: WeightingTransform,
  jacobian,
  *,
  losses: Array | None = None,
  state: WeightingState | None = None,
  key: Array | None = None,
):
  """Applies ``transform`` once to a stacked Jacobian and returns the direction.

  Args:
    transform: any weighting transform.
    jacobian: per-task gradients stacked on a leading axis: an array ``(K, P)``
      or a pytree of ``(K, ...)`` leaves.
    losses: the per-task losses, for transforms that read them (ones if not
      given).
    state: the transform's state (a fresh one if not given).
    key: a PRNG key for stochastic transforms.

  Returns:
    ``Σₖ wₖ Jₖ``, shaped like one row of ``jacobian``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> jmtl.weighting.aggregate(jmtl.weighting.static([1.0, 0.5]), J).tolist()
    [1.0, 1.0]
  """
  k = jax.tree.leaves(jacobian)[0].shape[0]
  if losses is None:
    losses = jnp.ones((k,), jax.tree.leaves(jacobian)[0].dtype)
  if state is None:
    state = transform.init(k)
  gramian = gramian_of(jacobian) if transform.needs != "losses" else None
  w, _ = transform.update(
    losses,
    state,
    gramian=gramian,
    jacobian=jacobian if transform.needs == "jacobian" else None,
    key=key,
  )
  return combine_jacobian(w, jacobian)


def as_aggregator(transform: WeightingTransform, num_tasks: int):
  """Wraps ``transform`` as an :class:`optax.experimental.aggregating.Aggregator`.

  The aggregator's ``update(per_task_grads, state, params=None, *, losses=None,
  key=None)`` takes gradients stacked on a leading task axis and returns their
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
  from optax.experimental import _aggregating

  def init_fn(params):
    del params
    return transform.init(num_tasks)

  def update_fn(per_task_grads, state, params=None, *, losses=None, key=None, **extra):
    del params, extra
    k = jax.tree.leaves(per_task_grads)[0].shape[0]
    if losses is None:
      losses = jnp.ones((k,), jax.tree.leaves(per_task_grads)[0].dtype)
    gramian = gramian_of(per_task_grads) if transform.needs != "losses" else None
    w, state = transform.update(
      losses,
      state,
      gramian=gramian,
      jacobian=per_task_grads if transform.needs == "jacobian" else None,
      key=key,
    )
    return combine_jacobian(w, per_task_grads), state

  return _aggregating.Aggregator(init_fn, update_fn)
