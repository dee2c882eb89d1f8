"""Experiment configs for ``jmtl train --config configs/NAME.py`` (a package, so variants import the default)."""
