"""The arithmetic core: multiplier specs and bit-exact elementwise products (torch only).

``specs`` names the multipliers, ``floating`` computes float32 products bit for
bit (SPEC section 1), ``integer`` and ``table`` the integer and lookup-table
multipliers (section 4), ``stats`` measures their error.
"""
from . import floating, integer, specs, stats, table
from .floating import *  # noqa: F401,F403  (each module's __all__ is this package's face)
from .integer import *  # noqa: F401,F403
from .specs import *  # noqa: F401,F403
from .stats import *  # noqa: F401,F403
from .table import *  # noqa: F401,F403

__all__ = specs.__all__ + floating.__all__ + integer.__all__ + table.__all__ + stats.__all__
