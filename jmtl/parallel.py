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


def jit(step: Callable, *, donate: bool = True) -> Callable:
  """``jax.jit(step)``, donating the state's buffers (they are replaced each step).

  Examples:
    >>> import jmtl
    >>> f = jmtl.parallel.jit(lambda s, b: (s + b, {}), donate=False)
    >>> int(f(1, 2)[0])
    3
  """
  return jax.jit(step, donate_argnums=(0,) if donate else ())


def pmap(step: Callable, axis_name: str = DEFAULT_AXIS, *, donate: bool = True, devices=None) -> Callable:
  """``jax.pmap(step)`` over ``axis_name`` (the step must reduce over the same name).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> n = jax.local_device_count()
    >>> f = jmtl.parallel.pmap(lambda s, b: (s + jax.lax.psum(b, "data"), {}), donate=False)
    >>> out, _ = f(jmtl.parallel.replicate(jnp.zeros(())), jnp.ones((n,)))
    >>> float(out[0]) == n
    True
  """
  return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,) if donate else (), devices=devices)


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
  """A 1-D data-parallel mesh over the first ``num_devices`` devices (all by default).

  Examples:
    >>> import jmtl
    >>> jmtl.parallel.make_mesh(1).axis_names
    ('data',)
  """
  n = jax.device_count() if num_devices is None else num_devices
  return jax.make_mesh((n,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def batch_sharding(mesh: Mesh, axis_name: str = DEFAULT_AXIS) -> NamedSharding:
  """Splits a leaf's leading (batch) axis over ``axis_name``."""
  return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole leaf."""
  return NamedSharding(mesh, PartitionSpec())


def mesh_jit(step: Callable, mesh: Mesh, axis_name: str = DEFAULT_AXIS, *, donate: bool = True) -> Callable:
  """``jax.jit(step)`` with the state replicated and the batch split over ``mesh``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> mesh = jmtl.parallel.make_mesh(1)
    >>> f = jmtl.parallel.mesh_jit(lambda s, b: (s + b.sum(), {}), mesh, donate=False)
    >>> float(f(jnp.zeros(()), jnp.ones(4))[0])
    4.0
  """
  return jax.jit(
    step,
    in_shardings=(replicated(mesh), batch_sharding(mesh, axis_name)),
    out_shardings=(replicated(mesh), replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )


def put_batch(batch: Any, mesh: Mesh, axis_name: str = DEFAULT_AXIS) -> Any:
  """Places a global batch on ``mesh``; on several hosts, builds it from each host's part.

  On one process this is a ``device_put`` with the batch sharding. Under
  ``jax.distributed``, each process passes its own slice of the global batch
  and gets one global array.
  """
  sharding = batch_sharding(mesh, axis_name)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


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
