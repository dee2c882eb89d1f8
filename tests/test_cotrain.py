"""Co-training (jmtl.cotrain) against hand-written references: ensembles, distillation, mutual learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import cotrain
from tests._helpers import normal

TASKS = [
  jmtl.Task("c", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}),
  jmtl.Task("r", jmtl.losses.mse, {"mae": jmtl.metrics.mae()}),
]
MODEL = jmtl.models.mlp({"c": 3, "r": 1}, hidden=(6,))


def _batch(seed, b=8):
  rng = np.random.default_rng(seed)
  return {
    "inputs": normal((b, 4), seed),
    "labels": {"c": rng.integers(0, 3, b).astype(np.int32), "r": rng.standard_normal((b, 1)).astype(np.float32)},
  }


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize(
  "weighting,member_batches",
  [(jmtl.weighting.equal(), False), (jmtl.weighting.upgrad(), True)],
  ids=["equal", "upgrad"],
)
def test_member_equals_model_trained_alone(weighting, member_batches):
  seeds = [3, 7, 11]
  x = _batch(0)["inputs"]
  tx = optax.adam(0.05)
  train_step = jmtl.make_train_step(MODEL, TASKS)
  ens = cotrain.ensemble_state(MODEL, x, seeds=seeds, tx=tx, weighting=weighting)
  step = jax.jit(cotrain.make_ensemble_step(train_step, member_batches=member_batches))
  batches = [[_batch(10 * s + i) for i in range(len(seeds))] for s in range(3)]
  for per_member in batches:
    batch = cotrain.stack_members(per_member) if member_batches else per_member[0]
    ens, metrics = step(ens, batch)
  alone_step = jax.jit(train_step)
  for i, seed in enumerate(seeds):
    state = jmtl.TrainState.from_model(MODEL, x, tx=tx, weighting=weighting, rng=jax.random.key(seed))
    for per_member in batches:
      state, last = alone_step(state, per_member[i] if member_batches else per_member[0])
    _close(cotrain.member(ens.params, i), state.params)
    _close(cotrain.member(ens.weighting_state, i), state.weighting_state)
    _close(cotrain.member(metrics, i)["loss/c"], last["loss/c"])
  if not member_batches:  # the members one after the other (unrolled) in the same program: the same states
    unrolled = cotrain.ensemble_state(MODEL, x, seeds=seeds, tx=tx, weighting=weighting)
    unrolled_step = jax.jit(cotrain.make_ensemble_step(train_step, loop="unroll"))
    for per_member in batches:
      unrolled, _ = unrolled_step(unrolled, per_member[0])
    _close(unrolled.params, ens.params)
  # The members really differ (different seeds), so the comparison above is not of equal copies.
  assert not np.allclose(ens.params["shared"]["dense_0"]["kernel"][0], ens.params["shared"]["dense_0"]["kernel"][1])


def test_ensemble_under_pmap_and_mesh_equals_one_device():
  """The members' step under ``jax.pmap`` (2 devices, half the batch each) and ``mesh_jit`` (a 2-device mesh) gives
  the one-device step's states (the mesh program is global: its step has no axis name). Mutual learning: the vmapped
  ensemble step inside, and the members' predictions on each device's examples as targets."""
  x, batch, tx = _batch(0)["inputs"], _batch(1), optax.adam(0.05)
  weighting = jmtl.weighting.mgda()  # a Gramian: the task gradients are all-reduced before the weights

  build = lambda axis_name: cotrain.make_mutual_step(MODEL, TASKS, beta=0.5, axis_name=axis_name)

  init = lambda: cotrain.ensemble_state(MODEL, x, seeds=[1, 2], tx=tx, weighting=weighting)
  one, _ = jax.jit(build(None))(init(), batch)
  pmapped = jmtl.parallel.pmap(build("data"), devices=jax.local_devices()[:2], donate=False)
  two, _ = pmapped(jmtl.parallel.replicate(init(), jax.local_devices()[:2]), jmtl.parallel.shard_batch(batch, 2))
  _close(jmtl.parallel.unreplicate(two.params), one.params, rtol=1e-4, atol=1e-5)
  mesh = jmtl.parallel.make_mesh(2)
  state = jmtl.parallel.put_replicated(init(), mesh)
  meshed, _ = jmtl.parallel.mesh_jit(build(None), mesh, donate=False)(state, jmtl.parallel.put_batch(batch, mesh))
  _close(meshed.params, one.params, rtol=1e-4, atol=1e-5)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_ensemble_metrics_over_batches_equal_hand_computed():
  x0 = _batch(0)["inputs"]
  ens = cotrain.ensemble_state(MODEL, x0, seeds=[0, 1, 2], tx=optax.sgd(0.1))
  params = jax.tree.map(lambda a: a * 3.0, ens.params)  # larger weights: members disagree more
  batches = [_batch(s, b) for s, b in ((1, 5), (2, 7), (3, 4))]
  for vote in (False, True):
    ev = jax.jit(cotrain.make_ensemble_eval_step(MODEL, TASKS, vote=vote))
    out = cotrain.evaluate_ensemble(ev, params, batches, TASKS)
    # by hand, over every example of the three batches at once
    x = np.concatenate([b["inputs"] for b in batches])
    yc = np.concatenate([b["labels"]["c"] for b in batches])
    yr = np.concatenate([b["labels"]["r"] for b in batches])
    logits, reg = [], []
    apply = jax.jit(lambda p, inputs: MODEL.apply(p, inputs, {})[0])
    for i in range(3):
      preds = apply(cotrain.member(params, i), jnp.asarray(x))
      logits.append(np.asarray(preds["c"], np.float64))
      reg.append(np.asarray(preds["r"], np.float64))
    probs = np.mean([_softmax(z) for z in logits], axis=0)
    if vote:
      votes = np.mean([np.eye(3)[z.argmax(-1)] for z in logits], axis=0)
      probs = (3 * votes + probs) / 4
      majority = np.array([np.bincount([z[n].argmax() for z in logits], minlength=3) for n in range(len(x))])
      assert ((probs.argmax(-1) == majority.argmax(-1)) | (majority.max(-1) == 1)).all()
    mean_reg = np.mean(reg, axis=0)
    np.testing.assert_allclose(out["ensemble"]["c/acc"], np.mean(probs.argmax(-1) == yc), rtol=1e-6)
    np.testing.assert_allclose(out["ensemble"]["c/loss"], -np.mean(np.log(probs[np.arange(len(x)), yc])), rtol=1e-5)
    np.testing.assert_allclose(out["ensemble"]["r/mae"], np.mean(np.abs(mean_reg - yr)), rtol=1e-5)
    np.testing.assert_allclose(out["ensemble"]["r/loss"], np.mean((mean_reg - yr) ** 2), rtol=1e-5)
    for i in range(3):
      np.testing.assert_allclose(out["members"][i]["c/acc"], np.mean(logits[i].argmax(-1) == yc), rtol=1e-6)
      np.testing.assert_allclose(out["members"][i]["r/mae"], np.mean(np.abs(reg[i] - yr)), rtol=1e-5)
    np.testing.assert_allclose(
      out["member_mean"]["c/acc"], np.mean([np.mean(z.argmax(-1) == yc) for z in logits]), rtol=1e-6
    )


def _kl_by_hand(s, t, temperature):
  q, p = _softmax(t / temperature), _softmax(s / temperature)
  return temperature**2 * np.sum(q * (np.log(q) - np.log(p)), axis=-1)


def test_distillation_loss_is_tempered_kl_times_t_squared():
  s, t = normal((6, 5), 1).astype(np.float64) * 3, normal((6, 5), 2).astype(np.float64) * 3
  for temperature in (1.0, 2.5):
    got = cotrain.distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature=temperature)
    np.testing.assert_allclose(got, _kl_by_hand(s, t, temperature), rtol=1e-4, atol=1e-6)
  sig = lambda z: 1 / (1 + np.exp(-z))
  q, p = sig(t / 2.0), sig(s / 2.0)
  binary = 4.0 * np.mean(q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p)), axis=-1)
  got = cotrain.distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), kind="sigmoid",
                                  temperature=2.0)  # fmt: skip
  np.testing.assert_allclose(got, binary, rtol=1e-4, atol=1e-6)
  got = cotrain.distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), kind="mean")
  np.testing.assert_allclose(got, np.mean((s - t) ** 2, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match=r"student predictions \(6, 5\) and teacher predictions \(6, 4\)"):
    cotrain.distillation_loss(s, t[:, :4])
  # The gradient does not reach the teacher.
  g = jax.grad(lambda tt: cotrain.distillation_loss(jnp.asarray(s, jnp.float32), tt, temperature=2.0).sum())(
    jnp.asarray(t, jnp.float32)
  )
  assert not np.any(np.asarray(g))


def test_distill_step_equals_hand_written_objective_and_leaves_the_teacher():
  x = _batch(0)["inputs"]
  batch = _batch(5)
  lam, temperature, lr = 0.3, 2.0, 0.1
  teacher_params = MODEL.init(jax.random.key(9), x)
  state = cotrain.DistillState.from_model(MODEL, x, tx=optax.sgd(lr), rng=jax.random.key(0))
  state = state.replace(teacher=teacher_params)
  step = jax.jit(
    cotrain.make_distill_step(MODEL, TASKS, cotrain.model_teacher(MODEL), weight=lam, temperature=temperature)
  )
  new, metrics = step(state, batch)

  def objective(params):  # Σₖ (1 − λ) Lₖ + λ Dₖ, written out
    s, _ = MODEL.apply(params, batch["inputs"], {})
    t, _ = MODEL.apply(teacher_params, batch["inputs"], {})
    t = jax.tree.map(jax.lax.stop_gradient, t)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(s["c"]), batch["labels"]["c"][:, None], 1)[:, 0]
    logq, logp = jax.nn.log_softmax(t["c"] / temperature), jax.nn.log_softmax(s["c"] / temperature)
    kl = temperature**2 * jnp.sum(jnp.exp(logq) * (logq - logp), -1)
    mse = jnp.mean((s["r"] - batch["labels"]["r"]) ** 2, -1)
    mse_teacher = jnp.mean((s["r"] - t["r"]) ** 2, -1)
    return jnp.mean((1 - lam) * ce + lam * kl) + jnp.mean((1 - lam) * mse + lam * mse_teacher)

  grads = jax.jit(jax.grad(objective))(state.params)
  _close(new.params, jax.tree.map(lambda p, g: p - lr * g, state.params, grads), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], objective(state.params), rtol=1e-5)
  _close(new.teacher, teacher_params, rtol=0, atol=0)  # the teacher is frozen
  with pytest.raises(TypeError, match="DistillState"):
    step(jmtl.TrainState.from_model(MODEL, x, tx=optax.sgd(lr), rng=jax.random.key(0)), batch)


def test_teacher_annealing_schedule_and_its_use_in_the_step():
  schedule = cotrain.teacher_annealing(0.8, 40)
  np.testing.assert_allclose([schedule(s) for s in (0, 10, 20, 40, 80)], [0.8, 0.6, 0.4, 0.0, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
    cotrain.teacher_annealing(1.5, 40)
  x, batch = _batch(0)["inputs"], _batch(6)
  tasks = TASKS[:1]
  model = jmtl.models.mlp({"c": 3}, hidden=(6,))
  teacher_params = model.init(jax.random.key(9), x)
  state = cotrain.DistillState.from_model(model, x, tx=optax.sgd(0.0), rng=jax.random.key(0))
  state = state.replace(teacher=teacher_params)
  step = jax.jit(
    cotrain.make_distill_step(model, tasks, cotrain.model_teacher(model), weight=cotrain.teacher_annealing(1.0, 40))
  )
  s, _ = model.apply(state.params, batch["inputs"], {})
  t, _ = model.apply(teacher_params, batch["inputs"], {})
  ce = float(jnp.mean(jmtl.losses.softmax_cross_entropy(s["c"], batch["labels"]["c"])))
  kl = float(jnp.mean(cotrain.distillation_loss(s["c"], t["c"])))
  for at, lam in ((0, 1.0), (10, 0.75), (40, 0.0)):
    _, m = step(state.replace(step=jnp.asarray(at, jnp.int32)), batch)
    np.testing.assert_allclose(m["loss/c"], (1 - lam) * ce + lam * kl, rtol=1e-5)


def test_mutual_learning_targets_are_stop_gradient():
  seeds, beta, lr, temperature = [0, 1, 2], 0.7, 0.1, 1.5
  x, batch = _batch(0)["inputs"], _batch(4)
  ens = cotrain.ensemble_state(MODEL, x, seeds=seeds, tx=optax.sgd(lr))
  new, metrics = jax.jit(cotrain.make_mutual_step(MODEL, TASKS, beta=beta, temperature=temperature))(ens, batch)
  unrolled = cotrain.make_mutual_step(MODEL, TASKS, beta=beta, temperature=temperature, loop="unroll")
  _close(jax.jit(unrolled)(ens, batch)[0].params, new.params)  # the members one after the other: the same step

  def member_loss(params_i, params_all, i, detach):
    """Member i's objective: Σₖ Lᵢₖ + β mean_{j≠i} Dₖ(p_j ‖ p_i); the peers' predictions detached or not."""
    s, _ = MODEL.apply(params_i, batch["inputs"], {})
    total = jnp.mean(jmtl.losses.softmax_cross_entropy(s["c"], batch["labels"]["c"]))
    total += jnp.mean(jmtl.losses.mse(s["r"], batch["labels"]["r"]))
    for j in range(len(seeds)):
      if j == i:
        continue
      t, _ = MODEL.apply(cotrain.member(params_all, j), batch["inputs"], {})
      if detach:
        t = jax.tree.map(jax.lax.stop_gradient, t)
      logq, logp = jax.nn.log_softmax(t["c"] / temperature), jax.nn.log_softmax(s["c"] / temperature)
      kl = temperature**2 * jnp.sum(jnp.exp(logq) * (logq - logp), -1)
      total += beta / (len(seeds) - 1) * (jnp.mean(kl) + jnp.mean((s["r"] - t["r"]) ** 2))
    return total

  grad = jax.jit(jax.grad(member_loss), static_argnums=(2, 3))  # one program per member, not op by op
  for i in range(len(seeds)):
    p_i = cotrain.member(ens.params, i)
    grads = grad(p_i, ens.params, i, True)
    _close(cotrain.member(new.params, i), jax.tree.map(lambda p, g: p - lr * g, p_i, grads), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"][i], member_loss(p_i, ens.params, i, True), rtol=1e-5)
  # Without stop_gradient, the joint objective Σᵢ would also move member 0 through the others' KL terms.
  joint = jax.jit(jax.grad(lambda p: sum(member_loss(cotrain.member(p, i), p, i, False) for i in range(len(seeds)))))(
    ens.params
  )
  coupled = jax.tree.map(lambda p, g: p - lr * g, cotrain.member(ens.params, 0), cotrain.member(joint, 0))
  assert not np.allclose(
    coupled["shared"]["dense_0"]["kernel"], new.params["shared"]["dense_0"]["kernel"][0], atol=1e-6
  )
  with pytest.raises(ValueError, match="at least 2 members, the state has 1"):
    cotrain.make_mutual_step(MODEL, TASKS, beta=beta)(
      cotrain.ensemble_state(MODEL, x, seeds=[0], tx=optax.sgd(lr)), batch
    )


def test_bad_input_names_the_task_and_field():
  with pytest.raises(ValueError, match=r"task 'c' has kind 'probs'"):
    cotrain.ensemble_predictions(TASKS, {"c": jnp.zeros((2, 1, 3)), "r": jnp.zeros((2, 1, 1))}, kinds={"c": "probs"})
  with pytest.raises(ValueError, match=r"no member predictions for task\(s\) \['r'\]"):
    cotrain.ensemble_predictions(TASKS, {"c": jnp.zeros((2, 1, 3))})
  with pytest.raises(ValueError, match="seeds is empty"):
    cotrain.ensemble_state(MODEL, jnp.ones((1, 4)), seeds=[], tx=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"weight must be in \[0, 1\], got 2"):
    cotrain.make_distill_step(MODEL, TASKS, cotrain.model_teacher(MODEL), weight=2)
