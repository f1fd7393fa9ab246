"""Schedules and respacing against independent numpy references (paper / diffusers formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tfngd import schedules

# --------------------------------------------------------------------------- references


def ref_cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal eq. 17: abar = f(t) / f(0), beta_t = min(1 - abar_t/abar_{t-1}, .999)."""
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos((t / T + s) / (1.0 + s) * np.pi / 2.0) ** 2
    abar = f / f[0]
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def ref_linspace(T, K):
    return np.linspace(0, T - 1, K).round().astype(np.int64)


def ref_leading(T, K):
    return np.arange(K) * (T // K)


def ref_trailing(T, K):
    # diffusers: np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1, then sorted ascending.
    steps = np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1
    return np.sort(steps)


REFS = {"linspace": ref_linspace, "leading": ref_leading, "trailing": ref_trailing}

# --------------------------------------------------------------------------- linear


def test_linear_endpoints_T1000():
    betas = schedules.make_betas("linear", 1000)
    assert betas.dtype == np.float64
    assert betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(2e-2, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (2e-2 - 1e-4) / 999, rtol=1e-9)


def test_linear_betas_are_capped_below_one_for_short_chains():
    # For T <= 20 the rescaled end point 0.02 * 1000 / T reaches 1 (abar would hit 0 or go
    # negative); betas are capped at 0.999 like the cosine schedule.
    betas = schedules.make_betas("linear", 10)
    expected = np.minimum(np.linspace(1e-4 * 100, 2e-2 * 100, 10), 0.999)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert np.all(np.cumprod(1.0 - betas) > 0)


@pytest.mark.parametrize("T", [21, 50, 250, 4000])
def test_linear_rescaled_by_1000_over_T(T):
    betas = schedules.make_betas("linear", T)
    scale = 1000.0 / T
    expected = np.linspace(scale * 1e-4, scale * 2e-2, T)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[0] == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1] == pytest.approx(2e-2 * scale, rel=1e-12)
    # The total noise "budget" sum(beta) is (approximately) independent of T.
    ref_total = np.linspace(1e-4, 2e-2, 1000).sum()
    assert betas.sum() == pytest.approx(ref_total * (1000 / T) * T / 1000, rel=1e-9)


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_matches_nichol_dhariwal(T):
    betas = schedules.make_betas("cosine", T)
    expected = ref_cosine_betas(T)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, expected, rtol=1e-10, atol=1e-14)
    # The clip to 0.999 is active at the last step, and all betas are probabilities.
    assert betas[-1] == pytest.approx(0.999, abs=1e-15)
    assert np.all(betas > 0) and np.all(betas <= 0.999)


def test_cosine_abar_is_cos_squared_before_clip():
    T = 1000
    abar = np.cumprod(1.0 - schedules.make_betas("cosine", T))
    s = 0.008
    t = np.arange(1, T + 1)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(u) / f(0) for u in t])
    # Identical until the 0.999 clip kicks in near t = T.
    np.testing.assert_allclose(abar[:990], expected[:990], rtol=1e-10)


# --------------------------------------------------------------------------- zero terminal SNR


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50])
def test_zero_terminal_snr(name, T):
    plain = schedules.make_betas(name, T)
    betas = schedules.make_betas(name, T, zero_terminal_snr=True)
    abar_plain = np.cumprod(1.0 - plain)
    abar = np.cumprod(1.0 - betas)
    assert abs(abar[-1]) <= 1e-12
    assert abar[0] == pytest.approx(abar_plain[0], rel=1e-12)
    assert np.all(betas >= 0.0) and np.all(betas <= 1.0)
    assert betas[-1] == pytest.approx(1.0, abs=1e-12)
    # Lin et al. Algorithm 1, written here independently: sqrt(abar) is affinely mapped.
    r = np.sqrt(abar_plain)
    expected = (r - r[-1]) * r[0] / (r[0] - r[-1])
    np.testing.assert_allclose(np.sqrt(np.maximum(abar, 0)), expected, rtol=1e-9, atol=1e-12)
    # The result is still a decreasing abar.
    assert np.all(np.diff(abar) <= 0)


# --------------------------------------------------------------------------- validation


def test_make_betas_rejects_unknown_name_listing_choices():
    with pytest.raises(ValueError) as info:
        schedules.make_betas("quadratic", 100)
    message = str(info.value)
    assert "quadratic" in message
    for valid in ("linear", "cosine"):
        assert valid in message


@pytest.mark.parametrize("T", [0, 1, -5, 10.5, "100", None])
def test_make_betas_rejects_bad_T(T):
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.make_betas("linear", T)


def test_respaced_rejects_unknown_spacing_listing_choices():
    with pytest.raises(ValueError) as info:
        schedules.respaced_timesteps(1000, 10, "middle")
    for valid in ("linspace", "leading", "trailing"):
        assert valid in str(info.value)


# --------------------------------------------------------------------------- respacing
# Regression guard: the "linspace" cases failed on an earlier tree with
#   ValueError: stop: Tensor conversion requested dtype float32 for Tensor with dtype float64
# because respaced_timesteps called tf.linspace(0.0, <float64 stop>, k) (float32 start).


def _steps(T, K, spacing):
    out = schedules.respaced_timesteps(T, K, spacing)
    assert out.dtype == tf.int32
    return out.numpy().tolist()


EXACT_T1000_K10 = {
    "linspace": [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
    "leading": [0, 100, 200, 300, 400, 500, 600, 700, 800, 900],
    "trailing": [99, 199, 299, 399, 499, 599, 699, 799, 899, 999],
}


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_respaced_exact_lists_T1000_K10(spacing):
    assert _steps(1000, 10, spacing) == EXACT_T1000_K10[spacing]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_respaced_full_chain_is_arange(spacing):
    assert _steps(1000, 1000, spacing) == list(range(1000))


# linspace(0, 9, 3) = [0, 4.5, 9] -> round half to even -> [0, 4, 9];
# leading: arange(3) * (10 // 3); trailing: round([10, 6.67, 3.33]) - 1 = [9, 6, 2].
EXACT_T10_K3 = {"linspace": [0, 4, 9], "leading": [0, 3, 6], "trailing": [2, 6, 9]}


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_respaced_exact_lists_T10_K3(spacing):
    assert _steps(10, 3, spacing) == EXACT_T10_K3[spacing]


SWEEP = [(10, 3), (10, 1), (10, 7), (10, 10), (7, 2), (100, 7), (1000, 3), (1000, 50),
         (1000, 999), (1000, 333), (999, 10), (4000, 250), (50, 49), (37, 11), (1000, 1)]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T,K", SWEEP)
def test_respaced_matches_diffusers_formulas(T, K, spacing):
    got = np.array(_steps(T, K, spacing))
    expected = REFS[spacing](T, K)
    np.testing.assert_array_equal(got, expected)
    assert got.shape == (K,)
    assert got.min() >= 0 and got.max() <= T - 1
    assert np.all(np.diff(got) > 0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_respaced_in_tf_function_with_tensor_K(spacing):
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def f(k):
        traces.append(1)
        return schedules.respaced_timesteps(1000, k, spacing)

    for K in (10, 3, 50, 1000, 1):
        np.testing.assert_array_equal(f(tf.constant(K)).numpy(), REFS[spacing](1000, K))
    assert len(traces) == 1
