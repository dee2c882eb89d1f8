"""Datasets (TFDS builders read without TensorFlow) and input pipelines.

Importing this package loads neither TensorFlow nor tensorflow_datasets; the
builders import TFDS when a dataset is first prepared or loaded.
"""

from jmtl.data import multi_digits
from jmtl.data import qm9
from jmtl.data import synthetic
from jmtl.data._tfds import Source
from jmtl.data._tfds import default_data_dir

__all__ = ["Source", "default_data_dir", "multi_digits", "qm9", "synthetic"]
