"""Timestep samplers against a numpy reference of improved-diffusion's loss-second-moment rule."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfngd import timestep_sampling as ts


def ref_probabilities(history, uniform_prob=0.001):
    """improved-diffusion LossSecondMomentResampler.weights(), in numpy."""
    w = np.sqrt(np.mean(np.asarray(history, np.float64) ** 2, axis=-1))
    w = w / w.sum()
    return w * (1 - uniform_prob) + uniform_prob / len(w)


def fill(sampler, losses_per_t, batch=7):
    """Push ``losses_per_t[t]`` (a list per t) into the sampler in interleaved small batches.

    Timesteps are interleaved (round robin), each t's losses keep their order.
    """
    pairs = [(t, i, loss) for t, losses in enumerate(losses_per_t) for i, loss in enumerate(losses)]
    pairs.sort(key=lambda p: (p[1], p[0]))
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        sampler.update(tf.constant([p[0] for p in chunk], tf.int32),
                       tf.constant([p[2] for p in chunk], tf.float32))


# --------------------------------------------------------------------------- uniform


def test_uniform_sampler_range_weights_and_determinism():
    T = 17
    s = ts.UniformTimestepSampler(T)
    t, w = s.sample(20_000, seed=tf.constant([3, 4]))
    t = t.numpy()
    assert t.dtype == np.int32 and t.shape == (20_000,)
    assert t.min() == 0 and t.max() == T - 1
    assert set(np.unique(t)) == set(range(T))
    np.testing.assert_array_equal(w.numpy(), np.ones(20_000, np.float32))
    np.testing.assert_allclose(s.probabilities().numpy(), np.full(T, 1 / T), rtol=1e-6)
    counts = np.bincount(t, minlength=T)
    expected = 20_000 / T
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    t2, _ = s.sample(20_000, seed=tf.constant([3, 4]))
    np.testing.assert_array_equal(t, t2.numpy())
    t3, _ = s.sample(20_000, seed=tf.constant([3, 5]))
    assert not np.array_equal(t, t3.numpy())


# --------------------------------------------------------------------------- loss second moment


def test_uniform_before_warmup():
    T = 6
    s = ts.LossSecondMomentTimestepSampler(T)
    np.testing.assert_allclose(s.probabilities().numpy(), np.full(T, 1 / T), rtol=1e-6)
    # Every t but the last gets a full history of wildly different losses: still uniform.
    losses = [[float(10 ** t)] * 10 for t in range(T - 1)] + [[1.0] * 9]
    fill(s, losses)
    assert not bool(s.warmed_up())
    np.testing.assert_allclose(s.probabilities().numpy(), np.full(T, 1 / T), rtol=1e-6)
    _, w = s.sample(100, seed=tf.constant([0, 0]))
    np.testing.assert_allclose(w.numpy(), np.ones(100), rtol=1e-6)
    # One more loss for the last t completes the warm-up.
    s.update(tf.constant([T - 1]), tf.constant([1.0]))
    assert bool(s.warmed_up())


def test_probabilities_after_warmup_match_reference():
    T = 8
    rng = np.random.default_rng(0)
    # 13 losses per t, scales differing by t; only the last 10 must count.
    losses = [list(rng.uniform(0.1, 1.0, size=13) * (t + 1) ** 2) for t in range(T)]
    # The first three losses are huge: they must have been dropped.
    for t in range(T):
        losses[t][:3] = [1e3 * (T - t)] * 3
    s = ts.LossSecondMomentTimestepSampler(T)
    fill(s, losses)
    assert bool(s.warmed_up())
    np.testing.assert_array_equal(s.loss_counts.numpy(), np.full(T, 10))
    kept = np.array([row[-10:] for row in losses], np.float32)
    np.testing.assert_allclose(s.loss_history.numpy(), kept, rtol=1e-7)
    p = s.probabilities().numpy()
    p_ref = ref_probabilities(kept)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.all(p >= 0.001 / T * (1 - 1e-6))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_importance_weights_unbiased(jit_compile):
    """Also compiled with XLA (the trainer's --jit-compile): the draw must compile."""
    T = 8
    rng = np.random.default_rng(1)
    losses = [list(rng.uniform(0.1, 1.0, size=10) * (t + 1)) for t in range(T)]
    s = ts.LossSecondMomentTimestepSampler(T)
    fill(s, losses)
    p = s.probabilities().numpy().astype(np.float64)
    draw = tf.function(s.sample, jit_compile=True) if jit_compile else s.sample
    t, w = draw(4096, seed=tf.constant([7, 7]))
    t, w = t.numpy(), w.numpy()
    assert t.min() >= 0 and t.max() < T
    # Each returned weight is 1 / (T p_t).
    np.testing.assert_allclose(w, 1.0 / (T * p[t]), rtol=1e-5)
    # Weight table w(t) = 1/(T p_t): E_p[w f] = sum_t p_t w_t f_t = mean_t f_t, for any f.
    w_table = np.zeros(T)
    w_table[t] = w
    assert np.all(w_table > 0)  # every t was drawn
    for f in (np.arange(T) ** 2.0, rng.normal(size=T), np.sqrt(np.mean(np.square(losses), 1))):
        assert np.sum(p * w_table * f) == pytest.approx(np.mean(f), rel=1e-5)
    # And the empirical frequencies follow p (5-sigma binomial tolerance).
    freq = np.bincount(t, minlength=T) / len(t)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / len(t)) + 1e-9)


def test_history_keeps_last_10_and_counts_capped():
    T = 3
    s = ts.LossSecondMomentTimestepSampler(T)
    s.update(tf.constant([1] * 25), tf.constant(np.arange(25, dtype=np.float32)))
    hist = s.loss_history.numpy()
    np.testing.assert_array_equal(hist[1], np.arange(15, 25, dtype=np.float32))
    np.testing.assert_array_equal(hist[0], np.zeros(10))
    np.testing.assert_array_equal(s.loss_counts.numpy(), [0, 10, 0])


def test_duplicates_in_one_batch_are_all_pushed_in_order():
    T = 4
    s = ts.LossSecondMomentTimestepSampler(T)
    s.update(tf.constant([2, 0, 2, 2, 3]), tf.constant([1.0, 5.0, 2.0, 3.0, 9.0]))
    hist = s.loss_history.numpy()
    np.testing.assert_array_equal(hist[2, -3:], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(hist[0, -1:], [5.0])
    np.testing.assert_array_equal(hist[3, -1:], [9.0])
    np.testing.assert_array_equal(s.loss_counts.numpy(), [1, 0, 3, 1])
    # Reference improved-diffusion loop over the same stream (with the shift-out rule).
    ref_hist = np.zeros((T, 10))
    ref_counts = np.zeros(T, int)
    for t, loss in [(2, 1.0), (0, 5.0), (2, 2.0), (2, 3.0), (3, 9.0)]:
        if ref_counts[t] == 10:
            ref_hist[t, :-1] = ref_hist[t, 1:]
            ref_hist[t, -1] = loss
        else:
            ref_hist[t, ref_counts[t]] = loss
            ref_counts[t] += 1
    np.testing.assert_array_equal(s.loss_counts.numpy(), ref_counts)
    # Same multiset of recorded losses per t (the order inside a row does not matter for p).
    for t in range(T):
        np.testing.assert_array_equal(np.sort(hist[t][hist[t] != 0]),
                                      np.sort(ref_hist[t][ref_hist[t] != 0]))


def test_update_inside_tf_function():
    T = 5
    s = ts.LossSecondMomentTimestepSampler(T, history=2)

    @tf.function
    def step(t, losses):
        s.update(t, losses)

    step(tf.constant([0, 1, 2, 3, 4, 0]), tf.constant([1.0, 2, 3, 4, 5, 6]))
    step(tf.constant([1, 2, 3, 4]), tf.constant([7.0, 8, 9, 10]))
    assert bool(s.warmed_up())
    np.testing.assert_allclose(s.loss_history.numpy(),
                               [[1, 6], [2, 7], [3, 8], [4, 9], [5, 10]])
    np.testing.assert_allclose(s.probabilities().numpy(),
                               ref_probabilities(s.loss_history.numpy()), rtol=1e-5)


def test_custom_uniform_prob_and_history():
    T = 4
    s = ts.LossSecondMomentTimestepSampler(T, history=3, uniform_prob=0.2)
    losses = [[1.0, 2.0, 3.0], [0.5] * 3, [4.0] * 3, [0.1, 0.1, 10.0]]
    fill(s, losses, batch=3)
    np.testing.assert_allclose(s.probabilities().numpy(), ref_probabilities(losses, 0.2),
                               rtol=1e-5)


def test_validation_and_factory():
    with pytest.raises(ValueError, match="history"):
        ts.LossSecondMomentTimestepSampler(10, history=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="uniform_prob"):
            ts.LossSecondMomentTimestepSampler(10, uniform_prob=bad)
    with pytest.raises(ValueError) as info:
        ts.make_timestep_sampler("importance", 10)
    assert "uniform" in str(info.value) and "loss_second_moment" in str(info.value)
    assert isinstance(ts.make_timestep_sampler("uniform", 10), ts.UniformTimestepSampler)
    lsm = ts.make_timestep_sampler("loss_second_moment", 10)
    assert isinstance(lsm, ts.LossSecondMomentTimestepSampler)
    assert lsm.history == 10 and lsm.uniform_prob == 0.001
    cfg = lsm.get_config()
    assert cfg["num_timesteps"] == 10 and cfg["history"] == 10


def test_state_is_tracked_as_layer_weights():
    s = ts.LossSecondMomentTimestepSampler(5)
    names = sorted(v.name for v in s.weights)
    assert names == ["loss_counts", "loss_history"]
    assert s.trainable_weights == []
