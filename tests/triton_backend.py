"""The Triton backend for the tests: on CUDA as it is, on the CPU in Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when ``triton`` itself is first imported (its standard library is
decorated then) and when a kernel is decorated, and once more at the first launch (a lazy import).
Importing triton inside a fixture, or even while a test module is collected, would come too late:
importing ``torch._dynamo`` (torch.compile, transformers) imports triton as a side effect.  So
conftest.py calls :func:`triton_backend` as it loads, before any test module is collected (in every
pytest-xdist worker too), and the test modules call it again (cached).  It imports the backend with the
flag set only for the duration of that import and restored right after: the tests see an unchanged
environment (``mbmlib.kernels.resolve`` still refuses backend="triton" on the CPU), only the
process-wide ``triton`` module is the interpreter flavour, which nothing else uses on a CPU-only
machine.  If triton was imported before in a CPU-only process, the Triton tests are skipped with the
reason.
"""
import functools
import importlib
import os
import sys

import pytest
import torch


@functools.lru_cache(maxsize=None)
def triton_backend():
    """(module, None), or (None, why it cannot be tested here)."""
    if torch.cuda.is_available():
        try:
            return importlib.import_module("mbmlib.kernels.triton"), None
        except ImportError as err:
            return None, f"triton backend not importable: {err}"
    loaded = sys.modules.get("mbmlib.kernels.triton")
    if loaded is not None:
        return (loaded, None) if loaded.INTERPRET else (None, "mbmlib.kernels.triton was imported without "
                                                              "TRITON_INTERPRET=1; run this file on its own")
    if "triton" in sys.modules:
        return None, "triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton")
        try:  # imported lazily at the first launch, where it also needs the flag
            importlib.import_module("triton.experimental.gluon")
        except ImportError:
            pass
        return importlib.import_module("mbmlib.kernels.triton"), None
    except ImportError as err:
        return None, f"triton backend not importable: {err}"
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def every_backend() -> list:
    """The backends a conformance test runs on: reference, compiled, and triton (on CUDA, else in the
    interpreter; skipped with the reason where it cannot run), for the ``backend`` fixture of conftest.py."""
    module, why = triton_backend()
    return ["reference", "compiled", pytest.param("triton", marks=pytest.mark.skipif(module is None, reason=why or ""))]
