"""Shared fixtures: the devices to run on and seeded randomness."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/scalar_model.py

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test on the CPU everywhere and on CUDA where present."""
    return torch.device(request.param)


@pytest.fixture
def backend(request, monkeypatch):
    """A backend name (parametrize with ``indirect=True``); "triton" runs on CUDA, else in the interpreter."""
    if request.param == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _evoapprox_env_restored(monkeypatch):
    """``cli.main(["--evoapprox-dir", D, ...])`` exports MBMLIB_EVOAPPROX for the processes a command starts; in
    the test process it would leak into later tests (and their notebook kernels).  Recording the variable here
    makes monkeypatch restore it after every test."""
    monkeypatch.setenv("MBMLIB_EVOAPPROX", os.environ.get("MBMLIB_EVOAPPROX", ""))
    if not os.environ["MBMLIB_EVOAPPROX"]:
        monkeypatch.delenv("MBMLIB_EVOAPPROX")


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A torchvision-style root with the repo's MNIST subset (.gz only), so loading never writes into tests/data."""
    import shutil
    from pathlib import Path

    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (Path(__file__).parent / "data" / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    return root
