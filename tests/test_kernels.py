"""Backend selection, the reference's memory chunking, the compiled backend's fallback."""
import warnings

import pytest
import torch

from mbmlib import kernels
from mbmlib.kernels import compiled, fallback, lowering, reference
from mbmlib.multipliers import as_multiplier


def test_auto_picks_compiled_on_cpu_and_env_overrides(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve(None, torch.device("cpu")) == "compiled"
    assert kernels.resolve("auto", torch.device("cpu")) == "compiled"
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.resolve(None, torch.device("cpu")) == "reference"
    assert kernels.resolve("compiled", torch.device("cpu")) == "compiled"  # an explicit argument wins
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="valid backends"):
        kernels.resolve(None, torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernels.resolve("triton", torch.device("cpu"))


@pytest.mark.parametrize("budget", [64, 4096, 10**6])
def test_reference_chunking_gives_the_same_result(budget):
    a, b = torch.randn(2, 37, 53), torch.randn(2, 11, 53)
    mult = as_multiplier("mbm")
    whole = reference.bmm_nt(a, b, mult)
    chunked = reference.bmm_nt(a, b, mult, memory_budget=budget)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)


def test_compiled_matches_reference_on_a_seednet_sized_gemm():
    a, b = torch.randn(1, 300, 288), torch.randn(1, 64, 288)
    for name in ("mbm", "mitchell"):
        mult = as_multiplier(name)
        torch.testing.assert_close(compiled.bmm_nt(a, b, mult), reference.bmm_nt(a, b, mult),
                                   rtol=1e-5, atol=1e-4)


def test_compiled_falls_back_to_reference_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler found")

    def no_native(capability=None):
        raise compiled.cpu_native.BuildError("c++ not found")

    monkeypatch.setattr(compiled, "_kernel", broken)
    monkeypatch.setattr(compiled.cpu_native, "library", no_native)
    monkeypatch.setattr(fallback, "_REASONS", {})  # this test's failures stay in it
    a, b = torch.randn(1, 5, 7), torch.randn(1, 3, 7)
    mult = as_multiplier("mbm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compiled.bmm_nt(a, b, mult)
        second = compiled.bmm_nt(a, b, mult)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0] and "reference" in messages[0]
    assert torch.equal(first, reference.bmm_nt(a, b, mult)) and torch.equal(second, first)


def test_im2col_col2im_are_adjoint():
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    args = ((3, 2), (2, 1), (1, 1), (1, 2), 2)
    cols = lowering.im2col(x, *args)
    y = torch.randn_like(cols)
    back = lowering.col2im(y, x.shape, *args)
    # <im2col(x), y> == <x, col2im(y)>
    torch.testing.assert_close((cols * y).sum(), (x * back).sum())
