"""`desta compare`: several eval reports side by side, each metric against training progress.

Reads report.json files of `desta eval`, each named RUN:X (a run, and where in training its
checkpoint was: an epoch or a step). Writes OUT/compare.md (one table per metric: runs by X, value
and 95 % interval), OUT/compare.json and OUT/compare.png (one panel per metric, a line per run,
interval whiskers), so "score and forgetting against epochs per target kind" is one command. A
category's score stands beside what guessing scores there (the stronger of chance and the best
constant answer, from the reports): a row of the table and a dashed line in its panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desta.core.args import raise_problems
from desta.core.artifacts import REPORT_JSON
from desta.core.summary import Summary

DEFAULT_METRICS = ["overall:speech", "instruction_following:speech", "overall:agreement:speech",
                   "overall:forgetting_asr:speech"]
SCORES = ("speech", "text", "text_asr")  # metric kinds that are scores, comparable with guessing
METRIC_NAMES = {"above_chance": "score above chance",
                "speech": "score", "agreement": "agreement with text-gold", "rouge_l": "ROUGE-L vs text-gold",
                "forgetting_asr": "forgetting vs text-ASR", "forgetting": "forgetting vs text-gold",
                "text_asr": "text-ASR score", "text": "text-gold score"}


@dataclass
class CompareConfig:
    """Plot and tabulate eval metrics of several runs against their training progress."""

    POSITIONAL = ("reports",)
    reports: list[str]
    """RUN:X=PATH entries: a run name, its epoch or step, and a desta eval folder or report.json"""
    out: str = "compare"
    """folder for compare.md, compare.json and compare.png"""
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    """CATEGORY:NAME from the reports' tables (e.g. overall:speech, gender:speech, overall:forgetting:speech) or
    probes:NAME (e.g. probes:format_following)"""
    x_label: str = "epoch"
    """what X counts"""
    runs: list[str] = field(default_factory=list)
    """NAME=FOLDER training runs (desta train output folders) whose loss curves and speed go beside the table"""
    title: str = ""
    """figure title"""
    paired_with: str | None = None
    """a run to set every other run against at the same X: the overall speech-score difference, paired item by
    item (the reports must hold the same items), with its bootstrap 95 % interval"""

    def __post_init__(self) -> None:
        problems = []
        for entry in self.reports:
            try:
                parse_entry(entry)
            except ValueError as err:
                problems.append(("reports", str(err)))
        problems += [("runs", f"{run!r} is not NAME=FOLDER") for run in self.runs if "=" not in run]
        bad = [m for m in self.metrics if ":" not in m]
        if bad or not self.metrics:
            problems.append(("metrics", f"each metric is CATEGORY:NAME, e.g. overall:speech; got {bad}"))
        raise_problems(problems)


def parse_entry(entry: str) -> tuple[str, float, Path]:
    """RUN:X=PATH -> (run, x, report.json path).

    >>> parse_entry("labels-lora:2=runs/x/eval-2")
    ('labels-lora', 2.0, PosixPath('runs/x/eval-2/report.json'))
    """
    head, sep, path = entry.partition("=")
    run, colon, x = head.rpartition(":")
    if not (sep and colon and run):
        raise ValueError(f"{entry!r} is not RUN:X=PATH, e.g. self_output:1=runs/targets/self/eval-1")
    try:
        position = float(x)
    except ValueError:
        raise ValueError(f"{entry!r}: X must be a number (an epoch or a step), got {x!r}") from None
    report = Path(path)
    return run, position, report / REPORT_JSON if report.suffix != ".json" else report


def metric(report: dict[str, Any], name: str) -> tuple[float | None, list[float] | None]:
    """A metric's value and interval from a report: CATEGORY:NAME or probes:NAME."""
    category, _, key = name.partition(":")
    if category == "probes":
        probes = next(iter(report.get("retention_probes", {}).values()), {})
        return probes.get(key), None
    row = report["overall"] if category == "overall" else report["categories"].get(category)
    if row is None:
        return None, None
    return row["values"].get(key), row["ci"].get(key)


def guessing(report: dict[str, Any], name: str) -> float | None:
    """What guessing scores for a score metric of one category (the stronger of chance and the best constant
    answer); None for the overall row (it mixes closed and open categories), other metrics, or old reports."""
    category, _, key = name.partition(":")
    if category in ("overall", "probes") or key.split(":")[0] not in SCORES:
        return None
    row = report["categories"].get(category) or {"values": {}}
    levels = [row["values"].get(k) for k in ("chance", "constant") if row["values"].get(k) is not None]
    return max(levels) if levels else None


def compare(config: CompareConfig) -> Summary:
    """Read the reports, write the tables and the figure; returns {metric: {run: [[x, value, low, high]]}}."""
    runs: dict[str, list[tuple[float, dict]]] = {}
    for entry in config.reports:
        run, x, path = parse_entry(entry)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (from {entry!r}); give a desta eval output folder")
        runs.setdefault(run, []).append((x, json.loads(path.read_text())))
    table: dict[str, dict[str, list]] = {}
    chance: dict[str, float] = {}
    for name in config.metrics:
        table[name] = {}
        levels = [level for points in runs.values() for _, report in points
                  if (level := guessing(report, name)) is not None]
        if levels:
            chance[name] = max(levels)
        for run, points in runs.items():
            rows = []
            for x, report in sorted(points, key=lambda p: p[0]):
                value, ci = metric(report, name)
                rows.append([x, value, *(ci or [None, None])])
            table[name][run] = rows
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    training = {name: _training(Path(folder)) for name, _, folder in (r.partition("=") for r in config.runs)}
    differences = paired_differences(runs, config.paired_with) if config.paired_with else {}
    (out / "compare.json").write_text(json.dumps({"metrics": table, "runs": training, "paired": differences,
                                                  "chance": chance}, indent=2))
    markdown = (render(table, config.x_label, chance) + render_paired(differences, config.paired_with, config.x_label)
                + render_runs(training))
    (out / "compare.md").write_text(markdown)
    plot(table, config.x_label, config.title, out / "compare.png", chance)
    if training:
        plot_losses(training, out / "loss_curves.png")
    return Summary(table, markdown + f"wrote {out}/compare.md, compare.json, compare.png")


def paired_differences(runs: dict[str, list[tuple[float, dict]]], baseline: str) -> dict[str, list]:
    """Each run's overall speech score minus `baseline`'s at the same X, paired by item and resampled within
    each category as desta eval does: {run: [[x, difference, low, high]]}."""
    from desta.core.stats import bootstrap_table

    if baseline not in runs:
        raise ValueError(f"paired_with={baseline!r} is none of the runs {sorted(runs)}")
    base = dict(runs[baseline])
    found: dict[str, list] = {}
    for run, points in runs.items():
        for x, report in sorted(points, key=lambda p: p[0]):
            if run == baseline or x not in base:
                continue
            mine, theirs = report["per_item"], base[x]["per_item"]
            if [i["item_id"] for i in mine] != [i["item_id"] for i in theirs]:
                raise ValueError(f"{run} and {baseline} at {x:g} were evaluated on different items; pair reports "
                                 "of the same eval set")
            system = report["systems"][0]
            other = base[x]["systems"][0]
            diff = [None if a.get(f"{system}_score") is None or b.get(f"{other}_score") is None
                    else a[f"{system}_score"] - b[f"{other}_score"] for a, b in zip(mine, theirs, strict=True)]
            overall = bootstrap_table([i["category"] for i in mine], {"d": diff})["overall"]
            found.setdefault(run, []).append([x, overall["values"]["d"], *(overall["ci"]["d"] or [None, None])])
    return found


def render_paired(differences: dict[str, list], baseline: str | None, x_label: str) -> str:
    """The paired-difference table of compare.md ("~": the interval includes 0)."""
    if not differences:
        return ""
    xs = sorted({row[0] for rows in differences.values() for row in rows})
    lines = ["", f"## overall: score minus {baseline}'s (paired by item)", "",
             "| run | " + " | ".join(f"{x_label} {x:g}" for x in xs) + " |", "|" + "---|" * (len(xs) + 1)]
    for run, rows in differences.items():
        by_x = {row[0]: row for row in rows}
        cells = []
        for x in xs:
            row = by_x.get(x)
            if row is None or row[1] is None:
                cells.append("n/a")
                continue
            cells.append(f"{row[1]:+.2f}" + ("" if row[2] is None else f" [{row[2]:+.2f}, {row[3]:+.2f}]"
                                             + (" ~" if row[2] <= 0 <= row[3] else "")))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", ""])


def _training(folder: Path) -> dict[str, Any]:
    """A training run's summary and loss history."""
    from desta.core.artifacts import LOG_HISTORY, SUMMARY

    for name in (SUMMARY, LOG_HISTORY):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found; give the output folder of a finished desta train")
    history = json.loads((folder / LOG_HISTORY).read_text())
    return {"summary": json.loads((folder / SUMMARY).read_text()),
            "train": [(r["step"], r["loss"]) for r in history if "loss" in r],
            "eval": [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]}


def render_runs(training: dict[str, dict]) -> str:
    """The runs' speed and losses, when given."""
    if not training:
        return ""
    lines = ["## training runs", "", "| run | steps | samples/s | minutes | first train loss | last train loss | "
             "validation loss (first -> last) |", "|---|---|---|---|---|---|---|"]
    for name, run in training.items():
        s, evals = run["summary"], run["eval"]
        valid = f"{evals[0][1]:.3f} -> {evals[-1][1]:.3f}" if evals else "n/a"
        lines.append(f"| {name} | {s['steps']} | {s['samples_per_second']} | {s['seconds'] / 60:.1f} | "
                     f"{s['first_train_loss']:.3f} | {s['last_train_loss']:.3f} | {valid} |")
    return "\n".join(lines) + "\n"


def plot_losses(training: dict[str, dict], path: Path) -> None:
    """Training and validation loss against steps, a colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, run) in enumerate(training.items()):
        color = f"C{k}"
        if run["train"]:
            ax.plot(*zip(*run["train"], strict=True), color=color, alpha=0.4, label=f"{name}: train")
        if run["eval"]:
            ax.plot(*zip(*run["eval"], strict=True), "o-", color=color, label=f"{name}: validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(name: str) -> str:
    category, _, key = name.partition(":")
    kind = key.split(":")[0]
    return f"{category}: {METRIC_NAMES.get(kind, key)}"


def render(table: dict[str, dict[str, list]], x_label: str, chance: dict[str, float] | None = None) -> str:
    """compare.md: one table per metric, a row per run, a column per X; a score's table ends with what
    guessing scores."""
    lines = []
    chance = chance or {}
    for name, runs in table.items():
        xs = sorted({row[0] for rows in runs.values() for row in rows})
        percent = "forgetting" in name or "asr_cost" in name
        lines += [f"## {_label(name)}", "", "| run | " + " | ".join(f"{x_label} {x:g}" for x in xs) + " |",
                  "|" + "---|" * (len(xs) + 1)]
        for run, rows in runs.items():
            by_x = {row[0]: row for row in rows}
            cells = [_cell(by_x.get(x), percent) for x in xs]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        if name in chance:
            lines.append("| *guessing (chance or the best constant answer)* | "
                         + " | ".join(f"{chance[name]:.2f}" for _ in xs) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(row: list | None, percent: bool) -> str:
    if row is None or row[1] is None:
        return "n/a"
    _, value, low, high = row
    fmt = (lambda v: f"{v:+.0%}") if percent else (lambda v: f"{v:.2f}")
    text = fmt(value)
    if low is not None:
        text += f" [{fmt(low)}, {fmt(high)}]" + (" ~" if percent and low <= 0 <= high else "")
    return text


def plot(table: dict[str, dict[str, list]], x_label: str, title: str, path: Path,
         chance: dict[str, float] | None = None) -> None:
    """One panel per metric; a line per run with 95 % interval whiskers; a dashed line where guessing scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(table)
    columns = min(panels, 2)
    rows = (panels + columns - 1) // columns
    # constrained layout leaves room for the suptitle; tight_layout lets a long one run into the first panels
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.8 * rows), squeeze=False, layout="constrained")
    for ax, (name, runs) in zip(axes.flat, table.items(), strict=False):
        for k, (run, points) in enumerate(runs.items()):
            points = [p for p in points if p[1] is not None]
            if not points:
                continue
            offset = (k - (len(runs) - 1) / 2) * 0.03 * (max(p[0] for p in points) or 1)  # whiskers side by side
            xs = [p[0] + offset for p in points]
            values = [p[1] for p in points]
            errors = [[max(0.0, p[1] - p[2]) if p[2] is not None else 0 for p in points],
                      [max(0.0, p[3] - p[1]) if p[3] is not None else 0 for p in points]]
            ax.errorbar(xs, values, yerr=errors, marker="o", capsize=3, label=run)
        if "forgetting" in name or "asr_cost" in name or "above_chance" in name:
            ax.axhline(0, color="#888", lw=0.8)
        if chance and name in chance:
            ax.axhline(chance[name], color="#555", ls="--", lw=1, label="guessing")
        ax.set_title(_label(name), fontsize=10)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
