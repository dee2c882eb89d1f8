"""Methods beyond "weights of this step's gradients": tracked gradients (MoCo, DB-MTL), double sampling (MoDo,
SDMGrad) and RGW's own-heads rule; and the engine parts they use (``Direction``, ``cross_gramian``,
``gradient_shapes``, a transform's ``heads``).

Each method is checked against its paper's update written here in float64 numpy, independently of jmtl's code: the
simplex projection by enumerating supports, the recursions step by step. The engine parts are checked against
gradients taken by hand with ``jax.grad``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import grads
from jmtl import weighting as W
from tests._asserts import degenerate_jacobians
from tests._asserts import random_jacobians


def project_simplex_brute(v):
  """argmin ‖w − v‖² over the simplex, by trying every support: on support S, w_S = v_S − (Σ v_S − 1)/|S|."""
  v = np.asarray(v, np.float64)
  best, best_d = None, np.inf
  for r in range(1, len(v) + 1):
    for s in itertools.combinations(range(len(v)), r):
      w = np.zeros_like(v)
      w[list(s)] = v[list(s)] - (v[list(s)].sum() - 1) / r
      if np.all(w >= -1e-12) and np.sum((w - v) ** 2) < best_d:
        best, best_d = np.maximum(w, 0), np.sum((w - v) ** 2)
  return best


def test_simplex_projection_matches_brute_force():
  from jmtl.weighting._solvers import project_simplex

  rng = np.random.default_rng(0)
  for v in [*rng.normal(size=(20, 4)) * 3, np.array([1e13, 0.5, -6e13, 2.0]), np.zeros(4), np.full(4, 7.0)]:
    with jax.enable_x64(True):
      got = np.asarray(project_simplex(jnp.asarray(v, jnp.float64)))
    np.testing.assert_allclose(got, project_simplex_brute(v), atol=1e-9, err_msg=str(v))


def sequences(k, n=4, seed=0):
  """n steps of (losses, Jacobian (k, 6)) float64."""
  losses = np.random.default_rng(seed).uniform(0.2, 2.0, (n, k))
  return losses, random_jacobians(n, k, seed=seed, dtype=np.float64)


def cases(k=3):
  """Random, and the degenerate inputs the issue names: a zero gradient, identical tasks, opposite tasks, K = 1."""
  d = degenerate_jacobians(3)
  out = {"random": sequences(k)}
  for name in ("zero row", "duplicated", "opposite"):
    out[name] = (sequences(k)[0], np.stack([d[name]] * 4))
  out["K=1"] = sequences(1)
  return out


def run_jmtl(t, losses, jacs, **extra):
  k = losses.shape[1]
  state = W.init_state(t, k, np.zeros(jacs.shape[2], np.float32))
  update = jax.jit(t.update)
  outs = []
  for ls, j in zip(losses, jacs):
    j32 = j.astype(np.float32)
    out, state = update(jnp.asarray(ls, jnp.float32), state, jacobian=j32, gramian=j32 @ j32.T, **extra)
    outs.append(out)
  return outs, state


# ---------------------------------------------------------------------------------------------------------------------
# MoCo.


def moco_reference(losses, jacs, *, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, normalize=True):
  """Fernando et al. 2023, Algorithm 1, with the authors' gradient normalisation."""
  k, p = jacs.shape[1:]
  y, lam, out = np.zeros((k, p)), np.full(k, 1 / k), []
  for t, (ls, j) in enumerate(zip(losses, jacs), start=1):
    h = j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-8) * ls[:, None] if normalize else j
    y = y - beta / t**beta_sigma * (y - h)
    lam = project_simplex_brute(lam - gamma / t**gamma_sigma * (y @ y.T + rho * np.eye(k)) @ lam)
    out.append((y.T @ lam, lam))
  return out


@pytest.mark.parametrize("normalize", [True, False])
def test_moco_follows_its_algorithm(normalize):
  for name, (losses, jacs) in cases().items():
    ref = moco_reference(losses, jacs, rho=0.1, normalize=normalize)
    got, state = run_jmtl(W.moco(rho=0.1, normalize=normalize), losses, jacs)
    for i, ((d, lam), out) in enumerate(zip(ref, got)):
      assert isinstance(out, W.Direction)
      np.testing.assert_allclose(out.weights, lam, rtol=1e-4, atol=1e-6, err_msg=f"{name}: λ at step {i}")
      np.testing.assert_allclose(out.shared, d, rtol=1e-4, atol=1e-5, err_msg=f"{name}: d at step {i}")
    assert int(state.count) == 4


# ---------------------------------------------------------------------------------------------------------------------
# DB-MTL.


def db_mtl_reference(losses, jacs, beta=0.9, beta_sigma=0.0, eps=1e-8):
  """Lin et al. 2023, Algorithm 1: EMA of ∇ log L, each scaled to the largest norm."""
  g_hat, out = np.zeros(jacs.shape[1:]), []
  for t, (ls, j) in enumerate(zip(losses, jacs), start=1):
    b = beta / t**beta_sigma
    g_hat = b * g_hat + (1 - b) * j / (ls[:, None] + eps)
    norms = np.linalg.norm(g_hat, axis=1)
    out.append(((norms.max() / (norms + eps)) @ g_hat, 1 / (ls + eps)))
  return out


def test_db_mtl_follows_its_algorithm():
  for name, (losses, jacs) in cases().items():
    for args in ({}, {"beta": 0.5, "beta_sigma": 0.5}):
      ref = db_mtl_reference(losses, jacs, **args)
      got, _ = run_jmtl(W.db_mtl(**args), losses, jacs)
      for i, ((d, w), out) in enumerate(zip(ref, got)):
        np.testing.assert_allclose(out.weights, w, rtol=1e-5, err_msg=f"{name} {args}: weights at step {i}")
        np.testing.assert_allclose(out.shared, d, rtol=1e-4, atol=1e-5, err_msg=f"{name} {args}: d at step {i}")


def test_db_mtl_balances_gradient_magnitudes():
  """After loss-scale balancing, every task's tracked gradient enters the direction with the largest norm."""
  losses, jacs = sequences(3, n=1)
  jacs[0, 1] *= 100.0
  (out,), state = run_jmtl(W.db_mtl(beta=0.0), losses, jacs)
  tracked = np.asarray(state.tracked)
  norms = np.linalg.norm(tracked, axis=1)
  np.testing.assert_allclose(norms, np.linalg.norm(jacs[0] / losses[0][:, None], axis=1), rtol=1e-5)
  np.testing.assert_allclose(out.shared, (norms.max() / norms) @ tracked, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# MoDo and SDMGrad on a cross-Gramian.


def cross_sequences(k, n=4, seed=1):
  a = random_jacobians(n, k, seed=seed, dtype=np.float64)
  b = a + 0.3 * random_jacobians(n, k, seed=seed + 1, dtype=np.float64)
  return [x @ y.T for x, y in zip(a, b)]


def modo_reference(crosses, gamma, rho):
  lam, out = np.full(crosses[0].shape[0], 1 / crosses[0].shape[0]), []
  for c in crosses:
    lam = project_simplex_brute(lam - gamma * (c @ lam + rho * lam))
    out.append(lam)
  return out


def sdmgrad_reference(crosses, lam=0.3, n_iter=20, lr=5.0, momentum=0.5):
  """Xiao et al. 2023 with the authors' scaling and heavy-ball solver; weights (w + λ/K)/(1 + λ)."""
  k = crosses[0].shape[0]
  w, out = np.full(k, 1 / k), []
  for cross in crosses:
    c = cross / (np.mean(np.sqrt(np.maximum(np.diag(cross), 0))) ** 2 + 1e-8)
    m = np.zeros(k)
    for _ in range(n_iter):
      m = momentum * m + c @ w + lam * c @ np.full(k, 1 / k)
      w = project_simplex_brute(w - lr * m)
    out.append((w + lam / k) / (1 + lam))
  return out


def run_cross(t, crosses):
  k = crosses[0].shape[0]
  state, update, out = t.init(k), jax.jit(t.update), []
  for c in crosses:
    w, state = update(jnp.ones(k), state, cross_gramian=jnp.asarray(c, jnp.float32))
    out.append(np.asarray(w))
  return out


@pytest.mark.parametrize("k", [1, 3])
def test_modo_follows_its_algorithm(k):
  crosses = cross_sequences(k)
  for gamma, rho in ((1e-3, 0.1), (0.2, 0.0)):
    for i, (w, ref) in enumerate(zip(run_cross(W.modo(gamma, rho), crosses), modo_reference(crosses, gamma, rho))):
      np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7, err_msg=f"γ={gamma}, ρ={rho}, step {i}")


@pytest.mark.parametrize("k", [1, 3])
def test_sdmgrad_follows_its_algorithm(k):
  crosses = cross_sequences(k)
  for args in ({}, {"lam": 0.0, "n_iter": 5}):
    for i, (w, ref) in enumerate(zip(run_cross(W.sdmgrad(**args), crosses), sdmgrad_reference(crosses, **args))):
      np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6, err_msg=f"{args}, step {i}")
      assert abs(w.sum() - 1) < 1e-5


def test_double_sampling_on_degenerate_gradients():
  """Zero, identical and opposite task gradients: finite weights on the simplex; identical tasks share equally."""
  for name, jac in degenerate_jacobians(3).items():
    if name not in ("zero row", "duplicated", "opposite", "all zero"):
      continue
    crosses = [jac @ jac.T] * 3
    for t in (W.modo(gamma=0.1), W.sdmgrad()):
      w = run_cross(t, crosses)[-1]
      assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-5, (name, t, w)
      if name == "duplicated":
        np.testing.assert_allclose(w[0], w[1], rtol=1e-5, err_msg=repr(t))


# ---------------------------------------------------------------------------------------------------------------------
# Through the train step: the engine's cross-Gramian, Direction and own-heads rule against gradients taken by hand.

TASKS = (jmtl.Task("a", jmtl.losses.mse), jmtl.Task("b", jmtl.losses.mse))


def apply(p, x):
  z = jnp.tanh(x @ p["shared"]["w"])
  return {n: z @ p["tasks"][n] for n in ("a", "b")}


def setup(seed=0, n=8):
  r = np.random.default_rng(seed)
  params = {
    "shared": {"w": jnp.asarray(r.normal(size=(3, 4)), jnp.float32)},
    "tasks": {n: jnp.asarray(r.normal(size=(4,)), jnp.float32) for n in ("a", "b")},
  }
  masks = {"a": jnp.asarray([1, 1, 0, 1, 1, 1, 1, 1], jnp.float32)[:n], "b": jnp.ones(n)}
  batch = {
    "inputs": jnp.asarray(r.normal(size=(n, 3)), jnp.float32),
    "labels": {n_: jnp.asarray(r.normal(size=(n,)), jnp.float32) for n_ in ("a", "b")},
    "masks": masks,
  }
  return params, batch


def task_loss(params, batch, name, rows=slice(None)):
  pred = apply(params, batch["inputs"][rows])[name]
  m = batch["masks"][name][rows]
  return jnp.sum(m * (pred - batch["labels"][name][rows]) ** 2) / jnp.maximum(jnp.sum(m), 1)


def sgd_delta(weighting, params, batch, **options):
  """The parameter change of one SGD step (rate 1) with ``weighting``, and its metrics."""
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(1.0), weighting=weighting, num_tasks=2, rng=jax.random.key(0)
  )
  new, m = jax.jit(jmtl.make_train_step(apply, TASKS, **options))(state, batch)
  return jax.tree.map(lambda new_, old: np.asarray(new_ - old, np.float64), new.params, params), m


def test_cross_gramian_is_that_of_the_two_halves_and_the_direction_that_of_the_whole_batch():
  """A transform that requires the cross-Gramian sees J_a J_bᵀ of the two halves (masks counted per half), and its
  weights apply to the whole batch's gradients, as for any other transform."""
  params, batch = setup()
  seen = {}

  def weight_fn(losses, *, cross_gramian, **_):
    seen["cross"] = cross_gramian
    return jnp.array([0.3, 1.7], losses.dtype)

  t = W.stateless(weight_fn, needs="gramian")._replace(requires=("cross_gramian",))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    b64 = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, batch)
    ctx = grads.Context(jmtl.models.as_model(apply), TASKS, p64, b64, t, t.init(2))
    out = grads.compute(ctx)
    halves = [
      np.stack([np.ravel(jax.grad(task_loss)(p64, b64, n, h)["shared"]["w"]) for n in ("a", "b")])
      for h in (slice(0, 4), slice(4, 8))
    ]
    np.testing.assert_allclose(seen["cross"], halves[0] @ halves[1].T, rtol=1e-10)
    whole = {n: jax.grad(task_loss)(p64, b64, n) for n in ("a", "b")}
    want = 0.3 * whole["a"]["shared"]["w"] + 1.7 * whole["b"]["shared"]["w"]
    np.testing.assert_allclose(out.grads["shared"]["w"], want, rtol=1e-10)
    np.testing.assert_allclose(out.grads["tasks"]["a"], 0.3 * whole["a"]["tasks"]["a"], rtol=1e-10)
    np.testing.assert_allclose(out.losses, [task_loss(p64, b64, n) for n in ("a", "b")], rtol=1e-12)
  assert grads.route(ctx).name == "general" and "half" in grads.route(ctx).detail


def test_cross_gramian_needs_two_examples():
  params, batch = setup(n=1)
  with pytest.raises(ValueError, match="at least 2 examples, got 1"):
    sgd_delta(W.modo(), params, batch)


def test_moco_in_the_train_step_moves_along_its_tracked_direction():
  """One step: the shared parameters move by −d (d from the per-task gradients by hand, MoCo's first update), the
  task parameters by −λₖ ∇ψₖ Lₖ (weighted heads) or −∇ψₖ Lₖ (own heads); the metrics report λ."""
  params, batch = setup()
  jac = np.stack([np.ravel(jax.grad(task_loss)(params, batch, n)["shared"]["w"]) for n in ("a", "b")]).astype(
    np.float64
  )
  losses = np.array([task_loss(params, batch, n) for n in ("a", "b")], np.float64)
  (d, lam), *_ = moco_reference(losses[None], jac[None])
  head = {n: np.asarray(jax.grad(task_loss)(params, batch, n)["tasks"][n]) for n in ("a", "b")}
  for heads, scale in (("weighted", lam), ("own", np.ones(2))):
    delta, m = sgd_delta(W.moco(), params, batch, heads=heads)
    np.testing.assert_allclose(-delta["shared"]["w"].ravel(), d, rtol=1e-4, atol=1e-6)
    for i, n in enumerate(("a", "b")):
      np.testing.assert_allclose(-delta["tasks"][n], scale[i] * head[n], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m.per_task["weight"], lam, rtol=1e-5)


def test_db_mtl_heads_follow_their_log_loss():
  params, batch = setup()
  delta, _ = sgd_delta(W.db_mtl(), params, batch)
  for n in ("a", "b"):
    log_grad = jax.grad(lambda p, n=n: jnp.log(task_loss(p, batch, n) + 1e-8))(params)["tasks"][n]
    np.testing.assert_allclose(-delta["tasks"][n], log_grad, rtol=1e-4, atol=1e-7)


def test_rgw_weights_the_shared_gradient_and_leaves_the_heads_unweighted():
  """RGW (Algorithm 2): θ moves along Σ wₖ ∇θ Lₖ with RLW's weights from the same key; ψₖ along ∇ψₖ Lₖ. RLW scales
  ψₖ's gradient by wₖ too."""
  params, batch = setup()
  g = {n: jax.grad(task_loss)(params, batch, n) for n in ("a", "b")}
  for t, own in ((W.rgw(), True), (W.rlw(), False)):
    delta, m = sgd_delta(t, params, batch)
    w = np.asarray(m.per_task["weight"])
    np.testing.assert_allclose(
      -delta["shared"]["w"], w[0] * g["a"]["shared"]["w"] + w[1] * g["b"]["shared"]["w"], rtol=1e-5
    )
    for i, n in enumerate(("a", "b")):
      np.testing.assert_allclose(-delta["tasks"][n], (1.0 if own else w[i]) * g[n]["tasks"][n], rtol=1e-5, atol=1e-8)
  rlw_w = sgd_delta(W.rlw(), params, batch)[1].per_task["weight"]
  np.testing.assert_array_equal(sgd_delta(W.rgw(), params, batch)[1].per_task["weight"], rlw_w)


# ---------------------------------------------------------------------------------------------------------------------
# The protocol around them.


def test_tracked_methods_need_the_gradient_shapes():
  with pytest.raises(ValueError, match="shapes"):
    W.moco().init(3)
  state = W.init_state(W.moco(), 3, {"w": jnp.zeros((2, 5)), "b": jnp.zeros(5)})
  assert state.tracked["w"].shape == (3, 2, 5) and state.tracked["b"].shape == (3, 5)
  chained = W.chain(W.static([1.0, 2.0, 3.0]), W.db_mtl())
  assert chained.requires == ("gradient_shapes",) and W.init_state(chained, 3, jnp.zeros(4)).inner[1].tracked.shape == (
    3,
    4,
  )


def test_a_direction_goes_last_in_a_chain():
  t = W.chain(W.moco(), W.equal())
  state = W.init_state(t, 2, jnp.zeros(3))
  with pytest.raises(ValueError, match="last"):
    t.update(jnp.ones(2), state, jacobian=jnp.ones((2, 3)), gramian=2 * jnp.ones((2, 2)))


def test_chain_rejects_conflicting_head_rules():
  own = W.equal()._replace(heads="own")
  assert W.chain(W.equal(), own).heads == "own"
  with pytest.raises(ValueError, match="head rules"):
    W.chain(own, W.equal()._replace(heads="weighted"))


def test_aggregate_and_inject_hyperparams_carry_the_new_fields():
  J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  d = W.aggregate(W.moco(normalize=False), J)
  assert d.shape == (2,)
  injected = W.inject_hyperparams(W.moco)(gamma=optax.linear_schedule(0.1, 0.0, 10))
  assert injected.requires == ("gradient_shapes",) and injected.needs == "jacobian"
  assert W.inject_hyperparams(W.rgw)().heads == "own"
  assert W.inject_hyperparams(W.modo)().requires == ("cross_gramian",)


# ---------------------------------------------------------------------------------------------------------------------
# Auto-λ: the validation meta-gradient.


def test_meta_gradient_is_the_derivative_of_the_validation_loss_after_a_virtual_step():
  """∂/∂w Σ vₖ Lₖ^val(θ − α ∇Σ wⱼLⱼ(θ)) three ways: jmtl's, JAX on a hand-written lookahead, and the paper's
  first-order identity −α ∇θLₖ(θ) · ∇θ'L^val(θ') with its finite-difference estimate (ε = 0.01/‖∇θ'L^val‖)."""
  with jax.enable_x64(True):
    params, batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, setup())
    _, val = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, setup(seed=1))
    batch = {**batch, "validation": val}
    t = W.auto_lambda()
    ctx = grads.Context(jmtl.models.as_model(apply), TASKS, params, batch, t, t.init(2))
    w, lr, v = jnp.array([0.3, 1.4]), 0.05, jnp.array([1.0, 0.5])
    got = ctx.meta_gradient(w, lr, v)

    def val_after(w):
      g = jax.grad(lambda p: w[0] * task_loss(p, batch, "a") + w[1] * task_loss(p, batch, "b"))(params)
      ahead = jax.tree.map(lambda p, d: p - lr * d, params, g)
      return v[0] * task_loss(ahead, val, "a") + v[1] * task_loss(ahead, val, "b")

    np.testing.assert_allclose(got, jax.grad(val_after)(w), rtol=1e-10)
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
    g_train = [flat(jax.grad(task_loss)(params, batch, n)) for n in ("a", "b")]
    ahead = jax.tree.map(
      lambda p, d: p - lr * d,
      params,
      jax.grad(lambda p: jnp.vdot(w, jnp.stack([task_loss(p, batch, n) for n in ("a", "b")])))(params),
    )
    d_val = jax.grad(lambda p: v[0] * task_loss(p, val, "a") + v[1] * task_loss(p, val, "b"))(ahead)
    np.testing.assert_allclose(got, [-lr * jnp.vdot(g, flat(d_val)) for g in g_train], rtol=1e-10)
    eps = 0.01 / jnp.linalg.norm(flat(d_val))
    shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, d_val)
    fd = [-lr * (task_loss(shift(1), batch, n) - task_loss(shift(-1), batch, n)) / (2 * eps) for n in ("a", "b")]
    np.testing.assert_allclose(got, fd, rtol=1e-3)


def test_auto_lambda_takes_one_adam_step_on_the_meta_gradient_before_the_model_step():
  params, batch = setup()
  _, val = setup(seed=1)
  batch = {**batch, "validation": val}
  t = W.auto_lambda(learning_rate=0.01, lookahead_lr=0.1)
  state = jmtl.TrainState.create(params=params, tx=optax.sgd(0.1), weighting=t, num_tasks=2, rng=jax.random.key(0))
  ctx = grads.Context(jmtl.models.as_model(apply), TASKS, params, batch, t, state.weighting_state)
  g = np.asarray(ctx.meta_gradient(jnp.full(2, 0.1), 0.1))
  adam = optax.adam(0.01)
  want = optax.apply_updates(jnp.full(2, 0.1), adam.update(jnp.asarray(g), adam.init(jnp.full(2, 0.1)))[0])
  _, m = jax.jit(jmtl.make_train_step(apply, TASKS))(state, batch)
  np.testing.assert_allclose(m.per_task["weight"], want, rtol=1e-5)
  with pytest.raises(ValueError, match="validation"):
    jmtl.make_train_step(apply, TASKS)(state, {k: v for k, v in batch.items() if k != "validation"})
  with pytest.raises(ValueError, match="meta_gradient"):
    t.update(jnp.ones(2), t.init(2))
  with pytest.raises(ValueError, match="primary"):
    W.auto_lambda(primary=(0, 5)).init(2)
