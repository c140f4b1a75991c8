"""MNIST loading (IDX and CSV), the stratified split and the in-memory batches."""
import gzip
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mbmlib.workflow import data as D
from mbmlib.workflow.data import (
    MNIST_FILES,
    MNISTNotFoundError,
    batches,
    data_root,
    load_csv,
    load_mnist,
    num_batches,
    read_mnist,
    shard,
    stratified_split,
    stratified_subset,
)

HERE = Path(__file__).resolve().parent
SUBSET = HERE / "data"  # 50 train / 10 test images per digit, gzipped IDX (see data/make_subset.py)
SMALL_CSV = SUBSET / "mnist_small.csv"  # the first 5 of each digit of that training subset
REAL_ROOT = os.environ.get("MBMLIB_DATA")  # read before the fixture below clears it


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the caller's MBMLIB_DATA or writes into the caller's cache."""
    monkeypatch.delenv("MBMLIB_DATA", raising=False)
    monkeypatch.setenv("MBMLIB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def gz_root(tmp_path):
    """A writable copy of the subset with only the .gz files, as downloaded."""
    root = tmp_path / "root"
    shutil.copytree(SUBSET / "MNIST", root / "MNIST", ignore=lambda folder, names: [n for n in names if n.endswith("-ubyte")])
    return root


def _unpack_all(raw: Path, remove_gz: bool) -> None:
    """Unpack the four .gz files by hand (as a user would with gunzip)."""
    for name in MNIST_FILES:
        with gzip.open(raw / (name + ".gz"), "rb") as src:
            (raw / name).write_bytes(src.read())
        if remove_gz:
            (raw / (name + ".gz")).unlink()


def _no_download(monkeypatch):
    """Make torchvision's download fail at once, as without network."""
    from torchvision import datasets

    def fail(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network in tests")

    monkeypatch.setattr(datasets.MNIST, "download", fail)


# ----------------------------------------------------------------------------- where the data lives


def test_data_root_prefers_argument_then_env_then_dot_data(monkeypatch, tmp_path):
    assert data_root() == Path("data")
    monkeypatch.setenv("MBMLIB_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"


# ----------------------------------------------------------------------------- IDX files


def test_gz_files_are_read_in_memory_and_nothing_is_written(gz_root, tmp_path):
    raw = gz_root / "MNIST" / "raw"
    before = sorted(os.listdir(raw))
    x, y = read_mnist(gz_root, train=True)
    assert sorted(os.listdir(raw)) == before and not (tmp_path / "cache").exists()
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (500,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 50))
    x_test, y_test = read_mnist(gz_root, train=False)
    assert x_test.shape == (100, 1, 28, 28) and torch.equal(torch.bincount(y_test), torch.full((10,), 10))


def test_read_only_folder_is_read_as_it_is(gz_root):
    raw = gz_root / "MNIST" / "raw"
    want = read_mnist(gz_root, train=False)
    raw.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        got = read_mnist(gz_root, train=False)
    finally:
        raw.chmod(stat.S_IRWXU)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_unpacked_files_give_the_same_tensors_as_gzipped_ones(gz_root):
    want = read_mnist(gz_root, train=True)
    _unpack_all(gz_root / "MNIST" / "raw", remove_gz=True)
    got = read_mnist(gz_root, train=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_idx_reader_matches_torchvision(gz_root):
    from torchvision import datasets

    _unpack_all(gz_root / "MNIST" / "raw", remove_gz=False)
    tv = datasets.MNIST(str(gz_root), train=True, download=False)
    x, y = read_mnist(gz_root, train=True)
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), tv.data) and torch.equal(y, tv.targets)


def test_missing_data_names_the_four_files_the_folder_and_the_env_var(tmp_path, monkeypatch):
    _no_download(monkeypatch)
    root = tmp_path / "empty"
    with pytest.raises(MNISTNotFoundError) as info:
        read_mnist(root)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str((root / "MNIST" / "raw").resolve()) in message
    for name in MNIST_FILES:
        assert f"{name}.gz   (missing)" in message
    assert "MBMLIB_DATA" in message and "no network in tests" in message


def test_partly_missing_data_marks_only_the_missing_files(gz_root, monkeypatch):
    _no_download(monkeypatch)
    (gz_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(gz_root)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz   (missing)" in message
    assert "train-images-idx3-ubyte.gz   (missing)" not in message


def test_download_false_never_downloads(tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "download", lambda self: pytest.fail("download was attempted"))
    with pytest.raises(MNISTNotFoundError, match="download=False"):
        read_mnist(tmp_path / "empty", download=False)


# ----------------------------------------------------------------------------- CSV


def _write_csv(path: Path, header, rows) -> Path:
    """A CSV file from a header list and rows of values."""
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _small_csv_table():
    """The small CSV as (header, int rows)."""
    header = SMALL_CSV.read_text().splitlines()[0].split(",")
    rows = np.loadtxt(SMALL_CSV, delimiter=",", skiprows=1, dtype=np.int64)
    return header, rows


def test_csv_matches_the_idx_images_it_was_made_from(gz_root):
    x, y = load_csv(SMALL_CSV)
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(torch.bincount(y), torch.full((10,), 5))
    x_idx, y_idx = read_mnist(gz_root)
    first5 = torch.cat([torch.nonzero(y_idx == c).flatten()[:5] for c in range(10)]).sort().values
    assert torch.equal(y, y_idx[first5]) and torch.equal(x, x_idx[first5])


def test_csv_columns_in_another_order_give_the_same_tensors(tmp_path):
    header, rows = _small_csv_table()
    perm = np.random.default_rng(0).permutation(len(header))
    path = _write_csv(tmp_path / "shuffled.csv", [header[i] for i in perm], rows[:, perm])
    x, y = load_csv(path)
    want_x, want_y = load_csv(SMALL_CSV)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_unlabelled_csv(tmp_path):
    header, rows = _small_csv_table()
    path = _write_csv(tmp_path / "test.csv", header[1:], rows[:, 1:])
    x, y = load_csv(path, require_label=False)
    assert y is None and torch.equal(x, load_csv(SMALL_CSV)[0])
    with pytest.raises(ValueError, match="no 'label' column"):
        load_csv(path)


def _bad_csvs(tmp_path):
    """(name, path, expected message pattern) for each kind of malformed CSV."""
    header, rows = _small_csv_table()
    rows = rows[:3].copy()
    out_of_range, bad_label = rows.copy(), rows.copy()
    out_of_range[1, 300] = 256
    bad_label[2, 0] = 10
    renamed = list(header)
    renamed[5] = "px4"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join(SMALL_CSV.read_text().splitlines()[:3]) + "\n" + "1," * 10 + "1\n")
    text = tmp_path / "text.csv"
    text.write_text(SMALL_CSV.read_text().splitlines()[0] + "\n" + "seven," + ",".join(["0"] * 784) + "\n")
    return [
        ("too few columns", _write_csv(tmp_path / "few.csv", header[:-1], rows[:, :-1]), "784 columns, expected 785"),
        ("no label", _write_csv(tmp_path / "nolabel.csv", header[1:] + ["x"], rows), "no 'label' column"),
        ("renamed pixel", _write_csv(tmp_path / "renamed.csv", renamed, rows), r"missing \['pixel4'\]"),
        ("pixel 256", _write_csv(tmp_path / "range.csv", header, out_of_range), "pixel values .* row 2"),
        ("label 10", _write_csv(tmp_path / "label.csv", header, bad_label), "labels must be whole numbers in 0..9"),
        ("header only", _write_csv(tmp_path / "header.csv", header, []), "no data rows"),
        ("empty", empty, "empty"),
        ("ragged row", ragged, "could not read the rows as 785 numbers"),
        ("short rows", _write_csv(tmp_path / "short.csv", header, rows[:, :-2]), "rows have 783 values"),
        ("text value", text, "could not read the rows"),
    ]


def test_bad_csvs_raise_value_errors_that_say_what_was_wrong(tmp_path):
    for name, path, pattern in _bad_csvs(tmp_path):
        with pytest.raises(ValueError, match=pattern) as info:
            load_csv(path)
        assert path.name in str(info.value), name


# ----------------------------------------------------------------------------- stratified split


def _random_labels(n: int, seed: int) -> np.ndarray:
    """Unbalanced labels 0..9 (class c about (c + 1) times as common as class 0)."""
    rng = np.random.default_rng(seed)
    return rng.choice(10, size=n, p=np.arange(1, 11) / 55)


def test_split_sizes_disjoint_and_complete():
    labels = _random_labels(1003, seed=1)
    train, val = stratified_split(labels)
    assert (len(train), len(val)) == (802, 201)  # ceil(0.2 * 1003) to validation, as scikit-learn
    assert train.dtype == val.dtype == torch.int64
    both = torch.cat([train, val])
    assert torch.equal(both.sort().values, torch.arange(1003))


def test_split_keeps_class_proportions():
    labels = _random_labels(5000, seed=2)
    train, val = stratified_split(labels, val_fraction=0.2)
    counts = np.bincount(labels, minlength=10)
    val_counts = np.bincount(labels[val.numpy()], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * counts) <= 1)
    assert np.array_equal(np.bincount(labels[train.numpy()], minlength=10) + val_counts, counts)


def test_split_is_deterministic_per_seed():
    labels = torch.from_numpy(_random_labels(600, seed=3))
    a, b = stratified_split(labels, seed=123), stratified_split(labels, seed=123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(stratified_split(labels, seed=124)[1], a[1])


@pytest.mark.parametrize("n, fraction, seed", [(60, 0.2, 123), (1003, 0.2, 123), (777, 0.35, 7), (5000, 0.1, 0)])
def test_split_equals_scikit_learn_train_test_split(n, fraction, seed):
    model_selection = pytest.importorskip("sklearn.model_selection")
    labels = _random_labels(n, seed=n)
    want_train, want_val = model_selection.train_test_split(np.arange(n), test_size=fraction, stratify=labels,
                                                            random_state=seed)
    train, val = stratified_split(labels, val_fraction=fraction, seed=seed)
    assert np.array_equal(train.numpy(), want_train) and np.array_equal(val.numpy(), want_val)


def test_split_rejects_bad_arguments():
    labels = _random_labels(100, seed=4)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            stratified_split(labels, val_fraction=fraction)
    with pytest.raises(ValueError, match="at least one sample per class"):
        stratified_split(np.arange(20) % 10, val_fraction=0.2)
    with pytest.raises(ValueError, match="1-D"):
        stratified_split(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="class 9 has a single sample"):
        stratified_split(np.r_[np.arange(40) % 9, 9], val_fraction=0.5)


def test_subset_is_stratified_and_inside_the_labels():
    labels = _random_labels(2000, seed=5)
    idx = stratified_subset(labels, 300, seed=123)
    assert len(idx) == 300 and len(set(idx.tolist())) == 300 and idx.max() < 2000
    share = np.bincount(labels[idx.numpy()], minlength=10)
    assert np.all(np.abs(share - 300 * np.bincount(labels, minlength=10) / 2000) <= 1)
    with pytest.raises(ValueError, match="1..2000"):
        stratified_subset(labels, 2001)
    assert torch.equal(stratified_subset(labels, 2000), torch.arange(2000))


@pytest.mark.parametrize("labels, n", [(_random_labels(2000, seed=5), 1995), (np.arange(10), 5)])
def test_subset_too_small_to_stratify_is_a_plain_seeded_draw(labels, n):
    from sklearn.model_selection import train_test_split

    want = train_test_split(np.arange(len(labels)), train_size=n, random_state=7)[0]
    assert np.array_equal(stratified_subset(labels, n, seed=7).numpy(), want)


@pytest.mark.parametrize("n, size, seed", [(2000, 300, 123), (48, 20, 0), (1003, 512, 7)])
def test_subset_is_the_train_part_of_scikit_learn_train_test_split(n, size, seed):
    from sklearn.model_selection import train_test_split

    labels = _random_labels(n, seed=n)
    want = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)[0]
    assert np.array_equal(stratified_subset(labels, size, seed).numpy(), want)


# ----------------------------------------------------------------------------- load_mnist


def test_load_mnist_splits_the_subset(gz_root):
    d = load_mnist(gz_root)
    assert d.sizes() == {"train": 400, "val": 100, "test": 100}
    assert torch.equal(torch.bincount(d.y_val), torch.full((10,), 10))
    x, y = read_mnist(gz_root)
    assert torch.equal(d.x_train, x[d.train_idx]) and torch.equal(d.y_val, y[d.val_idx])
    assert set(d.train_idx.tolist()).isdisjoint(d.val_idx.tolist())
    assert d.train == (d.x_train, d.y_train) and d.x_train.device.type == "cpu"


def test_load_mnist_short_run_subsets(gz_root):
    d = load_mnist(gz_root, train_samples=50, val_samples=20, test_samples=30)
    assert d.sizes() == {"train": 50, "val": 20, "test": 30}
    assert torch.equal(torch.bincount(d.y_train), torch.full((10,), 5))
    assert torch.equal(d.y_train, load_mnist(gz_root, train_samples=50).y_train)  # deterministic
    assert set(d.train_idx.tolist()) <= set(load_mnist(gz_root).train_idx.tolist())
    with pytest.raises(ValueError, match="1..400"):
        load_mnist(gz_root, train_samples=401)


def test_load_mnist_uses_env_root(gz_root, monkeypatch):
    monkeypatch.setenv("MBMLIB_DATA", str(gz_root))
    assert load_mnist().sizes()["train"] == 400


def test_load_mnist_on_device(gz_root, device):
    d = load_mnist(gz_root, train_samples=20, device=device)
    assert all(t.device.type == device.type for t in (d.x_train, d.y_val, d.x_test, d.train_idx))


@pytest.mark.skipif(not REAL_ROOT or not all(D._find(Path(REAL_ROOT) / "MNIST" / "raw", n) for n in MNIST_FILES),
                    reason="the full MNIST: set MBMLIB_DATA to a root holding MNIST/raw/")
def test_full_mnist_sizes():
    d = load_mnist(REAL_ROOT)
    assert d.sizes() == {"train": 48000, "val": 12000, "test": 10000}


# ----------------------------------------------------------------------------- batches


def _tensors(n: int):
    """x whose single pixel is the sample's index, and y = index mod 10."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)  # (N, 1, 1, 1)
    return x, torch.arange(n) % 10


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (1, 16), (17, 1)])
def test_batches_cover_every_sample_once(n, batch_size, shuffle):
    x, y = _tensors(n)
    got = list(batches(x, y, batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert len(got) == num_batches(n, batch_size)
    assert all(len(xb) == len(yb) <= batch_size for xb, yb in got)
    seen = torch.cat([xb.flatten() for xb, _ in got]).long()
    assert torch.equal(seen.sort().values, torch.arange(n))
    assert all(torch.equal(yb, xb.flatten().long() % 10) for xb, yb in got)  # x and y stay paired


def test_batches_drop_last_and_shuffle_determinism():
    x, y = _tensors(10)
    kept = list(batches(x, y, 3, drop_last=True))
    assert [len(b[0]) for b in kept] == [3, 3, 3] and num_batches(10, 3, drop_last=True) == 3

    def order(seed):
        return torch.cat([xb.flatten() for xb, _ in batches(x, y, 4, shuffle=True,
                                                              generator=torch.Generator().manual_seed(seed))])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert not torch.equal(order(1), torch.arange(10.0))


def test_batches_stay_on_the_tensors_device(device):
    x, y = (t.to(device) for t in _tensors(9))
    for xb, yb in batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert xb.device == yb.device == x.device


def test_batches_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="x has 5 samples but y has 4"):
        next(batches(torch.zeros(5, 1), torch.zeros(4), 2))


@pytest.mark.parametrize("n, world_size", [(10, 3), (12, 4), (2, 3)])
def test_shards_are_equal_sized_and_cover_the_epoch(n, world_size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [shard(order, rank, world_size) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(range(n))
    assert sum(len(s) for s in shards) - n < world_size  # padding only fills the last round
    dropped = [shard(order, rank, world_size, pad=False) for rank in range(world_size)]
    flat = torch.cat(dropped).tolist()
    assert len(flat) == len(set(flat)) == n - n % world_size


def test_ranks_batch_disjoint_shards_of_one_permutation():
    x, y = _tensors(20)
    seen = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(7)  # every rank seeds alike
        seen.append(torch.cat([xb.flatten() for xb, _ in batches(x, y, 3, True, gen, rank=rank, world_size=2)]))
        assert len(list(batches(x, y, 3, True, gen, rank=rank, world_size=2))) == num_batches(20, 3, world_size=2)
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(20))
    with pytest.raises(ValueError, match="rank"):
        shard(torch.arange(4), 2, 2)


def _raw_copy(tmp_path, mnist_root):
    """A writable copy of the MNIST subset's raw folder (gzipped files only)."""
    root = tmp_path / "root"
    shutil.copytree(mnist_root, root)
    return root, root / "MNIST" / "raw"


def _idx_bytes(magic: int, shape, payload: bytes) -> bytes:
    """An IDX file's bytes: magic number, dimensions, values."""
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + payload


def _damage(path: Path, damage: str) -> str:
    """Damage one .gz file in place; returns the pattern its error must match."""
    data = path.read_bytes()
    labels = gzip.decompress(data)[8:]
    kinds = {
        "truncated": (data[: len(data) // 2], "EOFError"),
        "not gzip": (b"plain text, not gzip" * 100, "BadGzipFile"),
        "empty": (b"", "magic number missing"),
        "wrong magic": (gzip.compress(_idx_bytes(0x0999, [len(labels)], labels)), "magic number 00000999"),
        "wrong count": (gzip.compress(_idx_bytes(0x0801, [len(labels) + 7], labels)), "promises"),
    }
    path.write_bytes(kinds[damage][0])
    return kinds[damage][1]


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "empty", "wrong magic", "wrong count"])
def test_damaged_gz_is_a_one_line_error_naming_the_file_and_what_to_do(tmp_path, mnist_root, damage):
    root, raw = _raw_copy(tmp_path, mnist_root)
    bad = raw / "train-labels-idx1-ubyte.gz"
    pattern = _damage(bad, damage)
    with pytest.raises(D.MNISTCorruptError, match=pattern) as caught:
        D.load_mnist(root)
    message = str(caught.value)
    assert message.startswith(f"{bad} is damaged") and "download it again" in message and "\n" not in message
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in (mnist_root / "MNIST" / "raw").iterdir())


def test_images_and_labels_of_different_counts_are_a_clear_error(tmp_path, mnist_root):
    root, raw = _raw_copy(tmp_path, mnist_root)
    labels = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(0x0801, [len(labels) - 1], labels[:-1])))
    with pytest.raises(D.MNISTCorruptError, match=r"t10k-images-idx3-ubyte.gz is damaged .*do not fit labels"):
        read_mnist(root, train=False)
    assert read_mnist(root, train=True)[0].shape == (500, 1, 28, 28)  # the other split still loads


def test_cli_reports_a_damaged_file_in_one_line(tmp_path, mnist_root, capsys):
    from mbmlib.workflow import cli

    root, raw = _raw_copy(tmp_path, mnist_root)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    code = cli.main(["train", "--data-dir", str(root), "--multiplier", "exact", "--runs-dir", str(tmp_path / "r"),
                     "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "train-labels-idx1-ubyte.gz" in err and len(err.splitlines()) == 1
