"""The reference workload of the step benchmarks and the hand-written JAX steps jmtl is measured against.

Workload: MLP trunk 784→512→512 (ReLU), K linear heads 512→10, softmax
cross-entropy (mean over the batch, summed over tasks), batch 256, SGD(1e-2).
Every step here starts from the same parameters (the jmtl model's
initialisation, copied: jmtl's steps donate their state).

* :func:`jmtl_step` / :func:`jmtl_eval` -- the library's steps;
* :func:`loop_step` -- a hand-written step whose K heads are a Python loop;
* :func:`fused_step` / :func:`fused_eval` -- what a JAX user writes for K
  same-shaped heads: stacked head kernels ``(K, 512, 10)`` and biases
  ``(K, 10)``, one ``einsum`` for all heads, one vectorised cross-entropy over
  the labels stacked ``(K, B)`` (stacked inside the step: every step is timed
  on the same batch, and the ``K × B`` int32 copy is negligible).

``dtype`` is the compute dtype: the jmtl model's ``dtype=``; the hand-written
steps cast inputs, kernels and biases to it inside the step and keep the
parameters, the losses (logits are cast back to float32 before the
cross-entropy) and the update in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmtl

BATCH, IN, HIDDEN, CLASSES = 256, 784, 512, 10
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LEARNING_RATE = 1e-2


def names(k):
  return [f"t{i}" for i in range(k)]


def reference_batch(k, seed=0):
  r = np.random.default_rng(seed)
  return {
    "inputs": jnp.asarray(r.normal(size=(BATCH, IN)), jnp.float32),
    "labels": {n: jnp.asarray(r.integers(0, CLASSES, BATCH), jnp.int32) for n in names(k)},
  }


def model(k, dtype=jnp.float32):
  """The jmtl model of the workload; ``dtype`` is its compute dtype (parameters stay float32)."""
  return jmtl.models.mlp(dict.fromkeys(names(k), CLASSES), hidden=(HIDDEN, HIDDEN), dtype=dtype)


def init_params(k):
  return model(k).init(jax.random.key(0), jnp.zeros((1, IN)))


def tasks(k, *, accuracy=False):
  metrics = {"accuracy": jmtl.metrics.accuracy()} if accuracy else {}
  return [jmtl.Task(n, jmtl.losses.softmax_cross_entropy, metrics) for n in names(k)]


def jmtl_step(k, weighting=None, *, dtype=jnp.float32, **options):
  """The jitted jmtl train step and its state; ``options`` go to ``make_train_step``."""
  state = jmtl.TrainState.create(
    params=init_params(k), tx=optax.sgd(LEARNING_RATE), weighting=weighting, num_tasks=k, rng=jax.random.key(1)
  )
  return jmtl.parallel.jit(jmtl.make_train_step(model(k, dtype), tasks(k), **options)), state


def jmtl_eval(k, *, dtype=jnp.float32):
  """The jitted jmtl eval step (loss and accuracy per task) and its parameters."""
  return jax.jit(jmtl.make_eval_step(model(k, dtype), tasks(k, accuracy=True))), init_params(k)


def stacked_params(k):
  """The jmtl initialisation, copied, in the hand-written layout.

  Trunk ``w1, b1, w2, b2``; heads stacked: ``wh (K, 512, 10)``, ``bh (K, 10)``.
  """
  p = init_params(k)
  shared, heads = p["shared"], [p["tasks"][n]["dense_0"] for n in names(k)]
  return {
    "w1": jnp.copy(shared["dense_0"]["kernel"]),
    "b1": jnp.copy(shared["dense_0"]["bias"]),
    "w2": jnp.copy(shared["dense_1"]["kernel"]),
    "b2": jnp.copy(shared["dense_1"]["bias"]),
    "wh": jnp.stack([h["kernel"] for h in heads]),
    "bh": jnp.stack([h["bias"] for h in heads]),
  }


def _trunk(p, x, dtype):
  c = lambda a: a.astype(dtype)
  return jax.nn.relu(jax.nn.relu(c(x) @ c(p["w1"]) + c(p["b1"])) @ c(p["w2"]) + c(p["b2"]))


def _fused_logits(p, x, dtype):
  """``(K, B, C)`` float32 logits of every head: one einsum."""
  h = _trunk(p, x, dtype)
  logits = jnp.einsum("bh,khc->kbc", h, p["wh"].astype(dtype)) + p["bh"].astype(dtype)[:, None, :]
  return logits.astype(jnp.float32)


def _stacked_labels(batch, k):
  return jnp.stack([batch["labels"][n] for n in names(k)])


def _sgd_step(loss, labels_of):
  """``step((params, opt_state), batch) -> (state, loss)``: ``value_and_grad`` of ``loss`` and the SGD update."""
  opt = optax.sgd(LEARNING_RATE)

  def step(state, batch):
    p, o = state
    value, g = jax.value_and_grad(loss)(p, batch["inputs"], labels_of(batch))
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), value

  return step, opt


def loop_step(k, *, dtype=jnp.float32):
  """The same math with the K heads as a Python loop: K head matmuls and K cross-entropies."""

  def loss(p, x, ys):
    h = _trunk(p, x, dtype)
    total = 0.0
    for i in range(k):
      logits = (h @ p["wh"][i].astype(dtype) + p["bh"][i].astype(dtype)).astype(jnp.float32)
      total += -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ys[i][:, None], 1))
    return total

  step, opt = _sgd_step(loss, lambda batch: [batch["labels"][n] for n in names(k)])
  params = stacked_params(k)
  return jax.jit(step, donate_argnums=0), (params, opt.init(params))


def fused_step(k, *, dtype=jnp.float32):
  """The step a JAX user writes for K same-shaped heads: one einsum, one vectorised cross-entropy."""

  def loss(p, x, ys):
    ce = optax.softmax_cross_entropy_with_integer_labels(_fused_logits(p, x, dtype), ys)  # (K, B)
    return jnp.sum(jnp.mean(ce, axis=1))

  step, opt = _sgd_step(loss, lambda batch: _stacked_labels(batch, k))
  params = stacked_params(k)
  return jax.jit(step, donate_argnums=0), (params, opt.init(params))


def fused_eval(k, *, dtype=jnp.float32):
  """A hand-written eval step: per-task loss sums, label counts and correct counts, all heads at once."""

  def eval_step(p, batch):
    logits, ys = _fused_logits(p, batch["inputs"], dtype), _stacked_labels(batch, k)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ys)
    return {
      "loss_sum": jnp.sum(ce, axis=1),
      "count": jnp.full((k,), ys.shape[1], jnp.float32),
      "correct": jnp.sum(jnp.argmax(logits, axis=-1) == ys, axis=1, dtype=jnp.float32),
    }

  return jax.jit(eval_step), stacked_params(k)
