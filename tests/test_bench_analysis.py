"""The benchmark's comparison maths on synthetic curves, against hand-computed values."""

import math

import numpy as np
import pytest
import scipy.stats

from tfngd.bench import analysis


def test_first_crossing_interpolates_between_evaluation_points():
    steps, losses = [0, 10, 20, 30], [1.0, 0.6, 0.4, 0.3]
    assert analysis.first_crossing(steps, losses, 0.5) == pytest.approx(15.0)
    assert analysis.first_crossing(steps, losses, 0.4) == pytest.approx(20.0)  # exactly on a point
    assert analysis.first_crossing(steps, losses, 0.35) == pytest.approx(25.0)
    assert analysis.first_crossing(steps, losses, 1.2) == 0.0  # starts below the target
    assert analysis.first_crossing(steps, losses, 0.29) is None  # never reached


def test_first_crossing_uses_the_first_crossing_and_stops_at_divergence():
    # Dips below, comes back up, dips again: the first crossing counts.
    assert analysis.first_crossing([0, 1, 2, 3], [1.0, 0.4, 0.8, 0.2], 0.5) == pytest.approx(
        1 - 0.1 / 0.6 * 1)
    # A diverged curve stops at its first non-finite value.
    assert analysis.first_crossing([0, 1, 2], [1.0, float("nan"), 0.1], 0.5) is None
    assert analysis.first_crossing([0, 1, 2], [1.0, None, 0.1], 0.5) is None
    assert analysis.first_crossing([], [], 0.5) is None


def test_value_at_interpolates_and_clamps():
    seconds, losses = [0.0, 2.0, 4.0], [1.0, 0.5, 0.25]
    assert analysis.value_at(seconds, losses, 1.0) == pytest.approx(0.75)
    assert analysis.value_at(seconds, losses, 3.0) == pytest.approx(0.375)
    assert analysis.value_at(seconds, losses, 10.0) == pytest.approx(0.25)  # finished earlier
    assert analysis.value_at([], [], 1.0) is None


def test_summarize_is_the_student_t_interval():
    values = [0.5, 0.52, 0.47, 0.55]
    mean = np.mean(values)
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(4)
    summary = analysis.summarize(values)
    assert summary["mean"] == pytest.approx(mean)
    assert summary["low"] == pytest.approx(mean - half)
    assert summary["high"] == pytest.approx(mean + half)
    assert summary["n"] == 4
    single = analysis.summarize([0.3, None, float("nan")])
    assert single["mean"] == 0.3 and single["low"] is None and single["high"] is None
    assert analysis.summarize([])["mean"] is None


def test_intervals_disjoint_below():
    low = {"low": 1.0, "high": 2.0}
    high = {"low": 2.5, "high": 3.0}
    assert analysis.intervals_disjoint_below(low, high) is True
    assert analysis.intervals_disjoint_below(high, low) is False
    assert analysis.intervals_disjoint_below({"low": 1.0, "high": 2.6}, high) is False
    assert analysis.intervals_disjoint_below({"low": None, "high": None}, high) is None


def test_select_best_and_grid_edges():
    assert analysis.select_best([0.5, 0.3, float("nan"), 0.3, None]) == 1  # ties: the first
    assert analysis.select_best([None, float("inf"), float("nan")]) is None
    grid = {"learning_rate": (1e-3, 2e-3, 4e-3), "damping": (1e-3,)}
    assert analysis.best_at_edge(grid, {"learning_rate": 2e-3, "damping": 1e-3}) == []
    assert analysis.best_at_edge(grid, {"learning_rate": 4e-3, "damping": 1e-3}) == [
        "learning_rate"]


def test_refresh_steps_and_step_time_breakdown():
    schedule = {"inverse_every": 10, "inverse_warmup_steps": 3, "statistics_every": 1}
    mask = analysis.refresh_steps(25, schedule)
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 10, 20]
    # Plain steps take 10 ms, refresh steps 30 ms, the first (tracing) 5 s.
    seconds = np.where(mask, 0.030, 0.010)
    seconds[0] = 5.0
    record = {"timing": {"step_seconds": seconds.tolist(), "first_step_seconds": 5.0},
              "inverse_schedule": schedule}
    breakdown = analysis.step_time_breakdown(record)
    assert breakdown["first_step_s"] == 5.0
    assert breakdown["plain_step_ms"] == pytest.approx(10.0)
    assert breakdown["refresh_step_ms"] == pytest.approx(30.0)
    # steps 2..25: 4 refreshes among 24 steps, 20 ms extra each.
    assert breakdown["inverse_amortised_ms"] == pytest.approx(20.0 * 4 / 24)
    assert breakdown["mean_ms"] == pytest.approx((4 * 30 + 20 * 10) / 24)
    assert "plain_step_ms" not in analysis.step_time_breakdown(
        {"timing": record["timing"], "inverse_schedule": None})


def make_record(optimizer, seed, losses, ms_per_step, eval_every=100, metric=None):
    """A stage-2 record: validation every ``eval_every`` steps, a constant step time."""
    steps = [k * eval_every for k in range(len(losses))]
    seconds = [s * ms_per_step / 1000 for s in steps]
    curve = {"step": steps, "seconds": seconds, "val_loss": list(losses)}
    for q in analysis.QUARTILES:
        curve[q] = list(losses)
    record = {
        "optimizer": optimizer, "seed": seed, "steps": steps[-1], "curve": curve,
        "timing": {"train_seconds": seconds[-1], "mean_step_seconds": ms_per_step / 1000,
                   "first_step_seconds": 3.0,
                   "step_seconds": [3.0] + [ms_per_step / 1000] * (steps[-1] - 1)},
        "samples": {"metrics": {"sliced_wasserstein": metric or 0.1}, "skipped": None},
    }
    if metric is not None:
        record["sample_curve"] = {"step": steps, "seconds": seconds,
                                  "sliced_wasserstein": [metric] * len(steps)}
    return record


ADAM_FINALS = (0.50, 0.52, 0.48)


def adam_records(metric=0.2):
    # Linear from 1.0 to the final value over 4 evaluations of 100 steps, 10 ms per step.
    return [make_record("adam", seed, np.linspace(1.0, final, 5), 10.0, metric=metric)
            for seed, final in enumerate(ADAM_FINALS)]


def test_analysis_target_crossings_matched_budgets():
    # K-FAC: 0.4 below the start after one evaluation, then flat; 15 ms per step.
    kfac = [make_record("kfac", seed, [1.0, 0.5 - d, 0.45 - d, 0.44 - d, 0.43 - d], 15.0,
                        metric=0.15) for seed, d in enumerate((0.0, 0.01, 0.02))]
    sgd = [make_record("sgd", seed, np.linspace(1.0, 0.6, 5), 10.0) for seed in range(3)]
    result = analysis.analyze_optimizers({"adam": adam_records(), "sgd": sgd, "kfac": kfac},
                                         primary_metric="sliced_wasserstein")
    target = result["target"]
    assert target["optimizer"] == "adam" and target["value"] == pytest.approx(0.5)
    per = result["per_optimizer"]
    # Adam: seed 0 reaches 0.5 at its last point (400), seed 1 never, seed 2 at
    # 300 + (0.61 - 0.5) / (0.61 - 0.48) * 100 (its losses: 1, 0.87, 0.74, 0.61, 0.48).
    adam_steps = per["adam"]["steps_to_target"]
    assert adam_steps["all_values"][0] == pytest.approx(400.0)
    assert adam_steps["all_values"][1] is None
    assert adam_steps["all_values"][2] == pytest.approx(300 + 0.11 / 0.13 * 100)
    assert adam_steps["reached"] == 2 and adam_steps["runs"] == 3
    assert adam_steps["mean"] == pytest.approx((400 + 300 + 0.11 / 0.13 * 100) / 2)
    # K-FAC reaches 0.5 at step 100 (seed 0), and by interpolation earlier for the others.
    kfac_steps = per["kfac"]["steps_to_target"]["all_values"]
    assert kfac_steps[0] == pytest.approx(100.0)
    assert kfac_steps[1] == pytest.approx(0.5 / 0.51 * 100)
    assert kfac_steps[2] == pytest.approx(0.5 / 0.52 * 100)
    seconds = per["kfac"]["seconds_to_target"]["all_values"]
    assert seconds == pytest.approx([s * 0.015 for s in kfac_steps])
    assert per["sgd"]["steps_to_target"]["reached"] == 0
    # Matched budgets: every run has 400 steps; the fastest full run is Adam's (4 s).
    matched = result["matched"]
    assert matched["steps"] == 400 and matched["seconds"] == pytest.approx(4.0)
    assert matched["seconds_optimizer"] in ("adam", "sgd")
    # K-FAC at 4 s = step 266.7: between 0.45 - d (step 200) and 0.44 - d (step 300).
    expected = [0.45 - d - 0.01 * (4.0 / 0.015 - 200) / 100 for d in (0.0, 0.01, 0.02)]
    assert per["kfac"]["at_matched_seconds"]["values"] == pytest.approx(expected)
    assert per["kfac"]["at_half_steps"]["values"] == pytest.approx([0.45, 0.44, 0.43])
    assert per["adam"]["at_matched_steps"]["values"] == pytest.approx(list(ADAM_FINALS))
    assert per["kfac"]["ms_per_step_vs_adam"] == pytest.approx(1.5)
    # For the ratios, Adam's unreached seed 1 counts at its horizon (400 steps, 4 s).
    reference = target["baseline_to_target"]
    censored = [400.0, 400.0, 300 + 0.11 / 0.13 * 100]
    assert reference["steps"]["values"] == pytest.approx(censored)
    assert reference["seconds"]["values"] == pytest.approx([s / 100 for s in censored])
    assert reference["censored"] == 1
    ratios = result["ratios"]["kfac"]
    assert ratios["steps"] == pytest.approx(np.mean(kfac_steps) / np.mean(censored))
    assert ratios["seconds"] == pytest.approx(np.mean(seconds) / np.mean(censored) * 100)
    assert set(result["goal"]) == {"kfac"}  # first-order optimizers are not checked


def slow_adam():
    """Target 0.5, reached by seeds 0 and 1 at steps ~391 and ~395, never by seed 2 (which
    counts at its horizon, 400, for the comparison)."""
    return [make_record("adam", seed, [1.0, 0.9, 0.8, 0.7, final], 10.0, metric=0.2)
            for seed, final in enumerate((0.48, 0.49, 0.53))]


def test_goal_met_when_every_part_holds():
    # K-FAC reaches the target in ~1/4 of Adam's steps at 1.5x the step time: seconds
    # ratio ~0.37; tight intervals; better samples than Adam.
    kfac = [make_record("kfac", seed, [1.0, 0.5 - d, 0.45, 0.44, 0.43], 15.0, metric=0.15)
            for seed, d in enumerate((0.0, 0.001, 0.002))]
    result = analysis.analyze_optimizers({"adam": slow_adam(), "kfac": kfac},
                                         primary_metric="sliced_wasserstein")
    goal = result["goal"]["kfac"]
    assert goal["parts"] == {"steps_ratio": True, "steps_intervals_disjoint": True,
                             "seconds_ratio": True, "seconds_intervals_disjoint": True,
                             "sample_quality": True}
    assert goal["met"] is True


def test_goal_not_met_cases():
    adam = slow_adam()

    def goal_for(kfac):
        result = analysis.analyze_optimizers({"adam": adam, "kfac": kfac},
                                             primary_metric="sliced_wasserstein")
        return result["goal"]["kfac"]

    # Fast in steps but 4x slower per step: the seconds part fails, the steps part holds.
    slow = [make_record("kfac", seed, [1.0, 0.5 - d, 0.45, 0.44, 0.43], 40.0, metric=0.15)
            for seed, d in enumerate((0.0, 0.001, 0.002))]
    goal = goal_for(slow)
    assert goal["parts"]["steps_ratio"] is True
    assert goal["parts"]["seconds_ratio"] is False
    assert goal["met"] is False
    # Worse samples than Adam at matched seconds.
    blurry = [make_record("kfac", seed, [1.0, 0.5 - d, 0.45, 0.44, 0.43], 15.0, metric=0.5)
              for seed, d in enumerate((0.0, 0.001, 0.002))]
    goal = goal_for(blurry)
    assert goal["parts"]["sample_quality"] is False and goal["met"] is False
    # One seed never reaches the target: the ratio and interval parts fail.
    partial = [make_record("kfac", seed, [1.0, final, final, final, final], 15.0, metric=0.15)
               for seed, final in enumerate((0.4, 0.45, 0.6))]
    goal = goal_for(partial)
    assert goal["parts"]["steps_ratio"] is False
    assert goal["parts"]["seconds_intervals_disjoint"] is False
    # Overlapping intervals: a noisy K-FAC whose interval reaches Adam's.
    noisy = [make_record("kfac", seed, [1.0] + [0.8] * (k - 1) + [0.45] * (5 - k), 10.0,
                         metric=0.15) for seed, k in enumerate((2, 4, 4))]
    goal = goal_for(noisy)
    assert goal["parts"]["steps_intervals_disjoint"] is False
    assert goal["met"] is False


def test_goal_parts_unmeasurable_with_one_seed():
    adam = [make_record("adam", 0, [1.0, 0.8, 0.5], 10.0)]
    kfac = [make_record("kfac", 0, [1.0, 0.4, 0.3], 10.0)]
    result = analysis.analyze_optimizers({"adam": adam, "kfac": kfac},
                                         primary_metric="sliced_wasserstein")
    parts = result["goal"]["kfac"]["parts"]
    assert parts["steps_ratio"] is True  # 75 / 200 steps
    assert parts["steps_intervals_disjoint"] is None  # no interval from one seed
    assert parts["sample_quality"] is None  # no sample curves
    assert result["goal"]["kfac"]["met"] is False


def test_no_first_order_optimizer_means_no_target():
    kfac = [make_record("kfac", 0, [1.0, 0.4, 0.3], 10.0)]
    result = analysis.analyze_optimizers({"kfac": kfac})
    assert result["target"] is None and result["goal"] == {}
    assert result["per_optimizer"]["kfac"]["final_val_loss"]["mean"] == pytest.approx(0.3)


def test_bits_per_dim_is_summarised_over_seeds_and_older_trials_have_none():
    adam = adam_records()
    for record, bpd in zip(adam, (3.0, 3.2, 3.4), strict=True):
        record["likelihood"] = {"bits_per_dim": bpd, "chain_steps": 100}
    kfac = [make_record("kfac", seed, [1.0, 0.5], 15.0) for seed in range(3)]  # none recorded
    per = analysis.analyze_optimizers({"adam": adam, "kfac": kfac})["per_optimizer"]
    bits = per["adam"]["bits_per_dim"]
    assert bits["mean"] == pytest.approx(3.2) and bits["n"] == 3
    half = scipy.stats.t.ppf(0.975, 2) * np.std([3.0, 3.2, 3.4], ddof=1) / math.sqrt(3)
    assert bits["low"] == pytest.approx(3.2 - half) and bits["chain_steps"] == [100]
    assert per["kfac"]["bits_per_dim"]["n"] == 0 and per["kfac"]["bits_per_dim"]["mean"] is None
    # Records without num_timesteps (older trials) count as scored on a respaced chain.
    assert bits["full_chain"] is False and per["kfac"]["bits_per_dim"]["full_chain"] is False
    for record in adam:
        record["likelihood"]["num_timesteps"] = 100
    per = analysis.analyze_optimizers({"adam": adam, "kfac": kfac})["per_optimizer"]
    assert per["adam"]["bits_per_dim"]["full_chain"] is True
