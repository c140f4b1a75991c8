"""mbmlib.workflow.runtime: device resolution and the runtime labels results are named by."""
import pytest
import torch

from mbmlib.workflow.report import runtime_name
from mbmlib.workflow.runtime import resolve_device, runtime_label


@pytest.mark.parametrize("name, label", [
    ("AMD EPYC", "cpu-amd-epyc"),
    ("Intel(R) Xeon(R) Processor", "cpu-intel-xeon"),
    ("AMD EPYC 7B13 64-Core Processor", "cpu-amd-epyc-7b13"),
    ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "cpu-intel-core-i7-8700"),
])
def test_cpu_labels_are_file_name_safe_without_trademark_signs(name, label):
    assert runtime_label(torch.device("cpu"), name) == label


def test_gpu_labels_say_gpu(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert runtime_label(torch.device("cuda"), "NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"


def test_a_bad_device_is_a_value_error_naming_what_to_use():
    with pytest.raises(ValueError, match="use cpu, cuda"):
        resolve_device("foo")


def test_runtime_names_in_figures_are_plain():
    assert runtime_name({"device_name": "Intel(R) Xeon(R) Processor", "device_type": "CPU"}) == "Intel Xeon CPU"
    assert runtime_name({"device_name": "Tesla T4", "device_type": "GPU", "colab": True}) == "Tesla T4 (Colab)"
