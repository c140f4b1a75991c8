"""The MNIST models, built from approximate layers: SeedNet, LeNet-5 and the PyTorch-example net.

Every constructor takes ``multiplier`` (``"mbm"``, ``"mitchell"``, ``"exact"``, ...),
``backward`` (``"exact"``: straight-through gradients, or ``"approx"``) and
``approx_linear`` (whether the fully connected layers are approximate too, or plain
``nn.Linear``); convolutions are always :class:`~mbmlib.nn.MBMConv2d`.  Models return
logits; train them with cross-entropy.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..multipliers import MultiplierLike
from ..nn import MBMConv2d, MBMLinear

__all__ = ["SeedNet", "LeNet5", "ExampleNet", "MODELS", "build_model", "model_factory", "count_macs"]


def _layers(multiplier: MultiplierLike, backward: str, approx_linear: bool,
            backend: Optional[str]) -> Tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """The (conv, linear) layer factories for one model: approximate convs, linears as asked."""
    opts = dict(multiplier=multiplier, backward=backward, backend=backend)
    conv = functools.partial(MBMConv2d, **opts)
    linear = functools.partial(MBMLinear, **opts) if approx_linear else nn.Linear
    return conv, linear


class SeedNet(nn.Module):
    """The original experiment's CNN (SPEC section 2): three conv-BN-ReLU blocks, three linear layers.

    28x28 -> 32@28x28 -> 64@28x28 -> pool 64@14x14 -> 128@14x14 -> pool 128@7x7 -> 6272 -> 128 -> 64 -> 10.
    About 29.1 M conv and 0.81 M linear multiply-accumulates per image; 905,130 parameters.
    """

    def __init__(self, multiplier: MultiplierLike = "mbm", backward: str = "exact", approx_linear: bool = True,
                 backend: Optional[str] = None, num_classes: int = 10):
        super().__init__()
        conv, linear = _layers(multiplier, backward, approx_linear, backend)
        self.features = nn.Sequential(
            conv(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            conv(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            conv(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), linear(128 * 7 * 7, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
            nn.Dropout(0.5), linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(inplace=True),
            nn.Dropout(0.5), linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        x = self.features(x)  # (N, 128, 7, 7)
        return self.classifier(torch.flatten(x, 1))  # (N, 6272) -> (N, num_classes)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): tanh and average pooling, the first conv padded by 2 for 28x28 input.

    28x28 -> 6@28x28 -> pool 6@14x14 -> 16@10x10 -> pool 16@5x5 -> 400 -> 120 -> 84 -> 10.
    C3 is fully connected (the usual simplification of the paper's partial connection table).
    """

    def __init__(self, multiplier: MultiplierLike = "mbm", backward: str = "exact", approx_linear: bool = True,
                 backend: Optional[str] = None, num_classes: int = 10):
        super().__init__()
        conv, linear = _layers(multiplier, backward, approx_linear, backend)
        self.features = nn.Sequential(
            conv(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            conv(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            linear(16 * 5 * 5, 120), nn.Tanh(),
            linear(120, 84), nn.Tanh(),
            linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        x = self.features(x)  # (N, 16, 5, 5)
        return self.classifier(torch.flatten(x, 1))  # (N, 400) -> (N, num_classes)


class ExampleNet(nn.Module):
    """The net of PyTorch's examples/mnist, returning logits instead of log-softmax.

    28x28 -> 32@26x26 -> 64@24x24 -> pool 64@12x12 -> 9216 -> 128 -> 10.
    """

    def __init__(self, multiplier: MultiplierLike = "mbm", backward: str = "exact", approx_linear: bool = True,
                 backend: Optional[str] = None, num_classes: int = 10):
        super().__init__()
        conv, linear = _layers(multiplier, backward, approx_linear, backend)
        self.features = nn.Sequential(
            conv(1, 32, 3), nn.ReLU(inplace=True),
            conv(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.25),
        )
        self.classifier = nn.Sequential(
            linear(64 * 12 * 12, 128), nn.ReLU(inplace=True), nn.Dropout(0.5),
            linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        x = self.features(x)  # (N, 64, 12, 12)
        return self.classifier(torch.flatten(x, 1))  # (N, 9216) -> (N, num_classes)


MODELS: Dict[str, Callable[..., nn.Module]] = {"seednet": SeedNet, "lenet5": LeNet5, "example": ExampleNet}


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The model class registered as ``name`` (case-insensitive); ValueError naming the choices."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid choices are {', '.join(sorted(MODELS))}") from None


def build_model(name: str, **kwargs) -> nn.Module:
    """A model by registry name (``seednet``, ``lenet5``, ``example``), constructor keywords passed on."""
    return model_factory(name)(**kwargs)


def _layer_macs(layer: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one conv or linear layer per sample, from its output shape."""
    outputs_per_sample = output[0].numel()
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return outputs_per_sample * (layer.in_channels // layer.groups) * kh * kw
    return outputs_per_sample * layer.in_features


def count_macs(model: nn.Module, input_shape: Tuple[int, ...] = (1, 1, 28, 28)) -> Dict[str, int]:
    """Forward multiply-accumulates per sample of the conv and linear layers: ``{conv, linear, total}``.

    Runs an eval-mode copy of the model on the meta device, so nothing is computed and the
    model itself is left untouched.  Bias additions, norms and activations are not counted.
    """
    probe = copy.deepcopy(model).to("meta").eval()
    macs = {"conv": 0, "linear": 0}

    def hook(layer: nn.Module, inputs, output: Tensor) -> None:
        macs["conv" if isinstance(layer, nn.Conv2d) else "linear"] += _layer_macs(layer, output)

    for layer in probe.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.register_forward_hook(hook)
    with torch.no_grad():
        probe(torch.empty(input_shape, device="meta"))
    macs["total"] = macs["conv"] + macs["linear"]
    return macs
