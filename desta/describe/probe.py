"""`desta probe`: which description fields the audio can carry, measured before they become targets.

For each field a description holds (gender, emotion, accent, age, pitch, volume, speaking speed, noise,
duration: the values as the description writes them), a linear probe (multinomial logistic regression,
L2-penalised, k-fold cross-validated) reads the field from the frozen Whisper encoder's tapped layers,
each averaged over the clip's frames: what the connector receives, summarised. Its held-out accuracy is
set against always answering the field's commonest value (taken from the training folds), clip by clip,
with a 95 % bootstrap interval of the difference. A field whose difference is not above 0 is flagged: the
audio, as this encoder hears it, does not convey it (a corpus label unrelated to the voice, or a value
computed from something the averaged features do not hold, such as the clip's length), and training a
speech model to state it teaches it to guess. `desta describe attributes=...` can leave it out.

Given a targets dataset (it has a `response` column), the report also counts how often the targets name
each clip's gold value (by the eval's label words): a speech model is only taught what its targets say.
Reads a described or targets dataset and a Whisper checkpoint; writes OUT/probe.json, OUT/probe.md and
OUT/probe.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from desta.core.args import raise_problems
from desta.core.stats import mean_interval
from desta.core.summary import Summary
from desta.describe.attributes import named_labels
from desta.describe.description import DESCRIPTION_NAMES, parse_description

PROBED = tuple(name for name in DESCRIPTION_NAMES)  # every attribute a description can hold


@dataclass
class ProbeConfig:
    """Which description fields the audio can carry: a linear probe per field on the frozen encoder's features."""

    POSITIONAL = ("source",)
    source: str
    """a described dataset (OUT/dataset of desta describe) or a targets dataset (OUT/dataset of desta targets)"""
    encoder: str
    """the Whisper checkpoint the speech model hears with (Hub id or folder)"""
    out: str
    """report folder: probe.json, probe.md, probe.png"""
    fields: list[str] | None = None
    """fields to probe (gender, accent, ...); null: every field the descriptions hold with at least two values"""
    tapped_layers: list[int] | None = None
    """encoder blocks whose outputs are probed (together); null: the speech model's default for this Whisper"""
    max_clips: int | None = 2000
    """probe at most this many clips (the first by id); null: all"""
    folds: int = 5
    """cross-validation folds: each clip is scored by a probe that never saw it"""
    l2: float = 1e-3
    """the probe's L2 penalty on standardised features"""
    batch_size: int = 8
    """clips per encoder call"""
    heldout: str | None = None
    """a second described dataset (an eval corpus): probes fitted on every clip of source score its clips, apart
    for those whose voice source has and those whose voice it lacks (both need a `voice` column): does a field
    carry over to voices never trained on?"""
    seed: int = 0
    """folds, probe initialisation and bootstrap depend only on it"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        problems = []
        unknown = sorted(set(self.fields or []) - set(PROBED))
        if unknown:
            problems.append(("fields", f"unknown {unknown}; choose from {list(PROBED)}"))
        if self.folds < 2:
            problems.append(("folds", f"must be at least 2, got {self.folds}"))
        if self.max_clips is not None and self.max_clips < 2 * self.folds:
            problems.append(("max_clips", f"must be at least 2 x folds ({2 * self.folds}), got {self.max_clips}"))
        if self.batch_size < 1 or not self.l2 >= 0:
            problems.append(("batch_size", "batch_size must be at least 1 and l2 0 or more"))
        raise_problems(problems)


# ----- the probe -----

def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    """Multinomial logistic regression with an L2 penalty, fitted with L-BFGS."""
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def probe_heldout(train: np.ndarray, values: list[str], test: np.ndarray, test_values: list[str],
                  groups: dict[str, np.ndarray], seed: int = 0, l2: float = 1e-3) -> dict[str, Any]:
    """A probe fitted on every training clip scores the test clips of each group (e.g. seen and unseen voices),
    beside always answering the training clips' commonest value; test values the training clips never have count
    as wrong.

    >>> rng = np.random.default_rng(0)
    >>> x, t = rng.normal(size=(60, 3)), rng.normal(size=(20, 3))
    >>> found = probe_heldout(x, ["up" if v > 0 else "down" for v in x[:, 0]], t,
    ...                       ["up" if v > 0 else "down" for v in t[:, 0]], {"all": np.ones(20, dtype=bool)})
    >>> found["all"]["probe"]["value"] > 0.8
    True
    """
    labels = sorted(set(values))
    y = np.array([labels.index(v) for v in values])
    mean, std = train.mean(0), train.std(0) + 1e-6
    torch.manual_seed(seed)
    linear = _fit(torch.tensor((train - mean) / std, dtype=torch.float32), torch.tensor(y), len(labels), l2)
    with torch.no_grad():
        guess = linear(torch.tensor((test - mean) / std, dtype=torch.float32)).argmax(1).numpy()
    common = labels[int(np.bincount(y, minlength=len(labels)).argmax())]
    right = np.array([labels[g] == v for g, v in zip(guess, test_values, strict=True)], dtype=float)
    majority = np.array([v == common for v in test_values], dtype=float)
    found = {}
    for name, members in groups.items():
        if members.any():
            cells = {k: mean_interval(list(v[members]), seed=seed)
                     for k, v in (("probe", right), ("majority", majority))}
            found[name] = {"clips": int(members.sum()),
                           **{k: {"value": m, "ci": [lo, hi]} for k, (m, lo, hi) in cells.items()}}
    return found


def out_of_fold(features: np.ndarray, y: np.ndarray, classes: int, folds: int = 5, seed: int = 0,
                l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per clip (0/1): whether a linear probe on standardised `features`, fitted on the other folds, reads its
    class index `y`, and whether always answering those folds' commonest class does."""
    order = np.random.default_rng(seed).permutation(len(y))
    probe, majority = np.zeros(len(y)), np.zeros(len(y))
    torch.manual_seed(seed)
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        mean, std = features[train].mean(0), features[train].std(0) + 1e-6
        linear = _fit(torch.tensor((features[train] - mean) / std, dtype=torch.float32), torch.tensor(y[train]),
                      classes, l2)
        with torch.no_grad():
            guess = linear(torch.tensor((features[test] - mean) / std, dtype=torch.float32)).argmax(1).numpy()
        probe[test] = guess == y[test]
        majority[test] = y[test] == np.bincount(y[train], minlength=classes).argmax()
    return probe, majority


def probe_field(features: np.ndarray, values: list[str], folds: int = 5, seed: int = 0,
                l2: float = 1e-3) -> dict[str, Any]:
    """Out-of-fold accuracy of a linear probe reading `values` from `features` (clips, dims), against always
    answering the commonest value of the training folds; the clip-by-clip difference with its 95 % interval,
    and whether the field is carried (that interval above 0).

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(80, 4))
    >>> probe_field(x, ["up" if v > 0 else "down" for v in x[:, 0]])["carried"]
    True
    >>> probe_field(x, [str(v) for v in rng.integers(0, 2, 80)])["carried"]
    False
    """
    labels = sorted(set(values))
    probe, majority = out_of_fold(features, np.array([labels.index(v) for v in values]), len(labels), folds, seed, l2)
    cells = {name: mean_interval(list(v), seed=seed) for name, v in
             (("probe", probe), ("majority", majority), ("gain", probe - majority))}
    return {"values": labels, "clips": len(values),
            **{k: {"value": m, "ci": [lo, hi]} for k, (m, lo, hi) in cells.items()},
            "carried": bool(cells["gain"][1] > 0)}


# ----- features -----

@torch.no_grad()
def clip_features(encoder: str, audios: list[dict], tapped_layers: list[int] | None, batch_size: int,
                  progress: bool = False) -> tuple[np.ndarray, list[int]]:
    """(clips, layers x d_model): each clip's tapped layers averaged over its frames (and windows), and the
    layers tapped."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from desta.audio import SAMPLE_RATE, load_audio_ref, split_windows
    from desta.model.modeling import default_tapped_layers, tapped_states
    from desta.model.processing import PAD_MULTIPLE

    whisper = WhisperForConditionalGeneration.from_pretrained(encoder).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(encoder)
    layers = tapped_layers or default_tapped_layers(whisper.config.encoder_layers)
    rows = []
    for start in tqdm(range(0, len(audios), batch_size), desc="encoder features", disable=not progress):
        clips = [load_audio_ref(a, name=f"clip {start + k}") for k, a in enumerate(audios[start:start + batch_size])]
        windows = [split_windows(clip) for clip in clips]
        flat = [w for ws in windows for w in ws]
        inputs = extractor(flat, sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="pt",
                           padding="longest", pad_to_multiple_of=PAD_MULTIPLE)
        states, mask = tapped_states(whisper.get_encoder(), layers, inputs.input_features,
                                     inputs.attention_mask)  # (layers, windows, steps, d), (windows, steps)
        weight = mask[None, :, :, None].to(states.dtype)
        sums, steps = (states * weight).sum(2), weight.sum(2)  # (layers, windows, d), (1, windows, 1)
        index = 0
        for ws in windows:  # a clip's windows pooled together, frames weighted equally
            pooled = sums[:, index:index + len(ws)].sum(1) / steps[:, index:index + len(ws)].sum(1)
            rows.append(pooled.reshape(-1).float().numpy())  # (layers * d_model,)
            index += len(ws)
    return np.stack(rows), list(layers)


# ----- the command -----

def probe(config: ProbeConfig) -> Summary:
    """Probe every field; write and return the report."""
    from datasets import load_from_disk

    if not Path(config.source).is_dir():
        raise FileNotFoundError(f"{config.source} not found; give the dataset folder of desta describe or targets")
    dataset = load_from_disk(config.source)
    if "description" not in dataset.column_names or "audio" not in dataset.column_names:
        raise ValueError(f"{config.source} has no description or audio column (columns: {dataset.column_names}); "
                         "give the dataset folder of desta describe or desta targets")
    table = dataset.select_columns([c for c in ("id", "description", "response") if c in dataset.column_names])
    rows = table.to_list()
    first: dict[str, int] = {}
    for index, row in enumerate(rows):
        first.setdefault(row["id"], index)
    clips = sorted(first)[: config.max_clips] if config.max_clips else sorted(first)
    described = {c: parse_description(rows[first[c]]["description"])[1] for c in clips}
    wanted = config.fields or [f for f in PROBED if len({d.get(f) for d in described.values()} - {None}) >= 2]
    audio = dataset.select_columns(["audio"])
    features, layers = clip_features(config.encoder, [audio[first[c]]["audio"] for c in clips], config.tapped_layers,
                                     config.batch_size, config.progress)
    held = _heldout(config, dataset, clips, first) if config.heldout else None
    result: dict[str, Any] = {"source": config.source, "encoder": config.encoder, "tapped_layers": layers,
                              "clips": len(clips), "folds": config.folds, "fields": {}}
    if held is not None:
        result["heldout"] = {"source": config.heldout, **{g: int(m.sum()) for g, m in held["groups"].items()}}
    for field in wanted:
        keep = [k for k, c in enumerate(clips) if described[c].get(field)]
        values = [described[clips[k]][field] for k in keep]
        counts = {v: values.count(v) for v in set(values)}
        kept = [(k, v) for k, v in zip(keep, values, strict=True) if counts[v] >= config.folds]
        if len({v for _, v in kept}) < 2:
            result["fields"][field] = {"skipped": f"fewer than two values with {config.folds}+ clips: {counts}"}
            continue
        row = probe_field(features[[k for k, _ in kept]], [v for _, v in kept], config.folds, config.seed, config.l2)
        if held is not None:
            test = [k for k, d in enumerate(held["described"]) if d.get(field)]
            row["heldout"] = probe_heldout(features[[k for k, _ in kept]], [v for _, v in kept],
                                           held["features"][test], [held["described"][k][field] for k in test],
                                           {g: m[test] for g, m in held["groups"].items()}, config.seed, config.l2)
        if "response" in table.column_names:
            row["targets_name_gold"] = _targets_naming(rows, described, field, row["values"], config.seed)
        result["fields"][field] = row
    result["flagged"] = [f for f, row in result["fields"].items() if not row.get("carried", False)]
    result["describe_attributes"] = [f for f in DESCRIPTION_NAMES if f not in result["flagged"]]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    (out / "probe.md").write_text(render_probe(result))
    plot_probe(result, out / "probe.png")
    return Summary(result, render_probe(result) + f"wrote {out}/probe.md, probe.json, probe.png")


def _heldout(config: ProbeConfig, dataset: Any, clips: list[str], first: dict[str, int]) -> dict[str, Any]:
    """The held-out dataset's features, gold fields and voice groups (seen in source, unseen)."""
    from datasets import load_from_disk

    if not Path(config.heldout).is_dir():
        raise FileNotFoundError(f"heldout {config.heldout} not found; give a dataset folder of desta describe")
    other = load_from_disk(config.heldout)
    missing = [name for name, d in (("source", dataset), ("heldout", other)) if "voice" not in d.column_names]
    if missing:
        raise ValueError(f"{', '.join(missing)} has no voice column: seen and unseen voices cannot be told apart; "
                         "describe a corpus whose rows name their voice (desta synth writes one)")
    trained = {str(dataset[first[c]]["voice"]) for c in clips}
    described = [parse_description(d)[1] for d in other["description"]]
    features, _ = clip_features(config.encoder, list(other.select_columns(["audio"])["audio"]), config.tapped_layers,
                                config.batch_size, config.progress)
    seen = np.array([str(v) in trained for v in other["voice"]])
    return {"described": described, "features": features, "groups": {"seen voices": seen, "unseen voices": ~seen}}


def _targets_naming(rows: list[dict], described: dict[str, dict], field: str, labels: list[str],
                    seed: int) -> dict[str, Any] | None:
    """The share of target answers naming exactly the clip's gold value of a field (the eval's label words)."""
    if field == "duration":
        return None  # a number of seconds: not a label the eval's label words name
    named = [float(named_labels(r["response"], labels, field) == {described[r["id"]][field]})
             for r in rows if r["id"] in described and described[r["id"]].get(field) in labels]
    if not named:
        return None
    value, low, high = mean_interval(named, seed=seed)
    return {"value": value, "ci": [low, high], "answers": len(named)}


def _cell(cell: dict | None, signed: bool = False) -> str:
    if not cell:
        return "n/a"
    pattern = "{:+.2f}" if signed else "{:.2f}"
    low, high = (pattern.format(v) for v in cell["ci"])
    return f"{pattern.format(cell['value'])} [{low}, {high}]"


def render_probe(result: dict[str, Any]) -> str:
    """probe.md: per field, the probe against the commonest value, the difference, the verdict."""
    name = Path(result["encoder"]).name
    targets = any("targets_name_gold" in row for row in result["fields"].values())
    head = ["field", "values", "clips", "always the commonest", f"probe on {name}'s features", "probe - commonest",
            "carried by the audio"] + (["targets naming the gold value"] if targets else [])
    lines = [f"# Which description fields {name} can hear", "",
             f"A linear probe per field on {name}'s tapped layers {result['tapped_layers']} (averaged over each "
             f"clip's frames), held-out accuracy by {result['folds']}-fold cross-validation on {result['clips']} "
             "clips, against always answering the training folds' commonest value; 95 % bootstrap intervals over "
             "clips. A field is flagged when the difference's interval is not above 0: the audio, as this encoder "
             "hears it, does not convey it.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for field, row in result["fields"].items():
        if "skipped" in row:
            lines.append(f"| {field} | | | | skipped: {row['skipped']} | | |" + (" |" if targets else ""))
            continue
        cells = [field, str(len(row["values"])), str(row["clips"]), _cell(row["majority"]), _cell(row["probe"]),
                 _cell(row["gain"], signed=True), "yes" if row["carried"] else "**no (flagged)**"]
        if targets:
            cells.append(_cell(row.get("targets_name_gold")))
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("heldout"):
        held = result["heldout"]
        lines += ["", f"## Voices never trained on ({held['source']})", "",
                  "Probes fitted on every clip above score the held-out corpus's clips, apart by whether the clip's "
                  f"voice is among the training clips' ({held.get('seen voices', 0)} clips of seen voices, "
                  f"{held.get('unseen voices', 0)} of unseen ones): a field that holds on unseen voices is heard, "
                  "not a voice recognised.", "",
                  "| field | seen voices: commonest | seen voices: probe | unseen voices: commonest | "
                  "unseen voices: probe |", "|---|---|---|---|---|"]
        for field, row in result["fields"].items():
            found = row.get("heldout") or {}
            cells = [_cell((found.get(g) or {}).get(k)) for g in ("seen voices", "unseen voices")
                     for k in ("majority", "probe")]
            lines.append(f"| {field} | " + " | ".join(cells) + " |")
    if result["flagged"]:
        lines += ["", f"Flagged: {', '.join(result['flagged'])}. To leave them out of the descriptions: "
                  f"`desta describe ... attributes={','.join(result['describe_attributes'])}`."]
    else:
        lines += ["", "Flagged: none: the audio conveys every field probed."]
    return "\n".join(lines) + "\n"


def plot_probe(result: dict[str, Any], path: Path) -> None:
    """Bars per field: the probe and the commonest-value baseline, with 95 % interval whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [f for f, row in result["fields"].items() if "probe" in row]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(fields) + 2), 4.2))
    for offset, (key, label, color) in enumerate((("majority", "always the commonest value", "#bbbbbb"),
                                                  ("probe", "linear probe on the encoder's features", "#1f77b4"))):
        values = np.array([result["fields"][f][key]["value"] for f in fields])
        cis = np.array([result["fields"][f][key]["ci"] for f in fields]).reshape(-1, 2)
        errors = np.stack([values - cis[:, 0], cis[:, 1] - values]).clip(min=0) if len(fields) else None
        ax.bar(np.arange(len(fields)) + (offset - 0.5) * 0.4, values, 0.4, yerr=errors, capsize=3, label=label,
               color=color)
    for k, field in enumerate(fields):
        if field in result["flagged"]:
            ax.annotate("flagged", (k, 1.02), ha="center", fontsize=8, color="#d62728")
    ax.set_xticks(np.arange(len(fields)), fields, rotation=25, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out accuracy, 95 % interval")
    ax.set_title(f"What {Path(result['encoder']).name} hears, per description field ({result['clips']} clips)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
