"""Post-training quantization of the sampler's denoiser with the TensorFlow Lite converter.

What is converted: the EMA denoiser ``f(x_t, t(, label))`` of a trained
:class:`~tfngd.model.DiffusionModel`, one network call with float input and float
output. The sampler's arithmetic (schedules, ``x0``/``eps`` conversions, DDIM and
ancestral steps, guidance) is not converted: it stays in float32 in
:func:`tfngd.samplers.sample`, which calls the TFLite model through
:class:`TFLiteDenoiser`. Three modes (:data:`MODES`):

* ``"float32"``: the baseline, the same graph in the TFLite format (outputs agree with
  Keras to float32 rounding).
* ``"dynamic_range"``: weights stored as int8 (per-channel scales), activations float;
  TFLite's hybrid kernels quantize activations on the fly. No calibration data.
* ``"int8"``: full-integer post-training quantization (Jacob et al. 2018, "Quantization
  and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"):
  weights int8 per channel, activations int8 per tensor with ranges calibrated on a
  representative data set, ``r = s (q - z)`` with scale ``s`` and zero point ``z``.
  Ops without an int8 kernel fall back to float (``TFLITE_BUILTINS`` next to
  ``TFLITE_BUILTINS_INT8``; :func:`op_report` lists them); the model's input and output
  stay float32, quantized and dequantized inside the model. The arguments of the
  sinusoidal time embedding (``t * w_i``, the inputs of ``SIN``/``COS``) are kept in
  float (:func:`float_nodes`): quantized to 255 steps over ``[0, T]`` they lose the
  timestep, which made the int8 output of the trained digits U-Net 57 % wrong
  (RMS over its std) instead of 11 %.

Calibration (:func:`calibration_inputs`): the representative data set must be
distributed like the inputs the network sees while sampling. A sampler calls the
denoiser at every noise level of the chain, from ``x_T ~ N(0, I)`` (pure noise) down
to ``x_1`` (almost clean data), and every activation's range depends on ``t`` (the
time embedding is added in every residual block). So the calibration inputs are
drawn from the forward process itself, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
(:meth:`~tfngd.gaussian_diffusion.GaussianDiffusion.q_sample`) with ``x_0`` training
images and ``t`` stratified over ``[0, T)`` (one draw per equal-width stratum), so
every part of the chain is represented; the marginal of ``x_t`` under ``q`` is what a
well-trained sampler produces at step ``t``. Conditional models get the images'
labels, each replaced by the null label with probability 1/2, since samplers call
the network with both (unconditional samples, classifier-free guidance). Calibrating
on clean images only, or on ``N(0, I)`` only, would set the activation ranges of
one end of the chain and clip (or waste resolution at) the other.

Conversion goes through a SavedModel: the denoiser is written with
``keras.export.ExportArchive`` (one endpoint ``[None, *data_shape]`` float32 ``x``,
``[None]`` ``t`` and int32 ``label``) and read with
``tf.lite.TFLiteConverter.from_saved_model``. With Keras 3 models,
``from_concrete_functions(..., trackable_obj=model)`` keeps the weights as resource
variables (``VAR_HANDLE``/``READ_VARIABLE`` ops), on which int8 calibration fails
(``read_variable.cc: variable != nullptr``); the SavedModel path freezes them.
GroupNormalization and attention convert to builtin ops (``MEAN``, ``RSQRT``,
``BATCH_MATMUL``, ``SOFTMAX``); no Select TF ops are needed.

Sampling (:class:`TFLiteDenoiser`, :func:`sample`): the interpreter is wrapped with
``tf.numpy_function`` as a Keras-like callable ``denoiser([x, t(, label)])``, so the
unchanged :func:`tfngd.samplers.denoiser_fn` (guidance included) and
:func:`tfngd.samplers.sample` (the graph-mode ``tf.while_loop``, its stateless noise
draws and step objects) run with it. An eager loop would have had to repeat
``samplers.sample``'s loop body (respacing, x0 clipping, noise seeding); the
``numpy_function`` keeps one sampler and makes a TFLite sample equal the Keras one up
to the denoiser's own error. The price: such a graph cannot be saved as a SavedModel
(it calls Python), which is fine, since TF Serving serves the SavedModel export
(:mod:`tfngd.export`) and TFLite targets on-device runtimes.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfngd.export import check_finite_weights
from tfngd.model import DiffusionModel
from tfngd.validation import check_integer

MODES = ("float32", "dynamic_range", "int8")
#: Input names of the converted model's signature (and of its ``serving_default`` key).
INPUT_NAMES = ("x", "t", "label")
OUTPUT_NAME = "output"
SIGNATURE_KEY = "serving_default"
METADATA_FILENAME = "tflite_export.json"
DEFAULT_CALIBRATION_EXAMPLES = 512
# Probability that a calibration label is replaced by the null label (conditional models).
NULL_LABEL_FRACTION = 0.5
# Ops that only move between the integer and the float domain.
_CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")
_PERIODIC_OPS = ("SIN", "COS")


def _check_model(model) -> DiffusionModel:
    if not isinstance(model, DiffusionModel):
        raise ValueError(f"model must be a tfngd.model.DiffusionModel (its EMA denoiser is "
                         f"converted), got {type(model).__name__}")
    return model


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def input_signature(model: DiffusionModel) -> list[tf.TensorSpec]:
    """The converted denoiser's inputs: ``x`` ``[None, *data_shape]`` float32, ``t`` ``[None]``
    (the network's time dtype) and, for a conditional model, ``label`` ``[None]`` int32."""
    denoiser = _check_model(model).ema_denoiser
    specs = [tf.TensorSpec([None, *model.data_shape], tf.float32, name=INPUT_NAMES[0]),
             tf.TensorSpec([None], denoiser.inputs[1].dtype, name=INPUT_NAMES[1])]
    if model.num_classes is not None:
        specs.append(tf.TensorSpec([None], tf.int32, name=INPUT_NAMES[2]))
    return specs


# -- calibration -------------------------------------------------------------------------------


def calibration_inputs(model: DiffusionModel, images, labels=None,
                       num_examples: int = DEFAULT_CALIBRATION_EXAMPLES,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """A representative data set for int8 calibration, drawn from ``q(x_t | x_0)``.

    ``x_0`` are ``num_examples`` of ``images`` (drawn with replacement), ``t_i`` one
    uniform draw in the ``i``-th of ``num_examples`` equal strata of ``[0, T)`` (shuffled),
    ``eps ~ N(0, I)``, and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (see the
    module docstring for why). Conditional models: the images' ``labels`` (required),
    each replaced by the null label with probability :data:`NULL_LABEL_FRACTION`.

    Returns ``{"x": float32 [N, *data_shape], "t": [N], ("label": int32 [N])}``, the
    inputs of :func:`input_signature`.
    """
    model = _check_model(model)
    num_examples = check_integer("num_examples", num_examples, 1)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 2 or tuple(images.shape[1:]) != model.data_shape or len(images) == 0:
        raise ValueError(f"images must have shape [N, {', '.join(map(str, model.data_shape))}] "
                         f"(the model's data shape) with N >= 1, got {list(images.shape)}")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"images hold {int((~np.isfinite(images)).sum())} non-finite values")
    conditional = model.num_classes is not None
    if conditional:
        if labels is None:
            raise ValueError("labels are required for a class-conditional model")
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) \
                or labels.min() < 0 or labels.max() > model.num_classes:
            raise ValueError(f"labels must be integers in [0, {model.num_classes}] of shape "
                             f"[{len(images)}], got dtype {labels.dtype} shape "
                             f"{list(labels.shape)}")
    rng = np.random.default_rng(seed)
    num_timesteps = model.diffusion.num_timesteps
    index = rng.integers(0, len(images), num_examples)
    strata = (np.arange(num_examples) + rng.uniform(size=num_examples)) / num_examples
    t = rng.permutation(np.minimum((strata * num_timesteps).astype(np.int64), num_timesteps - 1))
    noise = rng.standard_normal((num_examples, *model.data_shape)).astype(np.float32)
    time_dtype = input_signature(model)[1].dtype
    t = tf.constant(t, time_dtype)
    x_t = model.diffusion.q_sample(tf.constant(images[index]), t, tf.constant(noise))
    result = {"x": np.asarray(x_t, np.float32), "t": t.numpy()}
    if conditional:
        drop = rng.uniform(size=num_examples) < NULL_LABEL_FRACTION
        result["label"] = np.where(drop, model.null_label, labels[index]).astype(np.int32)
    return result


def check_calibration(model: DiffusionModel, calibration) -> dict[str, np.ndarray]:
    """Validate a representative data set against ``model``'s inputs (a ValueError naming
    the input otherwise) and return it as numpy arrays of the signature's dtypes."""
    specs = input_signature(model)
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be a dict with keys {[s.name for s in specs]}, "
                         f"got {type(calibration).__name__}")
    expected = {s.name for s in specs}
    if set(calibration) != expected:
        raise ValueError(f"calibration must have exactly the keys {sorted(expected)}, got "
                         f"{sorted(calibration)}")
    result, count = {}, None
    for spec in specs:
        value = np.asarray(calibration[spec.name])
        want = [d if d is not None else "N" for d in spec.shape.as_list()]
        if value.ndim != spec.shape.rank or tuple(value.shape[1:]) != tuple(spec.shape[1:]) \
                or len(value) == 0:
            raise ValueError(f"calibration[{spec.name!r}] must have shape {want} with N >= 1, "
                             f"got {list(value.shape)}")
        if count is not None and len(value) != count:
            raise ValueError(f"calibration[{spec.name!r}] has {len(value)} rows, but "
                             f"calibration['x'] has {count}")
        count = len(value)
        if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)):
            raise ValueError(f"calibration[{spec.name!r}] must be finite numbers")
        result[spec.name] = value.astype(spec.dtype.as_numpy_dtype)
    return result


def representative_dataset(calibration: dict[str, np.ndarray], batch_size: int = 1):
    """The converter's ``representative_dataset``: a generator function yielding batches of
    ``batch_size`` rows as ``{input name: array}`` (the signature's input names)."""
    count = len(calibration["x"])

    def generate():
        for start in range(0, count, batch_size):
            yield {name: value[start:start + batch_size] for name, value in calibration.items()}

    return generate


# -- conversion --------------------------------------------------------------------------------


def _write_denoiser_saved_model(model: DiffusionModel, path: str) -> None:
    denoiser = model.ema_denoiser
    specs = input_signature(model)

    def call(*inputs):
        return {OUTPUT_NAME: denoiser(list(inputs), training=False)}

    archive = keras.export.ExportArchive()
    archive.track(denoiser)
    archive.add_endpoint(SIGNATURE_KEY, call, input_signature=specs)
    archive.write_out(path, verbose=False)


def convert(model: DiffusionModel, mode: str = "int8", calibration=None,
            calibration_batch_size: int = 1) -> bytes:
    """The ``.tflite`` flatbuffer of ``model``'s EMA denoiser in ``mode`` (:data:`MODES`).

    ``mode="int8"`` needs ``calibration`` (:func:`calibration_inputs`, or a dict of the
    same form); the converter runs the float model on it in batches of
    ``calibration_batch_size`` to record every activation's range. Other modes ignore it.
    """
    return convert_modes(model, (mode,), calibration, calibration_batch_size)[mode]


def convert_modes(model: DiffusionModel, modes=("float32", "int8"), calibration=None,
                  calibration_batch_size: int = 1) -> dict[str, bytes]:
    """:func:`convert` for several modes from one SavedModel (written once): ``{mode: bytes}``."""
    model = _check_model(model)
    modes = tuple(modes) if not isinstance(modes, str) else (modes,)
    if not modes:
        raise ValueError("modes must name at least one of " + ", ".join(MODES))
    for mode in modes:
        _check_mode(mode)
    if "int8" in modes:
        if calibration is None:
            raise ValueError("mode='int8' needs calibration data (see calibration_inputs)")
        calibration = check_calibration(model, calibration)
    if isinstance(calibration_batch_size, bool) or not isinstance(
            calibration_batch_size, (int, np.integer)) or calibration_batch_size < 1:
        raise ValueError(f"calibration_batch_size must be an integer >= 1, got "
                         f"{calibration_batch_size!r}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tfngd-tflite-") as staging:
        _write_denoiser_saved_model(model, staging)
        for mode in sorted(modes, key=MODES.index):  # float32 first: int8 reads its graph
            converter = tf.lite.TFLiteConverter.from_saved_model(staging, [SIGNATURE_KEY])
            if mode == "float32":
                results[mode] = bytes(converter.convert())
                continue
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if mode == "dynamic_range":
                results[mode] = bytes(converter.convert())
                continue
            float_content = results.get("float32") or bytes(
                tf.lite.TFLiteConverter.from_saved_model(staging, [SIGNATURE_KEY]).convert())
            results[mode] = _quantize_int8(converter, calibration, calibration_batch_size,
                                           float_nodes(float_content),
                                           _input_order(float_content))
    return {mode: results[mode] for mode in modes}


def _read_flatbuffer(model_content: bytes):
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(model_content))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def op_name(op):
        code = flat.operatorCodes[op.opcodeIndex]
        name = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "UNKNOWN")
        return code.customCode.decode() if name == "CUSTOM" and code.customCode else name

    return flat, schema, op_name


def float_nodes(float_model_content: bytes) -> list[str]:
    """The nodes (output tensor names) that int8 conversion must keep in float: the
    arguments of periodic functions (``SIN``, ``COS``), i.e. ``t * w_i`` of the sinusoidal
    time embedding. Per-tensor int8 has ``255`` steps over the argument's range
    (``[0, T max_i w_i]``: about 4 per step for ``T = 1000``), more than the period
    ``2 pi``, so a quantized argument would make the embedding (and every block that
    adds it) noise; computed in float it costs two float ops per call."""
    flat, _, op_name = _read_flatbuffer(float_model_content)
    names = []
    for graph in flat.subgraphs:
        producers = {out: op for op in graph.operators for out in op.outputs}
        for op in graph.operators:
            if op_name(op) not in _PERIODIC_OPS:
                continue
            for index in op.inputs:
                name = graph.tensors[index].name.decode()
                if index in producers and name not in names:
                    names.append(name)
    return names


def _input_order(model_content: bytes) -> list[str]:
    """The signature input names in the order of the interpreter's input tensors."""
    interpreter = tf.lite.Interpreter(model_content=model_content)
    runner_inputs = interpreter.get_signature_runner(SIGNATURE_KEY).get_input_details()
    by_index = {detail["index"]: name for name, detail in runner_inputs.items()}
    return [by_index[detail["index"]] for detail in interpreter.get_input_details()]


def _quantize_int8(converter, calibration, batch_size: int, denylisted_nodes,
                   input_order) -> bytes:
    """Full-integer quantization with float fallback and float input/output, keeping
    ``denylisted_nodes`` in float (through the converter's selective quantization,
    ``tf.lite.experimental.QuantizationDebugger``)."""
    converter.representative_dataset = representative_dataset(calibration, batch_size)
    # int8 kernels where they exist, float kernels for the rest; float in/out.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    if not denylisted_nodes:
        return bytes(converter.convert())
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=list(denylisted_nodes))
    # The debugger needs a data set in the interpreter's input order; a few rows suffice
    # (calibration itself runs on the converter's representative_dataset).
    def few_rows():
        for row in range(min(2, len(calibration["x"]))):
            yield [calibration[name][row:row + 1] for name in input_order]

    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=few_rows, debug_options=options)
    return bytes(debugger.get_nondebug_quantized_model())


def op_report(model_content: bytes) -> dict:
    """What a ``.tflite`` model computes in which type, read from its flatbuffer.

    Returns ``{"ops": {op: count}, "float_ops": {op: count}, "tensor_types":
    {type: count}, "constant_bytes": {type: bytes}}`` where ``float_ops`` are the
    operators (other than QUANTIZE/DEQUANTIZE) that produce float32 tensors, i.e. run
    a float kernel, and ``constant_bytes`` the stored weights and constants by type.
    """
    flat, schema, op_name = _read_flatbuffer(model_content)
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    ops, float_ops = collections.Counter(), collections.Counter()
    tensor_types, constant_bytes = collections.Counter(), collections.Counter()
    for graph in flat.subgraphs:
        for tensor in graph.tensors:
            kind = type_names.get(tensor.type, str(tensor.type))
            tensor_types[kind] += 1
            data = flat.buffers[tensor.buffer].data
            if data is not None and len(data):
                constant_bytes[kind] += len(data)
        for op in graph.operators:
            name = op_name(op)
            ops[name] += 1
            outputs = [graph.tensors[i] for i in op.outputs if i >= 0]
            if name not in _CONVERSION_OPS and any(
                    tensor.type == schema.TensorType.FLOAT32 for tensor in outputs):
                float_ops[name] += 1
    return {"ops": dict(ops.most_common()), "float_ops": dict(float_ops.most_common()),
            "tensor_types": dict(tensor_types.most_common()),
            "constant_bytes": dict(constant_bytes.most_common())}


def tflite_filename(mode: str) -> str:
    return f"denoiser_{_check_mode(mode)}.tflite"


def _atomic_write(path: str, content: bytes) -> None:
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def export_tflite(model: DiffusionModel, output_dir: str, modes=("float32", "int8"),
                  calibration=None, calibration_description: str | None = None) -> dict:
    """Write ``output_dir/denoiser_<mode>.tflite`` for each of ``modes`` and
    ``output_dir/tflite_export.json`` (data shape, diffusion, classes, inputs, each
    file's size and :func:`op_report`); return ``{mode: path}``.

    Conventionally ``output_dir`` is ``saved_models/<name>/tflite`` beside the SavedModel
    versions (TF Serving only loads numeric version directories). Every file is written
    to a temporary name and renamed. ``calibration`` as in :func:`convert`.
    """
    check_finite_weights(_check_model(model).ema_denoiser)
    converted = convert_modes(model, modes, calibration)
    os.makedirs(output_dir, exist_ok=True)
    paths, files = {}, {}
    for mode, content in converted.items():
        path = os.path.join(output_dir, tflite_filename(mode))
        _atomic_write(path, content)
        paths[mode] = path
        files[mode] = {"file": os.path.basename(path), "bytes": len(content),
                       **op_report(content)}
    metadata = {
        "data_shape": list(model.data_shape),
        "num_classes": model.num_classes,
        "null_label": model.null_label,
        "diffusion": model.diffusion.get_config(),
        "inputs": {s.name: s.dtype.name for s in input_signature(model)},
        "output": OUTPUT_NAME,
        "signature_key": SIGNATURE_KEY,
        "calibration": calibration_description,
        "files": files,
    }
    _atomic_write(os.path.join(output_dir, METADATA_FILENAME),
                  json.dumps(metadata, indent=2).encode())
    return paths


# -- inference ---------------------------------------------------------------------------------


class TFLiteDenoiser:
    """A ``.tflite`` denoiser behind the Keras call convention ``denoiser([x, t(, label)])``.

    Inside a ``tf.function`` (the samplers) the interpreter runs through
    ``tf.numpy_function``; each call resizes the input tensors to the batch it gets
    (a no-op when the batch is unchanged). Use it with
    :func:`tfngd.samplers.denoiser_fn`, or sample with :func:`sample`.

    Args:
      model: a path to a ``.tflite`` file, or its bytes.
      num_threads: interpreter threads (None: TFLite's default).
    """

    def __init__(self, model, num_threads: int | None = None):
        if isinstance(model, (str, os.PathLike)):
            if not os.path.isfile(model):
                raise FileNotFoundError(f"no .tflite file at {model}")
            with open(model, "rb") as f:
                model = f.read()
        if not isinstance(model, (bytes, bytearray)):
            raise ValueError(f"model must be a .tflite path or its bytes, got "
                             f"{type(model).__name__}")
        if num_threads is not None and (isinstance(num_threads, bool)
                                        or not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
        self.model_content = bytes(model)
        self.interpreter = tf.lite.Interpreter(model_content=self.model_content,
                                               num_threads=num_threads)
        signatures = self.interpreter.get_signature_list()
        if SIGNATURE_KEY not in signatures:
            raise ValueError(f"the model has no {SIGNATURE_KEY!r} signature (signatures: "
                             f"{sorted(signatures)}); write it with tfngd.quantization.convert")
        self.input_names = tuple(n for n in INPUT_NAMES
                                 if n in signatures[SIGNATURE_KEY]["inputs"])
        self._runner = self.interpreter.get_signature_runner(SIGNATURE_KEY)
        details = self._runner.get_input_details()
        self.input_dtypes = {name: details[name]["dtype"] for name in self.input_names}
        self.data_shape = tuple(int(d) for d in details["x"]["shape_signature"][1:])
        output = self._runner.get_output_details()[OUTPUT_NAME]["shape_signature"]
        self.output_shape = tuple(int(d) for d in output[1:])

    @property
    def conditional(self) -> bool:
        return "label" in self.input_names

    def predict(self, *inputs) -> np.ndarray:
        """One interpreter call on numpy inputs ``x, t(, label)``."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected inputs {list(self.input_names)}, got {len(inputs)}")
        feeds = {name: np.ascontiguousarray(value, dtype=self.input_dtypes[name])
                 for name, value in zip(self.input_names, inputs, strict=True)}
        return self._runner(**feeds)[OUTPUT_NAME]

    def __call__(self, inputs, training=False):
        del training
        inputs = [tf.convert_to_tensor(v) for v in inputs]
        output = tf.numpy_function(self.predict, inputs, tf.float32, stateful=True)
        return tf.ensure_shape(output, [None, *self.output_shape])


def sample(denoiser, model: DiffusionModel, num_samples: int, seed: int = 0,
           num_steps: int | None = None, sampler: str = "ddim", eta: float = 0.0,
           spacing: str = "trailing", clip_x0: bool = True, label=None,
           guidance_scale=None) -> tf.Tensor:
    """:meth:`DiffusionModel.sample` with ``denoiser`` (e.g. a :class:`TFLiteDenoiser`) in
    place of the EMA network: the same :func:`tfngd.samplers.sample` graph, seeds and
    defaults, so a float32 TFLite model gives the Keras samples to float rounding."""
    return _check_model(model).sample(num_samples, seed, num_steps, sampler, eta, spacing,
                                      clip_x0, label, guidance_scale, denoiser=denoiser)
