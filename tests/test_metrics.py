"""Sample-quality metrics (tfngd.metrics) against independent references.

References: ``scipy.stats.wasserstein_distance`` / ``energy_distance`` (1-D),
``scipy.linalg.sqrtm`` for the Gaussian Frechet distance, closed forms for shifted
samples and commuting covariances, and a hand-written t interval.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from tfngd import metrics

# --------------------------------------------------------------------------- helpers


def random_spd(rng, d, jitter=0.1):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + jitter * np.eye(d)


def ref_frechet_sqrtm(m1, c1, m2, c2):
    """FID formula as in Heusel et al.'s reference code: sqrtm of the non-symmetric C1 C2."""
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = np.real(covmean)
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(covmean))


def ref_unbiased_mmd2(x, y, kernel):
    """Unbiased MMD^2 with full kernel matrices (Gretton et al. 2012, eq. 3)."""
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy))
            / (m * (m - 1)) - 2.0 * kxy.mean())


# --------------------------------------------------------------------------- sliced Wasserstein


def test_sliced_wasserstein_identical_sets_is_zero():
    x = np.random.default_rng(0).standard_normal((300, 3))
    assert metrics.sliced_wasserstein(x, x) == 0.0
    assert metrics.sliced_wasserstein(x, x[::-1].copy(), p=1) == 0.0  # order does not matter


@pytest.mark.parametrize("n,m", [(50, 50), (37, 101), (200, 13), (1, 7)])
def test_sliced_wasserstein_1d_p1_equals_scipy_unequal_sizes(n, m):
    # W_1 between empirical measures of different sizes: exact merge of the two CDFs.
    rng = np.random.default_rng(n * 1000 + m)
    x, y = rng.standard_normal(n), 0.5 + 2.0 * rng.standard_normal(m)
    expected = scipy.stats.wasserstein_distance(x, y)
    assert metrics.sliced_wasserstein(x, y, p=1) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # [n, 1] is the same 1-D data: the only direction is used, whatever num_projections says.
    assert metrics.sliced_wasserstein(x[:, None], y[:, None], p=1, num_projections=7) \
        == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_sliced_wasserstein_1d_p2_unequal_sizes_against_quantile_integral():
    # W_2^2 = int_0^1 (F^-1(u) - G^-1(u))^2 du on a fine grid of u that contains every
    # breakpoint i/3 and j/4 (common grid 1/12): piecewise constant, so the midpoint rule is exact.
    x, y = np.array([0.0, 1.0, 5.0]), np.array([-1.0, 2.0, 2.5, 7.0])
    u = (np.arange(12) + 0.5) / 12.0
    qx, qy = np.sort(x)[np.floor(u * 3).astype(int)], np.sort(y)[np.floor(u * 4).astype(int)]
    expected = math.sqrt(np.mean((qx - qy) ** 2))
    assert metrics.sliced_wasserstein(x, y, p=2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("c", [0.7, -3.0])
def test_sliced_wasserstein_1d_p2_shift_is_abs_c(c):
    # W_2(x, x + c) = |c| in closed form (the optimal coupling is the identity shift).
    x = np.random.default_rng(1).standard_normal(257)
    assert metrics.sliced_wasserstein(x, x + c, p=2) == pytest.approx(abs(c), rel=1e-12)


def test_sliced_wasserstein_2d_shift_closed_form():
    # y = x + c: every projection is a 1-D shift by u.c, so SW_2 = |c| sqrt(mean_u (u.e)^2),
    # which for directions uniform on the circle tends to |c| / sqrt(2). With 4096 directions
    # the Monte Carlo error of mean (u.e)^2 = mean cos^2 (std 0.354 / sqrt(4096) = 0.0055)
    # keeps the result within 1.5% of |c|/sqrt(2).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 2))
    c = np.array([3.0, -4.0])  # |c| = 5
    num_projections, seed = 4096, 3
    value = metrics.sliced_wasserstein(x, x + c, num_projections=num_projections, seed=seed)
    assert value == pytest.approx(5.0 / math.sqrt(2.0), rel=0.015)
    # Exactly |c| sqrt(mean (u.e)^2) for the directions actually drawn (same recipe).
    u = np.random.default_rng(seed).standard_normal((num_projections, 2))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    exact = 5.0 * math.sqrt(np.mean((u @ (c / 5.0)) ** 2))
    assert value == pytest.approx(exact, rel=1e-9)


def test_sliced_wasserstein_is_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((100, 5)), rng.standard_normal((80, 5)) + 0.3
    assert metrics.sliced_wasserstein(x, y, seed=7) == metrics.sliced_wasserstein(x, y, seed=7)
    assert metrics.sliced_wasserstein(x, y, seed=7) != metrics.sliced_wasserstein(x, y, seed=8)


# --------------------------------------------------------------------------- energy distance


@pytest.mark.parametrize("n,m", [(40, 40), (33, 71)])
def test_energy_distance_1d_equals_scipy_squared(n, m):
    rng = np.random.default_rng(n + m)
    x, y = rng.standard_normal(n), 0.4 + 1.5 * rng.standard_normal(m)
    expected = scipy.stats.energy_distance(x, y) ** 2  # scipy returns the square root
    assert metrics.energy_distance(x, y) == pytest.approx(expected, rel=1e-10)


def test_energy_distance_identical_is_zero_and_multivariate_reference():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((60, 3)), rng.standard_normal((45, 3)) + 1.0
    assert metrics.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)

    def mean_dist(a, b):
        return np.mean(np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1))

    expected = 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
    assert metrics.energy_distance(x, y) == pytest.approx(expected, rel=1e-10)


def test_energy_distance_chunks_give_the_same_value(monkeypatch):
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((90, 2)), rng.standard_normal((70, 2))
    whole = metrics.energy_distance(x, y)
    monkeypatch.setattr(metrics, "_BLOCK_ENTRIES", 100)  # many small blocks
    assert metrics.energy_distance(x, y) == pytest.approx(whole, rel=1e-12)


# --------------------------------------------------------------------------- RBF MMD


def test_rbf_mmd_matches_full_matrix_reference():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((50, 2)), rng.standard_normal((40, 2)) + 0.5
    bandwidths = (0.3, 1.0)

    def kernel(a, b):
        sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-sq / (2 * s ** 2)) for s in bandwidths)

    expected = ref_unbiased_mmd2(x, y, kernel)
    assert metrics.rbf_mmd(x, y, bandwidths=bandwidths) == pytest.approx(expected, rel=1e-10)
    # Default bandwidths: (0.5, 1, 2) x the median pairwise distance of the pooled sample.
    pooled = np.concatenate([x, y])
    median = np.median(scipy.spatial.distance.pdist(pooled))
    assert metrics.rbf_mmd(x, y) == pytest.approx(
        metrics.rbf_mmd(x, y, bandwidths=median * np.array([0.5, 1.0, 2.0])), rel=1e-12)


def test_rbf_mmd_shifted_larger_than_same_distribution():
    # Unbiased MMD^2 of two independent draws of N(0, I) is ~0 (|value| < 0.01 with 400
    # points); a shift by 1 in each coordinate gives clearly more.
    rng = np.random.default_rng(8)
    x, y_same = rng.standard_normal((400, 2)), rng.standard_normal((400, 2))
    y_shift = rng.standard_normal((400, 2)) + 1.0
    same, shifted = metrics.rbf_mmd(x, y_same), metrics.rbf_mmd(x, y_shift)
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert shifted > 10 * abs(same)


def test_rbf_mmd_identical_point_mass_is_zero():
    assert metrics.rbf_mmd(np.ones((5, 2)), np.ones((3, 2))) == 0.0


# --------------------------------------------------------------------------- Frechet


@pytest.mark.parametrize("d", [1, 4, 16])
def test_frechet_distance_against_sqrtm(d):
    rng = np.random.default_rng(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = random_spd(rng, d), random_spd(rng, d)
    expected = ref_frechet_sqrtm(m1, c1, m2, c2)
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_commuting_diagonal_case():
    # Diagonal covariances commute: d^2 = |m1 - m2|^2 + sum_k (sqrt(a_k) - sqrt(b_k))^2.
    a, b = np.array([0.5, 2.0, 3.0, 1e-3]), np.array([1.5, 0.25, 3.0, 4.0])
    m1, m2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = metrics.frechet_distance(m1, np.diag(a), m2, np.diag(b))
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_singular_covariance_is_real_and_finite():
    # Rank-deficient covariances (fewer samples than dimensions) are handled without complex
    # numbers; a rank-1 C1 = v v^T against C2 = I: tr sqrt(C1^{1/2} C2 C1^{1/2}) = |v|.
    v = np.array([1.0, 2.0, 2.0])
    value = metrics.frechet_distance(np.zeros(3), np.outer(v, v), np.zeros(3), np.eye(3))
    assert value == pytest.approx(9.0 + 3.0 - 2.0 * 3.0, rel=1e-10)


def test_frechet_distance_from_features_uses_unbiased_covariance():
    rng = np.random.default_rng(9)
    f1, f2 = rng.standard_normal((200, 5)), rng.standard_normal((150, 5)) * 1.3 + 0.2
    expected = ref_frechet_sqrtm(f1.mean(0), np.cov(f1.T), f2.mean(0), np.cov(f2.T))
    assert metrics.frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance_from_features(f1, f1) == pytest.approx(0.0, abs=1e-10)
    # 1-D features work too: (m1 - m2)^2 + (s1 - s2)^2.
    g1, g2 = f1[:, 0], f2[:, 0]
    expected_1d = (g1.mean() - g2.mean()) ** 2 + (g1.std(ddof=1) - g2.std(ddof=1)) ** 2
    assert metrics.frechet_distance_from_features(g1, g2) == pytest.approx(expected_1d, rel=1e-9)


# --------------------------------------------------------------------------- KID


def test_kid_matches_reference_on_one_full_subset():
    rng = np.random.default_rng(10)
    f1, f2 = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) + 0.5

    def kernel(a, b):
        return (a @ b.T / 4 + 1.0) ** 3

    expected = ref_unbiased_mmd2(f1, f2, kernel)
    # subset_size >= both set sizes: the subset is a permutation of each full set.
    mean, std = metrics.kernel_inception_distance(f1, f2, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_near_zero_same_distribution_and_positive_for_different():
    # Two draws of N(0, I_16): the unbiased estimate is ~0 (|mean| < 3 std-of-subset-means,
    # and < 0.01 in absolute value); a mean shift of 0.5 per feature gives > 0.1.
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    c = rng.standard_normal((600, 16)) + 0.5
    same_mean, same_std = metrics.kernel_inception_distance(a, b, num_subsets=5, subset_size=300)
    diff_mean, diff_std = metrics.kernel_inception_distance(a, c, num_subsets=5, subset_size=300)
    assert abs(same_mean) < 0.01
    assert same_std >= 0.0
    assert diff_mean > 0.1
    assert diff_mean > 10 * max(abs(same_mean), same_std)
    # Deterministic for a seed.
    assert metrics.kernel_inception_distance(a, c, num_subsets=5, subset_size=300) == \
        (diff_mean, diff_std)


# --------------------------------------------------------------------------- intervals


def test_mean_confidence_interval_by_hand():
    values = [1.0, 2.0, 4.0]
    # mean 7/3; s^2 = ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3. Student's t with 2 degrees of
    # freedom has the closed-form quantile t_p = (2p - 1) sqrt(2 / (4 p (1 - p))).

    def t2(p):
        return (2 * p - 1) * math.sqrt(2.0 / (4 * p * (1 - p)))

    mean, low, high = metrics.mean_confidence_interval(values)
    half = t2(0.975) * math.sqrt(7.0 / 3.0) / math.sqrt(3.0)
    assert mean == pytest.approx(7.0 / 3.0, rel=1e-14)
    assert low == pytest.approx(7.0 / 3.0 - half, rel=1e-12)
    assert high == pytest.approx(7.0 / 3.0 + half, rel=1e-12)
    _, low90, high90 = metrics.mean_confidence_interval(values, level=0.9)
    assert low90 == pytest.approx(7.0 / 3.0 - t2(0.95) * math.sqrt(7.0 / 9.0), rel=1e-12)
    assert high90 == pytest.approx(7.0 / 3.0 + t2(0.95) * math.sqrt(7.0 / 9.0), rel=1e-12)


def test_mean_confidence_interval_single_value_has_no_interval():
    mean, low, high = metrics.mean_confidence_interval([3.5])
    assert mean == 3.5 and math.isnan(low) and math.isnan(high)


# --------------------------------------------------------------------------- validation


GOOD = np.zeros((4, 2))


@pytest.mark.parametrize("fn", [metrics.sliced_wasserstein, metrics.energy_distance,
                                metrics.rbf_mmd, metrics.frechet_distance_from_features,
                                metrics.kernel_inception_distance])
@pytest.mark.parametrize("bad,match", [
    (np.array([[0.0, np.nan], [1.0, 2.0], [0.0, 0.0]]), "non-finite"),
    (np.array([[0.0, np.inf], [1.0, 2.0], [0.0, 0.0]]), "non-finite"),
    (np.zeros((3, 2, 2)), "rank 3"),
    (np.zeros((3, 5)), "mismatched feature dimensions"),
    (np.zeros((0, 2)), "empty"),
])
def test_two_sample_validation(fn, bad, match):
    with pytest.raises(ValueError, match=match):
        fn(GOOD, bad)
    with pytest.raises(ValueError, match=match):
        fn(bad, GOOD)


@pytest.mark.parametrize("fn", [metrics.rbf_mmd, metrics.frechet_distance_from_features,
                                metrics.kernel_inception_distance])
def test_unbiased_estimators_need_two_points(fn):
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(np.zeros((1, 2)), GOOD)


def test_parameter_validation():
    with pytest.raises(ValueError, match="num_projections"):
        metrics.sliced_wasserstein(GOOD, GOOD, num_projections=0)
    with pytest.raises(ValueError, match="p must be"):
        metrics.sliced_wasserstein(GOOD, GOOD, p=0.5)
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.rbf_mmd(GOOD, GOOD, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="num_subsets"):
        metrics.kernel_inception_distance(GOOD, GOOD, num_subsets=0)
    with pytest.raises(ValueError, match="cov1 must have shape"):
        metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="mismatched feature dimensions"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mean2 has non-finite"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))
    with pytest.raises(ValueError, match="not symmetric"):
        metrics.frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]),
                                 np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="empty"):
        metrics.mean_confidence_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.mean_confidence_interval([1.0, np.nan])
    with pytest.raises(ValueError, match="level"):
        metrics.mean_confidence_interval([1.0, 2.0], level=1.0)
