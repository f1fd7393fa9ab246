"""Inpainting with a trained diffusion prior (RePaint), and the classic baseline fills.

Given an image ``x_0`` and a binary mask ``m`` (1: the pixel is known, 0: fill it),
RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion
Probabilistic Models", CVPR; Algorithm 1 and section 4.2) runs the unconditional
reverse chain and, after every reverse step to noise level ``s``, overwrites the known
pixels with a fresh forward-noised copy of the given image at that level::

    x_s^known   ~ q(x_s | x_0)          = N(sqrt(abar_s) x_0, (1 - abar_s) I)
    x_s^unknown ~ p_theta(x_s | x_t)    (the sampler's step, e.g. ancestral DDPM)
    x_s         = m * x_s^known + (1 - m) * x_s^unknown

At the last step (``s = 0``, ``abar = 1``) the known pixels are the image itself, so
the known region of the output equals the input exactly.

Plain replacement lets the unknown pixels see the known ones only through the
denoiser's input, and the two halves disagree (the sample is not a draw from
``p(x_unknown | x_known)``). RePaint's resampling harmonises them: every ``jump_length``
steps the chain goes back up ``jump_length`` steps with the forward transition
``q(x_t | x_s)`` (:func:`tfngd.gaussian_diffusion.forward_transition`), and walks down
again, ``resample - 1`` times at each such point (``resample = 1`` is plain replacement).
The walk (:func:`repaint_schedule`) is the paper's ``get_schedule_jump``, on a respaced
chain of ``num_steps`` kept steps: it makes about ``num_steps * resample`` denoiser calls.

Levels: a chain of ``K = num_steps`` kept steps ``t_0 < ... < t_{K-1}``
(:func:`tfngd.samplers.respaced_chain`) has levels ``0..K``; level ``n >= 1`` holds
``x_{t_{n-1}}``, level 0 the data, and ``abar`` at level 0 is 1. A reverse step from
level ``n`` to ``n - 1`` is reverse step ``n - 1`` of :func:`tfngd.samplers.sample`
(:func:`tfngd.samplers.reverse_step`, so every parameterisation, clipping, learned
variance and classifier-free guidance work as in sampling); a step up from ``n`` to
``n + 1`` is ``q(x_{t_n} | x_{t_{n-1}})``.

Baselines (no model): :func:`mean_fill` (each channel's mean over the known pixels) and
:func:`harmonic_fill`, the discrete Laplace equation on the hole with the known pixels
as Dirichlet data (the classic PDE inpainting baseline; Bertalmio et al. 2000 go beyond
it), solved exactly with a sparse direct solver.

The mask convention is RePaint's: ``mask == 1`` marks the *known* pixels.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import tensorflow as tf

from tfngd import gaussian_diffusion as gd
from tfngd import samplers
from tfngd.validation import check_integer

# Indices of the stateless draws of schedule transition k: 2k + 1 (the sampler's noise,
# or the forward transition's), 2k + 2 (the known pixels' forward noise); 0 starts x_K.
_INITIAL_DRAW = 0


# -- validation ------------------------------------------------------------------------------


def _as_real_array(name: str, value) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as err:  # ragged lists, objects
        raise ValueError(f"{name}: cannot convert to an array ({err})") from err
    if array.dtype == bool:
        return array.astype(np.float64)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real numbers, got dtype {array.dtype}")
    return array


def check_images_and_mask(images, mask, data_shape=None) -> tuple[np.ndarray, np.ndarray]:
    """Validate an inpainting problem; returns ``(images [N, ...] float32, known [N, ...] bool)``.

    ``images``: ``[N, *data_shape]`` (or one image, ``data_shape``), finite.
    ``mask``: ``data_shape`` (one mask for every image) or the images' shape, with values
    0 or 1 only (1 = known) and at least one known pixel in every image. ``data_shape``
    (a model's) defaults to the images' own shape after the batch axis. Anything else is
    a ``ValueError`` naming the argument.
    """
    images = _as_real_array("images", images)
    mask = _as_real_array("mask", mask)
    if data_shape is not None:
        data_shape = tuple(int(d) for d in data_shape)
        if tuple(images.shape) == data_shape:
            images = images[None]
        if images.ndim != len(data_shape) + 1 or tuple(images.shape[1:]) != data_shape:
            raise ValueError(f"images: expected shape [N, {', '.join(map(str, data_shape))}] "
                             f"(the model's data shape) or one image, got {list(images.shape)}")
    elif images.ndim < 2:
        raise ValueError(f"images: expected a batch [N, ...], got shape {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images: empty batch (0 images)")
    bad = ~np.isfinite(images)
    if bad.any():
        first = int(np.argmax(bad.reshape(len(images), -1).any(axis=1)))
        raise ValueError(f"images: {int(bad.sum())} non-finite values (NaN or inf); the first "
                         f"in image {first}")
    one_shape = tuple(images.shape[1:])
    if tuple(mask.shape) == one_shape:
        mask = np.broadcast_to(mask, images.shape)
    elif tuple(mask.shape) != tuple(images.shape):
        raise ValueError(f"mask: expected shape {list(one_shape)} (one image) or "
                         f"{list(images.shape)} (the images'), got {list(mask.shape)}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError("mask must be binary: every value 0 (fill) or 1 (known); got values "
                         f"{np.unique(mask[(mask != 0) & (mask != 1)])[:5].tolist()}")
    known = mask == 1
    counts = known.reshape(len(known), -1).sum(axis=1)
    if np.any(counts == 0):
        raise ValueError(f"mask: image {int(np.argmax(counts == 0))} has no known pixel (mask "
                         "== 1 marks known pixels; at least one is needed)")
    return images.astype(np.float32), np.ascontiguousarray(known)


# -- the RePaint walk ------------------------------------------------------------------------


def repaint_schedule(num_steps: int, jump_length: int = 1, resample: int = 1) -> np.ndarray:
    """The levels RePaint visits on a chain of ``num_steps`` steps, from ``num_steps`` to 0.

    Walking down from level ``K = num_steps``, at every jump point ``n in {1, 1 + j,
    1 + 2j, ...}`` with ``n + j <= K`` (``j = jump_length``) the walk goes back up ``j``
    levels and down again, ``resample - 1`` times (the reference's ``get_schedule_jump``
    with ``t_T = K``; its jump points ``t`` are levels ``t + 1`` here). Consecutive
    entries differ by one level. ``resample = 1`` is the plain chain ``K, ..., 0``.

    Returns:
      int32 array of levels; it has ``K + 2 (resample - 1) j P + 1`` entries for ``P``
      jump points, and ``K + (resample - 1) j P`` of the steps go down (denoiser calls).
    """
    num_steps = check_integer("num_steps", num_steps, 1)
    jump_length = check_integer("jump_length", jump_length, 1)
    resample = check_integer("resample", resample, 1)
    if resample > 1 and jump_length > num_steps - 1:
        raise ValueError(f"jump_length must be in [1, num_steps - 1] = [1, {num_steps - 1}] "
                         f"when resample > 1 (a jump must stay on the chain), got {jump_length}")
    remaining = {n: resample - 1 for n in range(1, num_steps - jump_length + 1, jump_length)}
    level, levels = num_steps, [num_steps]
    while level > 0:
        level -= 1
        levels.append(level)
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    return np.asarray(levels, np.int32)


def num_denoiser_calls(schedule) -> int:
    """How many reverse steps (denoiser calls, each on the whole batch) a schedule makes."""
    schedule = np.asarray(schedule)
    return int(np.sum(np.diff(schedule) < 0))


def repaint(fn, diffusion: gd.GaussianDiffusion, images, mask, seed, schedule, sampler=None,
            spacing: str = "trailing", clip_x0: bool = False):
    """RePaint in graph code: fill ``mask == 0`` of ``images`` with samples from the prior.

    Args:
      fn: ``fn(x, t) -> network output`` (:func:`tfngd.samplers.denoiser_fn`: labels and
        classifier-free guidance are applied there).
      diffusion: the model's :class:`~tfngd.gaussian_diffusion.GaussianDiffusion`.
      images: ``[B, ...]`` float tensor, the given images (its dtype is the sampling dtype).
      mask: 0/1 tensor broadcastable to ``images`` (1 = known); not validated here (see
        :func:`check_images_and_mask`).
      seed: integer seed; every draw is stateless (:func:`tfngd.samplers.step_seed`), so
        the result is a deterministic function of the seed.
      schedule: the walk over levels, :func:`repaint_schedule` (int32 ``[S + 1]``, a tensor
        or array; ``schedule[0]`` is ``num_steps``).
      sampler: a :mod:`tfngd.samplers` step object; default ancestral DDPM with the
        diffusion's variance type (RePaint's sampler).
      spacing: respacing convention of the chain (:mod:`tfngd.schedules`).
      clip_x0: clip the predicted ``x_0`` to [-1, 1] at every reverse step.

    Returns:
      ``[B, ...]``: the known pixels are ``images``' own, the others are filled.
    """
    sampler = sampler or samplers.AncestralSampler(diffusion.variance_type)
    learned_sampler = samplers.check_sampler(sampler, diffusion)
    if getattr(sampler, "multistep", False):
        raise ValueError("RePaint needs a single-step sampler (ddpm or ddim): its jumps back "
                         "up the chain break a multistep sampler's history (dpmpp_2m)")
    images = tf.convert_to_tensor(images)
    dtype = images.dtype
    known = tf.broadcast_to(tf.cast(mask, dtype) > 0.5, tf.shape(images))
    schedule = tf.cast(tf.convert_to_tensor(schedule), tf.int32)
    timesteps, abar_kept, _ = samplers.respaced_chain(diffusion, schedule[0], spacing)
    abar_levels = tf.concat([tf.ones([1], tf.float64), abar_kept], axis=0)
    if learned_sampler:
        log_beta_kept, log_beta_tilde_kept = gd.respaced_log_variance_bounds(abar_kept)
    shape = tf.shape(images)

    def draw(index):
        return tf.random.stateless_normal(shape, seed=samplers.step_seed(seed, index),
                                          dtype=dtype)

    def body(k, x):
        level, target = schedule[k], schedule[k + 1]

        def down():
            i = level - 1  # reverse step i of the respaced chain: t_i -> t_{i-1}
            noise = draw(2 * k + 1) * tf.cast(target > 0, dtype)
            bounds = (log_beta_kept[i], log_beta_tilde_kept[i]) if learned_sampler else None
            unknown = samplers.reverse_step(fn, diffusion, sampler, x, timesteps[i],
                                            abar_levels[level], abar_levels[target], noise,
                                            clip_x0, bounds)
            given = gd.forward_transition(images, abar_levels[target],
                                          tf.ones([], tf.float64), draw(2 * k + 2))
            return tf.where(known, given, unknown)

        def up():
            return gd.forward_transition(x, abar_levels[target], abar_levels[level],
                                         draw(2 * k + 1))

        return k + 1, tf.cond(target < level, down, up)

    x = draw(_INITIAL_DRAW)
    _, x = tf.while_loop(
        lambda k, _: k < tf.shape(schedule)[0] - 1,
        body,
        (tf.constant(0, tf.int32), x),
        shape_invariants=(tf.TensorShape([]), x.shape),
    )
    # At level 0 the known pixels are already the images (abar = 1); make it exact.
    return tf.where(known, images, x)


# -- a trained model -------------------------------------------------------------------------

def inpaint(model, images, mask, seed: int = 0, num_steps: int = 50, jump_length: int = 1,
            resample: int = 1, label=None, guidance_scale=None, sampler: str = "ddpm",
            eta: float = 0.0, spacing: str | None = None, clip_x0: bool = True,
            use_ema: bool = True) -> np.ndarray:
    """Inpaint ``images`` with a :class:`~tfngd.model.DiffusionModel` (its EMA denoiser).

    Args:
      model: the trained model (e.g. ``tfngd.runs.load_trained_model(run_dir)[1]``).
      images: ``[N, *model.data_shape]`` (or one image), finite, in the data range
        ([-1, 1] for images).
      mask: 0/1, ``model.data_shape`` or the images' shape; 1 = known, at least one per image.
      seed: integer seed (the result is a deterministic function of it).
      num_steps: kept steps of the respaced chain, ``1 <= num_steps <= T``.
      jump_length, resample: RePaint's ``j`` and ``r`` (:func:`repaint_schedule`);
        ``resample = 1`` is plain replacement.
      label: class label(s) of a conditional model, one int or one per image; ``None``
        samples a conditional model unconditionally (its null label).
      guidance_scale: classifier-free guidance weight ``w`` (needs ``label``).
      sampler, eta: the reverse step (:func:`tfngd.samplers.make_sampler`).
      spacing: the respacing of the chain; default the model's ``default_spacing``.
      clip_x0: clip the predicted ``x_0`` to [-1, 1] (image models only, as in
        :meth:`~tfngd.model.DiffusionModel.sample`).
      use_ema: use the EMA weights (the default, as for sampling).

    Returns:
      float32 ``[N, *data_shape]``: the known pixels equal ``images``.
    """
    images, known = check_images_and_mask(images, mask, model.data_shape)
    num_steps = check_integer("num_steps", num_steps, 1, model.diffusion.num_timesteps)
    schedule = repaint_schedule(num_steps, jump_length, resample)
    check_integer("seed", seed, -(2**63), 2**63 - 1)
    label, guidance_scale = model.check_conditioning(label, guidance_scale, len(images))
    clip_x0 = bool(clip_x0) and model.is_image_model
    spacing = model.default_spacing if spacing is None else spacing
    denoiser = model.ema_denoiser if use_ema else model.denoiser
    key = ("inpaint", sampler, float(eta), spacing, clip_x0, label is None,
           guidance_scale is None, denoiser)

    def build():
        step = samplers.make_sampler(sampler, model.diffusion.variance_type, eta)

        @tf.function(reduce_retracing=True)
        def run(images, known, seed, schedule, label, guidance_scale):
            return repaint(model.network_fn(denoiser, label, guidance_scale), model.diffusion,
                           images, known, seed, schedule, step, spacing, clip_x0)

        return run

    out = model.graph_function(key, build)(
        tf.constant(images), tf.constant(known.astype(np.float32)), tf.constant(seed, tf.int64),
        tf.constant(schedule), None if label is None else tf.constant(label),
        None if guidance_scale is None else tf.constant(guidance_scale, tf.float32),
    )
    return out.numpy()


# -- baselines -------------------------------------------------------------------------------


def mean_fill(images, mask) -> np.ndarray:
    """Fill the unknown pixels with the mean of the known ones (per image and channel).

    ``images`` ``[N, H, W, C]`` (channel = last axis; for ``[N, D]`` vectors the mean is
    over the whole vector), ``mask`` as in :func:`check_images_and_mask`. A channel with
    no known pixel of its own takes the mean over all the image's known pixels.
    """
    images, known = check_images_and_mask(images, mask)
    out = images.copy()
    for n in range(len(images)):
        overall = images[n][known[n]].mean()
        if images.ndim == 4:
            for c in range(images.shape[-1]):
                values = images[n, ..., c][known[n, ..., c]]
                out[n, ..., c][~known[n, ..., c]] = values.mean() if values.size else overall
        else:
            out[n][~known[n]] = overall
    return out


def grid_laplacian(height: int, width: int) -> scipy.sparse.csr_matrix:
    """The graph Laplacian ``L = D - A`` of the 4-neighbour ``height x width`` pixel grid.

    Row-major pixel order. Pixels on the image border have fewer neighbours (no pixels
    outside the image): that is the discrete zero-normal-derivative (Neumann) condition
    at the image's edge.
    """
    index = np.arange(height * width).reshape(height, width)
    pairs = [(index[:, :-1].ravel(), index[:, 1:].ravel()),
             (index[:-1, :].ravel(), index[1:, :].ravel())]
    rows = np.concatenate([p[0] for p in pairs] + [p[1] for p in pairs])
    cols = np.concatenate([p[1] for p in pairs] + [p[0] for p in pairs])
    adjacency = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                        shape=(height * width, height * width))
    degree = scipy.sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel())
    return (degree - adjacency).tocsr()


def harmonic_fill(images, mask) -> np.ndarray:
    """Fill the unknown pixels with the harmonic interpolant of the known ones.

    Per image and channel, the filled values ``u`` solve the discrete Laplace equation
    ``(L u)_p = deg(p) u_p - sum_{q ~ p} u_q = 0`` at every unknown pixel ``p`` (4-neighbour
    grid, :func:`grid_laplacian`), with the known pixels as Dirichlet data:
    ``L_UU u_U = -L_UK x_K``. Every connected part of the hole borders a known pixel (the
    grid is connected and each image has one), so ``L_UU`` is positive definite and the
    solution unique; it is computed exactly with a sparse LU solve (``scipy.sparse``).
    Each filled value is a weighted mean of its neighbours, so the fill lies within the
    range of the known pixels (maximum principle).

    ``images`` ``[N, H, W, C]``, ``mask`` as in :func:`check_images_and_mask`.
    """
    images, known = check_images_and_mask(images, mask)
    if images.ndim != 4:
        raise ValueError(f"images: harmonic_fill needs images [N, H, W, C], got shape "
                         f"{list(images.shape)}")
    _, height, width, channels = images.shape
    laplacian = grid_laplacian(height, width)
    out = images.astype(np.float64)
    for n in range(len(images)):
        for c in range(channels):
            values = out[n, ..., c].ravel()
            unknown = ~known[n, ..., c].ravel()
            if not unknown.any():
                continue
            if unknown.all():  # this channel has no data of its own: constant, the image mean
                out[n, ..., c] = images[n][known[n]].mean()
                continue
            l_uu = laplacian[unknown][:, unknown].tocsc()
            rhs = -(laplacian[unknown][:, ~unknown] @ values[~unknown])
            values[unknown] = np.atleast_1d(scipy.sparse.linalg.spsolve(l_uu, rhs))
            out[n, ..., c] = values.reshape(height, width)
    return out.astype(np.float32)


def masked_mse(completed, images, mask) -> np.ndarray:
    """Per-image mean squared error over the unknown pixels (``mask == 0``), ``[N]`` float64.

    Images with no unknown pixel get NaN.
    """
    images, known = check_images_and_mask(images, mask)
    completed = np.asarray(completed, np.float64)
    if completed.shape != images.shape:
        raise ValueError(f"completed: expected shape {list(images.shape)}, got "
                         f"{list(completed.shape)}")
    unknown = ~known.reshape(len(images), -1)
    squared = np.square(completed - images).reshape(len(images), -1)
    counts = unknown.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (squared * unknown).sum(axis=1) / counts, np.nan)


def psnr(mse, peak_to_peak: float = 2.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / mse)``; range 2 for [-1, 1] data."""
    mse = np.asarray(mse, np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak_to_peak**2 / mse)
