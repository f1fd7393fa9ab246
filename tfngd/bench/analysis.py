"""The maths of the comparison: targets, crossings, matched budgets, intervals, goal check.

Pure functions of the trial records (no TensorFlow). Conventions:

* A validation curve is the piecewise-linear function through its evaluation
  points ``(x_k, loss_k)``, ``x`` in steps or in training seconds; the first
  point is the initial model (step 0, 0 s).
* **Target** = the mean (over seeds) final validation loss of the best
  first-order optimizer (``adam``, ``adamw``, ``sgd``: the one with the lowest
  mean).
* **Steps / seconds to target** (:func:`first_crossing`): the first ``x`` at
  which the curve reaches ``loss <= target``, linearly interpolated between
  the two evaluation points around the crossing; ``None`` when the run never
  reaches it. Means and intervals use the seeds that reached it (the count is
  reported as ``reached``/``n``). The baseline's own seeds reach its mean only
  about half the time, so for the ratios and the goal check its unreached
  seeds are counted at the end of their run (the full horizon, or the run's
  training time): a lower bound, which favours the baseline.
* **Matched steps**: every optimizer's loss at the smallest full horizon among
  them (equal horizons: the final loss), and at half of it. **Matched
  seconds** ``T*``: the mean training time of the fastest optimizer's full
  run; every optimizer's loss (and sample metrics, when sample curves exist)
  at ``T*``, interpolated on its own clock (clamped to its last point when a
  seed finished before ``T*``).
* Intervals: 95% Student-t intervals over seeds
  (:func:`tfngd.metrics.mean_confidence_interval`; one seed gives no interval).
* **Goal check** of each natural-gradient optimizer against the best
  first-order optimizer: steps-to-target ratio <= 0.5 and seconds-to-target
  ratio <= 0.7 (ratios of means, every seed reaching the target), 95%
  intervals that do not overlap (the NGD interval entirely below), and sample
  quality at matched seconds no worse than Adam's (NGD's mean of the task's
  primary metric <= the upper end of Adam's 95% interval, or Adam's value with
  one seed).
"""

from __future__ import annotations

import math

import numpy as np

from tfngd import metrics

STEPS_RATIO_GOAL = 0.5
SECONDS_RATIO_GOAL = 0.7
LEVEL = 0.95
QUARTILES = ("val_loss_q1", "val_loss_q2", "val_loss_q3", "val_loss_q4")


def is_finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating, np.integer)) \
        and math.isfinite(float(value))


def finite_points(xs, ys):
    """Pairs whose ``y`` is finite; a curve stops at its first non-finite value (divergence)."""
    points = []
    for x, y in zip(xs, ys, strict=True):
        if not is_finite(y) or not is_finite(x):
            break
        points.append((float(x), float(y)))
    return points


def first_crossing(xs, ys, target: float) -> float | None:
    """The first ``x`` where the piecewise-linear curve through ``(xs, ys)`` reaches ``<= target``.

    Linear interpolation between the last point above the target and the first
    point at or below it; ``xs[0]`` when the curve starts at or below it;
    ``None`` when it never gets there.
    """
    points = finite_points(xs, ys)
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


def value_at(xs, ys, x: float) -> float | None:
    """The curve's value at ``x`` (linear interpolation, clamped to the first and last points)."""
    points = finite_points(xs, ys)
    if not points:
        return None
    px, py = zip(*points, strict=True)
    return float(np.interp(float(x), px, py))


def summarize(values, level: float = LEVEL) -> dict:
    """``{"mean", "low", "high", "n", "values"}`` over the finite values (t interval)."""
    values = [float(v) for v in values if is_finite(v)]
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0, "values": []}
    mean, low, high = metrics.mean_confidence_interval(values, level)
    clean = [None if not math.isfinite(v) else float(v) for v in (mean, low, high)]
    return {"mean": clean[0], "low": clean[1], "high": clean[2], "n": len(values),
            "values": values}


def intervals_disjoint_below(a: dict, b: dict) -> bool | None:
    """Whether interval ``a`` lies entirely below interval ``b`` (``None``: an interval is
    missing, e.g. fewer than two values)."""
    if not (is_finite(a.get("high")) and is_finite(b.get("low"))):
        return None
    return a["high"] < b["low"]


def select_best(losses) -> int | None:
    """Index of the lowest finite loss (ties: the first); ``None`` if none is finite."""
    best = None
    for i, loss in enumerate(losses):
        if is_finite(loss) and (best is None or loss < losses[best]):
            best = i
    return best


def best_at_edge(grid: dict, chosen: dict) -> list[str]:
    """Grid parameters (with more than one value) whose chosen value is the smallest or
    largest of its list: the optimum may lie outside the grid."""
    edges = []
    for name, values in grid.items():
        values = list(values)
        if len(values) > 1 and chosen.get(name) in (min(values), max(values)):
            edges.append(name)
    return edges


# -- one optimizer's runs ----------------------------------------------------------------------


def curve(record: dict, x: str = "step", y: str = "val_loss") -> tuple[list, list]:
    """``(xs, ys)`` of a trial's validation curve; ``x`` is ``"step"`` or ``"seconds"``."""
    points = record["curve"]
    return list(points[x]), list(points[y])


def final_value(record: dict, key: str = "val_loss"):
    values = record["curve"][key]
    return values[-1] if values else None


def sample_curve_value(record: dict, metric: str, seconds: float):
    """A sample metric at ``seconds`` on the trial's clock (from its sample curve)."""
    sample_curve = record.get("sample_curve") or {}
    if metric not in sample_curve:
        return None
    return value_at(sample_curve["seconds"], sample_curve[metric], seconds)


def refresh_steps(num_steps: int, schedule: dict) -> np.ndarray:
    """Boolean mask over steps ``0..num_steps-1`` (the optimizer's ``iterations`` before each
    update) of the steps that refresh the curvature inverses (K-FAC's schedule)."""
    k = np.arange(num_steps)
    return (k % int(schedule["inverse_every"]) == 0) | (k < int(schedule["inverse_warmup_steps"]))


def step_time_breakdown(record: dict) -> dict:
    """Step-time statistics of one trial, in milliseconds.

    ``median``/``mean`` over steps 2..n (the first step traces and compiles);
    for an optimizer with an inverse schedule, the median of steps without an
    inverse refresh (forward, backward, curvature statistics, preconditioning,
    update) and the amortised cost of the refreshes,
    ``(mean refresh step - median plain step) * refreshes / n``.
    """
    seconds = np.asarray(record["timing"]["step_seconds"], dtype=np.float64)
    result = {"first_step_s": record["timing"]["first_step_seconds"]}
    rest = seconds[1:]
    if rest.size == 0:
        return result
    result["median_ms"] = 1e3 * float(np.median(rest))
    result["mean_ms"] = 1e3 * float(rest.mean())
    schedule = record.get("inverse_schedule")
    if schedule:
        mask = refresh_steps(len(seconds), schedule)[1:]
        if mask.any() and (~mask).any():
            plain = float(np.median(rest[~mask]))
            result["plain_step_ms"] = 1e3 * plain
            result["refresh_step_ms"] = 1e3 * float(rest[mask].mean())
            result["inverse_amortised_ms"] = 1e3 * float(
                (rest[mask].mean() - plain) * mask.sum() / rest.size)
    return result


def steps_or_seconds_to_target(records, target: float, x: str) -> list:
    return [first_crossing(*curve(r, x=x), target) for r in records]


def _reached(values: list, n: int) -> dict:
    summary = summarize([v for v in values if v is not None])
    summary["reached"] = sum(v is not None for v in values)
    summary["runs"] = n
    summary["all_values"] = values
    return summary


def analyze_optimizers(finals: dict[str, list[dict]], first_order=("adam", "adamw", "sgd"),
                       primary_metric: str | None = None) -> dict:
    """The comparison of one task from its stage-2 records ``{optimizer: [record per seed]}``.

    Returns ``{"target", "matched", "per_optimizer", "ratios", "goal"}`` (see the module
    docstring for every definition).
    """
    finals = {opt: [r for r in records if r is not None] for opt, records in finals.items()}
    finals = {opt: records for opt, records in finals.items() if records}
    per_optimizer: dict[str, dict] = {}
    for opt, records in finals.items():
        entry = {
            "seeds": [r["seed"] for r in records],
            "final_val_loss": summarize([final_value(r) for r in records]),
            "quartiles": {q: summarize([final_value(r, q) for r in records])
                          for q in QUARTILES},
            "train_seconds": summarize([r["timing"]["train_seconds"] for r in records]),
            "ms_per_step": summarize([1e3 * r["timing"]["mean_step_seconds"] for r in records
                                      if is_finite(r["timing"].get("mean_step_seconds"))]),
            "first_step_seconds": summarize([r["timing"]["first_step_seconds"]
                                             for r in records]),
            "horizon": min(r["steps"] for r in records),
            "diverged": sum(bool(r.get("diverged")) for r in records),
            "samples": {},
        }
        names = sorted({k for r in records for k in (r.get("samples") or {}).get("metrics", {})})
        entry["samples"] = {name: summarize([(r.get("samples") or {}).get("metrics", {}).get(name)
                                             for r in records]) for name in names}
        skipped = sorted({(r.get("samples") or {}).get("skipped") for r in records} - {None})
        entry["samples_skipped"] = skipped[0] if skipped else None
        # Held-out bits/dim (image tasks; trials recorded before it existed have none).
        scored = [r["likelihood"] for r in records if r.get("likelihood")]
        entry["bits_per_dim"] = summarize([s.get("bits_per_dim") for s in scored])
        entry["bits_per_dim"]["chain_steps"] = sorted({s["chain_steps"] for s in scored})
        # Older records lack num_timesteps; they were all scored on respaced chains.
        entry["bits_per_dim"]["full_chain"] = bool(scored) and all(
            s["chain_steps"] == s.get("num_timesteps") for s in scored)
        skipped_updates = [value for r in records
                           for key, value in (r.get("optimizer_diagnostics") or {}).items()
                           if key.endswith("skipped_updates")]
        entry["skipped_updates"] = sum(skipped_updates) if skipped_updates else None
        breakdowns = [step_time_breakdown(r) for r in records]
        entry["breakdown"] = {key: float(np.mean([b[key] for b in breakdowns if key in b]))
                              for key in sorted({k for b in breakdowns for k in b})}
        per_optimizer[opt] = entry

    result = {"target": None, "matched": None, "per_optimizer": per_optimizer, "ratios": {},
              "goal": {}}
    if not per_optimizer:
        return result

    adam_ms = per_optimizer.get("adam", {}).get("ms_per_step", {}).get("mean")
    for entry in per_optimizer.values():
        ms = entry["ms_per_step"]["mean"]
        entry["ms_per_step_vs_adam"] = ms / adam_ms if is_finite(ms) and is_finite(adam_ms) \
            else None

    # Matched budgets.
    matched_steps = min(e["horizon"] for e in per_optimizer.values())
    fastest = min(per_optimizer, key=lambda o: per_optimizer[o]["train_seconds"]["mean"])
    matched_seconds = per_optimizer[fastest]["train_seconds"]["mean"]
    result["matched"] = {"steps": matched_steps, "half_steps": matched_steps / 2,
                         "seconds": matched_seconds, "seconds_optimizer": fastest}
    for opt, records in finals.items():
        entry = per_optimizer[opt]
        entry["at_matched_steps"] = summarize(
            [value_at(*curve(r), matched_steps) for r in records])
        entry["at_half_steps"] = summarize(
            [value_at(*curve(r), matched_steps / 2) for r in records])
        entry["at_matched_seconds"] = summarize(
            [value_at(*curve(r, x="seconds"), matched_seconds) for r in records])
        names = sorted({k for r in records for k in (r.get("sample_curve") or {})
                        if k not in ("step", "seconds")})
        entry["samples_at_matched_seconds"] = {
            name: summarize([sample_curve_value(r, name, matched_seconds) for r in records])
            for name in names}

    # Target: the best first-order optimizer's mean final validation loss.
    candidates = [o for o in first_order if o in per_optimizer
                  and is_finite(per_optimizer[o]["final_val_loss"]["mean"])]
    if not candidates:
        return result
    baseline = min(candidates, key=lambda o: per_optimizer[o]["final_val_loss"]["mean"])
    target = per_optimizer[baseline]["final_val_loss"]["mean"]
    result["target"] = {"value": target, "optimizer": baseline,
                        "first_order_means": {o: per_optimizer[o]["final_val_loss"]["mean"]
                                              for o in candidates}}
    for opt, records in finals.items():
        per_optimizer[opt]["steps_to_target"] = _reached(
            steps_or_seconds_to_target(records, target, "step"), len(records))
        per_optimizer[opt]["seconds_to_target"] = _reached(
            steps_or_seconds_to_target(records, target, "seconds"), len(records))

    # The baseline's own seeds reach its mean only about half the time; the others are
    # counted at the end of their run (a lower bound, so the comparison favours the baseline).
    reference = {}
    for kind, x in (("steps", "step"), ("seconds", "seconds")):
        values = [crossing if crossing is not None else curve(r, x=x)[0][-1]
                  for crossing, r in zip(per_optimizer[baseline][f"{kind}_to_target"]
                                         ["all_values"], finals[baseline], strict=True)]
        reference[kind] = summarize(values)
    reference["censored"] = per_optimizer[baseline]["steps_to_target"]["runs"] \
        - per_optimizer[baseline]["steps_to_target"]["reached"]
    result["target"]["baseline_to_target"] = reference
    for opt in per_optimizer:
        if opt in first_order:
            continue
        result["ratios"][opt] = {
            kind: _ratio(per_optimizer[opt][f"{kind}_to_target"]["mean"],
                         reference[kind]["mean"]) for kind in ("steps", "seconds")}
        result["goal"][opt] = goal_check(per_optimizer[opt], reference,
                                         per_optimizer.get("adam"), primary_metric)
    return result


def _ratio(a, b):
    return a / b if is_finite(a) and is_finite(b) and b > 0 else None


def goal_check(ngd: dict, baseline: dict, adam: dict | None, primary_metric: str | None) -> dict:
    """The issue's goal for one NGD optimizer (see the module docstring); each part is
    True, False or None (not measurable), ``met`` is True only when every part is True.

    ``baseline``: ``{"steps": summary, "seconds": summary}`` of the best first-order
    optimizer's steps and seconds to target (unreached seeds counted at their run's end).
    """
    parts = {}
    for kind, goal in (("steps", STEPS_RATIO_GOAL), ("seconds", SECONDS_RATIO_GOAL)):
        mine, theirs = ngd[f"{kind}_to_target"], baseline[kind]
        ratio = _ratio(mine["mean"], theirs["mean"])
        if mine["reached"] < mine["runs"]:  # a seed never reached the target: not met
            parts[f"{kind}_ratio"] = parts[f"{kind}_intervals_disjoint"] = False
            continue
        parts[f"{kind}_ratio"] = None if ratio is None else bool(ratio <= goal)
        parts[f"{kind}_intervals_disjoint"] = intervals_disjoint_below(mine, theirs)
    quality = None
    detail = "no Adam run or no sample curve"
    if adam is not None and primary_metric:
        mine = ngd.get("samples_at_matched_seconds", {}).get(primary_metric, {})
        theirs = adam.get("samples_at_matched_seconds", {}).get(primary_metric, {})
        if is_finite(mine.get("mean")) and is_finite(theirs.get("mean")):
            bound = theirs["high"] if is_finite(theirs.get("high")) else theirs["mean"]
            quality = bool(mine["mean"] <= bound)
            detail = (f"{primary_metric} at matched seconds: {mine['mean']:.4g} vs Adam "
                      f"{theirs['mean']:.4g} (bound {bound:.4g})")
    parts["sample_quality"] = quality
    return {"parts": parts, "sample_quality_detail": detail,
            "met": all(value is True for value in parts.values())}
