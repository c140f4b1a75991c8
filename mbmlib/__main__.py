"""``python -m mbmlib``: the command line of :mod:`mbmlib.workflow.cli`."""
import sys

from .workflow.cli import main

sys.exit(main())
