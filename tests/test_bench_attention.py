"""``bench layers`` times the two attention products (Q K^T and P V) at a GPT-sized shape against torch.matmul."""
import pytest
import torch

from mbmlib import functional as AF
from mbmlib import quant
from mbmlib.multipliers import as_multiplier
from mbmlib.workflow import bench


def test_attention_cases_are_the_two_batched_products_of_gpt_sized_attention():
    qk, pv = bench.attention_cases(4, 4)
    assert qk == ("gpt.qk@b4h4", "attention", (16, 256, 64), (16, 64, 256), 0)
    assert pv == ("gpt.pv@b4h4", "attention", (16, 256, 256), (16, 256, 64), 0)
    assert bench.ATTENTION == (4, 4)
    macs, exact, _ = bench._layer_case(*qk[1:], torch.device("cpu"))
    assert macs == 16 * 256 * 64 * 256 and exact().shape == (16, 256, 256)


@pytest.mark.parametrize("multiplier", ["mbm", "mitchell", "mbm-int8"])
def test_the_timed_call_is_the_approximate_matmul_of_two_activations(multiplier):
    mult = as_multiplier(multiplier)
    _, exact, approx = bench._layer_case("attention", (3, 5, 4), (3, 4, 6), 0, torch.device("cpu"))
    x, w = exact.args
    out = approx(mult, "reference")()
    if mult.is_integer:  # one max-abs scale per activation, as a calibrated attention layer has
        top = mult.q_range[1]  # 255: sign-magnitude 8-bit operands
        scales = dict(a_scale=x.abs().max() / top, b_scale=w.abs().max() / top)
        assert torch.equal(out, quant.matmul(x, w, **scales, multiplier=mult, backend="reference"))
    else:
        assert torch.equal(out, AF.matmul(x, w, multiplier=mult, backend="reference"))
    assert out.shape == (3, 5, 6) and not torch.equal(out, exact())
    torch.testing.assert_close(out, exact(), rtol=0.1, atol=0.1)  # approximate, not another product


def test_the_layer_bench_reports_attention_rows_with_ratios_to_torch_matmul():
    report = bench.bench_layers("cpu", batches=(1,), gemm_size=0, multipliers=("mbm", "mbm-int8"),
                                backends=["compiled"], rounds=1, progress=False, attention=(1, 2))
    rows = {(r["case"], r["multiplier"], r["backend"]): r for r in report["results"] if r["case"].startswith("gpt.")}
    assert set(rows) == {(case, mult, backend) for case in ("gpt.qk@b1h2", "gpt.pv@b1h2")
                         for mult, backend in (("exact", "torch"), ("mbm", "compiled"), ("mbm-int8", "compiled"))}
    assert rows["gpt.qk@b1h2", "exact", "torch"]["ratio_to_exact"] == 1.0
    assert all(r["macs"] == 2 * 256 * 256 * 64 and r["ratio_to_exact"] > 0 and r["G_MAC_per_s"] > 0
               for r in rows.values())
    assert report["attention"] == [1, 2]
    skipped = bench.bench_layers("cpu", batches=(1,), gemm_size=0, multipliers=("mbm",), backends=["compiled"],
                                 rounds=1, progress=False, attention=None)
    assert skipped["attention"] is None and not any(r["case"].startswith("gpt.") for r in skipped["results"])


@pytest.mark.parametrize("attention, message", [
    ((0, 4), "attention must be integers >= 1, got [0, 4]"),
    ((4,), "attention must be (batch, heads) or None"),
    (4, "attention must be (batch, heads) or None"),
])
def test_bad_attention_options_are_refused_before_timing(attention, message):
    with pytest.raises(ValueError) as caught:
        bench.bench_layers("cpu", batches=(1,), multipliers=("mbm",), attention=attention)
    assert message in str(caught.value)


def test_the_command_line_sizes_or_leaves_out_the_attention_rows(tmp_path, capsys):
    from mbmlib.workflow import cli

    base = ["bench", "layers", "--device", "cpu", "--batches", "1", "--gemm-size", "0", "--rounds", "1",
            "--multipliers", "mitchell", "--backends", "compiled", "--out", str(tmp_path)]
    assert cli.main(base + ["--attention", "1", "2"]) == 0
    assert "gpt.qk@b1h2" in capsys.readouterr().out
    assert cli.main(base + ["--no-attention"]) == 0
    assert "gpt." not in capsys.readouterr().out
    assert cli.main(base + ["--attention", "0", "2"]) != 0
    assert "attention must be integers >= 1" in capsys.readouterr().err
