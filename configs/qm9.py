"""QM9: 11 regression targets; a descriptor MLP (default) or SchNet on graphs (needs ``pip install 'jmtl[qm9]'``).

Variants (``--config qm9:VARIANT``, big_vision's ``get_config(variant)``):

* ``descriptor`` (the default, ``--config qm9``): a hard-sharing MLP on
  Coulomb-matrix eigenvalues and atom counts; a quick model for the runner,
  not the papers' network, so its MAEs are far from the published ones.
* ``descriptor_reduced``: the descriptor MLP on the subset and budget of
  ``graph_reduced`` (its single-task models are the README's comparison).
* ``graph``: the protocol of Nash-MTL (Navon et al., ICML 2022, Appendix /
  ``experiments/quantum_chemistry``) and FAMO (Liu et al., NeurIPS 2023): the 11
  targets in their order (μ, α, ε_HOMO, ε_LUMO, ⟨R²⟩, ZPVE, U0, U, H, G, c_v),
  standardised with training statistics; one random split into 110,831 train
  / 10,000 validation / 10,000 test molecules; Adam at lr 1e-3, batch 120, 300
  epochs (277,200 steps); validation every epoch, and the test MAEs of the
  epoch with the best validation loss (model selection on validation only).
  The papers decay the learning rate with ReduceLROnPlateau (factor 0.7,
  patience 5 epochs, floor 1e-5) on the validation loss; the runner has no
  plateau schedule, so this uses the nearest it has, cosine decay over the
  run (also ending near zero). The network is SchNet
  (:func:`jmtl.models.schnet`), not their PyG edge-network MPNN: see that
  module's doc; numbers are comparable in protocol, not architecture-identical.
* ``graph_reduced``: the same on a CPU budget: a random subset of 12,000
  molecules (10,000 train / 1,000 validation / 1,000 test), SchNet with 32
  features, 2 interactions, 16 RBFs, batch 32 for 1,000 steps (3.2 epochs,
  cosine), validation every 250 steps. The README's QM9 section has its
  table.

Command (the first run builds the dataset from the ``qm9pack`` CSVs)::

  jmtl train --config qm9 --workdir /tmp/qm9                        # descriptor
  jmtl train --config qm9:graph_reduced --workdir /tmp/qm9g           # SchNet, minutes on a CPU
  python -m benchmarks.qm9_protocol --methods equal,famo,nash_mtl   # the full protocol, papers' table

Targets are standardised for training; the table reports each task's MAE in
its physical unit (``source.target_stats``: D, a₀³, eV, a₀², cal/(mol K)).
Model selection uses the mean validation loss (the MAEs have different
units).

Measured for ``descriptor`` on this machine (2 shared CPU cores, load average ~4), 135 s wall
with QM9 already prepared (a one-off from the qm9pack CSVs), 11 single-task
baselines included::

  task    metric              single-task   MTL (equal)   negative transfer
  mu      mae (D)                  0.7323        0.7353                 yes
  alpha   mae (a0^3)               1.1465        1.2156                 yes
  homo    mae (eV)                 0.2774        0.2819                 yes
  lumo    mae (eV)                 0.5052        0.5102                 yes
  r2      mae (a0^2)              56.3540       59.3997                 yes
  zpve    mae (eV)                 0.0276        0.0368                 yes
  u0      mae (eV)                 0.5750        0.6054                 yes
  u       mae (eV)                 0.5696        0.5853                 yes
  h       mae (eV)                 0.5424        0.6002                 yes
  g       mae (eV)                 0.5653        0.5928                 yes
  cv      mae (cal/(mol K))        0.7101        0.7224                 yes

  Δm% = -6.64   (test split; model of step 3000, best validation loss; 1.79 ms/step; 0 non-finite steps skipped)
"""

import ml_collections

from jmtl.configs import multi_digits

VARIANTS = ("descriptor", "descriptor_reduced", "graph", "graph_reduced")
#: The papers' split: 130,831 molecules, 10,000 test, 10,000 validation, 110,831 train.
PAPER_TRAIN = 110_831
PAPER_BATCH = 120
PAPER_EPOCHS = 300
#: graph_reduced / descriptor_reduced: a random subset and its split.
REDUCED = dict(max_molecules=12_000, num_validation=1_000, num_test=1_000)
REDUCED_BATCH = 32
REDUCED_STEPS = 1000


def get_config(variant: str = "descriptor") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"qm9 config: unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
  config = multi_digits.get_config()
  config.dataset.name = "qm9"
  config.select_metric = "loss"
  config.model.schnet = ml_collections.ConfigDict(
    dict(features=64, num_interactions=3, num_rbf=25, cutoff=5.0, atom_features=(64,), pair_budget=0.5)
  )
  if variant.startswith("descriptor"):
    config.dataset.config = "descriptor"
    config.dataset.standardize_inputs = True  # Coulomb eigenvalues span two orders of magnitude
    config.model.name = "mlp"
    config.model.mlp.hidden = (256, 256)
    config.num_steps = 3000
    config.batch_size = 128
    config.eval_batch_size = 2000
    if variant == "descriptor_reduced":  # graph_reduced's molecules, split, batch size and steps
      config.dataset.options = ml_collections.ConfigDict(REDUCED)
      config.batch_size = REDUCED_BATCH
      config.num_steps = REDUCED_STEPS
      config.eval_every = 250
      config.checkpoint_every = 250
    return config
  config.dataset.config = "graph"
  config.model.name = "schnet"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"  # the papers: ReduceLROnPlateau(0.7, patience 5); see the module doc
  if variant == "graph":
    steps_per_epoch = -(-PAPER_TRAIN // PAPER_BATCH)  # 924
    config.batch_size = PAPER_BATCH
    config.num_steps = PAPER_EPOCHS * steps_per_epoch
    config.eval_every = steps_per_epoch  # validate every epoch, select on it
    config.checkpoint_every = steps_per_epoch
    config.log_every = steps_per_epoch // 7  # 132: a divisor of the epoch
    config.eval_batch_size = 1000
    return config
  config.dataset.options = ml_collections.ConfigDict(REDUCED)
  config.model.schnet.update(dict(features=32, num_interactions=2, num_rbf=16, atom_features=(32,)))
  config.batch_size = REDUCED_BATCH
  config.num_steps = REDUCED_STEPS
  config.eval_every = 250
  config.checkpoint_every = 250
  config.eval_batch_size = 500
  return config
