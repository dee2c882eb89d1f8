import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl import sharing


def _brute_pairwise(copies):
  total = 0.0
  for i, j in itertools.combinations(range(len(copies)), 2):
    for a, b in zip(jax.tree.leaves(copies[i]), jax.tree.leaves(copies[j])):
      total += float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return total


@pytest.mark.parametrize("k", range(2, 17))
def test_pairwise_equals_double_loop(k):
  rng = np.random.default_rng(k)
  copies = [{"w": rng.normal(size=(3, 4)) + 5.0, "b": rng.normal(size=(4,))} for _ in range(k)]
  with jax.enable_x64(True):
    jc = [jax.tree.map(jnp.asarray, c) for c in copies]
    got = float(sharing.pairwise_distance(jc))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *jc)
    got_stacked = float(sharing.pairwise_distance(stacked))
    got_mean = float(sharing.mean_distance(jc))
  want = _brute_pairwise(copies)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(got_stacked, want, rtol=1e-12)
  np.testing.assert_allclose(got_mean, want / k, rtol=1e-12)


def test_pairwise_is_stable_for_large_close_copies():
  # K Σ‖θ‖² − ‖Σθ‖² would lose every digit here in float32.
  base = jnp.full((1000,), 300.0, jnp.float32)
  copies = [base, base + 1e-2, base - 1e-2]
  want = float(_brute_pairwise(copies))
  np.testing.assert_allclose(float(sharing.pairwise_distance(copies)), want, rtol=1e-3)
  naive = 3 * sum(jnp.sum(c**2) for c in copies) - jnp.sum(sum(copies) ** 2)
  assert abs(float(naive) - want) > 0.1 * want  # the textbook form is wrong here


def test_soft_sharing_gradient_pulls_copies_together():
  pen = sharing.soft_sharing(0.5, lambda p: [p["a"], p["b"]])
  g = jax.grad(pen)({"a": jnp.array([1.0]), "b": jnp.array([0.0])})
  # d/da 0.5 (a-b)^2 = (a-b)
  np.testing.assert_allclose(g["a"], [1.0])
  np.testing.assert_allclose(g["b"], [-1.0])


def test_weight_decay_mask_and_value():
  params = {"dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)}}
  assert float(sharing.weight_decay(0.1)(params)) == pytest.approx(0.1 * 24)
  assert float(sharing.weight_decay(0.1, mask=None)(params)) == pytest.approx(0.1 * 27)
  only_bias = lambda p: jax.tree.map(lambda x: x.ndim == 1, p)
  assert float(sharing.weight_decay(1.0, mask=only_bias)(params)) == pytest.approx(3.0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="strength"):
    sharing.soft_sharing(-1.0, lambda p: p)
  with pytest.raises(ValueError, match="kind"):
    sharing.soft_sharing(1.0, lambda p: p, kind="cosine")
  with pytest.raises(ValueError, match="leaf shapes"):
    sharing.pairwise_distance([jnp.zeros(2), jnp.zeros(3)])
  with pytest.raises(ValueError, match="at least 2"):
    sharing.pairwise_distance([jnp.zeros(2)])
