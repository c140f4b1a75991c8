"""mbmlib: train and evaluate neural networks with bit-exact approximate multipliers.

The Minimally Biased Multiplier (MBM, Saadat et al., TCAD 2018) and Mitchell's
logarithmic multiplier as vectorised PyTorch ops, approximate Conv2d/Linear
layers and attention on fused CPU and GPU kernels, and an MNIST training pipeline.

Two layers: the core (``multipliers`` -> ``kernels`` -> ``functional`` -> ``nn``)
imports torch only; ``mbmlib.workflow`` (data, models, training, benchmarks,
sweeps, reports, plots) builds on it and is not imported here.
"""
from .multipliers import (
    Cost,
    Multiplier,
    approx_mul,
    as_multiplier,
    cost,
    error_map,
    error_stats,
    mbm_mul,
    mitchell_mul,
    register_design,
    registered_designs,
    table_from_multiplier,
    unregister_design,
    write_csv,
)

__version__ = "0.1.0"

__all__ = [
    "Cost",
    "Multiplier",
    "approx_mul",
    "as_multiplier",
    "cost",
    "error_map",
    "error_stats",
    "mbm_mul",
    "mitchell_mul",
    "register_design",
    "registered_designs",
    "table_from_multiplier",
    "unregister_design",
    "write_csv",
    "__version__",
]

from . import functional, kernels, nn, quant  # noqa: E402  (layers build on the multipliers above)
from .nn import (  # noqa: E402
    ApproxMatmul,
    ApproxMultiheadAttention,
    MBMConv2d,
    MBMLinear,
    NotConvertedWarning,
    approximable_layers,
    convert,
)
from .quant import MatmulQuantSpec, QuantSpec, calibrate  # noqa: E402
from .energy import layer_macs, model_energy  # noqa: E402

__all__ += ["functional", "kernels", "nn", "quant", "MBMConv2d", "MBMLinear", "ApproxMatmul",
            "ApproxMultiheadAttention", "NotConvertedWarning", "approximable_layers", "convert", "QuantSpec",
            "MatmulQuantSpec", "calibrate", "layer_macs", "model_energy"]
from .approximate import approximate  # noqa: E402  (a torch function mode over the functional ops)

__all__ += ["approximate"]
