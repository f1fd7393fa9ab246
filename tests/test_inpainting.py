"""RePaint and the baseline fills, against independent references.

* The walk over levels against a hand-written one (the reference's ``get_schedule_jump``).
* Gaussian data ``N(mu, Sigma)`` (4-D, correlated) with the exact denoiser
  ``E[x_0 | x_t] = mu + a Sigma (a^2 Sigma + b^2 I)^{-1} (x_t - a mu)``: every RePaint
  step is then linear-Gaussian, so the output's exact mean and covariance follow from a
  numpy recursion over the walk (:func:`repaint_moments`), which the samples must match.
  RePaint is not exact even with the exact prior: the recursion and the samples show
  that resampling moves the mean towards the true conditional
  ``mu_u + Sigma_uk Sigma_kk^{-1} (x_k - mu_k)`` (RePaint's claim), without reaching it.
* The harmonic fill against a dense solve of the Laplace system written pixel by pixel,
  and against discrete harmonic functions, which it must reproduce exactly.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfngd import gaussian_diffusion as gd
from tfngd import inpainting, samplers, schedules
from tfngd.model import DiffusionModel

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

D = 4
_A = np.random.default_rng(0).normal(size=(D, D))
SIGMA = _A @ _A.T / D + 0.1 * np.eye(D)  # correlations up to 0.6 between known and unknown
MU = np.array([0.3, -0.2, 0.5, 0.1])
KNOWN, UNKNOWN = [0, 1], [2, 3]
X_KNOWN = np.array([1.0, -0.5])
MASK = np.array([1.0, 1.0, 0.0, 0.0])


def gaussian_conditional():
    s_uk = SIGMA[np.ix_(UNKNOWN, KNOWN)]
    s_kk = SIGMA[np.ix_(KNOWN, KNOWN)]
    mean = MU[UNKNOWN] + s_uk @ np.linalg.solve(s_kk, X_KNOWN - MU[KNOWN])
    cov = SIGMA[np.ix_(UNKNOWN, UNKNOWN)] - s_uk @ np.linalg.solve(s_kk, s_uk.T)
    return mean, cov


def denoiser_gain(abar):
    """``G_t = a Sigma (abar Sigma + (1 - abar) I)^{-1}``: ``x0_hat = mu + G_t (x_t - a mu)``."""
    return np.sqrt(abar) * SIGMA @ np.linalg.inv(abar * SIGMA + (1.0 - abar) * np.eye(D))


def gaussian_oracle(diffusion):
    """The exact prediction for data ``N(MU, SIGMA)`` in the diffusion's parameterisation."""
    abar_all = diffusion.alphas_cumprod
    gains = tf.constant(np.stack([denoiser_gain(a) for a in abar_all]))

    def fn(x, t):
        abar = tf.gather(tf.constant(abar_all), t[0])
        a = tf.sqrt(abar)
        x64 = tf.cast(x, tf.float64)
        x0 = MU + tf.linalg.matvec(gains[t[0]], x64 - a * MU)
        eps = (x64 - a * x0) / tf.sqrt(1.0 - abar)
        if diffusion.prediction_type == "v":
            return tf.cast(a * eps - tf.sqrt(1.0 - abar) * x0, x.dtype)
        return tf.cast(eps, x.dtype)

    return fn


def repaint_moments(diffusion, num_steps, jump_length, resample, variance_type):
    """Exact mean and covariance of RePaint's unknown coordinates with the exact denoiser.

    Independent of the implementation: the posterior coefficients, the walk and the
    forward transition are written out here.
    """
    timesteps = schedules.respaced_timesteps(diffusion.num_timesteps, num_steps).numpy()
    abar = np.concatenate([[1.0], diffusion.alphas_cumprod[timesteps]])
    walk = [num_steps]
    remaining = {n: resample - 1 for n in range(1, num_steps - jump_length + 1, jump_length)}
    while walk[-1] > 0:
        walk.append(walk[-1] - 1)
        if remaining.get(walk[-1], 0):
            remaining[walk[-1]] -= 1
            walk += [walk[-1] + i for i in range(1, jump_length + 1)]
    eye = np.eye(D)
    mean, cov = np.zeros(D), eye.copy()
    for level, target in zip(walk[:-1], walk[1:], strict=True):
        a_t, a_s = abar[level], abar[target]
        if target < level:
            beta = 1.0 - a_t / a_s
            c1 = beta * np.sqrt(a_s) / (1.0 - a_t)
            c2 = (1.0 - a_s) * np.sqrt(1.0 - beta) / (1.0 - a_t)
            var = beta * (1.0 - a_s) / (1.0 - a_t) if variance_type == "fixed_small" else beta
            var = var if target > 0 else 0.0
            gain = denoiser_gain(a_t)
            step = c1 * gain + c2 * eye
            mean = step @ mean + c1 * (MU - gain @ (np.sqrt(a_t) * MU))
            cov = step @ cov @ step.T + var * eye
            mean[KNOWN] = np.sqrt(a_s) * X_KNOWN  # known: a fresh draw of q(x_s | x_0)
            cov[KNOWN, :] = 0.0
            cov[:, KNOWN] = 0.0
            cov[np.ix_(KNOWN, KNOWN)] = (1.0 - a_s) * np.eye(len(KNOWN))
        else:
            ratio = abar[target] / abar[level]  # up: target is the noisier level
            mean, cov = np.sqrt(ratio) * mean, ratio * cov + (1.0 - ratio) * eye
    return mean[UNKNOWN], cov[np.ix_(UNKNOWN, UNKNOWN)]


def run_gaussian(diffusion, n, num_steps, jump_length, resample, variance_type="fixed_small",
                 seed=1):
    images = np.zeros((n, D))
    images[:, KNOWN] = X_KNOWN
    schedule = inpainting.repaint_schedule(num_steps, jump_length, resample)
    fn = gaussian_oracle(diffusion)
    sampler = samplers.AncestralSampler(variance_type)

    @tf.function
    def run(seed):
        return inpainting.repaint(fn, diffusion, tf.constant(images), MASK, seed, schedule,
                                  sampler)

    out = run(tf.constant(seed, tf.int64)).numpy()
    np.testing.assert_array_equal(out[:, KNOWN], images[:, KNOWN])
    return out[:, UNKNOWN]


# --------------------------------------------------------------------------- the walk


def test_repaint_schedule_matches_hand_written_walk():
    # K = 6, j = 2, r = 3: jump points at levels 1 and 3, each revisited twice.
    expected = [6, 5, 4, 3, 4, 5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 2, 3, 2, 1, 0]
    walk = inpainting.repaint_schedule(6, 2, 3)
    np.testing.assert_array_equal(walk, expected)
    assert inpainting.num_denoiser_calls(walk) == 6 + 2 * 2 * 2
    np.testing.assert_array_equal(inpainting.repaint_schedule(5), [5, 4, 3, 2, 1, 0])
    # j = 1: every level 1..K-1 is revisited r - 1 times; r = 1 ignores the jump length.
    np.testing.assert_array_equal(inpainting.repaint_schedule(3, 1, 2), [3, 2, 3, 2, 1, 2, 1, 0])
    np.testing.assert_array_equal(inpainting.repaint_schedule(3, 7, 1), [3, 2, 1, 0])


def test_forward_transition_composes_to_q_x_t_given_x0():
    x0, z1, z2 = np.random.default_rng(0).normal(size=(3, 5))
    abar_s, abar_t = 0.7, 0.2
    x_s = gd.forward_transition(tf.constant(x0), abar_s, 1.0, tf.constant(z1)).numpy()
    np.testing.assert_allclose(x_s, np.sqrt(abar_s) * x0 + np.sqrt(1 - abar_s) * z1)
    x_t = gd.forward_transition(tf.constant(x_s), abar_t, abar_s, tf.constant(z2)).numpy()
    ratio = abar_t / abar_s
    np.testing.assert_allclose(x_t, np.sqrt(ratio) * x_s + np.sqrt(1 - ratio) * z2)
    # q(x_t | x_s) q(x_s | x_0) = q(x_t | x_0): mean coefficient and variance.
    np.testing.assert_allclose(np.sqrt(ratio) * np.sqrt(abar_s), np.sqrt(abar_t))
    np.testing.assert_allclose(ratio * (1 - abar_s) + (1 - ratio), 1 - abar_t)


# --------------------------------------------------------------------------- Gaussian prior


@pytest.mark.parametrize("prediction_type,variance_type",
                         [("eps", "fixed_small"), ("v", "fixed_large")])
def test_gaussian_prior_matches_exact_chain_moments(prediction_type, variance_type):
    diffusion = gd.GaussianDiffusion("cosine", 1000, prediction_type, variance_type)
    # A short chain, where one level's offset in the known pixels' noise (a bug that was
    # tried) moves the mean by ~6 standard errors.
    n, num_steps, jump, resample = 40000, 6, 2, 3
    samples = run_gaussian(diffusion, n, num_steps, jump, resample, variance_type)
    mean, cov = repaint_moments(diffusion, num_steps, jump, resample, variance_type)
    stderr = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(samples.mean(axis=0) - mean), 4.0 * stderr)
    np.testing.assert_allclose(np.cov(samples.T), cov, atol=0.03)


def test_resampling_moves_the_mean_towards_the_gaussian_conditional():
    diffusion = gd.GaussianDiffusion("cosine", 1000, "eps")
    target_mean, target_cov = gaussian_conditional()
    n = 6000
    errors, exact_errors = {}, {}
    for resample in (1, 5):
        samples = run_gaussian(diffusion, n, 20, 5, resample)
        errors[resample] = np.abs(samples.mean(axis=0) - target_mean).max()
        exact_mean, _ = repaint_moments(diffusion, 20, 5, resample, "fixed_small")
        exact_errors[resample] = np.abs(exact_mean - target_mean).max()
    # Exact values for this setup: 0.777 (r = 1) and 0.599 (r = 5); MC error ~0.02.
    assert exact_errors[5] < 0.8 * exact_errors[1]
    assert errors[5] < 0.85 * errors[1]
    # ...but not the exact conditional: RePaint's known pixels are fresh draws of
    # q(x_s | x_0), not of the posterior given the unknown pixels.
    assert errors[5] > 10 * np.sqrt(target_cov.max() / n)
    # Longer chains with RePaint's recommended j = r = 10 do better (exact recursion).
    long_mean, long_cov = repaint_moments(diffusion, 100, 10, 10, "fixed_small")
    plain_mean, plain_cov = repaint_moments(diffusion, 100, 10, 1, "fixed_small")
    assert np.abs(long_mean - target_mean).max() < 0.6 * np.abs(plain_mean - target_mean).max()
    assert np.abs(long_cov - target_cov).max() < 0.5 * np.abs(plain_cov - target_cov).max()


# --------------------------------------------------------------------------- a DiffusionModel


def tiny_image_model(num_classes=3):
    from tfngd.networks import build_unet

    keras.utils.set_random_seed(0)
    denoiser = build_unet((4, 4, 1), base_channels=8, channel_mults=(1,), groups=4,
                          attention_resolutions=(), num_classes=num_classes)
    rng = np.random.default_rng(0)
    for w in denoiser.weights:
        w.assign(rng.normal(scale=0.3, size=w.shape).astype("float32"))
    return DiffusionModel(denoiser, gd.GaussianDiffusion("cosine", 100, "eps"),
                          num_classes=num_classes)


@pytest.fixture(scope="module")
def image_model():
    return tiny_image_model()


def image_problem(n=3):
    images = np.random.default_rng(1).uniform(-1, 1, size=(n, 4, 4, 1)).astype(np.float32)
    mask = np.ones((4, 4, 1), np.float32)
    mask[1:3, 1:4] = 0.0
    return images, mask


def test_inpaint_keeps_known_pixels_and_is_deterministic(image_model):
    images, mask = image_problem()
    known = np.broadcast_to(mask, images.shape) == 1
    a = inpainting.inpaint(image_model, images, mask, seed=3, num_steps=4, jump_length=2,
                           resample=2, label=[0, 1, 2], guidance_scale=2.0)
    b = inpainting.inpaint(image_model, images, mask, seed=3, num_steps=4, jump_length=2,
                           resample=2, label=[0, 1, 2], guidance_scale=2.0)
    c = inpainting.inpaint(image_model, images, mask, seed=4, num_steps=4, jump_length=2,
                           resample=2, label=[0, 1, 2], guidance_scale=2.0)
    np.testing.assert_array_equal(a[known], images[known])
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a)) and np.max(np.abs(a[~known] - c[~known])) > 1e-3
    assert np.all(np.abs(a[~known]) <= 1.0 + 1e-5)  # clipped x0 at the last step
    # Unconditional (the null label), and with a per-image mask.
    masks = np.broadcast_to(mask, images.shape).copy()
    masks[0, 0, 0, 0] = 0.0
    d = inpainting.inpaint(image_model, images, masks, seed=3, num_steps=3)
    np.testing.assert_array_equal(d[masks == 1], images[masks == 1])
    assert d[0, 0, 0, 0] != images[0, 0, 0, 0]
    # A fully known image is returned as is (same batch size: no new trace).
    np.testing.assert_array_equal(
        inpainting.inpaint(image_model, images, np.ones_like(mask), num_steps=2), images)


def test_inpaint_validation(image_model):
    images, mask = image_problem()
    bad_image = images.copy()
    bad_image[1, 0, 0, 0] = np.nan
    cases = [
        (dict(images=images[..., :3, :]), "images"),
        (dict(images=bad_image), "non-finite"),
        (dict(mask=np.ones((4, 4))), "mask"),
        (dict(mask=mask * 0.5), "binary"),
        (dict(mask=np.zeros_like(mask)), "no known pixel"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=101), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(num_steps=4, jump_length=4, resample=2), "jump_length"),
        (dict(jump_length=0), "jump_length"),
        (dict(resample=0), "resample"),
        (dict(resample=True), "resample"),
        (dict(label=[0, 1]), "label"),
        (dict(label=4), "label"),
        (dict(guidance_scale=2.0), "guidance_scale"),
        (dict(label=1, guidance_scale="2"), "guidance_scale"),
        (dict(label=1, guidance_scale=float("inf")), "guidance_scale"),
        (dict(seed=1.5), "seed"),
        (dict(sampler="dpmpp_2m"), "single-step sampler"),
    ]
    for overrides, message in cases:
        kwargs = dict(images=images, mask=mask, num_steps=4)
        kwargs.update(overrides)
        with pytest.raises(ValueError, match=message):
            inpainting.inpaint(image_model, **kwargs)


def test_label_refused_by_unconditional_model():
    model = tiny_image_model(num_classes=None)
    images, mask = image_problem(1)
    with pytest.raises(ValueError, match="label"):
        inpainting.inpaint(model, images, mask, num_steps=2, label=1)


# --------------------------------------------------------------------------- baselines


def dense_harmonic(image, known):
    """Solve the Laplace equation on the hole pixel by pixel, densely (one channel)."""
    height, width = image.shape
    holes = [(i, j) for i in range(height) for j in range(width) if not known[i, j]]
    index = {p: k for k, p in enumerate(holes)}
    matrix = np.zeros((len(holes), len(holes)))
    rhs = np.zeros(len(holes))
    for (i, j), k in index.items():
        for q in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            if 0 <= q[0] < height and 0 <= q[1] < width:
                matrix[k, k] += 1.0
                if q in index:
                    matrix[k, index[q]] -= 1.0
                else:
                    rhs[k] += image[q]
    out = image.astype(np.float64).copy()
    for (i, j), value in zip(holes, np.linalg.solve(matrix, rhs), strict=True):
        out[i, j] = value
    return out


def test_harmonic_fill_matches_dense_laplace_solve():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(3, 7, 6, 2)).astype(np.float32)
    masks = np.ones_like(images)
    masks[0, 2:5, 2:4, :] = 0.0  # interior square
    masks[1, :, :3, 0] = 0.0  # left half (touches the image border), channel 0 only
    masks[1, 4:, :, 1] = 0.0  # bottom rows, channel 1
    masks[2] = rng.uniform(size=masks[2].shape) < 0.5  # random pixels (isolated holes too)
    masks[2, 0, 0] = 1.0
    filled = inpainting.harmonic_fill(images, masks)
    for n in range(3):
        for c in range(2):
            reference = dense_harmonic(images[n, ..., c], masks[n, ..., c] == 1)
            np.testing.assert_allclose(filled[n, ..., c], reference, atol=1e-5)
    known = masks == 1
    np.testing.assert_array_equal(filled[known], images[known])
    # Maximum principle: the fill stays within the known values' range.
    assert filled.max() <= images[known].max() + 1e-6
    assert filled.min() >= images[known].min() - 1e-6


def test_harmonic_fill_reproduces_discrete_harmonic_functions():
    i, j = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    ramp = 0.1 + 0.03 * i - 0.05 * j
    quadratic = 0.01 * (i**2 - j**2) + 0.02 * i * j  # discrete Laplacian is zero too
    mask = np.ones((8, 8, 1))
    mask[2:6, 2:6] = 0.0  # the centre 4x4 square, away from the border
    for field in (ramp, quadratic + ramp):
        image = field[None, ..., None].astype(np.float32)
        np.testing.assert_allclose(inpainting.harmonic_fill(image, mask), image, atol=1e-6)
    # A constant image is reproduced whatever the hole (here: touching the border).
    left = np.ones((8, 8, 1))
    left[:, :4] = 0.0
    constant = np.full((1, 8, 8, 1), 0.4, np.float32)
    np.testing.assert_allclose(inpainting.harmonic_fill(constant, left), constant, atol=1e-6)


def test_mean_fill_and_masked_error():
    images = np.random.default_rng(2).uniform(-1, 1, size=(2, 4, 4, 2)).astype(np.float32)
    mask = np.ones((4, 4, 2))
    mask[:2, :, 0] = 0.0
    mask[:, :1, 1] = 0.0
    filled = inpainting.mean_fill(images, mask)
    for n in range(2):
        for c in range(2):
            known = mask[..., c] == 1
            np.testing.assert_allclose(filled[n, ..., c][~known], images[n, ..., c][known].mean(),
                                       rtol=1e-6)
            np.testing.assert_array_equal(filled[n, ..., c][known], images[n, ..., c][known])
    mse = inpainting.masked_mse(filled, images, mask)
    holes = np.broadcast_to(mask, images.shape) == 0
    expected = [np.mean((filled[n] - images[n])[holes[n]] ** 2) for n in range(2)]
    np.testing.assert_allclose(mse, expected, rtol=1e-6)
    np.testing.assert_allclose(inpainting.psnr(0.04), 10 * np.log10(4 / 0.04))


def test_baseline_validation():
    images = np.zeros((2, 4, 4, 1), np.float32)
    mask = np.ones((4, 4, 1))
    with pytest.raises(ValueError, match="binary"):
        inpainting.harmonic_fill(images, mask * 2)
    with pytest.raises(ValueError, match="no known pixel"):
        inpainting.mean_fill(images, np.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="mask: expected shape"):
        inpainting.mean_fill(images, np.ones((3, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"images: harmonic_fill needs images \[N, H, W, C\]"):
        inpainting.harmonic_fill(np.zeros((2, 4)), np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        inpainting.harmonic_fill(np.full((1, 4, 4, 1), np.inf), mask)
    with pytest.raises(ValueError, match="num_steps"):
        inpainting.repaint_schedule(0)
