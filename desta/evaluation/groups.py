"""What "unseen" means for one checkpoint: the tasks its training prompts asked, the voices its clips spoke with.

Stage 4 reports the items apart by both: questions whose task the checkpoint's prompt pool trains (gender,
accent, ... asked in new words) against tasks it never trained (format following, open requests, fields its
pool never asked about); clips whose voice appears in its training data against voices it never heard. Both are
read from the checkpoint's run_config.yaml (its data.train targets dataset: the `prompt_pool` and `prompt`
columns, the `voice` column), or given (`desta eval trained_tasks=... train_voices=...`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from desta.core.artifacts import RUN_CONFIG
from desta.prompts import OPEN, prompt_category, training_pool

# The description field each eval category asks about (transcription: the transcript).
FIELD_OF_CATEGORY = {"gender": "gender", "accent": "accent", "emotion": "emotion", "speaking_speed": "speaking_speed",
                     "pitch": "pitch", "volume": "volume", "duration": "duration", "transcription": "transcript"}
TRAINED, UNSEEN_TASK, SEEN_VOICE, UNSEEN_VOICE = "trained tasks", "unseen tasks", "seen voices", "unseen voices"


@dataclass
class TrainingData:
    """What a checkpoint was trained on, as far as it is known: the eval categories its prompts asked about and
    the voices of its clips (None: unknown), and where that was read."""

    tasks: set[str] | None
    voices: set[str] | None
    source: str | None


def asked_categories(pool_names: list[str], prompts: list[str]) -> set[str]:
    """The eval categories a targets dataset's prompts ask about: a field pool's field categories met in its
    prompts (an open request trains no field task).

    >>> sorted(asked_categories(["voice"], ["Tell me the speaker's gender.", "Describe the audio in detail."]))
    ['gender']
    >>> asked_categories(["desta25"], ["What can you hear from the audio?"])
    set()
    """
    fields = set()
    for name in set(pool_names):
        try:
            pool = training_pool(name)
        except ValueError:  # a custom list: open requests only
            continue
        fields |= {prompt_category(pool, p) for p in set(prompts)} - {OPEN}
    return {category for category, field in FIELD_OF_CATEGORY.items() if field in fields}


def training_data(checkpoint: str | Path, tasks: list[str] | None = None,
                  voices_from: str | None = None) -> TrainingData:
    """What the checkpoint was trained on: `tasks` and the voices of `voices_from` (a dataset folder) when given,
    else read from its run_config.yaml's targets dataset; unknown parts are None."""
    from datasets import load_from_disk

    train_path = None
    config = Path(checkpoint) / RUN_CONFIG
    if config.is_file():
        train_path = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("train")
    known_tasks = set(tasks) if tasks is not None else None
    voices = None
    source = voices_from or train_path
    if source and Path(source).is_dir():
        dataset = load_from_disk(str(source))
        columns = dataset.column_names
        if known_tasks is None and voices_from is None and {"prompt_pool", "prompt"} <= set(columns):
            known_tasks = asked_categories(list(dataset["prompt_pool"]), list(dataset["prompt"]))
        if "voice" in columns:
            voices = {str(v) for v in dataset["voice"] if v}
    return TrainingData(tasks=known_tasks, voices=voices, source=str(source) if source else None)


def item_groups(items: list[dict], data: TrainingData) -> dict[str, list[int]]:
    """The items of each group the training data tells apart: trained vs unseen tasks, seen vs unseen voices
    (a group is left out when what decides it is unknown).

    >>> items = [{"category": "gender", "voice": "a"}, {"category": "instruction_following", "voice": "b"}]
    >>> item_groups(items, TrainingData({"gender"}, {"a"}, None))
    {'trained tasks': [0], 'unseen tasks': [1], 'seen voices': [0], 'unseen voices': [1]}
    """
    groups: dict[str, list[int]] = {}
    if data.tasks is not None:
        groups[TRAINED] = [k for k, i in enumerate(items) if i["category"] in data.tasks]
        groups[UNSEEN_TASK] = [k for k, i in enumerate(items) if i["category"] not in data.tasks]
    if data.voices is not None and all(i.get("voice") for i in items):
        groups[SEEN_VOICE] = [k for k, i in enumerate(items) if i["voice"] in data.voices]
        groups[UNSEEN_VOICE] = [k for k, i in enumerate(items) if i["voice"] not in data.voices]
    return {name: members for name, members in groups.items() if members}
