"""Convert a released DeSTA2.5-Audio (or DeSTA2) checkpoint into a desta checkpoint folder.

Reads the official release: config.json and model.safetensors of DeSTA2.5-Audio (the trainable
weights only, prefix `perception.connector.`, LoRA keys when it was trained with LoRA), or the
Q-Former state dict of DeSTA2 (qformer_connector.pth, no prefix). Writes OUT/ as `desta.save`
does: config.json (a DestaConfig set up like the official connector: a bare BERT encoder with
no LayerNorm on the queries, the feed-forward width and taps of the release, 30 s padding),
model.safetensors (the weights under desta's names) and the processor files. `desta.load(OUT)`
then reads the base Whisper and LLM from the checkpoints the config names.

The official Q-Former is transformers' BertEncoder with cross-attention in every layer; desta's
is BLIP-2's, whose layers hold the same weights under other names:

| official (prefix `perception.connector.`) | desta (prefix `connector.`) |
|---|---|
| `layer_prompts.{k}` (1, queries, d) | `queries[k]` of (layers, queries, d) |
| `layer_weights` (queries, layers) | `layer_logits` (layers, queries): the transpose |
| `qformer.layer.{i}.attention.self.{query,key,value}` | `qformer.layer.{i}.attention.attention.{...}` |
| `qformer.layer.{i}.crossattention.self.{...}` | `qformer.layer.{i}.crossattention.attention.{...}` |
| `qformer.layer.{i}.intermediate.dense` | `qformer.layer.{i}.intermediate_query.dense` |
| `qformer.layer.{i}.output.{dense,LayerNorm}` | `qformer.layer.{i}.output_query.{...}` |
| `proj.0` (LayerNorm), `proj.1` (Linear) | `norm`, `proj` |
| `llm_model.model.layers.{i}...lora_{A,B}.default.weight` | `llm.base_model.model.model.layers.{i}...` |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from desta.core.args import raise_problems
from desta.core.artifacts import CONFIG, WEIGHTS
from desta.core.summary import Summary

# The official connector's fixed settings (desta/models/modeling_desta25.py): BERT's dropout, PyTorch's
# default init (post_init is never called), queries drawn with std 1, no LayerNorm on them.
OFFICIAL_CONNECTOR = {"query_layernorm": False, "query_init_std": 1.0, "qformer_init": "pytorch",
                      "qformer_dropout": 0.1, "pad_to_30s": True}
# The official LoRA (DeSTA25AudioModel, use_lora=True): alpha 16 whatever the rank, dropout 0.1.
OFFICIAL_LORA = {"lora_alpha": 16, "lora_dropout": 0.1}
RELEASE_WEIGHTS = ("model.safetensors", "qformer_connector.pth")
_RENAMES = [  # applied in order to the part after "qformer.layer.{i}."
    (re.compile(r"^(attention|crossattention)\.self\."), r"\1.attention."),
    (re.compile(r"^intermediate\.dense\."), "intermediate_query.dense."),
    (re.compile(r"^output\.(dense|LayerNorm)\."), r"output_query.\1."),
]


@dataclass
class ConvertConfig:
    """Convert a released DeSTA2.5-Audio (or DeSTA2) checkpoint into a desta checkpoint folder."""

    POSITIONAL = ("src", "out")
    src: str
    """the release folder: config.json + model.safetensors (DeSTA2.5-Audio) or qformer_connector.pth (DeSTA2)"""
    out: str
    """the desta checkpoint folder to write (desta.load reads it)"""
    encoder: str | None = None
    """Whisper checkpoint (Hub id or folder); null: the release config's encoder_model_id"""
    llm: str | None = None
    """chat LLM checkpoint (Hub id or folder); null: the release config's llm_model_id"""
    tapped_layers: list[int] | None = None
    """null: the release config's target_layer_ids, else the Whisper size's (DeSTA2's release code read
    [1,4,7,10] from whisper-small, its training code [2,5,8,11])"""

    def __post_init__(self) -> None:
        problems = []
        if not self.src:
            problems.append(("src", "required: the folder of the official release"))
        if not self.out:
            problems.append(("out", "required: the folder to write"))
        raise_problems(problems)


def official_to_desta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official connector (and LoRA) weights -> desta state-dict names; the prefix `perception.connector.`
    is optional (DeSTA2's file has none). Raises ValueError naming the keys it does not know.

    >>> sorted(official_to_desta({"layer_prompts.0": torch.zeros(1, 2, 4), "layer_prompts.1": torch.ones(1, 2, 4),
    ...                           "layer_weights": torch.zeros(2, 2), "proj.1.bias": torch.zeros(3)}))
    ['connector.layer_logits', 'connector.proj.bias', 'connector.queries']
    """
    out: dict[str, torch.Tensor] = {}
    prompts: dict[int, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = key.removeprefix("perception.connector.")
        if match := re.fullmatch(r"layer_prompts\.(\d+)", name):
            prompts[int(match.group(1))] = value.reshape(value.shape[-2:])  # (1, queries, d) -> (queries, d)
        elif name == "layer_weights":
            out["connector.layer_logits"] = value.t().contiguous()  # (queries, layers) -> (layers, queries)
        elif match := re.fullmatch(r"qformer\.layer\.(\d+)\.(.+)", name):
            rest = match.group(2)
            for pattern, replacement in _RENAMES:
                rest = pattern.sub(replacement, rest)
            out[f"connector.qformer.layer.{match.group(1)}.{rest}"] = value
        elif match := re.fullmatch(r"proj\.([01])\.(weight|bias)", name):
            out[f"connector.{'norm' if match.group(1) == '0' else 'proj'}.{match.group(2)}"] = value
        elif name.startswith("llm_model.") and "lora_" in name:
            out["llm.base_model.model." + name.removeprefix("llm_model.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} weights of the release are not connector or LoRA weights desta knows, "
                         f"e.g. {unknown[:3]}; is this a DeSTA2.5-Audio or DeSTA2 release?")
    if sorted(prompts) != list(range(len(prompts))) or not prompts:
        raise ValueError(f"the release's layer_prompts are numbered {sorted(prompts)}; expected 0..n-1")
    out["connector.queries"] = torch.stack([prompts[k] for k in sorted(prompts)])  # (layers, queries, d)
    return out


def _release_weights(src: Path) -> dict[str, torch.Tensor]:
    for name in RELEASE_WEIGHTS:
        if (src / name).is_file():
            if name.endswith(".safetensors"):
                return load_file(src / name)
            return torch.load(src / name, map_location="cpu", weights_only=True)  # tensors only: no code runs
    raise FileNotFoundError(f"{src} holds none of {list(RELEASE_WEIGHTS)}; give the folder of a DeSTA2.5-Audio "
                            "(or DeSTA2) release")


def connector_settings(weights: dict[str, torch.Tensor], release: dict[str, Any]) -> dict[str, Any]:
    """The DestaConfig settings the release's weights and config.json imply (depth, queries, widths, LoRA)."""
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"connector\.qformer\.layer\.(\d+)\.", k))}
    queries = weights["connector.queries"]
    settings = {**OFFICIAL_CONNECTOR, "num_queries": queries.shape[1], "qformer_layers": len(layers),
                "qformer_intermediate_size": weights["connector.qformer.layer.0.intermediate_query.dense.weight"]
                .shape[0]}
    lora_a = sorted(k for k in weights if "lora_A" in k)
    if lora_a:
        targets = sorted({re.search(r"\.(\w+)\.lora_A\.", k).group(1) for k in lora_a})
        settings["lora"] = {**OFFICIAL_LORA, "r": weights[lora_a[0]].shape[0], "target_modules": targets}
    if release.get("prompt_size") not in (None, queries.shape[1]):
        raise ValueError(f"the release config says prompt_size {release['prompt_size']} but its queries hold "
                         f"{queries.shape[1]}")
    return settings


def convert_official(config: ConvertConfig) -> Summary:
    """`desta convert-official SRC OUT`: write the desta checkpoint folder; returns it."""
    from desta.model.loading import config_and_processor
    from desta.model.modeling import QFormerConnector

    src, out = Path(config.src), Path(config.out)
    release = json.loads((src / CONFIG).read_text()) if (src / CONFIG).is_file() else {}
    encoder = config.encoder or release.get("encoder_model_id")
    llm = config.llm or release.get("llm_model_id")
    if not encoder or not llm:
        raise ValueError(f"{src} has no config.json naming the base checkpoints; give encoder=... and llm=... "
                         "(e.g. openai/whisper-small and meta-llama/Meta-Llama-3-8B-Instruct for DeSTA2)")
    weights = official_to_desta(_release_weights(src))
    tapped = config.tapped_layers or release.get("target_layer_ids")
    if tapped is not None and len(tapped) != weights["connector.queries"].shape[0]:
        raise ValueError(f"tapped_layers {tapped} name {len(tapped)} layers but the release holds "
                         f"{weights['connector.queries'].shape[0]} sets of queries")
    desta_config, processor = config_and_processor(encoder, llm, tapped_layers=tapped,
                                                   **connector_settings(weights, release))
    with torch.device("meta"):  # shapes only: the names and sizes a DestaModel expects of its connector
        expected = {f"connector.{k}": v.shape for k, v in QFormerConnector(desta_config).state_dict().items()}
    found = {k: v.shape for k, v in weights.items() if k.startswith("connector.")}
    if found != expected:
        differ = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
        examples = [(k, found.get(k), expected.get(k)) for k in differ[:3]]
        raise ValueError(f"the converted connector does not match desta's for this encoder and LLM: {len(differ)} "
                         f"weights differ in name or shape (name, release, desta), e.g. {examples}")
    out.mkdir(parents=True, exist_ok=True)
    desta_config.save_pretrained(out)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, out / WEIGHTS,
              metadata={"format": "pt", "desta": "trainable", "converted_from": str(src)})
    processor.save_pretrained(out)
    return Summary({"out": str(out)}, f"converted {src} -> {out}; load it with desta.load({str(out)!r})")
