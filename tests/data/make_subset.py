"""Regenerate the small MNIST subset under tests/data from the full MNIST files (run once, by hand).

    python tests/data/make_subset.py [ROOT]     # ROOT holds MNIST/raw/; default: $MBMLIB_DATA or ./data

Writes, in torchvision's layout, 50 training and 10 test images of each digit (the first ones
in file order) as gzipped IDX files, plus ``mnist_small.csv``: the first 5 of each digit of that
training subset in Kaggle's ``label,pixel0..pixel783`` format.  gzip timestamps are zeroed so
reruns give identical bytes.
"""
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from mbmlib.workflow.data import read_mnist

HERE = Path(__file__).resolve().parent
PER_CLASS = {"train": 50, "t10k": 10}
CSV_PER_CLASS = 5


def first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the first ``k`` samples of each class, in file order."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(10)]))


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array as a gzipped IDX file (magic 0x08 = ubyte, then the dimensions big-endian)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Kaggle's train.csv format: a header, then label and 784 pixel values per row."""
    lines = ["label," + ",".join(f"pixel{i}" for i in range(784))]
    for image, label in zip(images, labels):
        lines.append(f"{label}," + ",".join(str(v) for v in image.reshape(-1)))
    path.write_text("\n".join(lines) + "\n")


def main(root=None) -> None:
    """Write the subset files next to this script."""
    out = HERE / "MNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    for prefix, k in PER_CLASS.items():
        x, y = read_mnist(root, train=prefix == "train")
        images = (x[:, 0] * 255).round().to(torch.uint8).numpy()  # (N, 28, 28)
        labels = y.numpy()
        keep = first_per_class(labels, k)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
        if prefix == "train":
            rows = first_per_class(labels[keep], CSV_PER_CLASS)
            write_csv(HERE / "mnist_small.csv", images[keep][rows], labels[keep][rows])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
