"""The research workflow on top of the core: data, models, training, benchmarks, sweeps, reports, plots.

It may import what the core may not (torchvision, pandas, matplotlib, papermill,
PyYAML); those heavy ones are imported by the modules that use them
(``report``, ``plots``, ``sweep``), so the CLI and training stay light.
Nothing in the core (``mbmlib.multipliers``, ``kernels``, ``functional``, ``nn``)
imports this package.
"""
