"""Datasets (TFDS builders read without TensorFlow) and input pipelines.

Importing this package loads neither TensorFlow nor tensorflow_datasets; the
builders import TFDS when a dataset is first prepared or loaded.
"""

from jmtl.data import catalog
from jmtl.data import mixing
from jmtl.data import multi_digits
from jmtl.data import pipeline
from jmtl.data import qm9
from jmtl.data import synthetic
from jmtl.data._tfds import Source
from jmtl.data._tfds import default_data_dir
from jmtl.data.mixing import multi_input
from jmtl.data.mixing import task_probabilities
from jmtl.data.pipeline import ArraySource
from jmtl.data.pipeline import ReadOptions
from jmtl.data.pipeline import multi_label
from jmtl.data.pipeline import normalize_images

__all__ = [
  "ArraySource",
  "ReadOptions",
  "Source",
  "catalog",
  "default_data_dir",
  "mixing",
  "multi_digits",
  "multi_input",
  "multi_label",
  "normalize_images",
  "pipeline",
  "qm9",
  "synthetic",
  "task_probabilities",
]
