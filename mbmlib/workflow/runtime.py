"""What machine this is: device, processor, library versions, Colab or not.

Recorded with every benchmark and training run so results name their runtime.
"""
from __future__ import annotations

import os
import platform
import re
import sys

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else must name a device this machine has.

    ValueError (with what to use instead) for a name torch does not know or a CUDA device that is absent.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where present)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def on_colab() -> bool:
    """True on Colab, also in kernels papermill starts there (they inherit Colab's environment)."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe(device: str | torch.device = "auto") -> dict:
    """A JSON-able description of the runtime that ``device`` lives on."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        kind = "GPU"
    else:
        name = cpu_name()
        kind = "CPU"
    return {
        "device": str(dev),
        "device_type": kind,
        "device_name": name,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "colab": on_colab(),
        "runtime": runtime_label(dev, name),
    }


def plain_name(name: str) -> str:
    """A device name without trademark signs, clock and trailing "Processor"/"CPU": ``Intel Xeon``, ``AMD EPYC 7B13``."""
    name = re.sub(r"\((r|tm)\)", "", name, flags=re.IGNORECASE)
    name = re.sub(r"\s+@.*$", "", name)
    name = re.sub(r"(\s+(processor|cpu|\d+-core))+\s*$", "", name, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", name).strip()


def runtime_label(dev: torch.device, name: str) -> str:
    """Short file-name-safe label of a runtime, e.g. ``cpu-amd-epyc``, ``cpu-intel-xeon`` or ``colab-gpu-tesla-t4``."""
    prefix = "colab-" if on_colab() else ""
    kind = "gpu" if dev.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", plain_name(name).lower()).strip("-")
    return f"{prefix}{kind}-{slug}"[:60]
