"""``tf.linalg.eigh`` and Cholesky under XLA against the regular (LAPACK) kernels, on a
Kronecker factor of the size of a 3x3 convolution with 16 input channels (docs/kfac.md
records the same comparison up to n = 650)."""

import numpy as np
import pytest
import tensorflow as tf

from tfngd.optimizers.curvature_blocks import damped_cholesky_inverse, symmetric_eigh


def conv_like_factor(size=145, seed=0):
    """A rank-deficient second moment with a decaying spectrum, like a patch factor."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(size // 2, size)) * np.logspace(0, -3, size)
    return tf.constant(rows.T @ rows / rows.shape[0], tf.float32)


def damped_solve_with_eigh(factor, damping, rhs):
    values, vectors, ok, fell_back = symmetric_eigh(factor)
    solution = vectors @ ((tf.transpose(vectors) @ rhs) / (values[:, None] + damping))
    return solution, ok, fell_back


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_xla_decompositions_agree_with_lapack(method):
    factor = conv_like_factor()
    damping = 1e-3 * float(tf.reduce_max(tf.linalg.diag_part(factor)))
    rhs = tf.constant(np.random.default_rng(1).normal(size=(factor.shape[0], 3)), tf.float32)
    if method == "eigh":
        def solve(factor, rhs):
            return damped_solve_with_eigh(factor, damping, rhs)
    else:
        def solve(factor, rhs):
            inverse, ok = damped_cholesky_inverse(factor, damping)
            return inverse @ rhs, ok, tf.constant(False)

    reference = np.linalg.solve(factor.numpy().astype(np.float64)
                                + damping * np.eye(factor.shape[0]), rhs.numpy())
    errors = {}
    for jit in (False, True):
        solution, ok, fell_back = tf.function(solve, jit_compile=jit)(factor, rhs)
        assert bool(ok) and not bool(fell_back)
        errors[jit] = np.abs(solution.numpy() - reference).max() / np.abs(reference).max()
    # float32 with a damped condition number of ~1e3: both ~1e-4..1e-3 from float64.
    assert errors[False] < 5e-3 and errors[True] < 5e-3, errors
    assert errors[True] < 3 * errors[False] + 1e-4, errors
