"""EKFAC (K-FAC with eigenvalue correction) against the exact per-example Fisher.

EKFAC keeps K-FAC's eigenbasis ``Q = Q_A kron Q_G`` and replaces the Kronecker
eigenvalues by the diagonal of the Fisher in that basis. The reference is the
exact Fisher of the Keras MSE built from per-example Jacobians (numpy):
``s = diag(Q^T F Q)``, the best diagonal in that basis in Frobenius norm.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_kfac_blocks import curvature_step, dense_called_twice, exact_fisher_of_mse

from tfngd.config import TrainConfig, build_optimizer
from tfngd.optimizers import KFAC
from tfngd.optimizers.curvature_blocks import validate_modes

EKFAC = dict(damping_mode="eigen", inverse_method="eigh", eigenvalue_correction=True)


def _batch_scale(block) -> np.ndarray:
    """The last batch's ``s``: the running sum less the Kronecker eigenvalues it started
    from at the refresh (one batch folded in since)."""
    assert block.kfe_count.numpy() == 2.0
    prior = block.positions.numpy() * np.outer(block.a_eigenvalues.numpy(),
                                               block.g_eigenvalues.numpy())
    return block.kfe_sum.numpy() - prior


def _basis(block) -> np.ndarray:
    return np.kron(block.a_eigenvectors.numpy(), block.g_eigenvectors.numpy())


@pytest.fixture
def registered(monkeypatch) -> list:
    """Every KFAC registered during the test (dense_called_twice builds its own)."""
    optimizers = []
    original = KFAC.register

    def register(self, model_or_layers):
        optimizers.append(self)
        return original(self, model_or_layers)

    monkeypatch.setattr(KFAC, "register", register)
    return optimizers


def _second_batch(model, kfac, x):
    """Step 1 (in dense_called_twice) collected statistics; this refresh sets the eigenbasis
    from them and a second statistics step folds the same batch in that basis."""
    kfac.apply([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    curvature_step(model, kfac, x, apply=False)


@pytest.mark.parametrize("combine", [lambda a, b: a - 0.5 * b,
                                     lambda a, b: keras.ops.stack([a, b], axis=1)],
                         ids=["differenced", "stacked-outputs"])
def test_the_corrected_eigenvalues_are_the_exact_fishers_diagonal_in_the_eigenbasis(
        combine, registered):
    model, layer, block, x = dense_called_twice(combine, **EKFAC)
    _second_batch(model, registered[-1], x)
    basis = _basis(block)
    fisher = exact_fisher_of_mse(model, layer, x)
    expected = np.diag(basis.T @ fisher @ basis).reshape(block.input_dim, block.output_dim)
    np.testing.assert_allclose(_batch_scale(block), expected, rtol=1e-4, atol=1e-8)


def test_without_weight_sharing_and_exact_probes_ekfac_equals_kfac():
    """One call of a linear layer with the exact Fisher of an MSE: F = A kron G exactly, so
    the Fisher's diagonal in the eigenbasis is lambda_A lambda_G."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 3)).astype("float32")
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kfac = KFAC(learning_rate=1.0, damping=1e-8, fisher="exact", statistics_decay=0.0,
                momentum=0.0, kl_clip=None, inverse_every=1, **EKFAC).register(model)
    curvature_step(model, kfac, x)
    curvature_step(model, kfac, x, apply=False)
    (block,) = kfac.blocks
    kronecker = np.outer(block.a_eigenvalues.numpy(), block.g_eigenvalues.numpy())
    np.testing.assert_allclose(_batch_scale(block), kronecker, rtol=1e-4, atol=1e-7)


def test_the_update_divides_the_rotated_gradient_by_the_corrected_eigenvalues(registered):
    model, layer, block, x = dense_called_twice(lambda a, b: a - 0.5 * b, **EKFAC)
    _second_batch(model, registered[-1], x)
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=v.shape).astype("float32") for v in block.variables]
    damping = 0.3
    update = block.precondition([tf.constant(g) for g in grads], damping, 1.0)
    matrix = np.concatenate([grads[0], grads[1][None]], axis=0).reshape(-1)
    basis = _basis(block)
    scale = block.eigenbasis_scale().numpy().reshape(-1)
    expected = basis @ ((basis.T @ matrix) / (scale + damping))
    got = np.concatenate([update[0].numpy(), update[1].numpy()[None]], axis=0).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # Not K-FAC's update: the differenced calls make the Kronecker eigenvalues wrong.
    kronecker = block.positions.numpy() * np.outer(block.a_eigenvalues.numpy(),
                                                   block.g_eigenvalues.numpy()).reshape(-1)
    assert not np.allclose(scale, kronecker, rtol=0.1)


def test_ekfac_is_an_optimizer_choice_and_checks_its_modes():
    config = TrainConfig(optimizer="ekfac", inverse_method="cholesky").validate()
    optimizer = build_optimizer(config)
    assert isinstance(optimizer, KFAC) and optimizer.eigenvalue_correction
    assert (optimizer.damping_mode, optimizer.inverse_method) == ("eigen", "eigh")
    assert KFAC.from_config(optimizer.get_config()).eigenvalue_correction
    with pytest.raises(ValueError, match="eigenvalue_correction.*damping_mode='eigen'"):
        validate_modes("pi", "eigh", eigenvalue_correction=True)
    with pytest.raises(ValueError, match="eigenvalue_correction"):
        KFAC(damping_mode="pi", inverse_method="eigh", eigenvalue_correction=True)
