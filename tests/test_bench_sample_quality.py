"""Sample metrics of the benchmark: 2-D metrics, image metrics in a feature space, and a
missing classifier recorded as a skip instead of a crash."""

import numpy as np
import pytest

from tfngd import metrics
from tfngd.bench.sample_quality import SampleEvaluator


def test_point_metrics_match_the_metric_functions():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((3000, 2)).astype(np.float32)
    samples = rng.standard_normal((200, 2)) + 0.5
    evaluator = SampleEvaluator("points", reference, max_reference=1000)
    values, skipped = evaluator(samples)
    assert skipped is None
    ref = reference[:1000].astype(np.float64)
    assert values["sliced_wasserstein"] == pytest.approx(
        metrics.sliced_wasserstein(samples, ref, num_projections=256, seed=0))
    assert values["energy_distance"] == pytest.approx(metrics.energy_distance(samples, ref))
    assert values["rbf_mmd"] == pytest.approx(metrics.rbf_mmd(samples, ref))
    # Real data from the same distribution scores far better than shifted samples.
    train = rng.standard_normal((500, 2))
    floor, _ = SampleEvaluator("points", reference, train=train, max_reference=1000).data_floor(200)
    assert floor["sliced_wasserstein"] < values["sliced_wasserstein"] / 3
    bad, reason = evaluator(np.full((10, 2), np.nan))
    assert bad == {} and "non-finite" in reason


class MeanPoolExtractor:
    """A stand-in feature extractor: per-image mean and standard deviation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def features(self, images):
        images = np.asarray(images, dtype=np.float64)
        return np.stack([images.mean(axis=(1, 2, 3)), images.std(axis=(1, 2, 3))], axis=1)


def test_image_metrics_in_the_feature_space():
    rng = np.random.default_rng(1)
    reference = rng.uniform(-1, 1, (100, 8, 8, 1)).astype(np.float32)
    samples = np.clip(rng.uniform(-1, 1, (80, 8, 8, 1)) + 0.3, -1, 1)
    evaluator = SampleEvaluator("images", reference, dataset="digits",
                                extractor_factory=MeanPoolExtractor)
    values, skipped = evaluator(samples)
    assert skipped is None
    f_samples = MeanPoolExtractor(None).features(samples)
    f_reference = MeanPoolExtractor(None).features(reference)
    assert values["frechet_distance"] == pytest.approx(
        metrics.frechet_distance_from_features(f_samples, f_reference))
    kid = metrics.kernel_inception_distance(f_samples, f_reference, subset_size=1000, seed=0)
    assert (values["kid"], values["kid_std"]) == pytest.approx(kid)


def test_missing_classifier_skips_the_image_metrics():
    def missing(dataset):
        raise FileNotFoundError(f"feature classifier {dataset}.keras not found; recreate it")

    evaluator = SampleEvaluator("images", np.zeros((4, 8, 8, 1)), dataset="mnist",
                                extractor_factory=missing)
    values, skipped = evaluator(np.zeros((4, 8, 8, 1)))
    assert values == {}
    assert skipped.startswith("image metrics skipped: feature classifier mnist.keras not found")
