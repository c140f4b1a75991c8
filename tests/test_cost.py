"""Published hardware costs (SPEC section 7), a model's relative multiplier energy, and the design catalogue."""
import pandas as pd
import pytest
import torch

import mbmlib
from mbmlib import Multiplier
from mbmlib.energy import layer_macs, model_energy
from mbmlib.multipliers.cost import MBM_PAPER, cost
from mbmlib.workflow import cli
from mbmlib.workflow.catalogue import catalogue, design_names, save_catalogue
from mbmlib.workflow.design_plots import pareto_front
from mbmlib.workflow.models import SeedNet, count_macs


def test_published_figures_are_ratios_within_one_source():
    mbm8 = cost("mbm-int8")
    assert mbm8.source == MBM_PAPER and mbm8.exact == "exact (Wallace)" and mbm8.width == "8-bit"
    assert mbm8.relative_power == pytest.approx(21.6 / 35.3) and mbm8.relative_area == pytest.approx(288.4 / 445.0)
    # the paper prints 38.7% saving; its rounded uW figures give 38.8% (the ratio is taken from the figures)
    assert 1 - mbm8.relative_power == pytest.approx(0.387, abs=1.5e-3)
    assert cost("mitchell-int16").relative_power == pytest.approx(40.4 / 182.2)
    assert cost("mbm").relative_power == pytest.approx(1 / 16.1) and cost("mbm").area_um2 is None
    assert cost("mitchell").relative_area == pytest.approx(1 / 13.6)
    assert cost("exact").relative_power == 1.0


@pytest.mark.parametrize("name", ["drum4-int8", "lmul-m3", "mbm-t8", "mbm-int12", "mitchell-int4"])
def test_nothing_published_is_none_never_a_guess(name):
    assert cost(name) is None


def test_a_table_with_the_products_of_a_costed_design_has_its_cost():
    table = Multiplier.from_table(mbmlib.table_from_multiplier("mitchell-int8"))
    found = cost(table)
    assert found.relative_power == cost("mitchell-int8").relative_power and found.design == table.name
    changed = mbmlib.table_from_multiplier("mitchell-int8")
    changed[3, 3] += 1
    assert cost(Multiplier.from_table(changed)) is None


def test_model_energy_weighs_each_layer_by_its_macs():
    model = mbmlib.convert(SeedNet(), multiplier={"features.0": "mbm-int8", "classifier.*": "mitchell"})
    macs = layer_macs(model)
    assert sum(macs.values()) == count_macs(SeedNet())["total"]
    report = model_energy(model, torch.zeros(4, 1, 28, 28))
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["features.0"]["relative_power"] == pytest.approx(21.6 / 35.3)
    assert rows["features.3"]["multiplier"] == "exact" and rows["features.3"]["relative_power"] == 1.0
    want = sum(m * (rows[n]["relative_power"]) for n, m in macs.items()) / sum(macs.values())
    assert report["relative_energy"] == pytest.approx(want) and report["sources"] == [MBM_PAPER]
    unknown = model_energy(mbmlib.convert(SeedNet(), multiplier="drum4-int8"))
    assert unknown["relative_energy"] is None and unknown["unknown"] == ["drum4-int8"]
    assert model_energy(SeedNet())["relative_energy"] == 1.0


def test_pareto_front_keeps_the_points_nothing_beats():
    power = [1.0, 0.5, 0.6, 0.2, 0.3]
    error = [0.0, 2.0, 1.0, 9.0, 9.5]
    assert pareto_front(power, error) == [3, 1, 2, 0]  # 0.3/9.5 is beaten by 0.2/9.0


def test_catalogue_of_the_built_in_designs(tmp_path, monkeypatch):
    monkeypatch.delenv("MBMLIB_EVOAPPROX", raising=False)
    names = design_names(6)
    assert {"mbm-int6", "mitchell-int6", "drum3-int6", "drum5-int6"} <= set(names)
    table = catalogue(6, progress=False)
    row = table.set_index("multiplier").loc["mbm-int6"]
    stats = mbmlib.error_stats("mbm-int6")
    assert row["mean_abs"] == stats["mean_abs"] and row["ep"] == stats["ep"] and row["wce"] == stats["wce"]
    assert pd.isna(row["relative_power"])  # nothing published at 6 bits
    paths = save_catalogue(table, 6, "built-in only", tmp_path / "t", tmp_path / "f")
    assert paths["csv"].name == "designs-int6.csv" and paths["figure"].stat().st_size > 10_000
    assert "| mbm-int6 " in paths["markdown"].read_text()


def test_designs_command_writes_the_catalogue(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MBMLIB_EVOAPPROX", raising=False)
    code = cli.main(["designs", "--bits", "8", "--out", str(tmp_path / "t"), "--figures", str(tmp_path / "f"),
                     "--no-progress"])
    assert code == 0
    table = pd.read_csv(tmp_path / "t" / "designs.csv")
    placed = table.set_index("multiplier")["relative_power"].dropna()
    assert placed.to_dict() == pytest.approx({"mbm-int8": 21.6 / 35.3, "mitchell-int8": 16.0 / 35.3})
    assert (tmp_path / "f" / "designs-pareto.png").exists() and "wrote figure" in capsys.readouterr().out
    assert cli.main(["designs", "--evoapprox-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


def test_evoapprox_circuits_join_the_catalogue_with_their_header_cost(tmp_path, monkeypatch):
    from test_evoapprox import fake_checkout

    monkeypatch.setenv("MBMLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MBMLIB_EVOAPPROX", raising=False)
    root = fake_checkout(tmp_path / "evoapproxlib")  # mul8s_uret (0.3 mW in its header), mul8u_bfst (no figures)
    code = cli.main(["designs", "--evoapprox-dir", str(root), "--out", str(tmp_path / "t"), "--figures",
                     str(tmp_path / "f"), "--no-progress"])
    assert code == 0
    table = pd.read_csv(tmp_path / "t" / "designs.csv").set_index("multiplier")
    signed = table.loc["evoapprox:mul8s_uret"]
    assert bool(signed["signed"]) and signed["relative_power"] == pytest.approx(0.3 / 0.425)  # vs mul8s_1KV6
    assert signed["cost_source"].startswith("EvoApproxLib") and pd.isna(table.loc["evoapprox:mul8u_bfst",
                                                                                    "relative_power"])
    assert "evoapprox:mul8x4u_asy" not in table.index  # asymmetric widths are no n x n table
    assert "(branch unknown, commit unknown)" in (tmp_path / "t" / "designs.md").read_text()  # not a git checkout
    monkeypatch.setenv("MBMLIB_EVOAPPROX", str(root))
    found = mbmlib.cost("evoapprox:mul8s_uret")
    assert found.exact == "mul8s_1KV6" and found.power_uw == pytest.approx(300.0)
