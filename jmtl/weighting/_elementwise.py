"""Jacobian-level weightings that act per parameter element: GradDrop.

Their rule is not one scalar per task, so ``update`` returns *element-wise
weights*: a pytree with the structure and leaf shapes of the ``jacobian`` it
received (each leaf ``(K, ...)``), and the direction is ``Σₖ Wₖ ⊙ Jₖ``
(:func:`jmtl.weighting.combine_jacobian` and :func:`jmtl.weighting.aggregate`
handle both forms). Such a transform goes last in a :func:`chain`: what
follows it would need per-task scalars.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.weighting._base import EmptyState
from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_jacobian
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import required_key


def _sign_dropout(jac, key, leak):
  """The element-wise weights of one ``(K, ...)`` leaf."""
  j = jax.lax.stop_gradient(jac)
  dtype = jnp.promote_types(j.dtype, jnp.float32)
  j = j.astype(dtype)
  total = jnp.sum(j, axis=0)
  magnitude = jnp.sum(jnp.abs(j), axis=0)
  # 0/0 where every task's gradient is zero at an element: nothing is kept or
  # dropped there, so any purity will do.
  purity = 0.5 * (1 + jnp.where(magnitude > 0, total / jnp.where(magnitude > 0, magnitude, 1), 0))
  keep_positive = jax.random.uniform(key, j.shape[1:], dtype) < purity
  mask = jnp.where(keep_positive, j > 0, j < 0).astype(dtype)
  leak = jnp.asarray(leak, dtype).reshape((-1,) + (1,) * (j.ndim - 1))
  return (leak + (1 - leak) * mask).astype(jac.dtype)


@method()
def graddrop(leak: float | Sequence[float] = 0.0) -> WeightingTransform:
  """Gradient sign dropout (GradDrop).

  Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign:
  Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.
  At every element of the shared gradient, the positive sign purity::

      P = ½ (1 + Σᵢ gᵢ / Σᵢ |gᵢ|)

  is the chance of keeping the positive task gradients there; otherwise the
  negative ones are kept. With one uniform draw ``U`` per element (shared by
  the tasks), the mask is ``Mᵢ = 1[gᵢ > 0] 1[U < P] + 1[gᵢ < 0] 1[U ≥ P]``
  (the paper writes ``U > P`` for the second term; ``≥`` makes the two signs
  exactly complementary, so with all gradients of one sign at an element all
  of them are kept, whatever ``U``). With the paper's leak ``ℓᵢ ∈ [0, 1]``, the
  weights are ``Wᵢ = ℓᵢ + (1 − ℓᵢ) Mᵢ`` (``ℓᵢ = 1`` passes task ``i`` through
  unchanged) and the direction is ``Σᵢ Wᵢ ⊙ gᵢ``.

  The paper applies the rule to gradients at activation layers, summed over
  the batch; here it acts on the parameter gradients of the shared part (the
  Jacobian the engine gives). ``U`` is drawn per leaf of the Jacobian, in
  ``jax.tree.leaves`` order, from ``jax.random.split(key, num_leaves)``, as
  ``jax.random.uniform`` of the leaf's element shape in float32 at least.

  ``update`` returns element-wise weights shaped like ``jacobian`` (see
  :func:`jmtl.weighting.combine_jacobian`), not a ``(K,)`` vector, so it
  goes last in a chain.

  Args:
    leak: ``ℓ``: one value for every task or one per task, each in [0, 1].

  Returns:
    A stateless :class:`WeightingTransform` that needs the Jacobian and a
    ``key``.

  Raises:
    ValueError: for a leak outside [0, 1]; from ``update``, without a
      ``jacobian`` or a ``key``, or when shapes disagree.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, -2.0, 3.0], [2.0, 1.0, -3.0]])
    >>> t = jmtl.weighting.graddrop()
    >>> W, _ = t.update(jnp.ones(2), t.init(2), jacobian=J, key=jax.random.key(0))
    >>> W[:, 0].tolist()  # both positive at element 0: both kept
    [1.0, 1.0]
    >>> jmtl.weighting.aggregate(t, J, key=jax.random.key(0))[0].tolist()
    3.0
  """
  leak = np.asarray(leak, np.float64) if is_concrete(leak) else jnp.asarray(leak)
  if is_concrete(leak) and (leak.ndim > 1 or not np.all((leak >= 0) & (leak <= 1))):
    raise ValueError(f"graddrop: leak must be a number or a 1-D sequence of numbers in [0, 1], got {leak.tolist()}")

  def init_fn(num_tasks):
    del num_tasks
    return EmptyState()

  def update_fn(losses, state, **inputs):
    jacobian = checked_jacobian("graddrop", losses, inputs.get("jacobian"))
    key = required_key("graddrop", inputs.get("key"), "draws a random sign per element")
    leaves, treedef = jax.tree.flatten(jacobian)
    if leak.shape not in ((), losses.shape):
      raise ValueError(f"graddrop: got losses of shape {losses.shape} and a leak of shape {leak.shape}")
    keys = jax.random.split(key, len(leaves))
    weights = [_sign_dropout(leaf, sub, leak) for leaf, sub in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, weights), state

  return WeightingTransform(init_fn, update_fn, "jacobian")
