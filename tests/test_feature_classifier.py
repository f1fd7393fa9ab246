"""The feature classifier of the image metrics (tfngd.feature_classifier).

The shipped classifiers must reach >= 98% accuracy on the held-out evaluation splits
(recomputed here from the files, not read from their JSON records); features are
deterministic with the documented shape; bad inputs and missing or corrupt files fail
with clear errors; a freshly trained classifier round-trips through save/load.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tfngd import data
from tfngd import feature_classifier as fc
from trainers import train_classifier

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")
MIN_ACCURACY = 0.98


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def digits_extractor():
    return fc.FeatureExtractor("digits")


# --------------------------------------------------------------------------- shipped files


def test_shipped_digits_classifier_accuracy(digits, digits_extractor):
    predictions = digits_extractor.predict_labels(digits.eval)
    accuracy = float(np.mean(predictions == digits.eval_labels))
    assert len(digits.eval) == 297
    assert accuracy >= MIN_ACCURACY, f"digits eval accuracy {accuracy:.4f}"
    # The JSON record describes this file: same accuracy, held-out count, a command.
    report = fc.load_report("digits")
    assert report["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert report["num_eval"] == 297
    assert report["command"].startswith("python -m trainers.train_classifier")
    assert {"tensorflow", "keras"} <= set(report["versions"])
    assert report["params"] == digits_extractor.model.count_params() < 100_000
    assert os.path.getsize(fc.classifier_path("digits")) < 2_000_000


def test_shipped_mnist_classifier_accuracy():
    if not os.path.isdir(MNIST_DIR):
        pytest.skip(f"offline MNIST directory {os.path.normpath(MNIST_DIR)} not found")
    splits = data.load_dataset("mnist", data_dir=MNIST_DIR)
    extractor = fc.FeatureExtractor("mnist")
    accuracy = float(np.mean(extractor.predict_labels(splits.eval) == splits.eval_labels))
    assert len(splits.eval) == 2000
    assert accuracy >= MIN_ACCURACY, f"MNIST eval accuracy {accuracy:.4f}"
    report = fc.load_report("mnist")
    assert report["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert report["num_eval"] == 2000
    assert os.path.getsize(fc.classifier_path("mnist")) < 2_000_000
    assert extractor.features(splits.eval[:7]).shape == (7, 128)


def test_classifier_path_is_inside_the_package():
    path = fc.classifier_path("digits")
    assert path == os.path.join(os.path.dirname(fc.__file__), "assets", "classifiers",
                                "digits.keras")
    with pytest.raises(ValueError, match="no feature classifier for data set 'moons'"):
        fc.classifier_path("moons")


# --------------------------------------------------------------------------- features


def test_features_shape_dtype_and_determinism(digits, digits_extractor):
    images = digits.eval[:50]
    first = digits_extractor.features(images)
    assert first.shape == (50, 128) and first.dtype == np.float32
    assert np.all(first >= 0.0)  # ReLU features
    np.testing.assert_array_equal(digits_extractor.features(images), first)
    # Batching does not change the result (inference mode: per-example computation).
    small_batches = fc.FeatureExtractor(digits_extractor.model, batch_size=7)
    np.testing.assert_allclose(small_batches.features(images), first, rtol=1e-5, atol=1e-6)
    labels = digits_extractor.predict_labels(images)
    assert labels.shape == (50,) and np.issubdtype(labels.dtype, np.integer)
    feats, logits = digits_extractor.features_and_logits(images)
    np.testing.assert_array_equal(np.argmax(logits, axis=1), labels)
    assert logits.shape == (50, 10)


def test_bad_inputs_are_rejected(digits, digits_extractor):
    with pytest.raises(ValueError, match=r"expected shape \[N, 8, 8, 1\].*\[4, 28, 28, 1\]"):
        digits_extractor.features(np.zeros((4, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \[N, 8, 8, 1\].*\[4, 8, 8\]"):
        digits_extractor.features(np.zeros((4, 8, 8), np.float32))
    bad = digits.eval[:5].copy()
    bad[3, 2, 2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite.*image 3"):
        digits_extractor.predict_labels(bad)
    bad[3, 2, 2, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        digits_extractor.features(bad)
    with pytest.raises(ValueError, match="empty"):
        digits_extractor.features(np.zeros((0, 8, 8, 1), np.float32))


# --------------------------------------------------------------------------- files


def test_missing_file_names_file_and_command(tmp_path):
    missing = tmp_path / "nothing.keras"
    with pytest.raises(FileNotFoundError, match="nothing.keras.*python -m "
                                                "trainers.train_classifier --dataset digits"):
        fc.load_classifier("digits", path=str(missing))
    with pytest.raises(FileNotFoundError, match="trainers.train_classifier --dataset mnist"):
        fc.FeatureExtractor(fc.load_classifier("mnist", path=str(missing)))


def test_corrupt_file_names_file_and_command(tmp_path):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="corrupt.keras.*corrupt or unreadable.*"
                                         "trainers.train_classifier --dataset digits"):
        fc.load_classifier("digits", path=str(corrupt))
    # A truncated copy of the real file is corrupt too.
    real = open(fc.classifier_path("digits"), "rb").read()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(real[: len(real) // 2])
    with pytest.raises(ValueError, match="truncated.keras"):
        fc.load_classifier("digits", path=str(truncated))


# --------------------------------------------------------------------------- training


def test_build_classifier_layers():
    model = fc.build_classifier((8, 8, 1), 10)
    assert model.get_layer("features").output.shape[-1] == 128
    assert model.output.shape[-1] == 10
    assert model.count_params() < 100_000
    with pytest.raises(ValueError, match="data_shape"):
        fc.build_classifier((8, 8), 10)


def test_random_shifts_move_content_and_fill_background():
    rng = np.random.default_rng(0)
    images = -np.ones((200, 5, 5, 1), np.float32)
    images[:, 2, 2, 0] = 1.0  # one bright pixel in the centre
    shifted = fc.random_shifts(images, 1, rng)
    rows, cols = np.nonzero(shifted[..., 0] == 1.0)[1:]
    assert len(rows) == 200  # the pixel stays inside, moved by at most one
    assert set(rows) == {1, 2, 3} and set(cols) == {1, 2, 3}
    assert np.all(np.sort(np.unique(shifted)) == np.array([-1.0, 1.0]))
    assert fc.random_shifts(images, 0, rng) is images


def test_tiny_training_round_trips_through_save_and_load(tmp_path, digits):
    model, report = fc.train_classifier("digits", epochs=1, num_train=256, seed=3)
    assert report["num_train"] == 256 and report["num_eval"] == 297
    assert 0.0 <= report["test_accuracy"] <= 1.0
    model_path, json_path = fc.save_classifier(model, report, path=str(tmp_path / "d.keras"),
                                               command="test command")
    loaded = fc.load_classifier("digits", path=model_path)
    before, after = fc.FeatureExtractor(model), fc.FeatureExtractor(loaded)
    np.testing.assert_array_equal(after.predict_labels(digits.eval),
                                  before.predict_labels(digits.eval))
    np.testing.assert_allclose(after.features(digits.eval), before.features(digits.eval),
                               rtol=0, atol=0)
    record = json.loads(open(json_path).read())
    assert record["command"] == "test command"
    assert record["test_accuracy"] == report["test_accuracy"]
    # Same seed, same weights (keras.utils.set_random_seed + seeded augmentation).
    again, _ = fc.train_classifier("digits", epochs=1, num_train=256, seed=3)
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cli_writes_model_and_record(tmp_path, monkeypatch):
    import tensorflow as tf

    # Op determinism is process-wide; keep it out of the test process.
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)
    argv = ["--dataset", "digits", "--epochs", "1", "--output-dir", str(tmp_path)]
    assert train_classifier.main(argv) == 0
    record = json.loads((tmp_path / "digits.json").read_text())
    assert record["command"] == ("python -m trainers.train_classifier --dataset digits "
                                 f"--epochs 1 --output-dir {tmp_path}")
    assert record["epochs"] == 1 and record["num_eval"] == 297
    fc.load_classifier("digits", path=str(tmp_path / "digits.keras"))
