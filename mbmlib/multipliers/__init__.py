"""The arithmetic core: the design registry, multipliers and bit-exact elementwise products (torch only).

``designs`` is the registry (one entry per design; users add theirs with
``register_design``), ``specs`` names multipliers (a design with its parameters),
``floating`` and ``integer`` are the float and integer frames (SPEC sections 1 and 4),
``table`` checks and reads lookup tables, ``evoapprox`` turns EvoApproxLib's C models into
tables, ``elementwise`` is ``approx_mul``, ``stats`` measures errors, ``cost`` gives published
hardware figures.  This package exports what users need; the kernels import the
frames' plumbing (``split_operand``, ``int_fields``, ...) from the modules themselves.
"""
from .cost import Cost, cost
from .designs import INT_BITS_RANGE, MAX_TRUNCATION, Design, register_design, registered_designs, unregister_design
from .elementwise import approx_mul, mbm_mul, mitchell_mul
from .integer import table_from_multiplier, write_csv
from .specs import Multiplier, MultiplierLike, as_multiplier
from .stats import error_map, error_stats
from .table import MAX_TABLE_BITS

__all__ = ["Design", "register_design", "unregister_design", "registered_designs", "Multiplier", "MultiplierLike",
           "as_multiplier", "approx_mul", "mbm_mul", "mitchell_mul", "error_stats", "error_map",
           "table_from_multiplier", "write_csv", "MAX_TRUNCATION", "INT_BITS_RANGE", "MAX_TABLE_BITS", "Cost", "cost"]
