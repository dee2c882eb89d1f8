"""Property checks and problem generators shared by the weighting tests.

Plain functions, no fixtures: each ``assert_*`` takes a transform's ``update`` (eager or jitted), an initial state and
a list of :class:`Problem` and raises ``AssertionError`` when the property fails. Jitted updates are built once per
(factory, arguments) by :func:`compiled` and shared by every test module of the session, because XLA compilation,
not the checks, is what costs time; :func:`counting_jit` counts traces with a Python side effect in the traced
function, so a retrace shows up as one more entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import weighting as W

# ---------------------------------------------------------------------------------------------------------------------
# Generators.


def random_jacobians(n: int, k: int, p: int = 6, *, seed: int = 0, shift: float = 0.5, dtype=np.float32) -> np.ndarray:
  """``n`` Jacobians ``(k, p)``: independent normal rows plus a component shared by the tasks (``shift`` sets how
  much), so some pairs of task gradients agree and some conflict."""
  rng = np.random.default_rng(seed)
  common = rng.normal(size=(n, 1, p))
  return (rng.normal(size=(n, k, p)) + shift * common).astype(dtype)


def random_jacobian(k: int, p: int = 6, *, seed: int = 0, shift: float = 0.5, dtype=np.float32) -> np.ndarray:
  """One Jacobian ``(k, p)`` of :func:`random_jacobians`."""
  return random_jacobians(1, k, p, seed=seed, shift=shift, dtype=dtype)[0]


def loss_sequence(n: int, k: int, *, seed: int = 0, low: float = 0.1, high: float = 2.0) -> np.ndarray:
  """``n`` float32 loss vectors ``(k,)``, uniform in ``[low, high)``."""
  return np.random.default_rng(seed).uniform(low, high, (n, k)).astype(np.float32)


def extreme_losses(k: int) -> np.ndarray:
  """Eight float32 loss vectors ``(k,)`` that mix 1e-8, 1 and 1e8 (and a zero loss), task by task and over time."""
  if k == 1:
    return np.array([[1e-8], [1e8], [1.0], [1e8], [1e-8], [1e8], [0.0], [1e-8]], np.float32)
  rows = [
    [1e-8, 1e8, 1.0],
    [1e8, 1e-8, 1.0],
    [1e-8, 1e-8, 1e8],
    [1.0, 1e8, 1e-8],
    [1e8, 1e8, 1e-8],
    [1e-8, 1.0, 1e8],
    [1e8, 0.0, 1e-8],
    [1.0, 1.0, 1e8],
  ]
  return np.asarray(rows, np.float32)[:, np.arange(k) % 3]


def mixed_losses(k: int) -> np.ndarray:
  """Three float32 loss vectors ``(k,)``: ordinary ones, one that mixes 1e-8, 1e8 and 0, and ones."""
  rows = np.array([[1.0, 2.0, 0.5], [1e-8, 1e8, 0.0], [1.0, 1.0, 1.0]], np.float32)
  return rows[:, np.arange(k) % 3]


def degenerate_jacobians(k: int = 3, p: int = 6, *, seed: int = 8) -> dict[str, np.ndarray]:
  """Jacobians ``(k, p)`` (float64) on which a weighting must stay finite: zero, duplicated, opposite, rank-one
  rows, and rows of 1e-8 and 1e8. ``k = 1``: one row, zero or 1e8. ``k > 3``: more random rows are appended."""
  g = random_jacobian(3, p, seed=seed, dtype=np.float64)
  if k == 1:
    return {"K=1": g[:1], "K=1 zero": np.zeros((1, p)), "K=1 1e8": 1e8 * g[:1]}
  if k < 3:
    raise ValueError(f"degenerate_jacobians: k must be 1 or at least 3, got {k}")
  cases = {
    "zero row": [g[0], 0 * g[1], g[2]],
    "duplicated": [g[0], g[0], g[2]],
    "all equal": [g[0], g[0], g[0]],
    "opposite": [g[0], -g[0], g[2]],
    "opposite and zero": [g[0], -g[0], 0 * g[1]],
    "all zero": [0 * g[0]] * 3,
    "rank one": list(np.outer([1.0, -2.0, 3.0], g[0])),
    "all 1e-8": list(1e-8 * g),
    "all 1e8": list(1e8 * g),
    "rank two, all 1e-8": list(1e-8 * np.stack([g[0], g[1], g[0] - g[1]])),
    "rank two, all 1e8": list(1e8 * np.stack([g[0], g[1], g[0] - g[1]])),
    "1e-8, 1e8 and their sum": [1e-8 * g[0], 1e8 * g[1], g[0] + g[1]],
    "1e-8, 1 and 1e8": [1e-8 * g[0], g[1], 1e8 * g[2]],
  }
  extra = random_jacobian(k - 3, p, seed=seed + 1, dtype=np.float64) if k > 3 else np.zeros((0, p))
  return {name: np.concatenate([np.stack(rows), extra]) for name, rows in cases.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Problems: the losses and inputs of one ``update`` call.


class Problem(NamedTuple):
  losses: jax.Array  # (K,)
  inputs: dict  # the keyword inputs of ``update``


def _host(tree):
  """``tree`` with every leaf but PRNG keys as a numpy array (numpy ops compile nothing)."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: x if is_key(x) else np.asarray(x), tree)


def _device(tree):
  """``tree`` with every numpy leaf put on the device (a transfer, not a compiled op)."""
  return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, tree)


#: The second half-batch's Jacobian in :func:`problem` is ``J R``: the same tasks' gradients, slightly turned.
_SECOND_SAMPLE = np.eye(6) + 0.2 * np.random.default_rng(99).normal(size=(6, 6))


def problem(needs: str, losses, jacobian=None, *, seed: int = 0, **extra) -> Problem:
  """One call's losses and inputs, as the train step gives them: ``key`` and ``step`` always; ``gramian`` and
  ``cross_gramian`` (``J (J R)ᵀ``, as from a second sample) for a transform that needs the Gramian or the Jacobian;
  ``jacobian`` for one that needs it; ``unread``, an input no built-in reads (as a user may add one); and ``extra``
  inputs. The same kinds of problem have the same jit signature, so
  every test that builds them with this function shares compiled updates."""
  inputs = {"key": jax.random.key(seed), "step": np.int32(seed), "unread": np.zeros(2, np.float32), **extra}
  if needs != "losses":
    jac = np.asarray(jacobian)
    inputs["gramian"] = jac @ jac.T
    inputs["cross_gramian"] = (jac @ (jac @ _SECOND_SAMPLE[: jac.shape[1], : jac.shape[1]]).T).astype(jac.dtype)
    if needs == "jacobian":
      inputs["jacobian"] = jac
  return Problem(jnp.asarray(losses), _device(inputs))


def problems(needs: str, losses: Sequence, jacobians: Sequence | None = None, *, seed: int = 0, **extra):
  """A :func:`problem` per row of ``losses`` (and of ``jacobians``), with keys and steps ``seed, seed + 1, ...``."""
  jacobians = [None] * len(losses) if jacobians is None else jacobians
  return [problem(needs, ls, j, seed=seed + i, **extra) for i, (ls, j) in enumerate(zip(losses, jacobians))]


def run(update: Callable, state, probs: Sequence[Problem]) -> tuple[list, Any]:
  """Applies ``update`` along ``probs``; returns the list of weights and the final state."""
  ws = []
  for p in probs:
    w, state = update(p.losses, state, **p.inputs)
    ws.append(w)
  return ws, state


def permute_problem(p: Problem, perm) -> Problem:
  """The same problem with the tasks in the order ``perm``: losses, Gramian rows and columns, Jacobian rows."""
  perm = np.asarray(perm)
  inputs = _host(p.inputs)
  for name in ("gramian", "cross_gramian"):
    if inputs.get(name) is not None:
      inputs[name] = inputs[name][np.ix_(perm, perm)]
  if inputs.get("jacobian") is not None:
    inputs["jacobian"] = jax.tree.map(lambda j: j[perm], inputs["jacobian"])
  return Problem(jnp.asarray(np.asarray(p.losses)[perm]), _device(inputs))


def rescale_problem(p: Problem, scale, key=None) -> Problem:
  """The problem as weights ``scale`` leave it (what a transform chained after them sees), with ``key`` if given."""
  losses = np.asarray(p.losses)
  scale = np.asarray(scale, losses.dtype)
  inputs = _host(p.inputs)
  for name in ("gramian", "cross_gramian"):
    if inputs.get(name) is not None:
      inputs[name] = inputs[name] * np.outer(scale, scale)
  if inputs.get("jacobian") is not None:
    inputs["jacobian"] = scale_rows(scale, inputs["jacobian"])
  if key is not None:
    inputs["key"] = key
  return Problem(jnp.asarray(scale * losses), _device(inputs))


def scale_rows(scale, tree):
  """Every ``(K, ...)`` leaf of ``tree`` (numpy) with row ``k`` multiplied by ``scale[k]``."""
  return jax.tree.map(lambda x: x * np.reshape(np.asarray(scale, x.dtype), (-1,) + (1,) * (x.ndim - 1)), _host(tree))


def permute_tasks(tree, perm):
  """Every leaf of ``tree`` with each axis of length ``K = len(perm)`` put in the order ``perm``.

  A per-task state (weights, running means, optimizer moments, a K×K matrix of targets) permutes with the tasks; a
  scalar count does not.
  """
  perm = np.asarray(perm)

  def leaf(x):
    x = np.asarray(x)
    for axis, n in enumerate(x.shape):
      if n == len(perm):
        x = np.take(x, perm, axis=axis)
    return x

  return jax.tree.map(leaf, tree)


# ---------------------------------------------------------------------------------------------------------------------
# Compiled updates, built once and shared.


def counting_jit(fn: Callable) -> tuple[Callable, list]:
  """``jax.jit(fn)`` and a list that gets one entry (the losses' shape) each time ``fn`` is traced."""
  traces = []

  def traced(losses, *args, **kwargs):
    traces.append(jnp.shape(losses))  # runs once per trace, never when a compiled program is reused
    return fn(losses, *args, **kwargs)

  return jax.jit(traced), traces


class Compiled(NamedTuple):
  transform: W.WeightingTransform
  update: Callable  # jax.jit(transform.update), counting its traces
  traces: list  # one entry per trace of ``update``


@functools.cache
def compiled(factory: Callable, /, *args, **kwargs) -> Compiled:
  """``factory(*args, **kwargs)`` and its jitted, trace-counting update; one per argument set for the session.

  Arguments must be hashable (give sequences as tuples).
  """
  t = factory(*args, **kwargs)
  update, traces = counting_jit(t.update)
  return Compiled(t, update, traces)


# ---------------------------------------------------------------------------------------------------------------------
# Assertions.


def assert_trees_allclose(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6, err_msg: str = "") -> None:
  """Same structure, and every leaf close."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), (err_msg, actual, expected)
  as64 = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  for a, b in zip(as64(actual), as64(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=err_msg)


def signature(tree) -> tuple:
  """The structure and each leaf's shape, dtype and weak type: what decides whether ``jit`` retraces. Works on
  arrays and on the :class:`jax.ShapeDtypeStruct` leaves of :func:`jax.eval_shape`."""
  aval = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  return jax.tree.structure(tree), [(aval(x).shape, aval(x).dtype, aval(x).weak_type) for x in jax.tree.leaves(tree)]


def init(t: W.WeightingTransform, k: int, p: int = 6):
  """``t``'s initial state for ``k`` tasks whose gradients are ``(p,)`` (:func:`random_jacobians`' shape)."""
  return W.init_state(t, k, np.zeros(p, np.float32))


def direction(weights, jacobian):
  """``Σₖ wₖ Jₖ`` in float64 numpy, for ``(K,)`` weights or element-wise ones (a pytree shaped like ``jacobian``);
  a :class:`~jmtl.weighting.Direction`'s own."""
  as64 = lambda x: np.asarray(x, np.float64)
  if isinstance(weights, W.Direction):
    return jax.tree.map(as64, weights.shared)
  if W.is_task_vector(weights):
    return jax.tree.map(lambda j: np.tensordot(as64(weights), as64(j), 1), jacobian)
  return jax.tree.map(lambda w, j: np.sum(as64(w) * as64(j), axis=0), weights, jacobian)


def assert_finite(tree, err_msg="") -> None:
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (err_msg, tree)


def assert_weights_shaped(weights, p: Problem, err_msg="") -> None:
  """``(K,)`` weights in the losses' dtype, or element-wise weights shaped (and typed) like the Jacobian."""
  k = p.losses.shape[0]
  if isinstance(weights, W.Direction):
    row = jax.tree.map(lambda j: jax.ShapeDtypeStruct(j.shape[1:], j.dtype), p.inputs["jacobian"])
    assert signature(weights.shared) == signature(row), (err_msg, signature(weights.shared), signature(row))
    weights = weights.weights
  if W.is_task_vector(weights):
    assert weights.shape == (k,) and weights.dtype == p.losses.dtype, (err_msg, weights)
  else:
    jacobian = p.inputs.get("jacobian")
    assert jacobian is not None, (err_msg, "element-wise weights from a transform that was given no Jacobian")
    assert signature(weights) == signature(jacobian), (err_msg, signature(weights), signature(jacobian))


def assert_jit_equals_eager(
  update: Callable,
  jitted: Callable,
  init_state,
  probs: Sequence[Problem],
  eager_probs: Sequence[Problem] | None = None,
  *,
  rtol: float = 1e-5,
  atol: float = 1e-6,
) -> None:
  """The jitted update gives the eager update's weights and states along ``probs``.

  ``eager_probs`` (default ``probs``) are the same problems as the eager run sees them, e.g. without the inputs the
  transform does not read: then the check also shows that those inputs are ignored.
  """
  w_jit, s_jit = run(jitted, init_state, probs)
  w_eager, s_eager = run(update, init_state, probs if eager_probs is None else eager_probs)
  for i, (a, b) in enumerate(zip(w_jit, w_eager)):
    assert_trees_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"weights of call {i}")
  assert_trees_allclose(s_jit, s_eager, rtol=rtol, atol=atol, err_msg="final state")


def assert_no_retrace(jitted: Callable, traces: list, init_state, probs: Sequence[Problem]) -> tuple[list, Any]:
  """Along ``probs`` (all of one shape), ``jitted`` is traced at most on the first call and never again, and the
  state keeps its signature (structure, shapes, dtypes, weak types).

  ``traces`` is the list of :func:`counting_jit`. Returns the weights and the final state.
  """
  assert len(probs) >= 2, "no-retrace needs a second call"
  before = len(traces)
  ws, state = run(jitted, init_state, probs[:1])
  first = len(traces)
  assert first - before <= 1, traces[before:]
  more, state = run(jitted, state, probs[1:])
  assert len(traces) == first, f"retraced on a call with the same shapes: {traces[first:]}"
  assert signature(state) == signature(init_state), (signature(state), signature(init_state))
  return ws + more, state


def assert_state_stable(update: Callable, init_state, p: Problem, loss_dtypes=(jnp.float32,)) -> None:
  """After an update, the state has the structure, shapes, dtypes and weak types it had before, whatever the
  losses' dtype, and ``(K,)`` weights follow the losses' dtype.

  Checked abstractly (:func:`jax.eval_shape`: traced, never compiled), so it is cheap for any number of dtypes;
  give ``update`` unjitted. One call is enough: when the state's signature is unchanged after it, every later call
  sees the same abstract inputs, so it is unchanged after all of them.
  """
  before = signature(init_state)
  for dtype in loss_dtypes:
    losses = jnp.asarray(p.losses).astype(dtype)
    w, state = jax.eval_shape(lambda ls, s, inputs: update(ls, s, **inputs), losses, init_state, p.inputs)
    assert signature(state) == before, (dtype, signature(state), before)
    w = w.weights if isinstance(w, W.Direction) else w
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(w)) and len(w.shape) == 1:
      assert w.dtype == dtype and w.shape == p.losses.shape, (dtype, w)


def assert_finite_along(update: Callable, init_state, probs: Sequence[Problem], jacobian=None, err_msg="") -> list:
  """Along ``probs``: weights of the right shape and dtype, finite, as are the direction ``Σₖ wₖ Jₖ`` (for the
  problem's Jacobian input, else ``jacobian`` when given) and the state, whose signature does not change. Returns
  the weights."""
  state, before, ws = init_state, signature(init_state), []
  for i, p in enumerate(probs):
    w, state = update(p.losses, state, **p.inputs)
    ws.append(w)
    msg = f"{err_msg}, call {i}"
    assert_weights_shaped(w, p, msg)
    assert_finite(w, msg)
    jac = p.inputs.get("jacobian", jacobian)
    if jac is not None:
      assert_finite(direction(w, jac), msg)
    assert_finite(state, msg)
    assert signature(state) == before, msg
  return ws


def assert_no_conflict(jacobian, weights, *, rtol: float = 1e-4, err_msg="") -> None:
  """The direction ``d = Jᵀw`` does not conflict with any task: ``J d ≥ 0``, up to ``rtol`` of its scale (the
  solvers' ridge and the float32 rounding of the Gramian)."""
  jac = np.asarray(jacobian, np.float64)
  w = np.asarray(weights, np.float64)
  d = direction(w, jac)
  norms = np.linalg.norm(jac, axis=1)
  assert np.all(np.isfinite(w)) and np.all(np.isfinite(d)), (err_msg, w)
  assert np.all(jac @ d >= -rtol * norms * np.linalg.norm(jac) * np.abs(w).sum()), (err_msg, jac @ d, w)


def assert_permutation_equivariant(
  update: Callable,
  init_state,
  probs: Sequence[Problem],
  perm,
  *,
  invariant: bool = False,
  rtol: float = 1e-5,
  atol: float = 1e-6,
) -> None:
  """Permuting the tasks of every problem permutes the weights and the per-task state the same way.

  With ``invariant``, the weights do not depend on the task order at all (e.g. a random draw from the key only);
  then the state is not compared. Keys are kept, so a stochastic transform is compared under a fixed key.
  """
  ws, state = run(update, init_state, probs)
  ws_perm, state_perm = run(update, init_state, [permute_problem(p, perm) for p in probs])
  for i, (w, w_perm) in enumerate(zip(ws, ws_perm)):
    take = lambda x: np.asarray(x)[np.asarray(perm)]
    if invariant:
      expected = w
    elif isinstance(w, W.Direction):  # the direction is the tasks' sum: it does not move
      expected = W.Direction(w.shared, take(w.weights))
    else:
      expected = jax.tree.map(take, w)
    assert_trees_allclose(w_perm, expected, rtol=rtol, atol=atol, err_msg=f"weights of call {i}")
  if not invariant:
    assert_trees_allclose(state_perm, permute_tasks(state, perm), rtol=rtol, atol=atol, err_msg="state")


def assert_chains(
  base: W.WeightingTransform,
  base_update: Callable,
  probs: Sequence[Problem],
  scale,
  user: Callable | None = None,
  *,
  rtol: float = 1e-5,
  atol: float = 1e-6,
) -> None:
  """``chain(static(scale), base, stateless(user))`` under jit equals the hand-rescaled problem.

  ``base`` sees the losses, Gramian and Jacobian rescaled by ``scale`` and the second part of the split key;
  ``user(losses)`` (a user's stateless weighting; ``None`` for a transform that goes last) sees the losses rescaled
  by ``scale ⊙ w_base``. The chained weights are the product; the chain is traced once, its state keeps its
  signature, and its ``base`` part equals ``base``'s own state. ``base_update`` runs ``base`` alone (e.g. jitted).
  """
  parts = [W.static(np.asarray(scale, np.float64)), base]
  if user is not None:
    parts.append(W.stateless(lambda losses, **_: user(losses)))
  chained = W.chain(*parts)
  assert chained.needs == base.needs and chained.select is base.select
  jitted, traces = counting_jit(chained.update)
  k = probs[0].losses.shape[0]
  state, base_state = init(chained, k), init(base, k)
  before = signature(state)
  for i, p in enumerate(probs):
    w, state = jitted(p.losses, state, **p.inputs)
    key = jax.random.split(p.inputs["key"], len(parts))[1] if "key" in p.inputs else None
    rescaled = rescale_problem(p, scale, key)
    w_base, base_state = base_update(rescaled.losses, base_state, **rescaled.inputs)
    if isinstance(w_base, W.Direction):
      expected = W.Direction(w_base.shared, np.asarray(scale) * w_base.weights)
    elif user is None:
      expected = scale_rows(scale, w_base) if not W.is_task_vector(w_base) else np.asarray(scale) * w_base
    else:
      v = np.asarray(scale, p.losses.dtype) * np.asarray(w_base)
      expected = v * np.asarray(user(jnp.asarray(v * np.asarray(p.losses))))
    assert_trees_allclose(w, expected, rtol=rtol, atol=atol, err_msg=f"call {i}")
    assert signature(state) == before
  assert_trees_allclose(state.inner[1], base_state, rtol=rtol, atol=atol, err_msg="state of the chained transform")
  assert len(traces) == 1, traces


def replicate(tree, n: int):
  """Every leaf of ``tree`` stacked ``n`` times on a new leading axis (numpy, or ``jnp.stack`` for PRNG keys)."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: jnp.stack([x] * n) if is_key(x) else np.stack([np.asarray(x)] * n), tree)


class PmapCase(NamedTuple):
  transform: W.WeightingTransform
  single: Callable  # the update on one device, e.g. jitted
  init_state: Any
  problem: Problem
  tolerance: dict  # rtol and atol


def assert_pmap_equals_single_device(cases: dict[str, PmapCase]) -> None:
  """Every case's ``update`` under ``jax.pmap`` over every local device, with its problem replicated on each, gives
  on every device the weights and state of its ``single``-device update.

  All the cases run in one pmapped function, so the whole check compiles one program (its parts are the updates,
  side by side); the results are compared case by case.
  """
  n = jax.local_device_count()
  args = {name: replicate((c.problem.losses, c.init_state, c.problem.inputs), n) for name, c in cases.items()}
  run_all = lambda args: {name: cases[name].transform.update(ls, s, **inputs) for name, (ls, s, inputs) in args.items()}
  replicated = jax.pmap(run_all)(args)
  for name, c in cases.items():
    w, state = c.single(c.problem.losses, c.init_state, **c.problem.inputs)
    w_all, state_all = replicated[name]
    for d in range(n):
      take = lambda tree, d=d: jax.tree.map(lambda x: np.asarray(x)[d], tree)
      assert_trees_allclose(take(w_all), w, err_msg=f"{name}: weights on device {d}", **c.tolerance)
      assert_trees_allclose(take(state_all), state, err_msg=f"{name}: state on device {d}", **c.tolerance)
