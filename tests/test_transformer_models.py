"""The transformer models of the workflow: vit-tiny (torchvision's VisionTransformer for MNIST) and gpt-char."""
import warnings

import pytest
import torch
from torch import nn

import mbmlib
from mbmlib.workflow.models import (MODELS, CharGPT, count_macs, is_language_model, model_context, new_model,
                                    vit_tiny)

ATTENTION = hasattr(mbmlib.nn, "approximable_layers")  # the core converts nn.MultiheadAttention
needs_attention = pytest.mark.skipif(not ATTENTION, reason="this core's convert leaves attention exact")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vit_tiny_is_torchvisions_vision_transformer_for_one_channel_28x28_images():
    from torchvision.models import VisionTransformer

    model = MODELS["vit-tiny"]()
    assert isinstance(model, VisionTransformer) and model.patch_size == 7 and model.seq_length == 17
    assert (model.conv_proj.in_channels, model.conv_proj.out_channels, model.conv_proj.kernel_size) == (1, 64, (7, 7))
    assert len(model.encoder.layers) == 4 and model.encoder.layers[0].self_attention.num_heads == 4
    assert model.encoder.layers[0].mlp[0].out_features == 128
    assert n_params(model) == 139_018
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert vit_tiny(num_classes=7, in_channels=3)(torch.rand(2, 3, 28, 28)).shape == (2, 7)


def test_vit_tiny_macs_per_image_counted_by_hand():
    d, mlp, tokens = 64, 128, 17
    per_layer = tokens * 4 * d * d + 2 * tokens * mlp * d  # in_proj (3 d^2) + out_proj (d^2), the MLP
    attention = 2 * tokens * tokens * d  # Q K^T and P V over 4 heads of 16
    macs = count_macs(vit_tiny())
    assert macs["conv"] == 16 * 64 * 49
    if ATTENTION:
        assert macs["attention"] == 4 * attention
        assert macs["linear"] == 4 * per_layer + d * 10
    assert macs["total"] == macs["conv"] + macs["linear"] + macs.get("attention", 0)


def test_gpt_char_shapes_parameters_and_registry():
    model = MODELS["gpt-char"]()
    assert isinstance(model, CharGPT) and is_language_model("gpt-char") and not is_language_model("vit-tiny")
    assert model_context("gpt-char") == model.context == 64 and model_context("seednet") is None
    assert n_params(model) == 867_328
    x = torch.randint(0, 256, (3, 64))
    assert model(x).shape == (3, 64, 256)
    assert model(x[:, :10]).shape == (3, 10, 256)  # shorter windows take the first positions
    assert MODELS["gpt-char"](num_classes=100)(x[:, :5] % 100).shape == (3, 5, 100)


def test_gpt_char_is_causal_a_later_token_never_changes_an_earlier_prediction():
    model = CharGPT(layers=2).eval()
    x = torch.randint(0, 256, (2, 64))
    y = x.clone()
    y[:, 40:] = (y[:, 40:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_gpt_char_refuses_what_is_not_token_ids_within_its_context():
    model = CharGPT(layers=1)
    with pytest.raises(ValueError, match="T <= 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.rand(1, 8))


def test_gpt_char_macs_per_window_counted_by_hand():
    d, mlp, t, vocab = 128, 512, 64, 256
    macs = count_macs(CharGPT(), torch.zeros(1, t, dtype=torch.long))
    if ATTENTION:
        assert macs["attention"] == 4 * 2 * t * t * d
        assert macs["linear"] == 4 * (t * 4 * d * d + 2 * t * mlp * d) + t * d * vocab
    assert macs["conv"] == 0


@pytest.mark.parametrize("name,example", [("vit-tiny", torch.rand(2, 1, 28, 28)),
                                          ("gpt-char", torch.randint(0, 256, (2, 64)))])
def test_new_model_with_exact_products_computes_what_the_plain_model_computes(name, example):
    torch.manual_seed(0)
    plain = MODELS[name]().eval()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unconverted
        approx = new_model(name, 256 if name == "gpt-char" else 10, multiplier="exact").eval()
    with torch.no_grad():
        torch.testing.assert_close(approx(example), plain(example), rtol=1e-5, atol=1e-5)


@needs_attention
def test_new_model_makes_every_attention_op_approximate():
    model = new_model("gpt-char", 256, multiplier="mbm")
    names = mbmlib.nn.approximable_layers(model)
    assert {"blocks.0.attn.in_proj", "blocks.0.attn.qk", "blocks.0.attn.pv", "blocks.0.attn.out_proj",
            "blocks.3.mlp.0", "head"} <= set(names)
    modules = dict(model.named_modules())
    assert all(modules[n].multiplier.name == "mbm" for n in names)
    only_convs = new_model("vit-tiny", multiplier="mbm", approx_linear=False)
    assert [n for n, m in only_convs.named_modules() if hasattr(m, "multiplier")] == ["conv_proj"]
