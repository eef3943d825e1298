"""The speech experiments' figures in the docs, rendered from their committed result files, never copied by hand.

Each table lives between `<!-- table:NAME -->` and `<!-- /table -->` in docs/results.md (and the README's
results paragraph); this script rewrites those blocks from:
- recipes/experiments/guessing.json: what guessing scores on the experiments' eval set (guessing.py; `guessing`);
- recipes/experiments/hearing/results/compare.json: the hearing runs on the ladder's settings (`hearing-ladder`);
- recipes/experiments/hearing/results-before-ladder/compare.json: the hearing experiment's first runs;
- recipes/experiments/sanity/results/ladder.json: the sanity ladder (sanity/ladder.py report);
- recipes/experiments/probe-voices/results/probe.json: what the encoder carries on seen and unseen voices;
- recipes/experiments/sanity/results/probe-*.json and real.json: the ladder's probes and its runs on human speech.

    python recipes/experiments/tables.py            # rewrite the blocks
    python recipes/experiments/tables.py --check    # exit 1 if a block is not what the files say (a test runs it)
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOCS = [ROOT / "docs/results.md", ROOT / "README.md", HERE / "sanity/README.md", HERE / "hearing/README.md",
        HERE / "probe-voices/README.md"]
FIELDS = [("gender", "gender"), ("accent", "accent"), ("speaking_speed", "speaking speed"), ("pitch", "pitch"),
          ("volume", "volume")]
HEARING_RUNS = [("qwen-lora", "SmolLM2 + LoRA, Qwen's answers"), ("self-lora", "SmolLM2 + LoRA, its own answers"),
                ("qwen-backbone", "Qwen2.5-Coder-1.5B as its LLM, its own answers"),
                ("qwen-onpolicy", "qwen-lora, then on-policy to SmolLM2")]
GOAL_MARGIN = 0.25  # the method's goal: each field's interval at least this far above guessing
GOAL_RATIO = 0.8  # ... overall from the audio at least this times its LLM reading the description (lower bound)
GOAL_FORMAT = 0.1  # ... and format following within this fraction of it (the whole interval)
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _versus(low: float, high: float, level: float) -> str:
    """How an interval sits against guessing's level: " (above)" or " (below)" where all of it does, else ""."""
    return " (above)" if low > level else " (below)" if high < level else ""


def hearing_vs_guessing() -> str:
    """Each hearing run's score per field beside what guessing scores on the same items."""
    guessing = _load(HERE / "guessing.json")["categories"]
    metrics = _load(HERE / "hearing/results-before-ladder/compare.json")["metrics"]
    head = "| field | chance | best constant | " + " | ".join(label for _, label in HEARING_RUNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(HEARING_RUNS))]
    for field, shown in FIELDS:
        level = max(guessing[field]["chance"], guessing[field]["constant"])
        cells = []
        for run, _ in HEARING_RUNS:
            _, value, low, high = metrics[f"{field}:speech"][run][0]
            cells.append(f"{value:.2f} [{low:.2f}, {high:.2f}]{_versus(low, high, level)}")
        lines.append(f"| {shown} | {guessing[field]['chance']:.2f} | {guessing[field]['constant']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ladder(brief: bool = False) -> str:
    """The sanity ladder's runs: when each passed its gate, and where each ended (`brief`: on unseen voices only,
    without the minutes and the clip counts, for the README)."""
    found = _load(HERE / "sanity/results/ladder.json")
    if not found:
        return "(no ladder results yet: `python recipes/experiments/sanity/ladder.py report`)\n"
    shown = ["passed at step", "unseen voices", "chance"] if brief else [
        "passed at step", "training minutes to pass", "train", "held-out clips", "unseen voices", "chance"]
    lines = ["| " + " | ".join(["run", "field", "answers naming it", "settings", *shown]) + " |",
             "|" + "---|" * (4 + len(shown))]
    for row in found["runs"]:
        def cell(name: str, row: dict = row) -> str:
            if not row.get(name):
                return "n/a"
            low, high = row[name]["ci"]
            return f"{row[name]['accuracy']:.2f} [{low:.2f}, {high:.2f}]" + ("" if brief else f" ({row[name]['n']})")
        passed = (str(row["passed_at"]) if row["passed_at"] is not None
                  else f"not by {row['steps']}" if row["finished"] else f"unfinished (at step {row['steps']})")
        minutes = row.get("train_minutes_to_pass")
        values = {"passed at step": passed, "training minutes to pass": "" if minutes is None else f"{minutes:.1f}",
                  "train": cell("train"), "held-out clips": cell("held-out"), "unseen voices": cell("unseen-voices"),
                  "chance": f"{row['chance']:.2f}"}
        settings = " ".join(o.removeprefix("optim.").removeprefix("model.") for o in row["overrides"])
        if brief:  # connector and schedule by their values alone
            settings = settings.replace("connector=", "").replace("schedule=", "")
        lines.append("| " + " | ".join([row["run"], row["field"], row["names_field"], settings,
                                        *(values[c] for c in shown)]) + " |")
    return "\n".join(lines) + "\n"


def guessing() -> str:
    """What guessing scores per field on the experiments' eval set: the stronger of chance and the best constant."""
    found = _load(HERE / "guessing.json")["categories"]
    lines = ["| | " + " | ".join(shown for _, shown in FIELDS) + " |", "|---|" + "---|" * len(FIELDS),
             "| guessing (the stronger of a random label and the best constant answer) | "
             + " | ".join(f"{max(found[f]['chance'], found[f]['constant']):.2f}" for f, _ in FIELDS) + " |"]
    return "\n".join(lines) + "\n"


def probe_voices() -> str:
    """What Whisper tiny.en's features carry per field, on training voices and on voices held out of training."""
    fields = _load(HERE / "probe-voices/results/probe.json")["fields"]

    def cell(result: dict) -> str:
        low, high = result["ci"]
        return f"{result['value']:.2f} [{low:.2f}, {high:.2f}]"

    lines = ["| field | values | probe, training voices (cross-validated) | seen voices, eval clips | unseen voices, "
             "eval clips | unseen voices: always the commonest |", "|---|---|---|---|---|---|"]
    for field, found in fields.items():
        seen, unseen = found["heldout"]["seen voices"], found["heldout"]["unseen voices"]
        lines.append(f"| {field.replace('_', ' ')} | {len(found['values'])} | {cell(found['probe'])} | "
                     f"{cell(seen['probe'])} | {cell(unseen['probe'])} | {cell(unseen['majority'])} |")
    return "\n".join(lines) + "\n"


def ladder_probes(run: str) -> str:
    """Rung 2 for one ladder run: each field's linear probe on each stage, before and after training."""
    found = _load(HERE / f"sanity/results/probe-{run}.json")
    if not found:
        return f"(no probes yet: `python recipes/experiments/sanity/ladder.py probe {run}`)\n"

    def cell(stage: dict) -> str:
        return " -> ".join(f"{stage[s]['probe']['value']:.2f}" for s in ("before", "after") if s in stage)

    lines = ["| field | always the commonest | encoder | connector (mean) before -> after | connector (all "
             "vectors) | LLM where the answer starts |", "|---|---|---|---|---|---|"]
    for field, reps in found.items():
        lines.append(f"| {field.replace('_', ' ')} | {reps['encoder']['before']['majority']:.2f} | "
                     f"{reps['encoder']['before']['probe']['value']:.2f} | {cell(reps['connector'])} | "
                     f"{cell(reps['connector_all'])} | {cell(reps['llm_answer'])} |")
    return "\n".join(lines) + "\n"


def real_speech() -> str:
    """Finished ladder runs scored on recorded human speech (sanity/ladder.py real)."""
    found = _load(HERE / "sanity/results/real.json") or {}
    lines = ["| run | field | clips (speakers) | human speech | chance | best constant |", "|---|---|---|---|---|---|"]
    for run, r in found.items():
        low, high = r["ci"]
        lines.append(f"| {run} | {r['field']} | {r['n']} ({', '.join(r['speakers'])}) | {r['accuracy']:.2f} "
                     f"[{low:.2f}, {high:.2f}] | {r['chance']:.2f} | {r['constant']:.2f} |")
    return "\n".join(lines) + "\n"


def hearing_ladder() -> str:
    """The hearing runs on the ladder's settings (hearing/results/compare.json): per field, each run's score from
    the audio beside guessing and beside its own LLM reading the description (gold transcript); "goal" where
    the interval's lower bound is at least GOAL_MARGIN above guessing."""
    found = _load(HERE / "hearing/results/compare.json")
    if not found:
        return "No run on these settings has finished yet.\n"
    metrics, levels = found["metrics"], found.get("chance", {})
    runs = [(run, label) for run, label in HEARING_RUNS if run in metrics.get("overall:speech", {})]
    head = "| field | guessing | " + " | ".join(f"{label}: from the audio | its LLM reading" for _, label in runs)
    lines = [head + " |", "|" + "---|" * (2 + 2 * len(runs))]
    for field, shown in [*FIELDS, ("duration", "duration"), ("instruction_following", "instruction following"),
                         ("overall", "**overall**")]:
        level = levels.get(f"{field}:speech")
        cells = []
        for run, _ in runs:
            for kind in ("speech", "text"):
                entry = metrics.get(f"{field}:{kind}", {}).get(run)
                if not entry:
                    cells.append("")
                    continue
                _, value, low, high = entry[0]
                mark = ""
                if kind == "speech" and level is not None:
                    mark = " goal" if low >= level + GOAL_MARGIN else _versus(low, high, level)
                cells.append(f"{value:.2f} [{low:.2f}, {high:.2f}]{mark}")
        lines.append(f"| {shown} | {'' if level is None else f'{level:.2f}'} | " + " | ".join(cells) + " |")
    lines += [_goal_ratio(metrics, levels, runs, "overall", f"from the audio / its LLM reading, overall (goal: "
                                                            f"lower bound >= {GOAL_RATIO:g})",
                          lambda low, high: low >= GOAL_RATIO, reading_must_hear=True),
              _goal_ratio(metrics, levels, runs, "instruction_following", f"the same, instruction following (goal: "
                                                                          f"inside 1 +- {GOAL_FORMAT:g})",
                          lambda low, high: 1 - GOAL_FORMAT <= low and high <= 1 + GOAL_FORMAT)]
    return "\n".join(lines) + "\n"


def hearing_labels() -> str:
    """What each hearing run's connector carries (hearing/results/labels.json, labels.py): at its last checkpoint,
    the label accuracy of each field on eval clips of unseen and of training voices, beside guessing there."""
    found = _load(HERE / "hearing/results/labels.json")
    if not found:
        return "No run scored yet.\n"
    sets = ("unseen voices", "training voices")
    lines = ["| run (step) | clips | " + " | ".join(shown for _, shown in FIELDS) + " |",
             "|---|---|" + "---|" * len(FIELDS)]
    first = next(iter(found.values()))
    any_step = first[max(first, key=int)]
    for name in sets:
        cells = [any_step[name][f] for f, _ in FIELDS]
        lines.append(f"| guessing (chance or the commonest value) | {name} ({cells[0]['n']}) | "
                     + " | ".join(f"{max(c['chance'], c['constant']):.2f}" for c in cells) + " |")
    for run, steps in found.items():
        last = max(steps, key=int)
        for name in sets:
            cells = [steps[last][name][f] for f, _ in FIELDS]
            lines.append(f"| {run} ({last}) | {name} | " + " | ".join(
                f"{c['accuracy']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _reads_above_guessing(metrics: dict, levels: dict, run: str) -> bool:
    """Whether the run's LLM reading the description scores above guessing (the whole interval) in at least one
    voice field: only then is a ratio to its reading a measure of what the audio carries."""
    for field, _ in FIELDS:
        entry, level = metrics.get(f"{field}:text", {}).get(run), levels.get(f"{field}:speech")
        if entry and level is not None and entry[0][2] > level:  # the interval's lower bound
            return True
    return False


def _goal_ratio(metrics: dict, levels: dict, runs: list, field: str, shown: str,
                reached: Callable[[float, float], bool], reading_must_hear: bool = False) -> str:
    """A row of each run's score from the audio divided by its LLM's reading the description (gold transcript),
    from the report's forgetting vs text-gold (ratio - 1) and its interval; "goal" where `reached(low, high)` and,
    with `reading_must_hear` (a ratio of what is heard), the reading itself is above guessing in some voice field:
    a ratio to a reading at guessing shows nothing."""
    cells = []
    for run, _ in runs:
        entry = metrics.get(f"{field}:forgetting:speech", {}).get(run)
        if not entry:
            cells += ["", ""]
            continue
        _, value, low, high = entry[0]
        ratio, low, high = 1 + value, 1 + low, 1 + high
        mark = ("" if not reached(low, high)
                else " (its reading is at guessing: no goal)"
                if reading_must_hear and not _reads_above_guessing(metrics, levels, run) else " goal")
        cells += [f"{ratio:.2f} [{low:.2f}, {high:.2f}]{mark}", ""]
    return f"| {shown} | | " + " | ".join(cells) + " |"


TABLES = {"real-speech": real_speech, "hearing-vs-guessing": hearing_vs_guessing, "ladder": ladder,
          "ladder-brief": lambda: ladder(brief=True),
          "hearing-ladder": hearing_ladder, "hearing-labels": hearing_labels,
          "guessing": guessing, "probe-voices": probe_voices, "probes-gender": lambda: ladder_probes("gender")}


def render(text: str) -> str:
    """The text with every known block rewritten."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; known: {sorted(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def main(check: bool = False) -> int:
    """Rewrite (or, with `check`, compare) the blocks of every doc; 1 if a checked block is stale."""
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        rendered = render(text)
        if rendered != text:
            if check:
                stale.append(str(doc.relative_to(ROOT)))
            else:
                doc.write_text(rendered)
    if stale:
        print(f"stale tables in {stale}: run python recipes/experiments/tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
