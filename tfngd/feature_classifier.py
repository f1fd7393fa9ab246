"""The classifier whose penultimate features define Frechet distance and KID on images.

The benchmark protocol (``docs/benchmark-protocol.md``) measures image samples in
"the feature space of a classifier trained on the same data set (fixed, saved once,
reused for every run)". This module builds, trains, saves and loads that classifier:

* :func:`build_classifier`: a small CNN (Conv-BatchNorm-ReLU blocks, global average
  pooling, a ReLU ``Dense`` layer named ``"features"``, a ``Dense`` logits layer named
  ``"logits"``). Inputs are images in ``[-1, 1]`` (the convention of :mod:`tfngd.data`).
* :func:`train_classifier`: trains on ``splits.train`` only (random shifts as
  augmentation), reports the accuracy on the held-out ``splits.eval``.
* :func:`classifier_path` / :func:`save_classifier` / :func:`load_classifier`: the shipped
  files ``tfngd/assets/classifiers/<dataset>.keras`` and ``<dataset>.json`` (the JSON holds
  the test accuracy, the command that produced the file and the library versions).
  Recreate them with ``python -m trainers.train_classifier --dataset <dataset>``.
* :class:`FeatureExtractor`: batched ``features(images) -> [N, F]``, ``logits``,
  ``predict_labels(images) -> [N]``, with input validation.

Typical use::

    extractor = FeatureExtractor("mnist")
    fid = metrics.frechet_distance_from_features(extractor.features(samples),
                                                 extractor.features(splits.eval))
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

import numpy as np

from tfngd.validation import check_integer

FEATURES_LAYER = "features"
LOGITS_LAYER = "logits"
CLASSIFIER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "classifiers")
# The image data sets a classifier can be trained for (tfngd.data.IMAGE_DATASETS).
CLASSIFIER_DATASETS = ("digits", "mnist", "cifar10")

# Per data set: convolution widths per resolution stage (a 2x2 max-pool between stages),
# feature width, maximal shift (pixels) of the augmentation, default epochs, batch size,
# peak learning rate and decoupled weight decay (AdamW). Chosen on a validation split
# carved from the *training* split (digits: train[1200:], MNIST: train[6400:]); the
# evaluation split was only used for the final, reported accuracy. The 8x8 digits are
# centred and size-normalised: shifting them hurt validation accuracy (98.7% vs 99.7%).
_RECIPES = {
    "digits": {"stages": ((32, 32), (64, 64)), "feature_units": 128, "max_shift": 0,
               "epochs": 60, "batch_size": 64, "learning_rate": 2e-3, "weight_decay": 0.05},
    "mnist": {"stages": ((32,), (64, 64), (128,)), "feature_units": 128, "max_shift": 2,
              "epochs": 20, "batch_size": 64, "learning_rate": 2e-3, "weight_decay": 0.05},
    "cifar10": {"stages": ((64, 64), (128, 128), (256, 256)), "feature_units": 256,
                "max_shift": 4, "epochs": 60, "batch_size": 128, "learning_rate": 2e-3,
                "weight_decay": 0.05},
}
_DEFAULT_RECIPE = "mnist"


def recreate_command(dataset: str) -> str:
    """The shell command (from the repository root) that recreates the shipped classifier."""
    extra = " --data-dir ../shared/data/mnist" if dataset == "mnist" else ""
    return f"python -m trainers.train_classifier --dataset {dataset}{extra}"


def _check_dataset(dataset: str) -> str:
    if dataset not in CLASSIFIER_DATASETS:
        raise ValueError(f"no feature classifier for data set {dataset!r}; image data sets: "
                         f"{', '.join(CLASSIFIER_DATASETS)}")
    return dataset


def classifier_path(dataset: str) -> str:
    """``tfngd/assets/classifiers/<dataset>.keras`` inside the installed package."""
    return os.path.join(CLASSIFIER_DIR, f"{_check_dataset(dataset)}.keras")


def _report_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".json"


# -- model -----------------------------------------------------------------------------------


def _recipe_for_shape(data_shape) -> dict:
    height = int(data_shape[0])
    if height <= 8:
        return _RECIPES["digits"]
    if int(data_shape[-1]) == 3:
        return _RECIPES["cifar10"]
    return _RECIPES[_DEFAULT_RECIPE]


def build_classifier(data_shape, num_classes: int):
    """A small CNN classifier for images ``data_shape = (H, W, C)`` in ``[-1, 1]``.

    Stages of 3x3 Conv-BatchNorm-ReLU blocks with a 2x2 max-pool between stages, global
    average pooling, ``Dense(128, relu, name="features")`` (the feature space of the
    Frechet distance and KID), ``Dense(num_classes, name="logits")``. Widths by size:
    8x8 inputs (digits) ``(32, 32) | (64, 64)`` (75k parameters); larger grey
    images (MNIST) ``(32,) | (64, 64) | (128,)`` (148k); colour images
    ``(64, 64) | (128, 128) | (256, 256)`` with 256 features.
    """
    import keras

    data_shape = tuple(int(d) for d in data_shape)
    if len(data_shape) != 3 or min(data_shape) < 1:
        raise ValueError(f"data_shape must be (height, width, channels), got {data_shape}")
    check_integer("num_classes", num_classes, 2)
    recipe = _recipe_for_shape(data_shape)
    inputs = keras.Input(shape=data_shape, name="images")
    x = inputs
    for stage, widths in enumerate(recipe["stages"]):
        if stage > 0:
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
        for block, width in enumerate(widths):
            name = f"stage{stage}_block{block}"
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                    name=f"{name}_conv")(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    features = keras.layers.Dense(recipe["feature_units"], activation="relu",
                                  name=FEATURES_LAYER)(x)
    logits = keras.layers.Dense(int(num_classes), name=LOGITS_LAYER)(features)
    return keras.Model(inputs, logits, name="feature_classifier")


# -- training --------------------------------------------------------------------------------


def random_shifts(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by a random integer offset in ``[-max_shift, max_shift]^2``.

    Pixels shifted in are background (-1, the minimum of the ``[-1, 1]`` range).
    """
    if max_shift == 0:
        return images
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                    constant_values=-1.0)
    dy = rng.integers(0, 2 * max_shift + 1, n)
    dx = rng.integers(0, 2 * max_shift + 1, n)
    out = np.empty_like(images)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            index = np.flatnonzero((dy == oy) & (dx == ox))
            out[index] = padded[index, oy:oy + height, ox:ox + width]
    return out


def train_classifier(dataset: str, data_dir=None, epochs: int | None = None, seed: int = 0,
                     batch_size: int | None = None, num_train: int | None = None,
                     verbose: int = 0):
    """Train the feature classifier of ``dataset``; returns ``(model, report)``.

    Trains on ``splits.train`` only, with random shifts (none for the centred 8x8 digits,
    up to 2 pixels for MNIST, 4 for CIFAR-10) redrawn every epoch, AdamW (weight decay
    0.05) with a cosine-decayed learning rate, and sparse softmax cross-entropy. The test
    accuracy in ``report`` is measured on the held-out ``splits.eval`` (never trained on).
    Deterministic for ``seed`` on CPU (``keras.utils.set_random_seed``; the CLI also
    enables TF op determinism). ``num_train`` keeps the first N training examples (for
    quick tests). The returned model is
    uncompiled (no optimizer state), ready for :func:`save_classifier`.
    """
    import keras

    from tfngd import data as data_lib

    _check_dataset(dataset)
    recipe = _RECIPES[dataset]
    epochs = recipe["epochs"] if epochs is None else epochs
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_integer(name, value, 1)
    splits = data_lib.load_dataset(dataset, data_dir=data_dir, num_train=num_train, seed=seed)
    if splits.train_labels is None or splits.num_classes is None:
        raise ValueError(f"data set {dataset!r} has no labels; a classifier needs them")

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_classifier(splits.data_shape, splits.num_classes)
    steps_per_epoch = math.ceil(len(splits.train) / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        recipe["learning_rate"], decay_steps=epochs * steps_per_epoch, alpha=0.0)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=recipe.get("weight_decay", 0.0))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.perf_counter()
    history = []
    for epoch in range(epochs):
        augmented = random_shifts(splits.train, recipe["max_shift"], rng)
        logs = model.fit(augmented, splits.train_labels, batch_size=batch_size, epochs=epoch + 1,
                         initial_epoch=epoch, shuffle=True, verbose=verbose).history
        history.append({k: float(v[-1]) for k, v in logs.items()})
    seconds = time.perf_counter() - start

    # An uncompiled copy (weights only): the saved file carries no optimizer state.
    final = build_classifier(splits.data_shape, splits.num_classes)
    final.set_weights(model.get_weights())
    extractor = FeatureExtractor(final)
    predictions = extractor.predict_labels(splits.eval)
    correct = int((predictions == splits.eval_labels).sum())
    report = {
        "dataset": dataset,
        "test_accuracy": correct / len(splits.eval),
        "test_correct": correct,
        "num_eval": int(len(splits.eval)),
        "num_train": int(len(splits.train)),
        "eval_split": f"tfngd.data.load_dataset({dataset!r}).eval (held out, never trained on)",
        "final_train_loss": history[-1].get("loss") if history else None,
        "final_train_accuracy": history[-1].get("accuracy") if history else None,
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "learning_rate": recipe["learning_rate"],
        "max_shift": recipe["max_shift"],
        "weight_decay": recipe["weight_decay"],
        "seed": int(seed),
        "params": int(final.count_params()),
        "feature_dim": extractor.feature_dim,
        "input_shape": list(splits.data_shape),
        "train_seconds": round(seconds, 1),
    }
    return final, report


def _versions() -> dict:
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_classifier(model, report: dict, path: str | None = None, command: str | None = None):
    """Write ``model`` to ``path`` (default :func:`classifier_path`) and the JSON report next to it.

    The JSON is ``report`` plus ``command`` (default :func:`recreate_command`), the
    library versions and the file size. Returns ``(model_path, json_path)``.
    """
    path = classifier_path(report["dataset"]) if path is None else os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"classifier files end in .keras, got {path}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save(path)
    record = dict(report)
    record["command"] = command or recreate_command(report["dataset"])
    record["file"] = os.path.basename(path)
    record["file_bytes"] = os.path.getsize(path)
    record["versions"] = _versions()
    json_path = _report_path(path)
    with open(json_path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return path, json_path


def load_classifier(dataset: str, path: str | None = None):
    """Load the shipped classifier of ``dataset`` (or the file ``path``).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when it cannot
    be read or is not a feature classifier; both name the file and the command that
    recreates it.
    """
    import keras

    path = classifier_path(dataset) if path is None else os.fspath(path)
    fix = f"recreate it with `{recreate_command(dataset)}` (from the repository root)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature classifier {path} not found; {fix}")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # zip, h5 and deserialization errors have many types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"feature classifier {path} is corrupt or unreadable ({reason}); "
                         f"{fix}") from err
    layer_names = {layer.name for layer in model.layers}
    if FEATURES_LAYER not in layer_names or len(model.inputs) != 1:
        raise ValueError(f"{path} is not a feature classifier (needs one input and a layer "
                         f"named {FEATURES_LAYER!r}); {fix}")
    return model


def load_report(dataset: str) -> dict:
    """The JSON record next to the shipped classifier of ``dataset``."""
    path = _report_path(classifier_path(dataset))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; recreate it with "
                                f"`{recreate_command(dataset)}`")
    with open(path) as f:
        return json.load(f)


# -- inference -------------------------------------------------------------------------------


class FeatureExtractor:
    """Batched features and predictions of a feature classifier.

    ``FeatureExtractor("mnist")`` loads the shipped classifier; a ``keras.Model`` built by
    :func:`build_classifier` (or loaded) is used as is. Images must be float arrays
    ``[N, H, W, C]`` with the classifier's input shape and finite values, in ``[-1, 1]``
    (not checked: generated samples are usually clipped by the sampler; clip them first if
    not). Results are deterministic (inference mode, BatchNorm uses its moving statistics).
    """

    def __init__(self, model_or_dataset, batch_size: int = 500):
        import keras
        import tensorflow as tf

        if isinstance(model_or_dataset, str):
            model_or_dataset = load_classifier(model_or_dataset)
        model = model_or_dataset
        check_integer("batch_size", batch_size, 1)
        self.model = model
        self.batch_size = int(batch_size)
        self.input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        both = keras.Model(model.inputs, [model.get_layer(FEATURES_LAYER).output, model.output])
        self.feature_dim = int(both.outputs[0].shape[-1])
        self.num_classes = int(both.outputs[1].shape[-1])

        def forward(x):
            return both(x, training=False)

        self._forward = tf.function(forward, autograph=False, reduce_retracing=True)

    def _check(self, images) -> np.ndarray:
        try:
            images = np.asarray(images)
        except Exception as err:
            raise ValueError(f"images: cannot convert to an array ({err})") from err
        if not np.issubdtype(images.dtype, np.number) \
                or np.issubdtype(images.dtype, np.complexfloating):
            raise ValueError(f"images: expected real numbers, got dtype {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"images: expected shape [N, {', '.join(map(str, self.input_shape))}]"
                             f" (the classifier's input shape), got {list(images.shape)}")
        if len(images) == 0:
            raise ValueError("images: empty batch (0 images)")
        images = images.astype(np.float32)
        bad = ~np.isfinite(images)
        if bad.any():
            first = int(np.argmax(bad.reshape(len(images), -1).any(axis=1)))
            raise ValueError(f"images: {int(bad.sum())} non-finite values (NaN or inf); the "
                             f"first in image {first}")
        return images

    def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """``(features [N, F] float32, logits [N, num_classes] float32)`` in one pass."""
        images = self._check(images)
        features, logits = [], []
        for start in range(0, len(images), self.batch_size):
            f, z = self._forward(images[start:start + self.batch_size])
            features.append(np.asarray(f))
            logits.append(np.asarray(z))
        return np.concatenate(features), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        """Penultimate-layer (``"features"``) activations, float32 ``[N, feature_dim]``."""
        return self.features_and_logits(images)[0]

    def logits(self, images) -> np.ndarray:
        """Class logits, float32 ``[N, num_classes]``."""
        return self.features_and_logits(images)[1]

    def predict_labels(self, images) -> np.ndarray:
        """Predicted classes (argmax of the logits), int64 ``[N]``."""
        return np.argmax(self.logits(images), axis=1)


def features(images, dataset: str) -> np.ndarray:
    """Features of ``images`` under the shipped classifier of ``dataset`` (loads it each call)."""
    return FeatureExtractor(dataset).features(images)


def predict_labels(images, dataset: str) -> np.ndarray:
    """Predicted classes of ``images`` under the shipped classifier of ``dataset``."""
    return FeatureExtractor(dataset).predict_labels(images)
