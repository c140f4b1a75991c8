"""Training loop: train / validate / test a model with any multiplier on any dataset, and record the run.

A run writes ``<runs_dir>/<run_name>/`` with ``config.json``, ``metrics.json``
(per-epoch and final figures plus the runtime description; a language model's
also in bits per character and perplexity) and ``history.csv``
(step, epoch, loss, lr, elapsed), all written atomically, and a checkpoint
after every epoch that ``resume=True`` continues from.  A run folder belongs to
one config: a rerun into it is refused unless it resumes that very config or
asks to ``overwrite`` (the old folder is then moved to ``<results>/.replaced/``
first, so nothing is lost or mixed).  Under ``torchrun`` the same loop trains
with DistributedDataParallel, each rank on its own shard and rank 0 writing the
results.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..multipliers import as_multiplier
from ..nn import convert
from . import data as mdata
from . import plugins, runtime
from .evaluate import accuracy, approximate_layers
from .config import (PRESETS, TrainConfig, config_with_preset, default_run_name, identity_differences,
                     multiplier_key, multiplier_of)
from .models import model_channels, model_context, new_model
from .store import (CHECKPOINT, atomic_write, holds_run, lock_run, move_run_aside, read_json, remove_stale_temporaries,
                    write_json, write_text)
from .timing import compare
from .text import EPOCH_STEPS, TextTrainData
from .train_data import LoaderTrainData, TensorTrainData, open_splits

__all__ = ["TrainConfig", "PRESETS", "config_with_preset", "default_run_name", "train", "evaluate", "prediction_loss",
           "TrainingDiverged", "RunFolderError", "CHECKPOINT"]

TrainData = Union[TensorTrainData, LoaderTrainData, TextTrainData]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is stopped and its results say so."""


class RunFolderError(ValueError):
    """The run folder holds another run (or an unreadable checkpoint); the message says what to pass instead."""


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


def prediction_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross-entropy of classifier logits ``(B, classes)`` against ``(B,)`` labels, or of a
    language model's ``(B, T, vocab)`` against ``(B, T)`` next tokens (every position one prediction)."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


TEXT_SCORES = ("bits_per_char", "perplexity")  # what a language model's evaluation adds to loss and accuracy


def evaluate(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean cross-entropy loss and top-1 accuracy (%) of ``model`` over ``(x, y)`` batches, in eval mode
    (:func:`mbmlib.workflow.evaluate.accuracy`, the one evaluation loop); a language model's also in bits per
    character and perplexity."""
    scores = accuracy(model, batches)
    return {"loss": scores["loss"], "accuracy": scores["top1"], **{k: scores[k] for k in TEXT_SCORES if k in scores}}


def _prefixed(prefix: str, scores: dict) -> dict:
    """``{prefix_loss, prefix_accuracy, ...}`` of an :func:`evaluate` result."""
    return {f"{prefix}_{k}": v for k, v in scores.items()}


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def _load_data(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> TrainData:
    """The run's splits: a CSV in memory, else :func:`open_splits` (MNIST in memory, the rest by DataLoaders, a text
    corpus as windows: an epoch is ``epoch_steps`` batches on every process)."""
    if cfg.data_csv:
        return TensorTrainData(_load_csv(cfg, device))
    windows = (cfg.epoch_steps or EPOCH_STEPS) * cfg.batch_size * world_size
    return open_splits(cfg.dataset, cfg.data_dir, model_channels(cfg.model), device, val_fraction=cfg.val_fraction,
                       split_seed=cfg.split_seed, train_samples=cfg.train_samples, val_samples=cfg.val_samples,
                       test_samples=cfg.test_samples, workers=cfg.workers, context=model_context(cfg.model),
                       epoch_windows=windows)


def _load_csv(cfg: TrainConfig, device: torch.device) -> mdata.MNISTData:
    """The Kaggle-layout CSV, split into train and validation (stratified; no test split)."""
    x, y = mdata.load_csv(cfg.data_csv)
    train_idx, val_idx = mdata.stratified_split(y, cfg.val_fraction, cfg.split_seed)
    if cfg.train_samples and cfg.train_samples != len(train_idx):
        train_idx = train_idx[mdata.stratified_subset(y[train_idx], cfg.train_samples, cfg.split_seed)]
    if cfg.val_samples and cfg.val_samples != len(val_idx):
        val_idx = val_idx[mdata.stratified_subset(y[val_idx], cfg.val_samples, cfg.split_seed)]
    data = mdata.MNISTData(x[train_idx], y[train_idx], x[val_idx], y[val_idx], x[val_idx[:0]], y[val_idx[:0]],
                           train_idx, val_idx)
    return data.to(device)


def _warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, eval_batch: int) -> None:
    """One forward/backward on a copy, so kernel compilation is not counted in the first epoch's time.

    Runs on a deep copy with the RNG state restored afterwards: training (and a
    resumed run) sees exactly the same weights, statistics and random stream.
    """
    xb, yb = x[:batch_size], y[:batch_size]
    if len(yb) < 2:  # BatchNorm needs two samples
        return
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        twin = copy.deepcopy(model).train()
        prediction_loss(twin(xb), yb).backward()
        twin.eval()
        with torch.no_grad():
            twin(x[:eval_batch])  # evaluation batch shape


def _step_time_ratio(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, steps: int,
                     device: torch.device) -> Optional[dict]:
    """Seconds per training step of ``model`` and of its exact twin, interleaved in one run.

    Measured on copies (the trained model is untouched), so the run's metrics
    carry an approx-vs-exact ratio that both sides of which saw the same machine.
    """
    approx = copy.deepcopy(model).train()
    if not any(not m.multiplier.is_exact for m in approximate_layers(approx)):
        return None
    exact = convert(approx, multiplier="exact")  # every layer convert can reach, the approximate ones included
    if len(yb) < 2:  # BatchNorm needs two samples
        return None

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        prediction_loss(m(xb), yb).backward()
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


# ----------------------------------------------------------------------------- the run folder


def claim_run_folder(cfg: TrainConfig, run_dir: Path) -> None:
    """Make ``run_dir`` this config's: lock it, refuse another run's folder, check a resume, move aside on overwrite.

    A run that never finished an epoch has nothing to lose: a plain rerun replaces it (moved aside) and
    ``--resume`` starts it from the beginning, so after a failure or a kill in the first epoch both work.
    """
    lock_run(run_dir)
    started, finished_epoch = holds_run(run_dir), (run_dir / CHECKPOINT).exists()
    if cfg.resume:
        if not started:
            raise RunFolderError(f"--resume: no run in {run_dir} (no checkpoint); run without --resume first, "
                                 "or pass the --run-name of the run to continue")
        _check_same_config(cfg, run_dir)
        remove_stale_temporaries(run_dir)
        if not finished_epoch:
            print(f"--resume: {run_dir.name} never finished an epoch; starting it from the beginning", flush=True)
    elif started and (cfg.overwrite or not finished_epoch):
        move_run_aside(run_dir)
    elif started:
        raise RunFolderError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                             "--overwrite to replace it (the old one is moved aside), or another --run-name")


def _check_same_config(cfg: TrainConfig, run_dir: Path) -> None:
    """RunFolderError unless the saved config equals ``cfg`` in everything but epochs and run control."""
    try:
        saved = read_json(run_dir / "config.json")
    except (OSError, ValueError) as err:
        raise RunFolderError(f"--resume: cannot read {run_dir / 'config.json'} ({err}); the run cannot be "
                             "continued safely: use --overwrite to start it again") from err
    diffs = identity_differences(saved, cfg)
    if diffs:
        listed = ", ".join(f"{k}: {old!r} in the run, {new!r} now" for k, (old, new) in diffs.items())
        raise RunFolderError(f"--resume: the run {run_dir.name} was started with another config ({listed}); "
                             "resume with the same options (only --epochs may change), or use another --run-name")


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # a truncated or foreign file: pickle, zip and torch errors all mean the same here
        raise RunFolderError(f"checkpoint {path} cannot be read ({type(err).__name__}); it is damaged: use "
                             "--overwrite to start the run again") from err


# ----------------------------------------------------------------------------- one session


@dataclass
class Session:
    """Everything one run holds while it trains: config, device, data, model, optimiser and its records."""

    cfg: TrainConfig
    device: torch.device
    dist: Dist
    info: dict
    writer: RunWriter
    data: TrainData
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    start_epoch: int = 1
    global_step: int = 0
    elapsed_before: float = 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def _setup(cfg: TrainConfig) -> Session:
    """Validate, pick the device, claim the run folder, load data, build model and optimiser; resume if asked."""
    cfg.validate()
    device = runtime.resolve_device(cfg.device)
    dist_info = init_distributed(device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist_info.rank)))
        torch.cuda.set_device(device)
    info = runtime.describe(device)
    run_name = cfg.run_name or default_run_name(cfg, info["runtime"])
    writer = RunWriter(Path(cfg.runs_dir) / run_name, dist_info.is_main)
    if dist_info.is_main:
        claim_run_folder(cfg, writer.dir)
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg, device, dist_info.world_size)
    model = new_model(cfg.model, data.num_classes, data.channels, multiplier=multiplier_of(cfg), backward=cfg.backward,
                      approx_linear=cfg.approx_linear, backend=cfg.backend).to(device)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    train_model = model
    if dist_info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    s = Session(cfg, device, dist_info, info, writer, data, model, train_model, optimizer, scheduler)
    if cfg.resume and (writer.dir / CHECKPOINT).exists():
        _restore(s, _load_checkpoint(writer.dir / CHECKPOINT, device))
        _log(f"resuming {run_name} after epoch {s.start_epoch - 1} (step {s.global_step})", dist_info)
    writer.config(cfg)
    return s


def _restore(s: Session, state: dict) -> None:
    """Put a checkpoint's weights, optimiser, schedule, RNG and records back into the session.

    Refused when what the config cannot show has changed: the table a ``table:<csv>`` names (its digest) or
    the number of processes (the effective batch).
    """
    key, world = multiplier_key(s.cfg), s.dist.world_size
    if state.get("multiplier_key", key) != key:
        what = "assignment" if s.cfg.multiplier_map else "table"
        raise RunFolderError(f"--resume: the multiplier {s.cfg.multiplier_map or s.cfg.multiplier} is not the one the "
                             f"run started with ({state['multiplier_key']}, now {key}): the {what} file has changed; "
                             "restore it, or start a new run")
    if state.get("world_size", world) != world:
        raise RunFolderError(f"--resume: the run started with {state['world_size']} process(es), this is {world} "
                             f"(the effective batch would change); resume with torchrun --nproc-per-node "
                             f"{state['world_size']}, or start a new run")
    if state.get("corpus_sha256", _corpus(s)) != _corpus(s):
        raise RunFolderError("--resume: the text corpus is not the one the run started with (its SHA-256 differs: "
                             "another Python's standard library); resume with the Python the run started with, or "
                             "start a new run")
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if s.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], s.device)
    s.start_epoch, s.global_step = state["epoch"] + 1, state["global_step"]
    s.history, s.epochs, s.elapsed_before = state["history"], state["epochs"], state["elapsed"]


def _corpus(s: Session) -> Optional[str]:
    """The SHA-256 of the run's text corpus; None for images."""
    return s.data.describe().get("corpus_sha256")


def _save_checkpoint(s: Session, epoch: int, elapsed: float) -> None:
    s.writer.checkpoint({"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                         "scheduler": s.scheduler.state_dict(), "epoch": epoch, "global_step": s.global_step,
                         "history": s.history, "epochs": s.epochs, "elapsed": elapsed,
                         "multiplier_key": multiplier_key(s.cfg), "world_size": s.dist.world_size,
                         "corpus_sha256": _corpus(s),
                         "rng_cpu": torch.get_rng_state(),
                         "rng_cuda": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None})


def _diverged(s: Session, metrics: dict, loss_value: float, epoch: int) -> TrainingDiverged:
    """Record a non-finite loss in the run's files and return the error to raise."""
    where = f"epoch {epoch}, step {s.global_step + 1}"
    metrics.update(status="diverged", error=f"loss became {loss_value} at {where}")
    s.writer.metrics(metrics)
    s.writer.history(s.history)
    return TrainingDiverged(f"training stopped: the loss became {loss_value} at {where} (multiplier "
                            f"{s.cfg.multiplier}, lr {s.lr:g}). Try a lower --lr, or backward 'exact'; the history "
                            f"up to here is in {s.writer.dir}")


def _train_epoch(s: Session, epoch: int, metrics: dict, t_start: float) -> tuple[dict, bool]:
    """One pass over this rank's shard; returns (the epoch's training figures, whether max_steps stopped it)."""
    cfg, n_train = s.cfg, s.data.sizes()["train"]
    steps_per_epoch = s.data.steps_per_epoch(cfg.batch_size, s.dist.world_size)
    s.train_model.train()
    bar = _progress_bar(cfg, s.dist, steps_per_epoch, epoch)
    t_epoch, seen, loss_sum, steps, stopped = time.perf_counter(), 0, 0.0, 0, False
    shuffle_seed = cfg.seed * 1000 + epoch  # the same shuffle on every rank and on resume
    for xb, yb in s.data.train_batches(cfg.batch_size, shuffle_seed, s.dist.rank, s.dist.world_size):
        s.optimizer.zero_grad(set_to_none=True)
        loss = prediction_loss(s.train_model(xb), yb)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise _diverged(s, metrics, loss_value, epoch)
        loss.backward()
        s.optimizer.step()
        s.global_step, steps, seen, loss_sum = s.global_step + 1, steps + 1, seen + len(yb), loss_sum + loss_value * len(yb)
        s.history.append({"step": s.global_step, "epoch": epoch, "loss": loss_value, "lr": s.lr,
                          "elapsed": round(time.perf_counter() - t_start, 4)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if s.global_step % cfg.log_interval == 0 or steps == steps_per_epoch:
            done = min(seen * s.dist.world_size, n_train)
            msg = f"Train Epoch: {epoch} [{done}/{n_train} ({100.0 * done / n_train:.0f}%)] Loss: {loss_value:.6f}"
            (bar.write(msg) if bar is not None else _log(msg, s.dist))
        if cfg.max_steps is not None and s.global_step >= cfg.max_steps:
            stopped = True
            break
    if bar is not None:
        bar.close()
    epoch_time, samples = time.perf_counter() - t_epoch, seen * s.dist.world_size
    return {"epoch": epoch, "steps": steps, "train_loss": _all_mean(loss_sum / max(1, seen), s.dist, s.device),
            "epoch_time_s": epoch_time, "samples": samples, "samples_per_s": samples / epoch_time,
            "time_per_sample_s": epoch_time / max(1, samples)}, stopped


def _end_epoch(s: Session, record: dict, metrics: dict, t_start: float) -> None:
    """Step the schedule, validate, log, and write the checkpoint and the records of this epoch."""
    s.scheduler.step()
    val = evaluate(s.model, s.data.eval_batches("val"))
    record.update(_prefixed("val", val))
    s.epochs.append(record)
    bits = f", {val['bits_per_char']:.4f} bits/char" if "bits_per_char" in val else ""
    _log(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss {val['loss']:.4f}{bits}, "
         f"val accuracy {val['accuracy']:.2f}%, {record['epoch_time_s']:.1f} s, "
         f"{record['samples_per_s']:.0f} samples/s", s.dist)
    elapsed = time.perf_counter() - t_start
    _save_checkpoint(s, record["epoch"], elapsed)
    metrics.update(epochs=s.epochs, elapsed_s=elapsed)
    s.writer.metrics(metrics)
    s.writer.history(s.history)


def _finish(s: Session, metrics: dict, stopped_early: bool, t_start: float) -> dict:
    """Final validation/test figures, the approx-vs-exact step time, and the finished metrics."""
    cfg = s.cfg
    final = _final_metrics(s.model, s.data, s.epochs)
    if s.dist.is_main and cfg.speed_ratio_steps > 0:
        final["speed"] = _step_time_ratio(s.model, *s.data.first_batch(cfg.batch_size), cfg.speed_ratio_steps,
                                          s.device)
    metrics.update(status="finished", stopped_at_max_steps=stopped_early, global_step=s.global_step,
                   elapsed_s=time.perf_counter() - t_start, final=final,
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    s.writer.metrics(metrics)
    s.writer.history(s.history)
    bits = "".join(f", {split} {final[f'{split}_bits_per_char']:.4f} bits/char" for split in ("val", "test")
                   if final.get(f"{split}_bits_per_char") is not None)
    _log(f"finished: val accuracy {final['val_accuracy']:.2f}%"
         + (f", test accuracy {final['test_accuracy']:.2f}%" if final.get("test_accuracy") is not None else "")
         + f"{bits}; results in {s.writer.dir}", s.dist)
    return metrics


def train(cfg: TrainConfig) -> dict:
    """Run the training described by ``cfg``; return the final metrics (also written to disk)."""
    plugins.load_design_files()  # $MBMLIB_DESIGNS: a notebook kernel or torchrun worker registers the user's designs
    s = _setup(cfg)
    n_train = s.data.sizes()["train"]
    metrics = {"run_name": s.writer.dir.name, "status": "running", "config": dataclasses.asdict(cfg),
               "runtime": s.info, "world_size": s.dist.world_size, "data": s.data.describe(), "epochs": s.epochs}
    products = f"the assignment {cfg.multiplier_map}" if cfg.multiplier_map else as_multiplier(cfg.multiplier).name
    _log(f"run {s.writer.dir.name}: {cfg.model} with multiplier {products} "
         f"(backward {cfg.backward}) on {s.info['device_name']} ({s.info['device']}), {n_train} training samples, "
         f"{s.data.steps_per_epoch(cfg.batch_size, s.dist.world_size)} steps/epoch", s.dist)
    eval_batch = min(s.data.eval_batch, s.data.sizes()["val"])  # the shape validation will run
    _warm_up(s.model, *s.data.first_batch(max(cfg.batch_size, eval_batch)), cfg.batch_size, eval_batch)
    t_start = time.perf_counter() - s.elapsed_before
    stopped_early = False
    for epoch in range(s.start_epoch, cfg.epochs + 1):
        if cfg.max_steps is not None and s.global_step >= cfg.max_steps:
            stopped_early = True
            break
        record, stopped_early = _train_epoch(s, epoch, metrics, t_start)
        _end_epoch(s, record, metrics, t_start)
        if stopped_early:
            break
    return _finish(s, metrics, stopped_early, t_start)


def _final_metrics(model: nn.Module, data: TrainData, epochs: list[dict]) -> dict:
    """Validation (the last epoch's: the weights have not changed since) and test figures, and throughput."""
    last = epochs[-1] if epochs else None
    val = ({k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")} if last
           else evaluate(model, data.eval_batches("val")))
    test = evaluate(model, data.eval_batches("test")) if data.sizes()["test"] else dict.fromkeys(val)
    train_time = sum(e["epoch_time_s"] for e in epochs)
    samples = sum(e["samples"] for e in epochs)
    return {"val_accuracy": val["accuracy"], "val_loss": val["loss"], "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], **{f"{split}_{k}": scores[k] for k in TEXT_SCORES if k in val
                                          for split, scores in (("val", val), ("test", test))},
            "train_time_s": train_time, "samples": samples,
            "samples_per_s": samples / train_time if train_time else None,
            "time_per_sample_s": train_time / samples if samples else None}


def _progress_bar(cfg: TrainConfig, dist_info: Dist, total: int, epoch: int):
    """A tqdm bar on rank 0 when ``progress`` is on; None otherwise (one log line per epoch)."""
    if not (cfg.progress and dist_info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)
