"""Data loading: every data set the project trains on, and the input pipelines.

Data sets (``load_dataset(name)`` returns a :class:`DataSplits`):

* Images, scaled to ``[-1, 1]``, shaped ``[N, H, W, C]``:
  ``digits`` (scikit-learn's 8x8 digits, ships with the package),
  ``mnist`` (original IDX files from a directory, or tensorflow-datasets),
  ``cifar10`` (tensorflow-datasets).
* 2-D toys, shaped ``[N, 2]``, following the FFJORD conventions (Grathwohl et
  al. 2019, ``lib/toy_data.py``): checkerboard, 8 Gaussians, swiss roll, two
  moons, pinwheel, 2 spirals; generated with numpy from a seed.

Pipelines:

* :func:`training_batches` is an infinite, step-indexed stream: the batch at
  global step ``s`` depends on ``(seed, s)`` only, so a resumed run sees exactly
  the batches an uninterrupted run would have seen.
* :func:`evaluation_bank` is a fixed bank of ``(x0, t, noise)`` triples, so the
  held-out loss of different runs and checkpoints is measured on the same draws.

Every failure caused by the data (missing or corrupt files, bad shapes,
non-finite values) raises :class:`DataError`, a ``ValueError`` whose message
names the data set or file and the problem.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib

import numpy as np
import tensorflow as tf

from tfngd.validation import check_integer

TOY_DATASETS = ("checkerboard", "8gaussians", "swissroll", "moons", "pinwheel", "2spirals")
IMAGE_DATASETS = ("digits", "mnist", "cifar10")
DATASETS = IMAGE_DATASETS + TOY_DATASETS

DEFAULT_TOY_TRAIN = 50_000
DEFAULT_TOY_EVAL = 5_000
DIGITS_NUM_TRAIN = 1500  # of 1797; the remaining 297 are the evaluation split
DIGITS_SPLIT_SEED = 0  # fixed, so evaluation numbers compare across runs and seeds
HOLDOUT_FRACTION = 0.2  # single-split MNIST directories: the last 20% evaluate
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_RANGE_TOLERANCE = 1e-6


class DataError(ValueError):
    """A data set cannot be loaded or is invalid; the message names it and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value for ==
class DataSplits:
    """A data set's train and evaluation splits (float32; images in ``[-1, 1]``)."""

    name: str
    train: np.ndarray
    eval: np.ndarray
    train_labels: np.ndarray | None = None
    eval_labels: np.ndarray | None = None
    num_classes: int | None = None

    @property
    def kind(self) -> str:
        """``"image"`` for ``[N, H, W, C]`` data, ``"vector"`` for ``[N, D]`` data."""
        return "image" if self.train.ndim == 4 else "vector"

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return tuple(int(d) for d in self.train.shape[1:])


# -- 2-D toys --------------------------------------------------------------------------------


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    angles = 2.0 * np.pi * rng.integers(0, 8, n) / 8.0
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centers + 0.5 * rng.standard_normal((n, 2))) / 1.414


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn.datasets.make_swiss_roll(noise=1.0), coordinates (x, z), divided by 5.
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    roll = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (roll + rng.standard_normal((n, 2))) / 5.0


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn.datasets.make_moons(noise=0.1), then * 2 + (-1, -0.2).
    angle = rng.uniform(0.0, np.pi, n)
    inner = rng.integers(0, 2, n).astype(bool)
    x = np.where(inner, 1.0 - np.cos(angle), np.cos(angle))
    y = np.where(inner, 0.5 - np.sin(angle), np.sin(angle))
    moons = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * moons + np.array([-1.0, -0.2])


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    radial_std, tangential_std, num_arms, rate = 0.3, 0.1, 5, 0.25
    arm = rng.integers(0, num_arms, n)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    angles = 2.0 * np.pi * arm / num_arms + rate * np.exp(features[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    rotated = np.stack([features[:, 0] * cos + features[:, 1] * sin,
                        -features[:, 0] * sin + features[:, 1] * cos], axis=1)
    return 2.0 * rotated


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    turn = np.sqrt(rng.uniform(size=n)) * 540.0 * (2.0 * np.pi) / 360.0
    x = -np.cos(turn) * turn + 0.5 * rng.uniform(size=n)
    y = np.sin(turn) * turn + 0.5 * rng.uniform(size=n)
    sign = np.where(rng.integers(0, 2, n) == 1, 1.0, -1.0)
    spirals = sign[:, None] * np.stack([x, y], axis=1) / 3.0
    return spirals + 0.1 * rng.standard_normal((n, 2))


_TOY_GENERATORS = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "swissroll": _swissroll,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
}


def make_toy_data(name: str, num_samples: int, seed: int) -> np.ndarray:
    """``num_samples`` points of a 2-D toy distribution, float32 ``[num_samples, 2]``.

    Deterministic for ``seed``. Scales follow FFJORD's ``toy_data.py`` (roughly
    ``[-4, 4]`` for checkerboard and 8 Gaussians, ``[-3, 3]`` for the others).
    """
    if name not in _TOY_GENERATORS:
        raise DataError(f"unknown toy data set {name!r}; choose one of: {', '.join(TOY_DATASETS)}")
    _check_count("num_samples", num_samples)
    points = _TOY_GENERATORS[name](np.random.default_rng(seed), num_samples)
    return points.astype(np.float32)


# -- images ----------------------------------------------------------------------------------


def _to_unit_range(images: np.ndarray, max_value: float) -> np.ndarray:
    """Map pixel values in ``[0, max_value]`` to float32 in ``[-1, 1]``."""
    return (np.asarray(images, dtype=np.float32) * np.float32(2.0 / max_value)) - np.float32(1.0)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits: float32 images ``[1797, 8, 8, 1]`` in ``[-1, 1]``, labels."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    images = _to_unit_range(digits.images[..., None], 16.0)  # pixel values are 0..16
    return images, digits.target.astype(np.int32)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an array in the IDX format of the original MNIST files (plain or gzip-compressed).

    The header is two zero bytes, a type code, the number of dimensions, then each
    dimension as a big-endian uint32; the payload must hold exactly the product of the
    dimensions. Raises :class:`DataError` naming the file on any mismatch.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such file") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read or decompress the file ({err})") from err

    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with 0000)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02x}" for code in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{type_code:02x} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, the {ndim} "
                        f"dimensions need {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        problem = "truncated payload" if payload < expected else "trailing bytes after payload"
        raise DataError(f"{path}: {problem}: header dims {dims} of {dtype.name} need {expected} "
                        f"bytes, the file has {payload}")
    array = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find_idx_file(data_dir: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_mnist_pair(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Images and labels of one MNIST split from IDX files; ``None`` when both are absent."""
    image_stem, label_stem = MNIST_FILES[split]
    image_path = _find_idx_file(data_dir, image_stem)
    label_path = _find_idx_file(data_dir, label_stem)
    if image_path is None and label_path is None:
        return None
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise DataError(f"{data_dir}: found one of the MNIST {split} files but not "
                        f"{missing}(.gz)")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images [N, 28, 28], got "
                        f"{images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_path}: expected {len(images)} labels, got shape "
                        f"{list(labels.shape)}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{label_path}: labels must be in 0..9, found {int(labels.max())}")
    return _to_unit_range(images[..., None], 255.0), labels.astype(np.int32)


def _load_tfds(name: str, data_dir: str | None, hint: str) -> tuple[np.ndarray, ...]:
    """``(train_images, train_labels, test_images, test_labels)`` from tensorflow-datasets."""
    try:
        import tensorflow_datasets as tfds

        train, test = tfds.as_numpy(
            tfds.load(name, split=["train", "test"], batch_size=-1, data_dir=data_dir)
        )
    except Exception as err:  # tfds raises many types (download, checksum, not found)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load {name!r} with tensorflow-datasets "
                        f"(data_dir={data_dir}): {reason}; {hint}") from err
    return (_to_unit_range(train["image"], 255.0), train["label"].astype(np.int32),
            _to_unit_range(test["image"], 255.0), test["label"].astype(np.int32))


def load_mnist(data_dir: str | os.PathLike | None = None) -> DataSplits:
    """MNIST, images ``[N, 28, 28, 1]`` in ``[-1, 1]``, int32 labels.

    With ``data_dir``: read the original IDX files (``train-*`` and/or ``t10k-*``,
    plain or ``.gz``). With both splits, train on ``train`` and evaluate on
    ``t10k``; with one, split it deterministically (first 80% train, last 20% eval;
    10,000 test images give 8,000 / 2,000). Without ``data_dir``: tensorflow-datasets'
    ``mnist`` train/test splits (needs the data prepared or internet access).
    """
    if data_dir is None:
        train_x, train_y, eval_x, eval_y = _load_tfds(
            "mnist", None, "pass --data-dir with a directory holding the MNIST IDX files "
            "(t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, and optionally train-*)")
        return DataSplits("mnist", train_x, eval_x, train_y, eval_y, 10)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"MNIST data directory {data_dir} does not exist")
    train = _read_mnist_pair(data_dir, "train")
    test = _read_mnist_pair(data_dir, "test")
    if train is not None and test is not None:
        return DataSplits("mnist", train[0], test[0], train[1], test[1], 10)
    single = train if train is not None else test
    if single is None:
        names = ", ".join(f"{stem}(.gz)" for pair in MNIST_FILES.values() for stem in pair)
        raise DataError(f"no MNIST IDX files in {data_dir} (expected {names})")
    images, labels = single
    num_train = len(images) - int(round(HOLDOUT_FRACTION * len(images)))
    return DataSplits("mnist", images[:num_train], images[num_train:],
                      labels[:num_train], labels[num_train:], 10)


def load_cifar10(data_dir: str | os.PathLike | None = None) -> DataSplits:
    """CIFAR-10 from tensorflow-datasets (``data_dir`` is its data_dir): ``[N, 32, 32, 3]``."""
    data_dir = None if data_dir is None else os.fspath(data_dir)
    train_x, train_y, eval_x, eval_y = _load_tfds(
        "cifar10", data_dir, "prepare it with tensorflow-datasets on a machine with internet "
        "access and pass that directory as --data-dir")
    return DataSplits("cifar10", train_x, eval_x, train_y, eval_y, 10)


def _check_count(what: str, value: int | None) -> None:
    if value is not None:
        check_integer(what, value, 1, error=DataError)


def _truncate(array: np.ndarray | None, count: int | None, what: str, name: str):
    if array is None or count is None:
        return array
    if count > len(array):
        raise DataError(f"{name} has only {len(array)} {what} examples, {count} requested")
    return array[:count]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 num_train: int | None = None, num_eval: int | None = None,
                 seed: int = 0) -> DataSplits:
    """Load data set ``name`` (one of :data:`DATASETS`) as train/eval splits.

    ``num_train``/``num_eval`` keep the first N examples (toys: generate N; defaults
    50,000 / 5,000). ``seed`` only drives the toy generators (train uses ``2 * seed``,
    eval ``2 * seed + 1``); image splits are fixed so that evaluations compare across runs.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    _check_count("num_train", num_train)
    _check_count("num_eval", num_eval)
    if name in TOY_DATASETS:
        train = make_toy_data(name, num_train or DEFAULT_TOY_TRAIN, 2 * seed)
        evaluation = make_toy_data(name, num_eval or DEFAULT_TOY_EVAL, 2 * seed + 1)
        return DataSplits(name, train, evaluation)
    if name == "digits":
        images, labels = load_digits()
        order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
        train_idx, eval_idx = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
        splits = DataSplits(name, images[train_idx], images[eval_idx],
                            labels[train_idx], labels[eval_idx], 10)
    elif name == "mnist":
        splits = load_mnist(data_dir)
    else:
        splits = load_cifar10(data_dir)
    return dataclasses.replace(
        splits,
        train=_truncate(splits.train, num_train, "training", name),
        train_labels=_truncate(splits.train_labels, num_train, "training", name),
        eval=_truncate(splits.eval, num_eval, "evaluation", name),
        eval_labels=_truncate(splits.eval_labels, num_eval, "evaluation", name),
    )


# -- validation ------------------------------------------------------------------------------


def validate_examples(x: np.ndarray, expected_shape: tuple[int, ...] | None = None,
                      name: str = "data") -> None:
    """Check a batch of examples before training; raise :class:`DataError` naming the problem.

    Images must be ``[N, H, W, C]`` with C in {1, 3} and values in ``[-1, 1]``; vectors
    ``[N, D]``. Every value must be finite; ``expected_shape`` is the per-example shape.
    """
    x = np.asarray(x)
    if x.ndim not in (2, 4):
        raise DataError(f"{name}: expected images [N, H, W, C] (rank 4) or vectors [N, D] "
                        f"(rank 2), got rank {x.ndim} shape {list(x.shape)}")
    if x.size == 0:
        raise DataError(f"{name}: empty array of shape {list(x.shape)}")
    if x.ndim == 4 and x.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images must have 1 or 3 channels, got shape {list(x.shape)}")
    if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
        raise DataError(f"{name}: examples have shape {list(x.shape[1:])}, expected "
                        f"{list(expected_shape)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{name}: expected real numbers, got dtype {x.dtype}")
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), x.shape)
        raise DataError(f"{name}: {int(bad.sum())} non-finite values (NaN or inf) in shape "
                        f"{list(x.shape)}; the first at index {tuple(int(i) for i in first)}")
    if x.ndim == 4:
        outside = (x < -1.0 - _RANGE_TOLERANCE) | (x > 1.0 + _RANGE_TOLERANCE)
        if outside.any():
            first = np.unravel_index(int(np.argmax(outside)), x.shape)
            raise DataError(f"{name}: {int(outside.sum())} image values outside [-1, 1] "
                            f"(min {float(x.min()):g}, max {float(x.max()):g}); the first at "
                            f"index {tuple(int(i) for i in first)}")


# -- pipelines -------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray | None, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DataError(f"labels must have shape [{n}] to match the examples, got "
                        f"{list(labels.shape)}")
    return labels.astype(np.int32)


def training_batches(x: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
                     labels: np.ndarray | None = None) -> tf.data.Dataset:
    """An infinite, deterministic stream of training batches indexed by global step.

    With ``steps_per_epoch = n // batch_size`` (the remainder is dropped), the batch at
    step ``s`` is slice ``s % steps_per_epoch`` of the permutation
    ``stateless_shuffle(range(n), seed=[seed, s // steps_per_epoch])``: a function of
    ``(seed, s)`` only. The stream starts at ``start_step``, so a resumed run continues
    exactly where the interrupted one stopped. Yields ``x`` batches, or ``(x, labels)``.
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    check_integer("batch_size", batch_size, 1, n, error=DataError,
                  detail=" (the number of examples)")
    check_integer("start_step", start_step, 0, error=DataError)
    check_integer("seed", seed, error=DataError)
    labels = _check_labels(labels, n)
    batch_size = int(batch_size)
    steps_per_epoch = n // batch_size
    examples = tf.constant(x)
    label_table = None if labels is None else tf.constant(labels)
    batch_shape = (batch_size, *x.shape[1:])

    def batch_at(step: tf.Tensor):
        epoch = step // steps_per_epoch
        position = step % steps_per_epoch
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(int(seed), tf.int64), epoch]))
        index = order[position * batch_size:(position + 1) * batch_size]
        batch = tf.ensure_shape(tf.gather(examples, index), batch_shape)
        if label_table is None:
            return batch
        return batch, tf.ensure_shape(tf.gather(label_table, index), (batch_size,))

    steps = tf.data.Dataset.range(int(start_step), np.iinfo(np.int64).max)
    return steps.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True).prefetch(tf.data.AUTOTUNE)


def evaluation_bank(x: np.ndarray, num_timesteps: int, seed: int, batch_size: int,
                    labels: np.ndarray | None = None,
                    min_timestep: int = 0) -> tf.data.Dataset:
    """A fixed bank of ``(x0, t, noise)`` for held-out losses, drawn once from ``seed``.

    ``t`` is uniform int32 in ``[min_timestep, num_timesteps)`` (an NDM's bound terms
    start at 1), ``noise`` standard normal float32
    shaped like ``x`` (both from ``numpy.random.default_rng(seed)``, in that order).
    Batches of dicts ``{"x0", "t", "noise"}`` (plus ``"label"``), the last one partial.
    """
    x = np.asarray(x, dtype=np.float32)
    _check_count("num_timesteps", num_timesteps)
    _check_count("batch_size", batch_size)
    if len(x) == 0:
        raise DataError("evaluation_bank: no examples")
    labels = _check_labels(labels, len(x))
    if not 0 <= min_timestep < num_timesteps:
        raise DataError(f"evaluation_bank: min_timestep must be in [0, {num_timesteps - 1}], "
                        f"got {min_timestep}")
    rng = np.random.default_rng(seed)
    bank = {
        "x0": x,
        "t": rng.integers(min_timestep, num_timesteps, size=len(x)).astype(np.int32),
        "noise": rng.standard_normal(x.shape, dtype=np.float32),
    }
    if labels is not None:
        bank["label"] = labels
    return tf.data.Dataset.from_tensor_slices(bank).batch(int(batch_size))
