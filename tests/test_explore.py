"""explore: per-layer design assignments searched for accuracy against energy, their files, and the command."""
import json
from pathlib import Path

import pytest
import torch

import mbmlib
from mbmlib.nn import read_multiplier_map
from mbmlib.workflow import cli, report
from mbmlib.workflow.config import config_with_preset, default_run_name
from mbmlib.workflow.evaluate import approximate, evaluate_multipliers, load_model_and_data
from mbmlib.workflow.explore import (USER_GIVEN, Scorer, best_within, design_costs, explore, parse_costs)

REPO = Path(__file__).parent.parent
LENET = REPO / "results" / "models" / "lenet5-mnist-exact.pt"  # LeNet-5 trained on MNIST (committed)
DESIGNS = ["mbm", "mitchell", "mbm-int8"]
SEARCH = dict(max_loss=1.0, evaluations=30, seed=0, population=6, progress=False)


@pytest.fixture(scope="module")
def lenet(mnist_root):
    """The trained LeNet-5 and 100 held-out validation images of the test subset of MNIST."""
    return load_model_and_data("lenet5", "mnist", LENET, False, mnist_root, "val", None, 50, torch.device("cpu"))


@pytest.fixture(scope="module")
def searched(lenet):
    base, data = lenet
    return explore(base, data, DESIGNS, design_costs(DESIGNS), **SEARCH)


def dominates(a: dict, b: dict) -> bool:
    return (a["top1"] >= b["top1"] and a["relative_energy"] <= b["relative_energy"]
            and (a["top1"] > b["top1"] or a["relative_energy"] < b["relative_energy"]))


class TestSearch:
    """One search, shared: a class, so that pytest-xdist gives its tests to one worker (see conftest.py)."""

    def test_the_front_is_non_dominated_holds_exact_and_covers_every_uniform_assignment(self, searched):
        points, front = searched["points"], searched["front"]
        assert len(points) == 30 == searched["evaluations"]
        assert len({tuple(p["assignment"].values()) for p in points}) == 30  # each assignment scored once
        for f in front:
            if not f["reference"]:
                assert not any(dominates(p, f) for p in points), f
        exact = [f for f in front if f["label"] == "all exact"]
        assert len(exact) == 1 and exact[0]["relative_energy"] == 1.0 and exact[0]["top1_drop"] == 0
        assert exact[0]["reference"] == any(dominates(p, exact[0]) for p in points)
        uniform = [p for p in points if p["origin"] == "uniform"]
        assert {p["label"] for p in uniform} == {"all exact", "uniform mbm", "uniform mitchell", "uniform mbm-int8"}
        for u in uniform:
            assert any(f["top1"] >= u["top1"] and f["relative_energy"] <= u["relative_energy"] for f in front), u
        origins = [p["origin"] for p in points]
        assert origins[:4] == ["uniform"] * 4 and origins[4:19] == ["one-layer"] * 15 and "search" in origins

    def test_the_same_seed_gives_the_same_points_and_front(self, lenet, searched):
        base, data = lenet
        again = explore(base, data, DESIGNS, design_costs(DESIGNS), **SEARCH)
        strip = lambda ps: [(p["origin"], p["top1"], p["relative_energy"], p["assignment"]) for p in ps]  # noqa: E731
        assert strip(again["points"]) == strip(searched["points"])
        assert strip(again["front"]) == strip(searched["front"])

    def test_summary_is_the_best_point_and_best_uniform_within_each_loss(self, searched):
        for row in searched["summary"]:
            fits = [p for p in searched["points"] if p["top1_drop"] <= row["max_loss"]]
            assert row["best_energy"] == min(p["relative_energy"] for p in fits)
            assert row["uniform_energy"] == min(p["relative_energy"] for p in fits if p["origin"] == "uniform")
            assert row["best_energy"] <= row["uniform_energy"]
        assert best_within(searched["points"], -1.0) is None

    def test_scores_and_energy_equal_a_fresh_calibration_and_model_energy(self, lenet, searched):
        """Per-design calibration gives the scales a fresh calibration of the mixed model gives, bit for bit."""
        base, data = lenet
        scorer = Scorer(base, data, searched["layers"], searched["macs"], design_costs(DESIGNS + ["mitchell-int8"]))
        mixed = ("mbm-int8", "mbm", "mitchell-int8", "exact", "mbm-int8")
        fresh = approximate(base, dict(zip(searched["layers"], mixed)), data.calibration)
        x = data.batches[0][0]
        with torch.no_grad():
            assert torch.equal(scorer.model(mixed).eval()(x), fresh.eval()(x))
        energy, sources = scorer.energy(mixed)
        assert energy == pytest.approx(mbmlib.model_energy(fresh)["relative_energy"], rel=1e-12)
        assert sources == ["Saadat et al., TCAD 2018, Table I (45 nm, 1 GHz)"]
        row, new = scorer.score(mixed)
        assert new and scorer.score(mixed) == (row, False)  # a repeat comes from the cache


def test_costs_published_user_given_and_refused(tmp_path):
    costs = design_costs(["mbm-int8", "drum4-int8"], parse_costs(["drum4-int8=0.5"]))
    assert costs["mbm-int8"].relative_power == pytest.approx(21.6 / 35.3) and costs["drum4-int8"].source == USER_GIVEN
    with pytest.raises(ValueError, match="no published cost for drum4-int8.*--cost drum4-int8=RELATIVE_POWER"):
        design_costs(["mbm", "drum4-int8"])
    with pytest.raises(ValueError, match="must be a positive number"):
        parse_costs(["drum4-int8=-1"])
    with pytest.raises(ValueError, match="NAME=RELATIVE_POWER"):
        parse_costs(["drum4-int8"])
    with pytest.raises(ValueError, match="not among --designs"):
        design_costs(["mbm"], {"drum4-int8": 0.5})
    (tmp_path / "c.csv").write_text("design,relative_power\ndrum3-int8,0.4\ndrum4-int8,x\n")
    with pytest.raises(ValueError, match=r"c.csv:3: the relative power of drum4-int8"):
        parse_costs(files=[tmp_path / "c.csv"])


@pytest.fixture(scope="module")
def explored(tmp_path_factory, mnist_root):
    """The command, once, into a temporary results folder, with a user-given DRUM cost and fine-tuning."""
    out = tmp_path_factory.mktemp("explore")
    args = ["explore", "--model", "lenet5", "--checkpoint", str(LENET), "--data-dir", str(mnist_root), "--designs",
            "mbm", "mitchell-int8", "drum4-int8", "--cost", "drum4-int8=0.3", "--samples", "60", "--evaluations", "26",
            "--population", "4", "--finetune", "1", "--finetune-samples", "40", "--device", "cpu", "--no-progress",
            "--batch-size", "30", "--out", str(out / "explore"), "--figures", str(out / "figures")]
    assert cli.main(args) == 0
    return out, args


class TestCommand:
    """One run of the command, shared: a class, so that pytest-xdist gives its tests to one worker (see
    conftest.py)."""

    def test_the_command_writes_points_front_assignments_and_figure(self, explored):
        out, _ = explored
        folder = out / "explore" / "lenet5-mnist"
        result = json.loads((folder / "explore.json").read_text())
        assert result["costs"]["drum4-int8"] == {"design": "drum4-int8", "relative_power": 0.3, "source": USER_GIVEN}
        assert result["search_split"] == "val" and result["search_samples"] == 60 and result["test_samples"] == 100
        assert len((folder / "points.csv").read_text().splitlines()) == 27
        front = json.loads((folder / "front.json").read_text())
        tested = [p for p in front if "test_top1" in p]
        assert tested and all(p["top1_drop"] <= 1.0 and "finetuned_test_top1" in p for p in tested)
        assert {f"point-{p['id']}.json" for p in front} == {f.name for f in (folder / "assignments").iterdir()}
        assert (out / "figures" / "explore-lenet5-mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        uses_drum = [p for p in result["points"] if "drum4-int8" in p["assignment"].values()]
        assert uses_drum and all(USER_GIVEN in p["sources"] for p in uses_drum)

    def test_assignment_files_round_trip_through_convert_and_evaluate(self, explored, mnist_root):
        out, _ = explored
        folder = out / "explore" / "lenet5-mnist"
        tested = [p for p in json.loads((folder / "front.json").read_text()) if "test_top1" in p]
        point = max(tested, key=lambda p: len(set(p["assignment"].values())))  # the most mixed point re-scored
        path = folder / "assignments" / f"point-{point['id']}.json"
        assert read_multiplier_map(path) == point["assignment"]
        base, _ = load_model_and_data("lenet5", "mnist", LENET, False, mnist_root, "val", 60, 30, torch.device("cpu"))
        for converted in (mbmlib.convert(base, multiplier=str(path)), mbmlib.convert(base, multiplier=path)):
            got = {n: m.multiplier.name for n, m in converted.named_modules() if isinstance(m, (mbmlib.MBMConv2d,
                                                                                              mbmlib.MBMLinear))}
            assert got == point["assignment"]
        scores = {}
        for split, samples in (("val", 60), ("test", None)):
            rows = evaluate_multipliers("lenet5", "mnist", ["exact"], LENET, root=mnist_root, split=split,
                                        samples=samples, batch_size=30, device="cpu", progress=False,
                                        multiplier_maps=[path])["results"]
            assert rows[1]["multiplier"] == f"map:point-{point['id']}"
            scores[split] = rows[1]["top1"]
        assert scores["val"] == point["top1"]  # the search's score, calibrated once per design
        assert scores["test"] == point["test_top1"]

    def test_a_results_folder_is_never_reused_and_bad_input_is_one_line(self, explored, capsys):
        out, args = explored
        before = (out / "explore" / "lenet5-mnist" / "explore.json").read_text()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "lenet5-mnist exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
        assert (out / "explore" / "lenet5-mnist" / "explore.json").read_text() == before
        base = ["explore", "--random-weights", "--device", "cpu", "--no-progress", "--out", str(out / "x"), "--figures",
                str(out / "x"), "--designs"]
        for extra, message in ((["drum4-int8"], "no published cost for drum4-int8"),
                               (["bogus"], "valid names are"),
                               (["mbm", "--evaluations", "10"], "--evaluations 10 leaves no room for the search"),
                               (["mbm", "--max-loss", "-1"], "--max-loss must be 0 or more")):
            assert cli.main(base + extra) == 2, extra
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1
        assert not (out / "x").exists()

    def test_report_summarises_explore_results(self, explored):
        out, _ = explored
        table = report.load_explore(out)
        assert list(table["max_loss"]) == [0.5, 1.0] and set(table["explore"]) == {"lenet5-mnist"}
        written = report.write_summary(out)
        assert "| lenet5-mnist |" in written["explore_markdown"].read_text()


def test_train_takes_an_assignment_file(tmp_path, mnist_root):
    from mbmlib.workflow.train import train

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"multipliers": {"features.*": "mbm-int8", "classifier.4": "mitchell"}}))
    cfg = config_with_preset("seed", model="lenet5", multiplier_map=str(path), data_dir=str(mnist_root),
                             train_samples=16, val_samples=8, test_samples=8, batch_size=8, max_steps=1,
                             runs_dir=str(tmp_path / "runs"), progress=False, speed_ratio_steps=0)
    assert default_run_name(cfg, "cpu").startswith("lenet5-map")
    metrics = train(cfg)
    assert metrics["status"] == "finished" and metrics["config"]["multiplier_map"] == str(path)
    with pytest.raises(ValueError, match="exclude each other"):
        config_with_preset(model="lenet5", multiplier="mitchell", multiplier_map=str(path))
    (tmp_path / "bad.json").write_text('{"layers": {}}')
    with pytest.raises(ValueError, match='no "multipliers" object'):
        config_with_preset(model="lenet5", multiplier_map=str(tmp_path / "bad.json"))
