"""SchNet: continuous-filter convolutions over interatomic distances, for molecules as padded point clouds.

Schütt, Kindermans, Sauceda, Chmiela, Tkatchenko & Müller, "SchNet: A
continuous-filter convolutional neural network for modeling quantum
interactions", NeurIPS 2017 (and J. Chem. Phys. 148, 241722, 2018).

Why SchNet and not the edge-network MPNN of Gilmer et al. (ICML 2017), which
the QM9 tables of Nash-MTL (Navon et al. 2022) and FAMO (Liu et al. 2023) use
(PyTorch Geometric's ``NNConv`` edge network + GRU, 3 steps, ``Set2Set``, 64 wide,
on the complete graph with 11 atom features and bond type + distance per edge;
``AvivNavon/nash-mtl``, ``experiments/quantum_chemistry/models.py``):

* SchNet needs only atomic numbers and positions, which is what the ``graph``
  form of :mod:`jmtl.data.qm9` stores; the MPNN's inputs include bond types,
  aromaticity, hybridisation and hydrogen counts that qm9pack's files do not
  carry (PyG derives them from the bond graphs of its SDF files).
* Its filters are functions of distances only, so the model is invariant to
  rotations and translations by construction (no data augmentation).
* An edge network makes an ``F × F`` matrix per edge (``F²`` outputs per pair);
  a continuous filter makes an ``F``-vector per pair, which is far cheaper on a
  CPU at the same width.

So numbers from this model are comparable to the papers' in *protocol*
(targets, splits, standardisation, Δm% against single-task models of the same
network), not architecture-identical: absolute MAEs differ from theirs.

Dense pairs or segment sums: a molecule is a ``(29, 5)`` array of padded atom
slots (:func:`jmtl.data.qm9.pack_graph`). ``benchmarks/qm9_graph_ops.py``
measured three forms of the interactions on the same parameters: a dense
masked ``(B, 29, 29, F)`` einsum, ``jax.ops.segment_sum`` over all ``B·29·28``
slot pairs (padding weighed 0), and ``segment_sum`` over the *real* pairs only
(QM9 fills 38 % of the slot pairs). The dense einsum was the slowest here
(1.5-1.6× the all-pairs segment sum), the compact list the fastest (README,
QM9 section: the numbers and the load they were measured under). The
pipeline feeds one dense array per molecule and no edge list, so the list is
made inside the compiled step: ``jnp.nonzero(..., size=budget)`` over the pair
mask, with a fixed ``pair_budget`` (one compilation), and ``lax.cond`` falls
back to all slot pairs for a batch whose real pairs do not fit -- exact always,
fast on the batches QM9 gives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmtl.models import _common
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any

#: QM9's extensive targets (additive over the atoms, roughly, for molecules far apart): polarizability, ZPVE,
#: the four atomization energies, heat capacity. Dipole moment, HOMO, LUMO and ⟨R²⟩ are not.
QM9_EXTENSIVE = ("alpha", "zpve", "u0", "u", "h", "g", "cv")
#: Channels of the packed input: atomic number, x, y, z (Å), mask.
CHANNELS = 5


def shifted_softplus(x: Array) -> Array:
  """``softplus(x) − log 2``, SchNet's activation (0 at 0).

  >>> float(shifted_softplus(jnp.zeros(())))
  0.0
  """
  return jax.nn.softplus(x) - math.log(2.0)


def cosine_cutoff(d: Array, cutoff: float) -> Array:
  """``½(cos(π d / r_c) + 1)`` for ``d < r_c``, 0 beyond (Behler 2011): smooth to zero at the cutoff.

  >>> cosine_cutoff(jnp.array([0.0, 2.5, 5.0, 6.0]), 5.0).tolist()
  [1.0, 0.5, 0.0, 0.0]
  """
  return jnp.where(d < cutoff, 0.5 * (jnp.cos(jnp.pi * d / cutoff) + 1.0), 0.0)


def gaussian_rbf(d: Array, num: int, cutoff: float) -> Array:
  """``exp(−(d − μₖ)² / (2Δ²))`` for ``num`` centres ``μₖ`` evenly spaced on ``[0, cutoff]``, ``Δ`` their spacing.

  >>> r = gaussian_rbf(jnp.array([0.0, 1.0]), 3, 2.0)
  >>> r.shape, round(float(r[1, 1]), 6), round(float(r[1, 0]), 6)
  ((2, 3), 1.0, 0.606531)
  """
  centres = jnp.linspace(0.0, cutoff, num, dtype=d.dtype)
  width = cutoff / max(num - 1, 1)
  return jnp.exp(-0.5 * ((d[..., None] - centres) / width) ** 2)


def unpack(graph: Array) -> tuple[Array, Array, Array]:
  """``(atomic numbers (int32), positions, mask)`` of packed rows ``(..., N, 5)`` = ``(Z, x, y, z, mask)``.

  >>> z, r, m = unpack(jnp.array([[[6.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]]))
  >>> z.tolist(), r.shape, m.tolist()
  ([[6, 0]], (1, 2, 3), [[1.0, 0.0]])
  """
  return jnp.round(graph[..., 0]).astype(jnp.int32), graph[..., 1:4], graph[..., 4]


def all_pairs(batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat ``(dst, src)`` atom-slot indices of every pair ``i ≠ j`` of ``batch`` molecules of ``n`` slots.

  >>> dst, src = all_pairs(1, 3)
  >>> dst.tolist(), src.tolist()
  ([0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1])
  """
  b, i, j = np.nonzero(~np.eye(n, dtype=bool)[None].repeat(batch, 0))
  return (b * n + i).astype(np.int32), (b * n + j).astype(np.int32)


def pair_list(mask: Array, budget: int) -> tuple[Array, Array, Array, Array]:
  """The real pairs (both slots atoms, ``i ≠ j``) of a ``(B, N)`` mask, compacted into ``budget`` entries.

  Returns ``(dst, src, valid, count)``: flat slot indices, 1.0 for a real pair
  and 0.0 for filler, and the number of real pairs (when it exceeds
  ``budget`` the list is incomplete: the caller must not use it).

  >>> dst, src, valid, count = pair_list(jnp.array([[1.0, 1.0, 0.0]]), 4)
  >>> dst.tolist(), src.tolist(), valid.tolist(), int(count)
  ([0, 1, 0, 0], [1, 0, 0, 0], [1.0, 1.0, 0.0, 0.0], 2)
  """
  n = mask.shape[1]
  pair = (mask[:, :, None] > 0) & (mask[:, None, :] > 0) & ~jnp.eye(n, dtype=bool)
  flat = pair.reshape(-1)
  (index,) = jnp.nonzero(flat, size=budget, fill_value=0)
  count = jnp.sum(flat)
  valid = (jnp.arange(budget) < count).astype(mask.dtype)
  bi, rest = index // (n * n), index % (n * n)
  return (bi * n + rest // n).astype(jnp.int32), (bi * n + rest % n).astype(jnp.int32), valid, count


class Interaction(nn.Module):
  """One SchNet interaction block: ``h + MLP(cfconv(h))`` with ``cfconv`` a distance-filtered sum over neighbours.

  ``cfconv(h)ᵢ = Σⱼ Wᵢⱼ ⊙ (h Wᵢₙ)ⱼ`` over the pairs ``(i, j)`` of a pair list,
  with the filter ``Wᵢⱼ = Dense(ssp(Dense(rbf(dᵢⱼ)))) · wᵢⱼ``, where ``wᵢⱼ`` is
  the cutoff times 1 for a real pair, 0 for a padded slot or a filler entry.
  """

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, rbf: Array, weight: Array, dst: Array, src: Array) -> Array:
    """``h`` ``(A, F)`` flat atom slots; ``rbf`` ``(E, R)``, ``weight``, ``dst``, ``src`` ``(E,)`` -> ``(A, F)``."""
    dense = lambda f, name, bias=True: nn.Dense(
      f, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    filt = dense(self.features, "filter_1")(shifted_softplus(dense(self.features, "filter_0")(rbf)))
    x = dense(self.features, "in2f", bias=False)(h)
    messages = filt * weight[:, None].astype(filt.dtype) * x[src]
    conv = jax.ops.segment_sum(messages, dst, num_segments=h.shape[0])
    v = dense(self.features, "f2out_1")(shifted_softplus(dense(self.features, "f2out_0")(conv)))
    return h + v


class SchNetTrunk(nn.Module):
  """Embedding, interaction blocks, atom-wise layers and pooling: ``(B, N, 5)`` -> ``(B, 2A + 1)``.

  The output is ``[s · Σᵢ φᵢ, meanᵢ φᵢ, s · n]`` over the real atoms, with ``φᵢ`` the atom-wise output (width
  ``A = atom_features[-1]``), ``n`` the number of atoms and ``s = pool_scale``. ``compact=False`` runs the
  interactions over all ``B·N·(N−1)`` slot pairs (padding weighs 0); ``compact=True`` over the real pairs
  compacted into ``round(pair_budget · B·N·(N−1))`` entries, correct only when they fit (see :func:`schnet`).
  """

  features: int = 64
  num_interactions: int = 3
  num_rbf: int = 25
  cutoff: float = 5.0
  atom_features: tuple[int, ...] = (64,)
  pool_scale: float = 0.1
  max_atomic_number: int = 9
  pair_budget: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def budget(self, batch: int, n: int) -> int:
    """Entries of the compact pair list of ``batch`` molecules of ``n`` slots."""
    return max(1, round(self.pair_budget * batch * n * (n - 1)))

  @nn.compact
  def __call__(self, graph: Array, compact: bool = False) -> Array:
    """The pooled molecular representation of packed rows ``graph`` ``(B, N, 5)``."""
    numbers, positions, mask = unpack(graph)
    numbers = jnp.clip(numbers, 0, self.max_atomic_number)
    b, n = graph.shape[:2]
    flat_mask = mask.reshape(b * n)
    if compact:
      dst, src, valid, _ = pair_list(mask, self.budget(b, n))
    else:
      dst, src = (jnp.asarray(a) for a in all_pairs(b, n))
      valid = flat_mask[dst] * flat_mask[src]
    flat_pos = positions.reshape(b * n, 3)
    d2 = jnp.sum((flat_pos[dst] - flat_pos[src]) ** 2, axis=-1)
    d = jnp.sqrt(jnp.where(valid > 0, d2, 1.0))  # no sqrt at 0: finite gradients for padding and filler
    weight = cosine_cutoff(d, self.cutoff) * valid
    rbf = gaussian_rbf(d, self.num_rbf, self.cutoff)
    atom_mask = flat_mask[:, None]
    h = nn.Embed(self.max_atomic_number + 1, self.features, param_dtype=self.param_dtype, name="embed")(
      numbers.reshape(b * n)
    )
    h = h.astype(self.dtype or h.dtype) * atom_mask.astype(self.dtype or h.dtype)
    for i in range(self.num_interactions):
      h = Interaction(self.features, self.dtype, self.param_dtype, name=f"interaction_{i}")(h, rbf, weight, dst, src)
      h = h * atom_mask.astype(h.dtype)
    last = len(self.atom_features) - 1
    for i, f in enumerate(self.atom_features):
      h = nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=f"atom_{i}")(h)
      if i < last:
        h = shifted_softplus(h)
    phi = (h.astype(jnp.promote_types(h.dtype, jnp.float32)) * atom_mask).reshape(b, n, -1)  # pool in float32+
    count = jnp.sum(mask, axis=1, keepdims=True).astype(phi.dtype)
    total = jnp.sum(phi, axis=1)
    mean = total / jnp.maximum(count, 1.0)
    return jnp.concatenate([self.pool_scale * total, mean, self.pool_scale * count], axis=-1)


class GraphHead(nn.Module):
  """A task's linear head: on the sum-pooled part ``z[:, :width]`` (extensive) or on all of ``z``.

  An extensive head reads ``s · Σᵢ φᵢ`` only, so its prediction minus its bias
  is additive over atoms: SchNet's sum readout, the atom-wise layers shared.
  """

  features: int
  width: int
  extensive: bool
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    x = z[:, : self.width] if self.extensive else z
    return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)


def schnet(
  task_dims: Mapping[str, int],
  features: int = 64,
  num_interactions: int = 3,
  num_rbf: int = 25,
  *,
  cutoff: float = 5.0,
  atom_features: Sequence[int] = (64,),
  extensive: Sequence[str] = QM9_EXTENSIVE,
  pair_budget: float = 0.5,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """A SchNet trunk shared by all tasks and one linear head per task (hard sharing), on packed molecules.

  Inputs are float ``(B, N, 5)`` rows ``(Z, x, y, z, mask)`` (the ``graph``
  form of :mod:`jmtl.data.qm9`, ``N = 29``; any ``N`` works), positions in Å.
  The trunk embeds each atomic number (``features`` wide), runs
  ``num_interactions`` :class:`Interaction` blocks over all slot pairs with a
  ``num_rbf`` Gaussian expansion of the distance and a cosine cutoff at
  ``cutoff`` Å, then atom-wise ``Dense`` layers of widths ``atom_features``
  (shifted softplus between). Padded slots are masked everywhere: they never
  send, receive or pool, so padding and the order of the atoms do not change
  any output (``tests/test_models_graph.py``).

  ``encode`` returns ``z = [s Σᵢ φᵢ, meanᵢ φᵢ, s n]`` (width ``2A + 1``,
  ``A = atom_features[-1]``, ``s = 0.1`` keeping the sums O(1)). A task
  named in ``extensive`` has a linear head on ``s Σᵢ φᵢ`` alone, so its
  prediction minus the head's bias is a sum of per-atom terms: two copies of
  a molecule farther apart than the cutoff predict twice (the papers'
  standardised targets add a per-molecule offset, which the bias learns).
  QM9's extensive targets are ``alpha, zpve, u0, u, h, g, cv``
  (:data:`QM9_EXTENSIVE`); ``mu, homo, lumo, r2`` read all of ``z`` (mean
  pooling, sum and count). Names in ``extensive`` that are not tasks are
  ignored (a task subset).

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    features: width of the atom features and filters.
    num_interactions: interaction blocks.
    num_rbf: Gaussians of the distance expansion.
    cutoff: the cutoff radius in Å.
    atom_features: widths of the atom-wise layers after the interactions.
    extensive: tasks whose head reads the sum-pooled part only.
    pair_budget: the compact pair list holds this fraction of the batch's
      ``B·N·(N−1)`` slot pairs; a batch with more real pairs runs over all
      slot pairs instead (``lax.cond``: the result is the same, only slower).
      QM9 molecules fill 38 % of them on average (18 of 29 slots). ``0``:
      always all slot pairs.
    dtype: computation dtype of the Dense layers (``bfloat16`` on
      accelerators); distances, the filter inputs and the pooling stay in
      the input dtype (float32), so bf16 only rounds the layer products.
    param_dtype: parameter dtype (``jnp.float64`` for float64 tests).

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode`` and ``head`` (the
    separable gradient routes apply).

  Raises:
    ValueError: bad sizes, and in ``apply``/``encode`` inputs that are not
      ``(B, N, 5)``.

  >>> import jax, jax.numpy as jnp
  >>> model = schnet({"u0": 1, "homo": 1}, features=8, num_interactions=1, num_rbf=4, atom_features=(6,))
  >>> g = jnp.zeros((2, 29, 5)).at[:, :2].set(jnp.array([[6.0, 0, 0, 0, 1], [1.0, 1.1, 0, 0, 1]]))
  >>> params = model.init(jax.random.key(0), g)
  >>> params["tasks"]["u0"]["dense"]["kernel"].shape, params["tasks"]["homo"]["dense"]["kernel"].shape
  ((6, 1), (13, 1))
  >>> preds, _ = model.apply(params, g, {})
  >>> {k: v.shape for k, v in preds.items()}
  {'u0': (2, 1), 'homo': (2, 1)}
  """
  where = "schnet"
  dims = _common.validate_task_dims(task_dims, where)
  for field, value in (("features", features), ("num_interactions", num_interactions), ("num_rbf", num_rbf)):
    _common.positive_int(value, field, where, minimum=0 if field == "num_interactions" else 1)
  atom_features = _common.validate_sizes(atom_features, "atom_features", where)
  if not atom_features:
    raise ValueError(f"{where}: atom_features must name at least one layer width, got {atom_features!r}")
  if not 0 <= pair_budget <= 1:
    raise ValueError(f"{where}: pair_budget must lie in [0, 1], got {pair_budget!r}")
  if not cutoff > 0:
    raise ValueError(f"{where}: cutoff must be > 0 Å, got {cutoff!r}")
  if isinstance(extensive, str):
    raise ValueError(f"{where}: extensive must be a sequence of task names, got the string {extensive!r}")
  names = tuple(dims)
  trunk = SchNetTrunk(
    features=features,
    num_interactions=num_interactions,
    num_rbf=num_rbf,
    cutoff=float(cutoff),
    atom_features=atom_features,
    pair_budget=float(pair_budget),
    dtype=dtype,
    param_dtype=param_dtype,
  )
  width = atom_features[-1]
  heads = {
    name: GraphHead(dim, width, name in set(extensive), dtype=dtype, param_dtype=param_dtype)
    for name, dim in dims.items()
  }

  def encode(shared: Params, inputs: Array) -> Array:
    shape = tuple(jnp.shape(inputs))
    if len(shape) != 3 or shape[-1] != CHANNELS:
      raise ValueError(
        f"{where}: inputs must be packed molecules (B, N, {CHANNELS}) with rows (Z, x, y, z, mask), got shape {shape}"
      )
    variables = {"params": shared}
    if not pair_budget:
      return trunk.apply(variables, inputs)
    b, n = shape[:2]
    atoms = jnp.sum(inputs[..., 4] > 0, axis=1)
    fits = jnp.sum(atoms * (atoms - 1)) <= trunk.budget(b, n)
    return jax.lax.cond(fits, lambda: trunk.apply(variables, inputs, True), lambda: trunk.apply(variables, inputs))

  return _common.hard_sharing(names, where, trunk, heads, stateless(encode))
