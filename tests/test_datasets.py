"""torchvision datasets on files the tests write in torchvision's layout (no download), their splits and loaders."""
import math
import pickle

import numpy as np
import pytest
import torch

from mbmlib.workflow import datasets as DS
from mbmlib.workflow.datasets import DatasetNotFoundError, dataset_info, load_splits, loader

PER_CLASS = 5  # training images per class (the 20% validation share: one per class); test images: 2 per class


def _images(n: int, shape, seed: int) -> np.ndarray:
    """Random uint8 images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(classes: int, per_class: int) -> np.ndarray:
    """0, 1, ..., classes-1 repeated per_class times."""
    return np.tile(np.arange(classes), per_class)


def _idx(path, array: np.ndarray) -> None:
    """An IDX file of bytes (magic 0x0800 | ndim) as torchvision reads it."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist_like(root, folder: str) -> None:
    """MNIST / FashionMNIST / KMNIST: the four unpacked IDX files in <root>/<folder>/raw/."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class in (("train", PER_CLASS), ("t10k", 2)):
        labels = _labels(10, per_class).astype(np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", _images(len(labels), (28, 28), per_class))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_cifar(root, classes: int) -> None:
    """CIFAR-10 (five training batches) or CIFAR-100 pickles in torchvision's folders."""
    folder, label_key = ("cifar-10-batches-py", "labels") if classes == 10 else ("cifar-100-python", "fine_labels")
    base = root / folder
    base.mkdir(parents=True)
    parts = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    train = _labels(classes, PER_CLASS)
    for i, chunk in enumerate(np.array_split(train, len(parts))):
        batch = {"data": _images(len(chunk), (3072,), i), label_key: chunk.tolist()}
        (base / parts[i]).write_bytes(pickle.dumps(batch))
    test = _labels(classes, 2)
    (base / ("test_batch" if classes == 10 else "test")).write_bytes(
        pickle.dumps({"data": _images(len(test), (3072,), 9), label_key: test.tolist()}))
    meta_key = "label_names" if classes == 10 else "fine_label_names"
    (base / ("batches.meta" if classes == 10 else "meta")).write_bytes(
        pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))


def write_svhn(root) -> None:
    """SVHN's .mat files: X (32, 32, 3, N), y (N, 1) with 10 standing for the digit 0."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", PER_CLASS), ("test", 2)):
        y = _labels(10, per_class)
        savemat(root / f"{split}_32x32.mat", {"X": _images(len(y), (32, 32, 3), 1).transpose(1, 2, 3, 0),
                                              "y": np.where(y == 0, 10, y).reshape(-1, 1)})


def write_image_folder(root, split_folders: bool) -> None:
    """PNG images, one sub-folder per class (3 classes), under train/ and val/ or directly."""
    from PIL import Image

    for split, n in ((("train", 6), ("val", 2)) if split_folders else (("", 6),)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i, img in enumerate(_images(n, (40, 30, 3), c)):
                Image.fromarray(img).save(folder / f"{i}.png")


@pytest.fixture
def no_download(monkeypatch):
    """Every torchvision download fails at once, as without network."""
    from torchvision import datasets as tv

    def no_network(self):
        raise RuntimeError("no network in tests")

    for cls in (tv.MNIST, tv.CIFAR10, tv.SVHN):
        monkeypatch.setattr(cls, "download", no_network)


@pytest.fixture
def trusted(monkeypatch, no_download):
    """The tests' files are not the official ones: skip torchvision's md5 checks (downloads still fail)."""
    from torchvision.datasets import cifar, svhn

    for module in (cifar, svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


CASES = {  # name -> (writer, classes, channels, size)
    "mnist": (lambda r: write_mnist_like(r, "MNIST"), 10, 1, 28),
    "fashion-mnist": (lambda r: write_mnist_like(r, "FashionMNIST"), 10, 1, 28),
    "kmnist": (lambda r: write_mnist_like(r, "KMNIST"), 10, 1, 28),
    "cifar10": (lambda r: write_cifar(r, 10), 10, 3, 32),
    "cifar100": (lambda r: write_cifar(r, 100), 100, 3, 32),
    "svhn": (write_svhn, 10, 3, 32),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_dataset_class_loads_splits_and_batches(name, tmp_path, trusted):
    writer, classes, channels, size = CASES[name]
    writer(tmp_path)
    splits = load_splits(name, tmp_path)
    n_train = classes * PER_CLASS
    assert splits.sizes() == {"train": n_train - n_train // 5, "val": n_train // 5, "test": 2 * classes}
    assert splits.info.num_classes == classes and splits.info.channels == channels
    x, y = next(iter(loader(splits.test, batch_size=7)))
    assert x.shape == (7, channels, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.as_tensor(_labels(classes, 2)[:7]))  # the test split keeps its order and labels
    assert abs(float(x.mean())) < 2.0  # normalised, not raw 0..255
    val_labels = DS.targets_of(splits.val.dataset)[splits.val.indices]
    assert np.array_equal(np.bincount(val_labels, minlength=classes), np.ones(classes))  # stratified
    assert set(splits.train.indices).isdisjoint(splits.val.indices)


def test_grey_images_become_rgb_for_three_channel_models(tmp_path, trusted):
    write_mnist_like(tmp_path, "MNIST")
    x, _ = next(iter(loader(load_splits("mnist", tmp_path, channels=3).test, batch_size=4)))
    assert x.shape == (4, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])


def test_training_split_is_augmented_and_evaluation_splits_are_not(tmp_path, trusted):
    write_cifar(tmp_path, 10)
    splits = load_splits("cifar10", tmp_path)
    i = 0
    torch.manual_seed(0)
    train_views = [splits.train[i][0] for _ in range(4)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:])  # random crops / flips
    assert torch.equal(splits.val[i][0], splits.val[i][0])


@pytest.mark.parametrize("split_folders", [True, False])
def test_image_folder(tmp_path, split_folders):
    write_image_folder(tmp_path / "imgs", split_folders)
    splits = load_splits(f"imagefolder:{tmp_path / 'imgs'}", image_size=24)
    assert splits.info.num_classes == 3
    assert splits.sizes()["test"] == (6 if split_folders else splits.sizes()["val"])
    x, y = next(iter(loader(splits.test, batch_size=2)))
    assert x.shape == (2, 3, 24, 24) and int(y.max()) < 3


def test_fake_data_needs_no_files_and_is_deterministic(tmp_path):
    a, b = load_splits("fake", tmp_path, train_samples=64), load_splits("fake", tmp_path)
    assert a.sizes()["train"] == 64 and a.sizes()["test"] == DS.FAKE_SIZES[False]
    assert torch.equal(a.test[3][0], b.test[3][0])
    assert not (tmp_path / "FakeData").exists() and not any(tmp_path.iterdir())


def test_missing_files_say_which_files_to_put_where(tmp_path, no_download):
    with pytest.raises(DatasetNotFoundError, match=r"cifar10 was not found under .*no network in tests.*"
                                                    r"cifar-10-batches-py/\{data_batch_1..5"):
        load_splits("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat and test_32x32.mat"):
        load_splits("svhn", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        load_splits(f"imagefolder:{tmp_path / 'nowhere'}")


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid choices are mnist, fashion-mnist"):
        dataset_info("imagenet")


def test_distributed_loaders_split_the_data_between_ranks(tmp_path):
    splits = load_splits("fake", tmp_path, train_samples=40)
    seen = [sum(len(y) for _, y in loader(splits.val, 4, shuffle=True, rank=r, world_size=2, workers=0))
            for r in range(2)]
    assert seen[0] == seen[1] == math.ceil(len(splits.val) / 2)
    first = loader(splits.train, 8, shuffle=True, rank=0, world_size=2, workers=0)
    assert isinstance(first.sampler, torch.utils.data.DistributedSampler) and not first.pin_memory


def test_a_failed_download_leaves_the_data_root_as_it_found_it(tmp_path, monkeypatch):
    """torchvision makes its folders before fetching; when the fetch fails, they go again (the user's files stay)."""
    import os

    from torchvision import datasets as tv

    def half_download(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision's own download starts
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(tv.MNIST, "download", half_download)
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("the user's")
    with pytest.raises(DatasetNotFoundError):
        load_splits("fashion-mnist", root)
    assert sorted(p.name for p in root.iterdir()) == ["keep.txt"]
    with pytest.raises(DatasetNotFoundError):
        load_splits("kmnist", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_unreadable_images_are_one_line_errors_before_and_during_training(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / label / f"{i}.png")
    (root / "a" / "0.png").write_bytes(b"not an image")  # the first of its class: checked up front
    with pytest.raises(ValueError, match=r"image .*a/0.png cannot be read"):
        load_splits(f"imagefolder:{root}", image_size=8)
    Image.new("RGB", (8, 8)).save(root / "a" / "0.png")
    (root / "b" / "2.png").write_bytes(b"broken later")  # not the first: found while reading
    from mbmlib.workflow.train_data import LoaderTrainData

    data = LoaderTrainData(load_splits(f"imagefolder:{root}", image_size=8), torch.device("cpu"), workers=0)
    with pytest.raises(ValueError, match="an image could not be read .*remove or replace it"):
        for read in (lambda: data.train_batches(2, 0, 0, 1), lambda: data.eval_batches("val", 2)):
            list(read())  # the broken file is in one of the splits
