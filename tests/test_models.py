"""The MNIST models: shapes, parameter and MAC counts, layer types, the registry."""
import pytest
import torch
from torch import nn

import mbmlib
from mbmlib import Multiplier, convert
from mbmlib.workflow.models import ExampleNet, LeNet5, SeedNet, build_model, count_macs, new_model
from mbmlib.nn import MBMConv2d, MBMLinear

PARAMS = {"seednet": 905_130, "lenet5": 61_706, "example": 1_199_882}


def _n_params(model: nn.Module) -> int:
    """Trainable parameters of a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("approx_linear", [True, False])
@pytest.mark.parametrize("name", sorted(PARAMS))  # the 28x28 MNIST models
def test_forward_gives_logits_per_sample(name, approx_linear):
    model = new_model(name, multiplier="exact", approx_linear=approx_linear)
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    model.eval()
    out = model(x[:1])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert _n_params(model) == PARAMS[name]


@pytest.mark.parametrize("approx_linear", [True, False])
@pytest.mark.parametrize("name", sorted(PARAMS))  # the 28x28 MNIST models
def test_layers_are_approximate_as_asked(name, approx_linear):
    model = new_model(name, multiplier="mitchell", backward="approx", approx_linear=approx_linear)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs and all(isinstance(m, MBMConv2d) for m in convs)
    assert all(m.multiplier == Multiplier("mitchell") and m.backward == "approx" for m in convs)
    assert linears and all(isinstance(m, MBMLinear) == approx_linear for m in linears)


def test_models_are_plain_modules_made_approximate_by_convert_only():
    plain = build_model("seednet")
    assert not any(isinstance(m, (MBMConv2d, MBMLinear)) for m in plain.modules())
    torch.manual_seed(3)
    a = new_model("seednet", multiplier="mbm")
    torch.manual_seed(3)
    b = convert(SeedNet(), multiplier="mbm")  # the same initialisation: convert keeps the weights
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(TypeError):
        SeedNet(multiplier="mbm")


def test_approx_linear_does_not_change_the_state_dict():
    source = new_model("seednet")
    exact_linears = new_model("seednet", approx_linear=False)
    assert exact_linears.state_dict().keys() == source.state_dict().keys()
    result = exact_linears.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in exact_linears.state_dict().items())


def test_seednet_architecture_matches_the_spec():
    model = SeedNet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding, c.bias) for c in convs] == [
        (1, 32, (3, 3), (1, 1), None), (32, 64, (3, 3), (1, 1), None), (64, 128, (3, 3), (1, 1), None)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6272, 128), (128, 64), (64, 10)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 2
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5, 0.5]


def test_seednet_macs_match_the_spec():
    macs = count_macs(SeedNet())
    assert macs["conv"] == 28 * 28 * 32 * 9 + 28 * 28 * 64 * 32 * 9 + 14 * 14 * 128 * 64 * 9  # 29,127,168
    assert macs["linear"] == 6272 * 128 + 128 * 64 + 64 * 10  # 811,648
    assert abs(macs["conv"] / 29e6 - 1) < 0.01 and abs(macs["linear"] / 0.8e6 - 1) < 0.02
    assert macs["total"] == macs["conv"] + macs["linear"]


def test_count_macs_of_the_other_models_and_leaves_the_model_alone():
    model = LeNet5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model) == {"conv": 28 * 28 * 6 * 25 + 10 * 10 * 16 * 6 * 25,
                                 "linear": 400 * 120 + 120 * 84 + 84 * 10, "total": 416_520}
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert count_macs(ExampleNet())["linear"] == 9216 * 128 + 128 * 10


def test_mbm_model_trains_a_step_that_lowers_the_loss():
    """A straight-through step of the MBM model follows the exact twin's gradient, and SGD lowers the loss."""
    torch.manual_seed(0)
    model = new_model("lenet5", multiplier="mbm")
    twin = new_model("lenet5", multiplier="exact")
    twin.load_state_dict(model.state_dict())
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    nn.functional.cross_entropy(twin(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        cos = nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.9, (name, cos)  # the products differ by a few percent, the gradients' direction hardly
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert nn.functional.cross_entropy(model(x), y) < loss


def test_build_model_names_the_valid_choices():
    assert isinstance(build_model("SeedNet"), SeedNet)
    with pytest.raises(ValueError, match="unknown model 'resnet'; valid choices are example, lenet5, resnet20, resnet8, seednet"):
        build_model("resnet")
    with pytest.raises(TypeError):
        build_model("lenet5", nonsense=1)


# ----------------------------------------------------------------------------- CIFAR ResNets, torchvision, weights


def test_cifar_resnets_have_the_papers_size():
    from mbmlib.workflow.models import CifarResNet, resnet8, resnet20

    r20 = resnet20()
    assert _n_params(r20) == 269_722  # He et al. 2016, table 6: 0.27 M
    assert count_macs(r20, (1, 3, 32, 32))["total"] == 40_551_040
    assert r20(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert len([m for m in resnet8().modules() if isinstance(m, nn.Conv2d)]) == 7
    with pytest.raises(ValueError, match="depth 6n\\+2"):
        CifarResNet(depth=9)


# One small member of every torchvision classification family, with an input it accepts.
FAMILIES = {"alexnet": 64, "convnext_tiny": 32, "densenet121": 32, "efficientnet_b0": 32, "efficientnet_v2_s": 32,
            "googlenet": 32, "inception_v3": 75, "mnasnet0_5": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
            "regnet_x_400mf": 32, "resnet18": 32, "resnext50_32x4d": 32, "shufflenet_v2_x0_5": 32,
            "squeezenet1_0": 32, "vgg11_bn": 32, "wide_resnet50_2": 32, "swin_t": 32, "maxvit_t": 224,
            "vit_b_16": 224}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_torchvision_family_converts_and_runs(name):
    import warnings

    from mbmlib import NotConvertedWarning
    from mbmlib.workflow.models import load_model

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotConvertedWarning)
        model = load_model(name, multiplier="mitchell", num_classes=7).eval()
    inside_attention = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inside_attention]
    assert layers and all(isinstance(m, (MBMConv2d, MBMLinear)) and m.multiplier == Multiplier("mitchell")
                          for m in layers)
    assert not any(issubclass(w.category, NotConvertedWarning) for w in caught)
    assert all(isinstance(a, mbmlib.ApproxMultiheadAttention) and {getattr(a, op).multiplier.name for op in
               ("in_proj", "qk", "pv", "out_proj")} == {"mitchell"}
               for a in model.modules() if isinstance(a, nn.MultiheadAttention))
    if FAMILIES[name] <= 75:  # the 224-pixel transformers are only converted: their forward costs minutes here
        with torch.no_grad():
            out = model(torch.rand(1, 3, FAMILIES[name], FAMILIES[name]))
        assert out.shape == (1, 7) and torch.isfinite(out).all()


def test_checkpoints_load_as_state_dicts_and_as_run_checkpoints(tmp_path):
    from mbmlib.workflow.models import load_checkpoint, load_model

    trained = new_model("seednet", multiplier="exact")
    for p in trained.parameters():
        nn.init.normal_(p)
    torch.save(trained.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": trained.state_dict(), "optimizer": {}, "epoch": 3}, tmp_path / "checkpoint.pt")
    x = torch.rand(3, 1, 28, 28)
    want = trained.eval()(x)
    for file in ("plain.pt", "checkpoint.pt"):
        model = load_model("seednet", multiplier="exact", checkpoint=tmp_path / file).eval()
        assert torch.equal(model(x), want)
    approx = load_model("seednet", multiplier="mbm", checkpoint=tmp_path / "plain.pt").eval()
    got = approx(x)
    assert not torch.equal(got, want) and (got - want).abs().max() < 0.2 * want.abs().max()  # same weights, MBM products
    with pytest.raises(ValueError, match="does not fit the model .*LeNet5: Missing key"):
        load_checkpoint(LeNet5(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not fit the model .*Unexpected key"):
        load_checkpoint(nn.Sequential(), tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the checkpoint .*junk.pt"):
        load_checkpoint(SeedNet(), tmp_path / "junk.pt")


def test_pretrained_weights_that_cannot_be_downloaded_say_where_to_put_them(monkeypatch):
    from urllib.error import URLError

    from torchvision.models import _api

    from mbmlib.workflow.models import WeightsUnavailableError, load_model

    def offline(self, *args, **kwargs):
        raise URLError("no network in tests")

    monkeypatch.setattr(_api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet18 could not be loaded .*no network in tests.*"
                                                      r"download https://.*resnet18-.*\.pth to .*checkpoints"):
        load_model("resnet18", pretrained=True, num_classes=1000)
    with pytest.raises(ValueError, match="seednet has no pretrained weights"):
        load_model("seednet", pretrained=True)
    with pytest.raises(ValueError, match="unknown model 'resnet1'.*torchvision.models"):
        load_model("resnet1")


@pytest.mark.parametrize("kind", ["float", "int", "table"])
@pytest.mark.parametrize("name, shape", [("seednet", (2, 1, 28, 28)), ("resnet8", (2, 3, 32, 32))])
def test_converted_models_compile_for_every_design_kind(name, shape, kind):
    """torch.compile of a converted SeedNet / ResNet-8 gives the eager model's outputs (issue: strides)."""
    import mbmlib

    multiplier = {"float": "mbm", "int": "mbm-int8",
                  "table": mbmlib.Multiplier.from_table(mbmlib.table_from_multiplier("mitchell-int6"))}[kind]
    torch.manual_seed(0)
    model = new_model(name, multiplier=multiplier, in_channels=shape[1], backend="compiled")
    x = torch.rand(*shape)
    if kind != "float":
        mbmlib.calibrate(model, [x])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)
