"""Task relations in the train step: TAG's lookahead affinity and the gradient cosine against explicit computations,
and the compiled step of the steps without an affinity update."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import models
from jmtl import parallel
from jmtl import relations
from tests._helpers import fill_params
from tests._helpers import normal

NAMES = ("a", "b", "c")
LR = 0.3


def _setup(b=16, seed=0):
  model = models.mlp(dict.fromkeys(NAMES, 4), hidden=(8,))
  x = normal((b, 5), seed=seed + 1)
  rng = np.random.default_rng(seed)
  labels = {n: rng.integers(0, 4, b).astype(np.int32) for n in NAMES}
  masks = {n: (rng.random(b) < 0.7).astype(np.float32) for n in NAMES}
  batch = {"inputs": x, "labels": labels, "masks": masks}
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in NAMES]
  return model, tasks, fill_params(model, x, seed=seed), batch


def _task_loss(model, params, batch, j):
  """Task j's masked mean cross-entropy, written out."""
  preds, _ = model.apply(params, batch["inputs"], {}, train=True)
  logits, y, m = preds[NAMES[j]], batch["labels"][NAMES[j]], batch["masks"][NAMES[j]]
  logp = jax.nn.log_softmax(logits)
  per_example = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  return jnp.sum(per_example * m) / jnp.sum(m)


@jax.jit
def _explicit_jit(params, batch, lr):
  model = _setup()[0]
  k = len(NAMES)
  before = jnp.stack([_task_loss(model, params, batch, j) for j in range(k)])
  rows, flat = [], []
  for i in range(k):
    g = jax.grad(lambda s, i=i: _task_loss(model, {**params, "shared": s}, batch, i))(params["shared"])
    flat.append(jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)]))
    moved = jax.tree.map(lambda p, d: p - lr * d, params["shared"], g)
    rows.append(jnp.stack([_task_loss(model, {**params, "shared": moved}, batch, j) for j in range(k)]))
  return before, jnp.stack(rows), jnp.stack(flat)


def _explicit(model, params, batch, lr=LR):
  """Z[i, j] = 1 − L_j(θs − lr ∇θs L_i, θj) / L_j(θs, θj), one explicit SGD step per source; and the cosines."""
  del model  # _setup's, rebuilt inside the jitted reference
  before, after, flat = (np.asarray(a, np.float64) for a in _explicit_jit(params, batch, lr))
  k = len(NAMES)
  z = np.array([[1 - after[i, j] / before[j] for j in range(k)] for i in range(k)])
  cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in flat] for a in flat])
  return z, cos


def _ctx(model, tasks, params, batch):
  w = jmtl.weighting.equal()
  return jmtl.grads.Context(jmtl.models.as_model(model), tuple(tasks), params, batch, w, w.init(len(tasks)))


def test_lookahead_affinity_equals_the_explicit_sgd_lookahead_and_loss_ratio():
  model, tasks, params, batch = _setup()
  want_z, want_cos = _explicit(model, params, batch)
  measure = jax.jit(
    lambda p, sources, chunk: relations.lookahead_affinity(_ctx(model, tasks, p, batch), LR, sources, chunk_size=chunk),
    static_argnums=(1, 2),
  )
  la = measure(params, None, None)  # every source in one vmap
  np.testing.assert_allclose(la.affinity, want_z, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(la.cosine, want_cos, atol=2e-5)
  assert np.all(la.affinity_valid) and np.all(la.cosine_valid)
  assert np.abs(want_z - np.diag(np.diag(want_z))).max() > 1e-3  # the check is not about zeros
  sub = measure(params, (2, 0), 1)  # one source at a time
  np.testing.assert_allclose(sub.affinity, want_z[np.ix_([2, 0], [2, 0])], rtol=2e-4, atol=2e-6)


def _run(model, tasks, params, batches, weighting, *, tracker):
  """The states after each step (the first is the initial one) and the metrics of each step."""
  state = jmtl.TrainState.create(
    params=params,
    tx=optax.sgd(0.1),
    weighting=weighting,
    num_tasks=len(tasks),
    rng=jax.random.key(0),
    relations=tracker,
  )
  step = jax.jit(jmtl.make_train_step(model, tasks))
  states, metrics = [state], []
  for batch in batches:
    state, m = step(state, batch)
    states.append(state)
    metrics.append(m)
  return states, metrics


def test_the_step_accumulates_the_affinity_every_n_steps_and_leaves_training_unchanged():
  model, tasks, params, _ = _setup()
  batches = [_setup(seed=s)[3] for s in range(5)]
  states, _ = _run(
    model, tasks, params, batches, jmtl.weighting.equal(), tracker=relations.tracker(every=3, lookahead_lr=LR)
  )
  plain, _ = _run(model, tasks, params, batches, jmtl.weighting.equal(), tracker=None)
  jax.tree.map(np.testing.assert_array_equal, states[-1].params, plain[-1].params)  # measuring changes nothing
  want_z, want_cos = zip(*(_explicit(model, states[s].params, batches[s]) for s in (0, 3)))  # steps 0 and 3
  rs = states[-1].relations_state
  np.testing.assert_array_equal(rs.affinity_count, np.full((3, 3), 2))
  np.testing.assert_allclose(relations.mean_affinity(states[-1]), np.mean(want_z, 0), rtol=5e-4, atol=2e-6)
  # equal weighting computes no Gramian: the cosine comes from the affinity steps' per-task gradients
  np.testing.assert_array_equal(rs.cosine_count, np.full((3, 3), 2))
  np.testing.assert_allclose(relations.mean_cosine(states[-1]), np.mean(want_cos, 0), atol=3e-5)
  np.testing.assert_array_equal(relations.conflict_rate(states[-1]), np.mean(np.array(want_cos) < 0, 0))


def test_gramian_methods_add_their_gradient_cosine_every_step():
  model, tasks, params, _ = _setup()
  batches = [_setup(seed=s)[3] for s in range(4)]
  states, metrics = _run(model, tasks, params, batches, jmtl.weighting.mgda(), tracker=relations.tracker(every=10))
  rs = states[-1].relations_state
  cos = np.stack([np.asarray(m["grad_cosine"]) for m in metrics])
  np.testing.assert_array_equal(rs.cosine_count, np.full((3, 3), 4))
  np.testing.assert_allclose(rs.cosine, cos.sum(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(rs.conflicts, (cos < 0).sum(0))
  assert (cos < 0).any() and (cos > 0).any()
  np.testing.assert_array_equal(rs.affinity_count, np.ones((3, 3)))  # step 0 only


def test_a_task_without_labels_is_left_out_of_that_step():
  model, tasks, params, batch = _setup()
  empty = {**batch, "masks": {**batch["masks"], "b": np.zeros_like(batch["masks"]["b"])}}
  states, _ = _run(model, tasks, params, [batch, empty], jmtl.weighting.equal(), tracker=relations.tracker(every=1))
  counts = np.asarray(states[-1].relations_state.affinity_count)
  np.testing.assert_array_equal(counts, [[2, 1, 2], [1, 1, 1], [2, 1, 2]])
  assert np.all(np.isfinite(states[-1].relations_state.affinity))


def test_a_donated_state_steps():  # the state's arrays are distinct buffers, so the step may donate it
  model, tasks, params, batch = _setup()
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(0.1), num_tasks=3, rng=jax.random.key(0), relations=relations.tracker(every=2)
  )
  step = parallel.jit(jmtl.make_train_step(model, tasks))  # donates the state
  for _ in range(3):
    state, _ = step(state, batch)
  np.testing.assert_array_equal(state.relations_state.affinity_count, np.full((3, 3), 2))


def test_pmap_gives_the_single_device_affinity():
  model, tasks, params, batch = _setup(b=16)
  tracker = relations.tracker(every=1, lookahead_lr=LR)
  single, _ = _run(model, tasks, params, [batch], jmtl.weighting.equal(), tracker=tracker)
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(0.1), num_tasks=3, rng=jax.random.key(0), relations=tracker
  )
  pstep = parallel.pmap(jmtl.make_train_step(model, tasks, axis_name="data"), donate=False)
  out, _ = pstep(parallel.replicate(state), parallel.shard_batch(batch))
  got = parallel.unreplicate(out).relations_state
  want = single[-1].relations_state
  np.testing.assert_allclose(got.affinity, want.affinity, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.cosine, want.cosine, atol=1e-5)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """The compiled module's computations (name -> instruction lines) and the entry's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
    if head:
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif current is not None and line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _callees(line: str) -> list[str]:
  out = re.findall(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
  for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
    out += [n.strip().lstrip("%") for n in group.split(",")]
  return out


def _dots(comps, name, skip=frozenset()) -> int:
  """Dot instructions executed by one run of computation ``name``, leaving out the computations in ``skip``."""
  total = 0
  for line in comps[name]:
    total += len(re.findall(r"\bdot\(", line))
    total += sum(_dots(comps, c, skip) for c in _callees(line) if c not in skip)
  return total


def _compiled(weighting, tracker):
  model, tasks, params, batch = _setup()
  state = jmtl.TrainState.create(
    params=params, tx=optax.adam(1e-3), weighting=weighting, num_tasks=3, rng=jax.random.key(0), relations=tracker
  )
  return jax.jit(jmtl.make_train_step(model, tasks)).lower(state, batch).compile().as_text()


@pytest.mark.parametrize("weighting", [jmtl.weighting.equal, jmtl.weighting.mgda], ids=["equal", "mgda"])
def test_steps_without_an_affinity_update_run_the_dots_of_the_plain_step(weighting):
  plain_comps, plain_entry = _computations(_compiled(weighting(), None))
  comps, entry = _computations(_compiled(weighting(), relations.tracker(every=10)))
  # The affinity's conditional: one branch without a dot (the skipped steps), one with (the lookahead).
  found = []
  for lines in comps.values():
    for line in lines:
      if " conditional(" in line:
        branches = _callees(line)
        counts = [_dots(comps, b) for b in branches]
        if len(branches) == 2 and min(counts) == 0 and max(counts) > 0:
          found.append(branches[int(np.argmax(counts))])
  assert len(found) == 1, found
  assert _dots(comps, found[0]) > 0  # the lookahead: K backward and K forwards
  assert _dots(comps, entry, skip=frozenset(found)) == _dots(plain_comps, plain_entry)


def test_bad_trackers_fail_with_the_names():
  model, tasks, params, batch = _setup()
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(0.1), num_tasks=3, rng=jax.random.key(0), relations=relations.tracker(tasks=("a", "z"))
  )
  with pytest.raises(ValueError, match=r"tasks \['z'\] are not tasks of the step"):
    jax.eval_shape(jmtl.make_train_step(model, tasks), state, batch)
  with pytest.raises(ValueError, match="every must be a positive int"):
    relations.tracker(every=0)
  with pytest.raises(ValueError, match="lookahead_lr must be positive"):
    relations.tracker(lookahead_lr=-1.0)
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(0.1), num_tasks=2, rng=jax.random.key(0), relations=relations.tracker()
  )
  with pytest.raises(ValueError, match=r"relations matrices are \(2, 2\).*measures 3"):
    jax.eval_shape(jmtl.make_train_step(model, tasks), state, batch)
  with pytest.raises(ValueError, match="no relations were tracked"):
    relations.mean_affinity(
      jmtl.TrainState.create(params=params, tx=optax.sgd(0.1), num_tasks=3, rng=jax.random.key(0))
    )
