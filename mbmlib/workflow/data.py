"""MNIST as in-memory tensors: torchvision's IDX layout, Kaggle-style CSV, the stratified split.

Where the data lives: ``data_root(root)`` -- the argument, else env ``MBMLIB_DATA``, else
``./data``.  Below it the torchvision layout ``<root>/MNIST/raw/`` holds the four IDX
files, gzipped as downloaded (``train-images-idx3-ubyte.gz``) or unpacked (no ``.gz``).
They are read straight into memory (nothing is unpacked to disk); with no files at all,
torchvision downloads them, and when that fails :class:`MNISTNotFoundError` says which
files to put where.  A damaged file is a :class:`MNISTCorruptError` naming it.

Everything is returned as tensors: images float32 ``(N, 1, 28, 28)`` in [0, 1], labels
int64 ``(N,)``.  Training reads batches straight from them with :func:`batches` (no
DataLoader workers: the whole set is 200 MB as float32 and a slice costs nothing).
The stratified split and subsets are scikit-learn's ``train_test_split(stratify=...)``.
"""
from __future__ import annotations

import csv
import gzip
import math
import os
import socket
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union
from urllib.error import URLError

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = [
    "MNIST_FILES",
    "MNISTData",
    "MNISTCorruptError",
    "MNISTNotFoundError",
    "batches",
    "data_root",
    "load_csv",
    "load_mnist",
    "num_batches",
    "read_idx",
    "read_mnist",
    "shard",
    "stratified_split",
    "stratified_subset",
]

PathLike = Union[str, os.PathLike]
TensorPair = Tuple[Tensor, Tensor]

# The four IDX files of torchvision's layout, unpacked names: (train images, train labels, test ...).
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
N_PIXELS = 28 * 28
N_CLASSES = 10
DOWNLOAD_TIMEOUT_S = 30.0
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the third byte of every MNIST file's magic number


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are neither on disk nor downloadable; the message says what to put where."""


class MNISTCorruptError(ValueError):
    """An MNIST file is there but damaged (truncated, not gzip, not IDX); the message names it."""


# ----------------------------------------------------------------------------- finding and downloading


def data_root(root: Optional[PathLike] = None) -> Path:
    """The data root: ``root`` if given, else env ``MBMLIB_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MBMLIB_DATA") or "data").expanduser()


def _raw_folder(root: Path) -> Path:
    """torchvision's folder for the MNIST IDX files below a root."""
    return root / "MNIST" / "raw"


def _find(raw: Path, name: str) -> Optional[Path]:
    """The file for one of :data:`MNIST_FILES`: unpacked if there, else gzipped, else None."""
    for path in (raw / name, raw / (name + ".gz")):
        if path.is_file():
            return path
    return None


def _missing_error(root: Path, reason: str) -> MNISTNotFoundError:
    """The error that tells the user exactly which files to put where."""
    raw = _raw_folder(root).resolve()
    lines = [f"  {name}.gz{'' if _find(raw, name) else '   (missing)'}" for name in MNIST_FILES]
    return MNISTNotFoundError(
        f"MNIST was not found under {raw} and {reason}.\n"
        f"Put these 4 files (gzipped as listed, or unpacked without '.gz') into {raw}/:\n"
        + "\n".join(lines)
        + "\nor point the environment variable MBMLIB_DATA (or the `root` argument) at a folder "
        "that holds MNIST/raw/ with them (torchvision's layout)."
    )


def _download(root: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Let torchvision download MNIST into ``root``; a dead network fails after ``timeout`` s, not never."""
    from torchvision import datasets

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        datasets.MNIST(str(root), train=True, download=True)
    except (RuntimeError, URLError, OSError) as err:
        detail = " ".join(str(err).split())  # torchvision's message spans lines
        raise _missing_error(root, f"downloading it failed ({type(err).__name__}: {detail})") from err
    finally:
        socket.setdefaulttimeout(previous)


# ----------------------------------------------------------------------------- reading


def _corrupt(path: Path, what: str) -> MNISTCorruptError:
    """One-line error naming a damaged file and what to do about it."""
    return MNISTCorruptError(f"{path} is damaged ({what}); delete it and download it again, "
                             "or put an intact copy of the official file there")


def read_idx(path: PathLike) -> np.ndarray:
    """One IDX file of unsigned bytes (gzipped if its name ends in ``.gz``) as a uint8 array of its shape."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE:
        raise _corrupt(path, f"not an IDX file of bytes: magic number {raw[:4].hex() or 'missing'}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(raw, dtype=np.uint8, offset=min(4 + 4 * ndim, len(raw)))
    if values.size != math.prod(shape):
        raise _corrupt(path, f"the header promises {shape} = {math.prod(shape)} bytes, the file holds {values.size}")
    return values.reshape(shape)


def read_mnist(root: Optional[PathLike] = None, train: bool = True, download: bool = True) -> TensorPair:
    """One official MNIST split (train: 60000, test: 10000) as ``(x, y)`` tensors, read from the IDX files."""
    root = data_root(root)
    raw = _raw_folder(root)
    if not all(_find(raw, name) for name in MNIST_FILES):
        if not download:
            raise _missing_error(root, "downloading is switched off (download=False)")
        _download(root)
    image_name, label_name = MNIST_FILES[:2] if train else MNIST_FILES[2:]
    images, labels = read_idx(_find(raw, image_name)), read_idx(_find(raw, label_name))  # (N, 28, 28), (N,)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise _corrupt(_find(raw, image_name), f"images {images.shape} do not fit labels {labels.shape} of "
                                               f"{_find(raw, label_name).name}; expected (N, 28, 28) and (N,)")
    x = torch.from_numpy(images.copy()).unsqueeze(1).to(torch.float32).div_(255.0)  # (N, 1, 28, 28)
    return x, torch.from_numpy(labels.astype(np.int64))




def _csv_header(path: Path) -> list:
    """The header row of a CSV file, column names stripped."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"{path}: the file is empty; expected a header row 'label,pixel0,...,pixel783'")
    return [name.strip() for name in header]


def _csv_columns(header: list, path: Path, require_label: bool) -> Tuple[Optional[int], list]:
    """Positions of the label column (or None) and of pixel0..pixel783 in that order; ValueError if wrong."""
    has_label = "label" in header
    if require_label and not has_label:
        raise ValueError(f"{path}: no 'label' column (header starts {header[:3]}); a labelled MNIST CSV has "
                         "the columns label,pixel0,...,pixel783 -- pass require_label=False for an unlabelled one")
    expected = N_PIXELS + int(has_label)
    if len(header) != expected:
        raise ValueError(f"{path}: the header has {len(header)} columns, expected {expected} "
                         f"({'label + ' if has_label else ''}{N_PIXELS} pixel columns pixel0..pixel783)")
    wanted = [f"pixel{i}" for i in range(N_PIXELS)]
    missing = [name for name in wanted if name not in header]
    if missing or len(set(header)) != len(header):
        unknown = [name for name in header if name not in wanted and name != "label"]
        raise ValueError(f"{path}: pixel columns must be named pixel0..pixel783, each once; missing "
                         f"{missing[:5]}, unexpected {unknown[:5]}")
    position = {name: i for i, name in enumerate(header)}
    return (position["label"] if has_label else None), [position[name] for name in wanted]


def _csv_values(path: Path, n_columns: int) -> np.ndarray:
    """The data rows as a float32 (rows, columns) array; ValueError naming the file on ragged or bad rows."""
    try:
        with warnings.catch_warnings():  # numpy warns on a file with no rows; the check below says it better
            warnings.simplefilter("ignore", UserWarning)
            values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: could not read the rows as {n_columns} numbers each: {err}") from err
    if values.shape[0] == 0:
        raise ValueError(f"{path}: the file has a header but no data rows")
    if values.shape[1] != n_columns:
        raise ValueError(f"{path}: rows have {values.shape[1]} values, the header names {n_columns} columns")
    return values


def _check_integers(values: np.ndarray, low: int, high: int, what: str, path: Path) -> None:
    """ValueError unless every value is a whole number in [low, high]."""
    bad = (values < low) | (values > high) | (values != np.round(values))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{path}: {what} must be whole numbers in {low}..{high}; data row {row + 1} breaks this")


def load_csv(path: PathLike, require_label: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """A Kaggle-style MNIST CSV (``label,pixel0..pixel783``, values 0..255) as ``(x, y)`` tensors.

    ``x`` is float32 (N, 1, 28, 28) in [0, 1], ``y`` int64 (N,).  With ``require_label=False``
    an unlabelled file (Kaggle's test.csv) gives ``y = None``.  A malformed file raises
    ValueError saying what was wrong.
    """
    path = Path(path)
    header = _csv_header(path)
    label_col, pixel_cols = _csv_columns(header, path, require_label)
    values = _csv_values(path, len(header))  # (N, 784 or 785)
    pixels = values[:, pixel_cols]  # (N, 784), columns in pixel0..pixel783 order
    _check_integers(pixels, 0, 255, "pixel values", path)
    images = torch.from_numpy(pixels).reshape(-1, 28, 28)  # (N, 28, 28)
    x = images.unsqueeze(1).div_(255.0)  # (N, 1, 28, 28)
    if label_col is None:
        return x, None
    labels = values[:, label_col]
    _check_integers(labels, 0, N_CLASSES - 1, "labels", path)
    return x, torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- stratified splits


def _labels_numpy(labels: Union[Tensor, np.ndarray, Sequence[int]]) -> np.ndarray:
    """Labels as a 1-D numpy array, whatever they came as."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    return labels


def _stratified_draw(y: np.ndarray, n_train: int, seed: int) -> Tuple[Tensor, Tensor]:
    """scikit-learn's stratified draw of ``n_train`` indices and the rest, after a check with a clear message."""
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        raise ValueError(f"class {classes[counts.argmin()]} has a single sample: a stratified split needs at "
                         "least 2 of every class")
    if min(n_train, len(y) - n_train) < len(classes):
        raise ValueError(f"cannot stratify {len(y)} samples of {len(classes)} classes into {n_train} and "
                         f"{len(y) - n_train}: each side needs at least one sample per class")
    train, rest = train_test_split(np.arange(len(y)), train_size=n_train, stratify=y, random_state=seed)
    return torch.from_numpy(train.astype(np.int64)), torch.from_numpy(rest.astype(np.int64))


def stratified_split(labels: Union[Tensor, np.ndarray, Sequence[int]], val_fraction: float = 0.2,
                     seed: int = 123) -> Tuple[Tensor, Tensor]:
    """Stratified train/validation indices (int64 tensors), every class split in the same proportion.

    scikit-learn's ``train_test_split(idx, test_size=val_fraction, stratify=labels,
    random_state=seed)`` -- the original experiment's 80/20 split with seed 123:
    ``ceil(val_fraction * N)`` samples go to validation.
    """
    y = _labels_numpy(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    return _stratified_draw(y, len(y) - math.ceil(val_fraction * len(y)), seed)


def stratified_subset(labels: Union[Tensor, np.ndarray, Sequence[int]], n: int, seed: int = 123) -> Tensor:
    """``n`` indices (int64 tensor) drawn so every class keeps its share -- for short runs.

    The training part of ``train_test_split(idx, train_size=n, stratify=labels, random_state=seed)``;
    ``n`` equal to the number of labels keeps them all, in order. A subset too small to hold every
    class (or labels with a class seen once) is a plain seeded draw instead: a short run on a tiny
    dataset should still run.
    """
    y = _labels_numpy(labels)
    if not 0 < n <= len(y):
        raise ValueError(f"a subset needs 1..{len(y)} samples, got {n}")
    if n == len(y):
        return torch.arange(n)
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2 or min(n, len(y) - n) < len(classes):
        return _plain_draw(len(y), n, seed)
    return _stratified_draw(y, n, seed)[0]


def _plain_draw(n_labels: int, n: int, seed: int) -> Tensor:
    """``n`` of ``n_labels`` indices drawn without stratifying: for subsets too small to keep every class."""
    from sklearn.model_selection import train_test_split

    return torch.from_numpy(train_test_split(np.arange(n_labels), train_size=n, random_state=seed)[0].astype(np.int64))




# ----------------------------------------------------------------------------- the experiment's data


@dataclass
class MNISTData:
    """The experiment's three splits as tensors on one device (x: (N, 1, 28, 28) float32, y: (N,) int64).

    ``train_idx`` / ``val_idx`` index the official 60000-image training set, so a run can
    record exactly which images it trained and validated on.
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    train_idx: Tensor
    val_idx: Tensor

    @property
    def train(self) -> TensorPair:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def val(self) -> TensorPair:
        """``(x_val, y_val)``."""
        return self.x_val, self.y_val

    @property
    def test(self) -> TensorPair:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    def sizes(self) -> dict:
        """Samples per split, e.g. ``{'train': 48000, 'val': 12000, 'test': 10000}``."""
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def to(self, device: Union[str, torch.device]) -> "MNISTData":
        """A copy with every tensor on ``device``."""
        return MNISTData(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def _subset(idx: Tensor, labels: Tensor, n: Optional[int], seed: int) -> Tensor:
    """``idx`` itself, or a stratified ``n`` of it (``labels`` are the labels at ``idx``)."""
    if n is None or n == len(idx):
        return idx
    return idx[stratified_subset(labels, n, seed)]


def load_mnist(root: Optional[PathLike] = None, split_seed: int = 123, val_fraction: float = 0.2,
               train_samples: Optional[int] = None, val_samples: Optional[int] = None,
               test_samples: Optional[int] = None, device: Union[str, torch.device] = "cpu",
               download: bool = True) -> MNISTData:
    """MNIST as the original experiment used it: the training set split 80/20 stratified (seed 123), plus test.

    ``train_samples`` / ``val_samples`` / ``test_samples`` keep a stratified subset of that
    split (drawn with ``split_seed``) for short runs; the full sizes are 48000 / 12000 / 10000.
    """
    x, y = read_mnist(root, train=True, download=download)  # (60000, 1, 28, 28)
    x_test, y_test = read_mnist(root, train=False, download=download)  # (10000, 1, 28, 28)
    train_idx, val_idx = stratified_split(y, val_fraction, split_seed)
    train_idx = _subset(train_idx, y[train_idx], train_samples, split_seed)
    val_idx = _subset(val_idx, y[val_idx], val_samples, split_seed)
    test_idx = _subset(torch.arange(len(y_test)), y_test, test_samples, split_seed)
    data = MNISTData(x[train_idx], y[train_idx], x[val_idx], y[val_idx], x_test[test_idx], y_test[test_idx],
                     train_idx, val_idx)
    return data.to(device)


# ----------------------------------------------------------------------------- batches


def shard(order: Tensor, rank: int, world_size: int, pad: bool = True) -> Tensor:
    """Rank ``rank``'s share of an epoch's index order, every rank getting the same count (DistributedSampler's).

    ``pad=True`` repeats indices from the start to fill the last round; ``pad=False`` drops the tail.
    Ranks must pass the same ``order`` (same shuffle seed) so their shards are disjoint.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    sampler = DistributedSampler(range(len(order)), num_replicas=world_size, rank=rank, shuffle=False,
                                 drop_last=not pad)  # positions in ``order``: padding and striding as torch does them
    return order[torch.tensor(list(sampler), dtype=torch.long)]


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1, pad: bool = True) -> int:
    """How many batches :func:`batches` yields per rank for ``n`` samples."""
    per_rank = math.ceil(n / world_size) if pad else n // world_size
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, drop_last: bool = False,
            rank: int = 0, world_size: int = 1) -> Iterator[TensorPair]:
    """Yield ``(xb, yb)`` mini-batches of in-memory tensors, on their device; one pass is one epoch.

    ``shuffle`` draws a fresh permutation from ``generator`` (or the global RNG) each call.
    With ``world_size > 1`` each rank takes its :func:`shard` of that permutation; seed every
    rank's generator alike (e.g. ``seed + epoch``) so the shards are disjoint.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(x)
    if not shuffle and world_size == 1:  # plain slices: views, no copy
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    rng_device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=rng_device) if shuffle else torch.arange(n)
    if world_size > 1:
        order = shard(order, rank, world_size)
    order = order.to(x.device)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]  # (B,)
        yield x[idx], y[idx]
