"""Gramian methods over float32's whole range, fuzzed (issue 16, item 5).

The engine gives a Gramian method ``G / 2**e`` and ``e`` (``weighting.scaled_gramian``): the squares of a 1e±30
Jacobian leave float32, the scaled Gramian does not. Every Gramian method is fuzzed with hypothesis on adversarial
Jacobians (zero, duplicated, opposite and nearly opposite rows, rank one, more tasks than dimensions) at scales 1e±30,
and must give finite weights, move no task backwards beyond the stated tolerance when it promises not to, and be
equivariant under scaling (the weights of the scale-free methods do not change; Nash-MTL's and FairGrad's change by
their known factor) and under permutations of the tasks. Then the train step at 1e±30, on every gradient route.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import jmtl
from jmtl import weighting as W
from tests._helpers import three_task_batch
from tests.test_weighting_contract import TABLE
from tests.test_weighting_contract import args_of

K = 4
#: The Gramian methods fuzzed here; MoDo and SDMGrad read the cross-Gramian (their range is tested through the step).
#: PCD keeps squared gradient norms in its state, so its range is the Gramian's; FairGrad's weights scale as
#: ‖g‖^(−2α/(α+1)) (1e±40 at 1e∓30 for the test's α = 2, and a zero gradient's weight is large by itself), so its
#: range is where they are floats. Both are stated in
#: their docstrings and fuzzed within it.
NAMES = sorted(n for n, s in TABLE.items() if s.needs == "gramian" and n not in ("modo", "sdmgrad"))
DECADES = {"pcd": 15, "fairgrad": 15}
#: (J Jᵀ w)ₖ ≥ −TOL · maxₖ ‖gₖ‖ · Σₖ |wₖ| ‖gₖ‖ for the methods that promise no conflict, on Jacobians of condition up
#: to 10⁶ (where the methods state their float32 accuracy): what float32 solves hold.
TOL = 2e-3
#: Equivariance holds to this fraction of Σₖ |wₖ| ‖gₖ‖.
EQUIVARIANCE = 1e-3


#: Where a method's solution is not a continuous function of J, so that rounding may pick another one: CAGrad's
#: coefficient jumps from 0 to ``s/‖g_w*‖`` as ``‖g_w*‖`` crosses its resolution, which happens where the hull of the
#: gradients holds 0 (possible only when rank J < K); ConFIG's pseudo-inverse of the cosine matrix drops singular
#: values below a threshold. PCD's ε makes it scale-free only up to ε (its docstring).
def _rank_deficient(j):
  s = np.linalg.svd(j, compute_uv=False)
  return np.sum(s > 1e-5 * s[0]) < K


ILL_POSED = {"cagrad": _rank_deficient, "config": _rank_deficient, "pcd": lambda j: True}
#: How the weights change when J is multiplied by c: c**power (0 for a scale-free method).
POWER = {"nash_mtl": -1.0, "fairgrad": -2.0 * 2.0 / 3.0}  # FairGrad's test α = 2: c^(−2α/(α+1))


@functools.cache
def weigher(name: str):
  """A jitted ``J -> weights`` with a fresh state, through the Gramian the engine gives."""
  t = W.methods()[name](**args_of(name, K))

  @jax.jit
  def weights(jac, key):
    gramian, exponent = W.scaled_gramian(jac)
    state = W.init_state(t, K, jnp.zeros(jac.shape[1:], jac.dtype))
    w, _ = t.update(jnp.ones(K), state, gramian=gramian, gramian_exponent=exponent, key=key)
    return w

  return weights


def jacobian(seed: int, p: int, structure: str) -> np.ndarray:
  rng = np.random.default_rng(seed)
  j = rng.normal(size=(K, p)) + 0.5 * rng.normal(size=(1, p))
  if structure == "zero row":
    j[1] = 0
  elif structure == "duplicate":
    j[2] = j[0]
  elif structure == "opposite":
    j[1] = -j[0]
  elif structure == "nearly opposite":
    j[1] = -j[0] + 1e-3 * rng.normal(size=p)
  elif structure == "rank one":
    j = rng.normal(size=(K, 1)) * rng.normal(size=(1, p))
  elif structure == "mixed norms":  # a spread of 10³ in norms: condition 10⁶, where the methods state float32 bounds
    j = j * np.array([[1e-2], [1.0], [1e1], [1.0]])
  return j


CASES = st.tuples(
  st.integers(0, 10_000),
  st.sampled_from([3, 6]),  # p = 3: more tasks than dimensions
  st.sampled_from(["none", "zero row", "duplicate", "opposite", "nearly opposite", "rank one", "mixed norms"]),
  st.integers(-30, 30),
)


def _weights(name, j, key=0):
  return np.asarray(weigher(name)(jnp.asarray(j, jnp.float32), jax.random.key(key)), np.float64)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=CASES)
def test_fuzzed_jacobians_over_float32s_range(name, case):
  seed, p, structure, decade = case
  limit = DECADES.get(name, 30)
  decade = max(-limit, min(limit, decade))
  base = jacobian(seed, p, structure)
  j = (base * 10.0**decade).astype(np.float32)
  w = _weights(name, j)
  assert np.all(np.isfinite(w)), (name, case, w)

  j64 = j.astype(np.float64)
  norms = np.linalg.norm(j64, axis=1)
  # The size of the direction's terms, Σₖ |wₖ| ‖gₖ‖: rounding in forming d = Jᵀw is relative to it, not to ‖d‖
  # (which is 0 at a Pareto-stationary point).
  size = np.abs(w) @ norms
  if TABLE[name].no_conflict:
    g = j64 @ (w @ j64)
    bound = TOL * np.max(norms) * size
    assert np.min(g) >= -bound, (name, case, g, bound)

  def close(w_actual, w_expected, what, rows=j64):
    # On the direction Jᵀw (a zero or duplicated row leaves its own weight arbitrary), relative to the size of its
    # terms, and to float32's resolution of the largest gradient (the direction of a Pareto-stationary point is 0).
    err = np.linalg.norm((w_actual - w_expected) @ rows)
    scale = np.abs(w_expected) @ norms
    assert err <= EQUIVARIANCE * scale + 1e-5 * np.max(norms) * np.sum(np.abs(w_expected)), (name, case, what)

  if name in ILL_POSED and ILL_POSED[name](j64):
    return
  # Scale: 2**m J (exact in float32) gives the weights times 2**(m·power).
  m = 40 if decade < 0 else -40
  close(_weights(name, j * np.float32(2.0**m)), w * 2.0 ** (m * POWER.get(name, 0.0)), "scale")

  if TABLE[name].perm == "equivariant":
    perm = np.random.default_rng(seed).permutation(K)
    close(_weights(name, j[perm]), w[perm], "permutation", j64[perm])


def _problem(scale: float):
  """A small separable model with three tasks whose losses are multiplied by ``scale`` (so is the Jacobian)."""
  model = jmtl.models.mlp({"a": 3, "b": 3, "c": 1}, hidden=(8,))
  ce, mse = jmtl.losses.softmax_cross_entropy, jmtl.losses.mse
  tasks = [
    jmtl.Task("a", lambda p, y: scale * ce(p, y)),
    jmtl.Task("b", lambda p, y: scale * ce(p, y)),
    jmtl.Task("c", lambda p, y: scale * mse(p, y)),
  ]
  batch = three_task_batch(1)

  return model, tasks, batch


ROUTES = {
  "general": dict(level="parameter"),  # the model without encode/head (below)
  "separable parameter level": dict(level="parameter"),
  "separable parameter level, chunked": dict(level="parameter", chunk_size=2),
  "representation level": dict(level="representation"),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_train_step_at_extreme_gradient_scales(route):
  """MGDA's weights are scale-free: at 1e-30 and 1e30 (Gramians of 1e±60, beyond float32) they are the same, the step
  is not skipped and the per-task gradient norms are reported, on every gradient route."""
  model, _, batch = _problem(1.0)
  if route == "general":
    model = model._replace(encode=None, head=None, head_kind=None)  # not separable: the general route
  weights = []
  for s in (1e-30, 1e30):
    _, tasks, _ = _problem(s)
    state = jmtl.TrainState.from_model(
      model, batch["inputs"], tx=optax.sgd(0.0), weighting=W.mgda(), rng=jax.random.key(0)
    )
    _, metrics = jax.jit(jmtl.make_train_step(model, tasks, **ROUTES[route]))(state, batch)
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["grad_norm"])), (route, s)
    norms = np.asarray(metrics.per_task["grad_norm"])
    assert np.all(np.isfinite(norms)) and np.all(norms > 0), (route, s, norms)
    weights.append(np.asarray(metrics.per_task["weight"]))
  np.testing.assert_allclose(weights[0], weights[1], rtol=1e-3, atol=1e-5, err_msg=route)
