"""Sample quality against held-out data, for the benchmark's trials.

* 2-D tasks: :func:`tfngd.metrics.sliced_wasserstein` (``p = 2``, 256
  directions, fixed seed), :func:`~tfngd.metrics.energy_distance` and
  :func:`~tfngd.metrics.rbf_mmd` (median-heuristic bandwidths) between the EMA
  samples and the data set's held-out evaluation split.
* Image tasks: :func:`~tfngd.metrics.frechet_distance_from_features` and
  :func:`~tfngd.metrics.kernel_inception_distance` between features of the
  samples and of the evaluation images, in the feature space of the data set's
  fixed classifier (:mod:`tfngd.feature_classifier`). When the classifier file
  is missing or unreadable, the image metrics are skipped and the reason is
  recorded (the benchmark goes on).

Every metric depends on the number of samples (they are biased estimators), so
values compare only between runs with the same sample count: the final
metrics use the task's ``num_samples``, the curves ``curve_samples``.
:meth:`SampleEvaluator.data_floor` scores real training data of the same size,
the value a perfect model would reach.
"""

from __future__ import annotations

import numpy as np

from tfngd import metrics

POINT_METRICS = ("sliced_wasserstein", "energy_distance", "rbf_mmd")
IMAGE_METRICS = ("frechet_distance", "kid")
SW_PROJECTIONS = 256
# 2-D reference: the first 2048 held-out points (RBF-MMD and energy distance cost
# O((n + m)^2); 5000 points made one RBF-MMD call take ~3 s).
MAX_POINT_REFERENCE = 2048
METRIC_SEED = 0


class SampleEvaluator:
    """Scores samples of one task against its held-out split.

    Args:
      kind: ``"points"`` or ``"images"``.
      reference: the evaluation split (``[N, 2]`` points or ``[N, H, W, C]`` images).
      dataset: the image data set whose classifier defines the feature space.
      train: training data for :meth:`data_floor`.
      extractor_factory: builds the feature extractor from ``dataset`` (tests
        inject one); default :class:`tfngd.feature_classifier.FeatureExtractor`.
      max_reference: 2-D data: score against the first this many held-out points.
    """

    def __init__(self, kind: str, reference: np.ndarray, dataset: str | None = None,
                 train: np.ndarray | None = None, extractor_factory=None,
                 max_reference: int | None = MAX_POINT_REFERENCE):
        if kind not in ("points", "images"):
            raise ValueError(f"kind must be 'points' or 'images', got {kind!r}")
        self.kind = kind
        reference = np.asarray(reference, dtype=np.float32)
        if kind == "points" and max_reference and len(reference) > max_reference:
            reference = reference[:max_reference]
        self.reference = reference
        self.train = None if train is None else np.asarray(train, dtype=np.float32)
        self.dataset = dataset
        self.skipped: str | None = None
        self._extractor = None
        self._reference_features = None
        if kind == "images":
            try:
                if extractor_factory is None:
                    from tfngd.feature_classifier import FeatureExtractor

                    extractor_factory = FeatureExtractor
                self._extractor = extractor_factory(dataset)
                self._reference_features = self._extractor.features(self.reference)
            except (FileNotFoundError, ValueError, OSError) as err:
                self.skipped = f"image metrics skipped: {' '.join(str(err).split())}"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return POINT_METRICS if self.kind == "points" else IMAGE_METRICS

    def __call__(self, samples) -> tuple[dict, str | None]:
        """``(metrics, skipped_reason)``; metrics is empty when skipped."""
        samples = np.asarray(samples, dtype=np.float64)
        if not np.all(np.isfinite(samples)):
            return {}, f"{int((~np.isfinite(samples)).sum())} non-finite sample values"
        if self.kind == "points":
            return {
                "sliced_wasserstein": metrics.sliced_wasserstein(
                    samples, self.reference, num_projections=SW_PROJECTIONS, seed=METRIC_SEED),
                "energy_distance": metrics.energy_distance(samples, self.reference),
                "rbf_mmd": metrics.rbf_mmd(samples, self.reference),
            }, None
        if self.skipped:
            return {}, self.skipped
        features = self._extractor.features(np.clip(samples, -1.0, 1.0))
        kid_mean, kid_std = metrics.kernel_inception_distance(
            features, self._reference_features, subset_size=1000, seed=METRIC_SEED)
        return {
            "frechet_distance": metrics.frechet_distance_from_features(
                features, self._reference_features),
            "kid": kid_mean,
            "kid_std": kid_std,
        }, None

    def data_floor(self, num_samples: int, seed: int = 0) -> tuple[dict, str | None]:
        """The metrics of ``num_samples`` training examples (the floor a perfect model hits)."""
        if self.train is None:
            return {}, "no training data given"
        count = min(int(num_samples), len(self.train))
        index = np.random.default_rng(seed).choice(len(self.train), count, replace=False)
        return self(self.train[np.sort(index)])
