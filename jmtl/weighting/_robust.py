"""Byzantine-robust aggregators: Krum (on the Gramian) and the coordinate-wise trimmed mean (on the Jacobian).

Both come from distributed learning, where some of the gradients may be
arbitrary; in multi-task learning they discount tasks whose gradients are
far from the others'. Both need a minimum number of tasks, which ``update``
checks against the losses' shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl.weighting._base import EmptyState
from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_gramian
from jmtl.weighting._base import checked_jacobian
from jmtl.weighting._base import method
from jmtl.weighting._base import present_of
from jmtl.weighting._base import stateless


def _count(name: str, arg: str, value, low: int) -> int:
  if int(value) != value or value < low:
    raise ValueError(f"{name}: {arg} must be an integer ≥ {low}, got {value!r}")
  return int(value)


@method(static=("n_byzantine", "n_selected"))
def krum(n_byzantine: int = 0, n_selected: int = 1) -> WeightingTransform:
  """Krum and Multi-Krum.

  Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. With
  ``f = n_byzantine``, each task ``i`` gets the score
  ``s(i) = Σⱼ ‖gᵢ − gⱼ‖²`` over the ``K − f − 2`` gradients closest to
  ``gᵢ`` (``j ≠ i``); Krum follows the gradient of lowest score, Multi-Krum
  (``n_selected = m``) the mean of the ``m`` lowest-scored gradients: weight
  ``1/m`` on each of them, 0 elsewhere. Distances come from the Gramian,
  ``‖gᵢ − gⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ``. Ties go to the lower task index.

  It needs ``K ≥ f + 3`` tasks (at least one neighbour per score); the
  paper's resilience guarantee needs ``K > 2f + 2``.

  Args:
    n_byzantine: ``f``, the number of gradients that may be arbitrary.
    n_selected: ``m``, the number of gradients averaged (1: Krum).

  Returns:
    A stateless :class:`WeightingTransform` that needs the Gramian.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 5.0]])  # the last one is far away
    >>> t = jmtl.weighting.krum(n_byzantine=1, n_selected=2)
    >>> w, _ = t.update(jnp.ones(4), t.init(4), gramian=J @ J.T)
    >>> w.tolist()
    [0.5, 0.5, 0.0, 0.0]
  """
  f = _count("krum", "n_byzantine", n_byzantine, 0)
  m = _count("krum", "n_selected", n_selected, 1)

  def weight_fn(losses, *, gramian=None, present=None, **_):
    g = checked_gramian("krum", losses, gramian)
    k = g.shape[0]
    if k < f + 3 or m > k:
      raise ValueError(
        f"krum: n_byzantine={f} and n_selected={m} need at least {max(f + 3, m)} tasks, got losses of shape "
        f"{losses.shape}"
      )
    present = present_of(losses, present)
    kp = jnp.sum(present)
    both = present[:, None] & present[None, :]
    d = jnp.diagonal(g)
    dist = jnp.maximum(d[:, None] + d[None, :] - 2 * g, 0)
    # Not one's own neighbour, and an absent task is no one's neighbour.
    dist = jnp.where(jnp.eye(k, dtype=bool) | ~both, jnp.inf, dist)
    nearest = jnp.arange(k) < kp - f - 2  # the K' − f − 2 nearest present neighbours
    scores = jnp.where(present, jnp.sum(jnp.where(nearest, jnp.sort(dist, axis=1), 0), axis=1), jnp.inf)
    chosen = jnp.zeros((k,), bool).at[jnp.argsort(scores, stable=True)[:m]].set(True) & present
    krum_w = jnp.where(chosen, 1 / jnp.maximum(jnp.sum(chosen), 1), 0).astype(g.dtype)
    # Fewer than f + 3 present tasks: Krum is undefined; the mean of the present ones.
    return jnp.where(kp >= f + 3, krum_w, present.astype(g.dtype) / jnp.maximum(kp, 1))

  return stateless(weight_fn, needs="gramian")


@method(static=("trim",))
def trimmed_mean(trim: int = 1) -> WeightingTransform:
  """The coordinate-wise trimmed mean.

  Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018. At every element of the
  shared gradient the ``trim`` largest and ``trim`` smallest task values are
  dropped and the other ``K − 2·trim`` averaged: element-wise weights
  ``1/(K − 2·trim)`` on the kept values, 0 on the dropped ones (ties broken
  by task index), shaped like the ``jacobian`` (see
  :func:`jmtl.weighting.combine_jacobian`). It needs ``K > 2·trim``, and
  goes last in a chain.

  Args:
    trim: the number of values dropped at each end, per element.

  Returns:
    A stateless :class:`WeightingTransform` that needs the Jacobian.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, -30.0]])
    >>> jmtl.weighting.aggregate(jmtl.weighting.trimmed_mean(1), J).tolist()  # the median of each column
    [2.0, 10.0]
  """
  t = _count("trimmed_mean", "trim", trim, 0)

  def weights_of(leaf, present):
    k = present.shape[0]
    kp = jnp.sum(present)
    j = jax.lax.stop_gradient(leaf)
    # Absent tasks rank after every present one, so a present value's rank is its rank among the present.
    shape = (k,) + (1,) * (j.ndim - 1)
    j = jnp.where(present.reshape(shape), j, jnp.inf)
    rank = jnp.argsort(jnp.argsort(j, axis=0, stable=True), axis=0, stable=True)  # each value's rank in its column
    kept = present.reshape(shape) & (rank >= t) & (rank < kp - t)
    trimmed = kept / jnp.maximum(kp - 2 * t, 1)
    # Not more than 2·trim present tasks: the mean of the present ones.
    mean = jnp.broadcast_to(present.reshape(shape), j.shape) / jnp.maximum(kp, 1)
    return jnp.where(kp > 2 * t, trimmed, mean).astype(leaf.dtype)

  def update_fn(losses, state, **inputs):
    jacobian = checked_jacobian("trimmed_mean", losses, inputs.get("jacobian"))
    k = losses.shape[0]
    if k <= 2 * t:
      raise ValueError(f"trimmed_mean: trim={t} needs more than {2 * t} tasks, got losses of shape {losses.shape}")
    present = present_of(losses, inputs.get("present"))
    return jax.tree.map(lambda leaf: weights_of(leaf, present), jacobian), state

  return WeightingTransform(lambda num_tasks: EmptyState(), update_fn, "jacobian")
