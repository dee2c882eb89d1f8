"""Per-task gradients of the shared parameters, computed only when a transform asks.

Three routes, cheapest first (DESIGN §1, §4):

* **loss level** (``_loss_level``): the weighting reads the losses only; one
  forward and one backward with the weights as the VJP cotangent.
* **separable** (``_separable``, ``_linear_heads``): the model exposes ``encode``/``head``. The
  trunk runs once; each head's loss and ``∂Lₖ/∂z`` come from that head's own
  VJP (never a full-model VJP per task, which would do K² head work). Then

  - *representation level* (MGDA-UB, Sener & Koltun 2018): ``G = Σ_batch dz dzᵀ``;
  - *parameter level*: for every ``flax.linen.Dense`` layer of the trunk, with
    inputs ``a`` and per-task output cotangents ``δₖ``,
    ``⟨aᵀδᵢ, aᵀδⱼ⟩ = Σ (a aᵀ) ⊙ (δᵢ δⱼᵀ)`` gives the Gramian without forming the
    K × P Jacobian (the idea behind torchjd's autogram). Without
    ``chunk_size`` every layer's ``δ`` comes from one vmapped trunk VJP; with
    it, one layer at a time, ``chunk_size`` tasks per VJP, so at most one
    ``K × rows × width`` array is alive (linear heads: not even the stacked
    ``dz``, each ``dzₖ = δₖ Wₖᵀ`` is formed inside the loop). Parameters
    outside such layers get their Jacobian rows from the trunk's VJP,
    ``chunk_size`` tasks at a time;
  - the update direction is one more trunk backward with ``Σₖ wₖ dzₖ``.
* **general** (``_general``): any ``apply``; one full VJP per task. Correct,
  and K times the backward cost.

Data parallelism: with ``axis_name``, the Gramian is that of the *global*
batch gradients. At representation level the rows of ``dz`` concatenate over
devices, so summing local Gramians is exact. At parameter level it is not:
``cross_device="exact"`` (default) all-reduces the Jacobian, and
``"approximate"`` sums local Gramians (cheaper, and documented as such).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl import _taps
from jmtl import tasks as tasks_lib
from jmtl.weighting import WeightingTransform
from jmtl.weighting import combine_jacobian
from jmtl.weighting import gramian_of

Array = jax.Array


class GradientOptions(NamedTuple):
  """How the engine computes per-task gradients for Gramian/Jacobian transforms.

  Attributes:
    level: ``"parameter"`` (the Gramian of the shared-parameter gradients, the
      papers' definition) or ``"representation"`` (of ``∂Lₖ/∂z``, MGDA-UB;
      needs ``encode``/``head``).
    heads: ``"weighted"``: head k moves along ``wₖ ∇Lₖ`` (the gradient of
      ``Σ wₖLₖ``); ``"own"``: along its own ``∇Lₖ`` (torchjd's ``mtl_backward``).
    chunk_size: tasks per trunk VJP at parameter level; ``None`` for all at
      once. Bounds the memory of materialised Jacobian rows at
      ``chunk_size × P``; when smaller than K it also takes the Dense-layer
      Gramian one layer at a time (a trunk backward per layer, each only as
      deep as that layer). Benchmark MLP at K = 40, ``chunk_size=10``: peak
      memory 1.5× the ``equal`` step's instead of 2.5×, step time unchanged
      within noise.
    cross_device: ``"exact"`` or ``"approximate"`` (see the module docstring).

  Examples:
    >>> from jmtl import grads
    >>> grads.GradientOptions(level="representation").check().level
    'representation'
  """

  level: str = "parameter"
  heads: str = "weighted"
  chunk_size: int | None = None
  cross_device: str = "exact"

  def check(self) -> GradientOptions:
    for field, allowed in (
      ("level", ("parameter", "representation")),
      ("heads", ("weighted", "own")),
      ("cross_device", ("exact", "approximate")),
    ):
      if getattr(self, field) not in allowed:
        raise ValueError(f"gradient option {field}={getattr(self, field)!r} is not one of {allowed}")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"gradient option chunk_size must be a positive int or None, got {self.chunk_size!r}")
    return self


class StepGrads(NamedTuple):
  losses: Array  # (K,) global per-task losses
  weights: Array  # (K,)
  weighting_state: Any
  grads: Any  # like params
  extra: dict  # Gramian-derived metrics
  model_state: Any = None  # the model's new state (batch-norm statistics), if it has one


def bind(model, model_state, axis_name):
  """``(apply, encode)`` of ``model`` for one training step, each returning ``(out, new_model_state)``.

  A stateless model's functions return ``model_state`` unchanged; a stateful
  one (:attr:`jmtl.models.MultiTaskModel.init_state`) runs with
  ``train=True`` and the pmap axis, so batch statistics are the global
  batch's. ``encode`` is ``None`` when the model has none.
  """
  apply = getattr(model, "apply", model)
  encode = getattr(model, "encode", None)
  if getattr(model, "init_state", None) is None:
    enc = None if encode is None else (lambda s, x: (encode(s, x), model_state))
    return (lambda p, x: (apply(p, x), model_state)), enc
  if model_state is None:
    raise ValueError(
      "the model has state (batch-norm statistics) but model_state is None; create the train state with "
      "jmtl.TrainState.create(..., model_state=model.init_state(key, inputs))"
    )
  kw = {"train": True, "axis_name": axis_name}
  enc = None if encode is None else (lambda s, x: encode(s, x, model_state, **kw))
  return (lambda p, x: apply(p, x, model_state, **kw)), enc


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _is_task_vector(w, k) -> bool:
  return isinstance(w, jax.Array | jnp.ndarray) and w.shape == (k,)


def gradient_metrics(gramian: Array, names: Sequence[str]) -> dict[str, Array]:
  """Per-task gradient norms and the cosine matrix, from the Gramian ``J Jᵀ``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import grads
    >>> m = grads.gradient_metrics(jnp.array([[4.0, -2.0], [-2.0, 1.0]]), ["a", "b"])
    >>> float(m["grad_norm/a"]), m["grad_cosine"].tolist()
    (2.0, [[1.0, -1.0], [-1.0, 1.0]])
  """
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(gramian), 0))
  # A zero gradient has no direction: report cosine 0 against it, not NaN.
  safe = jnp.where(norms > 0, norms, 1)
  cos = gramian / (safe[:, None] * safe[None, :])
  cos = jnp.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, 0)
  out = {f"grad_norm/{n}": norms[i] for i, n in enumerate(names)}
  out["grad_cosine"] = cos
  return out


def _denominators(counts, axis_name):
  return jnp.maximum(_psum(counts, axis_name), 1)


def _call_weighting(transform, losses, wstate, key, gramian=None, jacobian=None):
  w, s = transform.update(losses, wstate, gramian=gramian, jacobian=jacobian, key=key)
  return jax.lax.stop_gradient(w), s


def _task_terms(apply, tasks, params, batch):
  """``(Σ loss, (Σ count, model_state))`` per task, stacked to ``(K,)`` each, from a bound ``apply``."""
  preds, model_state = apply(params, batch["inputs"])
  terms = [tasks_lib.loss_terms(t, preds, batch) for t in tasks]
  return jnp.stack([s for s, _ in terms]), (jnp.stack([c for _, c in terms]), model_state)


def _loss_level(apply, tasks, params, batch, transform, wstate, key, axis_name) -> StepGrads:
  """One forward, one backward: ``∇ Σ wₖ Lₖ`` as a VJP with cotangent ``w``."""
  sums, vjp_fn, (counts, mstate) = jax.vjp(lambda p: _task_terms(apply, tasks, p, batch), params, has_aux=True)
  denom = _denominators(counts, axis_name)
  losses = _psum(sums / denom, axis_name)
  weights, wstate = _call_weighting(transform, losses, wstate, key)
  (grads,) = vjp_fn((weights / denom).astype(sums.dtype))
  return StepGrads(losses, weights, wstate, _psum(grads, axis_name), {}, mstate)


def _general(apply, tasks, params, batch, transform, wstate, key, axis_name, names, opts) -> StepGrads:
  """Any ``apply``: one VJP per task gives every task's gradient of all parameters."""
  sums, vjp_fn, (counts, mstate) = jax.vjp(lambda p: _task_terms(apply, tasks, p, batch), params, has_aux=True)
  denom = _denominators(counts, axis_name)
  losses = _psum(sums / denom, axis_name)
  rows = jnp.diag(1.0 / denom).astype(sums.dtype)
  (jac,) = _map_rows(vjp_fn, rows, opts.chunk_size)
  jac = _psum(jac, axis_name)
  shared_jac = jac["shared"] if transform.select is None else transform.select(jac["shared"])
  gramian = gramian_of(shared_jac)
  weights, wstate = _call_weighting(
    transform, losses, wstate, key, gramian, shared_jac if transform.needs == "jacobian" else None
  )
  if _is_task_vector(weights, len(names)):
    grads = combine_jacobian(weights, jac) if opts.heads == "weighted" else _own_heads(weights, jac)
  else:
    if transform.select is not None:
      raise ValueError("element-wise weights need the Jacobian of all shared parameters (select=None)")
    grads = {
      "shared": combine_jacobian(weights, jac["shared"]),
      "tasks": combine_jacobian(jnp.ones_like(losses), jac["tasks"]),
    }
    weights = jnp.ones_like(losses)
  return StepGrads(losses, weights, wstate, grads, gradient_metrics(gramian, names), mstate)


def _own_heads(weights, jac):
  return {
    "shared": combine_jacobian(weights, jac["shared"]),
    "tasks": combine_jacobian(jnp.ones_like(weights), jac["tasks"]),
  }


def _map_rows(fn, rows, chunk_size):
  """``vmap(fn)(rows)``, or ``chunk_size`` rows at a time to bound memory."""
  if chunk_size is None or chunk_size >= jax.tree.leaves(rows)[0].shape[0]:
    return jax.vmap(fn)(rows)
  return jax.lax.map(fn, rows, batch_size=chunk_size)


def _separable(model, encode, tasks, params, batch, transform, wstate, key, axis_name, names, opts) -> StepGrads:
  """The encode/head route: trunk once, heads per task, Gramian at the requested level."""
  inputs = batch["inputs"]
  shared = params["shared"]
  k = len(tasks)
  param_level = opts.level == "parameter"
  need_jacobian = transform.needs == "jacobian" or (
    param_level and axis_name is not None and opts.cross_device == "exact"
  )
  layers = None
  if param_level and not need_jacobian:
    layers = _taps.discover_layers(lambda s, x: encode(s, x)[0], shared, inputs)
  if layers:

    def enc(s, eps):
      record = []
      with nn.intercept_methods(_taps.dense_interceptor(eps, record)):
        z, mstate = encode(s, inputs)
      return z, ([x for _, x, _ in record], mstate)

    eps0 = [jnp.zeros(layer.out_shape, layer.out_dtype) for layer in layers]
  else:

    def enc(s, eps):
      del eps
      z, mstate = encode(s, inputs)
      return z, ([], mstate)

    eps0 = []
  z, enc_vjp, (acts, mstate) = jax.vjp(enc, shared, eps0, has_aux=True)

  sums, counts, head_vjps, loss_vjps = [], [], [], []
  for t in tasks:
    pred, head_vjp = jax.vjp(lambda tp, zz, t=t: model.head(t.name, tp, zz), params["tasks"][t.name], z)
    s, loss_vjp, c = jax.vjp(lambda y, t=t: tasks_lib.loss_terms(t, {t.name: y}, batch), pred, has_aux=True)
    sums.append(s)
    counts.append(c)
    head_vjps.append(head_vjp)
    loss_vjps.append(loss_vjp)
  sums, counts = jnp.stack(sums), jnp.stack(counts)
  denom = _denominators(counts, axis_name)
  losses = _psum(sums / denom, axis_name)
  # ∂(wᵢ Lᵢ)/∂predᵢ: the cotangent of head i's output for a loss weight wᵢ.
  dpred = lambda i, w: loss_vjps[i]((w / denom[i]).astype(sums.dtype))[0]
  dpreds = [dpred(i, 1.0) for i in range(k)]
  head_grads, dzs = zip(*[head_vjps[i](d) for i, d in enumerate(dpreds)])
  dz = jax.tree.map(lambda *x: jnp.stack(x), *dzs)  # (K, B, ...) per leaf of z

  jac = None
  if not param_level:
    gramian = _psum(gramian_of(dz), axis_name)
  else:
    selected = _taps.selected_paths(shared, transform.select)
    covered = set()
    gramian = jnp.zeros((k, k), sums.dtype)
    # Per-task trunk cotangents: dz itself, or (linear heads) what dzₖ = δₖ Wₖᵀ is made of.
    chunked = bool(layers) and opts.chunk_size is not None and opts.chunk_size < k
    task_xs, cot_of = (
      (dz, lambda x: x) if opts.chunk_size is None else _taps.task_cotangents(model, tasks, params, z, dpreds, dz)
    )
    if chunked:
      # One layer at a time, its δ recomputed chunk by chunk: at most one
      # (K, rows, O) array is alive (with linear heads not even dz).
      chunk, xs = _taps.even_chunks(task_xs, k, opts.chunk_size)
    elif layers:
      # Tasks next to the feature axis: every Gramian product is then a matmul.
      deltas = jax.vmap(lambda c: enc_vjp(c)[1], out_axes=-2)(dz)
    for i, (layer, a) in enumerate(zip(layers or (), acts)):
      kpath, bpath = (*layer.path, "kernel"), (*layer.path, "bias")
      use_k, use_b = kpath in selected, bpath in selected
      covered |= {kpath, bpath}
      if not (use_k or use_b):
        continue
      if chunked:
        # The buffer's fill depends on the Gramian so far: this layer's δ is
        # only computed once the previous layer's is consumed.
        delta = _taps.chunk_loop(lambda x, i=i: enc_vjp(cot_of(x))[1][i], xs, chunk, layer, 0 * gramian[0, 0])
        gramian = gramian + _taps.dense_gramian_chunked(a, delta, use_k, use_b, chunk)[:k, :k]
      else:
        gramian = gramian + _taps.dense_gramian(a, deltas[i], use_k, use_b)
    rest = selected - covered
    if rest:
      rows = _map_rows(lambda x: enc_vjp(cot_of(x))[0], task_xs, opts.chunk_size)
      jac = _psum(rows, axis_name) if need_jacobian else rows
      sel_jac = jac if transform.select is None else transform.select(jac)
      if covered:
        sel_jac = [leaf for p, leaf in zip(_taps.leaf_paths(jac), jax.tree.leaves(jac)) if p in rest]
      gramian = gramian + gramian_of(sel_jac)
      if transform.select is not None:
        jac = transform.select(jac)
    if not need_jacobian:
      gramian = _psum(gramian, axis_name)  # exact on one device; the documented approximation across devices

  weights, wstate = _call_weighting(
    transform, losses, wstate, key, gramian, jac if transform.needs == "jacobian" else None
  )
  if _is_task_vector(weights, k):
    if param_level:
      # Σ wₖ dzₖ from the heads' VJPs again (K small products) rather than from
      # the stacked dz, which can then be freed as soon as the Gramian is done.
      scaled = [head_vjps[i](dpred(i, weights[i]))[1] for i in range(k)]
      cot = jax.tree.map(lambda *x: sum(x), *scaled)
    else:
      cot = jax.tree.map(lambda d: jnp.tensordot(weights.astype(d.dtype), d, 1), dz)
    g_shared = _psum(enc_vjp(cot)[0], axis_name)
  else:
    if transform.select is not None:
      raise ValueError("element-wise weights need the Jacobian of all shared parameters (select=None)")
    g_shared = combine_jacobian(weights, jac)  # jac is already the global Jacobian
    weights = jnp.ones_like(losses)
  head_w = weights if opts.heads == "weighted" else jnp.ones_like(weights)
  g_tasks = {
    t.name: jax.tree.map(lambda g, i=i: g * head_w[i].astype(g.dtype), head_grads[i]) for i, t in enumerate(tasks)
  }
  grads = {"shared": g_shared, "tasks": _psum(g_tasks, axis_name)}
  return StepGrads(losses, weights, wstate, grads, gradient_metrics(gramian, names), mstate)


def _linear_heads(model, encode, tasks, params, batch, transform, wstate, key, axis_name, names, opts, paths):
  """Representation level when every head is ``pred = z Wₖ + bₖ``: G and Σwₖdzₖ without any dzₖ.

  With ``δₖ = ∂Lₖ/∂predₖ`` (rows × Cₖ), ``dzₖ = δₖ Wₖᵀ`` and
  ``⟨dzᵢ, dzⱼ⟩ = Σ (δᵢᵀδⱼ) ⊙ (WᵢᵀWⱼ)``: two small Gramians of the stacked
  ``[δ₁ … δ_K]`` and ``[W₁ … W_K]`` replace K products of size rows × D and
  the stacked ``(K, rows, D)`` array (the same identity as for trunk layers,
  applied to the heads).
  """
  z, enc_vjp, mstate = jax.vjp(lambda sh: encode(sh, batch["inputs"]), params["shared"], has_aux=True)
  sums, counts, loss_vjps, head_vjps, kernels = [], [], [], [], []
  for t, path in zip(tasks, paths):
    tp = params["tasks"][t.name]
    pred, head_vjp = jax.vjp(lambda p, t=t: model.head(t.name, p, z), tp)
    s, loss_vjp, c = jax.vjp(lambda y, t=t: tasks_lib.loss_terms(t, {t.name: y}, batch), pred, has_aux=True)
    node = tp
    for name in path:
      node = node[name]
    sums.append(s)
    counts.append(c)
    loss_vjps.append(loss_vjp)
    head_vjps.append(head_vjp)
    kernels.append(node["kernel"])
  sums, counts = jnp.stack(sums), jnp.stack(counts)
  denom = _denominators(counts, axis_name)
  losses = _psum(sums / denom, axis_name)
  deltas = [v((1.0 / denom[i]).astype(sums.dtype))[0] for i, v in enumerate(loss_vjps)]
  widths = [w.shape[1] for w in kernels]
  delta = jnp.concatenate([d.reshape(-1, d.shape[-1]) for d in deltas], axis=1)  # (rows, ΣC)
  kernel = jnp.concatenate(kernels, axis=1).astype(delta.dtype)  # (D, ΣC)
  owner = jnp.repeat(jnp.arange(len(tasks)), jnp.asarray(widths), total_repeat_length=sum(widths))
  member = (owner[:, None] == jnp.arange(len(tasks))[None, :]).astype(delta.dtype)  # (ΣC, K)
  gramian = member.T @ ((delta.T @ delta) * (kernel.T @ kernel)) @ member
  gramian = _psum(gramian, axis_name)  # rows concatenate over devices: exact
  weights, wstate = _call_weighting(transform, losses, wstate, key, gramian)
  cot = (delta * (member @ weights.astype(delta.dtype))[None, :]) @ kernel.T
  g_shared = _psum(enc_vjp(cot.reshape(z.shape).astype(z.dtype))[0], axis_name)
  head_w = weights if opts.heads == "weighted" else jnp.ones_like(weights)
  g_tasks = {t.name: head_vjps[i]((deltas[i] * head_w[i]).astype(deltas[i].dtype))[0] for i, t in enumerate(tasks)}
  grads = {"shared": g_shared, "tasks": _psum(g_tasks, axis_name)}
  return StepGrads(losses, weights, wstate, grads, gradient_metrics(gramian, names), mstate)


def compute(
  model,
  tasks: Sequence[tasks_lib.Task],
  params,
  batch,
  transform: WeightingTransform,
  wstate,
  key,
  axis_name: str | None,
  opts: GradientOptions,
  model_state=None,
) -> StepGrads:
  """Losses, weights and the weighted gradient by the cheapest route that serves ``transform``.

  ``model_state`` is a stateful model's state (see
  :attr:`jmtl.models.MultiTaskModel.init_state`); the new one is
  ``StepGrads.model_state``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> from jmtl import grads
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse), jmtl.Task("b", jmtl.losses.mse)]
    >>> apply = lambda p, x: {"a": x * p["shared"], "b": -x * p["shared"]}
    >>> batch = {"inputs": jnp.ones(4), "labels": {"a": jnp.zeros(4), "b": -2 * jnp.ones(4)}}
    >>> t = jmtl.weighting.stateless(lambda losses, gramian, **_: jnp.ones(2), needs="gramian")
    >>> out = grads.compute(apply, tasks, {"shared": 1.0, "tasks": {}}, batch, t, t.init(2),
    ...                     jax.random.key(0), None, grads.GradientOptions())
    >>> out.extra["grad_cosine"].tolist()  # the two tasks pull in exactly opposite directions
    [[1.0, -1.0], [-1.0, 1.0]]
  """
  names = tuple(t.name for t in tasks)
  apply, encode = bind(model, model_state, axis_name)
  if transform.needs == "losses":
    return _loss_level(apply, tasks, params, batch, transform, wstate, key, axis_name)
  if not isinstance(params, dict) or not jax.tree.leaves(params.get("shared", {})):
    raise ValueError(
      f"a {transform.needs}-level weighting needs shared parameters, but params['shared'] is empty "
      "(soft-sharing models have none); use a loss-level weighting or a hard-sharing model"
    )
  separable_ok = encode is not None and getattr(model, "head", None) is not None
  if separable_ok and opts.level == "representation" and transform.needs == "gramian":
    z = jax.eval_shape(lambda s, x: encode(s, x)[0], params["shared"], batch["inputs"])
    paths = _taps.linear_head_kernels(model, tasks, params, z) if hasattr(z, "shape") else None
    if paths is not None:
      return _linear_heads(model, encode, tasks, params, batch, transform, wstate, key, axis_name, names, opts, paths)
  if separable_ok:
    return _separable(model, encode, tasks, params, batch, transform, wstate, key, axis_name, names, opts)
  if opts.level == "representation":
    raise ValueError(
      "level='representation' needs a model with encode and head (one shared representation z; see "
      "jmtl.models.MultiTaskModel). This model has none -- cross-stitch, MMoE, CGC/PLE and DSelect-k mix shared "
      "parts differently per task -- so use level='parameter' (the general path serves every method)"
    )
  return _general(apply, tasks, params, batch, transform, wstate, key, axis_name, names, opts)
