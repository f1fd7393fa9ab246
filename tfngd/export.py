"""Export a trained sampler as a SavedModel that TensorFlow Serving can load.

:func:`export_sampler` writes ``export_dir`` (conventionally
``saved_models/<name>/<version>/``) with one signature, ``serving_default``::

    inputs   num_samples    int32 scalar   1 <= num_samples <= max_samples
             seed           int64 scalar   any value
             num_steps      int32 scalar   1 <= num_steps <= max_steps
             label          int32 scalar   0 <= label < num_classes   (conditional models)
             guidance_scale float32 scalar finite, >= 0              (conditional models)
    outputs  samples        uint8 [n, H, W, C] for images, float32 [n, D] for vector data

With ``decoder`` (latent diffusion, :mod:`tfngd.latent`) the graph also decodes the
sampled latents, ``samples = decoder(z_0)``: uint8 images of the decoder's output shape.

The whole chain (``tfngd.samplers.sample``: a ``tf.while_loop`` over the EMA
denoiser) is one graph with no Python callbacks, written with
``keras.export.ExportArchive`` so that both ``tf.saved_model.load`` and the
session-based loader of TF Serving and ``saved_model_cli run`` accept it.
A ``learned_range`` model's ancestral (``ddpm``) sampler draws with the learned
variance; DDIM and DPM-Solver++ (``dpmpp_2m``) use its prediction channels only.

Requests are checked inside the graph before anything is allocated: a bad
one fails with ``InvalidArgumentError`` (HTTP 400 from TF Serving) whose
message names the input and its allowed range, e.g.
``num_samples must be in [1, 64]``.

The export is written to a hidden sibling directory and renamed into place,
so a server watching ``saved_models/<name>/`` never sees a half-written
version. ``assets.extra/tfngd_export.json`` records the data shape, schedule,
sampler and limits (read it with :func:`read_export_metadata`); a decoding export
also records ``"decoder": {"name", "latent_shape", "image_shape"}``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfngd import samplers, schedules
from tfngd.model import DiffusionModel
from tfngd.validation import check_integer

SIGNATURE_NAME = "serving_default"
OUTPUT_KEY = "samples"
METADATA_DIR = "assets.extra"
METADATA_FILENAME = "tfngd_export.json"
OUTPUTS = ("auto", "uint8", "float32")
FORMAT_VERSION = 1


def _check(condition, message: str, value) -> tf.Operation:
    """An in-graph assertion whose failure reads ``<message>, got <value>``."""
    return tf.debugging.Assert(condition, [f"{message}, got", value])


def _validated(num_samples, num_steps, label, guidance_scale, *, max_samples: int,
               max_steps: int, num_classes: int | None):
    """Return the inputs behind control dependencies on their range checks."""
    checks = [
        _check(tf.logical_and(num_samples >= 1, num_samples <= max_samples),
               f"num_samples must be in [1, {max_samples}]", num_samples),
        _check(tf.logical_and(num_steps >= 1, num_steps <= max_steps),
               f"num_steps must be in [1, {max_steps}]", num_steps),
    ]
    if num_classes is not None:
        checks += [
            _check(tf.logical_and(label >= 0, label <= num_classes - 1),
                   f"label must be in [0, {num_classes - 1}]", label),
            _check(tf.logical_and(tf.math.is_finite(guidance_scale), guidance_scale >= 0.0),
                   "guidance_scale must be finite and >= 0", guidance_scale),
        ]
    with tf.control_dependencies(checks):
        num_samples = tf.identity(num_samples)
        num_steps = tf.identity(num_steps)
        if num_classes is not None:
            label = tf.identity(label)
            guidance_scale = tf.identity(guidance_scale)
    return num_samples, num_steps, label, guidance_scale


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    """Map [-1, 1] to uint8: ``round((x + 1) * 127.5)`` clipped to 0..255."""
    return tf.cast(tf.clip_by_value(tf.round((x + 1.0) * 127.5), 0.0, 255.0), tf.uint8)


def _guided_or_conditional(denoiser, labels, guidance_scale, null_label: int,
                           learned_variance: bool = False):
    """Classifier-free guidance, skipping the unconditional pass when the scale is exactly 1.

    With ``learned_variance`` only the prediction channels are guided
    (:func:`tfngd.samplers.denoiser_fn`).
    """
    conditional = samplers.denoiser_fn(denoiser, labels)
    guided = samplers.denoiser_fn(denoiser, labels, guidance_scale, null_label,
                                  learned_variance=learned_variance)

    def fn(x, t):
        return tf.cond(tf.equal(guidance_scale, 1.0), lambda: conditional(x, t),
                       lambda: guided(x, t))

    return fn


def _resolve_output(output: str, is_image: bool) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"Unknown output {output!r}; valid outputs: {', '.join(OUTPUTS)}")
    if output == "auto":
        return "uint8" if is_image else "float32"
    if output == "uint8" and not is_image:
        raise ValueError("output='uint8' needs an image model (data in [-1, 1], shape [H, W, C])")
    return output


def check_finite_weights(network, what: str = "the EMA weights") -> None:
    """ValueError naming every weight of ``network`` that holds a NaN or an infinity."""
    bad = {}
    for weight in network.weights:
        count = int(np.size(weight) - np.isfinite(tf.convert_to_tensor(weight).numpy()).sum())
        if count:
            bad[weight.path] = count
    if bad:
        raise ValueError(
            f"{what} hold {sum(bad.values())} non-finite value(s) (NaN or inf), so "
            "the sampler would serve NaN; not exported. Weights: "
            + ", ".join(f"{path} ({count})" for path, count in bad.items()))


def _decoded_shape(decoder, data_shape) -> list[int]:
    """The decoder's image shape; ``ValueError`` naming ``decoder`` when it does not fit."""
    from tfngd.latent import check_decoder

    return list(check_decoder(decoder, data_shape, name="decoder"))


def build_serving_function(model: DiffusionModel, *, sampler: str = "ddim", eta: float = 0.0,
                           spacing: str | None = None, clip_x0: bool = True,
                           max_samples: int = 64, max_steps: int | None = None,
                           output: str = "auto", decoder: keras.Model | None = None):
    """The serving function and its input signature (a list of named scalar ``TensorSpec``).

    Arguments as in :func:`export_sampler`. The function takes the inputs
    positionally in signature order and returns ``{"samples": ...}``.
    """
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; valid samplers: "
                         f"{', '.join(samplers.SAMPLERS)}")
    spacing = model.default_spacing if spacing is None else spacing
    if spacing not in schedules.SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; valid spacings: "
                         f"{', '.join(schedules.SPACINGS)}")
    if not (np.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    num_timesteps = model.diffusion.num_timesteps
    max_samples = check_integer("max_samples", max_samples, 1)
    max_steps = check_integer("max_steps", num_timesteps if max_steps is None else max_steps,
                              1, num_timesteps)
    data_shape = [int(s) for s in model.data_shape]
    image_shape = None if decoder is None else _decoded_shape(decoder, data_shape)
    output = _resolve_output(output, model.is_image_model or decoder is not None)
    step = samplers.make_sampler(sampler, model.diffusion.variance_type, eta)
    clip = bool(clip_x0) and model.is_image_model
    output_shape = data_shape if decoder is None else image_shape
    denoiser, diffusion = model.ema_denoiser, model.diffusion
    num_classes, null_label = model.num_classes, model.null_label

    def run(num_samples, seed, num_steps, label=None, guidance_scale=None):
        num_samples, num_steps, label, guidance_scale = _validated(
            num_samples, num_steps, label, guidance_scale, max_samples=max_samples,
            max_steps=max_steps, num_classes=num_classes)
        if num_classes is None:
            fn = samplers.denoiser_fn(denoiser)
        else:
            labels = tf.fill(tf.reshape(num_samples, [1]), label)
            fn = _guided_or_conditional(denoiser, labels, guidance_scale, null_label,
                                        learned_variance=diffusion.learns_variance)
        x = samplers.sample(fn, diffusion, [num_samples, *data_shape], seed, num_steps, step,
                            spacing, clip)
        x = tf.ensure_shape(x, [None, *data_shape])
        if decoder is not None:  # latents -> images in [-1, 1]
            x = tf.clip_by_value(tf.cast(decoder(x, training=False), tf.float32), -1.0, 1.0)
            x = tf.ensure_shape(x, [None, *image_shape])
        return {OUTPUT_KEY: _to_uint8(x) if output == "uint8" else tf.cast(x, tf.float32)}

    signature = [
        tf.TensorSpec([], tf.int32, name="num_samples"),
        tf.TensorSpec([], tf.int64, name="seed"),
        tf.TensorSpec([], tf.int32, name="num_steps"),
    ]
    if num_classes is None:
        def serve(num_samples, seed, num_steps):
            return run(num_samples, seed, num_steps)
    else:
        signature += [
            tf.TensorSpec([], tf.int32, name="label"),
            tf.TensorSpec([], tf.float32, name="guidance_scale"),
        ]

        def serve(num_samples, seed, num_steps, label, guidance_scale):
            return run(num_samples, seed, num_steps, label, guidance_scale)

    metadata = {
        "format_version": FORMAT_VERSION,
        "signature_name": SIGNATURE_NAME,
        "inputs": {spec.name: spec.dtype.name for spec in signature},
        "output": {"name": OUTPUT_KEY, "dtype": output, "shape": [None, *output_shape]},
        "data_shape": data_shape,
        "is_image": model.is_image_model or decoder is not None,
        "num_classes": num_classes,
        "diffusion": diffusion.get_config(),
        "sampler": {"name": sampler, "eta": float(eta), "spacing": spacing, "clip_x0": clip},
        "limits": {"max_samples": max_samples, "max_steps": max_steps,
                   "label": None if num_classes is None else [0, num_classes - 1]},
    }
    if decoder is not None:
        metadata["decoder"] = {"name": decoder.name, "latent_shape": data_shape,
                               "image_shape": image_shape}
    return serve, signature, metadata


def export_sampler(
    model: DiffusionModel,
    export_dir: str,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    spacing: str | None = None,
    clip_x0: bool = True,
    max_samples: int = 64,
    max_steps: int | None = None,
    output: str = "auto",
    overwrite: bool = False,
    decoder: keras.Model | None = None,
) -> str:
    """Write the EMA sampler of ``model`` as a SavedModel at ``export_dir``; return the path.

    Args:
      model: a :class:`DiffusionModel`; its ``ema_denoiser`` is exported.
      export_dir: the version directory, e.g. ``saved_models/<name>/<version>``.
      sampler: ``"ddim"``, ``"ddpm"`` or ``"dpmpp_2m"`` (baked into the graph), with
        DDIM's ``eta`` (0 for ``"dpmpp_2m"``).
      spacing: respacing convention of the ``num_steps`` chain; default
        the model's ``default_spacing`` (``"trailing"``; ``"leading"`` for a
        :class:`~tfngd.latent.LatentDiffusionModel`).
      clip_x0: clip predicted ``x_0`` to [-1, 1] (image models only).
      max_samples: largest ``num_samples`` a request may ask for (>= 1).
      max_steps: largest ``num_steps`` (default and upper bound: the model's T).
      output: ``"auto"`` (uint8 for images, float32 for vectors), ``"uint8"``
        or ``"float32"`` (images in [-1, 1]).
      overwrite: replace an existing non-empty ``export_dir`` (otherwise
        ``FileExistsError``).
      decoder: latent diffusion: a Keras model ``latents [n, *data_shape] -> images
        [n, H, W, C]`` (e.g. :meth:`tfngd.latent.LatentDiffusionModel.image_decoder`), run
        on the sampled latents inside the graph; its output is clipped to [-1, 1] and
        served as uint8 (``output="auto"``) or float32 images. Its input must have the
        model's data shape (``ValueError`` otherwise).

    Raises:
      ValueError: an argument is out of range or unknown (the message lists the choices),
        or the EMA weights hold NaN or infinity (nothing is written).
    """
    serve, signature, metadata = build_serving_function(
        model, sampler=sampler, eta=eta, spacing=spacing, clip_x0=clip_x0,
        max_samples=max_samples, max_steps=max_steps, output=output, decoder=decoder)
    check_finite_weights(model.ema_denoiser)
    if decoder is not None:
        check_finite_weights(decoder, "the decoder's weights")
    export_dir = os.path.abspath(os.fspath(export_dir))
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        raise FileExistsError(f"{export_dir} exists and is not empty (pass overwrite=True)")
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)

    archive = keras.export.ExportArchive()
    archive.track(model.ema_denoiser)
    if decoder is not None:
        archive.track(decoder)
    archive.add_endpoint(SIGNATURE_NAME, serve, input_signature=signature)

    # Write beside the target under a name TF Serving ignores (not a number), then rename.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.tmp-", dir=parent)
    try:
        archive.write_out(staging, verbose=False)
        metadata_dir = os.path.join(staging, METADATA_DIR)
        os.makedirs(metadata_dir, exist_ok=True)
        with open(os.path.join(metadata_dir, METADATA_FILENAME), "w") as f:
            json.dump(metadata, f, indent=2)
        if os.path.isdir(export_dir):
            if os.listdir(export_dir):
                shutil.rmtree(export_dir)
            else:
                os.rmdir(export_dir)
        os.replace(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


def read_export_metadata(export_dir: str) -> dict:
    """The ``tfngd_export.json`` written by :func:`export_sampler`."""
    with open(os.path.join(export_dir, METADATA_DIR, METADATA_FILENAME)) as f:
        return json.load(f)
