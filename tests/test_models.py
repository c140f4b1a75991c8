"""The MNIST models: shapes, parameter and MAC counts, layer types, the registry."""
import pytest
import torch
from torch import nn

from mbmlib import Multiplier
from mbmlib.workflow.models import MODELS, ExampleNet, LeNet5, SeedNet, build_model, count_macs
from mbmlib.nn import MBMConv2d, MBMLinear

PARAMS = {"seednet": 905_130, "lenet5": 61_706, "example": 1_199_882}


def _n_params(model: nn.Module) -> int:
    """Trainable parameters of a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("approx_linear", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_gives_logits_per_sample(name, approx_linear):
    model = build_model(name, multiplier="exact", approx_linear=approx_linear)
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    model.eval()
    out = model(x[:1])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert _n_params(model) == PARAMS[name]


@pytest.mark.parametrize("approx_linear", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_layers_are_approximate_as_asked(name, approx_linear):
    model = build_model(name, multiplier="mitchell", backward="approx", approx_linear=approx_linear)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs and all(isinstance(m, MBMConv2d) for m in convs)
    assert all(m.multiplier == Multiplier("mitchell") and m.backward == "approx" for m in convs)
    assert linears and all(isinstance(m, MBMLinear) == approx_linear for m in linears)


def test_approx_linear_does_not_change_the_state_dict():
    source = SeedNet()
    exact_linears = SeedNet(approx_linear=False)
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
    model = LeNet5(multiplier="mbm")
    twin = LeNet5(multiplier="exact")
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
    with pytest.raises(ValueError, match="unknown model 'resnet'; valid choices are example, lenet5, seednet"):
        build_model("resnet")
    with pytest.raises(TypeError):
        build_model("lenet5", nonsense=1)
