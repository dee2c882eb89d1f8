"""Experiment configs: ``jmtl train --config NAME`` (installed as ``jmtl.configs``) or ``--config configs/NAME.py``.

A package, so variants import the default: ``from jmtl.configs import multi_digits``.
"""
