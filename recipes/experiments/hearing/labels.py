"""Does a hearing run's connector carry each field to the LLM, whatever its answers say? Label accuracy of every
saved checkpoint, field by field, on eval clips of voices no training clip uses and on eval clips of training
voices: each value's label answer ("The speaker is female.") scored by its likelihood given the audio, as the
sanity ladder's checks score (desta.evaluation.hearing), beside chance and the commonest value's share.

The eval (desta eval) scores what the model says; this scores what it holds. A run whose open answers miss a
field but whose label likelihoods pick the gold value hears it and does not say it; one at chance here does not
hear it at all.

    python recipes/experiments/hearing/labels.py self-lora=runs/experiments/hearing/self-lora \
        --clips runs/experiments/data/described-eval/dataset --train runs/experiments/data/described/dataset

Resumable: checkpoints already in OUT/labels.json are not scored again. Writes labels.json, labels.md, labels.png.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FIELDS = ("gender", "accent", "pitch", "volume", "speaking_speed")
SETS = ("unseen voices", "training voices")


def checkpoints(run: Path, every: int = 1) -> list[tuple[int, Path]]:
    """(step, folder) of the saved checkpoints of a `desta train` output folder whose step is a multiple of
    `every`, then its last: the finished model (a run still training: its newest checkpoint)."""
    found = sorted((int(m.group(1)), p) for p in run.glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "model.safetensors").is_file())
    summary = run / "summary.json"
    if summary.is_file() and (run / "model.safetensors").is_file():
        last = (json.loads(summary.read_text())["steps"], run)
        found = [(s, p) for s, p in found if s != last[0]]
    elif found:
        last = found.pop()
    else:
        raise SystemExit(f"{run}: no checkpoint-N/ or finished model to score; is it a desta train output folder?")
    return [(s, p) for s, p in found if s % every == 0] + [last]


def clip_sets(clips_path: str, train_path: str) -> dict[str, object]:
    """The eval clips split by whether their voice is among the training clips' voices, and each field's values
    (those of either set: every gold value has its label answer)."""
    from datasets import load_from_disk

    clips, train = load_from_disk(clips_path), load_from_disk(train_path)
    for name, path, rows in (("--clips", clips_path, clips), ("--train", train_path, train)):
        missing = sorted({"voice", *FIELDS} - set(rows.column_names))
        if missing:
            raise SystemExit(f"{name} {path}: no {', '.join(missing)} column(s); give a `desta describe` dataset "
                             "(OUT/dataset) of voiced clips")
    heard = set(train["voice"])
    seen = [k for k, v in enumerate(clips["voice"]) if v in heard]
    unseen = [k for k, v in enumerate(clips["voice"]) if v not in heard]
    for kind, kept in (("never uses", unseen), ("uses", seen)):
        if not kept:
            raise SystemExit(f"--clips {clips_path}: none of its {len(clips)} clips is of a voice --train "
                             f"{train_path} {kind}; give eval clips of both kinds (as recipes/experiments/corpus.sh's "
                             "described-eval)")
    values = {f: sorted({str(v) for rows in (clips, train) for v in rows[f] if v not in (None, "")}) for f in FIELDS}
    return {"unseen voices": clips.select(unseen), "training voices": clips.select(seen), "values": values}


def score_run(name: str, run: Path, rows: dict, found: dict, out: Path, every: int = 1) -> None:
    """Score each checkpoint of the run `name` (folder `run`) not yet in `found` (OUT/labels.json after each)."""
    from desta.evaluation.hearing import encode_clips, label_accuracy
    from desta.model.loading import load

    encoded: dict = {}
    for step, folder in checkpoints(run, every):
        if str(step) in found.setdefault(name, {}):
            continue
        model, processor = load(folder)
        model.eval()
        line = {}
        for field in FIELDS:
            for clip_set in SETS:
                if (clip_set, field) not in encoded:  # the frozen encoder's output: the same for every checkpoint
                    encoded[clip_set, field] = encode_clips(model, processor, rows[clip_set], field, clip_set)
                result = label_accuracy(model, processor, encoded[clip_set, field], field, rows["values"][field],
                                        autocast=True)  # in bf16, as the runs train and are evaluated
                line.setdefault(clip_set, {})[field] = {k: result[k] for k in ("n", "accuracy", "ci", "chance",
                                                                                "constant")}
        found[name][str(step)] = line
        (out / "labels.json").write_text(json.dumps(found, indent=1) + "\n")
        print(json.dumps({"run": name, "step": step, **{f: round(line[SETS[0]][f]["accuracy"], 3)
                                                         for f in FIELDS}}), flush=True)


def table(found: dict) -> str:
    """Each run's last checkpoint: per field and clip set, accuracy [95 %], chance, the commonest value's share."""
    lines = ["| run | step | clips | " + " | ".join(FIELDS) + " |", "|---|---|---|" + "---|" * len(FIELDS)]
    for run, steps in found.items():
        last = max(steps, key=int)
        for name in SETS:
            cells = [f"{c['accuracy']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] (chance {c['chance']:.2f}, "
                     f"commonest {c['constant']:.2f})" for f in FIELDS for c in [steps[last][name][f]]]
            lines.append(f"| {run} | {last} | {name} ({steps[last][name][FIELDS[0]]['n']}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(found: dict, path: Path) -> None:
    """Accuracy on unseen voices against steps, a panel per field, chance and the commonest share dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(FIELDS), figsize=(4 * len(FIELDS), 3.4), sharey=True)
    for ax, field in zip(axes, FIELDS, strict=True):
        for run, steps in found.items():
            xs = sorted(steps, key=int)
            cells = [steps[x][SETS[0]][field] for x in xs]
            ax.errorbar([int(x) for x in xs], [c["accuracy"] for c in cells], capsize=3, marker="o", label=run,
                        yerr=[[c["accuracy"] - c["ci"][0] for c in cells], [c["ci"][1] - c["accuracy"] for c in cells]])
            ax.axhline(cells[-1]["chance"], color="grey", linestyle="--", linewidth=1)
            ax.axhline(cells[-1]["constant"], color="black", linestyle=":", linewidth=1)
        ax.set_title(f"{field} (unseen voices)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("label accuracy (95 % interval)")
    axes[0].legend(fontsize=8, title="-- chance, : commonest", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    """Score the runs given and write labels.json, labels.md and labels.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=FOLDER: a desta train output folder")
    parser.add_argument("--clips", required=True, help="a described dataset of eval clips (audio, voice, fields)")
    parser.add_argument("--train", required=True, help="the training clips' described dataset (their voices)")
    parser.add_argument("--out", default="recipes/experiments/hearing/results")
    parser.add_argument("--every", type=int, default=1, help="score the checkpoints whose step is a multiple of "
                        "this (and the finished model); a 1.5B LLM takes minutes a checkpoint on a CPU")
    args = parser.parse_args()
    if args.every < 1:
        raise SystemExit(f"--every must be at least 1, got {args.every}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = json.loads((out / "labels.json").read_text()) if (out / "labels.json").is_file() else {}
    rows = clip_sets(args.clips, args.train)
    for entry in args.runs:
        name, _, folder = entry.partition("=")
        if not folder:
            raise SystemExit(f"{entry!r}: give each run as NAME=FOLDER")
        score_run(name, Path(folder), rows, found, out, args.every)
    (out / "labels.md").write_text(table(found))
    plot(found, out / "labels.png")
    print(table(found))


if __name__ == "__main__":
    main()
