"""Task relations measured inside the train step: TAG's lookahead affinity and the task-gradient cosine.

The inter-task affinity of Fifty et al. ("Efficiently Identifying Task
Groupings for Multi-Task Learning", NeurIPS 2021, eq. 3) asks how one SGD step
on task ``i``'s loss, taken by the shared parameters alone, changes task
``j``'s loss on the same batch::

  Z_{i→j} = 1 − Lⱼ(θₛ − η ∇θₛ Lᵢ, θⱼ) / Lⱼ(θₛ, θⱼ)

Positive: the step on ``i`` lowered ``j``'s loss (``i`` helps ``j``); negative:
it raised it. TAG averages ``Z`` over training. Here the train step computes it
every ``every`` steps under ``lax.cond`` (the other steps run the branch that
returns zeros, so they pay for a few K×K additions only): one forward,
linearised, then per task its gradient of the shared parameters (one
backward), a tangent forward along it (a column of the Gramian, for the
cosine) and the lookahead forward, ``chunk_size`` tasks batched with ``vmap``
at a time. The state
keeps the running sums and counts (:class:`RelationsState`); the readers
:func:`mean_affinity`, :func:`mean_cosine` and :func:`conflict_rate` give the
means.

The cosine of the per-task gradients of the shared parameters is accumulated
for every weighting: every step, at no cost, for a method that computes a
Gramian (from the route's ``grad_cosine``: the Gramian the method sees, so a
representation-level or selected-subset one); on the affinity steps, from the
lookahead's Gramian columns, for every other method.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


#: Source tasks per ``vmap`` of the lookahead. On the benchmark MLP (784-512-512, batch 256) at K = 10, all at once
#: took 2.5× as long as 1 to 5 at a time, and made the program's temporary buffer 89 MB: XLA:CPU allocates it on
#: every call, and beyond about 32 MB (glibc's largest heap threshold: a fresh mmap each call) that slowed the steps
#: *without* a measurement by 1.4-1.5×. Two at a time: 14-18 MB at K = 2 to 40.
CHUNK_SIZE = 2


class Relations(NamedTuple):
  """What the train step measures about how tasks relate; make one with :func:`tracker`.

  Attributes:
    every: steps between two affinity measurements (the first at step 0).
    lookahead_lr: ``η`` of the lookahead SGD step.
    tasks: the tracked tasks (a subset, for large K), or ``None`` for all;
      the matrices are over these tasks, in this order.
    chunk_size: source tasks measured at once (``vmap``), ``None`` for all
      (see :func:`lookahead_affinity`).
  """

  every: int = 10
  lookahead_lr: float = 0.1
  tasks: tuple[str, ...] | None = None
  chunk_size: int | None = CHUNK_SIZE

  def indices(self, names: Sequence[str]) -> list[int]:
    """The positions of the tracked tasks among the step's task ``names``.

    Examples:
      >>> tracker(tasks=("c", "a")).indices(("a", "b", "c"))
      [2, 0]
    """
    names = list(names)
    if self.tasks is None:
      return list(range(len(names)))
    unknown = [t for t in self.tasks if t not in names]
    if unknown:
      raise ValueError(f"relations tracker: tasks {unknown} are not tasks of the step ({names})")
    return [names.index(t) for t in self.tasks]

  def __repr__(self) -> str:
    tasks = "" if self.tasks is None else f", tasks={list(self.tasks)}"
    chunk = "" if self.chunk_size == CHUNK_SIZE else f", chunk_size={self.chunk_size}"
    return f"tracker(every={self.every}, lookahead_lr={self.lookahead_lr:g}{tasks}{chunk})"


def tracker(
  every: int = 10,
  lookahead_lr: float = 0.1,
  tasks: Sequence[str] | None = None,
  chunk_size: int | None = CHUNK_SIZE,
) -> Relations:
  """A :class:`Relations` spec for :meth:`jmtl.TrainState.create` (``relations=``): TAG affinity every ``every`` steps.

  Args:
    every: steps between two affinity measurements (1: every step).
    lookahead_lr: the learning rate ``η`` of the lookahead SGD step. TAG uses
      the run's; with an adaptive optimizer whose rate is small (Adam 1e-3)
      the float32 loss ratio then measures a change of ~1e-4, so a larger
      ``η`` gives a clearer signal (the affinity is ``η ⟨∇Lᵢ, ∇Lⱼ⟩ / Lⱼ`` to
      first order: ``η`` scales it and leaves the grouping alone).
    tasks: a subset of the task names to track (for large K: the cost is
      one backward and two forwards per tracked task), or ``None`` for all.
    chunk_size: tracked tasks measured at once (``vmap``); ``None`` for all.
      Memory and the temporary buffer grow with it (see :data:`CHUNK_SIZE`).

  Examples:
    >>> import jmtl
    >>> jmtl.relations.tracker(every=5, lookahead_lr=0.05)
    tracker(every=5, lookahead_lr=0.05)
  """
  if not isinstance(every, int | np.integer) or every < 1:
    raise ValueError(f"relations tracker: every must be a positive int (steps), got {every!r}")
  if not np.isfinite(lookahead_lr) or lookahead_lr <= 0:
    raise ValueError(f"relations tracker: lookahead_lr must be positive, got {lookahead_lr!r}")
  if tasks is not None:
    tasks = tuple(tasks)
    if len(set(tasks)) != len(tasks) or not tasks:
      raise ValueError(f"relations tracker: tasks must be distinct names, at least one, got {list(tasks)}")
  if chunk_size is not None and (not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
    raise ValueError(f"relations tracker: chunk_size must be a positive int or None, got {chunk_size!r}")
  return Relations(int(every), float(lookahead_lr), tasks, None if chunk_size is None else int(chunk_size))


class RelationsState(NamedTuple):
  """Running sums over training, each ``(S, S)`` for the S tracked tasks (row: source ``i``, column: target ``j``)."""

  affinity: Array  # float32: Σ Z_{i→j} over the affinity steps
  affinity_count: Array  # int32: the affinity steps that measured the pair (both tasks labelled, Lⱼ > 0)
  cosine: Array  # float32: Σ cos(∇Lᵢ, ∇Lⱼ) over the steps that measured it
  cosine_count: Array  # int32
  conflicts: Array  # int32: the steps of those whose cosine was negative


def init(relations: Relations | None, num_tasks: int) -> RelationsState | dict:
  """The state before the first step: zeros (``{}`` without a tracker).

  Examples:
    >>> init(tracker(tasks=("a", "b")), 5).affinity.shape, init(None, 5)
    ((2, 2), {})
  """
  if relations is None:
    return {}
  s = num_tasks if relations.tasks is None else len(relations.tasks)
  # One array per field: a donated state must not hold one buffer twice.
  f, i = (lambda: jnp.zeros((s, s), jnp.float32)), (lambda: jnp.zeros((s, s), jnp.int32))
  return RelationsState(f(), i(), f(), i(), i())


class Lookahead(NamedTuple):
  """One measurement on one batch, over the tracked tasks."""

  affinity: Array  # (S, S): Z_{i→j}
  affinity_valid: Array  # (S, S) bool: both tasks labelled in the batch and Lⱼ > 0
  cosine: Array  # (S, S): cos(∇θₛLᵢ, ∇θₛLⱼ)
  cosine_valid: Array  # (S, S) bool: both gradients non-zero
  losses: Array  # (S,): Lⱼ(θₛ, θⱼ)
  ahead: Array  # (S, S): Lⱼ(θₛ − η∇θₛLᵢ, θⱼ)


def _global_means(ctx, sums: Array, counts: Array) -> tuple[Array, Array]:
  """``(losses, present)``: the masked means over the global batch, and which tasks have a label in it."""
  total = ctx.psum(counts)
  present = total > 0
  return ctx.psum(sums / jnp.where(present, total, 1)), present


def lookahead_affinity(
  ctx, lookahead_lr: float, sources: Sequence[int] | None = None, *, chunk_size: int | None = None
) -> Lookahead:
  """TAG's lookahead affinity ``Z_{i→j}`` (Fifty et al., NeurIPS 2021, eq. 3) on ``ctx``'s batch and parameters.

  ``θₛ − η∇θₛLᵢ`` moves the shared parameters only (``params["shared"]``);
  every task keeps its own. The losses are the step's: masked means over the
  global batch, the model in training mode on ``ctx.model_state`` (whose
  update is dropped). One forward, linearised; then, per source task ``i``, its
  gradient ``gᵢ`` (the transposed linearisation: one backward), the column
  ``⟨∇Lⱼ, gᵢ⟩`` of the Gramian (the linearisation along ``gᵢ``: one tangent
  forward, which gives the cosines without keeping the K gradients) and the
  lookahead forward. The sources go ``chunk_size`` at a time (``vmap`` within
  a chunk, a loop over chunks; ``None``: all at once): memory holds
  ``chunk_size`` gradients and lookahead forwards, not K (on XLA:CPU the
  program's temporary buffer is allocated on every call, so a large one slows
  the steps that skip the measurement too; see ``benchmarks/relations.py``).

  Args:
    ctx: a :class:`jmtl.grads.Context` (its transform is not used).
    lookahead_lr: ``η``.
    sources: the task positions to measure among (default all).
    chunk_size: source tasks per ``vmap``; ``None`` for all at once.

  Returns:
    a :class:`Lookahead` over the tasks ``sources``, in that order.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse), jmtl.Task("b", jmtl.losses.mse)]
    >>> model = jmtl.models.as_model(lambda p, x: {"a": x * p["shared"], "b": x * p["shared"]})
    >>> batch = {"inputs": jnp.ones(4), "labels": {"a": jnp.zeros(4), "b": 2 * jnp.ones(4)}}
    >>> ctx = jmtl.grads.Context(model, tasks, {"shared": 1.0, "tasks": {}}, batch, jmtl.weighting.equal(), ())
    >>> la = lookahead_affinity(ctx, 0.25)  # θ = 1; a step on a moves θ to 0.5, on b to 1.5
    >>> la.ahead.tolist(), la.affinity.tolist()  # a hurts b and b hurts a: opposite pulls
    ([[0.25, 2.25], [2.25, 0.25]], [[0.75, -1.25], [-1.25, 0.75]])
  """
  params = ctx.params
  if not isinstance(params, Mapping) or "shared" not in params or not jax.tree.leaves(params["shared"]):
    raise ValueError(
      "the lookahead affinity moves the shared parameters: params need a non-empty 'shared' part "
      f"(got {type(params).__name__} with keys {list(params) if isinstance(params, Mapping) else '-'})"
    )
  k = ctx.k
  idx = list(range(k)) if sources is None else [int(i) for i in sources]
  if not idx or any(not 0 <= i < k for i in idx):
    raise ValueError(f"lookahead_affinity: sources {idx} must be task positions in 0..{k - 1}")
  if chunk_size is not None and (not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
    raise ValueError(f"lookahead_affinity: chunk_size must be a positive int or None, got {chunk_size!r}")
  idx_a = jnp.asarray(idx)
  shared = jax.tree.map(jnp.asarray, params["shared"])

  def sums_at(s):
    sums, (counts, _) = ctx.loss_terms_of({**params, "shared": s})
    return sums, counts

  # Local loss sums, linearised once: their VJP is the transposed linearisation. Differentiated locally and summed
  # over devices after (a psum's transpose would count the devices' shares wrongly under pmap).
  sums, along, counts = jax.linearize(sums_at, shared, has_aux=True)
  back = jax.linear_transpose(along, shared)
  losses, present = _global_means(ctx, sums, counts)
  total = ctx.psum(counts)
  denom = jnp.where(total > 0, total, 1)

  def measure(i):
    cot = (jax.nn.one_hot(i, k, dtype=sums.dtype) / denom).astype(sums.dtype)  # ∂(mean Lᵢ)/∂ sums
    (g,) = back(cot)
    g = ctx.psum(g)  # the gradient of the global loss Lᵢ
    column = ctx.psum(along(g)) / denom  # ⟨∇Lⱼ, gᵢ⟩ for every j
    moved = jax.tree.map(lambda p, d: p - (lookahead_lr * d).astype(p.dtype), shared, g)
    s, c = sums_at(moved)
    return _global_means(ctx, s, c)[0][idx_a], column[idx_a]

  size = len(idx) if chunk_size is None else min(int(chunk_size), len(idx))
  ahead, columns = jax.lax.map(measure, idx_a, batch_size=size)  # (S, S) each: row i
  before = losses[idx_a]
  on = present[idx_a]
  target_ok = on & (before > 0)
  affinity = 1 - ahead / jnp.where(target_ok, before, 1)[None, :]
  affinity_valid = on[:, None] & target_ok[None, :]
  cosine, nonzero = _cosine_of_gramian(columns)
  return Lookahead(
    jnp.where(affinity_valid, affinity, 0).astype(jnp.float32),
    affinity_valid,
    cosine,
    nonzero[:, None] & nonzero[None, :] & on[:, None] & on[None, :],
    before,
    ahead,
  )


def _cosine_of_gramian(gram: Array) -> tuple[Array, Array]:
  """``(cos (S, S), nonzero (S,))`` from a Gramian whose row ``i`` is ``⟨gᵢ, gⱼ⟩`` (symmetrised: each entry is
  computed twice, in float32)."""
  gram = 0.5 * (gram + gram.T).astype(jnp.float32)
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0))
  nonzero = norms > 0
  safe = jnp.where(nonzero, norms, 1)
  cos = gram / (safe[:, None] * safe[None, :])
  return jnp.where(nonzero[:, None] & nonzero[None, :], jnp.clip(cos, -1, 1), 0), nonzero


def update(
  relations: Relations,
  state: RelationsState,
  ctx,
  *,
  step: Array,
  extra: Mapping[str, Any],
  ok: Array,
) -> RelationsState:
  """The relations state after one train step (called by :func:`jmtl.make_train_step`).

  On steps with ``step % every == 0`` the lookahead runs (:func:`lookahead_affinity`,
  under ``lax.cond``); the other steps take the branch that returns zeros.
  The cosine comes from ``extra["grad_cosine"]`` every step when the route
  computed a Gramian, else from the lookahead's gradients. Nothing is added on
  a skipped step (``ok`` false) or for a non-finite value.
  """
  idx = relations.indices(ctx.names)
  s = len(idx)
  if state.affinity.shape != (s, s):
    raise ValueError(
      f"the state's relations matrices are {state.affinity.shape}, the tracker {relations!r} measures {s} of the "
      f"step's tasks {list(ctx.names)}: create the state with the same tasks"
    )
  from_route = "grad_cosine" in extra

  def measure(_):
    la = lookahead_affinity(ctx, relations.lookahead_lr, idx, chunk_size=relations.chunk_size)
    return la.affinity, la.affinity_valid, la.cosine, la.cosine_valid

  def skip(_):
    zeros, no = jnp.zeros((s, s), jnp.float32), jnp.zeros((s, s), bool)
    return zeros, no, zeros, no

  if relations.every == 1:
    z, z_ok, cos, cos_ok = measure(None)
  else:
    # A branch, not a select: the lookahead is computed only on the steps that use it.
    z, z_ok, cos, cos_ok = jax.lax.cond(step % relations.every == 0, measure, skip, None)
  if from_route:
    ia = jnp.asarray(idx)
    cos = extra["grad_cosine"][ia][:, ia].astype(jnp.float32)
    norms = extra["grad_norm"][ia] if "grad_norm" in extra else jnp.ones((s,))
    cos_ok = (norms[:, None] > 0) & (norms[None, :] > 0)
  z_ok = z_ok & jnp.isfinite(z) & ok
  cos_ok = cos_ok & jnp.isfinite(cos) & ok
  return RelationsState(
    state.affinity + jnp.where(z_ok, z, 0),
    state.affinity_count + z_ok.astype(jnp.int32),
    state.cosine + jnp.where(cos_ok, cos, 0),
    state.cosine_count + cos_ok.astype(jnp.int32),
    state.conflicts + (cos_ok & (cos < 0)).astype(jnp.int32),
  )


def _mean(total, count) -> np.ndarray:
  total, count = np.asarray(total, np.float64), np.asarray(count)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _state_of(state) -> RelationsState:
  rs = getattr(state, "relations_state", state)
  if not isinstance(rs, RelationsState):
    raise ValueError(
      "no relations were tracked: create the state with relations=jmtl.relations.tracker(...) "
      f"(got {type(rs).__name__})"
    )
  return jax.device_get(rs)


def mean_affinity(state) -> np.ndarray:
  """The mean lookahead affinity over training, ``(S, S)`` (row: source, column: target); NaN where never measured.

  ``state`` is a :class:`jmtl.TrainState` or its :class:`RelationsState`.

  Examples:
    >>> import numpy as np
    >>> rs = RelationsState(*(np.array([[2.0, 1.0], [0.0, 0.0]]), np.array([[2, 1], [0, 0]])) * 2, np.zeros((2, 2)))
    >>> mean_affinity(rs).tolist()
    [[1.0, 1.0], [nan, nan]]
  """
  rs = _state_of(state)
  return _mean(rs.affinity, rs.affinity_count)


def mean_cosine(state) -> np.ndarray:
  """The mean task-gradient cosine over the steps that measured it, ``(S, S)``; NaN where never measured.

  Examples:
    >>> import numpy as np
    >>> rs = RelationsState(*(np.array([[2.0, -1.0], [-1.0, 2.0]]), np.array([[2, 2], [2, 2]])) * 2, np.zeros((2, 2)))
    >>> mean_cosine(rs).tolist()
    [[1.0, -0.5], [-0.5, 1.0]]
  """
  rs = _state_of(state)
  return _mean(rs.cosine, rs.cosine_count)


def conflict_rate(state) -> np.ndarray:
  """The fraction of the measured steps on which two tasks' gradients had a negative cosine, ``(S, S)``.

  Examples:
    >>> import numpy as np
    >>> z = np.zeros((2, 2))
    >>> rs = RelationsState(z, z, z, np.full((2, 2), 4), np.array([[0, 1], [1, 0]]))
    >>> conflict_rate(rs).tolist()
    [[0.0, 0.25], [0.25, 0.0]]
  """
  rs = _state_of(state)
  return _mean(rs.conflicts, rs.cosine_count)
