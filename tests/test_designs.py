"""The design registry: every registered design on every backend, and a user's own designs from this file.

The two user designs below are registered here, at collection, exactly as a user would (nothing under
``mbmlib/`` names them), so the conformance tests parametrised over ``mbmlib.registered_designs()`` cover
them with the built-in ones.
"""
import math
import os
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbmlib
from mbmlib import functional as AF
from mbmlib import kernels, quant
from mbmlib.kernels import GenericPathWarning
from scalar_model import (approx_mul_bits, b2f, design_mul_bits, drum_model, f2b, int_products_model, lmul_mul_bits,
                          same_float)
from triton_backend import every_backend


def trunc2(a, b):
    """Exact product with its two lowest bits cleared."""
    return (a * b) & ~3


def mitchell_plus(ma, mb):
    """Mitchell plus a constant 2**-4 before the carry."""
    s = ma + mb + (1 << 19)
    return torch.where(s < (1 << 23), (1 << 23) + s, 2 * s)


USER_DESIGNS = {("trunc2", "int"): trunc2, ("mitchellplus", "float"): mitchell_plus}
for (_name, _kind), _fn in USER_DESIGNS.items():
    if not any(d.name == _name and d.kind == _kind for d in mbmlib.registered_designs()):
        mbmlib.register_design(_name, _fn, kind=_kind)

def examples(design) -> list[str]:
    """Two multiplier names of a design, one narrow or truncated (small tables, the table paths)."""
    if design.kind == "float":
        return [f"{design.name}-m3", f"{design.name}-m16"] if design.param == "m" else \
            [design.name, f"{design.name}-t16"]
    if design.param == "k":
        return [f"{design.name}3-int4", f"{design.name}4-int8"]
    return [f"{design.name}-int4", f"{design.name}-int8"]


DESIGNS = mbmlib.registered_designs()
FLOAT_NAMES = [n for d in DESIGNS if d.kind == "float" for n in examples(d)]
INT_NAMES = [n for d in DESIGNS if d.kind == "int" for n in examples(d)]
# The layer tests add the widths DRUM's and L-Mul's kernels treat apart: DRUM k in {2, 4, 6, n} at n = 4, 8, 12
# (int32 products) and 16 (split / int64 products); L-Mul's l = n (n <= 3), 3 (n = 4), 4 (n > 4).
LAYER_INT_NAMES = INT_NAMES + [f"drum{k}-int{n}" for n in (4, 8, 12, 16) for k in sorted({2, 4, 6, n})
                               if k <= n and f"drum{k}-int{n}" not in INT_NAMES]
LAYER_FLOAT_NAMES = FLOAT_NAMES + [f"lmul-m{m}" for m in (1, 4, 7, 23) if f"lmul-m{m}" not in FLOAT_NAMES]
BACKENDS = every_backend()


def quiet(fn, *args, **kw):
    """``fn`` with the one-time generic-path warning silenced (it is tested on its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        return fn(*args, **kw)


def user_function(name: str):
    mult = mbmlib.as_multiplier(name)
    return USER_DESIGNS.get((mult.kind, "int" if mult.is_integer else "float"))


# ----------------------------------------------------------------------------- elementwise: the scalar models

_SPECIALS = [0.0, -0.0, 1.0, -1.5, 2.0**-126, 2.0**-149, 2.0**127, 3e38, float("inf"), float("-inf"), float("nan")]


def _float_pairs(count: int, seed: int) -> tuple[list, list]:
    rng = random.Random(seed)
    a = [x for x in _SPECIALS for _ in _SPECIALS] + [rng.uniform(-4, 4) * 2.0 ** rng.randint(-70, 70)
                                                    for _ in range(count)]
    b = [y for _ in _SPECIALS for y in _SPECIALS] + [rng.uniform(-4, 4) * 2.0 ** rng.randint(-70, 70)
                                                    for _ in range(count)]
    return a, b


def _scalar_product(name: str):
    """(a, b) -> float32 product by the scalar model: SPEC's text for built-ins, the user's function for theirs."""
    mult = mbmlib.as_multiplier(name)
    fn = user_function(name)
    if mult.kind == "lmul":
        return lambda x, y: b2f(lmul_mul_bits(f2b(x), f2b(y), mult.param))
    if fn is None:
        return lambda x, y: b2f(approx_mul_bits(f2b(x), f2b(y), mult.kind, mult.t))

    def significand(ma, mb):
        return int(fn(torch.tensor([ma]), torch.tensor([mb]))[0])

    return lambda x, y: b2f(design_mul_bits(f2b(x), f2b(y), significand, mult.t))


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_designs_elementwise_match_the_scalar_model(name):
    a, b = _float_pairs(1500, seed=len(name))
    out = mbmlib.approx_mul(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), name)
    model = _scalar_product(name)
    a32, b32 = (torch.tensor(v, dtype=torch.float32).tolist() for v in (a, b))  # the operands as float32 sees them
    bad = [(x, y, float(o), model(x, y)) for x, y, o in zip(a32, b32, out.tolist()) if not same_float(o, model(x, y))]
    assert not bad, f"{len(bad)} products differ from the scalar model, e.g. {bad[:3]}"


def test_the_generic_frame_model_is_spec_for_the_built_in_designs():
    a, b = _float_pairs(500, seed=1)
    for design in (d for d in DESIGNS if d.builtin and d.kind == "float" and d.mac in ("mbm", "mitchell")):
        def significand(ma, mb, ref=design.reference):
            return int(ref(torch.tensor([ma]), torch.tensor([mb]), None)[0])

        for x, y in zip(a, b):
            assert design_mul_bits(f2b(x), f2b(y), significand) == approx_mul_bits(f2b(x), f2b(y), design.name) or \
                math.isnan(b2f(approx_mul_bits(f2b(x), f2b(y), design.name)))


@pytest.mark.parametrize("name", INT_NAMES)
def test_integer_designs_elementwise_match_the_model_on_every_pair(name):
    mult = mbmlib.as_multiplier(name)
    top = mult.max_magnitude
    mags = np.arange(top + 1)
    fn = user_function(name)
    if mult.kind == "drum":
        expect = drum_model(mags[:, None], mags[None, :], mult.param)
    elif fn is None:
        expect = int_products_model(mags[:, None], mags[None, :], mult.kind)
    else:
        expect = fn(torch.tensor(mags)[:, None], torch.tensor(mags)[None, :]).numpy()
    a = torch.arange(-top, top + 1)
    out = mbmlib.approx_mul(a[:, None], a[None, :], name).numpy()
    signs = np.sign(a.numpy()[:, None] * a.numpy()[None, :])
    assert np.array_equal(out, signs * expect[np.abs(a.numpy())[:, None], np.abs(a.numpy())[None, :]])


# ----------------------------------------------------------------------------- layers: every design x backend


def _direct_linear(x, w, name):
    """sum_k approx(x[m, k], w[n, k]) from the elementwise op, in float64 (the yardstick of the sums)."""
    return mbmlib.approx_mul(x[:, None, :], w[None, :, :], name).double().sum(-1)


def _close(out, ref, abs_sum):
    """Equal up to float32 summation order: |out - ref| <= 1e-5 * sum_k |product| (same NaN/inf)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = torch.isfinite(ref)
    assert torch.equal(out[~fin & ~torch.isnan(ref)], ref[~fin & ~torch.isnan(ref)])
    assert ((out[fin] - ref[fin]).abs() <= 1e-5 * abs_sum.cpu()[fin] + 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", LAYER_FLOAT_NAMES)
def test_float_designs_in_linear_and_conv2d_on_every_backend(name, backend):
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 19, generator=gen), torch.randn(6, 19, generator=gen)
    out = quiet(AF.linear, x, w, multiplier=name, backend=backend)
    _close(out, _direct_linear(x, w, name), _direct_linear(x.abs(), w.abs(), name))
    img, k = torch.randn(2, 4, 7, 6, generator=gen), torch.randn(6, 2, 3, 3, generator=gen)
    y = quiet(AF.conv2d, img, k, stride=(2, 1), padding=1, groups=2, multiplier=name, backend=backend)
    ref = quiet(AF.conv2d, img, k, stride=(2, 1), padding=1, groups=2, multiplier=name, backend="reference")
    ref_abs = quiet(AF.conv2d, img.abs(), k.abs(), stride=(2, 1), padding=1, groups=2, multiplier=name,
                    backend="reference")
    _close(y, ref, ref_abs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", LAYER_FLOAT_NAMES)
def test_float_designs_approximate_gradients_on_every_backend(name, backend):
    gen = torch.Generator().manual_seed(8)  # two images (Triton splits grad_w's batch), 24 outputs (tiles and a tail)
    img, k = torch.randn(2, 2, 4, 3, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    grads = {}
    for be in ("reference", backend):
        xi, ki = img.clone().requires_grad_(), k.clone().requires_grad_()
        quiet(AF.conv2d, xi, ki, padding=1, multiplier=name, backward="approx", backend=be).square().sum().backward()
        grads[be] = (xi.grad, ki.grad)
    for got, ref in zip(grads[backend], grads["reference"]):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)


def _quantised_direct(x, w, name, s_x, s_w):
    """The quantised linear layer computed from the elementwise integer op: exact sums, then scaled."""
    mult = mbmlib.as_multiplier(name)
    s_x, s_w = torch.tensor(s_x), torch.tensor(s_w)  # float32, as the layer holds them
    qx = quant.quantise(x, s_x, mult.max_magnitude)
    qw = quant.quantise(w, s_w, mult.max_magnitude)
    sums = mbmlib.approx_mul(qx[:, None, :], qw[None, :, :], name).sum(-1)  # int64, exact
    return (sums.double() * (s_x.double() * s_w.double())).float()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", LAYER_INT_NAMES)
def test_integer_designs_in_quantised_layers_on_every_backend(name, backend):
    gen = torch.Generator().manual_seed(9)
    x, w = torch.randn(5, 23, generator=gen), torch.randn(7, 23, generator=gen)
    s_x, s_w = 3.0 / mbmlib.as_multiplier(name).max_magnitude, 2.5 / mbmlib.as_multiplier(name).max_magnitude
    out = quiet(quant.linear, x, w, act_scale=s_x, weight_scale=s_w, multiplier=name, backend=backend)
    assert torch.equal(out, _quantised_direct(x, w, name, s_x, s_w))
    img, k = torch.randn(2, 3, 6, 6, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    y = quiet(quant.conv2d, img, k, padding=1, stride=2, act_scale=s_x, weight_scale=s_w, multiplier=name,
              backend=backend)
    ref = quiet(quant.conv2d, img, k, padding=1, stride=2, act_scale=s_x, weight_scale=s_w, multiplier=name,
                backend="reference")
    assert torch.equal(y, ref)


# ----------------------------------------------------------------------------- the user designs in models


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", ["trunc2-int8", "mitchellplus", "mitchellplus-t16"])
def test_user_designs_through_convert(name, backend):
    model = _small_model().eval()
    x = torch.randn(2, 1, 6, 6)
    spec = quant.QuantSpec(0.02, 0.05) if mbmlib.as_multiplier(name).is_integer else None
    approx = quiet(mbmlib.convert, _small_model(), multiplier=name, backend=backend, quant=spec).eval()
    assert all(getattr(m, "multiplier", None) == mbmlib.as_multiplier(name) for m in (approx[0], approx[3]))
    conv, lin = model[0], model[3]
    if mbmlib.as_multiplier(name).is_integer:
        h = quant.conv2d(x, conv.weight, conv.bias, padding=1, act_scale=0.05, weight_scale=0.02, multiplier=name,
                         backend="reference")
        expect = quant.linear(F.relu(h).flatten(1), lin.weight, lin.bias, act_scale=0.05, weight_scale=0.02,
                              multiplier=name, backend="reference")
    else:
        h = AF.conv2d(x, conv.weight, conv.bias, padding=1, multiplier=name, backend="reference")
        expect = AF.linear(F.relu(h).flatten(1), lin.weight, lin.bias, multiplier=name, backend="reference")
    with torch.no_grad():
        out = quiet(approx, x)
    assert torch.allclose(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["trunc2-int8", "mitchellplus-t8"])
def test_a_short_training_run_with_a_user_design_is_the_same_on_every_cpu_backend(name, tmp_path, mnist_root):
    from mbmlib.workflow.train import config_with_preset, train

    losses = {}
    for backend in ("reference", "compiled"):
        cfg = config_with_preset("seed", model="lenet5", multiplier=name, backend=backend, data_dir=str(mnist_root),
                                 train_samples=16, val_samples=8, test_samples=8, batch_size=8, epochs=1,
                                 runs_dir=str(tmp_path / "runs"), progress=False, speed_ratio_steps=0,
                                 run_name=backend)
        metrics = quiet(train, cfg)
        assert metrics["status"] == "finished" and metrics["config"]["multiplier"] == name
        losses[backend] = (metrics["epochs"][-1]["train_loss"], metrics["final"]["val_loss"])
    assert all(math.isfinite(v) for v in losses["reference"])
    assert losses["compiled"] == pytest.approx(losses["reference"], rel=1e-5)


# ----------------------------------------------------------------------------- the registry itself


def test_generic_paths_are_said_once_and_name_the_design():
    mbmlib.register_design("scratch", lambda a, b: a * b, kind="int")
    try:
        with pytest.warns(GenericPathWarning, match="design 'scratch' has no specialised kernel; 'scratch-int6' "
                                                     "runs on the table kernels of the 'compiled' backend"):
            kernels.route("scratch-int6", "compiled")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            way = kernels.route("scratch-int6", "compiled")  # said once
        assert way.multiplier.kind == "table" and way.backend == "compiled"
        assert torch.equal(way.multiplier.table, mbmlib.table_from_multiplier("scratch-int6"))
        with pytest.warns(GenericPathWarning, match="'scratch-int14' runs on the 'reference' backend"):
            assert kernels.route("scratch-int14", "compiled").backend == "reference"
        assert kernels.route("mbm-int8", "compiled") == ("compiled", mbmlib.as_multiplier("mbm-int8"), "mbm-int8")
    finally:
        mbmlib.unregister_design("scratch", "int")
    with pytest.raises(ValueError, match="unknown multiplier 'scratch-int6'"):
        mbmlib.as_multiplier("scratch-int6")


def test_unknown_names_list_the_registered_designs():
    with pytest.raises(ValueError, match=r"unknown multiplier 'booth'.*'mbm\[-t<N>\]'.*'mitchellplus\[-t<N>\]'"
                                         r".*'trunc2-int<n>'.*register_design"):
        mbmlib.as_multiplier("booth")
    with pytest.raises(ValueError, match=r"'trunc2' is registered as 'trunc2-int<n>'"):
        mbmlib.as_multiplier("trunc2-t3")


@pytest.mark.parametrize("args, error, match", [
    (("mbm", trunc2, "int"), ValueError, "a int design 'mbm' is registered already"),
    (("exact", trunc2, "int"), ValueError, "design names are lower-case"),
    (("My-Design", trunc2, "int"), ValueError, "design names are lower-case"),
    (("fresh", trunc2, "fixed"), ValueError, "design kind must be 'int' or 'float'"),
    (("fresh", 3, "int"), TypeError, "fn must be callable"),
    (("fresh", lambda a, b: (a * b).to(torch.int32), "int"), TypeError, "must return an int64 tensor"),
    (("fresh", lambda a, b: (a * b).sum(), "int"), ValueError, "one product per operand pair"),
    (("fresh", lambda a, b: (a * b) << 2, "int"), ValueError, r"outside \[0, 16\)"),
    (("fresh", lambda a, b: a - b, "int"), ValueError, "returned product -"),
    (("fresh", lambda ma, mb: ma + mb, "float"), ValueError, r"2\*\*23 <= G < 2\*\*26"),
])
def test_bad_registrations_are_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        mbmlib.register_design(*args)
    assert all(d.name != "fresh" for d in mbmlib.registered_designs())


def test_built_in_designs_cannot_be_removed():
    with pytest.raises(ValueError, match="built in"):
        mbmlib.unregister_design("mbm", "float")


def test_the_command_line_registers_design_files(tmp_path, mnist_root, monkeypatch, capsys):
    from mbmlib.workflow import cli, plugins

    design_file = tmp_path / "my_designs.py"
    design_file.write_text("import mbmlib\n\n"
                           "def trunc3(a, b):\n"
                           "    return (a * b) & ~7\n\n"
                           "mbmlib.register_design('trunc3', trunc3, kind='int')\n")
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    args = ["train", "--model", "lenet5", "--multiplier", "trunc3-int8", "--data-dir", str(mnist_root),
            "--train-samples", "16", "--val-samples", "8", "--test-samples", "8", "--batch-size", "8",
            "--runs-dir", str(tmp_path / "runs"), "--no-progress", "--speed-ratio-steps", "0", "--run-name", "t3"]
    try:
        assert cli.main(args) == 2 and "unknown multiplier 'trunc3-int8'" in capsys.readouterr().err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GenericPathWarning)
            assert cli.main(["--designs", str(design_file), *args]) == 0
        assert plugins.ENV_VAR in os.environ and str(design_file) in os.environ[plugins.ENV_VAR]  # for sweeps
        assert cli.main(["--designs", str(tmp_path / "nope.py"), "train"]) == 2
        assert "design file" in capsys.readouterr().err
    finally:
        if any(d.name == "trunc3" for d in mbmlib.registered_designs()):
            mbmlib.unregister_design("trunc3", "int")


def test_drum_and_lmul_give_the_worked_values_of_spec_section_6():
    f32 = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    for n, a, b, want in ((3, 1.5, 1.5, 2.125), (3, 1.25, 1.25, 1.625), (3, 3.0, -1.75, -4.75), (4, 1.5, 1.5, 2.125),
                          (23, 1.0, 1.0, 1.0625), (23, 1.5, 1.5, 2.0625), (7, 2.5, 0.3, 0.75390625)):
        assert mbmlib.approx_mul(f32(a), f32(b), f"lmul-m{n}").item() == want, (n, a, b)
    for k, a, b, want in ((4, 255, 255, 57600), (4, 100, 3, 312), (4, 100, 100, 10816), (4, 15, 16, 270),
                          (4, 17, 17, 324), (3, 7, 9, 70), (6, 200, 150, 30192)):
        assert mbmlib.approx_mul(torch.tensor([a]), torch.tensor([-b]), f"drum{k}-int8").item() == -want, (k, a, b)
    assert mbmlib.as_multiplier("drum4-int8").name == "drum4-int8" and mbmlib.as_multiplier("lmul-m3").param == 3
    for bad, message in (("lmul", "needs n from 1 to 23"), ("lmul-t3", "takes -m<n>, not -t<N>"),
                         ("drum9-int8", "needs k from 2 to 8"), ("mbm-m3", "takes no parameter")):
        with pytest.raises(ValueError, match=message):
            mbmlib.as_multiplier(bad)
