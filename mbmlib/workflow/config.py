"""The training config: one dataclass that the API, the CLI and the notebooks share.

Every field of :class:`TrainConfig` carries its command-line help in its
metadata, so ``python -m mbmlib train`` builds its options from the fields
(:func:`add_config_arguments`) and notebook 02 prints the same descriptions
(:func:`describe_fields`).  :meth:`TrainConfig.validate` is the one place where
values are checked, before any data is loaded, whoever built the config.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import kernels
from ..functional import BACKWARD_MODES, check_backward
from ..multipliers import MAX_TRUNCATION, as_multiplier
from ..nn import read_multiplier_map
from .models import check_model_name, is_language_model
from .runtime import resolve_device
from .text import EPOCH_STEPS, is_text_dataset
from .train_data import check_model_dataset

__all__ = ["TrainConfig", "PRESETS", "multiplier_of", "multiplier_key", "config_with_preset", "default_run_name", "check_run_name", "safe_stem",
           "identity_differences", "add_config_arguments", "config_from_args", "describe_fields"]

OPTIMIZERS = ("adam", "sgd")

# The original experiment's hyper-parameters (SPEC.md section 2).
PRESETS = {
    "seed": dict(model="seednet", batch_size=16, lr=3e-3, optimizer="adam", step_size=7, gamma=0.1,
                 split_seed=123, val_fraction=0.2),
}

# Fields that steer how a run is carried out or shown, not what it computes: they may differ on --resume
# and stay out of default run names.
RUN_CONTROL = ("epochs", "run_name", "runs_dir", "resume", "overwrite", "progress", "log_interval",
               "speed_ratio_steps", "device", "data_dir", "workers", "backend", "preset", "extra")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _opt(group: str, help: str, flag: Optional[str] = None, **argparse_kw) -> dict:
    """Field metadata: the option's group and help, and how argparse should read it."""
    return {"group": group, "help": help, "flag": flag, "argparse": argparse_kw}


_ARITH, _OPTIM, _DATA, _RUN = "model and arithmetic", "optimisation", "data", "run and output"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json``."""

    model: str = field(default="seednet", metadata=_opt(
        _ARITH, "model: seednet, lenet5, example, vit-tiny (28x28 grey images), resnet20, resnet8 (CIFAR-style), a "
                "torchvision.models classifier (resnet18, mobilenet_v2, ...) or gpt-char (a character-level language "
                "model, on stdlib-chars)"))
    multiplier: str = field(default="mbm", metadata=_opt(
        _ARITH, f"exact, mitchell, mbm, or with truncation mbm-t16 / mitchell-t8 (t = 0..{MAX_TRUNCATION})"))
    multiplier_map: Optional[str] = field(default=None, metadata=_opt(
        _ARITH, "an assignment file (JSON: a \"multipliers\" object of layer patterns to multipliers, as explore "
                "writes them) used instead of --multiplier; a layer no pattern matches stays exact"))
    backward: str = field(default="exact", metadata=_opt(
        _ARITH, "gradient products exact (straight-through) or approximate too", choices=BACKWARD_MODES))
    approx_linear: bool = field(default=True, metadata=_opt(
        _ARITH, "keep the linear layers exact (only convolutions approximate)", flag="--exact-linear",
        action="store_false"))
    backend: Optional[str] = field(default=None, metadata=_opt(
        _ARITH, f"kernel backend: auto, {', '.join(kernels.BACKENDS)} (None/auto: env MBMLIB_BACKEND, else "
                "triton on CUDA, compiled on the CPU)"))
    epochs: int = field(default=1, metadata=_opt(_OPTIM, "epochs in all (a resumed run may raise it)", type=int))
    batch_size: int = field(default=16, metadata=_opt(_OPTIM, "mini-batch size", type=int))
    lr: float = field(default=3e-3, metadata=_opt(_OPTIM, "learning rate", type=float))
    optimizer: str = field(default="adam", metadata=_opt(_OPTIM, "optimiser", choices=OPTIMIZERS))
    step_size: int = field(default=7, metadata=_opt(_OPTIM, "StepLR step size in epochs", type=int))
    gamma: float = field(default=0.1, metadata=_opt(_OPTIM, "StepLR decay factor, in (0, 1]", type=float))
    seed: int = field(default=0, metadata=_opt(_OPTIM, "seed for initialisation, shuffling, dropout", type=int))
    max_steps: Optional[int] = field(default=None, metadata=_opt(
        _OPTIM, "stop after this many optimiser steps in total (None: full epochs)", type=int))
    epoch_steps: Optional[int] = field(default=None, metadata=_opt(
        _OPTIM, f"text corpora: optimiser steps per epoch, each on batch-size random windows (None: {EPOCH_STEPS}); "
                "an image epoch is every training sample once", type=int))
    dataset: str = field(default="mnist", metadata=_opt(
        _DATA, "mnist (in memory), fashion-mnist, kmnist, cifar10, cifar100, svhn, imagefolder:<path>, fake "
               "(torchvision's FakeData, for dry runs) or stdlib-chars (the characters of Python's standard library "
               "sources, for gpt-char)"))
    workers: int = field(default=2, metadata=_opt(
        _DATA, "DataLoader processes reading datasets from files (the in-memory MNIST needs none)", type=int))
    split_seed: int = field(default=123, metadata=_opt(_DATA, "seed of the stratified split", type=int))
    val_fraction: float = field(default=0.2, metadata=_opt(
        _DATA, "share of the labelled set held out for validation", type=float))
    data_dir: Optional[str] = field(default=None, metadata=_opt(
        _DATA, "torchvision-style data root, e.g. holding MNIST/raw/ (None: env MBMLIB_DATA, else ./data)"))
    data_csv: Optional[str] = field(default=None, metadata=_opt(
        _DATA, "train from a Kaggle-style CSV (label + 784 pixels) instead; it has no test split"))
    train_samples: Optional[int] = field(default=None, metadata=_opt(
        _DATA, "stratified subset of this many training samples (None: the whole training split, 48000 for MNIST)", type=int))
    val_samples: Optional[int] = field(default=None, metadata=_opt(
        _DATA, "stratified subset of the validation split (None: all; a text corpus: windows, None: 256)", type=int))
    test_samples: Optional[int] = field(default=None, metadata=_opt(
        _DATA, "stratified subset of the test set (None: all of it; a text corpus: windows, None: 256)", type=int))
    device: str = field(default="auto", metadata=_opt(_RUN, "cpu, cuda, cuda:N or auto"))
    run_name: Optional[str] = field(default=None, metadata=_opt(
        _RUN, "folder name under the results folder (None: <model>-<multiplier>-<backward>-b<batch>-<runtime>, "
              "plus every other setting that differs from the defaults/preset)"))
    runs_dir: str = field(default="results/runs", metadata=_opt(_RUN, "where run folders go (the results root's "
                                                                       "runs/ by default)"))
    resume: bool = field(default=False, metadata=_opt(
        _RUN, "continue the run from its last checkpoint (same config; only --epochs may change)",
        action="store_true"))
    overwrite: bool = field(default=False, metadata=_opt(
        _RUN, "replace an existing run of that name: the old folder is moved to <results>/.replaced/ first",
        action="store_true"))
    log_interval: int = field(default=100, metadata=_opt(_RUN, "log the loss every N steps", type=int))
    progress: bool = field(default=True, metadata=_opt(
        _RUN, "no progress bar: one log line per epoch (for notebooks and logs)", flag="--no-progress",
        action="store_false"))
    speed_ratio_steps: int = field(default=10, metadata=_opt(
        _RUN, "steps used to time the model against its exact twin at the end (0: skip)", type=int))
    preset: Optional[str] = field(default=None, metadata=_opt(
        _ARITH, "'seed': the original experiment (SeedNet, batch 16, Adam lr 3e-3, StepLR(7, 0.1), stratified "
                "80/20 split with seed 123); explicit options override it", choices=tuple(PRESETS)))
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Check every value before any data is loaded; ValueError saying what to change."""
        check_model_name(self.model)
        as_multiplier(self.multiplier)
        if self.multiplier_map is not None:
            self._check_map()
        self._check_data()
        check_backward(self.backward)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("backend", self.backend or "auto", ("auto",) + kernels.BACKENDS)
        if self.preset is not None:
            _check_choice("preset", self.preset, tuple(PRESETS))
        _check_int("workers", self.workers, low=0)
        for name in ("epochs", "batch_size", "log_interval", "step_size"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("train_samples", "val_samples", "test_samples", "max_steps", "epoch_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1, what="a positive number (or omitted)")
        _check_int("speed_ratio_steps", self.speed_ratio_steps, low=0)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"gamma (the StepLR decay factor) must lie in (0, 1], got {self.gamma}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.data_csv and self.test_samples is not None:
            raise ValueError("test_samples: a CSV has no test split; omit it (val_samples subsets the validation "
                             "split)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
        resolve_device(self.device)
        if self.run_name is not None:
            check_run_name(self.run_name)
        return self


    def _check_map(self) -> None:
        """The assignment file reads, names known multipliers, and is not combined with options it replaces."""
        for mult in read_multiplier_map(self.multiplier_map).values():
            as_multiplier(mult)
        if self.multiplier != "mbm":
            raise ValueError(f"multiplier {self.multiplier!r} and multiplier_map exclude each other: the assignment "
                             "file names every layer's multiplier; drop one of them")
        if not self.approx_linear:
            raise ValueError("--exact-linear and multiplier_map exclude each other: the assignment file says which "
                             "layers are exact")

    def _check_data(self) -> None:
        """The dataset exists by name, fits the model, and is not combined with a CSV; an epoch of steps and a
        subset of training samples each belong to their kind of data."""
        if self.data_csv and self.dataset != "mnist":
            raise ValueError(f"data_csv and dataset {self.dataset!r} exclude each other: a CSV holds MNIST-style "
                             "images; drop one of them")
        if self.data_csv and is_language_model(self.model):
            raise ValueError(f"{self.model} is a language model and a CSV holds MNIST-style images; train it with "
                             "--dataset stdlib-chars instead")
        if not self.data_csv:
            check_model_dataset(self.model, self.dataset)
        text = is_text_dataset(self.dataset) and not self.data_csv
        if text and self.train_samples is not None:
            raise ValueError(f"train_samples: the text corpus {self.dataset} has no fixed training samples; an epoch "
                             "is --epoch-steps optimiser steps")
        if not text and self.epoch_steps is not None:
            raise ValueError(f"epoch_steps: an epoch of {self.dataset} images is every training sample once; use "
                             "--train-samples (or --max-steps) to shorten it")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_int(name: str, value, low: int, what: Optional[str] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {what or f'an integer >= {low}'}, got {value!r}")


def check_run_name(name: str, what: str = "run name", kind: str = "folder") -> str:
    """A run (or result) name is one plain folder (file) name: letters, digits, '_', '.', '-', not starting with '.'."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValueError(f"{what} {name!r} must be a plain {kind} name (letters, digits, '_', '.', '-', not "
                         "starting with '.' and without '/'), so what it names stays inside the results folder")
    return name


def safe_stem(text: str) -> str:
    """``text`` (a dataset or multiplier name, maybe a path) as one plain file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".") or "_"


def config_with_preset(preset: Optional[str] = None, **overrides) -> TrainConfig:
    """A validated config from the defaults, then the preset's values, then explicit ``overrides`` (not None)."""
    values = {**_preset_values(preset), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values).validate()


def _preset_values(preset: Optional[str]) -> dict:
    if preset is None:
        return {}
    _check_choice("preset", preset, tuple(PRESETS))
    return {**PRESETS[preset], "preset": preset}


def identity_differences(a: TrainConfig | dict, b: TrainConfig | dict) -> dict:
    """``{field: (a's value, b's value)}`` for the fields that define what a run computes."""
    defaults = dataclasses.asdict(TrainConfig())  # a config saved before a field existed had its default
    a, b = ({**defaults, **(dataclasses.asdict(c) if isinstance(c, TrainConfig) else c)} for c in (a, b))
    return {k: (a.get(k), b.get(k)) for k in defaults if k not in RUN_CONTROL and a.get(k) != b.get(k)}


_ABBREV = {"lr": "lr", "seed": "s", "split_seed": "ss", "train_samples": "n", "val_samples": "nv",
           "test_samples": "nt", "max_steps": "steps", "optimizer": "", "step_size": "step", "gamma": "g",
           "val_fraction": "vf", "approx_linear": "linear", "data_csv": "csv", "dataset": "", "epoch_steps": "es"}


def default_run_name(cfg: TrainConfig, runtime_label: str) -> str:
    """e.g. ``seednet-mbm-exact-b16-cpu-amd-epyc``, plus a token for every other setting off its default.

    The baseline is the defaults with the preset applied, so ``--preset seed --lr 0.01 --train-samples 512``
    becomes ``seednet-mbm-exact-b16-lr0.01-n512-cpu-...``: two runs that compute different things never share
    a default name.
    """
    base = TrainConfig(**_preset_values(cfg.preset))
    tokens = []
    for key, (value, _) in identity_differences(cfg, base).items():
        if key in ("model", "multiplier", "multiplier_map", "backward", "batch_size"):
            continue
        token = f"{_ABBREV.get(key, key)}{value}"
        tokens.append(token if len(token) <= 16 else _ABBREV.get(key, key) + _digest(value))
    products = "map" + _digest(multiplier_key(cfg)) if cfg.multiplier_map else as_multiplier(cfg.multiplier).name
    name = "-".join([cfg.model, products, cfg.backward, f"b{cfg.batch_size}", *tokens,
                     runtime_label])
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")


def multiplier_of(cfg: TrainConfig):
    """What ``convert`` makes of the run's layers: the multiplier name, or the assignment file's dict."""
    return read_multiplier_map(cfg.multiplier_map) if cfg.multiplier_map else cfg.multiplier


def multiplier_key(cfg: TrainConfig) -> str:
    """What the products are, kept in checkpoints for ``--resume``: the multiplier's key (a table's digest), or
    every pattern's with an assignment file, so a changed file is seen."""
    if cfg.multiplier_map:
        return "map:" + ";".join(f"{pattern}={as_multiplier(m).key}"
                                 for pattern, m in read_multiplier_map(cfg.multiplier_map).items())
    return as_multiplier(cfg.multiplier).key


def _digest(value: Any) -> str:
    return hashlib.sha1(repr(value).encode()).hexdigest()[:6]


# ----------------------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per config field (``--batch-size`` for ``batch_size``), grouped, with the field's default."""
    groups: dict[str, Any] = {}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta:
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kw = dict(meta["argparse"])
        default = getattr(defaults, f.name)
        shown = "" if kw.get("action") else f" (default: {'auto' if default is None and f.name == 'backend' else default})"
        group.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           help=meta["help"] + shown, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated config of parsed ``train`` options: defaults, then the preset, then what was given."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and k != "preset"}
    if given.get("backend") == "auto":
        given["backend"] = None
    return config_with_preset(args.preset, **given)


def describe_fields(names=None) -> str:
    """A markdown table of config fields (all, or ``names``): name, default, what it does."""
    defaults = TrainConfig()
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        if f.metadata and (names is None or f.name in names):
            rows.append(f"| `{f.name}` | `{getattr(defaults, f.name)!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
