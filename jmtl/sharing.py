"""Regularisers: soft-sharing penalties and weight decay.

Each factory returns a pure ``penalty(params) -> scalar`` that
:func:`jmtl.make_train_step` adds to the weighted task losses, so its gradient
enters the same update.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any
Penalty = Callable[[Params], Array]


def _stack(copies) -> Any:
  """A list/tuple of K pytrees, or one pytree of ``(K, ...)`` leaves, as the latter."""
  if isinstance(copies, (list, tuple)):
    if len(copies) < 2:
      raise ValueError(f"soft sharing needs at least 2 task copies, got {len(copies)}")
    structs = {jax.tree.structure(c) for c in copies}
    if len(structs) > 1:
      raise ValueError("soft sharing: the task copies have different tree structures")
    shapes = [[leaf.shape for leaf in jax.tree.leaves(c)] for c in copies]
    if any(s != shapes[0] for s in shapes):
      raise ValueError(f"soft sharing: the task copies have different leaf shapes: {shapes}")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *copies)
  return copies


def pairwise_distance(copies) -> Array:
  """``Σ_{i<j} ‖θᵢ − θⱼ‖²`` over K parameter copies, in O(K·P).

  Uses ``Σ_{i<j} ‖θᵢ − θⱼ‖² = K Σᵢ ‖θᵢ − θ̄‖²`` (θ̄ the mean copy). It equals the
  textbook ``K Σ‖θᵢ‖² − ‖Σθᵢ‖²`` but does not cancel catastrophically when the
  copies are large and close, which is exactly where a tied model lives.

  Args:
    copies: a list of K pytrees with equal structure, or one pytree whose
      leaves carry a leading task axis of size K.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import sharing
    >>> float(sharing.pairwise_distance([jnp.array([0.0]), jnp.array([1.0]), jnp.array([3.0])]))
    14.0
  """
  stacked = _stack(copies)
  leaves = jax.tree.leaves(stacked)
  k = leaves[0].shape[0]
  return k * sum(jnp.sum((x - jnp.mean(x, axis=0)) ** 2) for x in leaves)


def mean_distance(copies) -> Array:
  """``Σᵢ ‖θᵢ − θ̄‖²``: each copy's squared distance to the mean copy.

  The distance-to-mean form of soft sharing (Duong et al., "Low Resource
  Dependency Parsing: Cross-lingual Parameter Sharing in a Neural Network
  Parser", ACL 2015, tie copies by an L2 distance; the mean form ties each to a
  common centre). It is ``pairwise_distance / K``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import sharing
    >>> float(sharing.mean_distance(jnp.array([[0.0], [2.0]])))
    2.0
  """
  stacked = _stack(copies)
  return sum(jnp.sum((x - jnp.mean(x, axis=0)) ** 2) for x in jax.tree.leaves(stacked))


#: The soft-sharing penalty kinds, name -> distance of the stacked copies.
KINDS = ("pairwise", "mean")


def soft_sharing(strength: float, select: Callable[[Params], Any], kind: str = "pairwise") -> Penalty:
  """Soft parameter sharing: ``λ Σ_{i<j} ‖θᵢ − θⱼ‖²`` over the selected copies.

  Soft sharing gives every task its own copy of a sub-network and ties the
  copies with an L2 penalty (Duong et al. 2015; Yang & Hospedales, "Trace Norm
  Regularised Deep Multi-Task Learning", ICLR-W 2017, for the general form; the
  survey of Ruder, "An Overview of Multi-Task Learning in Deep Neural
  Networks", 2017, §"Soft parameter sharing").

  Args:
    strength: λ ≥ 0.
    select: ``params -> copies``: a list of K pytrees (e.g.
      :func:`jmtl.models.tower_params`) or one pytree of ``(K, ...)`` leaves.
    kind: ``"pairwise"`` for ``Σ_{i<j}‖θᵢ−θⱼ‖²`` or ``"mean"`` for
      ``Σᵢ‖θᵢ−θ̄‖²``.

  Returns:
    ``penalty(params) -> scalar``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import sharing
    >>> pen = sharing.soft_sharing(0.5, lambda p: [p["a"], p["b"]])
    >>> float(pen({"a": jnp.array([1.0, 1.0]), "b": jnp.array([0.0, 1.0])}))
    0.5
  """
  if not strength >= 0:
    raise ValueError(f"soft_sharing: strength must be >= 0, got {strength}")
  if kind not in KINDS:
    raise ValueError(f"soft_sharing: kind must be one of {list(KINDS)}, got {kind!r}")
  fn = pairwise_distance if kind == "pairwise" else mean_distance

  def penalty(params):
    return strength * fn(select(params))

  return penalty


def default_decay_mask(params: Params) -> Any:
  """True for leaves with ``ndim >= 2`` (kernels), False for biases and scales."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def weight_decay(strength: float, mask: Callable[[Params], Any] | None = default_decay_mask) -> Penalty:
  """Coupled L2 weight decay ``λ Σ ‖θ‖²`` on the parameters ``mask`` selects.

  This is the penalty form of the seed papers: it is added to the loss, so its
  gradient ``2λθ`` passes through the optimizer (and, with Adam, is rescaled by
  it). For *decoupled* decay (Loshchilov & Hutter, "Decoupled Weight Decay
  Regularization", ICLR 2019) use the optimizer instead, e.g.
  ``optax.adamw(lr, weight_decay=λ, mask=...)`` or
  ``optax.chain(optax.add_decayed_weights(λ, mask), ...)``; the two agree for
  plain SGD up to the factor 2 in ``∇‖θ‖²``.

  Args:
    strength: λ ≥ 0.
    mask: ``params -> pytree of bools`` choosing the decayed leaves (default:
      kernels, i.e. ``ndim >= 2``), or ``None`` for every leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import sharing
    >>> pen = sharing.weight_decay(0.1)
    >>> float(pen({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}))
    0.4000000059604645
  """
  if not strength >= 0:
    raise ValueError(f"weight_decay: strength must be >= 0, got {strength}")

  def penalty(params):
    sel = jax.tree.map(lambda _: True, params) if mask is None else mask(params)
    terms = jax.tree.map(lambda x, m: jnp.sum(x**2) if m else jnp.zeros((), x.dtype), params, sel)
    return strength * sum(jax.tree.leaves(terms), jnp.zeros(()))

  return penalty


def combine(*penalties: Penalty) -> Penalty:
  """The sum of several penalties.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import sharing
    >>> p = sharing.combine(sharing.weight_decay(1.0, mask=None), lambda params: 2.0)
    >>> float(p({"w": jnp.array([1.0, 2.0])}))
    7.0
  """

  def penalty(params):
    return sum((p(params) for p in penalties), jnp.zeros(()))

  return penalty


def as_penalty(penalties: Penalty | Sequence[Penalty] | None) -> Penalty | None:
  """``None``, one penalty or a sequence of them, as one penalty or ``None``."""
  if penalties is None:
    return None
  if callable(penalties):
    return penalties
  penalties = tuple(penalties)
  return combine(*penalties) if penalties else None
