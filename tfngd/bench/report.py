"""``results.json`` and ``REPORT.md`` (with PNG plots) from the stored trials.

:func:`render_report` rebuilds everything from ``<output>/benchmark.json`` and
the trial files (it never trains), so ``tfngd-bench --report-only`` re-renders
a finished or partial benchmark. Per task it writes, under ``<output>/plots``:

* ``<task>_loss_vs_steps.png`` / ``<task>_loss_vs_seconds.png``: validation
  loss, mean over seeds (line) and min-max over seeds (band), one line per
  optimizer, the target as a dashed line, ``T*`` as a dotted line;
* ``<task>_quartiles.png``: final validation loss per quartile of ``t``
  (mean, 95% interval);
* ``<task>_samples.png``: held-out data and each optimizer's final samples
  (seed 0) side by side;
* ``<task>_sample_metric_vs_seconds.png``: the task's primary sample metric
  along training (when sample curves exist).
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np

from tfngd.bench import analysis, grids, protocol, tasks
from tfngd.bench.benchmark import read_benchmark
from tfngd.bench.trials import TrialStore, clean_json, spec_key, write_json

COLORS = {"adam": "tab:blue", "adamw": "tab:cyan", "sgd": "tab:green", "kfac": "tab:red",
          "ekfac": "tab:purple", "dual": "tab:orange", "dual_empirical": "tab:brown",
          "stein": "tab:pink", "kwng": "tab:olive"}
EXTRA_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:gray")
# Optimizer settings that are not tuned, shown per optimizer (from the trial files).
FIXED_KEYS = ("global_clipnorm", "final_lr_fraction", "momentum", "weight_decay")
NGD_FIXED_KEYS = ("statistics_every", "inverse_every", "inverse_method", "statistics_examples")
METRIC_LABELS = {"sliced_wasserstein": "sliced W2", "energy_distance": "energy dist.",
                 "rbf_mmd": "RBF-MMD^2", "frechet_distance": "Frechet dist.", "kid": "KID",
                 "kid_std": "KID std over subsets"}


def _color(optimizer: str, order: list[str]) -> str:
    if optimizer in COLORS:
        return COLORS[optimizer]
    extras = [o for o in order if o not in COLORS]
    return EXTRA_COLORS[extras.index(optimizer) % len(EXTRA_COLORS)]


# -- formatting --------------------------------------------------------------------------------


def fmt(value, digits: int = 4) -> str:
    if value is None or not analysis.is_finite(value):
        return "n/a"
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}"


def fmt_ci(summary: dict | None, digits: int = 4) -> str:
    """``mean [low, high]`` (95% t interval), ``mean (1 seed)``, or ``n/a``."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    text = fmt(summary["mean"], digits)
    if summary.get("low") is not None and summary.get("high") is not None:
        return f"{text} [{fmt(summary['low'], digits)}, {fmt(summary['high'], digits)}]"
    return f"{text} ({summary.get('n', 1)} seed)"


def fmt_reached(summary: dict | None, digits: int = 4) -> str:
    if not summary:
        return "n/a"
    reached = f"{summary['reached']}/{summary['runs']}"
    if summary["reached"] == 0:
        return f"never (0/{summary['runs']})"
    return f"{fmt_ci(summary, digits)} ({reached})"


def fmt_bool(value) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[value]


def _override_text(value) -> str:
    """A ``--set`` value as the command line writes it (tuples comma separated)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


# -- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(records, x: str, y: str = "val_loss", points: int = 200):
    """``(grid, mean, low, high)`` over seeds on a common ``x`` grid (steps: the eval steps;
    seconds: ``points`` values up to the shortest run)."""
    curves = [analysis.finite_points(*analysis.curve(r, x=x, y=y)) for r in records]
    curves = [tuple(zip(*c, strict=True)) for c in curves if c]
    if not curves:
        return None
    if x == "step":
        grid = np.asarray(max((xs for xs, _ in curves), key=len), dtype=np.float64)
    else:
        grid = np.linspace(0.0, min(xs[-1] for xs, _ in curves), points)
    values = np.array([[analysis.value_at(xs, ys, g) for g in grid] for xs, ys in curves],
                      dtype=np.float64)
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def plot_curves(path: str, finals: dict, x: str, title: str, target=None, matched_seconds=None,
                y: str = "val_loss", ylabel: str = "validation loss (bank, EMA)",
                log: bool = False) -> str | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    order = list(finals)
    lows, tops = [], []
    drawn = False
    for opt, records in finals.items():
        if not records:
            continue
        if y != "val_loss":
            records = [_as_sample_record(r, y) for r in records]
            records = [r for r in records if r is not None]
            if not records:
                continue
        band = _band(records, x, "val_loss")
        if band is None:
            continue
        grid, mean, low, high = band
        color = _color(opt, order)
        ax.plot(grid, mean, color=color, label=f"{opt} ({len(records)} seeds)")
        ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        lows.append(np.nanmin(low))
        tops.append(mean[1] if len(mean) > 2 and x == "step" else np.nanpercentile(mean, 90))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
    if matched_seconds is not None and x == "seconds":
        ax.axvline(matched_seconds, color="gray", linestyle=":", linewidth=1, label="T*")
    if log:
        ax.set_yscale("log")
    elif lows and tops and y == "val_loss":
        bottom, top = min(lows), max(tops)
        if top > bottom:
            ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
    ax.set_xlabel("optimizer steps" if x == "step" else "training seconds (see conventions)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _as_sample_record(record: dict, metric: str) -> dict | None:
    """A record whose ``curve`` is its sample curve of ``metric`` (for :func:`plot_curves`)."""
    sample_curve = record.get("sample_curve") or {}
    if metric not in sample_curve:
        return None
    return {"curve": {"step": sample_curve["step"], "seconds": sample_curve["seconds"],
                      "val_loss": sample_curve[metric]}}


def plot_quartiles(path: str, per_optimizer: dict, title: str) -> str | None:
    if not per_optimizer:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    order = list(per_optimizer)
    width = 0.8 / len(order)
    for i, opt in enumerate(order):
        quartiles = per_optimizer[opt]["quartiles"]
        means = [quartiles[q]["mean"] or np.nan for q in analysis.QUARTILES]
        errors = np.array([[m - (quartiles[q]["low"] if quartiles[q]["low"] is not None else m),
                            (quartiles[q]["high"] if quartiles[q]["high"] is not None else m) - m]
                           for q, m in zip(analysis.QUARTILES, means, strict=True)]).T
        positions = np.arange(4) + (i - (len(order) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=errors, capsize=2, color=_color(opt, order),
               label=opt)
    ax.set_xticks(np.arange(4))
    ax.set_xticklabels(["q1 (t small)", "q2", "q3", "q4 (t large)"])
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(path: str, output: str, panels: list[tuple[str, str]], title: str) -> str | None:
    """Side-by-side pictures ``[(label, relative png path)]`` (missing files are left out)."""
    panels = [(label, os.path.join(output, rel)) for label, rel in panels
              if rel and os.path.isfile(os.path.join(output, rel))]
    if not panels:
        return None
    plt = _pyplot()
    import matplotlib.image

    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.1), squeeze=False)
    for ax, (label, file) in zip(axes[0], panels, strict=True):
        picture = matplotlib.image.imread(file)
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- assembling --------------------------------------------------------------------------------


def _strip(record: dict | None) -> dict | None:
    """A record for results.json: the per-step times are summarised (they stay in the trial
    file)."""
    if record is None:
        return None
    record = dict(record)
    timing = dict(record["timing"])
    timing["step_seconds"] = f"{len(timing.get('step_seconds', []))} values, see the trial file"
    record["timing"] = timing
    return record


def _read_floor(output: str, task: str) -> dict | None:
    path = os.path.join(output, "floors", f"{task}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def analyze_task(output: str, settings: protocol.BenchSettings, task_name: str,
                 store: TrialStore, trial_ids=None) -> dict:
    """The plan (selection included), the analysis and the plots of one task.

    A planned trial is its file when the identity still matches; otherwise (the code's
    TrainConfig defaults changed since the run) the run's trial with the same optimizer,
    hyperparameters, seed, horizon and sample counts (among ``trial_ids``, the trial files
    the run recorded, or every file of the task).
    """
    task = tasks.get_task(task_name)
    by_key = None

    def lookup(spec):
        nonlocal by_key
        record = store.load(spec)
        if record is None:
            if by_key is None:
                by_key = store.records_of(task_name, trial_ids)
            record = by_key.get(spec_key(spec))
        return record

    plan = protocol.plan_task(settings, task_name, lookup)
    finals = {opt: [r for _, r in pairs if r is not None] for opt, pairs in plan["finals"].items()}
    result = analysis.analyze_optimizers(finals, first_order=grids.FIRST_ORDER,
                                         primary_metric=task.primary_metric)
    tuning = []
    for opt, pairs in plan["tuning"].items():
        selection = plan["selection"][opt]
        for i, (spec, record) in enumerate(pairs):
            tuning.append({
                "single_point": bool(selection.get("single_point")),
                "optimizer": opt, "hyperparameters": spec.hyperparameters,
                "trial_id": record["trial_id"] if record else spec.trial_id,
                "done": record is not None,
                "final_val_loss": None if record is None else analysis.final_value(record),
                "diverged": None if record is None else record.get("diverged"),
                "train_seconds": None if record is None else record["timing"]["train_seconds"],
                "from_full_run": record is not None and record.get("stage") == "final",
                "chosen": selection.get("index") == i})
    plots_dir = os.path.join(output, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    target = (result.get("target") or {}).get("value")
    matched = result.get("matched") or {}
    plots = {
        "loss_vs_steps": plot_curves(os.path.join(plots_dir, f"{task_name}_loss_vs_steps.png"),
                                     finals, "step", f"{task_name}: validation loss vs steps",
                                     target),
        "loss_vs_seconds": plot_curves(
            os.path.join(plots_dir, f"{task_name}_loss_vs_seconds.png"), finals, "seconds",
            f"{task_name}: validation loss vs training seconds", target,
            matched.get("seconds")),
        "quartiles": plot_quartiles(os.path.join(plots_dir, f"{task_name}_quartiles.png"),
                                    result["per_optimizer"],
                                    f"{task_name}: final validation loss per t quartile"),
        "sample_metric_vs_seconds": plot_curves(
            os.path.join(plots_dir, f"{task_name}_sample_metric_vs_seconds.png"), finals,
            "seconds", f"{task_name}: {task.primary_metric} of samples vs training seconds",
            None, matched.get("seconds"), y=task.primary_metric,
            ylabel=f"{task.primary_metric} ({task.curve_samples} samples)", log=True),
    }
    panels = [("held-out data", os.path.join("samples", task_name, "data.png"))]
    for opt, records in finals.items():
        seed0 = next((r for r in records if r.get("samples")), None)
        if seed0:
            panels.append((f"{opt} (seed {seed0['seed']})", seed0["samples"]["png"]))
    plots["samples"] = plot_samples(os.path.join(plots_dir, f"{task_name}_samples.png"), output,
                                    panels, f"{task_name}: final EMA samples")
    plots = {k: None if v is None else os.path.relpath(v, output) for k, v in plots.items()}
    settings_used = {}
    for opt, records in finals.items():
        if records:
            config = records[0].get("config") or {}
            keys = FIXED_KEYS if opt in grids.FIRST_ORDER else FIXED_KEYS + NGD_FIXED_KEYS
            settings_used[opt] = {k: config[k] for k in keys
                                  if k in config and k not in records[0]["hyperparameters"]}
    return {"task": task_name, "description": task.description, "kind": task.kind,
            "config_overrides": settings.config_overrides, "fixed_settings": settings_used,
            "optimizers": list(settings.optimizers), "grid_overrides": settings.grids,
            "primary_metric": task.primary_metric, "horizons": settings.horizons(task),
            "tuning": tuning, "selection": plan["selection"], "analysis": result,
            "floor": _read_floor(output, task_name), "plots": plots,
            "trials": [_strip(r) for pairs in (*plan["tuning"].values(),
                                               *plan["finals"].values()) for _, r in pairs]}


def render_report(output: str, progress=None) -> dict:
    """Write ``results.json``, ``REPORT.md`` and the plots of the benchmark in ``output``."""
    bench = read_benchmark(output)
    settings = protocol.BenchSettings.from_dict(bench["settings"])
    store = TrialStore(output, warn=progress)
    results = {"benchmark": bench, "rendered_at": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "tasks": {}}
    for name in settings.tasks:
        results["tasks"][name] = analyze_task(output, settings, name, store,
                                              (bench.get("trial_ids") or {}).get(name))
    write_json(os.path.join(output, "results.json"), results)
    with open(os.path.join(output, "REPORT.md"), "w") as f:
        f.write(markdown(results, settings))
    if progress:
        progress(f"report: {os.path.join(output, 'REPORT.md')}")
    return clean_json(results)


# -- markdown ----------------------------------------------------------------------------------


CONVENTIONS = """\
Conventions (details in BENCHMARKS.md):

* Same model, data, batch size, loss weighting, EMA and sampler for every optimizer; only the
  optimizer and its hyperparameters change. Stage 1: every grid point once on the tuning
  horizon (seed 0); the lowest final validation loss wins. Stage 2: the winner on the full
  horizon for every seed. Learning rate: linear warm-up (5% of the trial's horizon), cosine
  decay to `final_lr_fraction` exactly at the trial's last step.
* Validation loss: the EMA weights on a fixed bank of (x0, t, eps) (held-out data, drawn once
  with a fixed seed), overall and per quartile of t.
* Training seconds: the sum of the measured training steps (batch fetch, train step incl.
  curvature work, EMA); validation, sampling and metrics excluded. The first step (tracing /
  compilation) is charged the trial's median step time for every optimizer; its raw time is
  reported separately. ms/step: mean of steps 2..n.
* Target: the best first-order optimizer's mean final validation loss. Steps/seconds to target:
  first crossing, linear interpolation between evaluation points; means and 95% t intervals
  over the seeds that reached it (reached/runs shown). For the ratios and the goal check the
  baseline's seeds that never reach its own mean count at the end of their run (a lower
  bound, favouring the baseline). T*: the fastest optimizer's mean full training time;
  losses and sample metrics at T* are interpolated on each run's clock.
* Goal (per natural-gradient optimizer, vs the best first-order one): steps ratio <= 0.5,
  seconds ratio <= 0.7, 95% intervals disjoint, sample quality at T* no worse than Adam's
  (mean <= upper end of Adam's 95% interval).
"""


def _selection_text(selection: dict) -> str:
    if not selection.get("complete"):
        return "tuning incomplete"
    if not selection.get("hyperparameters"):
        return "every tuning run diverged"
    text = grids.format_hyperparameters(selection["hyperparameters"])
    if selection.get("at_edge"):
        text += f" (at the grid edge: {', '.join(selection['at_edge'])})"
    return text


def task_markdown(entry: dict) -> list[str]:
    name = entry["task"]
    result = entry["analysis"]
    per = result["per_optimizer"]
    tune_steps, steps, eval_every = entry["horizons"]
    overrides = entry.get("config_overrides") or {}
    changed = (" Changed for every optimizer (`--set`): "
               + ", ".join(f"{k}={_override_text(v)}" for k, v in sorted(overrides.items()))
               + ".") if overrides else ""
    lines = [f"## {name}", "", f"{entry['description']}.{changed} Tuning horizon {tune_steps} "
             f"steps, full horizon {steps} steps, validation every {eval_every} steps.", ""]

    budget = grids.budgets(entry["optimizers"], entry["grid_overrides"], entry["kind"])
    lines += ["### Tuning (stage 1, seed 0)", "",
              "Tuning budget (trials per optimizer): "
              + ", ".join(f"{opt} {n}" for opt, n in budget.items())
              + ("" if len(set(budget.values())) == 1 else " (**unequal**)") + ".", ""]
    rows = []
    for row in entry["tuning"]:
        loss = fmt(row["final_val_loss"]) if row["done"] else \
            ("single grid point: stage 1 skipped" if row.get("single_point") else "not run")
        if row.get("diverged"):
            loss += " (diverged)"
        if row.get("from_full_run"):
            loss += " (its full run's training)"
        rows.append([row["optimizer"], grids.format_hyperparameters(row["hyperparameters"]),
                     loss, fmt(row["train_seconds"], 3), "**chosen**" if row["chosen"] else ""])
    lines += _table(["optimizer", "hyperparameters", "final val loss", "train s", ""], rows)
    edges = [f"{opt}: {', '.join(sel['at_edge'])}" for opt, sel in entry["selection"].items()
             if sel.get("at_edge")]
    if edges:
        lines += ["", "Best value at the edge of its grid (the optimum may lie outside): "
                  + "; ".join(edges) + "."]
    lines.append("")

    if not per:
        return lines + ["No stage-2 run finished yet.", ""]
    target = result.get("target")
    matched = result.get("matched") or {}
    lines += ["### Results (stage 2)", ""]
    if target:
        lines.append(f"Target: {fmt(target['value'])} = mean final validation loss of "
                     f"**{target['optimizer']}** (best first-order optimizer). "
                     f"Matched steps S* = {matched.get('steps')}; matched seconds "
                     f"T* = {fmt(matched.get('seconds'), 3)} s (mean full run of "
                     f"{matched.get('seconds_optimizer')}).")
    else:
        lines.append("No first-order optimizer finished: no target.")
    lines.append("")
    fixed = entry.get("fixed_settings") or {}
    if fixed:
        lines += ["Settings not tuned (from the trial files; momentum None = the optimizer's "
                  "default: 0.9 Nesterov for sgd, 0.5 for kfac): "
                  + "; ".join(f"{opt}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                              for opt, values in fixed.items()) + ".", ""]
    metric = entry["primary_metric"]
    label = METRIC_LABELS.get(metric, metric)
    rows = []
    for opt, e in per.items():
        sel = entry["selection"].get(opt, {})
        rows.append([
            opt, _selection_text(sel), len(e["seeds"]), fmt_ci(e["final_val_loss"]),
            fmt_reached(e.get("steps_to_target"), 4), fmt_reached(e.get("seconds_to_target"), 3),
            fmt_ci(e.get("at_half_steps")), fmt_ci(e.get("at_matched_seconds")),
            fmt_ci(e["samples"].get(metric)),
            fmt_ci(e.get("samples_at_matched_seconds", {}).get(metric)),
            f"{fmt(e['ms_per_step']['mean'], 3)} ({fmt(e.get('ms_per_step_vs_adam'), 3)}x)",
            fmt_ci(e["train_seconds"], 3)])
    lines += _table(["optimizer", "config", "seeds", "final val loss (= at S*)",
                     "steps to target", "seconds to target", "loss at S*/2", "loss at T*",
                     f"{label} final", f"{label} at T*", "ms/step (vs Adam)", "train s"], rows)
    lines += ["", "Intervals: 95% t over seeds; `(k/n)`: seeds that reached the target. "
              f"Sample metrics: {label} of the EMA samples vs held-out data (lower is better); "
              "'at T*' is interpolated on the sample curve (samples drawn at every evaluation; "
              "comparable to 'final' only when the curve and final sample counts are equal, "
              "as for the 2-D tasks).", ""]

    if result.get("goal"):
        lines += ["### Goal check (natural gradient vs the best first-order optimizer)", ""]
        rows = []
        for opt, goal in result["goal"].items():
            ratios = result["ratios"][opt]
            parts = goal["parts"]
            rows.append([opt, fmt(ratios["steps"], 3), fmt_bool(parts["steps_ratio"]),
                         fmt_bool(parts["steps_intervals_disjoint"]), fmt(ratios["seconds"], 3),
                         fmt_bool(parts["seconds_ratio"]),
                         fmt_bool(parts["seconds_intervals_disjoint"]),
                         fmt_bool(parts["sample_quality"]),
                         "**met**" if goal["met"] else "not met"])
        lines += _table(["optimizer", "steps ratio", "<= 0.5", "steps CI disjoint",
                         "seconds ratio", "<= 0.7", "seconds CI disjoint",
                         "samples at T* no worse than Adam", "goal"], rows)
        reference = (target or {}).get("baseline_to_target") or {}
        if reference:
            lines += ["", f"Baseline ({target['optimizer']}) for the ratios: "
                      f"{fmt_ci(reference['steps'])} steps, "
                      f"{fmt_ci(reference['seconds'], 3)} s to target, with "
                      f"{reference['censored']} of its seeds that never reached its own mean "
                      "counted at the end of their run (a lower bound, which favours the "
                      "baseline)."]
        lines += [""] + [f"* {opt}: {goal['sample_quality_detail']}"
                         for opt, goal in result["goal"].items()] + [""]

    lines += ["### Final validation loss per quartile of t", ""]
    rows = [[opt] + [fmt_ci(e["quartiles"][q]) for q in analysis.QUARTILES]
            for opt, e in per.items()]
    lines += _table(["optimizer", "q1 (t < T/4)", "q2", "q3", "q4 (t >= 3T/4)"], rows) + [""]

    names = sorted({name for e in per.values() for name in e["samples"]})
    floor = entry.get("floor") or {}
    if names:
        lines += ["### Final sample metrics (vs held-out data, lower is better)", ""]
        rows = [[opt] + [fmt_ci(e["samples"].get(n)) for n in names] for opt, e in per.items()]
        if floor.get("metrics"):
            rows.append([f"real data ({floor['num_samples']} training points)"]
                        + [fmt(floor["metrics"].get(n)) for n in names])
        lines += _table(["optimizer"] + [METRIC_LABELS.get(n, n) for n in names], rows) + [""]
    skipped = sorted({e.get("samples_skipped") for e in per.values()} - {None})
    if skipped:
        lines += [f"Sample metrics skipped: {skipped[0]}", ""]

    scored = {opt: e for opt, e in per.items() if (e.get("bits_per_dim") or {}).get("n")}
    if scored:
        chain = " / ".join(str(n) for n in sorted(
            {n for e in scored.values() for n in e["bits_per_dim"]["chain_steps"]}))
        lines += ["### Held-out likelihood (bits/dim, lower is better)", ""]
        rows = [[opt, fmt_ci(e["bits_per_dim"]), f"{e['bits_per_dim']['n']}/{len(e['seeds'])}"]
                for opt, e in scored.items()]
        lines += _table(["optimizer", "bits/dim final", "seeds scored"], rows)
        if all(e["bits_per_dim"].get("full_chain") for e in scored.values()):
            chain_text = f"the full {chain}-step chain (x0 clipped)"
        else:
            chain_text = (f"a {chain}-step respaced chain (linspace, x0 clipped; a looser bound "
                          "than the full chain's, the same for every optimizer)")
        lines += ["", "The DDPM variational bound of the final EMA weights on the held-out "
                  f"images, on {chain_text}. Intervals over seeds.", ""]

    lines += ["### Step time", ""]
    rows = []
    for opt, e in per.items():
        b = e["breakdown"]
        rows.append([opt, fmt(b.get("median_ms"), 3), fmt(b.get("mean_ms"), 3),
                     fmt(e.get("ms_per_step_vs_adam"), 3), fmt(b.get("first_step_s"), 3),
                     fmt(b.get("plain_step_ms"), 3), fmt(b.get("refresh_step_ms"), 3),
                     fmt(b.get("inverse_amortised_ms"), 3),
                     "n/a" if e.get("skipped_updates") is None else int(e["skipped_updates"])])
    lines += _table(["optimizer", "median ms/step", "mean ms/step", "mean vs Adam",
                     "first step s (trace)", "ms/step without inverse refresh",
                     "ms/step with refresh", "refresh cost amortised ms/step",
                     "skipped updates (all seeds)"], rows)
    lines += ["", "Estimated from each run's per-step times (mean over seeds). For K-FAC the "
              "step without refresh holds forward, backward, curvature statistics, "
              "preconditioning and update; its excess over Adam's median is the statistics + "
              "preconditioning cost; the refresh columns give the eigendecomposition cost.", ""]

    plots = entry["plots"]
    for key, caption in (("loss_vs_steps", "validation loss vs steps"),
                         ("loss_vs_seconds", "validation loss vs training seconds"),
                         ("quartiles", "final loss per t quartile"),
                         ("sample_metric_vs_seconds", f"{label} along training"),
                         ("samples", "final samples")):
        if plots.get(key):
            lines += [f"![{name}: {caption}]({plots[key]})", ""]
    return lines


def markdown(results: dict, settings: protocol.BenchSettings) -> str:
    bench = results["benchmark"]
    env = bench.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    lines = ["# Optimizer benchmark report", "",
             f"Rendered {results['rendered_at']} from the trial files in this directory "
             f"(benchmark started {bench.get('started_at')}, finished "
             f"{bench.get('finished_at', 'not yet')}).", "",
             "Reproduce every number (a rerun skips finished trials; delete `trials/` to "
             "retrain):", "", "```", bench.get("command", "tfngd-bench"), "```", "",
             f"Environment: Python {env.get('python')}, {versions}; {env.get('platform')}; "
             f"{env.get('cpu_count')} CPUs; load average at the start "
             f"{env.get('loadavg')}, at the end {bench.get('environment_end', {}).get('loadavg')}."
             " Wall-clock numbers were measured on a shared machine (other processes ran "
             "concurrently), so they carry contention noise; stage 2 runs seed-major so that "
             "load changes hit every optimizer alike.", "",
             f"Optimizers: {', '.join(settings.optimizers)}; seeds: {settings.seeds}.", "",
             CONVENTIONS]
    for entry in results["tasks"].values():
        lines += task_markdown(entry)
    return "\n".join(lines).rstrip() + "\n"
