"""The sanity ladder: can the speech model hear one field of the voice, how many steps does it take, and
where is a field lost? Whisper tiny.en + SmolLM2-135M-Instruct (frozen), the experiments' connector, label
targets that name one field ("The speaker is female."), checked every few dozen steps on training clips,
held-out clips of training voices and clips of voices never trained on (espeak-ng variants f4 and m4).

    python recipes/experiments/sanity/ladder.py data                   # once: voices split, label targets
    python recipes/experiments/sanity/ladder.py run gender constant    # train until the gate or the budget
    python recipes/experiments/sanity/ladder.py probe gender           # where each field is lost (rung 2)
    python recipes/experiments/sanity/ladder.py real gender mlp        # finished runs on recorded human speech
    python recipes/experiments/sanity/ladder.py report                 # results/ladder.md, results/*.png

MODELS (default $HOME/.cache/desta-offline-models) holds whisper-tiny.en/ and SmolLM2-135M-Instruct/
(tools/fetch_offline_models.sh); data and runs go under runs/sanity/ (DATA, OUT). Every run resumes from its
last checkpoint when rerun; a finished run (result.json) is skipped. Runs are named in RUNS below: the field,
the target set (how often its answers name the field) and the overrides of recipes/experiments/config.yaml.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("MODELS", Path.home() / ".cache/desta-offline-models"))
DATA = Path(os.environ.get("DATA", ROOT / "runs/sanity"))
OUT = Path(os.environ.get("OUT", ROOT / "runs/sanity/runs"))
RESULTS = HERE / "results"
CONFIG = ROOT / "recipes/experiments/config.yaml"

HELD_OUT_VOICES = ["f4", "m4"]  # espeak-ng variants no training clip uses (every accent)
CHECK_CLIPS = {"train": 32, "held-out": 64}  # clips each check reads (the first by id); unseen voices: all
# Target sets: which field questions of the voice pool are asked; each answer names the asked field alone.
TARGETS = {
    "gender": ["gender"],  # every answer names the gender
    "gender-third": ["gender", "pitch", "volume"],  # one answer in three
    "gender-eighth": ["gender", "accent", "emotion", "pitch", "volume", "speaking_speed", "duration", "transcript"],
    "speaking_speed": ["speaking_speed"],
    "pitch": ["pitch"],
    "volume": ["volume"],
    "accent": ["accent"],
}
# The gate each field must pass: accuracy on the check sets (rung 1 of the ladder).
GATES = {"gender": {"train": 0.95, "held-out": 0.90}, "speaking_speed": {"train": 0.80, "held-out": 0.80},
         "pitch": {"train": 0.80, "held-out": 0.80}, "volume": {"train": 0.80, "held-out": 0.80},
         "accent": {"train": 0.60, "held-out": 0.60}}
BASE = ["optim.precision=bf16", "log.report_to=none", "log.save_steps=50", "log.save_total_limit=1",
        "data.eval_fraction=0", "optim.warmup_steps=20"]
# name: (field checked, target set, steps budget, overrides); the budget is also the schedule's length. Each run
# names its connector and schedule, so it means the same whatever recipes/experiments/config.yaml defaults to.
QFORMER, MLP = ["model.connector=qformer"], ["model.connector=mlp"]
CONSTANT = ["optim.schedule=constant"]
RUNS: dict[str, tuple[str, str, int, list[str]]] = {
    "gender": ("gender", "gender", 400, [*QFORMER, "optim.schedule=cosine"]),  # the papers' set-up: cosine to 0
    "constant": ("gender", "gender", 400, [*QFORMER, *CONSTANT]),
    "constant-1e-3": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "optim.lr=1e-3"]),
    "frame-norm": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.frame_norm=true"]),
    "official-qformer": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.query_layernorm=false",
                                                   "model.query_init_std=1.0", "model.qformer_init=pytorch"]),
    "no-dropout": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.qformer_dropout=0"]),
    "queries-16": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.num_queries=16"]),
    "one-layer": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.qformer_layers=1"]),
    "no-transcript": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.transcript_max_tokens=0"]),
    "lora": ("gender", "gender", 400, [*QFORMER, *CONSTANT, "model.lora={r: 8}"]),
    # the plain projector: the same target
    "mlp": ("gender", "gender", 400, [*MLP, *CONSTANT]),
    "mlp-cosine": ("gender", "gender", 400, [*MLP, "optim.schedule=cosine"]),
    "mlp-lora": ("gender", "gender", 400, [*MLP, *CONSTANT, "model.lora={r: 8}"]),
    # how often the targets name the field: every answer (above), one in three, one in eight
    "mlp-third": ("gender", "gender-third", 600, [*MLP, *CONSTANT]),
    "mlp-eighth": ("gender", "gender-eighth", 800, [*MLP, *CONSTANT]),
    "qformer-third": ("gender", "gender-third", 800, [*QFORMER, *CONSTANT]),
    # rung 1: one field at a time, with the set-up that hears gender soonest
    "mlp-speed": ("speaking_speed", "speaking_speed", 400, [*MLP, *CONSTANT]),
    "mlp-pitch": ("pitch", "pitch", 400, [*MLP, *CONSTANT]),
    "mlp-volume": ("volume", "volume", 400, [*MLP, *CONSTANT]),
    "mlp-accent": ("accent", "accent", 400, [*MLP, *CONSTANT]),
}


def models() -> list[str]:
    """The bases' overrides, checked to exist."""
    paths = [MODELS / "whisper-tiny.en", MODELS / "SmolLM2-135M-Instruct"]
    missing = [str(p) for p in paths if not (p / "config.json").is_file()]
    if missing:
        sys.exit(f"missing {missing}: run tools/fetch_offline_models.sh {MODELS} (or set MODELS)")
    return [f"model.encoder={paths[0]}", f"model.llm={paths[1]}"]


# ----- data -----

def split_by_voice(source: Path, seen: Path, unseen: Path | None) -> None:
    """The described rows of training voices (and, given `unseen`, those of the held-out voices)."""
    from datasets import load_from_disk

    described = load_from_disk(str(source))
    parts = [(seen, lambda row: row["voice"] not in HELD_OUT_VOICES)]
    if unseen is not None:
        parts.append((unseen, lambda row: row["voice"] in HELD_OUT_VOICES))
    for folder, keep in parts:
        if not folder.is_dir():
            described.filter(keep).save_to_disk(str(folder))


def data() -> None:
    """The corpus (1200 training clips, 160 held-out clips), described, split by voice; the label targets."""
    import subprocess

    from desta.targets import TargetsConfig, targets

    steps = [["synth", "--out", DATA / "corpus", "--num-clips", "1200", "--num-proc", "2"],
             ["synth", "--out", DATA / "corpus-eval", "--num-clips", "160", "--seed", "1", "--num-proc", "2"],
             ["describe", "--source", DATA / "corpus/manifest.jsonl", "--mapping", "synthetic", "--out",
              DATA / "described", "--num-proc", "2"],
             ["describe", "--source", DATA / "corpus-eval/manifest.jsonl", "--mapping", "synthetic", "--out",
              DATA / "described-eval"]]
    for step in steps:
        if not (Path(step[step.index("--out") + 1]) / ("manifest.jsonl" if step[0] == "synth" else "dataset")).exists():
            subprocess.run(["desta", *map(str, step)], check=True)
    split_by_voice(DATA / "described/dataset", DATA / "train-voices", None)
    split_by_voice(DATA / "described-eval/dataset", DATA / "eval-seen", DATA / "eval-unseen")
    for name, fields in TARGETS.items():
        targets(TargetsConfig(source=str(DATA / "train-voices"), out=str(DATA / f"targets-{name}"), kind="labels",
                              pool="voice", fields=fields, progress=False))


# ----- runs -----

def check_sets(model, processor, field: str, train_ids: list[str]):  # noqa: ANN001, ANN201
    """The clip sets a run is checked on: training clips, held-out clips of training voices, unseen voices."""
    from datasets import load_from_disk

    from desta.evaluation.hearing import encode_clips

    train = load_from_disk(str(DATA / "train-voices"))
    chosen = set(sorted(train_ids)[: CHECK_CLIPS["train"]])
    held_out = load_from_disk(str(DATA / "eval-seen"))
    return [encode_clips(model, processor, train.filter(lambda r: r["id"] in chosen), field, "train"),
            encode_clips(model, processor, held_out.select(range(CHECK_CLIPS["held-out"])), field, "held-out"),
            encode_clips(model, processor, load_from_disk(str(DATA / "eval-unseen")), field, "unseen-voices")]


def run(name: str) -> dict:
    """Train one run of RUNS until its gate or its budget, checking every 25 steps; result.json."""
    from desta.core.args import load_config
    from desta.evaluation.hearing import HearingCheck
    from desta.train.config import TrainConfig
    from desta.train.run import fit, save, setup

    field, target_set, steps, overrides = RUNS[name]
    out = OUT / name
    if (out / "result.json").is_file():
        print(f"{name}: done ({out / 'result.json'})")
        return json.loads((out / "result.json").read_text())
    config = load_config(TrainConfig, CONFIG, [*models(), *BASE, f"output_dir={out}",
                                               f"data.train={DATA / f'targets-{target_set}' / 'dataset'}",
                                               f"data.feature_cache={DATA / 'features'}", f"optim.max_steps={steps}",
                                               *overrides])
    trained = setup(config)
    values = sorted({v for s in ("train-voices", "eval-seen", "eval-unseen") for v in _values(s, field)})
    sets = check_sets(trained.model, trained.processor, field, [e.id for e in trained.trainer.train_dataset.examples])
    check = HearingCheck(trained.processor, sets, field, values, every=25, out=out, stop_at=GATES[field])
    trained.trainer.add_callback(check)
    summary = save(trained, fit(trained))
    from desta.evaluation.hearing import read_hearing_log

    log = read_hearing_log(out / "hearing.jsonl")
    passed = [line for line in log if line["passed"]]
    result = {"run": name, "field": field, "targets": target_set, "target_fields": TARGETS[target_set],
              "overrides": overrides, "budget": steps, "steps": summary["steps"], "gate": GATES[field],
              "passed_at": passed[0]["step"] if passed else None,
              "train_seconds_to_pass": passed[0].get("train_seconds") if passed else None,
              "train_seconds": summary["seconds"], "last": log[-1], "values": values}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("run", "passed_at", "steps", "train_seconds_to_pass")}))
    return result


def _values(split: str, field: str) -> set[str]:
    from datasets import load_from_disk

    return {str(v) for v in load_from_disk(str(DATA / split))[field] if v not in (None, "")}


# ----- rung 2: where a field is lost -----

def probe(name: str, clips_per_set: int = 400) -> dict:
    """Linear probes of every field on each stage's representation (encoder, connector, the LLM where the
    answer starts), before training (a fresh connector) and after the run; results/probe-NAME.json."""
    import numpy as np
    from datasets import load_from_disk

    from desta.core.args import load_config
    from desta.describe.probe import probe_field
    from desta.evaluation.hearing import DEFAULT_QUESTIONS, encode_clips, representations
    from desta.model.loading import load
    from desta.train.config import TrainConfig
    from desta.train.run import build_model

    field = RUNS[name][0]
    out = OUT / name
    config = load_config(TrainConfig, CONFIG, [*models(), *BASE, *RUNS[name][3], f"output_dir={out}"])
    fresh = build_model(config.model, out, config.optim.seed)
    trained = load(str(out))
    rows = load_from_disk(str(DATA / "train-voices"))
    rows = rows.select(range(min(clips_per_set, len(rows))))
    fields = ["gender", "accent", "pitch", "volume", "speaking_speed"]
    table: dict = {}
    for stage_name, (model, processor) in (("before", fresh), ("after", trained)):
        model.eval()
        clips = encode_clips(model, processor, rows, field, "probe")
        reps = representations(model, processor, clips, DEFAULT_QUESTIONS[field].format(labels=""))
        gold = {f: [str(v) for v in rows[f]] for f in fields}
        for rep_name, features in reps.items():
            for f in fields:
                result = probe_field(np.asarray(features, dtype=np.float64), gold[f])
                table.setdefault(f, {}).setdefault(rep_name, {})[stage_name] = {
                    "probe": result["probe"], "majority": result["majority"]["value"], "carried": result["carried"]}
        print(f"{name} {stage_name}: probed", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"probe-{name}.json").write_text(json.dumps(table, indent=1))
    return table


# ----- human speech: does a run that hears a field on synthetic voices hear it on recorded people? -----

REAL = Path(os.environ.get("REAL", ROOT / "runs/experiments/data/described-real/dataset"))  # desta describe
# --mapping asterisk (recipes/experiments/data.sh): Debian's Asterisk prompts, five professional voices


def real(names: list[str], per_value: int = 50) -> dict:
    """Label accuracy of finished runs on recorded human speech: `per_value` prompts of each value of the run's
    field (the first by id), scored as the checks score; results/real.json."""
    from datasets import load_from_disk

    from desta.evaluation.hearing import encode_clips, label_accuracy
    from desta.model.loading import load

    rows = load_from_disk(str(REAL))
    found = json.loads((RESULTS / "real.json").read_text()) if (RESULTS / "real.json").is_file() else {}
    for name in names:
        field = RUNS[name][0]
        values = sorted({v for s in ("train-voices", "eval-seen", "eval-unseen") for v in _values(s, field)})
        picked = [i for value in values for i in [j for j, v in enumerate(rows[field]) if v == value][:per_value]]
        chosen = rows.select(picked)
        model, processor = load(str(OUT / name))
        model.eval()
        result = label_accuracy(model, processor, encode_clips(model, processor, chosen, field, "human speech"),
                                field, values)
        speakers = sorted(set(chosen["speaker"])) if "speaker" in chosen.column_names else []
        found[name] = {"field": field, "speakers": speakers,
                       **{k: result[k] for k in ("n", "accuracy", "ci", "chance", "constant")}}
        print(json.dumps({"run": name, **found[name]}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real.json").write_text(json.dumps(found, indent=1))
    return found


if __name__ == "__main__":
    command, *names = sys.argv[1:] or ["help"]
    if command == "data":
        data()
    elif command == "run":
        for run_name in names or list(RUNS):
            run(run_name)
    elif command == "probe":
        for run_name in names:
            probe(run_name)
    elif command == "real":
        real(names)
    elif command == "report":
        from report import report  # recipes/experiments/sanity/report.py

        report(OUT, RESULTS, RUNS, TARGETS, GATES)
    else:
        sys.exit(__doc__)
