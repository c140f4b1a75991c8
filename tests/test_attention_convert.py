"""convert() on attention: MultiheadAttention, the transformer layers (whose fused fast paths would skip the
approximate ops), torchvision's ViT, approximable_layers, state dicts and the energy count.

Tolerance: converted with "exact", models equal the originals within rtol 1e-5 / atol 1e-5 (float rounding of
another summation layout; outputs of order 1).
"""
import warnings

import pytest
import torch
from torch import nn

import mbmlib
from mbmlib import ApproxMultiheadAttention, approximable_layers, convert, layer_macs, model_energy
from mbmlib.nn import ApproxLayer

TOL = dict(rtol=1e-5, atol=1e-5)
OPS = ["in_proj", "qk", "pv", "out_proj"]


class Block(nn.Module):
    """A linear, a self-attention and a head: the names convert() sees."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def count_calls(model: nn.Module, kinds=(ApproxLayer,)) -> dict:
    """Count each module's forward calls by wrapping its ``forward`` (no hooks: those would block the fast paths)."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            counts[name] = 0

            def counting(*args, _name=name, _forward=module.forward, **kwargs):
                counts[_name] += 1
                return _forward(*args, **kwargs)

            module.forward = counting
    return counts


# ----------------------------------------------------------------------------- names and patterns


def test_attention_ops_are_named_and_chosen_by_patterns():
    model = Block()
    assert approximable_layers(model) == ["embed", "attn.in_proj", "attn.qk", "attn.pv", "attn.out_proj", "head"]
    assert approximable_layers(model.attn) == OPS
    assert approximable_layers(model, layers=(nn.Linear,)) == ["embed", "head"]
    only = convert(model, {"*.qk": "mbm", "*.pv": "mbm"})
    assert isinstance(only.attn, ApproxMultiheadAttention) and type(only.embed) is nn.Linear
    assert {op: getattr(only.attn, op).multiplier.name for op in OPS} == dict(in_proj="exact", qk="mbm", pv="mbm",
                                                                            out_proj="exact")
    assert type(convert(model, {"embed": "mbm"}).attn) is nn.MultiheadAttention  # no op matched: left plain
    assert type(convert(model, layers=(nn.Linear,)).attn) is nn.MultiheadAttention
    with pytest.raises(ValueError, match="matches no convertible layer.*'attn.qk'"):
        convert(model, {"attn.q": "mbm"})
    again = convert(only, {"attn.in_proj": "mitchell"}, layers=(ApproxMultiheadAttention,))
    assert again.attn.in_proj.multiplier.name == "mitchell" and again.attn.qk.multiplier.name == "mbm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attention is no longer left exact with a warning
        convert(model)


def test_exact_convert_keeps_results_and_state_dicts_load_both_ways():
    model = Block()
    x = torch.randn(2, 5, 4)
    exact = convert(model, "exact")
    torch.testing.assert_close(exact(x), model(x), **TOL)
    approx = convert(model, "mbm")
    assert (approx(x) - model(x)).abs().max() > 1e-4
    assert list(approx.state_dict()) == list(model.state_dict())
    fresh = Block()
    fresh.load_state_dict(approx.state_dict())  # strict: the same keys
    approx.load_state_dict(fresh.state_dict())
    quantised = convert(model, "mbm-int8")
    assert fresh.load_state_dict(quantised.state_dict(), strict=False).missing_keys == []
    quantised.load_state_dict(model.state_dict())  # a float model's state dict loads as it is


# ----------------------------------------------------------------------------- transformer layers: no fast path


def encoder(layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor notes
        return nn.TransformerEncoder(layer, layers)


def padded_batch():
    x = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True  # left-aligned padding: what the nested-tensor path packs
    return x, pad


@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_transformer_encoder_runs_every_approximate_op(mode, padded):
    plain = encoder()
    model = convert(plain, "exact")
    assert not model.use_nested_tensor and model.layers[0].activation_relu_or_gelu == 0
    x, pad = padded_batch()
    kwargs = dict(src_key_padding_mask=pad) if padded else {}
    plain.train(mode == "train"), model.train(mode == "train")
    counts = count_calls(model)
    with torch.set_grad_enabled(mode == "train"):
        got, want = model(x, **kwargs), plain(x, **kwargs)
    assert len(counts) == 2 * 6 and set(counts.values()) == {1}, counts  # in_proj qk pv out_proj linear1 linear2
    keep = ~pad if padded else torch.ones(3, 5, dtype=torch.bool)  # torch's fast path zeroes padded positions
    torch.testing.assert_close(got[keep], want[keep], **TOL)


def test_the_fast_paths_would_have_skipped_the_layers():
    """The check above can fail: in eval mode without grad torch's plain encoder calls no attention module."""
    plain = encoder().eval()
    counts = count_calls(plain, (nn.MultiheadAttention, nn.Linear))
    x, pad = padded_batch()
    with torch.no_grad():
        plain(x, src_key_padding_mask=pad)
        plain.layers[0](x)
    assert counts["layers.0.self_attn"] == 0 and counts["layers.0.linear1"] == 0


@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_transformer_decoder_layer_runs_every_approximate_op(mode):
    torch.manual_seed(0)
    plain = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True).train(mode == "train")
    model = convert(plain, "exact")
    tgt, memory = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(4), tgt_is_causal=True,
                  memory_key_padding_mask=torch.tensor([[False] * 6, [False] * 4 + [True] * 2]))
    counts = count_calls(model)
    with torch.set_grad_enabled(mode == "train"):
        got, want = model(tgt, memory, **kwargs), plain(tgt, memory, **kwargs)
    assert len(counts) == 2 * 4 + 2 and set(counts.values()) == {1}, counts
    torch.testing.assert_close(got, want, **TOL)


def test_a_lone_encoder_layer_in_eval_mode_runs_its_ops():
    torch.manual_seed(0)
    plain = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    model = convert(plain, {"self_attn.qk": "mbm", "linear1": "mbm"})
    counts = count_calls(model)
    x, pad = padded_batch()
    with torch.no_grad():
        out = model(x, src_key_padding_mask=pad)
    assert counts["self_attn.qk"] == counts["linear1"] == 1
    assert (out - plain(x, src_key_padding_mask=pad))[~pad].abs().max() > 1e-4


# ----------------------------------------------------------------------------- torchvision's ViT


def small_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    return vit


def test_torchvision_vit_converts_and_runs():
    vit = small_vit().eval()
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        want = vit(x)
        torch.testing.assert_close(convert(vit, "exact")(x), want, **TOL)
        approx = convert(vit, "mitchell")
        counts = count_calls(approx)
        out = approx(x)
    assert set(counts.values()) == {1} and sum(n.endswith(".qk") for n in counts) == 2
    assert list(counts) == [n for n in approximable_layers(vit)]
    assert out.shape == (2, 10) and (out - want).abs().max() > 1e-4


# ----------------------------------------------------------------------------- energy


def test_layer_macs_of_an_attention_by_hand():
    """L = 3 queries, S = 7 keys, E = 8, kdim 6, vdim 5, bias_k/bias_v (S' = 8 keys), per sample."""
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, add_bias_kv=True)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):  # x (L, N, 8); key and value from its first features
            return self.attn(x, x[..., :6].repeat(3, 1, 1)[:7], x[..., :5].repeat(3, 1, 1)[:7])[0]

    want = {"attn.in_proj": 3 * 8 * 8 + 7 * 6 * 8 + 7 * 5 * 8, "attn.qk": 3 * 8 * 8, "attn.pv": 3 * 8 * 8,
            "attn.out_proj": 3 * 8 * 8}
    plain = Cross()
    assert layer_macs(plain, (3, 1, 8)) == want  # counted from a plain attention's inputs
    converted = convert(plain, {"*.qk": "mbm", "*.pv": "mbm"})
    assert layer_macs(converted, (3, 1, 8)) == want  # the same names and counts from the approximate ops
    report = model_energy(converted, (3, 1, 8))
    p = mbmlib.cost("mbm").relative_power
    total = sum(want.values())
    assert report["total_macs"] == model_energy(plain, (3, 1, 8))["total_macs"] == total
    assert report["relative_energy"] == pytest.approx((total - 2 * 192 + 2 * 192 * p) / total)


def test_energy_of_a_vit_and_of_token_ids():
    vit = small_vit()
    macs = layer_macs(vit, (1, 3, 28, 28))
    assert list(macs) == approximable_layers(vit) and layer_macs(convert(vit, "mbm"), (1, 3, 28, 28)) == macs
    assert macs["encoder.layers.encoder_layer_0.self_attention.qk"] == 17 * 17 * 32  # 16 patches + class token

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, ids):
            h = self.embed(ids)
            return self.attn(h, h, h)[0]

    macs = layer_macs(Tokens(), torch.zeros(2, 5, dtype=torch.int64))  # int64 ids stay int64 on the meta device
    assert macs == {"attn.in_proj": 5 * 8 * 24, "attn.qk": 5 * 5 * 8, "attn.pv": 5 * 5 * 8, "attn.out_proj": 5 * 64}
