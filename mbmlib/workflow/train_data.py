"""What the trainer iterates over: in-memory tensors (MNIST, a CSV), a torchvision dataset through DataLoaders,
or a text corpus' windows (:class:`mbmlib.workflow.text.TextTrainData`).

Every source answers the same questions -- how many samples and steps, this epoch's shuffled
training batches for this rank, the validation and test batches, and a first batch for
warm-up and timing -- so :mod:`mbmlib.workflow.train` does not care which one it holds.
MNIST with a one-channel model keeps the fast in-memory path (pixels in [0, 1], as the
original experiment trained); every other image dataset, or MNIST for a three-channel model, goes
through :mod:`mbmlib.workflow.datasets` (normalised, augmented for training).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import data as mdata
from .models import check_input, is_language_model
from .text import TEXT_DATASETS, is_text_dataset, open_text

__all__ = ["TensorTrainData", "LoaderTrainData", "EVAL_BATCH", "uses_memory_path", "open_splits",
           "check_model_dataset"]

EVAL_BATCH = 500  # validation/test batch size: large batches, no gradients
Batch = Tuple[Tensor, Tensor]


def uses_memory_path(dataset: str, channels: Optional[int]) -> bool:
    """Whether ``dataset`` for a model wanting ``channels`` input channels (None: the data's own) stays in memory."""
    return dataset.lower() == "mnist" and channels in (None, 1)


class TensorTrainData:
    """The splits as tensors on the training device (:class:`mbmlib.workflow.data.MNISTData`)."""

    num_classes, channels, image_size, eval_batch = 10, 1, 28, EVAL_BATCH

    def __init__(self, data: mdata.MNISTData):
        self.data = data

    def sizes(self) -> dict:
        """Samples per split."""
        return self.data.sizes()

    def describe(self) -> dict:
        """What a run records of its data: the samples per split."""
        return self.sizes()

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Optimiser steps per epoch on each rank."""
        return mdata.num_batches(len(self.data.y_train), batch_size, world_size=world_size)

    def train_batches(self, batch_size: int, shuffle_seed: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's shuffled training batches; the same ``shuffle_seed`` on every rank keeps shards disjoint."""
        gen = torch.Generator().manual_seed(shuffle_seed)
        return mdata.batches(self.data.x_train, self.data.y_train, batch_size, shuffle=True, generator=gen,
                             rank=rank, world_size=world_size)

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH) -> Iterator[Batch]:
        """The ``val`` or ``test`` split in order, in batches of ``batch_size``."""
        x, y = self.data.val if split == "val" else self.data.test
        return mdata.batches(x, y, batch_size)

    def first_batch(self, n: int) -> Batch:
        """The first ``n`` training samples (warm-up, step timing)."""
        return self.data.x_train[:n], self.data.y_train[:n]


class LoaderTrainData:
    """A torchvision dataset's splits (:class:`mbmlib.workflow.datasets.ImageSplits`) read by DataLoaders.

    Batches are moved to ``device`` as they come (pinned memory on CUDA); ``workers``
    processes decode and augment in the background.
    """

    eval_batch = EVAL_BATCH

    def __init__(self, splits, device: torch.device, workers: int):
        self.splits, self.device, self.workers = splits, device, workers
        self.num_classes, self.image_size = splits.info.num_classes, splits.info.image_size
        self.channels = splits.train[0][0].shape[0]  # after grey-to-RGB for a three-channel model

    def sizes(self) -> dict:
        """Samples per split."""
        return self.splits.sizes()

    def describe(self) -> dict:
        """What a run records of its data: the samples per split."""
        return self.sizes()

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Optimiser steps per epoch on each rank (DistributedSampler pads every rank to the same count)."""
        return mdata.num_batches(len(self.splits.train), batch_size, world_size=world_size)

    def _batches(self, dataset, batch_size: int, **loader_kw) -> Iterator[Batch]:
        from .datasets import loader

        blocking = self.device.type != "cuda"
        try:
            for x, y in loader(dataset, batch_size, workers=self.workers, device=self.device, **loader_kw):
                yield x.to(self.device, non_blocking=not blocking), y.to(self.device, non_blocking=not blocking)
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files, raised in a worker or here
            detail = next((line for line in str(err).splitlines() if "image" in line.lower()), str(err))
            raise ValueError(f"an image could not be read ({detail.strip()[:300]}); remove or replace it, then "
                             "continue the run with --resume") from None

    def train_batches(self, batch_size: int, shuffle_seed: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's shuffled, augmented training batches (the shuffle drawn from ``shuffle_seed``)."""
        return self._batches(self.splits.train, batch_size, shuffle=True, seed=shuffle_seed, rank=rank,
                             world_size=world_size)

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH) -> Iterator[Batch]:
        """The ``val`` or ``test`` split in order (evaluation transform), in batches of ``batch_size``."""
        return self._batches(self.splits.val if split == "val" else self.splits.test, batch_size)

    def first_batch(self, n: int) -> Batch:
        """``n`` training samples in dataset order (warm-up, step timing)."""
        return next(iter(self._batches(self.splits.train, n)))


def check_model_dataset(model: str, dataset: str) -> None:
    """ValueError when ``model`` cannot learn from ``dataset``, checked before any data loads: a language model
    needs a text corpus and an image model images (of the size it takes, :func:`check_input`)."""
    if is_language_model(model) and not is_text_dataset(dataset):
        raise ValueError(f"{model} is a language model: it trains on a text corpus ({', '.join(TEXT_DATASETS)}), "
                         f"not on {dataset}; pass --dataset {TEXT_DATASETS[0]}")
    if is_text_dataset(dataset):
        if not is_language_model(model):
            raise ValueError(f"{dataset} is a text corpus: train a language model on it (gpt-char), not {model}")
        return
    from .datasets import dataset_info

    info = dataset_info(dataset)
    check_input(model, info.channels, info.image_size, dataset)


def open_splits(dataset: str, root, channels: Optional[int], device: torch.device, *, val_fraction: float = 0.2,
                split_seed: int = 123, train_samples: Optional[int] = None, val_samples: Optional[int] = None,
                test_samples: Optional[int] = None, workers: int = 2, image_size: int = 224,
                context: Optional[int] = None, epoch_windows: Optional[int] = None):
    """A dataset's splits behind the one interface: MNIST for a one-channel model in memory
    (:class:`TensorTrainData`), a text corpus as windows of ``context`` tokens, ``epoch_windows`` an epoch
    (:class:`mbmlib.workflow.text.TextTrainData`), any other through DataLoaders (:class:`LoaderTrainData`).

    The one place the in-memory path is chosen; training and evaluation both read their data here.
    """
    if is_text_dataset(dataset):
        if context is None:
            raise ValueError(f"{dataset} is a text corpus: give the context length of the language model")
        return open_text(dataset, device, context, split_seed=split_seed, val_fraction=val_fraction,
                         train_samples=train_samples, val_samples=val_samples, test_samples=test_samples,
                         **({} if epoch_windows is None else dict(epoch_windows=epoch_windows)))
    if uses_memory_path(dataset, channels):
        return TensorTrainData(mdata.load_mnist(root, split_seed=split_seed, val_fraction=val_fraction,
                                                train_samples=train_samples, val_samples=val_samples,
                                                test_samples=test_samples, device=device))
    from .datasets import load_splits

    splits = load_splits(dataset, root, val_fraction, split_seed, train_samples, val_samples, test_samples,
                         channels=channels, image_size=image_size)
    return LoaderTrainData(splits, device, workers)
