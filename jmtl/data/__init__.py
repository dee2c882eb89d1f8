"""Datasets and input pipelines."""

from jmtl.data import synthetic

__all__ = ["synthetic"]
