"""Image-classification datasets beyond the in-memory MNIST path, through torchvision's own classes.

Names: ``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``,
``imagefolder:<path>`` and ``fake`` (torchvision's FakeData: random images, for tests and dry
runs).  Files live below the data root (``--data-dir``, else env ``MBMLIB_DATA``, else
``./data``) in torchvision's layout; where they are missing, torchvision tries to download
them, and if that fails :class:`DatasetNotFoundError` says which files to put where.

Every dataset comes normalised with its usual per-channel mean/std; training sets get light
standard augmentation (random crop with padding; horizontal flips for natural images).  The
validation set is a stratified share of the training set (:func:`mbmlib.workflow.data.stratified_split`,
the same 80/20 seed-123 rule as MNIST) seen through the evaluation transform.  :func:`loader`
wraps a split in a DataLoader (workers, pinned memory on CUDA, DistributedSampler under torchrun).
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple
from urllib.error import URLError

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .data import DOWNLOAD_TIMEOUT_S, data_root, stratified_split, stratified_subset
from .text import TEXT_DATASETS

__all__ = ["DATASETS", "DatasetInfo", "DatasetNotFoundError", "ImageSplits", "dataset_info", "load_splits",
           "loader", "targets_of"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are neither on disk nor downloadable; the message says what to put where."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, and where its files go."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool  # horizontal flips are a sensible augmentation (not for digits)
    files: str  # the files torchvision expects, for the not-found message


_GRAY = dict(channels=1, image_size=28, flip=False)
DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, mean=(0.1307,), std=(0.3081,),
                         files="MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", **_GRAY),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, mean=(0.2860,), std=(0.3530,),
                                 files="FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", **_GRAY),
    "kmnist": DatasetInfo("kmnist", 10, mean=(0.1918,), std=(0.3483,),
                          files="KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", **_GRAY),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
                           "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (or cifar-10-python.tar.gz)"),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                            "cifar-100-python/{train,test,meta} (or cifar-100-python.tar.gz)"),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False,
                        "train_32x32.mat and test_32x32.mat"),
    "fake": DatasetInfo("fake", 10, 3, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True, "(none: generated)"),
}
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
FAKE_SIZES = {True: 512, False: 128}  # FakeData images in the training and test split


def dataset_info(name: str, image_size: int = 224) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name; ``imagefolder:<path>`` counts its class folders."""
    if name.startswith("imagefolder:"):
        root = _folder_root(Path(name.split(":", 1)[1]).expanduser())
        classes = [d for d in os.scandir(root) if d.is_dir()]
        if not classes:
            raise DatasetNotFoundError(f"imagefolder: {root} holds no class folders; give a folder holding one "
                                       "sub-folder of images per class (or train/ and val/ folders of them)")
        return DatasetInfo(name, len(classes), 3, image_size, flip=True, files="<class>/<image>", **IMAGENET)
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid choices are {', '.join(DATASETS)}, imagefolder:<path> or "
                         f"the text corpus {', '.join(TEXT_DATASETS)} (for a language model)") from None


def _folder_root(path: Path, train: bool = True) -> Optional[Path]:
    """The class-folder root of an ImageFolder split: ``<path>/train``, else ``path`` itself, for training;
    ``<path>/val`` or ``<path>/test`` (None if neither) for testing."""
    if not path.is_dir():
        raise DatasetNotFoundError(f"imagefolder: {path} is not a folder; give a folder holding one sub-folder "
                                   "of images per class (or train/ and val/ folders of them)")
    if train:
        return path / "train" if (path / "train").is_dir() else path
    return next((path / n for n in ("val", "test") if (path / n).is_dir()), None)


def _check_images(folder) -> None:
    """Open the first image of every class now, so an unreadable folder is refused before training starts
    (reading every image of a large folder would take minutes; a bad one later is a one-line error too)."""
    from PIL import Image

    first = {}
    for path, label in folder.samples:
        first.setdefault(label, path)
    for path in first.values():
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ValueError(f"image {path} cannot be read ({type(err).__name__}); remove or replace it") from None


def _transform(info: DatasetInfo, train: bool, channels: Optional[int]) -> Callable:
    """Tensor conversion, normalisation, training augmentation, grey-to-RGB when a model wants 3 channels."""
    from torchvision import transforms as T

    steps = []
    if info.name.startswith("imagefolder:"):
        steps += [T.RandomResizedCrop(info.image_size)] if train else [
            T.Resize(int(info.image_size * 8 / 7)), T.CenterCrop(info.image_size)]
    elif train:
        steps.append(T.RandomCrop(info.image_size, padding=info.image_size // 8))
    if train and info.flip:
        steps.append(T.RandomHorizontalFlip())
    mean, std = info.mean, info.std
    if channels == 3 and info.channels == 1:
        steps.append(T.Grayscale(num_output_channels=3))
        mean, std = mean * 3, std * 3
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _construct(name: str, root: Path, train: bool, transform: Callable, download: bool) -> Dataset:
    """The torchvision dataset object for one split."""
    from torchvision import datasets as tv

    if name.startswith("imagefolder:"):
        folder = tv.ImageFolder(str(_folder_root(Path(name.split(":", 1)[1]).expanduser(), train)), transform=transform)
        _check_images(folder)
        return folder
    if name == "fake":
        return tv.FakeData(FAKE_SIZES[train], (3, 32, 32), 10, transform=transform, random_offset=0 if train else 10**6)
    if name == "svhn":
        return tv.SVHN(str(root), split="train" if train else "test", transform=transform, download=download)
    cls = {"mnist": tv.MNIST, "fashion-mnist": tv.FashionMNIST, "kmnist": tv.KMNIST, "cifar10": tv.CIFAR10,
           "cifar100": tv.CIFAR100}[name]
    return cls(str(root), train=train, transform=transform, download=download)


def _open(name: str, root: Path, train: bool, transform: Callable) -> Dataset:
    """The dataset from disk, else downloaded (with a timeout), else a DatasetNotFoundError naming the files."""
    try:
        return _construct(name, root, train, transform, download=False)
    except (RuntimeError, OSError):
        pass  # torchvision: "Dataset not found or corrupted", or a file missing; try the download below
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    before = _entries(root)
    try:
        return _construct(name, root, train, transform, download=True)
    except (RuntimeError, URLError, OSError) as err:
        _remove_new_entries(root, before)
        detail = " ".join(str(err).split())
        raise DatasetNotFoundError(f"{name} was not found under {root.resolve()} and downloading it failed "
                                   f"({type(err).__name__}: {detail}); put {DATASETS[name].files} there, or point "
                                   "--data-dir / MBMLIB_DATA at the folder that holds them") from None
    finally:
        socket.setdefaulttimeout(previous)


def _entries(root: Path) -> Optional[set]:
    """The names directly under ``root`` (None if it does not exist): what a failed download must leave."""
    return set(os.listdir(root)) if root.is_dir() else None


def _remove_new_entries(root: Path, before: Optional[set]) -> None:
    """Undo what a failed download created: the entries of ``root`` that were not there (all of ``root`` if it
    was not); each was made by the attempt, so nothing of the user's is in it."""
    if before is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for name in set(os.listdir(root)) - before:
        path = root / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def targets_of(dataset: Dataset) -> np.ndarray:
    """The class label of every sample, read from the dataset's label list (FakeData: computed, no images drawn)."""
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


@dataclass
class ImageSplits:
    """Train (augmented), validation and test splits of one dataset, plus its :class:`DatasetInfo`."""

    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset

    def sizes(self) -> dict:
        """Samples per split."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _subset(dataset: Dataset, idx: torch.Tensor, labels: np.ndarray, n: Optional[int], seed: int) -> Subset:
    """``dataset`` restricted to ``idx``, or to a stratified ``n`` of it."""
    if n is not None and n != len(idx):
        idx = idx[stratified_subset(labels[idx.numpy()], n, seed)]
    return Subset(dataset, idx.tolist())


def load_splits(name: str, root=None, val_fraction: float = 0.2, split_seed: int = 123,
                train_samples: Optional[int] = None, val_samples: Optional[int] = None,
                test_samples: Optional[int] = None, channels: Optional[int] = None,
                image_size: int = 224) -> ImageSplits:
    """A dataset's train/validation/test splits: the training set split stratified (80/20, seed 123), plus test.

    ``channels=3`` turns grey images into RGB for models that expect three channels;
    ``image_size`` is the crop of ``imagefolder:`` datasets.  The ``*_samples`` keep stratified subsets.
    An image folder without ``val/`` or ``test/`` is tested on its validation share.
    """
    info = dataset_info(name, image_size)
    key, root = (name if name.startswith("imagefolder:") else name.lower()), data_root(root)
    train_full = _open(key, root, True, _transform(info, True, channels))
    val_full = _open(key, root, True, _transform(info, False, channels))
    labels = targets_of(train_full)
    train_idx, val_idx = stratified_split(labels, val_fraction, split_seed)
    val = _subset(val_full, val_idx, labels, val_samples, split_seed)
    if key.startswith("imagefolder:") and _folder_root(Path(key.split(":", 1)[1]).expanduser(), False) is None:
        test = val  # one folder of images only: the validation share is all there is to test on
    else:
        test_full = _open(key, root, False, _transform(info, False, channels))
        test = _subset(test_full, torch.arange(len(test_full)), targets_of(test_full), test_samples, split_seed)
    return ImageSplits(info, _subset(train_full, train_idx, labels, train_samples, split_seed), val, test)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 2,
           device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over one split: ``workers`` processes, pinned memory on CUDA, a DistributedSampler when
    ``world_size > 1`` (call ``loader.sampler.set_epoch(epoch)`` each epoch so shuffles differ)."""
    sampler = (DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
               if world_size > 1 else None)
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda", generator=generator,
                      persistent_workers=False)
