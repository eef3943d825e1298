"""The comparison of strategies: deltas with paired bootstrap intervals, mean and spread over seeds, the
Markdown table, the gain-against-forgetting figure and the replay-ratio sweep.

A delta is trained minus base on the same items. Its interval resamples the items (desta.core.stats):
for a strategy run with several seeds, each item's difference is first averaged over the seeds, so the
interval is that of the seed mean; the spread over seeds (standard deviation of the per-seed deltas) is
reported beside it. The retained score is the mean of three rates (format following, refusing harmful
requests, answering safe ones; format following alone when there are no refusal items); its interval
resamples within each rate (stratified).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from desta.core.hub import public_name
from desta.core.stats import bootstrap_table, mean_interval
from desta.posttrain.retention import RETAINED

DELTA_MEASURES = ("task_accuracy", "format_following", "json_validity", "refusal_rate", "over_refusal_rate",
                  "own_answer_loglik", "heldout_loglik")
RETAINED_SIGN = {"format_following": 1.0, "refusal_rate": 1.0, "over_refusal_rate": -1.0}  # over-refusal: lower


def item_differences(base: dict[str, list[float]], runs: list[dict[str, list[float]]], measure: str) -> np.ndarray:
    """Each item's trained-minus-base score, averaged over the runs (seeds) given.

    >>> item_differences({"m": [0, 1, 1]}, [{"m": [1, 1, 0]}, {"m": [1, 0, 0]}], "m").tolist()
    [1.0, -0.5, -1.0]
    """
    return np.mean([np.asarray(r[measure], dtype=float) - np.asarray(base[measure], dtype=float) for r in runs],
                   axis=0)


def retained_measures(base: dict[str, list[float]]) -> list[str]:
    """The rates the retained score averages: those of RETAINED that have items (no refusal set: format alone).

    >>> retained_measures({"format_following": [1.0], "refusal_rate": [], "over_refusal_rate": []})
    ['format_following']
    """
    return [m for m in RETAINED if base.get(m)]


def delta_stats(base: dict[str, list[float]], runs: list[dict[str, list[float]]], seed: int = 0) -> dict[str, dict]:
    """Per measure (and "retained"): the delta of the seed mean, its 95 % paired bootstrap interval, and the
    standard deviation of the per-seed deltas (None for one seed). Measures with no items are left out."""
    out: dict[str, dict] = {}
    for measure in DELTA_MEASURES:
        if not base.get(measure):
            continue
        value, low, high = mean_interval(item_differences(base, runs, measure), seed=seed)
        per_seed = [float(np.mean(r[measure]) - np.mean(base[measure])) for r in runs]
        out[measure] = {"value": value, "ci": None if math.isnan(low) else [low, high],
                        "sd": float(np.std(per_seed, ddof=1)) if len(runs) > 1 else None, "per_seed": per_seed}
    rates = retained_measures(base)
    strata = [m for m in rates for _ in base[m]]
    diffs = np.concatenate([RETAINED_SIGN[m] * item_differences(base, runs, m) for m in rates])
    overall = bootstrap_table(strata, {"delta": diffs.tolist()}, seed=seed)["overall"]
    per_seed = [float(np.mean([RETAINED_SIGN[m] * (np.mean(r[m]) - np.mean(base[m])) for m in rates]))
                for r in runs]
    out["retained"] = {"value": overall["values"]["delta"], "ci": overall["ci"]["delta"],
                       "sd": float(np.std(per_seed, ddof=1)) if len(runs) > 1 else None, "per_seed": per_seed}
    return out


def _cell(stat: dict | None, digits: int = 2) -> str:
    """A delta as "+0.12 [+0.05, +0.19]" (± the spread over seeds when there are several), bold when the
    interval leaves out 0."""
    if stat is None:
        return "-"
    text = f"{stat['value']:+.{digits}f}"
    if stat.get("sd") is not None:
        text += f" ± {stat['sd']:.{digits}f}"
    ci = stat.get("ci")
    if ci:
        if ci[0] > 0 or ci[1] < 0:
            text = f"**{text}**"
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return text


def render_comparison(comparison: dict) -> str:
    """The comparison as Markdown: the base model's scores, one row per strategy with each delta and its
    interval, the knowledge split where knowledge_filter ran, the replay sweep and the total time."""
    base, n = comparison["base"]["means"], comparison["base"]["items"]
    rate = {k: "-" if v is None else f"{v:.3f}" for k, v in base.items()}
    retained = ("format following, refusing harmful requests and answering safe ones" if n.get("refusal_rate")
                else "format following alone (no refusal items)")
    lines = [f"# Forgetting comparison: {public_name(comparison['model'])} ({comparison['style']})", "",
             "Each delta is trained minus base on the same items, with its 95 % paired bootstrap interval in brackets "
             "(bold: the interval leaves out 0). With several seeds: the seed mean ± the standard deviation over "
             "seeds, and the interval of the seed mean. Task: held-out new-task accuracy (verifier). Retained: mean "
             f"of {retained} (a drop is forgetting). "
             "Own-answer log-lik: how likely the model still finds the base model's answers to general requests "
             "(nats/token; a drop is forgetting). Held-out log-lik: the same for five held-out texts.", "",
             f"Items: task {n['task_accuracy']}, format {n['format_following']}, harmful {n['refusal_rate']}, safe "
             f"{n['over_refusal_rate']}, own answers {n['own_answer_loglik']}, held-out texts {n['heldout_loglik']}.",
             "", "| model | task acc. | format | refusal | over-refusal | own-answer log-lik | held-out log-lik |",
             "|---|---|---|---|---|---|---|",
             f"| base | {rate['task_accuracy']} | {rate['format_following']} | {rate['refusal_rate']} | "
             f"{rate['over_refusal_rate']} | {rate['own_answer_loglik']} | {rate['heldout_loglik']} |", "",
             "| strategy | seeds | rows | task acc. | Δ task | Δ format | Δ refusal | Δ over-refusal | Δ retained | "
             "Δ own-answer log-lik | Δ held-out log-lik |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in comparison["strategies"]:
        d = row["deltas"]
        lines.append(f"| {row['strategy']} | {len(row['seeds'])} | {row['train_rows']} | "
                     f"{row['metrics']['task_accuracy']:.3f} | {_cell(d['task_accuracy'])} | "
                     f"{_cell(d['format_following'])} | {_cell(d.get('refusal_rate'))} | "
                     f"{_cell(d.get('over_refusal_rate'))} | "
                     f"{_cell(d['retained'], 3)} | {_cell(d['own_answer_loglik'], 3)} | "
                     f"{_cell(d['heldout_loglik'], 3)} |")
    splits = [(row["strategy"], row["notes"]["knowledge"]) for row in comparison["strategies"]
              if "knowledge" in row["notes"]]
    if splits:
        names = list(splits[0][1]["split"])
        lines += ["", "Knowledge split of the training items by the base model's answers (knowledge_filter):", "",
                  "| strategy | " + " | ".join(names) + " | dropped |", "|---" * (len(names) + 2) + "|"]
        lines += [f"| {name} | " + " | ".join(str(k["split"][c]) for c in names) + f" | {k['dropped']} |"
                  for name, k in splits]
    lines += knowledge_lines(comparison)
    if comparison.get("sweep"):
        lines += ["", "Replay-ratio sweep (replay at each share of the training rows; 0 is sft):", "",
                  "| replay ratio | run | Δ task | Δ format | Δ retained | Δ own-answer log-lik |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['ratio']:g} | {p['run']} | {_cell(p['deltas']['task_accuracy'])} | "
                  f"{_cell(p['deltas']['format_following'])} | {_cell(p['deltas']['retained'], 3)} | "
                  f"{_cell(p['deltas']['own_answer_loglik'], 3)} |"
                  for p in comparison["sweep"]]
    notes = [f"- {row['strategy']}: " + "; ".join(f"{k}: {v}" for k, v in row["notes"].items() if k != "knowledge")
             for row in comparison["strategies"] if any(k != "knowledge" for k in row["notes"])]
    if notes:
        lines += ["", "What the data transforms did (first seed):", "", *notes]
    lines += render_head_to_head(comparison)
    lines += ["", f"Total time: {comparison['seconds'] / 60:.1f} min of runs (base and every run, across resumed "
                  "invocations).", ""]
    return "\n".join(lines)


def head_to_head(results: list[dict[str, Any]], pairs: list[list[str]], first_seed: int) -> list[dict[str, Any]]:
    """For each [first, second] pair of strategies: second minus first on the same items (their first-seed runs),
    with 95 % paired bootstrap intervals (`delta_stats` with the first as the reference). Pairs with a strategy
    that has no run are left out."""
    runs = {r["name"]: r for r in sorted(results, key=lambda r: r["seed"] != first_seed) if "scores" in r}
    return [{"first": a, "second": b, "deltas": delta_stats(runs[a]["scores"], [runs[b]["scores"]]),
             "metrics": {a: runs[a]["metrics"], b: runs[b]["metrics"]}}
            for a, b in pairs if a in runs and b in runs]


def render_head_to_head(comparison: dict) -> list[str]:
    """comparison.md's head-to-head table, and, when rule_adapter ran, the rule-adapter table (base, base + rules
    and each strategy it is paired with, side by side)."""
    pairs = comparison.get("head_to_head") or []
    if not pairs:
        return []
    lines = ["", "Head to head: the second strategy minus the first on the same items (first seed), 95 % paired "
                 "bootstrap intervals (bold: the interval leaves out 0):", "",
             "| first | second | Δ task | Δ format | Δ own-answer log-lik | Δ held-out log-lik |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p['first']} | {p['second']} | {_cell(p['deltas']['task_accuracy'])} | "
              f"{_cell(p['deltas']['format_following'])} | {_cell(p['deltas']['own_answer_loglik'], 3)} | "
              f"{_cell(p['deltas']['heldout_loglik'], 3)} |" for p in pairs]
    ruled = [p for p in pairs if "rule_adapter" in (p["first"], p["second"])]
    if ruled:
        partners = [(p["second"] if p["first"] == "rule_adapter" else p["first"], p) for p in ruled]
        rows = [("base", comparison["base"]["means"]),
                ("base + rules (rule_adapter)", ruled[0]["metrics"]["rule_adapter"])]
        rows += [(name, p["metrics"][name]) for name, p in partners]
        lines += ["", "Rule-based adapter: the base model, the base model decoding with the rules (no training), and "
                      "the trained model it is paired with, on the same items:", "",
                  "| model | task acc. | format | own-answer log-lik | held-out log-lik |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {m['task_accuracy']:.3f} | {m['format_following']:.3f} | {m['own_answer_loglik']:.3f} | "
                  f"{m['heldout_loglik']:.3f} |" for name, m in rows]
    return lines


def knowledge_lines(comparison: dict) -> list[str]:
    """The knowledge-split prediction in one table: held-out task accuracy after training on HighlyKnown/MaybeKnown
    items only and on Unknown items only, each against the base, and the difference between the two."""
    rows = {r["strategy"]: r for r in comparison["strategies"]}
    pair = next((p for p in comparison.get("head_to_head") or []
                 if (p["first"], p["second"]) == ("knowledge_known", "knowledge_unknown")), None)
    if "knowledge_known" not in rows or "knowledge_unknown" not in rows:
        return []
    lines = ["", "What the knowledge split predicts (Gekhman et al.: fine-tuning on Unknown items hurts held-out "
                 "accuracy): the same number of training items, all HighlyKnown/MaybeKnown or all Unknown:", "",
             "| trained on | items | held-out task acc. | Δ task vs base | Δ format | Δ own-answer log-lik |",
             "|---|---|---|---|---|---|"]
    for name, label in (("knowledge_known", "HighlyKnown + MaybeKnown"), ("knowledge_unknown", "Unknown")):
        row = rows[name]
        lines.append(f"| {label} | {row['notes']['knowledge']['items']} | {row['metrics']['task_accuracy']:.3f} | "
                     f"{_cell(row['deltas']['task_accuracy'])} | {_cell(row['deltas']['format_following'])} | "
                     f"{_cell(row['deltas']['own_answer_loglik'], 3)} |")
    if pair:
        lines.append(f"| Unknown minus known | | | {_cell(pair['deltas']['task_accuracy'])} | "
                     f"{_cell(pair['deltas']['format_following'])} | {_cell(pair['deltas']['own_answer_loglik'], 3)} |")
    return lines


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares line (slope, intercept) and Pearson r; None when x does not vary."""
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else 0.0
    return float(slope), float(intercept), r


def _error_bars(stats: list[dict], sign: int) -> np.ndarray:
    """matplotlib's (2, n) distances from each plotted value (sign x delta) to its interval's ends; 0 where a
    run has no interval."""
    bars = np.zeros((2, len(stats)))
    for i, stat in enumerate(stats):
        if stat.get("ci"):
            ends = sorted(sign * v for v in stat["ci"])
            bars[:, i] = [max(sign * stat["value"] - ends[0], 0.0), max(ends[1] - sign * stat["value"], 0.0)]
    return bars


def plot_forgetting(comparison: dict, path: Path) -> None:
    """Save the lectures' figure to `path`: one point per run (strategy and seed), new-task gain (x) against
    forgetting (y): the drop of the retained score (left) and of the own-answer log-likelihood (right), each
    with its 95 % intervals and the least-squares line through the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = comparison["runs"]
    names = list(dict.fromkeys(r["name"] for r in runs))
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = [("retained", "forgetting: retained-score drop (rates)"),
              ("own_answer_loglik", "forgetting: own-answer log-lik drop (nats/token)")]
    x = np.array([r["deltas"]["task_accuracy"]["value"] for r in runs])
    xerr = _error_bars([r["deltas"]["task_accuracy"] for r in runs], sign=1)
    for ax, (measure, label) in zip(axes, panels, strict=True):
        y = np.array([-r["deltas"][measure]["value"] for r in runs])
        yerr = _error_bars([r["deltas"][measure] for r in runs], sign=-1)
        for name in names:
            mine = [i for i, r in enumerate(runs) if r["name"] == name]
            ax.errorbar(x[mine], y[mine], xerr=xerr[:, mine], yerr=yerr[:, mine], fmt="none", ecolor=colours[name],
                        alpha=0.35, lw=1)
            ax.scatter(x[mine], y[mine], s=50, color=colours[name], label=name, zorder=3)
        fit = _fit(x, y)
        if fit:
            slope, intercept, r = fit
            grid = np.linspace(x.min(), x.max(), 20)
            ax.plot(grid, slope * grid + intercept, color="#444", lw=1, ls="--")
            ax.text(0.02, 0.98, f"fitted line (dashed): slope {slope:+.2f}, r {r:+.2f}, {len(x)} runs",
                    transform=ax.transAxes, va="top", fontsize=8, color="#444")
        ax.axhline(0, color="#999", lw=0.8)
        ax.axvline(0, color="#999", lw=0.8)
        ax.set_xlabel("new-task gain (accuracy, trained - base)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{public_name(comparison['model'])}: gain against forgetting, one point per strategy and seed, "
                 "95 % intervals (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_replay_sweep(sweep: list[dict], path: Path) -> None:
    """Save the replay-ratio sweep to `path`: new-task gain, retained-score and format-following change (left,
    rates) and the own-answer log-likelihood change (right, nats/token) against the replay ratio, each with
    its 95 % interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ratios = np.array([p["ratio"] * 100 for p in sweep])
    rates = (("task_accuracy", "Δ task accuracy"), ("retained", "Δ retained score"),
             ("format_following", "Δ format following"))
    if all(np.isclose(p["deltas"]["retained"]["value"], p["deltas"]["format_following"]["value"])
           for p in sweep):  # no refusal items: the retained score is format following itself
        rates = (("task_accuracy", "Δ task accuracy"), ("format_following", "Δ format following (= retained)"))
    panels = [(axes[0], "trained - base (rate)", rates),
              (axes[1], "trained - base (nats/token)", (("own_answer_loglik", "Δ own-answer log-lik"),))]
    for ax, ylabel, measures in panels:
        for measure, label in measures:
            stats = [p["deltas"][measure] for p in sweep]
            values = np.array([stat["value"] for stat in stats])
            ax.errorbar(ratios, values, yerr=_error_bars(stats, sign=1), marker="o", capsize=3, label=label)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_xlabel("replay ratio (% of training rows)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("replay-ratio sweep: 0 % is sft, one seed per ratio (95 % intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(comparison_runs: list[dict[str, Any]], base: dict[str, Any], sweep: list[tuple[float, str]],
              first_seed: int) -> tuple[list[dict], list[dict]]:
    """Per strategy (runs of the same name, one per seed): seeds, rows, mean metrics, `delta_stats` and the
    first seed's notes; and the sweep's points (ratio, the run name that stands for it, its deltas)."""
    groups: dict[str, list[dict]] = {}
    for run in comparison_runs:
        groups.setdefault(run["name"], []).append(run)
    rows = []
    for name, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        first = next((r for r in runs if r["seed"] == first_seed), runs[0])
        rows.append({"strategy": name, "seeds": [r["seed"] for r in runs], "train_rows": first["train_rows"],
                     "notes": first["notes"],
                     "metrics": {k: None if v is None else float(np.mean([r["metrics"][k] for r in runs]))
                                 for k, v in first["metrics"].items()},
                     "deltas": delta_stats(base["scores"], [r["scores"] for r in runs])})
    points = []
    for ratio, name in sweep:
        run = next(r for r in groups[name] if r["seed"] == first_seed)
        points.append({"ratio": ratio, "run": name, "deltas": run["deltas"]})
    return rows, points
