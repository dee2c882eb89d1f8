"""QM9: 11 regression targets of 130,831 small molecules, from the ``qm9pack`` package (optional extra).

``pip install jmtl[qm9]``. The molecules, geometries and properties are read
from the CSV files that ``qm9pack`` bundles (``qm9pack/data/qm9_part{1,2,3}.csv``,
B3LYP/6-31G(2df,p), the 130,831 molecules that passed the consistency check of
Ramakrishnan et al., Sci. Data 2014) -- read directly, so ``qm9pack``'s own
import of ``pkg_resources`` is never needed.

Targets (the Nash-MTL / FAMO protocol: PyTorch-Geometric QM9 targets
``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]``, i.e. the HOMO-LUMO gap left out and
the four energies taken as *atomization* energies), in this order and in
these physical units:

=======  ==========================================  ===========
task     quantity                                    unit
=======  ==========================================  ===========
mu       dipole moment μ                             D
alpha    isotropic polarizability α                  a₀³
homo     ε_HOMO                                      eV
lumo     ε_LUMO                                      eV
r2       electronic spatial extent ⟨R²⟩              a₀²
zpve     zero-point vibrational energy               eV
u0       atomization internal energy at 0 K          eV
u        atomization internal energy at 298.15 K     eV
h        atomization enthalpy at 298.15 K            eV
g        atomization free energy at 298.15 K         eV
cv       heat capacity at 298.15 K                   cal/(mol K)
=======  ==========================================  ===========

Hartree energies are converted with 1 Ha = 27.211386246 eV; atomization
energies subtract the B3LYP/6-31G(2df,p) energies of the free atoms (the QM9
``atomref`` table). Every stored label is standardised with the *training*
split's mean and std; ``source.target_stats`` (also ``info.metadata``) holds
them, so that ``y * std + mean`` gives physical units (Nash-MTL reports MAE in
meV for the energies).

Splits (Nash-MTL): one permutation of the molecules with a fixed seed; the
first 10,000 are ``test``, the next 10,000 ``validation``, the remaining
110,831 ``train``.

Feature forms (configs):

* ``descriptor`` -- ``inputs`` float32 ``(34,)``: the 29 eigenvalues of the
  Coulomb matrix (Rupp et al. 2012; ``M_ii = Z_i^2.4 / 2``,
  ``M_ij = Z_i Z_j / |R_i − R_j|`` in atomic units, bohr), sorted by
  decreasing magnitude and zero-padded, then the counts of H, C, N, O, F.
* ``graph`` -- ``inputs`` float32 ``(29, 5)``, one row per atom slot packed
  as ``(Z, x, y, z, mask)`` (:func:`pack_graph`): the atomic number (as a
  float, exact), the position in Å centred on the mean atom position, and 1
  for an atom, 0 for padding (padded rows are all zero). One array per
  molecule, so the pipeline batches it like any other input;
  :func:`jmtl.models.schnet` reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np

from jmtl.data import _tfds

MAX_ATOMS = 29
HARTREE_TO_EV = 27.211386246
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
#: B3LYP/6-31G(2df,p) energies (Ha) of the free atoms for U0, U, H, G (QM9's atomref table).
ATOM_REFERENCE = {
  "H": (-0.500273, -0.498857, -0.497912, -0.510927),
  "C": (-37.846772, -37.845355, -37.844411, -37.861317),
  "N": (-54.583861, -54.582445, -54.581501, -54.598897),
  "O": (-75.064579, -75.063163, -75.062219, -75.079532),
  "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
#: task -> (CSV column, unit, conversion); ``"atomization"`` marks U0, U, H, G.
TARGETS = {
  "mu": ("Dipole_debye", "D", 1.0),
  "alpha": ("Polarizability_bohr3", "a0^3", 1.0),
  "homo": ("HOMO_au", "eV", HARTREE_TO_EV),
  "lumo": ("LUMO_au", "eV", HARTREE_TO_EV),
  "r2": ("R2_bohr2", "a0^2", 1.0),
  "zpve": ("ZPVE_au", "eV", HARTREE_TO_EV),
  "u0": ("InternalEnergy_0K_au", "eV", HARTREE_TO_EV),
  "u": ("InternalEnergy_298K_au", "eV", HARTREE_TO_EV),
  "h": ("Enthalphy_298K_au", "eV", HARTREE_TO_EV),
  "g": ("GibbsFreeEnergy_298K_au", "eV", HARTREE_TO_EV),
  "cv": ("Heatcapacity_Cv_cal_mol_K", "cal/(mol K)", 1.0),
}
_ATOMIZATION = ("u0", "u", "h", "g")
TASKS = {name: {"kind": "regression", "dim": 1} for name in TARGETS}
DESCRIPTOR_DIM = MAX_ATOMS + len(ELEMENTS)
ANGSTROM_TO_BOHR = 1.0 / 0.529177210903
#: Columns of the packed ``graph`` input: atomic number, x, y, z (Å), mask.
GRAPH_CHANNELS = ("Z", "x", "y", "z", "mask")
_SPLITS = ("train", "validation", "test")


def qm9pack_data_dir() -> str:
  """The folder of ``qm9pack``'s bundled CSV files, found without importing ``qm9pack``.

  Raises:
    ModuleNotFoundError: ``qm9pack`` is not installed (``pip install jmtl[qm9]``).

  Examples:
    >>> from jmtl.data import qm9
    >>> qm9.qm9pack_data_dir().endswith("data")  # doctest: +SKIP
    True
  """
  spec = importlib.util.find_spec("qm9pack")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("the qm9 dataset needs the optional extra: pip install 'jmtl[qm9]' (qm9pack)")
  return os.path.join(next(iter(spec.submodule_search_locations)), "data")


@functools.cache
def read_molecules(data_dir: str | None = None) -> dict[str, np.ndarray]:
  """Reads the molecules and the 11 targets in physical units (see the module doc); cached, read-only.

  Args:
    data_dir: the folder of the CSV files; default :func:`qm9pack_data_dir`.

  Returns:
    ``{"index": int32 (N,), "atomic_numbers": int32 (N, 29), "positions":
    float32 (N, 29, 3) Å, "num_atoms": int32 (N,), "targets": float64 (N, 11)}``.

  Examples:
    >>> from jmtl.data import qm9
    >>> mols = qm9.read_molecules()  # doctest: +SKIP
    >>> mols["targets"].shape  # doctest: +SKIP
    (130831, 11)
  """
  import pandas as pd

  data_dir = data_dir or qm9pack_data_dir()
  columns = ["Index", "N_atoms", "Elements", "XYZ_Ang"] + [c for c, _, _ in TARGETS.values()]
  parts = [pd.read_csv(os.path.join(data_dir, f"qm9_part{i}.csv"), usecols=columns) for i in (1, 2, 3)]
  df = pd.concat(parts, ignore_index=True)
  n = len(df)
  num_atoms = df["N_atoms"].to_numpy(np.int64)
  # All molecules at once: one flat array of symbols and one of coordinates.
  text = np.frombuffer("".join(df["Elements"]).encode(), np.uint8)
  codes = text[(text >= ord("A")) & (text <= ord("Z"))]  # QM9's elements are single capital letters
  if len(codes) != num_atoms.sum():
    raise ValueError("qm9pack's Elements column does not match N_atoms")
  lookup = np.zeros(256, np.int32)
  for e in ELEMENTS:
    lookup[ord(e)] = ATOMIC_NUMBERS[e]
  flat_numbers = lookup[codes]
  flat_xyz = np.array(",".join(df["XYZ_Ang"]).replace("[", "").replace("]", "").split(","), dtype=np.float64).reshape(
    -1, 3
  )
  molecule = np.repeat(np.arange(n), num_atoms)
  slot = np.arange(len(codes)) - np.repeat(np.cumsum(num_atoms) - num_atoms, num_atoms)
  centre = np.zeros((n, 3))
  np.add.at(centre, molecule, flat_xyz)
  centre /= num_atoms[:, None]
  numbers = np.zeros((n, MAX_ATOMS), np.int32)
  positions = np.zeros((n, MAX_ATOMS, 3), np.float32)
  numbers[molecule, slot] = flat_numbers
  positions[molecule, slot] = flat_xyz - centre[molecule]
  counts = np.stack([(numbers == ATOMIC_NUMBERS[e]).sum(axis=1) for e in ELEMENTS], axis=1).astype(np.float64)
  reference = np.array([ATOM_REFERENCE[e] for e in ELEMENTS])  # (5, 4)
  atom_energy = counts @ reference  # (N, 4): U0, U, H, G of the free atoms
  targets = np.zeros((n, len(TARGETS)))
  for j, (task, (column, _, scale)) in enumerate(TARGETS.items()):
    values = df[column].to_numpy(np.float64)
    if task in _ATOMIZATION:
      values = values - atom_energy[:, _ATOMIZATION.index(task)]
    targets[:, j] = values * scale
  out = {
    "index": df["Index"].to_numpy(np.int32),
    "atomic_numbers": numbers,
    "positions": positions,
    "num_atoms": num_atoms.astype(np.int32),
    "targets": targets,
  }
  for v in out.values():
    v.setflags(write=False)
  return out


def coulomb_descriptor(atomic_numbers: np.ndarray, positions: np.ndarray, chunk: int = 8192) -> np.ndarray:
  """Sorted Coulomb-matrix eigenvalues (29) + H/C/N/O/F counts (5) per molecule, float32 ``(N, 34)``.

  Args:
    atomic_numbers: int ``(N, 29)``, 0 for padding.
    positions: ``(N, 29, 3)`` in Å.
    chunk: molecules per batched eigen-decomposition.

  Examples:
    >>> from jmtl.data import qm9
    >>> z = np.zeros((1, 29), np.int32); z[0, :2] = [1, 1]
    >>> r = np.zeros((1, 29, 3)); r[0, 1, 0] = 0.74
    >>> d = qm9.coulomb_descriptor(z, r)
    >>> d.shape, np.round(d[0, :3], 3).tolist(), d[0, 29:].tolist()
    ((1, 34), [1.215, -0.215, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0])
  """
  n = len(atomic_numbers)
  out = np.zeros((n, DESCRIPTOR_DIM), np.float32)
  for start in range(0, n, chunk):
    z = atomic_numbers[start : start + chunk].astype(np.float64)
    r = positions[start : start + chunk].astype(np.float64) * ANGSTROM_TO_BOHR
    sq = (r**2).sum(-1)
    dist = np.sqrt(np.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * (r @ r.transpose(0, 2, 1)), 0.0))
    np.einsum("bii->bi", dist)[...] = 1.0  # the diagonal is set below
    with np.errstate(divide="ignore", invalid="ignore"):
      m = z[:, :, None] * z[:, None, :] / dist
    m = np.where(np.isfinite(m), m, 0.0)
    np.einsum("bii->bi", m)[...] = 0.5 * z**2.4
    eig = np.linalg.eigvalsh(m)
    order = np.argsort(-np.abs(eig), axis=1, kind="stable")
    out[start : start + chunk, :MAX_ATOMS] = np.take_along_axis(eig, order, axis=1)
    for j, e in enumerate(ELEMENTS):
      out[start : start + chunk, MAX_ATOMS + j] = (atomic_numbers[start : start + chunk] == ATOMIC_NUMBERS[e]).sum(1)
  return out


def split_indices(n: int, seed: int, num_validation: int = 10_000, num_test: int = 10_000) -> dict[str, np.ndarray]:
  """One permutation of ``n`` molecules: first ``num_test`` test, next ``num_validation`` validation, rest train.

  Examples:
    >>> from jmtl.data import qm9
    >>> s = qm9.split_indices(10, 0, 2, 3)
    >>> [len(s[k]) for k in ("train", "validation", "test")]
    [5, 2, 3]
  """
  perm = np.random.default_rng([seed, 9]).permutation(n)
  test, val = perm[:num_test], perm[num_test : num_test + num_validation]
  return {"train": perm[num_test + num_validation :], "validation": val, "test": test}


def _standardise(targets: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, dict[str, dict]]:
  mean = targets[train].mean(axis=0)
  std = targets[train].std(axis=0)
  stats = {
    task: {"mean": float(mean[j]), "std": float(std[j]), "unit": unit}
    for j, (task, (_, unit, _)) in enumerate(TARGETS.items())
  }
  return ((targets - mean) / std).astype(np.float32), stats


@functools.cache
def _builder_classes():
  """Defines the builder on first use: ``tensorflow_datasets`` is imported only then."""
  import tensorflow_datasets as tfds

  @dataclasses.dataclass(eq=False)
  class QM9Config(tfds.core.BuilderConfig):
    """Feature form, split sizes, seed; ``max_molecules > 0`` keeps a random subset (for tests)."""

    form: str = "descriptor"
    num_validation: int = 10_000
    num_test: int = 10_000
    seed: int = 0
    max_molecules: int = 0

  class QM9(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """QM9 from qm9pack: 11 standardised targets; Coulomb descriptor or padded graph inputs (see the module doc)."""

    name = "qm9"
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up (TFDS's lookup needs importlib_resources)
    RELEASE_NOTES = {"1.0.0": "First release."}  # noqa: RUF012
    BUILDER_CONFIGS = [  # noqa: RUF012
      QM9Config(name="descriptor", form="descriptor", description="Coulomb-matrix eigenvalues + atom counts (34,)."),
      QM9Config(name="graph", form="graph", description="Padded graphs: atomic numbers, positions (29 atoms)."),
    ]

    def _info(self):
      cfg = self.builder_config
      if cfg.form not in ("descriptor", "graph"):
        raise ValueError(f"form must be 'descriptor' or 'graph', got {cfg.form!r}")
      features = {
        "index": tfds.features.Scalar(dtype=np.int32, doc="QM9 molecule index (gdb9 number)"),
        "targets": tfds.features.Tensor(shape=(len(TARGETS),), dtype=np.float32),
      }
      if cfg.form == "descriptor":
        features["descriptor"] = tfds.features.Tensor(shape=(DESCRIPTOR_DIM,), dtype=np.float32)
      else:
        features["atomic_numbers"] = tfds.features.Tensor(shape=(MAX_ATOMS,), dtype=np.int32)
        features["positions"] = tfds.features.Tensor(shape=(MAX_ATOMS, 3), dtype=np.float32)
      return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        citation="Ramakrishnan, Dral, Rupp & von Lilienfeld, Sci. Data 1, 140022 (2014).",
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      cfg = self.builder_config
      mols = read_molecules()
      n = len(mols["index"])
      if cfg.max_molecules:
        keep = np.random.default_rng([cfg.seed, 3]).permutation(n)[: cfg.max_molecules]
        mols = {k: v[keep] for k, v in mols.items()}
        n = len(keep)
      if n <= cfg.num_validation + cfg.num_test:
        raise ValueError(f"{n} molecules leave no training split with {cfg.num_validation} + {cfg.num_test} held out")
      splits = split_indices(n, cfg.seed, cfg.num_validation, cfg.num_test)
      targets, stats = _standardise(mols["targets"], splits["train"])
      self.info.metadata["target_stats"] = stats
      self.info.metadata["tasks"] = list(TARGETS)
      arrays = {"index": mols["index"], "targets": targets}
      if cfg.form == "descriptor":
        arrays["descriptor"] = coulomb_descriptor(mols["atomic_numbers"], mols["positions"])
      else:
        arrays["atomic_numbers"] = mols["atomic_numbers"]
        arrays["positions"] = mols["positions"]
      return {split: self._generate_examples(arrays, splits[split]) for split in _SPLITS}

    def _generate_examples(self, arrays, rows):
      for key, i in enumerate(rows):
        yield key, {k: v[i] for k, v in arrays.items()}

  return _tfds.publish(__name__, QM9Config=QM9Config, QM9=QM9)


# The builder classes are made on first access, so importing this module loads no TFDS.
__getattr__ = _tfds.lazy_classes(__name__, _builder_classes)


def prepare(data_dir: str | None = None, config: str | None = None, **overrides):
  """Builds QM9 offline from ``qm9pack``'s files and returns its builder; reuses prepared files.

  Args:
    data_dir: root of prepared datasets; default :func:`jmtl.data._tfds.default_data_dir`.
    config: ``"descriptor"`` (default) or ``"graph"``.
    **overrides: ``num_validation``, ``num_test``, ``seed``, ``max_molecules``.

  Examples:
    >>> from jmtl.data import qm9
    >>> b = qm9.prepare(config="graph")  # doctest: +SKIP
    >>> b.info.splits["train"].num_examples  # doctest: +SKIP
    110831
  """
  qm9pack_data_dir()  # fail early, with the install hint, when the extra is missing
  return _tfds.prepare_builder(_builder_classes()["QM9"], data_dir, config, **overrides)


def pack_graph(atomic_numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Packs padded molecules into float32 ``(..., 29, 5)`` rows ``(Z, x, y, z, mask)``; padded rows are all zero.

  Args:
    atomic_numbers: int ``(..., 29)``, 0 for padding.
    positions: ``(..., 29, 3)`` in Å.

  Raises:
    ValueError: shapes that do not match, or a padded slot with a non-zero position.

  Examples:
    >>> from jmtl.data import qm9
    >>> z = np.array([6, 1] + [0] * 27); r = np.zeros((29, 3)); r[1, 0] = 1.09
    >>> g = qm9.pack_graph(z, r)
    >>> g.shape, g.dtype, g[1].tolist()
    ((29, 5), dtype('float32'), [1.0, 1.090000033378601, 0.0, 0.0, 1.0])
  """
  numbers = np.asarray(atomic_numbers)
  positions = np.asarray(positions)
  if numbers.shape[-1:] != (MAX_ATOMS,) or positions.shape != (*numbers.shape, 3):
    raise ValueError(
      f"pack_graph: atomic_numbers {numbers.shape} must be (..., {MAX_ATOMS}) and positions {positions.shape} "
      f"(..., {MAX_ATOMS}, 3) with the same leading shape"
    )
  mask = numbers > 0
  if np.any(positions[~mask] != 0):
    raise ValueError("pack_graph: a padded atom slot (atomic number 0) has a non-zero position")
  return np.concatenate([numbers[..., None], positions, mask[..., None]], axis=-1).astype(np.float32)


def to_example(features, form: str = "descriptor") -> dict:
  """Stored features -> ``{"inputs": ..., "labels": {task: float32 scalar}}`` (standardised targets).

  Examples:
    >>> from jmtl.data import qm9
    >>> f = {"targets": np.arange(11, dtype=np.float32), "atomic_numbers": np.array([6, 1] + [0] * 27),
    ...      "positions": np.zeros((29, 3), np.float32)}
    >>> ex = qm9.to_example(f, "graph")
    >>> ex["labels"]["cv"], ex["inputs"].shape, ex["inputs"][:3, 4].tolist()
    (array(10., dtype=float32), (29, 5), [1.0, 1.0, 0.0])
  """
  targets = np.asarray(features["targets"], np.float32)
  labels = {task: _tfds.as_scalar(targets[j], np.float32) for j, task in enumerate(TARGETS)}
  if form == "descriptor":
    return {"inputs": np.asarray(features["descriptor"], np.float32), "labels": labels}
  return {"inputs": pack_graph(features["atomic_numbers"], features["positions"]), "labels": labels}


def load(split: str, data_dir: str | None = None, config: str | None = None, **overrides) -> _tfds.Source:
  """Prepares QM9 if needed and returns one split; ``source.target_stats`` un-standardises predictions.

  Args:
    split: ``"train"``, ``"validation"`` or ``"test"``.
    data_dir: root of prepared datasets.
    config: ``"descriptor"`` (default) or ``"graph"``.
    **overrides: see :func:`prepare`.

  Returns:
    A :class:`jmtl.data._tfds.Source` with ``target_stats`` task ->
    ``{"mean", "std", "unit"}`` (training statistics, physical units).

  Examples:
    >>> from jmtl.data import qm9
    >>> src = qm9.load("test")  # doctest: +SKIP
    >>> src[0]["inputs"].shape, len(src.tasks), src.target_stats["homo"]["unit"]  # doctest: +SKIP
    ((34,), 11, 'eV')
  """
  builder = prepare(data_dir, config, **overrides)
  form = builder.builder_config.form
  stats = _tfds.info_metadata(builder)["target_stats"]
  return _tfds.load_source(builder, split, functools.partial(to_example, form=form), TASKS, target_stats=stats)
