"""jmtl's TFDS builders, registered with TFDS by name: ``import jmtl.data.builders`` (imports tensorflow_datasets).

After the import, ``multi_digits``, ``synthetic`` and ``qm9`` are datasets of
the TFDS registry like any community dataset::

  import tensorflow_datasets as tfds
  import jmtl.data.builders  # noqa: F401

  tfds.builder("synthetic/regression_k3").info.splits          # the configs of jmtl.data.synthetic
  tfds.data_source("multi_digits", split="test")               # prepared on first use, array_record, no TensorFlow

The registered classes are subclasses of the builders that
``jmtl.data.<name>.prepare``/``load`` use, with the same name, versions,
configs and files; they read and write jmtl's data directory
(:func:`jmtl.data.default_data_dir`, ``$JMTL_DATA_DIR``) unless given a
``data_dir``, so TFDS and ``jmtl.data.<name>.load`` share the prepared sets,
and they write array_record unless given another ``file_format`` (TFDS's
default, tfrecord, needs TensorFlow).
A config prepared with overrides (``synthetic.load(..., num_train=500)``) is
stored under ``<config>_custom_<digest>``; TFDS reads it by that name from its
files (``tfds.data_source("synthetic/classification_k3_custom_...",
data_dir=...)``).

``tfds build`` finds them with ``--imports``::

  tfds build multi_digits --imports jmtl.data.builders --file_format array_record

(the ``tfds`` command itself imports TensorFlow; preparing from Python, as
above or through ``jmtl.data.<name>.prepare``, does not).

``qm9`` is jmtl's QM9 (qm9pack targets, Coulomb descriptor or padded graphs,
:mod:`jmtl.data.qm9`): after this import it takes the name ``qm9`` in the
process, in place of TFDS's own catalog ``qm9`` (a different encoding of the
same molecules). If TFDS's own was loaded first, jmtl's is left unregistered
(a warning says so) and stays reachable through :mod:`jmtl.data.qm9`.

``import jmtl`` and ``import jmtl.data`` do not import this module (nor TFDS).
"""

from __future__ import annotations

import warnings

import tensorflow_datasets as tfds

from jmtl.data import _tfds
from jmtl.data import multi_digits
from jmtl.data import qm9
from jmtl.data import synthetic

__all__ = ["QM9", "MultiDigits", "Synthetic", "default_data_dir", "registered"]

default_data_dir = _tfds.default_data_dir


def _defaults(data_dir, kwargs: dict) -> dict:
  """jmtl's data dir and array_record (readable without TensorFlow) unless given."""
  if kwargs.get("file_format") is None:
    kwargs["file_format"] = _tfds.FILE_FORMAT
  return {"data_dir": data_dir or _tfds.default_data_dir(), **kwargs}


class MultiDigits(multi_digits.MultiDigits):
  """:class:`jmtl.data.multi_digits.MultiDigits`, registered as ``multi_digits``."""

  name = "multi_digits"

  def __init__(self, *, data_dir=None, **kwargs):
    super().__init__(**_defaults(data_dir, kwargs))


class Synthetic(synthetic.Synthetic):
  """:class:`jmtl.data.synthetic.Synthetic`, registered as ``synthetic``."""

  name = "synthetic"

  def __init__(self, *, data_dir=None, **kwargs):
    super().__init__(**_defaults(data_dir, kwargs))


try:

  class QM9(qm9.QM9):
    """:class:`jmtl.data.qm9.QM9`, registered as ``qm9``."""

    name = "qm9"

    def __init__(self, *, data_dir=None, **kwargs):
      super().__init__(**_defaults(data_dir, kwargs))

except ValueError as e:  # "Dataset with name qm9 already registered": TFDS's own was loaded first
  QM9 = None
  warnings.warn(
    f"jmtl.data.builders: jmtl's qm9 is not registered with TFDS ({e}); use jmtl.data.qm9.load", stacklevel=2
  )


def registered() -> list[str]:
  """The names this module registered with TFDS.

  Examples:
    >>> sorted(registered())  # doctest: +SKIP
    ['multi_digits', 'qm9', 'synthetic']
  """
  return [c.name for c in (MultiDigits, Synthetic, QM9) if c is not None and tfds.builder_cls(c.name) is c]
