"""One step, three wrappers: ``jax.jit``, ``jax.pmap`` and ``jax.jit`` over a mesh.

All three give the parameters a single device would (``docs/design.md``,
"Data parallelism"):

* :func:`jit` -- one device.
* :func:`pmap` -- the classic data-parallel form. Build the step with
  ``make_train_step(..., axis_name=...)`` so counts, losses and gradients are
  summed over devices; feed it :func:`replicate`-d state and
  :func:`shard_batch`-ed batches.
* :func:`mesh_jit` -- ``jax.jit`` with a :class:`jax.sharding.Mesh` and
  ``NamedSharding``: the batch is split along its leading axis, the state is
  replicated, and XLA inserts the reductions. Build the step *without*
  ``axis_name``. This is the form that reaches several hosts after
  :func:`initialize_distributed`.

Under ``jax.distributed`` (several processes, each with its own devices) no
process can ``device_put`` onto another's devices: :func:`put_batch` and
:func:`put_replicated` build the global arrays from what each process holds
(its rows of the batch; the same replicated values everywhere), and
:func:`make_mesh` orders the devices by process so that process ``p``'s
devices hold rows ``[p B/P, (p+1) B/P)`` of every global batch -- the rows the
:mod:`jmtl.data` pipelines give process ``p``. On one process each of them is
the plain ``device_put`` it always was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

DEFAULT_AXIS = "data"


class _Donating:
  """A jitted (or pmapped) step that donates its first argument; a second use of a donated state fails in one line.

  Everything else (``lower``, ``eval_shape``, ...) is the wrapped function's.
  """

  def __init__(self, fn: Callable, kind: str):
    self._fn, self._kind = fn, kind

  def __call__(self, state, *args, **kwargs):
    try:
      return self._fn(state, *args, **kwargs)
    except (ValueError, RuntimeError) as e:
      text = str(e)
      if "deleted" not in text and "donated" not in text:
        raise
      raise ValueError(
        f"jmtl.parallel.{self._kind} donates the state it is given (its buffers are reused for the new state), and "
        "this state was given before: keep only the returned state (state, metrics = step(state, batch)), copy it "
        f"first (jax.tree.map(jnp.copy, state)), or build the step with jmtl.parallel.{self._kind}(..., "
        f"donate=False). ({type(e).__name__}: {' '.join(text.split())[:200]})"
      ) from e

  def __getattr__(self, name: str):
    return getattr(self._fn, name)


def jit(step: Callable, *, donate: bool = True) -> Callable:
  """``jax.jit(step)``, donating the state's buffers (they are replaced each step).

  With ``donate=True`` (the default: one copy of the parameters and optimizer
  state in memory, not two) the state passed in is deleted by the call:
  ``state, metrics = step(state, batch)`` is the way to call it, and the
  initial state (or parameters taken from it) cannot be used again -- reading
  it raises JAX's "Array has been deleted", passing it to the step again
  raises a ``ValueError`` that says why. Copy what you want to keep
  (``jax.tree.map(jnp.copy, state)``) or pass ``donate=False``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> f = jmtl.parallel.jit(lambda s, b: (s + b, {}), donate=False)
    >>> int(f(1, 2)[0])
    3
    >>> step = jmtl.parallel.jit(lambda s, b: (s + b, {}))
    >>> s0 = jnp.zeros(3); s1, _ = step(s0, 1.0)
    >>> s0.is_deleted(), s1.tolist()
    (True, [1.0, 1.0, 1.0])
  """
  return _Donating(jax.jit(step, donate_argnums=(0,) if donate else ()), "jit")


def pmap(step: Callable, axis_name: str = DEFAULT_AXIS, *, donate: bool = True, devices=None) -> Callable:
  """``jax.pmap(step)`` over ``axis_name`` (the step must reduce over the same name).

  ``donate`` as in :func:`jit`: by default the replicated state passed in is
  deleted by the call.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> n = jax.local_device_count()
    >>> f = jmtl.parallel.pmap(lambda s, b: (s + jax.lax.psum(b, "data"), {}), donate=False)
    >>> out, _ = f(jmtl.parallel.replicate(jnp.zeros(())), jnp.ones((n,)))
    >>> float(out[0]) == n
    True
  """
  fn = jax.pmap(step, axis_name=axis_name, donate_argnums=(0,) if donate else (), devices=devices)
  return _Donating(fn, "pmap")


def replicate(tree: Any, devices=None) -> Any:
  """Stacks each leaf once per local device, the layout :func:`pmap` expects.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> jmtl.parallel.replicate(jnp.zeros(3), devices=[None, None]).shape
    (2, 3)
  """
  n = len(jax.local_devices() if devices is None else devices)
  return jax.tree.map(lambda x: jax.numpy.stack([x] * n), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
  """Reshapes every leaf ``(B, ...)`` to ``(num_devices, B // num_devices, ...)``.

  Raises:
    ValueError: if ``B`` does not divide evenly, naming the leaf's shape.

  Examples:
    >>> import numpy as np
    >>> import jmtl
    >>> jmtl.parallel.shard_batch({"x": np.zeros((8, 3))}, 4)["x"].shape
    (4, 2, 3)
  """
  n = jax.local_device_count() if num_devices is None else num_devices

  def split(path, x):
    if x.shape[0] % n:
      raise ValueError(
        f"shard_batch: leaf {jax.tree_util.keystr(path)} of shape {tuple(x.shape)} has a batch size "
        f"that does not divide into {n} devices"
      )
    return x.reshape((n, x.shape[0] // n, *x.shape[1:]))

  return jax.tree_util.tree_map_with_path(split, batch)


def make_mesh(num_devices: int | None = None, axis_name: str = DEFAULT_AXIS) -> Mesh:
  """A 1-D data-parallel mesh over ``num_devices`` devices (all by default).

  On one process: the first ``num_devices`` devices. Under several processes:
  the first ``num_devices / process_count`` devices of every process, grouped
  by process in process order, so that process ``p`` holds the ``p``-th block
  of rows of every batch (see :func:`put_batch`).

  Raises:
    ValueError: if ``num_devices`` is not a multiple of the process count, or
      asks more devices of a process than it has.

  Examples:
    >>> import jmtl
    >>> jmtl.parallel.make_mesh(1).axis_names
    ('data',)
  """
  n = jax.device_count() if num_devices is None else num_devices
  count = jax.process_count()
  if count == 1:
    return jax.make_mesh((n,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
  per = n // count if n > 0 and n % count == 0 else 0
  by_process = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(count)]
  if not per or per > min(len(ds) for ds in by_process):
    raise ValueError(
      f"make_mesh: {n} devices do not split evenly over {count} processes with "
      f"{[len(ds) for ds in by_process]} devices each; use a multiple of {count} up to {jax.device_count()}"
    )
  devices = np.array([d for ds in by_process for d in ds[:per]])
  return Mesh(devices, (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh, axis_name: str = DEFAULT_AXIS) -> NamedSharding:
  """Splits a leaf's leading (batch) axis over ``axis_name``."""
  return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole leaf."""
  return NamedSharding(mesh, PartitionSpec())


def mesh_jit(step: Callable, mesh: Mesh, axis_name: str = DEFAULT_AXIS, *, donate: bool = True) -> Callable:
  """``jax.jit(step)`` with the state replicated and the batch split over ``mesh``.

  ``donate`` as in :func:`jit`: by default the state passed in is deleted by the call.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> mesh = jmtl.parallel.make_mesh(1)
    >>> f = jmtl.parallel.mesh_jit(lambda s, b: (s + b.sum(), {}), mesh, donate=False)
    >>> float(f(jnp.zeros(()), jnp.ones(4))[0])
    4.0
  """
  fn = jax.jit(
    step,
    in_shardings=(replicated(mesh), batch_sharding(mesh, axis_name)),
    out_shardings=(replicated(mesh), replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )
  return _Donating(fn, "mesh_jit")


def put_batch(batch: Any, mesh: Mesh, axis_name: str = DEFAULT_AXIS, *, global_batch: bool = False) -> Any:
  """Places a batch on ``mesh``, split along its leading axis; under several processes, from each one's part.

  On one process this is a ``device_put`` with the batch sharding. Under
  ``jax.distributed`` each process passes its share of the global batch:
  rows ``[p B/P, (p+1) B/P)`` for process ``p`` of ``P`` -- what the
  :mod:`jmtl.data` pipelines yield there -- and every process gets the same
  global array of ``B`` rows. With ``global_batch=True`` every process
  passes the whole global batch instead (e.g. evaluation batches, read in full)
  and puts the rows of its own devices.

  Raises:
    ValueError: under several processes, if the mesh does not give process
      ``p``'s devices its block of rows (build it with :func:`make_mesh`).

  Examples:
    >>> import numpy as np
    >>> import jmtl
    >>> mesh = jmtl.parallel.make_mesh(1)
    >>> x = jmtl.parallel.put_batch({"x": np.arange(4.0)}, mesh)["x"]
    >>> x.shape, x.sharding.spec
    ((4,), P('data',))
  """
  sharding = batch_sharding(mesh, axis_name)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  p, count = jax.process_index(), jax.process_count()

  def put(path, x):
    x = np.asarray(x)
    rows = x.shape[0] if global_batch else x.shape[0] * count
    start = 0 if global_batch else p * x.shape[0]
    shape = (rows, *x.shape[1:])
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      lo, hi, _ = index[0].indices(rows)
      if lo < start or hi > start + x.shape[0]:
        raise ValueError(
          f"put_batch: leaf {jax.tree_util.keystr(path)}: the mesh puts rows [{lo}, {hi}) of the global batch on "
          f"{device} of process {p}, which holds rows [{start}, {start + x.shape[0]}); "
          "build the mesh with jmtl.parallel.make_mesh (devices grouped by process)"
        )

    def rows_of(index):
      lo, hi, _ = index[0].indices(rows)
      return x[(slice(lo - start, hi - start), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, rows_of)

  return jax.tree_util.tree_map_with_path(put, batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """``tree`` replicated over ``mesh``; under several processes, every process passes the same values.

  On one process this is a ``device_put`` with the replicated sharding. Under
  ``jax.distributed`` each leaf becomes one global array built from this
  process's copy (``jax.make_array_from_callback``); PRNG keys stay keys, and
  a leaf already on ``mesh`` is kept (or resharded on device).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> mesh = jmtl.parallel.make_mesh(1)
    >>> jmtl.parallel.put_replicated({"w": jnp.ones(3)}, mesh)["w"].sharding.spec
    P()
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: _global_replica(x, sharding), tree)


def _global_replica(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: keep it, or reshard on device
    return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.jit(lambda a: a, out_shardings=sharding)(x)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _global_replica(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x if isinstance(x, (jax.Array, np.ndarray)) else jax.numpy.asarray(x))
  host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def is_primary() -> bool:
  """Whether this is process 0, the one that writes a run's files (always true on one process)."""
  return jax.process_index() == 0


def from_primary(value: Any) -> Any:
  """Process 0's ``value`` (a pytree of numbers or arrays), in every process; ``value`` itself on one process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return multihost_utils.broadcast_one_to_all(value)


def sync(name: str) -> None:
  """A barrier across all processes (nothing on one process); ``name`` must be the same in every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  cpu_collectives: str | None = "gloo",
) -> None:
  """Starts multi-host JAX (``jax.distributed.initialize``) before any other JAX call.

  With no arguments JAX detects the cluster (SLURM, TPU pods, ...). On CPU
  hosts, cross-process collectives need an implementation; ``"gloo"`` works on
  plain machines (and on one machine with several processes on localhost).
  ``jmtl train`` (and ``eval``, ``baselines``, ``sweep``) call it from their
  ``--coordinator``/``--num_processes``/``--process_id``/``--distributed``
  flags or ``JMTL_*`` environment variables (:mod:`jmtl.run.cli`).

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: the number of processes.
    process_id: this process's index.
    cpu_collectives: the CPU collectives implementation, or ``None`` to leave
      JAX's default.
  """
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
