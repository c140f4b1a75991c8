"""The stdlib-chars corpus: a deterministic selection, split by file, windows, bits per character, wrong pairings."""
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

from mbmlib.workflow import text
from mbmlib.workflow.config import config_with_preset
from mbmlib.workflow.evaluate import accuracy
from mbmlib.workflow.train import prediction_loss
from mbmlib.workflow.train_data import check_model_dataset, open_splits


@pytest.fixture
def source(tmp_path):
    """A folder of 12 small modules, plus files the corpus must never read (tests, site-packages, caches)."""
    for i in range(12):
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / ("pkg" if i % 2 else "") / f"mod{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * (20 + i))
    for hidden in ("test", "tests", "pkg/tests", "site-packages/thing", "__pycache__"):
        (tmp_path / hidden).mkdir(parents=True, exist_ok=True)
        (tmp_path / hidden / "hidden.py").write_text("HIDDEN\n" * 50)
    (tmp_path / "notes.txt").write_text("not python\n")
    return tmp_path


def test_the_corpus_reads_python_files_outside_test_suites_and_site_packages(source):
    files = text.corpus_files(source)
    assert len(files) == 12 and all(p.suffix == ".py" and p.name.startswith("mod") for p in files)
    order = [text._order_key(p.relative_to(source).as_posix()) for p in files]
    assert order == sorted(order)  # the SHA-1 order of their relative paths
    assert text.corpus_files(source, budget=1) == files[:1]  # a budget keeps a prefix of that order


def test_splits_hold_whole_files_each_once_and_the_test_split_ignores_the_split_seed(source):
    a = text.load_corpus(source=source, split_seed=1)
    assert sorted(sum(a.files.values(), [])) == sorted(p.relative_to(source).as_posix()
                                                       for p in text.corpus_files(source))
    for split, names in a.files.items():  # each split is its files in path order, concatenated whole
        assert names == sorted(names)
        assert bytes(getattr(a, split).tolist()) == b"".join((source / n).read_bytes() for n in names)
    again, other = text.load_corpus(source=source, split_seed=1), text.load_corpus(source=source, split_seed=2)
    assert again.sha256 == a.sha256 and torch.equal(again.train, a.train)
    assert other.files["test"] == a.files["test"] and other.files["val"] != a.files["val"]
    assert other.sha256 != a.sha256


def test_the_stdlib_corpus_is_a_few_mb_of_the_standard_library():
    corpus = text.load_corpus()
    info = corpus.describe()
    chars = info["corpus_chars"]
    assert text.CORPUS_BYTES <= sum(chars.values()) < text.CORPUS_BYTES + 300_000  # up to the file crossing it
    assert chars["test"] / sum(chars.values()) == pytest.approx(text.TEST_FRACTION, abs=0.05)
    assert chars["val"] / (chars["train"] + chars["val"]) == pytest.approx(0.2, abs=0.05)
    assert info["corpus_source"] == sysconfig.get_paths()["stdlib"]
    names = sum(corpus.files.values(), [])
    assert not [n for n in names if {"test", "tests", "site-packages"} & set(Path(n).parts[:-1])]


def test_windows_predict_the_next_byte_and_batches_are_deterministic(source):
    data = text.TextTrainData(text.load_corpus(source=source), 8, torch.device("cpu"), epoch_windows=10,
                              val_windows=5, test_windows=3)
    assert data.sizes() == {"train": 10, "val": 5, "test": 3} and data.steps_per_epoch(4, 1) == 3
    batches = list(data.train_batches(4, shuffle_seed=7, rank=0, world_size=1))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == y.dtype == torch.int64 and x.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x one byte later
    train = data.text["train"]
    start = next(i for i in range(len(train) - 8) if torch.equal(train[i:i + 8].long(), x[0]))
    assert torch.equal(train[start + 1:start + 9].long(), y[0])
    again = list(data.train_batches(4, shuffle_seed=7, rank=0, world_size=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not torch.equal(next(data.train_batches(4, 8, 0, 1))[0], x)


def test_two_ranks_share_one_draw_of_window_starts(source):
    data = text.TextTrainData(text.load_corpus(source=source), 8, torch.device("cpu"), epoch_windows=8)
    whole = torch.cat([x for x, _ in data.train_batches(8, 3, 0, 1)])
    ranks = [torch.cat([x for x, _ in data.train_batches(2, 3, r, 2)]) for r in (0, 1)]
    assert torch.equal(torch.stack(ranks, 1).reshape(8, 8), whole)  # DistributedSampler's striding of one draw
    assert data.steps_per_epoch(2, 2) == 2


def test_evaluation_windows_are_evenly_spread_and_the_same_every_time(source):
    data = text.TextTrainData(text.load_corpus(source=source), 8, torch.device("cpu"), epoch_windows=4,
                              val_windows=4, test_windows=2)
    val = torch.cat([x for x, _ in data.eval_batches("val", batch_size=3)])
    assert val.shape == (4, 8) and torch.equal(val, torch.cat([x for x, _ in data.eval_batches("val")]))
    v = data.text["val"]
    assert torch.equal(val[0], v[:8].long()) and torch.equal(val[-1], v[len(v) - 9:len(v) - 1].long())
    assert len(torch.cat([x for x, _ in data.eval_batches("test")])) == 2


def test_a_uniform_model_scores_log2_of_the_vocabulary_in_bits_per_char(source):
    class Uniform(nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, text.VOCAB_SIZE)

    data = text.TextTrainData(text.load_corpus(source=source), 8, torch.device("cpu"), epoch_windows=4)
    scores = accuracy(Uniform(), data.eval_batches("val"))
    # float32 cross-entropy: log(256) is 5.5451775 in float32, within 1e-6 relative of the true value
    assert scores["bits_per_char"] == pytest.approx(8.0, rel=1e-6)
    assert scores["perplexity"] == pytest.approx(256.0, rel=1e-5)
    assert scores["loss"] == pytest.approx(math.log(256), rel=1e-6) and scores["samples"] == text.EVAL_WINDOWS * 8
    assert text.bits_per_char(math.log(4)) == pytest.approx(2.0)


def test_bits_per_char_is_the_mean_cross_entropy_over_every_position_in_bits():
    logits, y = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    expected = nn.functional.cross_entropy(logits.reshape(15, 7), y.reshape(15))
    torch.testing.assert_close(prediction_loss(logits, y), expected)

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    scores = accuracy(Fixed(), [(torch.zeros(3, 5), y)])
    assert scores["bits_per_char"] == pytest.approx(float(expected) / math.log(2), rel=1e-6)
    assert scores["top1"] == pytest.approx(100.0 * float((logits.argmax(-1) == y).float().mean()))


def test_open_splits_gives_the_text_corpus_and_refuses_a_training_subset():
    data = open_splits("stdlib-chars", None, None, torch.device("cpu"), context=16, epoch_windows=32, val_samples=6)
    assert data.sizes() == {"train": 32, "val": 6, "test": text.EVAL_WINDOWS} and data.num_classes == 256
    assert data.first_batch(5)[0].shape == (5, 16)
    with pytest.raises(ValueError, match="no fixed training samples.*--epoch-steps"):
        open_splits("stdlib-chars", None, None, torch.device("cpu"), context=16, train_samples=100)


@pytest.mark.parametrize("model,dataset,message", [
    ("gpt-char", "mnist", "gpt-char is a language model: it trains on a text corpus .*--dataset stdlib-chars"),
    ("gpt-char", "cifar10", "gpt-char is a language model"),
    ("seednet", "stdlib-chars", "stdlib-chars is a text corpus: train a language model on it .gpt-char."),
    ("vit-tiny", "cifar10", "vit-tiny takes 1x28x28 images"),
])
def test_wrong_pairs_of_model_and_data_are_clear_errors(model, dataset, message):
    with pytest.raises(ValueError, match=message):
        check_model_dataset(model, dataset)
    with pytest.raises(ValueError, match=message):
        config_with_preset(model=model, dataset=dataset)


def test_the_config_keeps_epoch_steps_to_text_and_training_subsets_to_images():
    cfg = config_with_preset(model="gpt-char", dataset="stdlib-chars", epoch_steps=5)
    assert cfg.epoch_steps == 5
    with pytest.raises(ValueError, match="epoch_steps: an epoch of mnist images is every training sample once"):
        config_with_preset(model="vit-tiny", epoch_steps=5)
    with pytest.raises(ValueError, match="train_samples: the text corpus stdlib-chars has no fixed training"):
        config_with_preset(model="gpt-char", dataset="stdlib-chars", train_samples=64)
    with pytest.raises(ValueError, match="epoch_steps must be a positive number"):
        config_with_preset(model="gpt-char", dataset="stdlib-chars", epoch_steps=0)
    with pytest.raises(ValueError, match="gpt-char is a language model and a CSV holds MNIST-style images"):
        config_with_preset(model="gpt-char", data_csv="train.csv")
