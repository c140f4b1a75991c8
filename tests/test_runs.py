"""Runs never lose or mix results, and every bad input to the CLI is one line and a documented exit status."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbmlib.workflow import cli, store

REPO = Path(__file__).parent.parent


@pytest.fixture
def T(tmp_path, mnist_root):
    """The issue's command T as a function: ``python -m mbmlib train`` on a small subset, in-process."""

    def run(*args):
        return cli.main(["train", "--data-dir", str(mnist_root), "--train-samples", "64", "--val-samples", "40",
                         "--test-samples", "40", "--no-progress", "--speed-ratio-steps", "0",
                         "--runs-dir", str(tmp_path / "runs"), *args])

    return run


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_default_names_differ_when_the_settings_do(T, tmp_path, capsys):
    assert T("--multiplier", "exact", "--lr", "0.003") == 0
    assert T("--multiplier", "exact", "--lr", "0.01", "--train-samples", "128") == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))  # .locks
    assert len(names) == 2 and any("lr0.01" in n and "n128" in n for n in names), names


def test_rerun_is_refused_and_leaves_the_earlier_run_untouched(T, tmp_path, capsys):
    assert T("--multiplier", "exact", "--run-name", "a") == 0
    before = digests(tmp_path / "runs" / "a")
    capsys.readouterr()
    assert T("--multiplier", "exact", "--lr", "0.0001", "--run-name", "a") == 2
    err = one_error_line(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert digests(tmp_path / "runs" / "a") == before


def test_overwrite_moves_the_earlier_run_aside(T, tmp_path):
    assert T("--multiplier", "exact", "--run-name", "a") == 0
    before = digests(tmp_path / "runs" / "a")
    assert T("--multiplier", "exact", "--lr", "0.0001", "--run-name", "a", "--overwrite") == 0
    (aside,) = (tmp_path / "runs" / ".replaced").iterdir()
    assert aside.name.startswith("a-") and digests(aside) == before
    assert json.loads((tmp_path / "runs" / "a" / "config.json").read_text())["lr"] == 0.0001


@pytest.mark.slow
def test_killed_overwrite_rerun_changes_no_file_of_the_earlier_run(tmp_path, mnist_root):
    common = [sys.executable, "-m", "mbmlib", "train", "--data-dir", str(mnist_root), "--val-samples", "40",
              "--test-samples", "40", "--no-progress", "--speed-ratio-steps", "0", "--multiplier", "exact",
              "--runs-dir", str(tmp_path / "runs"), "--run-name", "mix", "--log-interval", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(common + ["--train-samples", "64", "--epochs", "2"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before = digests(tmp_path / "runs" / "mix")
    rerun = subprocess.Popen(common + ["--lr", "0.0001", "--overwrite"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in rerun.stdout:  # kill it mid-way through its first epoch
        if line.startswith("Train Epoch: 1 ["):
            rerun.send_signal(signal.SIGKILL)
            break
    rerun.wait(timeout=60)
    assert rerun.returncode == -signal.SIGKILL
    (aside,) = (tmp_path / "runs" / ".replaced").iterdir()
    assert digests(aside) == before  # every file of the earlier run, byte for byte
    new = tmp_path / "runs" / "mix"
    assert json.loads((new / "config.json").read_text())["lr"] == 0.0001
    assert not (new / "metrics.json").exists() or json.loads((new / "metrics.json").read_text())["status"] != "finished"
    assert not (new / "checkpoint.pt").exists()


def test_resume_refuses_another_config_and_names_the_fields(T, capsys):
    assert T("--multiplier", "exact", "--run-name", "m1") == 0
    capsys.readouterr()
    assert T("--multiplier", "mbm", "--epochs", "2", "--run-name", "m1", "--resume") == 2
    err = one_error_line(capsys)
    assert "multiplier: 'exact' in the run, 'mbm' now" in err
    assert T("--model", "lenet5", "--multiplier", "exact", "--epochs", "2", "--run-name", "m1", "--resume") == 2
    assert "model: 'seednet' in the run, 'lenet5' now" in one_error_line(capsys)
    assert T("--multiplier", "exact", "--epochs", "2", "--run-name", "m1", "--resume") == 0  # epochs may change


def test_resume_cleans_temporaries_a_killed_writer_left(T, tmp_path):
    assert T("--multiplier", "exact", "--run-name", "k") == 0
    stale = tmp_path / "runs" / "k" / ".metrics.json.abc123.tmp"
    stale.write_text("{half")
    assert T("--multiplier", "exact", "--epochs", "2", "--run-name", "k", "--resume") == 0
    assert not stale.exists()
    assert store.remove_stale_temporaries(tmp_path / "runs" / "k") == []


def test_damaged_checkpoint_is_a_clear_error(T, tmp_path, capsys):
    assert T("--multiplier", "exact", "--run-name", "c") == 0
    (tmp_path / "runs" / "c" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert T("--multiplier", "exact", "--epochs", "2", "--run-name", "c", "--resume") == 2
    assert "cannot be read" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--device", "foo"], "device 'foo' is not a device name"),
    (["--device", "cuda:97"], "device 'cuda:97' asked for, but"),
    (["--step-size", "0"], "step_size must be an integer >= 1"),
    (["--step-size", "-3"], "step_size must be an integer >= 1"),
    (["--gamma", "-1"], "gamma (the StepLR decay factor) must lie in (0, 1]"),
    (["--gamma", "nan"], "gamma (the StepLR decay factor) must lie in (0, 1]"),
    (["--lr", "-0.1"], "lr must be a positive number"),
    (["--run-name", "../../escaped"], "must be a plain folder name"),
    (["--run-name", "."], "must be a plain folder name"),
    (["--multiplier", "booth"], "unknown multiplier 'booth'"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["--data-csv", "x.csv"], "a CSV has no test split"),
])
def test_bad_train_options_are_one_line_and_exit_2(T, capsys, args, message):
    assert T(*args) == 2
    assert message in one_error_line(capsys)


def test_unwritable_runs_dir_is_exit_2(mnist_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code = cli.main(["train", "--data-dir", str(mnist_root), "--train-samples", "64", "--multiplier", "exact",
                     "--runs-dir", str(blocker / "runs"), "--no-progress"])
    assert code == 2
    assert "cannot create or open" in one_error_line(capsys)


def test_an_unexpected_failure_is_exit_3_and_one_line(T, monkeypatch, capsys):
    from mbmlib.workflow import train as trainer

    def boom(*args, **kwargs):
        raise MemoryError("out of memory\nsecond line")

    monkeypatch.setattr(trainer, "_load_data", boom)
    assert T("--multiplier", "exact") == 3
    assert "MemoryError: out of memory (MBMLIB_DEBUG=1 shows the traceback)" in one_error_line(capsys)


def test_csv_runs_subset_the_validation_split(tmp_path, capsys):
    code = cli.main(["train", "--data-csv", str(REPO / "tests" / "data" / "mnist_small.csv"), "--val-samples", "5",
                     "--multiplier", "exact", "--runs-dir", str(tmp_path), "--run-name", "csv", "--no-progress",
                     "--speed-ratio-steps", "0"])
    assert code == 0
    assert json.loads((tmp_path / "csv" / "metrics.json").read_text())["data"]["val"] == 5


@pytest.mark.parametrize("args, message", [
    (["--backends", "foo"], "unknown backend(s) foo"),
    (["--batches", "0"], "batches must be integers >= 1"),
    (["--batches", "-4"], "batches must be integers >= 1"),
    (["--rounds", "0"], "rounds must be an integer >= 1"),
    (["--gemm-size", "-1"], "gemm_size must be >= 0"),
    (["--multipliers", "booth"], "unknown multiplier 'booth'"),
])
@pytest.mark.parametrize("what", ["layers", "all"])  # all: refused before the elementwise run, not after it
def test_bad_layer_bench_options_write_nothing(tmp_path, capsys, what, args, message):
    assert cli.main(["bench", what, "--out", str(tmp_path), *args]) == 2
    assert message in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--elements", "0"], "elements must be an integer >= 1"),
    (["--repeat", "0"], "repeat must be an integer >= 1"),
])
def test_bad_elementwise_bench_options_write_nothing(tmp_path, capsys, args, message):
    assert cli.main(["bench", "elementwise", "--out", str(tmp_path), *args]) == 2
    assert message in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_a_partial_backend_bench_does_not_replace_the_full_report(tmp_path, capsys):
    code = cli.main(["bench", "layers", "--out", str(tmp_path), "--backends", "reference", "--batches", "1",
                     "--gemm-size", "0", "--rounds", "1", "--multipliers", "mbm"])
    assert code == 0
    (written,) = tmp_path.iterdir()
    assert written.name.startswith("layers-reference-")


@pytest.mark.parametrize("text, message", [
    ("notebook: notebooks/02_train_mnist.ipynb\ngrid: {multiplier: [exact\n", "is not valid YAML"),
    ("notebook: notebooks/02_train_mnist.ipynb\ngrid: [a, b]\n", "'grid' must be a mapping"),
    ("notebook: 5\n", "'notebook' must be a string, got 5"),
    ("notebook: notebooks/02_train_mnist.ipynb\nname: 5\n", "'name' must be a string, got 5"),
    ("notebook: notebooks/02_train_mnist.ipynb\nafter: 5\n", "'after' takes notebook paths"),
    ("notebook: notebooks/02_train_mnist.ipynb\ngrid: {multiplier: []}\n", "grid axis 'multiplier' is empty"),
])
def test_bad_sweep_files_are_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["sweep", str(path), "--dry-run", "--root", str(REPO)]) == 2
    assert message in one_error_line(capsys)


def test_bad_sweep_override_is_exit_2(capsys):
    code = cli.main(["sweep", str(REPO / "experiments" / "demo.yaml"), "--dry-run", "--set", "multiplier=[exact"])
    assert code == 2
    assert "--set 'multiplier=[exact': the value is not valid YAML" in one_error_line(capsys)


def test_report_on_a_missing_folder_is_exit_2(tmp_path, capsys):
    assert cli.main(["report", "--results-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "nope").exists()


def test_interrupt_is_exit_3(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["report"].set_defaults(func=interrupted)
    assert cli.main(["report"]) == 3
    assert "interrupted" in one_error_line(capsys)


@pytest.mark.slow
def test_reference_convolution_stays_within_its_memory_budget():
    """The issue's case: 32x128x64x64 input, one 3x3 filter; patches used to take +1.8 GB."""
    code = """
import resource, torch
import mbmlib.functional as AF
x, w = torch.randn(32, 128, 64, 64), torch.randn(1, 128, 3, 3)
torch.nn.functional.conv2d(x, w, padding=1)  # the exact op's own workspace is not counted
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = AF.conv2d(x, w, padding=1, backend="reference")
print(out.shape[1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    channels, extra_mb = res.stdout.split()
    assert channels == "1" and float(extra_mb) < 300, f"peak extra memory {extra_mb} MB"


def test_a_sweep_with_overwrite_moves_the_earlier_run_before_papermill_writes_there(tmp_path, capsys):
    """The trainer's own --overwrite would move the folder while papermill saves the notebook into it."""
    from mbmlib.workflow import sweep

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "02_train_mnist.ipynb").write_text("{}")
    sweep._replace_if_asked({"output": str(run / "02_train_mnist.ipynb"), "parameters": {"overwrite": True}})
    assert not run.exists()
    (aside,) = (tmp_path / "runs" / ".replaced").iterdir()
    assert aside.name.startswith("r1-") and (aside / "metrics.json").exists()
    assert "moved the earlier run r1" in capsys.readouterr().out
    run.mkdir()
    (run / "02_train_mnist.ipynb").write_text("{}")  # a notebook alone is not a run: left where it is
    sweep._replace_if_asked({"output": str(run / "02_train_mnist.ipynb"), "parameters": {"overwrite": True}})
    (run / "metrics.json").write_text("{}")
    sweep._replace_if_asked({"output": str(run / "02_train_mnist.ipynb"), "parameters": {"overwrite": False}})
    assert (run / "02_train_mnist.ipynb").exists() and (run / "metrics.json").exists()


def test_failing_commands_write_nothing_into_results_or_the_data_root(tmp_path, monkeypatch, mnist_root, capsys):
    """Every command that fails on bad input leaves the results folder and the data root as they were."""
    import shutil

    from torchvision import datasets as tv

    data = tmp_path / "data"
    shutil.copytree(mnist_root, data)
    (tmp_path / "results" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MBMLIB_DATA", str(data))

    def no_network(self):
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(tv.MNIST, "download", no_network)
    snapshot = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")  # noqa: E731
                              if ".locks" not in p.parts)  # a run name's lock file is no result
    before = snapshot()
    commands = [
        ["train", "--multiplier", "booth"],
        ["train", "--dataset", "fashion-mnist", "--model", "lenet5", "--train-samples", "8"],
        ["evaluate", "--model", "lenet5"],
        ["evaluate", "--model", "lenet5", "--checkpoint", str(tmp_path / "missing.pt")],
        ["evaluate", "--model", "lenet5", "--dataset", "kmnist", "--random-weights"],
        ["sensitivity", "--model", "lenet5", "--random-weights", "--top", "-2"],
        ["bench", "layers", "--multipliers", "booth"],
    ]
    for command in commands:
        assert cli.main(command) == 2, command
        capsys.readouterr()
    assert snapshot() == before
