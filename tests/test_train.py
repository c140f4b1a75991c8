"""The trainer and the train CLI on the repo's small MNIST subset (tests/data)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mbmlib.workflow import cli, store
from mbmlib.workflow import data as mdata
from mbmlib.workflow.config import TrainConfig
from mbmlib.workflow.train import RunFolderError, TrainingDiverged, config_with_preset, train

TEST_DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


@pytest.fixture
def small_config(tmp_path, mnist_root):
    """Config factory: a few SeedNet steps on the MNIST subset, results under tmp_path/runs."""

    def make(**kw):
        opts = dict(preset="seed", data_dir=str(mnist_root), train_samples=64, val_samples=40, test_samples=40,
                    runs_dir=str(tmp_path / "runs"), progress=False, log_interval=2, speed_ratio_steps=0,
                    multiplier="exact", run_name="t")
        opts.update(kw)
        return config_with_preset(opts.pop("preset"), **opts)

    return make


def read_history(run_dir):
    import csv

    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_run_writes_results_and_logs_original_format(tmp_path, capsys, small_config):
    metrics = train(small_config(multiplier="mbm", epochs=2, speed_ratio_steps=2))
    out = capsys.readouterr().out
    assert "Train Epoch: 1 [32/64 (50%)] Loss:" in out
    run = tmp_path / "runs" / "t"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "finished" and len(m["epochs"]) == 2
    assert m["runtime"]["device_name"] and m["runtime"]["torch"] == torch.__version__
    assert 0 <= m["final"]["val_accuracy"] <= 100 and m["final"]["samples_per_s"] > 0
    assert m["final"]["speed"]["approx_to_exact_time_per_sample"] > 0
    assert json.loads((run / "config.json").read_text())["multiplier"] == "mbm"
    hist = read_history(run)
    assert len(hist) == 8 and [int(r["step"]) for r in hist] == list(range(1, 9))
    assert (run / "checkpoint.pt").exists()
    assert metrics["final"] == m["final"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_resume_continues_the_same_loss_curve(tmp_path, small_config):
    straight = train(small_config(epochs=2, run_name="straight"))
    train(small_config(epochs=1, run_name="resumed"))
    resumed = train(small_config(epochs=2, run_name="resumed", resume=True))
    a = [float(r["loss"]) for r in read_history(tmp_path / "runs" / "straight")]
    b = [float(r["loss"]) for r in read_history(tmp_path / "runs" / "resumed")]
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert resumed["final"]["val_accuracy"] == pytest.approx(straight["final"]["val_accuracy"])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, small_config):
    with pytest.raises(RunFolderError, match="no checkpoint"):
        train(small_config(resume=True, run_name="never-ran"))


def test_nan_loss_stops_with_message(tmp_path, monkeypatch, small_config):
    real = mdata.load_mnist

    def poisoned(*args, **kwargs):
        d = real(*args, **kwargs)
        d.x_train[:] = float("nan")
        return d

    monkeypatch.setattr(mdata, "load_mnist", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 1, step 1"):
        train(small_config())
    m = json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())
    assert m["status"] == "diverged" and "nan" in m["error"]


def test_max_steps_and_bad_config(tmp_path, small_config):
    m = train(small_config(epochs=3, max_steps=5))
    assert m["global_step"] == 5 and m["stopped_at_max_steps"]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        small_config(batch_size=0)
    with pytest.raises(ValueError, match="preset must be one of seed"):
        config_with_preset("nope")
    with pytest.raises(ValueError, match="valid truncations"):
        small_config(multiplier="mbm-t99")
    with pytest.raises(ValueError, match="valid names"):
        small_config(multiplier="booth")
    with pytest.raises(ValueError, match="unknown model .resnet.; valid choices are example, lenet5, resnet20, resnet8, seednet"):
        small_config(model="resnet")


def test_csv_training(tmp_path, small_config):
    m = train(small_config(data_csv=str(TEST_DATA / "mnist_small.csv"), train_samples=None,
                           val_samples=None, test_samples=None))
    assert m["status"] == "finished" and m["final"]["test_accuracy"] is None


def test_atomic_write_keeps_old_file_when_killed_midway(tmp_path):
    path = tmp_path / "metrics.json"
    store.write_json(path, {"ok": 1})

    def half_then_die(f):
        f.write('{"partial": ')
        raise KeyboardInterrupt  # as a kill during the write

    with pytest.raises(KeyboardInterrupt):
        store.atomic_write(path, half_then_die)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_cli_help_documents_every_config_field_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "(default: None) (default" not in text and text.count("(default: 16)") == 1  # batch size, once
    assert "exit status: 0 done, 1 training diverged" in text


def test_cli_missing_data_says_which_files(tmp_path, capsys, monkeypatch):
    from torchvision import datasets

    def offline(self):
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    code = cli.main(["train", "--data-dir", str(tmp_path / "nothing"), "--multiplier", "exact",
                     "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train-images-idx3-ubyte.gz" in err and str(tmp_path / "nothing") in err


@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_model_as_one(tmp_path, mnist_root):
    """Two ranks with batch 8 each see, step by step, the 16 samples one process sees with batch 16.

    LeNet-5 has no BatchNorm or dropout, so averaging the ranks' gradients (DDP) is the gradient of the
    16-sample mean: both runs must end with the same epoch loss and the same validation accuracy.
    """
    common = ["--model", "lenet5", "--optimizer", "sgd", "--lr", "0.05", "--multiplier", "exact", "--data-dir",
              str(mnist_root), "--train-samples", "128", "--val-samples", "40", "--test-samples", "40", "--epochs", "1",
              "--no-progress", "--speed-ratio-steps", "0", "--runs-dir", str(tmp_path / "runs")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    single = subprocess.run([sys.executable, "-m", "mbmlib", "train", *common, "--batch-size", "16",
                             "--run-name", "single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    # --standalone: a free port of torchrun's choosing, not a fixed one another test run may hold at the same time
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mbmlib", "train", *common, "--batch-size", "8",
                          "--run-name", "ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    m1 = json.loads((tmp_path / "runs" / "single" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "runs" / "ddp" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["status"] == "finished"
    assert m2["epochs"][0]["samples"] == 128 and m2["epochs"][0]["steps"] == m1["epochs"][0]["steps"] == 8
    assert m2["epochs"][0]["train_loss"] == pytest.approx(m1["epochs"][0]["train_loss"], rel=1e-4)
    assert m2["final"]["val_loss"] == pytest.approx(m1["final"]["val_loss"], rel=1e-4)
    assert m2["final"]["val_accuracy"] == m1["final"]["val_accuracy"]
    assert ddp.stdout.count("finished:") == 1  # only rank 0 reports and writes


# ----------------------------------------------------------------------------- one writer per run, nothing mixed

_HOLDER = """
import sys, time
from mbmlib.workflow.store import lock_run
lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_folder_is_locked_against_a_second_process(tmp_path, small_config):
    """Two processes for one run name: the second is refused at once, before any data loads; kill -9 frees it."""
    run_dir = tmp_path / "runs" / "t"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(store.RunFolderInUse, match=f"run folder .*t is in use by process {holder.pid}"):
            train(small_config())
        assert not (run_dir / "config.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process
        holder.wait()
    assert train(small_config())["status"] == "finished"


def test_a_run_without_a_finished_epoch_is_rerun_or_resumed_from_the_start(tmp_path, small_config, monkeypatch):
    from mbmlib.workflow import train as trainer

    real = trainer._train_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(small_config())
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "config.json").exists() and not (run_dir / store.CHECKPOINT).exists()
    monkeypatch.setattr(trainer, "_train_epoch", real)
    assert train(small_config(resume=True))["status"] == "finished"  # --resume: from the beginning
    monkeypatch.setattr(trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(run_name="u"))
    monkeypatch.setattr(trainer, "_train_epoch", real)
    assert train(small_config(run_name="u"))["status"] == "finished"  # a plain rerun replaces it
    assert list((tmp_path / "runs" / ".replaced").glob("u-*"))  # the failed attempt moved aside, not lost


def test_resume_refuses_a_changed_table_or_another_world_size(tmp_path, small_config):
    import mbmlib

    table = tmp_path / "t4.csv"
    mbmlib.write_csv("mbm-int4", table)
    cfg = dict(model="lenet5", multiplier=f"table:{table}", run_name="tab")
    train(small_config(epochs=1, **cfg))
    checkpoint = tmp_path / "runs" / "tab" / store.CHECKPOINT
    state = torch.load(checkpoint, weights_only=False)
    state["world_size"] = 2
    torch.save(state, checkpoint)
    with pytest.raises(RunFolderError, match="started with 2 process.*torchrun --nproc-per-node 2"):
        train(small_config(epochs=2, resume=True, **cfg))
    state["world_size"] = 1
    torch.save(state, checkpoint)
    mbmlib.write_csv("mitchell-int4", table)  # the same path, another table
    with pytest.raises(RunFolderError, match="the table file has changed"):
        train(small_config(epochs=2, resume=True, **cfg))
