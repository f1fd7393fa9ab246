"""Natural-gradient optimizers: K-FAC as a Keras optimizer (see docs/kfac.md).

* :mod:`~tfngd.optimizers.curvature_blocks`: the Fisher block of each layer kind;
* :mod:`~tfngd.optimizers.capture`: which layers are registered, and the
  forward-pass capture of their inputs and pre-activations;
* :mod:`~tfngd.optimizers.kfac`: the ``KFAC`` optimizer (statistics, damping,
  inverses, update rule);
* :mod:`~tfngd.optimizers.sample_space`: ``SampleSpaceNGD``, natural gradient solved in
  the space of samples (dual Gauss-Newton, empirical Fisher, and the particle-based
  ``stein`` and kernel-based ``wasserstein_kernel`` metrics; docs/ngd-variants.md);
* :mod:`~tfngd.optimizers.training`: ``gradients_and_curvature`` (the K-FAC
  train-step sequence) and ``NaturalGradientModel``, whose ``train_step``
  drives the curvature updates in ``model.fit``;
* :mod:`~tfngd.optimizers.diagnostics`: K-FAC's curvature along the gradient
  against the exact Gauss-Newton's, per block (is the approximation sane here?).
"""

from tfngd.optimizers import diagnostics
from tfngd.optimizers.capture import LayerCall, capture_layer_calls, find_registrable_layers
from tfngd.optimizers.curvature_blocks import Conv2DBlock, DenseBlock, GroupNormBlock
from tfngd.optimizers.kfac import KFAC
from tfngd.optimizers.sample_space import SampleSpaceNGD
from tfngd.optimizers.training import (
    ForwardPass,
    NaturalGradientModel,
    gradients_and_curvature,
    kfac_of,
    sample_space_of,
    uses_curvature,
)

__all__ = [
    "KFAC",
    "Conv2DBlock",
    "DenseBlock",
    "ForwardPass",
    "GroupNormBlock",
    "LayerCall",
    "NaturalGradientModel",
    "SampleSpaceNGD",
    "capture_layer_calls",
    "diagnostics",
    "find_registrable_layers",
    "gradients_and_curvature",
    "kfac_of",
    "sample_space_of",
    "uses_curvature",
]
