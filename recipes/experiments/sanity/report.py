"""The sanity ladder's tables and figures from its runs' files (never copied by hand): results/ladder.md,
results/ladder.json, results/curves.png, and results/probes.md from results/probe-*.json.
Called by `python recipes/experiments/sanity/ladder.py report`."""

from __future__ import annotations

import json
from pathlib import Path

SETS = ("train", "held-out", "unseen-voices")


def _cell(line: dict, name: str) -> str:
    if name not in line:
        return "n/a"
    found = line[name]
    low, high = found["ci"]
    return f"{found['accuracy']:.2f} [{low:.2f}, {high:.2f}] ({found['n']})"


def _pair(reps: dict, name: str) -> str:
    """A probe's accuracy before -> after training."""
    found = reps.get(name, {})
    return " -> ".join(f"{found[s]['probe']['value']:.2f}" for s in ("before", "after") if s in found)


def report(out: Path, results: Path, runs: dict, targets: dict, gates: dict) -> None:
    """Gather every run's hearing.jsonl and result.json into the tables and the figure."""
    from desta.evaluation.hearing import read_hearing_log

    results.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for name, (field, target_set, budget, overrides) in runs.items():
        log_file = out / name / "hearing.jsonl"
        if not log_file.is_file():
            continue
        log = read_hearing_log(log_file)
        curves[name] = log
        result_file = out / name / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        last, first = log[-1], log[0]
        rows.append({"run": name, "field": field, "targets": target_set, "names_field": f"1/{len(targets[target_set])}",
                     "overrides": overrides, "budget": budget, "finished": bool(result), "steps": last["step"],
                     "passed_at": result.get("passed_at") if result else next(
                         (line["step"] for line in log if line["passed"]), None),
                     "train_minutes_to_pass": (result.get("train_seconds_to_pass") or 0) / 60 if result.get(
                         "passed_at") is not None else None,
                     "chance": first["train"]["chance"], "spread": [first.get("connector_spread"),
                                                                    last.get("connector_spread")],
                     **{s: last.get(s) for s in SETS}})
    (results / "ladder.json").write_text(json.dumps({"runs": rows, "curves": curves, "gates": gates}, indent=1))
    lines = ["# The sanity ladder", "",
             "Label accuracy from the audio (the gold value's label answer the likeliest of the field's values, "
             "teacher-forced; `desta.evaluation.hearing`), at the last check of each run, 95 % bootstrap intervals "
             "over clips (clips checked in brackets). Checks every 25 steps on training clips, held-out clips of "
             "training voices and clips of held-out voices; a run stops at the first check that passes its gate "
             f"({'; '.join(f'{f}: ' + ', '.join(f'{k} >= {v}' for k, v in g.items()) for f, g in gates.items())}). "
             "Minutes: training time to the passing check, checks left out, on a 2-core x86_64 CPU (AMD EPYC) shared "
             "with other work (wall-clock figures are upper bounds).", "",
             "| run | field | targets name it | settings | budget | passed at step | minutes to pass | train "
             "| held-out | unseen voices | chance | connector spread (start -> last) |", "|" + "---|" * 12]
    for row in rows:
        spread = " -> ".join(f"{v:.3f}" for v in row["spread"] if v is not None)
        passed = str(row["passed_at"]) if row["passed_at"] is not None else (
            f"not by {row['steps']}" if row["finished"] else f"unfinished (at {row['steps']})")
        minutes = f"{row['train_minutes_to_pass']:.1f}" if row["train_minutes_to_pass"] is not None else ""
        settings = " ".join(row["overrides"])
        lines.append(f"| {row['run']} | {row['field']} | {row['names_field']} | {settings} | {row['budget']} | "
                     f"{passed} | {minutes} | " + " | ".join(_cell(row, s) for s in SETS)
                     + f" | {row['chance']:.2f} | {spread} |")
    probes = sorted(results.glob("probe-*.json"))
    if probes:
        lines += ["", "## Where a field is lost (rung 2)", "", "Linear probes (5-fold, L2, standardised features) "
                  "reading each field, before training (a fresh connector) and after the run, against always answering "
                  "the commonest value: encoder (tapped layers averaged over frames), connector (its vectors "
                  "averaged; all of them concatenated), the LLM's last hidden state where the answer starts.", ""]
        for path in probes:
            table = json.loads(path.read_text())
            lines += [f"### {path.stem.removeprefix('probe-')}", "",
                      "| field | commonest | encoder | connector (mean) before -> after | connector (all) before -> "
                      "after | LLM at the answer before -> after |", "|---|---|---|---|---|---|"]
            for field, reps in table.items():
                majority = reps["encoder"]["before"]["majority"]
                lines.append(f"| {field} | {majority:.2f} | {reps['encoder']['before']['probe']['value']:.2f} | "
                             f"{_pair(reps, 'connector')} | {_pair(reps, 'connector_all')} | "
                             f"{_pair(reps, 'llm_answer')} |")
            lines.append("")
    (results / "ladder.md").write_text("\n".join(lines) + "\n")
    plot(curves, runs, gates, results / "curves.png")


# The figure's rows, in order: what each row's runs compare.
GROUPS = ("gender, the Q-Former (one change at a time)", "gender, the projector", "gender named less often",
          "other fields, the projector")


def _group(spec: tuple) -> str:
    """Which row of the figure a run belongs to."""
    field, target_set, _, overrides = spec
    if field != "gender":
        return GROUPS[3]
    if target_set != "gender":
        return GROUPS[2]
    return GROUPS[1] if "model.connector=mlp" in overrides else GROUPS[0]


def plot(curves: dict, runs: dict, gates: dict, path: Path) -> None:
    """Accuracy against steps: a row per kind of comparison, a panel per check set, a line per run; chance
    dashed, the gate dotted where the row has one field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[str]] = {}
    for run in curves:
        groups.setdefault(_group(runs[run]), []).append(run)
    order = [group for group in GROUPS if group in groups]
    fig, axes = plt.subplots(len(order), 3, figsize=(16, 3.6 * len(order)), sharey=True, squeeze=False,
                             layout="constrained")
    for row, group in zip(axes, order, strict=True):
        fields = {runs[run][0] for run in groups[group]}
        for ax, name in zip(row, SETS, strict=True):
            for k, run in enumerate(groups[group]):
                log = curves[run]
                points = [(line["step"], line[name]["accuracy"], *line[name]["ci"]) for line in log if name in line]
                if not points:
                    continue
                steps, acc, low, high = zip(*points, strict=True)
                ax.plot(steps, acc, "o-", ms=3, color=f"C{k % 10}", label=run)
                ax.fill_between(steps, low, high, color=f"C{k % 10}", alpha=0.07)
            for level in {curves[run][0][name]["chance"] for run in groups[group] if name in curves[run][0]}:
                ax.axhline(level, color="#555", ls="--", lw=1)
            if len(fields) == 1 and name in gates.get(next(iter(fields)), {}):
                ax.axhline(gates[next(iter(fields))][name], color="#2a7", ls=":", lw=1.2)
            ax.set_title(f"{group}: {name} clips", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("label accuracy")
        row[-1].legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle("Sanity ladder: does the speech model hear the field? (Whisper tiny.en + SmolLM2-135M, label "
                 "targets; dashed: chance, dotted: the gate)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
