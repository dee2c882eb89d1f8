"""``python -m jmtl.run ...`` is the ``jmtl`` command (see :mod:`jmtl.run.cli`)."""

import sys

from jmtl.run.cli import main

if __name__ == "__main__":  # pytest's doctest collection imports this module too
  sys.exit(main())
