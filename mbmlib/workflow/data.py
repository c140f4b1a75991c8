"""MNIST as in-memory tensors: torchvision's IDX layout, Kaggle-style CSV, the stratified split.

Where the data lives: ``data_root(root)`` -- the argument, else env ``MBMLIB_DATA``, else
``./data``.  Below it the torchvision layout ``<root>/MNIST/raw/`` holds the four IDX
files, unpacked (``train-images-idx3-ubyte``) or gzipped (``...-ubyte.gz``).

Gzipped-only files are unpacked next to the ``.gz`` files when that folder is writable
(what torchvision itself does).  A read-only folder -- no write permission bit, or a
read-only mount -- is never written to: the files are unpacked once into a cache,
``<cache>/<key>/MNIST/raw/``, with ``<cache>`` the ``cache_dir`` argument, else env
``MBMLIB_CACHE``, else ``$XDG_CACHE_HOME/mbmlib`` (``~/.cache/mbmlib``), and ``<key>`` a
short hash of the source folder's path, so two sources never mix.  A cached file older
than its ``.gz`` is unpacked again.  With no files at all, torchvision downloads them;
when that fails, :class:`MNISTNotFoundError` says which files to put where.

Everything is returned as tensors: images float32 ``(N, 1, 28, 28)`` in [0, 1], labels
int64 ``(N,)``.  Training reads batches straight from them with :func:`batches` (no
DataLoader workers: the whole set is 200 MB as float32 and a slice costs nothing).
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import math
import os
import shutil
import socket
import stat
import tempfile
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
    "cache_root",
    "data_root",
    "load_csv",
    "load_mnist",
    "num_batches",
    "prepare_mnist",
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


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are neither on disk nor downloadable; the message says what to put where."""


class MNISTCorruptError(ValueError):
    """An MNIST file is there but damaged (truncated, not gzip, not IDX); the message names it."""


# ----------------------------------------------------------------------------- where the data lives


def data_root(root: Optional[PathLike] = None) -> Path:
    """The data root: ``root`` if given, else env ``MBMLIB_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MBMLIB_DATA") or "data").expanduser()


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """Where read-only data gets unpacked: ``cache_dir``, env ``MBMLIB_CACHE``, or ``~/.cache/mbmlib``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MBMLIB_CACHE"):
        return Path(os.environ["MBMLIB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "mbmlib"


def _raw_folder(root: Path) -> Path:
    """torchvision's folder for the MNIST IDX files below a root."""
    return root / "MNIST" / "raw"


def _writable(folder: Path) -> bool:
    """Whether we may write into ``folder``; a folder without any write bit counts as read-only even for root."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    has_write_bit = bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return has_write_bit and os.access(folder, os.W_OK)


# ----------------------------------------------------------------------------- unpacking and downloading


def _unpack(gz: Path, dest: Path) -> None:
    """Unpack ``gz`` to ``dest`` atomically (temp file + rename), so concurrent readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(gz, "rb") as src:
            try:
                shutil.copyfileobj(src, out, length=1 << 20)
            except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # BadGzipFile is an OSError: say so here
                raise MNISTCorruptError(f"{gz} is damaged ({type(err).__name__}: {err}); delete it and download "
                                        "it again, or put an intact copy there") from None
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an unpacked data file is as readable as any other
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fresh(target: Path, gz: Path) -> bool:
    """Whether ``target`` exists and is not older than the ``.gz`` it was unpacked from."""
    return target.is_file() and (not gz.is_file() or target.stat().st_mtime >= gz.stat().st_mtime)


def _cache_folder(raw: Path, cache_dir: Optional[PathLike]) -> Path:
    """The cache's raw folder for one read-only source folder, keyed by a hash of its path."""
    key = hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12]
    return _raw_folder(cache_root(cache_dir) / f"mnist-{key}")


def _fill_cache(raw: Path, cache_raw: Path) -> None:
    """Make ``cache_raw`` hold all four unpacked files: unpack the ``.gz`` ones, copy the unpacked ones."""
    for name in MNIST_FILES:
        src, gz, dest = raw / name, raw / (name + ".gz"), cache_raw / name
        if src.is_file():
            if not (dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
        elif not _fresh(dest, gz):
            _unpack(gz, dest)


def _available(raw: Path) -> bool:
    """Whether each of the four files is there, unpacked or gzipped."""
    return all((raw / n).is_file() or (raw / (n + ".gz")).is_file() for n in MNIST_FILES)


def _missing_error(root: Path, reason: str) -> MNISTNotFoundError:
    """The error that tells the user exactly which files to put where."""
    raw = _raw_folder(root).resolve()
    lines = []
    for name in MNIST_FILES:
        there = (raw / name).is_file() or (raw / (name + ".gz")).is_file()
        lines.append(f"  {name}.gz{'' if there else '   (missing)'}")
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


def prepare_mnist(root: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None,
                  download: bool = True) -> Path:
    """Make the four unpacked IDX files available; returns the torchvision root to load them from.

    That is ``root`` itself when its raw folder holds (or could be given) the unpacked files,
    else the cache root the files were unpacked into (see the module docstring).
    """
    root = data_root(root)
    raw = _raw_folder(root)
    if all((raw / n).is_file() for n in MNIST_FILES):
        return root
    if not _available(raw):
        if not download:
            raise _missing_error(root, "downloading is switched off (download=False)")
        _download(root)
        return root
    if _writable(raw):
        try:
            for name in MNIST_FILES:
                if not (raw / name).is_file():
                    _unpack(raw / (name + ".gz"), raw / name)
            return root
        except OSError:
            pass  # e.g. a read-only mount with write bits set: fall through to the cache
    cache_raw = _cache_folder(raw, cache_dir)
    _fill_cache(raw, cache_raw)
    return cache_raw.parent.parent


# ----------------------------------------------------------------------------- reading


def _to_tensors(images: Tensor, labels: Tensor) -> TensorPair:
    """uint8 (N, 28, 28) images and labels -> float32 (N, 1, 28, 28) in [0, 1] and int64 (N,)."""
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)  # (N, 1, 28, 28)
    return x, labels.to(torch.int64)


def read_mnist(root: Optional[PathLike] = None, train: bool = True, cache_dir: Optional[PathLike] = None,
               download: bool = True) -> TensorPair:
    """One official MNIST split (train: 60000, test: 10000) as ``(x, y)`` tensors, via torchvision."""
    from torchvision import datasets

    tv_root = prepare_mnist(root, cache_dir=cache_dir, download=download)
    try:
        ds = datasets.MNIST(str(tv_root), train=train, download=False)
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:  # torchvision's IDX reader on bad bytes
        raw = _raw_folder(tv_root).resolve()
        raise MNISTCorruptError(f"the MNIST files in {raw} cannot be read as IDX ({type(err).__name__}: {err}); "
                                "replace the damaged ones with the official files") from None
    return _to_tensors(ds.data, ds.targets)


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


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draw counts proportional to ``class_counts`` summing to ``n_draws``; ties broken by ``rng``.

    Why a copy of scikit-learn's algorithm rather than ``train_test_split``: :func:`stratified_subset`
    draws ``n`` samples and nothing else (``_stratified_draw(y, n, 0, seed)``), which ``train_test_split``
    cannot express (its test part must be non-empty, and a non-empty one changes the random draws), and
    every committed short run (``--train-samples``) trained on exactly that subset. The 80/20 split itself
    is held to ``train_test_split(stratify=...)`` by a test (``tests/test_data.py``).

    The largest-remainder rule of scikit-learn's ``_approximate_mode``, step for step, so the
    split below is the very split ``train_test_split(..., stratify=y, random_state=seed)`` makes.
    """
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _stratified_draw(labels: np.ndarray, n_first: int, n_second: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Two disjoint stratified index sets of sizes ``n_first`` and ``n_second`` (scikit-learn's algorithm)."""
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_first, rng)
    t_i = _approximate_mode(class_counts - n_i, n_second, rng)
    first, second = [], []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        first.extend(members[: n_i[i]])
        second.extend(members[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(np.asarray(first, dtype=np.int64)), rng.permutation(np.asarray(second, dtype=np.int64))


def _labels_numpy(labels: Union[Tensor, np.ndarray, Sequence[int]]) -> np.ndarray:
    """Labels as a 1-D numpy array, whatever they came as."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    return labels


def stratified_split(labels: Union[Tensor, np.ndarray, Sequence[int]], val_fraction: float = 0.2,
                     seed: int = 123) -> Tuple[Tensor, Tensor]:
    """Stratified train/validation indices (int64 tensors), every class split in the same proportion.

    Bit-for-bit the split of scikit-learn's ``train_test_split(idx, test_size=val_fraction,
    stratify=labels, random_state=seed)`` -- the original experiment's 80/20 split with seed
    123 -- without needing scikit-learn: ``ceil(val_fraction * N)`` samples go to validation.
    """
    y = _labels_numpy(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    n_val = math.ceil(val_fraction * len(y))
    n_train = len(y) - n_val
    n_classes = len(np.unique(y))
    if min(n_train, n_val) < n_classes:
        raise ValueError(f"cannot stratify {len(y)} samples of {n_classes} classes into {n_train} train and "
                         f"{n_val} validation samples: each side needs at least one sample per class")
    train, val = _stratified_draw(y, n_train, n_val, seed)
    return torch.from_numpy(train), torch.from_numpy(val)


def stratified_subset(labels: Union[Tensor, np.ndarray, Sequence[int]], n: int, seed: int = 123) -> Tensor:
    """``n`` indices (int64 tensor) drawn so every class keeps its share -- for short runs."""
    y = _labels_numpy(labels)
    if not 0 < n <= len(y):
        raise ValueError(f"a subset needs 1..{len(y)} samples, got {n}")
    return torch.from_numpy(_stratified_draw(y, n, 0, seed)[0])


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
               cache_dir: Optional[PathLike] = None, download: bool = True) -> MNISTData:
    """MNIST as the original experiment used it: the training set split 80/20 stratified (seed 123), plus test.

    ``train_samples`` / ``val_samples`` / ``test_samples`` keep a stratified subset of that
    split (drawn with ``split_seed``) for short runs; the full sizes are 48000 / 12000 / 10000.
    """
    x, y = read_mnist(root, train=True, cache_dir=cache_dir, download=download)  # (60000, 1, 28, 28)
    x_test, y_test = read_mnist(root, train=False, cache_dir=cache_dir, download=download)  # (10000, 1, 28, 28)
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
