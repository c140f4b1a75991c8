"""``python -m mbmlib``: see :mod:`mbmlib.cli`."""
import sys

from .cli import main

sys.exit(main())
