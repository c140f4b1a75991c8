"""Models: SeedNet, LeNet-5, the PyTorch-example net, CIFAR ResNet-20/8, a small vision transformer for MNIST
(``vit-tiny``), a character-level GPT (``gpt-char``) and any ``torchvision.models`` classifier, each a plain
``nn.Module`` of ``nn.Conv2d`` / ``nn.Linear`` / ``nn.MultiheadAttention`` layers.

They are made approximate one way only, by :func:`mbmlib.convert` (:func:`new_model` and
:func:`load_model` do it: ``multiplier``, ``backward``, ``approx_linear`` -- whether the fully
connected layers (and attention) are approximate too -- and ``backend``); attention is approximate where
``convert`` can make it so.  Models return logits -- a language model one row per position, ``(B, T, vocab)``
-- and train with cross-entropy.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..energy import layer_macs
from ..multipliers import MultiplierLike

__all__ = ["SeedNet", "LeNet5", "ExampleNet", "CifarResNet", "resnet20", "resnet8", "vit_tiny", "CharGPT", "gpt_char",
           "MODELS", "LANGUAGE_MODELS", "build_model", "model_factory", "count_macs", "layer_macs", "load_model",
           "load_checkpoint", "WeightsUnavailableError", "FIXED_INPUT", "model_channels", "model_context",
           "is_language_model", "check_input", "new_model", "check_model_name"]


class SeedNet(nn.Module):
    """The original experiment's CNN (SPEC section 2): three conv-BN-ReLU blocks, three linear layers.

    28x28 -> 32@28x28 -> 64@28x28 -> pool 64@14x14 -> 128@14x14 -> pool 128@7x7 -> 6272 -> 128 -> 64 -> 10.
    About 29.1 M conv and 0.81 M linear multiply-accumulates per image; 905,130 parameters.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        conv, linear = nn.Conv2d, nn.Linear
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

    def __init__(self, num_classes: int = 10):
        super().__init__()
        conv, linear = nn.Conv2d, nn.Linear
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

    def __init__(self, num_classes: int = 10):
        super().__init__()
        conv, linear = nn.Conv2d, nn.Linear
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


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity shortcut (He et al. 2016, CIFAR option A: zero-padded channels)."""

    def __init__(self, conv, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = conv(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, planes, H / stride, W / stride)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride]  # (N, C, H / stride, W / stride)
        if self.extra:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return torch.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (section 4.2): 6n+2 layers, 16/32/64 channels, for 32x32 images.

    ``depth`` 20 is ResNet-20 (0.27 M parameters, about 41 M MACs per image), 8 is ResNet-8.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {depth}")
        conv, linear = nn.Conv2d, nn.Linear
        n = (depth - 2) // 6
        self.conv1 = conv(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [_BasicBlock(conv, in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                      for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, 32, 32) images -> (N, num_classes) logits."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))  # (N, 64) -> (N, num_classes)


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 images."""
    return CifarResNet(20, **kwargs)


def resnet8(**kwargs) -> CifarResNet:
    """ResNet-8 for 32x32 images."""
    return CifarResNet(8, **kwargs)


def vit_tiny(num_classes: int = 10, in_channels: int = 1):
    """torchvision's ``VisionTransformer`` for 28x28 images: 7x7 patches (16 and a class token), 4 layers of 4 heads,
    hidden size 64, MLP 128; its patch embedding takes ``in_channels`` (139,018 parameters for MNIST, about 2.4 M
    multiply-accumulates per image)."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=num_classes)
    model.conv_proj = nn.Conv2d(in_channels, 64, kernel_size=7, stride=7)
    fan_in = in_channels * 7 * 7  # initialised as torchvision initialises its own patch embedding
    nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(model.conv_proj.bias)
    return model


GPT_CONTEXT = 64  # gpt-char's context length in tokens (bytes)


class _Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP, each added to its input."""

    def __init__(self, d_model: int, heads: int, mlp: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp), nn.GELU(), nn.Linear(mlp, d_model), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model); ``mask`` (T, T) is True where a position may not look."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A character-level GPT (nanoGPT's layout, smaller): token and position embeddings, ``layers`` pre-norm blocks
    of ``nn.MultiheadAttention`` (causal) and a GELU MLP, a final LayerNorm and an untied linear head.

    The default (vocabulary 256 bytes, context 64, 4 layers, 4 heads, d_model 128, MLP 512) has 867,328 parameters.
    Weights start as nanoGPT's: normal(0, 0.02), biases zero.
    """

    def __init__(self, vocab_size: int = 256, context: int = GPT_CONTEXT, layers: int = 4, heads: int = 4, d_model: int = 128,
                 mlp: int = 512, dropout: float = 0.0):
        super().__init__()
        self.context = context
        self.tokens, self.positions = nn.Embedding(vocab_size, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads, mlp, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("causal", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """(B, T) int64 token ids, T <= context -> (B, T, vocab_size) logits of the next token at every position."""
        if idx.dim() != 2 or idx.shape[1] > self.context or idx.is_floating_point():
            raise ValueError(f"CharGPT takes (batch, T) integer token ids with T <= {self.context}, got a "
                             f"{idx.dtype} tensor of shape {tuple(idx.shape)}")
        t = idx.shape[1]
        x = self.tokens(idx) + self.positions.weight[:t]  # (B, T, d_model)
        for block in self.blocks:
            x = block(x, self.causal[:t, :t])
        return self.head(self.ln(x))


def gpt_char(num_classes: int = 256, **kwargs) -> CharGPT:
    """The character-level GPT with a vocabulary of ``num_classes`` tokens (the data's classes are its tokens)."""
    return CharGPT(vocab_size=num_classes, **kwargs)


MODELS: Dict[str, Callable[..., nn.Module]] = {"seednet": SeedNet, "lenet5": LeNet5, "example": ExampleNet,
                                               "resnet20": resnet20, "resnet8": resnet8, "vit-tiny": vit_tiny,
                                               "gpt-char": gpt_char}
LANGUAGE_MODELS = ("gpt-char",)  # models of token sequences: they train on text corpora, not on images


def is_language_model(name: str) -> bool:
    """Whether ``name`` is a language model (token ids in, next-token logits out)."""
    return name.lower() in LANGUAGE_MODELS


def model_context(name: str) -> Optional[int]:
    """The context length (tokens) of a language model by name; None for image models."""
    return GPT_CONTEXT if is_language_model(name) else None


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The model class registered as ``name`` (case-insensitive); ValueError naming the choices."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        images = sorted(set(MODELS) - set(LANGUAGE_MODELS))
        raise ValueError(f"unknown model {name!r}; valid choices are {', '.join(images)}, a torchvision.models "
                         f"classifier (resnet18, mobilenet_v2, ...) or the language model {', '.join(LANGUAGE_MODELS)}"
                         ) from None


def check_model_name(name: str) -> str:
    """``name`` if it is a registry model or a torchvision.models classifier; the ValueError naming the choices."""
    if name.lower() not in MODELS:
        from torchvision import models as tvm

        if name not in tvm.list_models(module=tvm):
            model_factory(name)
    return name


def build_model(name: str, **kwargs) -> nn.Module:
    """A model by registry name (``seednet``, ``lenet5``, ``example``), constructor keywords passed on."""
    return model_factory(name)(**kwargs)


ATTENTION_MATMULS = (".qk", ".pv")  # the names :func:`layer_macs` gives an attention's two activation matmuls


def count_macs(model: nn.Module, example_input=(1, 1, 28, 28)) -> Dict[str, int]:
    """Forward multiply-accumulates per sample of the conv and linear layers: ``{conv, linear, total}``, and
    ``attention`` (the Q K^T and P V matmuls) where :func:`layer_macs` counts any; ``example_input`` is a batch
    or its shape (a language model takes a batch of token ids).

    Bias additions, norms and activations are not counted (see :func:`layer_macs`).
    """
    modules = dict(model.named_modules())
    per_layer = layer_macs(model, example_input if isinstance(example_input, Tensor) else tuple(example_input))
    conv = sum(v for k, v in per_layer.items() if isinstance(modules.get(k), nn.Conv2d))
    attention = sum(v for k, v in per_layer.items() if k.endswith(ATTENTION_MATMULS))
    macs = {"conv": conv, "linear": sum(per_layer.values()) - conv - attention}
    if attention:
        macs["attention"] = attention
    macs["total"] = sum(per_layer.values())
    return macs


# ----------------------------------------------------------------------------- torchvision models, weights


class WeightsUnavailableError(ValueError):
    """Pretrained weights could not be had; the message says which file to put where."""


def _torchvision_model(name: str, pretrained: bool, num_classes: int) -> nn.Module:
    """An exact ``torchvision.models`` classifier, with its default pretrained weights if asked."""
    from torchvision import models as tvm

    check_model_name(name)
    if not pretrained:
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    weights = tvm.get_model_weights(name).DEFAULT
    try:
        model = tvm.get_model(name, weights=weights)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        target = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        raise WeightsUnavailableError(f"the pretrained weights of {name} could not be loaded ({type(err).__name__}: "
                                      f"{' '.join(str(err).split())}); download {weights.url} to {target}, "
                                      "or pass --checkpoint with a state dict") from None
    if num_classes != len(weights.meta["categories"]):
        raise ValueError(f"pretrained {name} has {len(weights.meta['categories'])} classes, the dataset "
                         f"{num_classes}; evaluate it on a dataset with its classes (e.g. imagefolder:<ImageNet "
                         "val>), or train the model from scratch on this dataset (train --model)")
    return model


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a state dict (or a run's ``checkpoint.pt``, which keeps it under ``"model"``) into ``model``.

    A quantised run's scales (its layers' ``quantiser`` entries) are left out when ``model`` has no
    quantisers: the weights are what carries over; an integer design is calibrated again where it is used.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a text file, random bytes, a truncated zip: pickle, zip and torch errors alike
        first = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read the checkpoint {path} ({type(err).__name__}: {first}); give a file "
                         "saved with torch.save(model.state_dict(), path) or a run's checkpoint.pt") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"the checkpoint {path} holds no state dict ({type(state).__name__}); give a file saved "
                         "with torch.save(model.state_dict(), path) or a run's checkpoint.pt")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    own = model.state_dict().keys()
    state = {k: v for k, v in state.items() if ".quantiser." not in f".{k}" or k in own}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shapes that differ
        detail = " ".join(str(err).split())
        raise ValueError(f"the checkpoint {path} does not fit the model ({detail[:400]}); was it saved from "
                         "another model or for another number of classes?") from None
    return model


# The (channels, image size) the MNIST-era nets are built for; the CIFAR ResNets take any channel count.
FIXED_INPUT = {"seednet": (1, 28), "lenet5": (1, 28), "example": (1, 28), "vit-tiny": (1, 28)}


def model_channels(name: str) -> Optional[int]:
    """Input channels a model needs from the data: 3 for torchvision's models, None (the data's own) otherwise."""
    return None if name.lower() in MODELS else 3


def check_input(name: str, channels: int, image_size: int, dataset: str) -> None:
    """ValueError when the model cannot take ``dataset``'s images: checked before any data loads.

    A registry net built for fixed inputs is compared with them; a torchvision model is built on the
    meta device (no memory, no weights) and given a meta batch of the images' size.
    """
    fixed = FIXED_INPUT.get(name.lower())
    if fixed is not None and fixed != (channels, image_size):
        raise ValueError(f"{name} takes {fixed[0]}x{fixed[1]}x{fixed[1]} images (mnist, fashion-mnist, kmnist) but "
                         f"{dataset} has {channels}x{image_size}x{image_size}; use resnet20, resnet8 or a "
                         "torchvision model (resnet18, mobilenet_v2, ...)")
    if name.lower() in MODELS:
        return
    from torchvision import models as tvm

    check_model_name(name)
    with torch.device("meta"):
        model = tvm.get_model(name, weights=None).eval()
        try:
            model(torch.empty(2, 3, image_size, image_size))
        except Exception as err:  # each family says it its own way (AssertionError, RuntimeError, ...)
            first = (str(err).splitlines() or [""])[0][:200]
            raise ValueError(f"{name} cannot take {dataset}'s {image_size}x{image_size} images ({type(err).__name__}: "
                             f"{first}); pick a model for images of that size (resnet20 or resnet8 for 32x32)") \
                from None


def new_model(name: str, num_classes: int = 10, in_channels: int = 1, multiplier: MultiplierLike = "mbm",
              backward: str = "exact", approx_linear: bool = True, backend: Optional[str] = None,
              pretrained: bool = False) -> nn.Module:
    """A model by name, freshly initialised (or torchvision's pretrained weights), made approximate by
    :func:`mbmlib.convert`: ``multiplier`` in its convolutions and, if ``approx_linear``, in every other layer
    ``convert`` can make approximate (linear layers, and attention where it can).  A language model takes
    ``num_classes`` as its vocabulary and no channels."""
    from .. import convert

    if name.lower() in MODELS:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights; use --checkpoint with a trained run's checkpoint.pt")
        fixed = name.lower() in FIXED_INPUT or is_language_model(name)
        model = build_model(name, num_classes=num_classes, **({} if fixed else dict(in_channels=in_channels)))
    else:
        model = _torchvision_model(name, pretrained, num_classes)
    layers = {} if approx_linear else dict(layers=(nn.Conv2d,))  # convert's default: every layer it can convert
    return convert(model, multiplier=multiplier, backward=backward, backend=backend, inplace=True, **layers)


def load_model(name: str, multiplier="exact", backward: str = "exact", num_classes: int = 10,
               in_channels: int = 1, pretrained: bool = False, checkpoint=None,
               backend: Optional[str] = None) -> nn.Module:
    """A model by name with its weights, every Conv2d/Linear approximate with ``multiplier``.

    ``name``: one of :data:`MODELS` or any ``torchvision.models`` classifier.  ``pretrained``
    loads torchvision's default weights, ``checkpoint`` a state dict from a file.  ``multiplier``
    may be a dict of per-layer glob patterns (see :func:`mbmlib.convert`).
    """
    from .. import convert

    model = new_model(name, num_classes, in_channels, multiplier="exact", pretrained=pretrained)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return convert(model, multiplier=multiplier, backward=backward, backend=backend)
