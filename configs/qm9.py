"""QM9: 11 regression targets from Coulomb-matrix descriptors, a hard-sharing MLP (needs ``pip install 'jmtl[qm9]'``).

Command (the first run builds the dataset from the ``qm9pack`` CSVs)::

  jmtl train --config configs/qm9.py --workdir /tmp/qm9

Targets are standardised for training; the table reports each task's MAE in
its physical unit (``source.target_stats``: D, a₀³, eV, a₀², cal/(mol K)).
Model selection uses the mean validation loss (the MAEs have different
units). This is a small descriptor model for the runner, not the papers'
graph network, so its MAEs are far from the published ones.

Measured on this machine (2 shared CPU cores, load average ~4), 135 s wall
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


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.dataset.name = "qm9"
  config.dataset.config = "descriptor"
  config.dataset.standardize_inputs = True  # Coulomb eigenvalues span two orders of magnitude
  config.model.name = "mlp"
  config.model.mlp.hidden = (256, 256)
  config.num_steps = 3000
  config.batch_size = 128
  config.eval_batch_size = 2000
  config.select_metric = "loss"
  return config
