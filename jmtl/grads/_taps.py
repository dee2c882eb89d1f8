"""Dense-layer taps: a trunk's ``flax.linen.Dense`` layers and the Gramian identities they allow.

For a Dense layer with input rows ``a`` and per-task output cotangents
``δₖ``, the per-task kernel gradients are ``aᵀδₖ`` and
``⟨aᵀδᵢ, aᵀδⱼ⟩ = Σ (a aᵀ) ⊙ (δᵢ δⱼᵀ)``: the Gramian without the Jacobian. The
layers are found by intercepting ``nn.Dense.__call__`` while ``encode`` (or a
head) is traced; a zero perturbation added to each output gives ``δₖ`` as a
VJP cotangent. With ``chunk_size``, :mod:`jmtl.grads` takes the layers one at
a time: :func:`chunk_loop` writes one layer's ``δ`` for every task, a chunk
of tasks per trunk VJP, :func:`dense_gramian_chunked` consumes it, and
:func:`task_cotangents` lets linear heads form each ``dzₖ`` inside the loop.
Private to :mod:`jmtl.grads` (the separable route, :mod:`jmtl.grads._separable`).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl import groups


class Layer(NamedTuple):
  path: tuple[str, ...]  # module path inside params["shared"]
  out_shape: tuple[int, ...]
  out_dtype: Any


def node_at(tree, path):
  """The subtree of nested dicts ``tree`` at ``path``, or ``None`` when there is none.

  >>> node_at({"a": {"b": 1}}, ("a", "b")), node_at({"a": 1}, ("a", "b"))
  (1, None)
  """
  for name in path:
    tree = tree.get(name) if isinstance(tree, dict) else None
  return tree


def kernel_at(tree, path):
  """The 2-D ``kernel`` leaf of the Dense layer at ``path``, or ``None``."""
  node = node_at(tree, path)
  kernel = node.get("kernel") if isinstance(node, dict) else None
  return kernel if getattr(kernel, "ndim", 0) == 2 else None


def dense_interceptor(perturb, record):
  """Adds ``perturb[i]`` to the i-th Dense output and records its input."""
  counter = [0]

  def interceptor(next_fun, args, kwargs, context):
    if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    i = counter[0]
    counter[0] += 1
    record.append((tuple(context.module.path), args[0], y))
    return y if perturb is None else y + perturb[i]

  return interceptor


def discover_layers(encode, shared) -> list[Layer] | None:
  """The Dense layers ``encode(shared) -> z`` calls, if each is a distinct shared leaf pair used once.

  ``None`` otherwise: a shared module called twice (or living outside
  ``params["shared"]``) has no exact identity, and the caller falls back to
  Jacobian rows.
  """
  record = []

  def probe(s):
    with nn.intercept_methods(dense_interceptor(None, record)):
      return encode(s)

  jax.eval_shape(probe, shared)
  paths = [p for p, _, _ in record]
  layers = []
  for path, _, y in record:
    if paths.count(path) != 1 or kernel_at(shared, path) is None:
      return None
    layers.append(Layer(path, tuple(y.shape), y.dtype))
  return layers


def leaf_paths(tree) -> list[tuple]:
  return [
    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def selected_paths(shared, select) -> set[tuple]:
  if select is None:
    return set(leaf_paths(shared))
  marked = jax.tree_util.tree_map_with_path(
    lambda p, _: tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), shared
  )
  return set(jax.tree.leaves(select(marked), is_leaf=lambda x: isinstance(x, tuple)))


def _with_bias_column(rows, use_kernel, use_bias):
  """The rows whose Gram matrix gives the selected Gramian: ``a``, ``[a, 1]`` (kernel and bias) or ``1`` (bias).

  A bias gradient is ``Σ_b δ_b``, the kernel identity with an input of ones,
  so the bias folds into the kernel's matmuls (XLA on CPU reduces a large
  array over its leading axis ~40× slower than the equivalent matmul). The
  bias alone (one column) takes the explicit association, ``s = 1ᵀδ``.
  The caller selects at least one of the two.
  """
  ones = jnp.ones((rows.shape[0], 1), rows.dtype)
  if not use_kernel:
    return ones
  return jnp.concatenate([rows, ones], axis=1) if use_bias else rows


def dense_gramian(a, delta, use_kernel, use_bias):
  """Kernel and bias Gramian of one Dense layer from inputs ``a`` and per-task cotangents ``delta``.

  ``a``: ``(..., I)`` rows of the layer input; ``delta``: ``(..., K, O)``
  per-task output cotangents, tasks on the second-to-last axis so that every
  product below is a plain matmul over a reshape (no transposed copies of the
  ``K × rows × O`` array). Picks the cheaper of the identity
  ``Σ (a aᵀ) ⊙ (δᵢ δⱼᵀ)`` and the explicit ``Jₖ = aᵀ δₖ``.
  """
  k, o_dim = delta.shape[-2:]
  rows = a.reshape(-1, a.shape[-1]).astype(delta.dtype)
  n = rows.shape[0]
  d = delta.reshape(n, k, o_dim)
  rows = _with_bias_column(rows, use_kernel, use_bias)
  i_dim = rows.shape[1]
  batched = (((2,), (2,)), ((0,), (0,)))  # contract O, batch over the leading axis
  identity_cost = n * n * i_dim + k * n * n * o_dim + k * k * n * o_dim
  explicit_cost = k * n * i_dim * o_dim + k * k * i_dim * o_dim
  if identity_cost <= explicit_cost:
    m = (rows @ rows.T) @ d.reshape(n, k * o_dim)  # (a aᵀ) δₖ for every k at once
    gk = jax.lax.dot_general(d, m.reshape(n, k, o_dim), batched).sum(0)
  else:
    jk = (rows.T @ d.reshape(n, k * o_dim)).reshape(i_dim, k, o_dim)  # Jₖ = aᵀ δₖ, stacked on axis 1
    gk = jax.lax.dot_general(jk, jk, batched).sum(0)
  return 0.5 * (gk + gk.T)


def dense_gramian_chunked(a, delta, use_kernel, use_bias, chunk):
  """:func:`dense_gramian` with tasks first, ``delta``: ``(K, ..., O)``, ``chunk`` tasks at a time.

  Column ``j`` of the kernel Gramian is ``⟨δᵢ, (a aᵀ) δⱼ⟩`` for every ``i``,
  so only ``chunk`` of the products ``(a aᵀ) δⱼ`` (or ``a (aᵀ δⱼ)``, whichever
  association is cheaper) exist at once, never a second ``K × rows × O``
  array. ``K`` must be a multiple of ``chunk``.
  """
  k, o_dim = delta.shape[0], delta.shape[-1]
  rows = a.reshape(-1, a.shape[-1]).astype(delta.dtype)
  n = rows.shape[0]
  d = delta.reshape(k, n, o_dim)
  rows = _with_bias_column(rows, use_kernel, use_bias)
  i_dim = rows.shape[1]
  flat = d.reshape(k, n * o_dim)
  if n * n * i_dim + k * n * n * o_dim <= 2 * k * n * i_dim * o_dim:
    gram = rows @ rows.T
    times_aat = lambda dj: gram @ dj
  else:
    times_aat = lambda dj: rows @ (rows.T @ dj)

  def block(j):  # G[:, chunk tasks from j]ᵀ; slicing the one flat array keeps XLA from copying δ
    dj = jax.lax.dynamic_slice_in_dim(flat, j * chunk, chunk).reshape(chunk, n, o_dim)
    return jax.vmap(times_aat)(dj).reshape(chunk, n * o_dim) @ flat.T

  cols = jax.lax.map(block, jnp.arange(k // chunk)).reshape(k, k)  # row j: G[:, j]
  return 0.5 * (cols + cols.T)


def linear_head_kernels(ctx, z) -> list | None:
  """Each head's kernel path when every head is one ``Dense`` applied to ``z`` (an array), else ``None``."""
  if not hasattr(z, "shape"):
    return None
  model, params = ctx.model, ctx.params
  paths = []
  for t in ctx.tasks:
    found = {}

    def probe(tp, zz, t=t, found=found):
      record = []
      with nn.intercept_methods(dense_interceptor(None, record)):
        y = model.head(t.name, tp, zz)
      found["ok"] = len(record) == 1 and record[0][1] is zz and record[0][2] is y
      found["path"] = record[0][0] if record else None
      return y

    jax.eval_shape(probe, params["tasks"][t.name], z)
    if not found["ok"] or kernel_at(params["tasks"][t.name], found["path"]) is None:
      return None
    paths.append(found["path"])
  return paths


def task_cotangents(ctx, z, heads, dz):
  """``(xs, cot_of)`` with ``cot_of(xs[k]) = dzₖ``, the smallest such ``xs`` the heads allow.

  Linear heads (``predₖ = z Wₖ + bₖ``) give ``dzₖ = δₖ Wₖᵀ`` from the
  head-output cotangents ``δₖ`` and kernels ``Wₖ`` (padded to the widest
  head; zero columns add nothing), so a loop over tasks can form each
  ``dzₖ`` when it needs it. Other heads: ``xs`` is the stacked ``dz``.
  """
  paths = linear_head_kernels(ctx, z)
  if paths is None:
    return dz, lambda x: x
  # Each group's kernels are already stacked (G, D, C): pad them to the widest head and put them in task order.
  kernels = [node_at(p.params, paths[p.group.index[0]])["kernel"] for p in heads.passes]
  width = max(w.shape[-1] for w in kernels)
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  deltas = heads.dpred_stack(jnp.ones((ctx.k,), heads.losses.dtype))
  xs = (deltas, groups.in_task_order([pad(w).astype(deltas.dtype) for w in kernels], heads.groups))
  return xs, lambda x: (x[0] @ x[1].T).astype(z.dtype)


def even_chunks(xs, k, chunk_size):
  """The chunk size that splits ``k`` tasks most evenly, and ``xs`` zero-padded to a multiple of it.

  A zero cotangent gives zero gradients, so padded tasks add zero rows and
  columns to a Gramian (sliced off by the caller).
  """
  size = -(-k // -(-k // chunk_size))
  pad = -k % size
  if pad:
    xs = jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), xs)
  return size, xs


def chunk_loop(fn, xs, chunk, layer, fill):
  """``vmap(fn)(xs)``, ``chunk`` rows at a time, written into one ``(K, *layer.out_shape)`` buffer.

  The buffer starts as ``fill`` (a scalar): a fresh value per call, so XLA
  neither shares one zero buffer between calls (and copies it) nor allocates
  it before ``fill`` is computed.
  """
  k = jax.tree.leaves(xs)[0].shape[0]

  def body(j, buf):
    x = jax.tree.map(lambda v: jax.lax.dynamic_slice_in_dim(v, j * chunk, chunk), xs)
    return jax.lax.dynamic_update_slice_in_dim(buf, jax.vmap(fn)(x).astype(buf.dtype), j * chunk, 0)

  init = jnp.full((k, *layer.out_shape), fill.astype(layer.out_dtype), layer.out_dtype)
  return jax.lax.fori_loop(0, k // chunk, body, init)
