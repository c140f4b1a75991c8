"""``mbmlib.approximate``: every multiplying call of any model through mbmlib, without module surgery.

Held against plain references: torch's own ops (counted by a mode of our own), ``mbmlib.functional`` called
by hand, and ``mbmlib.convert``. A tiny Hugging Face GPT-2 (random weights, built from its config) is the
model that multiplies outside nn.Linear: ``Conv1D`` calls ``torch.addmm``, eager attention ``torch.matmul``,
sdpa attention ``F.scaled_dot_product_attention``, the reordered-and-upcast attention ``torch.baddbmm``.
"""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import mbmlib
from mbmlib import functional as AF
from mbmlib.approximate import OPS, approximate

transformers = pytest.importorskip("transformers")
modeling_gpt2 = pytest.importorskip("transformers.models.gpt2.modeling_gpt2")
Conv1D = transformers.pytorch_utils.Conv1D

MBM = dict(multiplier="mbm", backward="exact", backend=None)
# exact multiplier vs torch's own ops: the same products, sums maybe in another order (measured: 0 on this CPU
# for eager attention; sdpa scales the finished scores, torch's kernel scales q and k first)
EXACT_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# torch callables that multiply, as a model may call them -> the name approximate() counts them under
MULTIPLYING = {F.linear: "linear", F.conv2d: "conv2d", torch.matmul: "matmul", torch.Tensor.matmul: "matmul",
               torch.Tensor.__rmatmul__: "matmul", torch.mm: "mm", torch.Tensor.mm: "mm", torch.bmm: "bmm",
               torch.Tensor.bmm: "bmm", torch.addmm: "addmm", torch.Tensor.addmm: "addmm", torch.baddbmm: "baddbmm",
               torch.Tensor.baddbmm: "baddbmm", F.scaled_dot_product_attention: "scaled_dot_product_attention",
               torch.einsum: "einsum", torch.Tensor.addmm_: "addmm_"}


class CountCalls(TorchFunctionMode):
    """Counts the multiplying torch calls made while it is active (names as approximate() counts them)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in MULTIPLYING:
            self.counts[MULTIPLYING[func]] += 1
        return func(*args, **(kwargs or {}))


def gpt2(attn: str = "eager", **config) -> nn.Module:
    """A 2-layer GPT-2 language model with random weights and no dropout (training steps are deterministic)."""
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).eval()


IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
VARIANTS = {"eager": ("eager", {}), "sdpa": ("sdpa", {}), "upcast": ("eager", {"reorder_and_upcast_attn": True})}


@pytest.fixture(params=list(VARIANTS))
def model(request):
    attn, config = VARIANTS[request.param]
    return gpt2(attn, **config)


def conv1d_by_hand(monkeypatch, layer, ops: dict) -> None:
    """A GPT-2 Conv1D (``torch.addmm(bias, x, weight)``) computed with ``functional.matmul`` plus its bias."""
    def forward(x):
        return (AF.matmul(x.reshape(-1, x.shape[-1]), layer.weight, **ops) + layer.bias).view(*x.shape[:-1], -1)

    monkeypatch.setattr(layer, "forward", forward)


@pytest.fixture
def by_hand(monkeypatch):
    """Rewrites a GPT-2's multiplying code with mbmlib.functional ops called by hand (``ops``: their options)."""

    def rewrite(model, **ops):
        def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            weights = AF.matmul(query, key.transpose(-1, -2), **ops) * scaling
            weights = F.softmax(weights + attention_mask if attention_mask is not None else weights, dim=-1)
            return AF.matmul(weights.type(value.dtype), value, **ops).transpose(1, 2), weights

        torch_sdpa = F.scaled_dot_product_attention  # AF's own checks call it on meta tensors

        def sdpa(query, *args, **kwargs):
            if query.is_meta:
                return torch_sdpa(query, *args, **kwargs)
            return AF.scaled_dot_product_attention(query, *args, **kwargs, **ops)

        for layer in model.modules():
            if isinstance(layer, Conv1D):
                conv1d_by_hand(monkeypatch, layer, ops)
        monkeypatch.setattr(modeling_gpt2, "eager_attention_forward", eager)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        return mbmlib.convert(model, ops["multiplier"], ops["backward"], layers=(nn.Linear,), inplace=True)

    return rewrite


def logits(model, ids=IDS):
    return model(ids).logits


# ----------------------------------------------------------------------------- GPT-2


def test_every_multiplying_call_of_gpt2_goes_through_mbmlib(model):
    with torch.no_grad(), CountCalls() as alone:
        logits(model)
    with torch.no_grad(), CountCalls() as outside, approximate("mbm") as run:
        logits(model)
    assert sum(alone.counts.values()) >= 9 and "einsum" not in alone.counts and "addmm_" not in alone.counts
    assert run.counts == alone.counts and not run.passed
    assert not outside.counts  # approximate() took every one: none reached torch, none of mbmlib's own calls leaked


def test_exact_multiplier_gives_torchs_gpt2_output(model):
    with torch.no_grad():
        expected = logits(model)
        with approximate("exact"):
            out = logits(model)
    torch.testing.assert_close(out, expected, **EXACT_TOLERANCE)


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_logits_and_gradients_equal_functional_ops_called_by_hand(by_hand, attn, backward):
    model, opts = gpt2(attn), dict(MBM, backward=backward)
    with approximate(**opts) as run:
        out = logits(model)
        out.square().mean().backward()
    reference = by_hand(gpt2(attn), **opts)
    expected = logits(reference)
    expected.square().mean().backward()
    assert torch.equal(out, expected) and sum(run.counts.values()) >= 9
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.abs().sum() > 0 and torch.equal(p.grad, q.grad), name


def test_a_training_step_inside_the_context_updates_the_model():
    model = gpt2("sdpa").train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with approximate("mbm"):
        before = F.cross_entropy(logits(model)[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        before.backward()
        optimiser.step()
        after = F.cross_entropy(logits(model)[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
    assert after < before


def test_only_the_selected_ops_are_approximate():
    model = gpt2("eager")
    with torch.no_grad(), approximate("mbm", ops="linear") as run:
        out = logits(model)
    with torch.no_grad():  # convert() swaps the one nn.Linear (lm_head); Conv1D and attention stay exact
        expected = logits(mbmlib.convert(model, "mbm"))
    assert torch.equal(out, expected)
    assert run.counts == {"linear": 1}
    assert run.passed == {("addmm", "op not selected"): 8, ("matmul", "op not selected"): 4}


def test_only_calls_inside_the_selected_modules_are_approximate(monkeypatch):
    model = gpt2("eager")
    with torch.no_grad(), approximate("mbm", model=model, modules=["transformer.h.1.mlp", "lm_*"]) as run:
        out = logits(model)
    assert run.counts == {"addmm": 2, "linear": 1}
    assert run.module_counts == {"transformer.h.1.mlp.c_fc": 1, "transformer.h.1.mlp.c_proj": 1, "lm_head": 1}
    assert run.passed == {("addmm", "outside the selected modules"): 6,
                          ("matmul", "outside the selected modules"): 4}
    mlp = model.transformer.h[1].mlp
    for layer in (mlp.c_fc, mlp.c_proj):
        conv1d_by_hand(monkeypatch, layer, MBM)
    with torch.no_grad():
        expected = logits(mbmlib.convert(model, "mbm", layers=(nn.Linear,)))
    assert torch.equal(out, expected)


def test_module_counts_name_the_innermost_running_module():
    model = gpt2("eager")
    with torch.no_grad(), approximate("mbm", model=model) as run:
        logits(model)
    assert run.module_counts == {"transformer.h.0.attn": 2, "transformer.h.1.attn": 2, "lm_head": 1, **{
        f"transformer.h.{i}.{part}": 1 for i in (0, 1) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")}}


# ----------------------------------------------------------------------------- each call, against functional


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


X, W, B = _t(2, 3, 8), _t(5, 8), _t(5)
M1, M2, ADD = _t(4, 8), _t(8, 5), _t(5)
Q, K, V = _t(2, 2, 6, 8), _t(2, 2, 7, 8), _t(2, 2, 7, 4)
IMG, KER = _t(2, 4, 9, 9), _t(6, 2, 3, 3)
NAN_INPUT = torch.full((4, 5), float("nan"))
CAUSAL = torch.ones(6, 7, dtype=torch.bool).tril()
# (call under the mode, the same computation with mbmlib.functional, the name it is counted under)
CALLS = {
    "F.linear": (lambda: F.linear(X, W, B), lambda: AF.linear(X, W, B, **MBM), "linear"),
    "F.linear keywords": (lambda: F.linear(input=X, weight=W), lambda: AF.linear(X, W, **MBM), "linear"),
    "F.linear bfloat16": (lambda: F.linear(X.bfloat16(), W.bfloat16()),
                          lambda: AF.linear(X.bfloat16(), W.bfloat16(), **MBM), "linear"),
    "F.conv2d": (lambda: F.conv2d(IMG, KER, None, 2, "valid", 1, 2),
                 lambda: AF.conv2d(IMG, KER, None, 2, "valid", 1, 2, **MBM), "conv2d"),
    "F.conv2d same, unbatched": (lambda: F.conv2d(IMG[0], KER, torch.ones(6), padding="same", dilation=2, groups=2),
                                 lambda: AF.conv2d(IMG[0], KER, torch.ones(6), padding="same", dilation=2, groups=2,
                                                   **MBM), "conv2d"),
    "torch.matmul broadcast": (lambda: torch.matmul(X, M1.t()), lambda: AF.matmul(X, M1.t(), **MBM), "matmul"),
    "@": (lambda: X @ W.t(), lambda: AF.matmul(X, W.t(), **MBM), "matmul"),
    "number @ tensor (rmatmul)": (lambda: W.t().__rmatmul__(X), lambda: AF.matmul(X, W.t(), **MBM), "matmul"),
    "Tensor.matmul 1-D": (lambda: X[0, 0].matmul(W.t()), lambda: AF.matmul(X[0, 0], W.t(), **MBM), "matmul"),
    "torch.mm": (lambda: torch.mm(M1, M2), lambda: AF.matmul(M1, M2, **MBM), "mm"),
    "Tensor.mm": (lambda: M1.mm(mat2=M2), lambda: AF.matmul(M1, M2, **MBM), "mm"),
    "torch.bmm": (lambda: torch.bmm(Q[0], K[0].transpose(1, 2)), lambda: AF.bmm(Q[0], K[0].transpose(1, 2), **MBM),
                  "bmm"),
    "torch.addmm": (lambda: torch.addmm(ADD, M1, M2), lambda: AF.matmul(M1, M2, **MBM) + ADD, "addmm"),
    "torch.addmm beta alpha": (lambda: torch.addmm(ADD, M1, M2, beta=0.5, alpha=3.0),
                               lambda: AF.matmul(M1, M2, **MBM) * 3.0 + ADD * 0.5, "addmm"),
    "Tensor.addmm beta 0 ignores NaN": (lambda: NAN_INPUT.addmm(M1, M2, beta=0),
                                        lambda: AF.matmul(M1, M2, **MBM), "addmm"),
    "torch.baddbmm": (lambda: torch.baddbmm(V[0, :, :6, :1], Q[0], K[0].transpose(1, 2), alpha=0.25),
                      lambda: AF.bmm(Q[0], K[0].transpose(1, 2), **MBM) * 0.25 + V[0, :, :6, :1], "baddbmm"),
    "F.sdpa causal": (lambda: F.scaled_dot_product_attention(Q, K, V, is_causal=True),
                      lambda: AF.scaled_dot_product_attention(Q, K, V, is_causal=True, **MBM),
                      "scaled_dot_product_attention"),
    "F.sdpa mask, scale": (lambda: F.scaled_dot_product_attention(Q, K, V, attn_mask=CAUSAL, scale=0.3),
                           lambda: AF.scaled_dot_product_attention(Q, K, V, CAUSAL, scale=0.3, **MBM),
                           "scaled_dot_product_attention"),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_each_call_equals_its_functional_op_bit_for_bit(case):
    call, expected, name = CALLS[case]
    with approximate("mbm") as run:
        out = call()
    assert torch.equal(out, expected()) and not torch.equal(out, call())
    assert run.counts == {name: 1} and not run.passed


def test_every_ops_group_names_what_it_counts():
    assert {name for names in OPS.values() for name in names} == {name for _, _, name in CALLS.values()}


def test_the_backend_is_passed_on():
    with approximate("mitchell", backend="reference"):
        out = F.linear(X, W)
    assert torch.equal(out, AF.linear(X, W, multiplier="mitchell", backend="reference"))


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_equals_convert_on_a_model_of_linear_and_conv_layers(backward):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding_mode="reflect",
                                                                             padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    converted = mbmlib.convert(model, "mbm", backward)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    with approximate("mbm", backward=backward) as run:
        out = model(x)
        grad, *weights = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    expected = converted(x)
    grad_c, *weights_c = torch.autograd.grad(expected.square().sum(), [x, *converted.parameters()])
    assert torch.equal(out, expected) and torch.equal(grad, grad_c)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_c))
    assert run.counts == {"conv2d": 2, "linear": 1}


# ----------------------------------------------------------------------------- what passes through


def test_calls_it_cannot_route_pass_through_to_torch():
    ints = torch.randint(-5, 5, (3, 4))
    out = torch.empty(4, 5)
    with approximate("mbm") as run:
        int_product = ints @ ints.t()
        torch.mm(M1, M2, out=out)
        half_and_float = pytest.raises(RuntimeError, torch.mm, M1.half(), M2)
        complex_product = torch.matmul(M1.cfloat(), M2.cfloat())
        summed = torch.einsum("ik,kj->ij", M1, M2)
    assert torch.equal(int_product, torch.matmul(ints, ints.t())) and torch.equal(out, torch.mm(M1, M2))
    assert torch.equal(complex_product, torch.matmul(M1.cfloat(), M2.cfloat()))
    assert torch.equal(summed, torch.einsum("ik,kj->ij", M1, M2)) and half_and_float
    not_float = "operands are not float tensors of one dtype and device"
    assert run.passed == {("matmul", not_float): 2, ("mm", "out= given"): 1, ("mm", not_float): 1}
    assert not run.counts


@pytest.mark.parametrize("call", [
    lambda: torch.mm(X, M2), lambda: torch.bmm(M1, M2), lambda: torch.matmul(M1, M1), lambda: F.linear(X, M2),
    lambda: torch.addmm(torch.ones(3), M1, M2), lambda: torch.baddbmm(ADD, Q[0], K[0]),
    lambda: F.conv2d(IMG, KER), lambda: F.conv2d(IMG, KER, groups=2, padding="full"),
    lambda: F.scaled_dot_product_attention(Q, K, V, attn_mask=CAUSAL, is_causal=True),
    lambda: F.scaled_dot_product_attention(Q, K[..., :5], V)])
def test_arguments_torch_refuses_raise_torchs_own_error(call):
    with pytest.raises(RuntimeError) as torchs:
        call()
    with approximate("mbm"), pytest.raises(RuntimeError) as ours:
        call()
    assert str(ours.value).split("\n")[0] == str(torchs.value).split("\n")[0]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(multiplier="mbm-int8"), ValueError, "needs a scale per operand tensor: use mbmlib.convert(model, 'mbm-int8')"
                                              " and mbmlib.calibrate(model, batches)"),
    (dict(multiplier="booth"), ValueError, "unknown multiplier 'booth'"),
    (dict(ops=("linear", "einsum")), ValueError, "unknown ops ['einsum']; choose among 'linear', 'conv2d'"),
    (dict(ops=()), ValueError, "ops is empty; choose among"),
    (dict(backward="fast"), ValueError, "unknown backward mode 'fast'"),
    (dict(backend="cuda"), ValueError, "unknown backend 'cuda'; valid backends are None, 'auto'"),
    (dict(modules="lm_head"), ValueError, "modules= selects by module name and needs model="),
    (dict(model=lambda x: x), TypeError, "model must be a torch.nn.Module, got function"),
    (dict(model=nn.Linear(2, 2), modules=["weight"]), ValueError, "module pattern 'weight' matches no module"),
])
def test_bad_options_are_one_clear_error(kwargs, error, message):
    with pytest.raises(error) as caught:
        approximate(**kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- contexts: hooks, nesting, no_grad


def test_hooks_live_for_the_context_only_even_when_the_model_raises():
    model = gpt2("eager")
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with pytest.raises(IndexError), approximate("mbm", model=model, modules="transformer.h.0") as run:
        assert hooks() == 2 * len(list(model.modules()))
        logits(model, torch.tensor([[3, 60]]))  # token 60 is out of the vocabulary: the embedding raises
    assert hooks() == 0 and not run._running
    with approximate("mbm", model=model, modules="transformer.h.0") as run:
        logits(model)
    assert run.counts == {"addmm": 4, "matmul": 2}  # the failed forward left no module "running"


@pytest.mark.parametrize("model", [None, nn.Linear(2, 2)])
def test_one_context_object_cannot_be_entered_twice_at_once_but_counts_over_entries(model):
    run = approximate("mbm", model=model)
    with run:
        F.linear(X, W)
        with pytest.raises(RuntimeError, match="already active"):
            run.__enter__()
    with run:
        F.linear(X, W)
    assert run.counts == {"linear": 2}


def test_nested_contexts_the_innermost_decides_what_it_routes():
    a, w, b = _t(3, 8), _t(4, 8), _t(4, 6)
    with approximate("mitchell") as outer, approximate("mbm", ops="matmul") as inner:
        out = torch.matmul(F.linear(a, w), b)
    expected = AF.matmul(AF.linear(a, w, multiplier="mitchell"), b, multiplier="mbm")
    assert torch.equal(out, expected)
    assert inner.counts == {"matmul": 1} and outer.counts == {"linear": 1}
    assert inner.passed == {("linear", "op not selected"): 1} and not outer.passed


def test_under_no_grad_nothing_records_a_graph():
    x = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad(), approximate("mbm") as run:
        out = F.linear(x, W)
    assert not out.requires_grad and torch.equal(out, AF.linear(x, W).detach()) and run.counts == {"linear": 1}


# ----------------------------------------------------------------------------- torch.compile


def test_a_model_compiled_outside_the_context_runs_approximate_inside_it_and_exact_after():
    model = gpt2("sdpa")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with approximate("mbm", model=model, modules="transformer.h.1") as eager:
        expected = logits(model)
        expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with approximate("mbm", model=model, modules="transformer.h.1") as run:
        out = logits(compiled)
        out.sum().backward()
        logits(compiled)
    assert torch.equal(out, expected) and all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert run.counts == {k: 2 * v for k, v in eager.counts.items()}  # counted on every compiled call
    with torch.no_grad():
        assert torch.equal(logits(compiled), logits(model))  # no approximate graph left behind


def test_a_context_inside_a_compiled_function():
    a, w = _t(5, 8), _t(6, 8)

    def f(a, w):
        with approximate("mbm"):
            return torch.relu(F.linear(a, w, B[:1].expand(6))) @ w

    out = torch.compile(f, fullgraph=True)(a, w)
    expected = AF.matmul(torch.relu(AF.linear(a, w, B[:1].expand(6))), w)
    assert torch.equal(out, expected)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # fnmatch's, traced
def test_module_hooks_inside_a_compiled_function_break_the_graph_and_fullgraph_says_why():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = _t(3, 8)

    def f(x):
        with approximate("mbm", model=model, modules="2"):
            return model(x)

    with approximate("mbm", model=model, modules="2"):
        expected = model(x)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="enter it around the compiled call"):
        torch.compile(f, backend="eager", fullgraph=True)(x)
    assert torch.equal(torch.compile(f, backend="eager")(x), expected)  # (compiled after: dynamo caches by code)
