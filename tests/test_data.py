"""Data loading and input pipelines (tfngd.data): real files, corrupt files, determinism."""

from __future__ import annotations

import gzip
import pathlib
import struct
import sys
import types

import numpy as np
import pytest

from tfngd import data

MNIST_DIR = pathlib.Path("/work/shared/data/mnist")
IDX_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool = False) -> pathlib.Path:
    """Write ``array`` in the IDX format (big-endian header and payload)."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def batches_as_numpy(dataset, count):
    return [np.asarray(b) for b in dataset.take(count).as_numpy_iterator()]


# -- IDX files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"offline MNIST copy not found in {MNIST_DIR}")
    return MNIST_DIR


def test_read_idx_on_the_real_mnist_test_files(mnist_dir):
    images = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test labels


def test_load_mnist_splits_the_offline_test_files_deterministically(mnist_dir):
    splits = data.load_dataset("mnist", data_dir=mnist_dir)
    assert splits.train.shape == (8000, 28, 28, 1) and splits.eval.shape == (2000, 28, 28, 1)
    assert splits.train.dtype == np.float32 and splits.train_labels.dtype == np.int32
    assert splits.kind == "image" and splits.data_shape == (28, 28, 1)
    assert splits.num_classes == 10
    assert splits.train.min() == -1.0 and splits.train.max() == 1.0
    raw = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_allclose(splits.eval[-1, ..., 0], raw[-1] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(
        splits.train_labels, data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:8000])
    data.validate_examples(splits.train, name="mnist train")
    small = data.load_dataset("mnist", data_dir=mnist_dir, num_train=100, num_eval=10)
    assert len(small.train) == len(small.train_labels) == 100 and len(small.eval) == 10


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (7,)], ids=["3d", "1d"])
def test_read_idx_round_trips_uint8(tmp_path, compress, shape):
    array = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    path = write_idx(tmp_path / "a.idx", array, compress)
    read = data.read_idx(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, array)


def test_read_idx_reads_big_endian_int32_and_float32(tmp_path):
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    floats = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "i", ints)), ints)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "f", floats, True)), floats)


def _corrupt(tmp_path, raw: bytes, compress: bool = False) -> pathlib.Path:
    path = tmp_path / "corrupt-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


GOOD = struct.pack(">BBBBII", 0, 0, 0x08, 2, 3, 4) + bytes(range(12))


@pytest.mark.parametrize(
    ("raw", "compress", "words"),
    [
        (b"\x08\x03" + GOOD[2:], False, ["magic"]),
        (GOOD[:-1], False, ["truncated payload", "12", "11"]),
        (GOOD[:-5], True, ["truncated payload"]),
        (GOOD + b"\x00", False, ["trailing bytes"]),
        (GOOD[:2] + b"\x42" + GOOD[3:], False, ["dtype code 0x42"]),
        (GOOD[:6], False, ["truncated IDX header"]),
        (GOOD[:2], False, ["truncated IDX header"]),
        (b"\x00\x00\x08\x00", False, ["0 dimensions"]),
        (gzip.compress(GOOD)[:-12], False, ["decompress"]),
    ],
    ids=["bad-magic", "short-payload", "short-payload-gz", "trailing", "dtype", "short-dims",
         "short-magic", "no-dims", "truncated-gzip"],
)
def test_read_idx_rejects_corrupt_files(tmp_path, raw, compress, words):
    path = _corrupt(tmp_path, raw, compress)
    with pytest.raises(ValueError) as info:
        data.read_idx(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_read_idx_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.read_idx(tmp_path / "missing")


def test_load_mnist_uses_train_and_test_files_when_both_are_present(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n, compress in (("train", 6, False), ("t10k", 4, True)):
        suffix = ".gz" if compress else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}",
                  np.arange(n, dtype=np.uint8), compress)
    splits = data.load_mnist(tmp_path)
    assert splits.train.shape == (6, 28, 28, 1) and splits.eval.shape == (4, 28, 28, 1)
    assert splits.train_labels.tolist() == list(range(6))
    assert splits.eval_labels.tolist() == list(range(4))


def test_load_mnist_reports_bad_directories(tmp_path):
    with pytest.raises(data.DataError, match="/nonexistent"):
        data.load_dataset("mnist", data_dir="/nonexistent")
    with pytest.raises(data.DataError, match="no MNIST IDX files") as info:
        data.load_mnist(tmp_path)
    assert "t10k-images-idx3-ubyte" in str(info.value)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(3, dtype=np.uint8))
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte"):
        data.load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(data.DataError, match="expected 2 labels"):
        data.load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(data.DataError, match=r"\[N, 28, 28\]"):
        data.load_mnist(tmp_path)


def test_load_mnist_without_data_dir_explains_how_to_work_offline(monkeypatch):
    def failing_load(*args, **kwargs):
        raise ConnectionError("Failed to resolve storage.googleapis.com\nmore detail")

    # A stand-in for tensorflow_datasets, so the test can never download anything.
    fake_tfds = types.SimpleNamespace(load=failing_load, as_numpy=lambda x: x)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist")
    message = str(info.value)
    assert "--data-dir" in message and "storage.googleapis.com" in message
    assert "\n" not in message


def test_load_cifar10_passes_data_dir_to_tfds(monkeypatch, tmp_path):
    calls = []

    def fake_load(name, split, batch_size, data_dir):
        calls.append((name, split, data_dir))
        rng = np.random.default_rng(0)
        return [{"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                 "label": np.arange(n) % 10} for n in (5, 3)]

    fake_tfds = types.SimpleNamespace(load=fake_load, as_numpy=lambda x: x)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
    splits = data.load_dataset("cifar10", data_dir=tmp_path)
    assert calls == [("cifar10", ["train", "test"], str(tmp_path))]
    assert splits.train.shape == (5, 32, 32, 3) and splits.eval.shape == (3, 32, 32, 3)
    assert splits.train.dtype == np.float32 and splits.eval_labels.dtype == np.int32
    data.validate_examples(splits.train, expected_shape=(32, 32, 3))


# -- digits and toys ---------------------------------------------------------------------------


def test_load_digits_shape_and_range():
    images, labels = data.load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(np.unique(labels)) == set(range(10))


def test_digits_split_is_fixed_and_disjoint():
    first, second = data.load_dataset("digits", seed=0), data.load_dataset("digits", seed=5)
    assert first.train.shape == (1500, 8, 8, 1) and first.eval.shape == (297, 8, 8, 1)
    assert first.kind == "image" and first.data_shape == (8, 8, 1) and first.num_classes == 10
    np.testing.assert_array_equal(first.eval, second.eval)
    np.testing.assert_array_equal(first.train_labels, second.train_labels)
    images, _ = data.load_digits()
    flat = {row.tobytes() for row in images.reshape(len(images), -1)}
    seen = {row.tobytes() for row in np.concatenate([first.train, first.eval]).reshape(1797, -1)}
    assert seen == flat  # every digit is used, once per split
    assert len(data.load_dataset("digits", num_train=100).train) == 100


@pytest.mark.parametrize("name", data.TOY_DATASETS)
def test_toy_data(name):
    x = data.make_toy_data(name, 2000, seed=3)
    assert x.shape == (2000, 2) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert 0.5 < np.abs(x).max() < 6.0 and 0.3 < x.std(axis=0).min()
    np.testing.assert_array_equal(x, data.make_toy_data(name, 2000, seed=3))
    assert not np.allclose(x, data.make_toy_data(name, 2000, seed=4))
    assert data.make_toy_data(name, 1, seed=0).shape == (1, 2)


def test_toy_load_dataset_uses_different_seeds_for_train_and_eval():
    splits = data.load_dataset("moons", num_train=300, num_eval=300, seed=1)
    assert splits.kind == "vector" and splits.data_shape == (2,)
    assert splits.train_labels is None and splits.num_classes is None
    assert not np.allclose(splits.train, splits.eval)
    np.testing.assert_array_equal(splits.train, data.load_dataset("moons", num_train=300,
                                                                  num_eval=300, seed=1).train)
    default = data.load_dataset("checkerboard")
    assert default.train.shape == (50_000, 2) and default.eval.shape == (5_000, 2)


def test_unknown_data_set_lists_the_choices():
    with pytest.raises(ValueError) as info:
        data.load_dataset("nope")
    for name in data.DATASETS:
        assert name in str(info.value)
    assert "'nope'" in str(info.value)
    with pytest.raises(ValueError, match="checkerboard"):
        data.make_toy_data("nope", 10, 0)


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="num_train"):
        data.load_dataset("moons", num_train=0)
    with pytest.raises(ValueError, match="only 297 evaluation examples, 1000 requested"):
        data.load_dataset("digits", num_eval=1000)


# -- validation --------------------------------------------------------------------------------


def test_validate_examples_accepts_good_data():
    data.validate_examples(np.zeros((3, 8, 8, 1), np.float32), expected_shape=(8, 8, 1))
    data.validate_examples(np.full((3, 4, 4, 3), 1.0 + 1e-7, np.float32))
    data.validate_examples(np.full((5, 2), 7.0, np.float32), expected_shape=(2,))  # vectors


@pytest.mark.parametrize(
    ("x", "expected_shape", "words"),
    [
        (np.zeros((2, 3), np.float32), (2,), ["train set", "[3]", "expected [2]"]),
        (np.zeros((2, 8, 8), np.float32), None, ["train set", "rank 3", "[2, 8, 8]"]),
        (np.zeros((2, 8, 8, 2), np.float32), None, ["1 or 3 channels", "[2, 8, 8, 2]"]),
        (np.zeros((0, 2), np.float32), None, ["empty", "[0, 2]"]),
        (np.full((2, 4, 4, 1), 1.5, np.float32), None, ["outside [-1, 1]", "max 1.5"]),
        (np.full((2, 4, 4, 1), -1.01, np.float32), None, ["32 image values outside"]),
    ],
    ids=["shape", "rank", "channels", "empty", "above", "below"],
)
def test_validate_examples_rejects(x, expected_shape, words):
    with pytest.raises(ValueError) as info:
        data.validate_examples(x, expected_shape=expected_shape, name="train set")
    for word in words:
        assert word in str(info.value)


def test_validate_examples_reports_non_finite_count_and_first_index():
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(ValueError) as info:
        data.validate_examples(x, name="eval set")
    message = str(info.value)
    assert "eval set" in message and "2 non-finite" in message and "(2, 1)" in message
    assert "[4, 3]" in message


# -- pipelines ---------------------------------------------------------------------------------


def test_training_batches_are_deterministic_and_resume_exactly():
    x = np.random.default_rng(0).standard_normal((23, 2)).astype(np.float32)
    full = batches_as_numpy(data.training_batches(x, 5, seed=7), 12)
    again = batches_as_numpy(data.training_batches(x, 5, seed=7), 12)
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for start in (1, 4, 9):
        resumed = batches_as_numpy(data.training_batches(x, 5, seed=7, start_step=start),
                                   12 - start)
        for a, b in zip(full[start:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
    other = batches_as_numpy(data.training_batches(x, 5, seed=8), 12)
    assert not all(np.array_equal(a, b) for a, b in zip(full, other, strict=True))


def test_one_epoch_visits_each_example_at_most_once():
    n, batch_size = 23, 5  # 4 steps per epoch, 3 examples dropped each epoch
    x = np.arange(n, dtype=np.float32)[:, None]
    dataset = data.training_batches(x, batch_size, seed=3)
    assert dataset.element_spec.shape.as_list() == [batch_size, 1]
    batches = batches_as_numpy(dataset, 8)
    epochs = [np.concatenate(batches[:4])[:, 0], np.concatenate(batches[4:])[:, 0]]
    for ids in epochs:
        assert len(ids) == 20 and len(set(ids.tolist())) == 20
        assert set(ids.tolist()) <= set(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # a new permutation each epoch


def test_training_batches_with_labels_keeps_pairs_together():
    n = 12
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    labels = np.arange(n) * 10
    dataset = data.training_batches(x, 4, seed=0, labels=labels)
    for xb, yb in dataset.take(5).as_numpy_iterator():
        assert xb.shape == (4, 2, 2, 1) and yb.dtype == np.int32
        np.testing.assert_array_equal(xb[:, 0, 0, 0] * 10, yb)


@pytest.mark.parametrize("batch_size", [0, 24, 2.5])
def test_training_batches_rejects_bad_batch_sizes(batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 23\]"):
        data.training_batches(np.zeros((23, 2), np.float32), batch_size, seed=0)


def test_evaluation_bank_is_fixed():
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    labels = np.arange(10)

    def bank(seed):
        return list(data.evaluation_bank(x, 50, seed=seed, batch_size=4,
                                         labels=labels).as_numpy_iterator())

    first, second = bank(1), bank(1)
    assert [len(b["x0"]) for b in first] == [4, 4, 2]  # no drop remainder
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() == {"x0", "t", "noise", "label"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    t = np.concatenate([b["t"] for b in first])
    noise = np.concatenate([b["noise"] for b in first])
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < 50
    assert noise.dtype == np.float32 and noise.shape == x.shape
    np.testing.assert_array_equal(np.concatenate([b["x0"] for b in first]), x)
    assert not np.array_equal(noise, np.concatenate([b["noise"] for b in bank(2)]))
    unlabelled = next(iter(data.evaluation_bank(x, 50, seed=1, batch_size=4)))
    assert set(unlabelled) == {"x0", "t", "noise"}
