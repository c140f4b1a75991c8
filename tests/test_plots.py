"""mbmlib.workflow.plots: the overview loss figure's grouping and the figure itself."""
import pandas as pd

from mbmlib.workflow import plots


def _runs_and_history():
    runs = pd.DataFrame({
        "run": ["a-exact", "a-mbm", "a-mbm-s1", "b-exact", "a-small"],
        "multiplier": ["exact", "mbm", "mbm", "exact", "mitchell"],
        "runtime": ["AMD EPYC CPU", "AMD EPYC CPU", "AMD EPYC CPU", "Intel Xeon CPU", "AMD EPYC CPU"],
        "train_samples": [48000, 48000, 48000, 48000, 2048],
    })
    history = pd.concat([pd.DataFrame({"run": run, "step": range(1, 31), "loss": [2.0 / s for s in range(1, 31)]})
                         for run in list(runs["run"]) + ["no-metrics"]])
    return runs, history


def test_runs_are_grouped_by_runtime_and_epoch_size_largest_first():
    runs, history = _runs_and_history()
    assert plots.loss_groups(history, runs) == {
        ("AMD EPYC CPU", 48000): ["a-exact", "a-mbm", "a-mbm-s1"],
        ("AMD EPYC CPU", 2048): ["a-small"],
        ("Intel Xeon CPU", 48000): ["b-exact"],
    }  # the history of a run without metrics ("no-metrics") is left out


def test_loss_panels_writes_a_png_also_without_any_history(tmp_path):
    runs, history = _runs_and_history()
    path = plots.loss_panels(history, runs, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = plots.loss_panels(history.iloc[:0], runs, tmp_path / "empty.png")
    assert empty.exists()
