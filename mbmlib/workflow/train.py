"""Training loop: train / validate / test any small model with any multiplier, and record the run.

A run writes ``<results_dir>/<run_name>/`` with ``config.json``, ``metrics.json``
(per-epoch and final figures plus the runtime description) and ``history.csv``
(step, epoch, loss, lr, elapsed), all written atomically, and a checkpoint
after every epoch that ``resume=True`` continues from.  Under ``torchrun`` the
same loop trains with DistributedDataParallel, each rank on its own shard and
rank 0 writing the results.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import check_backward
from ..multipliers import as_multiplier
from ..nn import MBMConv2d, MBMLinear, convert
from . import data as mdata
from . import runtime
from .models import build_model, model_factory
from .store import atomic_write, write_json, write_text
from .timing import compare

CHECKPOINT = "checkpoint.pt"

# The original experiment's hyper-parameters (SPEC.md section 2).
PRESETS = {
    "seed": dict(model="seednet", batch_size=16, lr=3e-3, optimizer="adam", step_size=7, gamma=0.1,
                 split_seed=123, val_fraction=0.2),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is stopped and its results say so."""


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json``."""

    model: str = "seednet"
    multiplier: str = "mbm"
    backward: str = "exact"
    approx_linear: bool = True
    backend: Optional[str] = None
    epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-3
    optimizer: str = "adam"
    step_size: int = 7
    gamma: float = 0.1
    seed: int = 0
    split_seed: int = 123
    val_fraction: float = 0.2
    device: str = "auto"
    data_dir: Optional[str] = None
    data_csv: Optional[str] = None
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    test_samples: Optional[int] = None
    max_steps: Optional[int] = None
    log_interval: int = 100
    run_name: Optional[str] = None
    results_dir: str = "results/runs"
    resume: bool = False
    progress: bool = True
    speed_ratio_steps: int = 10
    preset: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Check values early (before any data is loaded), with messages that say what to change."""
        model_factory(self.model)
        as_multiplier(self.multiplier)
        check_backward(self.backward)
        for name in ("epochs", "batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_samples", "val_samples", "test_samples", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number (or omitted), got {value}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return self


def config_with_preset(preset: Optional[str] = None, **overrides) -> TrainConfig:
    """A config from the defaults, then the preset's values, then explicit ``overrides`` (not None)."""
    values = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid presets are {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).validate()


def default_run_name(cfg: TrainConfig, runtime_label: str) -> str:
    """e.g. ``seednet-mbm-exact-b16-cpu-amd-epyc``."""
    name = f"{cfg.model}-{as_multiplier(cfg.multiplier).name}-{cfg.backward}-b{cfg.batch_size}-{runtime_label}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """Where this process stands in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def _all_mean(value: float, dist_info: Dist, device: torch.device) -> float:
    if dist_info.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist_info.world_size


# ----------------------------------------------------------------------------- pieces of the loop


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """Mean cross-entropy loss and accuracy (%) of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in mdata.batches(x, y, batch_size):
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(1, len(y))
    return {"loss": loss_sum / n, "accuracy": 100.0 * correct / n}


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def _load_data(cfg: TrainConfig, device: torch.device) -> mdata.MNISTData:
    if cfg.data_csv:
        x, y = mdata.load_csv(cfg.data_csv)
        train_idx, val_idx = mdata.stratified_split(y, cfg.val_fraction, cfg.split_seed)
        if cfg.train_samples:
            train_idx = train_idx[mdata.stratified_subset(y[train_idx], cfg.train_samples, cfg.split_seed)]
        data = mdata.MNISTData(x[train_idx], y[train_idx], x[val_idx], y[val_idx], x[val_idx[:0]], y[val_idx[:0]],
                               train_idx, val_idx)
        return data.to(device)
    return mdata.load_mnist(cfg.data_dir, split_seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                            train_samples=cfg.train_samples, val_samples=cfg.val_samples,
                            test_samples=cfg.test_samples, device=device)


def _warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    """One forward/backward on a copy, so kernel compilation is not counted in the first epoch's time.

    Runs on a deep copy with the RNG state restored afterwards: training (and a
    resumed run) sees exactly the same weights, statistics and random stream.
    """
    xb, yb = x[:batch_size], y[:batch_size]
    if len(yb) < 2:  # BatchNorm needs two samples
        return
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        twin = copy.deepcopy(model).train()
        F.cross_entropy(twin(xb), yb).backward()
        twin.eval()
        with torch.no_grad():
            twin(x[:500])  # evaluation batch shape


def _step_time_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int,
                     device: torch.device) -> Optional[dict]:
    """Seconds per training step of ``model`` and of its exact twin, interleaved in one run.

    Measured on copies (the trained model is untouched), so the run's metrics
    carry an approx-vs-exact ratio that both sides of which saw the same machine.
    """
    approx = copy.deepcopy(model).train()
    if not any(isinstance(m, (MBMConv2d, MBMLinear)) and not m.multiplier.is_exact for m in approx.modules()):
        return None
    exact = convert(approx, multiplier="exact", layers=(MBMConv2d, MBMLinear))
    xb, yb = x[:batch_size], y[:batch_size]
    if len(yb) < 2:  # BatchNorm needs two samples
        return None

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(xb), yb).backward()
        opt.step()

    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.0) for m in (approx, exact)}
    timed = compare({name: functools.partial(step, m, opts[id(m)]) for name, m in (("approx", approx),
                                                                                   ("exact", exact))},
                    device, baseline="exact", rounds=steps)  # warm-up call compiles kernels for this shape
    return {"steps": steps, "batch_size": len(yb), "approx_step_s": timed["approx"]["median_s"],
            "exact_step_s": timed["exact"]["median_s"],
            "approx_to_exact_time_per_sample": timed["approx"]["ratio_to_exact"]}


# ----------------------------------------------------------------------------- results files


class RunWriter:
    """Writes a run's folder: config, metrics, history and checkpoints, each atomically."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.dir = run_dir
        self.enabled = enabled

    def config(self, cfg: TrainConfig) -> None:
        if self.enabled:
            write_json(self.dir / "config.json", dataclasses.asdict(cfg))

    def metrics(self, metrics: dict) -> None:
        if self.enabled:
            write_json(self.dir / "metrics.json", metrics)

    def history(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["step", "epoch", "loss", "lr", "elapsed"])
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.dir / "history.csv", buf.getvalue())

    def checkpoint(self, state: dict) -> None:
        if self.enabled:
            atomic_write(self.dir / CHECKPOINT, lambda f: torch.save(state, f), mode="wb")


def _log(msg: str, dist_info: Dist) -> None:
    if dist_info.is_main:
        print(msg, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Run the training described by ``cfg``; return the final metrics (also written to disk)."""
    cfg.validate()
    device = runtime.resolve_device(cfg.device)
    dist_info = init_distributed(device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist_info.rank)))
        torch.cuda.set_device(device)
    info = runtime.describe(device)
    run_name = cfg.run_name or default_run_name(cfg, info["runtime"])
    writer = RunWriter(Path(cfg.results_dir) / run_name, dist_info.is_main)

    torch.manual_seed(cfg.seed)
    data = _load_data(cfg, device)
    model = build_model(cfg.model, multiplier=cfg.multiplier, backward=cfg.backward,
                        approx_linear=cfg.approx_linear, backend=cfg.backend).to(device)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    train_model = model
    if dist_info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    history: list[dict] = []
    epochs: list[dict] = []
    start_epoch, global_step, elapsed_before = 1, 0, 0.0
    ckpt_path = writer.dir / CHECKPOINT
    if cfg.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run without --resume first, "
                                    "or pass the --run-name of the run to continue")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        history, epochs, elapsed_before = state["history"], state["epochs"], state["elapsed"]
        _log(f"resuming {run_name} after epoch {state['epoch']} (step {global_step})", dist_info)
    writer.config(cfg)

    n_train = len(data.y_train)
    steps_per_epoch = mdata.num_batches(n_train, cfg.batch_size, world_size=dist_info.world_size)
    metrics = {"run_name": run_name, "status": "running", "config": dataclasses.asdict(cfg), "runtime": info,
               "world_size": dist_info.world_size, "data": data.sizes(), "epochs": epochs}
    _log(f"run {run_name}: {cfg.model} with multiplier {as_multiplier(cfg.multiplier).name} "
         f"(backward {cfg.backward}) on {info['device_name']} ({info['device']}), "
         f"{n_train} training samples, {steps_per_epoch} steps/epoch", dist_info)
    _warm_up(model, data.x_train, data.y_train, cfg.batch_size)
    t_start = time.perf_counter() - elapsed_before
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.max_steps is not None and global_step >= cfg.max_steps:
            stopped_early = True
            break
        train_model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # same shuffle on every rank and on resume
        bar = _progress_bar(cfg, dist_info, steps_per_epoch, epoch)
        t_epoch, seen, loss_sum, steps_this_epoch = time.perf_counter(), 0, 0.0, 0
        for xb, yb in mdata.batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True, generator=gen,
                                    rank=dist_info.rank, world_size=dist_info.world_size):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(train_model(xb), yb)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                metrics.update(status="diverged", error=f"loss became {loss_value} at epoch {epoch}, "
                                                        f"step {global_step + 1}")
                writer.metrics(metrics)
                writer.history(history)
                raise TrainingDiverged(
                    f"training stopped: the loss became {loss_value} at epoch {epoch}, step {global_step + 1} "
                    f"(multiplier {cfg.multiplier}, lr {optimizer.param_groups[0]['lr']:g}). Try a lower --lr, "
                    "or backward 'exact'; the history up to here is in " + str(writer.dir))
            loss.backward()
            optimizer.step()
            global_step += 1
            steps_this_epoch += 1
            seen += len(yb)
            loss_sum += loss_value * len(yb)
            history.append({"step": global_step, "epoch": epoch, "loss": loss_value,
                            "lr": optimizer.param_groups[0]["lr"], "elapsed": round(time.perf_counter() - t_start, 4)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if global_step % cfg.log_interval == 0 or steps_this_epoch == steps_per_epoch:
                done = min(seen * dist_info.world_size, n_train)
                msg = (f"Train Epoch: {epoch} [{done}/{n_train} ({100.0 * done / n_train:.0f}%)] "
                       f"Loss: {loss_value:.6f}")
                (bar.write(msg) if bar is not None else _log(msg, dist_info))
            if cfg.max_steps is not None and global_step >= cfg.max_steps:
                stopped_early = True
                break
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - t_epoch
        scheduler.step()
        val = evaluate(model, data.x_val, data.y_val)
        record = {"epoch": epoch, "steps": steps_this_epoch, "train_loss": _all_mean(loss_sum / max(1, seen),
                                                                                    dist_info, device),
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"], "epoch_time_s": epoch_time,
                  "samples": seen * dist_info.world_size,
                  "samples_per_s": seen * dist_info.world_size / epoch_time,
                  "time_per_sample_s": epoch_time / max(1, seen * dist_info.world_size)}
        epochs.append(record)
        _log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {val['loss']:.4f}, "
             f"val accuracy {val['accuracy']:.2f}%, {epoch_time:.1f} s, {record['samples_per_s']:.0f} samples/s",
             dist_info)
        elapsed = time.perf_counter() - t_start
        writer.checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch, "global_step": global_step,
                           "history": history, "epochs": epochs, "elapsed": elapsed,
                           "rng_cpu": torch.get_rng_state(),
                           "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
        metrics.update(epochs=epochs, elapsed_s=elapsed)
        writer.metrics(metrics)
        writer.history(history)
        if stopped_early:
            break

    final = _final_metrics(cfg, model, data, epochs, device)
    if dist_info.is_main and cfg.speed_ratio_steps > 0:
        final["speed"] = _step_time_ratio(model, data.x_train, data.y_train, cfg.batch_size,
                                          cfg.speed_ratio_steps, device)
    metrics.update(status="finished", stopped_at_max_steps=stopped_early, global_step=global_step,
                   elapsed_s=time.perf_counter() - t_start, final=final,
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    writer.metrics(metrics)
    writer.history(history)
    _log(f"finished: val accuracy {final['val_accuracy']:.2f}%"
         + (f", test accuracy {final['test_accuracy']:.2f}%" if final.get("test_accuracy") is not None else "")
         + f"; results in {writer.dir}", dist_info)
    return metrics


def _final_metrics(cfg: TrainConfig, model: nn.Module, data: mdata.MNISTData, epochs: list[dict],
                   device: torch.device) -> dict:
    val = evaluate(model, data.x_val, data.y_val)
    test = evaluate(model, data.x_test, data.y_test) if len(data.y_test) else None
    train_time = sum(e["epoch_time_s"] for e in epochs)
    samples = sum(e["samples"] for e in epochs)
    return {"val_accuracy": val["accuracy"], "val_loss": val["loss"],
            "test_accuracy": None if test is None else test["accuracy"],
            "test_loss": None if test is None else test["loss"],
            "train_time_s": train_time, "samples": samples,
            "samples_per_s": samples / train_time if train_time else None,
            "time_per_sample_s": train_time / samples if samples else None}


def _progress_bar(cfg: TrainConfig, dist_info: Dist, total: int, epoch: int):
    """A tqdm bar on rank 0 when ``progress`` is on; None otherwise (one log line per epoch)."""
    if not (cfg.progress and dist_info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)
