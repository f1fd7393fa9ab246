"""Sample-quality metrics of the optimizer benchmark (numpy/scipy, float64 internally).

Two-sample distances between generated samples ``x`` and held-out data ``y``
(arrays ``[n, d]``; 1-D arrays ``[n]`` are read as ``[n, 1]``):

* :func:`sliced_wasserstein`: ``SW_p(x, y) = (E_u W_p(u.x, u.y)^p)^(1/p)`` over
  random unit directions ``u`` (Rabin et al. 2011; Bonneel et al. 2015), each 1-D
  ``W_p`` computed exactly from the quantile functions.
* :func:`energy_distance`: the squared energy distance of Szekely & Rizzo (2013).
* :func:`rbf_mmd`: the unbiased MMD^2 of Gretton et al. (2012) with a sum of RBF kernels.

Feature-space metrics for images (features of the project's classifier,
:mod:`tfngd.feature_classifier`):

* :func:`frechet_distance` / :func:`frechet_distance_from_features`: the Frechet
  (2-Wasserstein) distance between Gaussians fitted to the features (Heusel et al. 2017,
  "FID"; Dowson & Landau 1982 for the closed form).
* :func:`kernel_inception_distance`: KID (Binkowski et al. 2018), the unbiased MMD^2 with
  the cubic polynomial kernel, averaged over random subsets.

And :func:`mean_confidence_interval` for reporting a metric over seeds.

Every function validates its inputs and raises ``ValueError`` naming the problem
(non-finite values, wrong rank, mismatched dimensions, empty or too-small sets).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
from scipy.spatial.distance import cdist, pdist

from tfngd.validation import check_integer

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "rbf_mmd",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "mean_confidence_interval",
]

# Pairwise blocks hold at most this many entries (8 MB of float64 per block).
_BLOCK_ENTRIES = 1 << 20
# The default RBF bandwidth is the median over all pairs of at most this many pooled points.
_MEDIAN_MAX_POINTS = 4096
# Sliced Wasserstein: directions projected at once (bounds memory to n * chunk floats).
_DIRECTION_CHUNK = 32


# -- validation ------------------------------------------------------------------------------


def _as_samples(x, name: str, min_count: int = 1) -> np.ndarray:
    """``x`` as float64 ``[n, d]`` (``[n]`` -> ``[n, 1]``); ``ValueError`` naming the problem."""
    try:
        array = np.asarray(x)
    except Exception as err:  # ragged lists and other non-arrays
        raise ValueError(f"{name}: cannot convert to an array ({err})") from err
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or np.issubdtype(array.dtype, np.bool_)):
        raise ValueError(f"{name}: expected real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real numbers, got complex dtype {array.dtype}")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name}: expected samples of shape [n, d] (or [n] for 1-D data), got "
                         f"rank {array.ndim} shape {list(array.shape)}")
    if array.shape[1] == 0:
        raise ValueError(f"{name}: samples have dimension 0 (shape {list(array.shape)})")
    if array.shape[0] < min_count:
        need = "at least one sample" if min_count == 1 else f"at least {min_count} samples"
        raise ValueError(f"{name}: empty or too small set: {array.shape[0]} samples, "
                         f"need {need}")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        raise ValueError(f"{name}: {int(bad.sum())} non-finite values (NaN or inf) in shape "
                         f"{list(array.shape)}; the first in row {row}")
    return array


def _as_pair(x, y, min_count: int = 1, names=("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    x = _as_samples(x, names[0], min_count)
    y = _as_samples(y, names[1], min_count)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mismatched feature dimensions: {names[0]} has d={x.shape[1]}, "
                         f"{names[1]} has d={y.shape[1]}")
    return x, y


# -- pairwise sums (chunked) -----------------------------------------------------------------


def _row_blocks(num_rows: int, num_cols: int):
    step = max(1, _BLOCK_ENTRIES // max(num_cols, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``mean_{i,j} |a_i - b_j|`` (Euclidean) over all ``len(a) * len(b)`` pairs, chunked."""
    total = 0.0
    for rows in _row_blocks(len(a), len(b)):
        total += float(cdist(a[rows], b, "euclidean").sum())
    return total / (len(a) * len(b))


def _kernel_sum(a: np.ndarray, b: np.ndarray, kernel) -> float:
    """``sum_{i,j} k(a_i, b_j)`` with ``kernel(a_block, b) -> [rows, len(b)]``, chunked."""
    total = 0.0
    for rows in _row_blocks(len(a), len(b)):
        total += float(kernel(a[rows], b).sum())
    return total


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, kernel, diagonal) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6, ``MMD_u^2``).

    ``sum_{i!=j} k(x_i,x_j) / (n(n-1)) + sum_{i!=j} k(y_i,y_j) / (m(m-1))
    - 2 sum_{i,j} k(x_i,y_j) / (nm)``; ``diagonal(a)`` gives ``k(a_i, a_i)``.
    """
    n, m = len(x), len(y)
    kxx = _kernel_sum(x, x, kernel) - float(diagonal(x).sum())
    kyy = _kernel_sum(y, y, kernel) - float(diagonal(y).sum())
    kxy = _kernel_sum(x, y, kernel)
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (n * m)


# -- sliced Wasserstein ----------------------------------------------------------------------


def _wasserstein_1d_pp(xs: np.ndarray, ys: np.ndarray, p: float) -> np.ndarray:
    """Exact ``W_p^p`` between the empirical measures of each column of sorted ``xs``, ``ys``.

    ``W_p^p = int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du``. Both quantile functions are step
    functions, constant between consecutive points of the merged grid
    ``{i/n} u {j/m}``; in integer units of ``1/(nm)`` the grid is
    ``{i m} u {j n}``, and on the piece ``[a, b)`` the quantiles are ``xs[a // m]`` and
    ``ys[a // n]``. The integral is a finite sum: no approximation.
    ``xs``: ``[n, k]``, ``ys``: ``[m, k]`` (sorted along axis 0); returns ``[k]``.
    """
    n, m = len(xs), len(ys)
    grid = np.union1d(np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n)
    start, stop = grid[:-1], grid[1:]
    weights = (stop - start) / float(n * m)
    gaps = np.abs(xs[start // m] - ys[start // n])
    return weights @ (gaps if p == 1 else gaps ** p)


def sliced_wasserstein(x, y, num_projections: int = 256, p: float = 2, seed: int = 0) -> float:
    """Sliced p-Wasserstein distance ``(mean_u W_p(u.x, u.y)^p)^(1/p)`` between two samples.

    ``x``: ``[n, d]``, ``y``: ``[m, d]`` (sizes may differ). The ``num_projections``
    directions ``u`` are standard normal vectors normalised to unit length (uniform on
    the sphere), drawn from ``numpy.random.default_rng(seed)``, so the value is
    deterministic for ``seed`` and two calls with the same seed compare the same slices.
    Each 1-D ``W_p`` between the projected empirical measures (weights ``1/n``, ``1/m``)
    is computed exactly from the quantile functions (see :func:`_wasserstein_1d_pp`).

    For 1-D data (``[n]`` or ``[n, 1]``) the only direction is used and the result is the
    exact 1-D ``W_p`` (for ``p = 1`` it equals ``scipy.stats.wasserstein_distance``).
    For ``y = x + c``, ``W_p(u.x, u.y) = |u.c|`` for every direction, so
    ``SW_2 = |c| sqrt(mean_u (u.e)^2)`` with ``e = c/|c|``, which tends to ``|c|/sqrt(d)``.

    References: Rabin, Peyre, Delon & Bernot (2011), "Wasserstein barycenter and its
    application to texture mixing"; Bonneel, Rabin, Peyre & Pfister (2015).
    """
    x, y = _as_pair(x, y)
    num_projections = check_integer("num_projections", num_projections, 1)
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) \
            or not math.isfinite(p) or p < 1:
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    p = float(p)
    d = x.shape[1]
    if d == 1:
        directions = np.ones((1, 1))
    else:
        directions = np.random.default_rng(seed).standard_normal((num_projections, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    total = 0.0
    for start in range(0, len(directions), _DIRECTION_CHUNK):
        chunk = directions[start:start + _DIRECTION_CHUNK].T  # [d, k]
        xs = np.sort(x @ chunk, axis=0)
        ys = np.sort(y @ chunk, axis=0)
        total += float(_wasserstein_1d_pp(xs, ys, p).sum())
    return float((total / len(directions)) ** (1.0 / p))


# -- energy distance -------------------------------------------------------------------------


def energy_distance(x, y) -> float:
    """Squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Szekely & Rizzo 2013).

    V-statistic form: each expectation is the mean over **all** pairs of the empirical
    samples, ``E|X-X'| = (1/n^2) sum_{i,j} |x_i - x_j|`` including ``i = j`` (so the value
    is the exact squared energy distance between the two empirical distributions,
    always ``>= 0``, and exactly 0 for identical sets). ``|.|`` is the Euclidean norm.

    Note: ``scipy.stats.energy_distance(u, v)`` (1-D only) returns the **square root**
    of this quantity, ``sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|)``.

    Pairwise distances are summed in blocks of about 1M entries, so a few thousand (or
    tens of thousands of) points need little memory; time is ``O((n + m)^2 d)``.
    """
    x, y = _as_pair(x, y)
    value = 2.0 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    return float(max(value, 0.0))  # >= 0 exactly; rounding can leave -1e-16


# -- MMD -------------------------------------------------------------------------------------


def _median_bandwidth(pooled: np.ndarray) -> float:
    """Median of the pairwise Euclidean distances (``i < j``) of ``pooled``.

    With more than ``_MEDIAN_MAX_POINTS`` points, the median over all pairs of a fixed
    random subset of that many points (``default_rng(0)``), to bound memory.
    """
    if len(pooled) > _MEDIAN_MAX_POINTS:
        index = np.random.default_rng(0).choice(len(pooled), _MEDIAN_MAX_POINTS, replace=False)
        pooled = pooled[np.sort(index)]
    distances = pdist(pooled, "euclidean")
    median = float(np.median(distances))
    if median <= 0.0:  # more than half the pairs coincide: use the positive distances
        positive = distances[distances > 0]
        median = float(np.median(positive)) if positive.size else 0.0
    return median


def rbf_mmd(x, y, bandwidths=None) -> float:
    """Unbiased MMD^2 with the kernel ``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))``.

    ``MMD_u^2 = sum_{i!=j} k(x_i,x_j)/(n(n-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1))
    - 2 sum_{i,j} k(x_i,y_j)/(nm)`` (Gretton, Borgwardt, Rasch, Schoelkopf & Smola 2012,
    "A kernel two-sample test", JMLR 13, eq. 3). Unbiased, so it fluctuates around 0
    (and can be slightly negative) when both samples come from the same distribution.

    ``bandwidths`` (the ``s`` values): default ``(0.5, 1, 2) * median``, where ``median``
    is the median pairwise distance of the pooled sample ``x u y`` (over a fixed
    random subset of 4096 points when there are more). If every pooled point is the
    same, both samples are the same point mass and 0.0 is returned. Needs at least 2
    points per set. Kernel sums are computed in blocks (memory-safe for a few thousand
    points).
    """
    x, y = _as_pair(x, y, min_count=2)
    if bandwidths is None:
        median = _median_bandwidth(np.concatenate([x, y]))
        if median == 0.0:
            return 0.0
        scales = median * np.array([0.5, 1.0, 2.0])
    else:
        scales = np.atleast_1d(np.asarray(bandwidths, dtype=np.float64))
        if scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales)) \
                or np.any(scales <= 0):
            raise ValueError(f"bandwidths must be a non-empty list of finite positive numbers, "
                             f"got {bandwidths!r}")
    gammas = 1.0 / (2.0 * scales ** 2)

    def kernel(a, b):
        sq = cdist(a, b, "sqeuclidean")
        return sum(np.exp(-g * sq) for g in gammas)

    return _unbiased_mmd2(x, y, kernel, lambda a: np.full(len(a), float(len(gammas))))


# -- Frechet distance ------------------------------------------------------------------------


def _check_gaussian(mean, cov, name: str) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    if mean.ndim != 1 or mean.size == 0:
        raise ValueError(f"mean{name} must be a non-empty vector [d], got shape "
                         f"{list(mean.shape)}")
    d = mean.size
    if cov.shape != (d, d):
        raise ValueError(f"cov{name} must have shape [{d}, {d}] to match mean{name}, got "
                         f"{list(cov.shape)}")
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean{name} has non-finite values (NaN or inf)")
    if not np.all(np.isfinite(cov)):
        raise ValueError(f"cov{name} has non-finite values (NaN or inf)")
    scale = max(float(np.abs(cov).max()), 1e-300)
    if float(np.abs(cov - cov.T).max()) > 1e-6 * scale:
        raise ValueError(f"cov{name} is not symmetric (max |C - C^T| = "
                         f"{float(np.abs(cov - cov.T).max()):g})")
    return mean, 0.5 * (cov + cov.T)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0.

    ``eigh`` is accurate to about ``eps * max|w|`` per eigenvalue, so values below
    ``d * eps * max|w|`` (including the slightly negative ones of singular matrices) are
    noise; their square roots (~1e-8 relative) would otherwise bias the trace term.
    """
    cutoff = len(w) * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > cutoff, w, 0.0)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root ``V diag(sqrt(w)) V^T`` of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mean1, cov1)`` and ``N(mean2, cov2)``.

    ``d^2 = |m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2})``
    (Dowson & Landau 1982; the "FID" of Heusel et al. 2017 in a feature space).

    Computed with symmetric eigendecompositions only: ``C1^{1/2}`` from ``eigh(C1)``, then
    the trace term is ``sum_k sqrt(lambda_k)`` over the eigenvalues of the symmetric PSD
    matrix ``C1^{1/2} C2 C1^{1/2}`` (eigenvalues at rounding level, below
    ``d * eps * max|lambda|``, and tiny negative ones are set to 0).
    No complex numbers, no ``sqrtm`` of the non-symmetric ``C1 C2``, and well defined for
    singular covariances (e.g. fewer samples than dimensions). The result is clipped at 0
    (it is >= 0 exactly; rounding can leave ~-1e-12).
    """
    mean1, cov1 = _check_gaussian(mean1, cov1, "1")
    mean2, cov2 = _check_gaussian(mean2, cov2, "2")
    if mean1.size != mean2.size:
        raise ValueError(f"mismatched feature dimensions: mean1 has d={mean1.size}, mean2 has "
                         f"d={mean2.size}")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt = float(np.sqrt(_clip_eigenvalues(eigenvalues)).sum())
    diff = mean1 - mean2
    value = float(diff @ diff) + float(np.trace(cov1)) + float(np.trace(cov2)) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def frechet_distance_from_features(f1, f2) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two feature sets ``[n, d]``, ``[m, d]``.

    Sample means and unbiased (``1/(n-1)``) covariances; needs at least 2 rows per set.
    """
    f1, f2 = _as_pair(f1, f2, min_count=2, names=("f1", "f2"))
    cov1 = np.atleast_2d(np.cov(f1, rowvar=False, ddof=1))
    cov2 = np.atleast_2d(np.cov(f2, rowvar=False, ddof=1))
    return frechet_distance(f1.mean(axis=0), cov1, f2.mean(axis=0), cov2)


# -- KID -------------------------------------------------------------------------------------


def kernel_inception_distance(f1, f2, num_subsets: int = 10, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski, Sutherland, Arbel & Gretton 2018): ``(mean, std)``.

    For each of ``num_subsets`` subsets, ``s = min(subset_size, n, m)`` rows are drawn
    without replacement from each of ``f1`` and ``f2`` (``numpy.random.default_rng(seed)``)
    and the unbiased MMD^2 is computed with the polynomial kernel
    ``k(a, b) = (a.b / d + 1)^3``:
    ``sum_{i!=j} k(x_i,x_j)/(s(s-1)) + sum_{i!=j} k(y_i,y_j)/(s(s-1)) - 2 sum_{i,j}
    k(x_i,y_j)/s^2``. Returns the mean and the (population, ``ddof=0``) standard
    deviation of the subset values, as in the authors' reference implementation
    (``polynomial_mmd_averages``). Unbiased: about 0 (possibly slightly negative) for two
    draws of the same distribution. Needs at least 2 rows per set.
    """
    f1, f2 = _as_pair(f1, f2, min_count=2, names=("f1", "f2"))
    num_subsets = check_integer("num_subsets", num_subsets, 1)
    subset_size = check_integer("subset_size", subset_size, 2)
    size = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]

    def kernel(a, b):
        return (a @ b.T / d + 1.0) ** 3

    def diagonal(a):
        return (np.einsum("ij,ij->i", a, a) / d + 1.0) ** 3

    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for k in range(num_subsets):
        x = f1[rng.choice(len(f1), size, replace=False)]
        y = f2[rng.choice(len(f2), size, replace=False)]
        values[k] = _unbiased_mmd2(x, y, kernel, diagonal)
    return float(values.mean()), float(values.std())


# -- reporting -------------------------------------------------------------------------------


def mean_confidence_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its Student-t confidence interval at ``level``.

    ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof=1``) and ``t`` the quantile of Student's t with ``n - 1`` degrees of
    freedom (``scipy.stats.t.ppf``); assumes roughly normal, independent values (e.g. one
    metric per seed). With a single value there is no spread estimate: returns
    ``(value, nan, nan)``. ``values`` must be a non-empty 1-D sequence of finite numbers
    and ``0 < level < 1``.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"values: expected a sequence of numbers ({err})") from err
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D, got rank {array.ndim} shape {list(array.shape)}")
    if array.size == 0:
        raise ValueError("values is empty: need at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"values has {int((~np.isfinite(array)).sum())} non-finite entries")
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) \
            or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = array.size
    mean = float(array.mean())
    if n == 1:
        return mean, math.nan, math.nan
    half = float(scipy.stats.t.ppf(0.5 + 0.5 * float(level), n - 1)
                 * array.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half
