"""Fixed weightings: equal and static."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import stateless


@method()
def equal() -> WeightingTransform:
  """Equal weighting (EW): ``wₖ = 1`` for every task, i.e. the plain sum of losses.

  The baseline every MTL paper reports (e.g. Vandenhende et al., "Multi-Task
  Learning for Dense Prediction Tasks: A Survey", TPAMI 2021).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.equal()
    >>> t.update(jnp.array([0.5, 2.0, 1.0]), t.init(3))[0].tolist()
    [1.0, 1.0, 1.0]
  """
  return stateless(lambda losses, **_: jnp.ones_like(losses))


@method()
def static(weights: Sequence[float]) -> WeightingTransform:
  """Static weights ``wₖ`` chosen by hand or by grid search on validation data.

  The weighted-sum objective ``Σₖ wₖ Lₖ`` of the early multi-task literature
  (Caruana, "Multitask Learning", Machine Learning 1997; see Kendall et al.
  2018 for the grid-search protocol).

  Args:
    weights: one non-negative, finite weight per task (an array under
      :func:`~jmtl.weighting.inject_hyperparams`, so they can be scheduled).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.static([1.0, 0.1])
    >>> t.update(jnp.array([3.0, 4.0]), t.init(2))[0].tolist()
    [1.0, 0.10000000149011612]
  """
  if is_concrete(weights):
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
      raise ValueError(f"static weights must be a 1-D sequence of finite non-negative numbers, got {weights.tolist()}")

  def weight_fn(losses, **_):
    if losses.shape != weights.shape:
      raise ValueError(
        f"static: {weights.shape[0]} weights given for {losses.shape[0]} tasks (losses shape {losses.shape})"
      )
    return jnp.asarray(weights, losses.dtype)

  return stateless(weight_fn)
