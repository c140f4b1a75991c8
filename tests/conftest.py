"""Shared fixtures (devices, seeded randomness, MNIST) and how pytest-xdist runs the suite (``make test``)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/scalar_model.py

from triton_backend import triton_backend  # noqa: E402

triton_backend()  # before any test module is collected: see tests/triton_backend.py

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    """Under pytest-xdist (``make test``) each worker takes its share of the cores for torch's threads: N workers
    of all the cores each would oversubscribe them.  (test_kernels_cpu sets its own thread counts.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest without it runs the suite in one process
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` with the default ``--dist load``: one test at a time to whichever worker is free, except that a test
    class goes whole to one worker, so that its class's shared, expensive fixture (a notebook pipeline, one
    search) runs once.  (pytest-xdist's own ``--dist loadgroup`` does not group under pytest 9: it renames the
    node ids through an attribute pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneTestOrOneClass(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path, *names = nodeid.split("[", 1)[0].split("::")
            return f"{path}::{names[0]}" if len(names) > 1 else nodeid

    return OneTestOrOneClass(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the tests marked slow are handed out first (the order within each kind kept), so that a run
    does not end with one worker busy on a long test it started last while the others idle."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
