"""Registration and capture: which layers get a curvature block, and what they saw.

* :func:`find_registrable_layers` walks a Keras model, nested custom layers
  included (``model._flatten_layers()``), and returns the trainable layers a
  curvature block supports: exact ``Dense``, ``Conv2D`` and
  ``GroupNormalization`` instances (a subclass may override ``call``, so it
  is not registered).
* :func:`capture_layer_calls` is a context manager that, for one forward
  pass, replaces each registered layer *instance*'s ``call`` with a version
  that computes the pre-activation explicitly, records
  ``LayerCall(layer, inputs, outputs)`` and returns exactly what the original
  ``call`` returns (Keras routes functional and subclassed models through
  ``layer.__call__`` -> ``self.call``, so the instance attribute wins). The
  recorded ``outputs`` is the tensor the per-example output gradients are
  taken with respect to: ``x @ kernel + bias`` for Dense, the convolution
  plus bias for Conv2D (both before the activation), the normalised output
  for GroupNormalization. ``tape.gradient(model_outputs, [c.outputs ...],
  output_gradients=v)`` then gives ``g``. The original ``call`` is restored on
  exit, exceptions included; the patching happens while tracing, so it works
  inside ``tf.function`` (``model.fit``) and XLA.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import keras
from keras import ops

from tfngd.optimizers.curvature_blocks import block_type_for


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a registered layer during a captured forward pass."""

    layer: keras.layers.Layer
    inputs: object
    outputs: object  # the pre-activation (Dense, Conv2D) or normalised output (GroupNorm)


def _layers_of(model_or_layers) -> list:
    if isinstance(model_or_layers, keras.layers.Layer):
        return list(model_or_layers._flatten_layers(include_self=True, recursive=True))
    layers = []
    for item in model_or_layers:
        layers.extend(_layers_of(item))
    return layers


def find_registrable_layers(model_or_layers, skip_unsupported: bool = False) -> list:
    """The trainable layers of ``model_or_layers`` that a curvature block models.

    Args:
      model_or_layers: a Keras model or layer, or a sequence of them (nested
        layers are searched recursively).
      skip_unsupported: a supported layer type in a configuration no block
        handles (e.g. a grouped or channels-first Conv2D) raises a
        ``ValueError`` by default; with True it is left out (its variables then
        get the optimizer's first-order fallback).

    Returns:
      The layers, in model order, without duplicates.
    """
    found, unsupported, seen = [], [], set()
    for layer in _layers_of(model_or_layers):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        block_type = block_type_for(layer)
        if block_type is None or not layer.trainable or not layer.trainable_weights:
            continue
        reason = block_type.unsupported_reason(layer)
        if reason is None:
            found.append(layer)
        elif not skip_unsupported:
            unsupported.append(f"{layer.path}: {reason}")
    if unsupported:
        raise ValueError(
            "These layers have a curvature block type but an unsupported configuration:\n  "
            + "\n  ".join(unsupported)
            + "\nPass skip_unsupported=True to train them with the first-order fallback instead."
        )
    return found


def _dense_call(layer, record):
    def call(inputs, training=None):
        preactivation = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            preactivation = ops.add(preactivation, layer.bias)
        record(LayerCall(layer, inputs, preactivation))
        if layer.activation is not None:
            return layer.activation(preactivation)
        return preactivation

    return call


def _conv_call(layer, record):
    # The same operations as keras' BaseConv.call (channels_last only).
    def call(inputs):
        preactivation = layer.convolution_op(inputs, layer.kernel)
        if layer.use_bias:
            bias = ops.reshape(layer.bias, (1,) * (layer.rank + 1) + (layer.filters,))
            preactivation = ops.add(preactivation, bias)
        record(LayerCall(layer, inputs, preactivation))
        if layer.activation is not None:
            return layer.activation(preactivation)
        return preactivation

    return call


def _normalization_call(layer, record, original_call):
    def call(inputs, *args, **kwargs):
        outputs = original_call(inputs, *args, **kwargs)
        record(LayerCall(layer, inputs, outputs))
        return outputs

    return call


def _capturing_call(layer, record, original_call):
    if isinstance(layer, keras.layers.Dense):
        return _dense_call(layer, record)
    if isinstance(layer, keras.layers.Conv2D):
        return _conv_call(layer, record)
    if isinstance(layer, keras.layers.GroupNormalization):
        return _normalization_call(layer, record, original_call)
    raise TypeError(f"no capturing call for {type(layer).__name__}")


_MISSING = object()


@contextlib.contextmanager
def capture_layer_calls(layers: Sequence) -> Iterator[list[LayerCall]]:
    """Record every call of ``layers`` made inside the ``with`` block.

    Yields the list the :class:`LayerCall` records are appended to, in call
    order. Nested captures of the same layer are refused.
    """
    calls: list[LayerCall] = []
    saved = []
    try:
        for layer in layers:
            if getattr(layer, "_kfac_capturing", False):
                raise RuntimeError(f"layer '{layer.path}' is already being captured")
            saved.append((layer, layer.__dict__.get("call", _MISSING)))
            object.__setattr__(layer, "_kfac_capturing", True)
            object.__setattr__(layer, "call", _capturing_call(layer, calls.append, layer.call))
        yield calls
    finally:
        for layer, previous in reversed(saved):
            if previous is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)
            object.__delattr__(layer, "_kfac_capturing")
