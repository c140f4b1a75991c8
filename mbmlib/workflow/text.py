"""A character corpus for language models: ``stdlib-chars``, the sources of Python's own standard library.

The corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test suites, ``site-packages`` and
``__pycache__`` left out), read as bytes: the vocabulary is the 256 byte values (a "character" is a byte of
UTF-8; the sources are almost all ASCII), so it needs no pass over the text and a model fits every corpus.
A fixed selection keeps it a few MB: the files in the order of the SHA-1 of their relative path, taken
until :data:`CORPUS_BYTES` are reached.  It is split by *file*, never inside one: the first files of that
order up to :data:`TEST_FRACTION` of the bytes are the test split (the same for every ``split_seed``), the
rest is shuffled with ``split_seed`` and ``val_fraction`` of its bytes go to validation.  Each split is its
files in path order, concatenated.

Built from the files each time it is opened (well under a second; nothing is cached): the same Python gives
the same corpus, and a run records the corpus' SHA-256 and the Python version beside its figures, since
another Python's standard library is another corpus.

Batches are ``(x, y)`` windows of ``context`` bytes and the bytes one position later (int64 ``(B, context)``
each).  Training draws an epoch's window starts at random from ``shuffle_seed``; validation and test read
:data:`EVAL_WINDOWS` windows (or as many as asked) at evenly spaced starts, the same every time.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .data import shard

__all__ = ["TEXT_DATASETS", "VOCAB_SIZE", "CORPUS_BYTES", "TEST_FRACTION", "EVAL_WINDOWS", "EPOCH_STEPS", "TextCorpus",
           "TextTrainData", "is_text_dataset", "corpus_files", "load_corpus", "open_text", "bits_per_char"]

TEXT_DATASETS = ("stdlib-chars",)
VOCAB_SIZE = 256  # byte values
CORPUS_BYTES = 4_000_000
TEST_FRACTION = 0.1
EVAL_WINDOWS = 256  # validation / test windows when no count is given
EVAL_BATCH = 128  # windows per evaluation batch
EPOCH_STEPS = 200  # optimiser steps per epoch when the config gives none
EPOCH_WINDOWS = EPOCH_STEPS * 16  # training windows per epoch when the caller gives none (200 steps of 16)
EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
Batch = Tuple[Tensor, Tensor]


def is_text_dataset(name: str) -> bool:
    """Whether ``name`` is a text corpus (language models train on it) rather than an image dataset."""
    return name.lower() in TEXT_DATASETS


def bits_per_char(loss_nats: float) -> float:
    """Bits per character of a mean cross-entropy in nats per character."""
    return loss_nats / math.log(2)


def _order_key(relative: str) -> str:
    return hashlib.sha1(relative.encode()).hexdigest()


def _python_files(source: Path) -> list[Path]:
    """The ``.py`` files below ``source``, not entering :data:`EXCLUDED_FOLDERS`."""
    found = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_FOLDERS]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return found


def corpus_files(source: Optional[Path] = None, budget: int = CORPUS_BYTES) -> list[Path]:
    """The corpus' files: the ``.py`` files below ``source`` (default: this Python's standard library) outside
    :data:`EXCLUDED_FOLDERS`, in the SHA-1 order of their relative paths, up to ``budget`` bytes."""
    source = Path(source or sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(_python_files(source), key=lambda p: _order_key(p.relative_to(source).as_posix())):
        if total >= budget:
            break
        chosen.append(path)
        total += path.stat().st_size
    if not chosen:
        raise FileNotFoundError(f"no .py files under {source}: the stdlib-chars corpus reads Python's standard "
                                "library sources; run with a Python whose standard library is installed as source")
    return chosen


def _take(files: list[Path], sizes: dict, share: float) -> tuple[list[Path], list[Path]]:
    """The first files of ``files`` until they hold ``share`` of its bytes (at least one), and the rest."""
    goal, total, n = share * sum(sizes[p] for p in files), 0, 0
    while n < len(files) and (n == 0 or total < goal):
        total, n = total + sizes[files[n]], n + 1
    return files[:n], files[n:]


@dataclass
class TextCorpus:
    """The three splits as uint8 tensors of bytes, the relative paths of their files, and what identifies it."""

    train: Tensor
    val: Tensor
    test: Tensor
    files: dict = field(default_factory=dict)  # split -> relative paths
    source: str = ""
    sha256: str = ""

    def describe(self) -> dict:
        """JSON-able figures of the corpus: characters and files per split, source, Python version, digest."""
        return {"corpus_chars": {s: len(getattr(self, s)) for s in ("train", "val", "test")},
                "corpus_files": {s: len(f) for s, f in self.files.items()}, "corpus_source": self.source,
                "python": platform.python_version(), "corpus_sha256": self.sha256}


def load_corpus(name: str = "stdlib-chars", split_seed: int = 123, val_fraction: float = 0.2,
                source: Optional[Path] = None, budget: int = CORPUS_BYTES) -> TextCorpus:
    """The corpus ``name`` split by file (see the module's docstring); ``source`` replaces the standard library's
    folder (tests)."""
    if not is_text_dataset(name):
        raise ValueError(f"unknown text corpus {name!r}; valid choices are {', '.join(TEXT_DATASETS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    files = corpus_files(source, budget)
    root = Path(source or sysconfig.get_paths()["stdlib"])
    if len(files) < 3:
        raise ValueError(f"the corpus under {root} has {len(files)} file(s); splitting by file needs at least 3")
    sizes = {p: p.stat().st_size for p in files}
    test, rest = _take(files, sizes, TEST_FRACTION)
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(split_seed)).tolist()
    val, train = _take([rest[i] for i in order], sizes, val_fraction)
    if not train:
        raise ValueError(f"val_fraction {val_fraction} leaves no training file in the corpus under {root}")
    digest = hashlib.sha256()
    splits, names = {}, {}
    for split, chosen in (("train", train), ("val", val), ("test", test)):
        names[split] = sorted(p.relative_to(root).as_posix() for p in chosen)
        text = b"".join((root / n).read_bytes() for n in names[split])
        digest.update(f"{split}:{len(text)}:".encode() + text)
        splits[split] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return TextCorpus(**splits, files=names, source=str(root), sha256=digest.hexdigest())


def _windows(text: Tensor, starts: Tensor, context: int) -> Batch:
    """``(x, y)``: ``context`` bytes from each start and the bytes one position later, int64 ``(len(starts), context)``."""
    idx = starts.to(text.device)[:, None] + torch.arange(context, device=text.device)  # (B, context)
    return text[idx].long(), text[idx + 1].long()


def _even_starts(text: Tensor, context: int, count: int) -> Tensor:
    """``count`` window starts spread evenly over ``text`` (the first at 0, the last ending at its end)."""
    last = len(text) - context - 1
    return torch.linspace(0, last, count, dtype=torch.float64).round().long()


class TextTrainData:
    """A :class:`TextCorpus` behind the trainer's data interface (:mod:`mbmlib.workflow.train_data`).

    An epoch is ``epoch_windows`` training windows at random starts (the trainer asks for
    ``epoch_steps x batch_size x processes``); ``num_classes`` is the vocabulary.
    """

    num_classes, channels, image_size, eval_batch = VOCAB_SIZE, None, None, EVAL_BATCH

    def __init__(self, corpus: TextCorpus, context: int, device: torch.device, epoch_windows: int,
                 val_windows: int = EVAL_WINDOWS, test_windows: int = EVAL_WINDOWS):
        for split in ("train", "val", "test"):
            if len(getattr(corpus, split)) <= context + 1:
                raise ValueError(f"the {split} split of the corpus holds {len(getattr(corpus, split))} characters, "
                                 f"fewer than one window of {context} + 1")
        self.corpus, self.context, self.epoch_windows = corpus, context, epoch_windows
        self.text = {s: getattr(corpus, s).to(device) for s in ("train", "val", "test")}
        self.windows = {"val": val_windows, "test": test_windows}

    def sizes(self) -> dict:
        """Windows per split: an epoch's training windows, and the validation and test windows."""
        return {"train": self.epoch_windows, **self.windows}

    def describe(self) -> dict:
        """The sizes, the context and the corpus' figures (recorded in a run's metrics)."""
        return {**self.sizes(), "context": self.context, **self.corpus.describe()}

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Optimiser steps per epoch on each rank."""
        return math.ceil(math.ceil(self.epoch_windows / world_size) / batch_size)

    def train_batches(self, batch_size: int, shuffle_seed: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's share of the epoch's random windows, drawn from ``shuffle_seed`` (the same on every rank)."""
        gen = torch.Generator().manual_seed(shuffle_seed)
        text = self.text["train"]
        starts = torch.randint(0, len(text) - self.context, (self.epoch_windows,), generator=gen)
        if world_size > 1:
            starts = shard(starts, rank, world_size)
        for first in range(0, len(starts), batch_size):
            yield _windows(text, starts[first:first + batch_size], self.context)

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH) -> Iterator[Batch]:
        """The ``val`` or ``test`` windows at evenly spaced starts, in batches of ``batch_size``."""
        starts = _even_starts(self.text[split], self.context, self.windows[split])
        for first in range(0, len(starts), batch_size):
            yield _windows(self.text[split], starts[first:first + batch_size], self.context)

    def first_batch(self, n: int) -> Batch:
        """``n`` training windows at evenly spaced starts (warm-up, step timing, calibration)."""
        return _windows(self.text["train"], _even_starts(self.text["train"], self.context, n), self.context)


def open_text(name: str, device: torch.device, context: int, *, epoch_windows: int = EPOCH_WINDOWS,
              split_seed: int = 123, val_fraction: float = 0.2, train_samples: Optional[int] = None,
              val_samples: Optional[int] = None, test_samples: Optional[int] = None) -> TextTrainData:
    """The corpus ``name`` as :class:`TextTrainData` with windows of ``context`` bytes, ``epoch_windows`` training
    windows an epoch; ``val_samples`` and ``test_samples`` count evaluation windows (default :data:`EVAL_WINDOWS`)."""
    if train_samples is not None:
        raise ValueError(f"train_samples: the text corpus {name} has no fixed training samples; an epoch is a "
                         "number of optimiser steps (--epoch-steps)")
    corpus = load_corpus(name, split_seed, val_fraction)
    return TextTrainData(corpus, context, device, epoch_windows, val_samples or EVAL_WINDOWS,
                         test_samples or EVAL_WINDOWS)
