"""The DeSTA speech LLM: frozen Whisper encoder -> Q-Former connector -> frozen chat LLM.

transformers-native: `DestaConfig` (a `PreTrainedConfig`) and `DestaModel` (a `PreTrainedModel`),
built from the parts in desta.model.parts (the encoder taps, the Q-Former connector, the LLM's forward
pass). The connector's 64 vectors per 30 s window, followed by the transcript's token embeddings, fill
the audio placeholder positions of the LLM's input embeddings.
Saving writes only the trainable weights (connector, LoRA) as safetensors, or with `full` the whole model;
loading reads the base encoder and LLM from the checkpoints the config names (none for a full save), and
never unpickles. The config is the checkpoint's one record: the processor reads its settings there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from huggingface_hub.dataclasses import strict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    WhisperForConditionalGeneration,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_layers import GradientCheckpointingLayer

from desta.audio import FRAMES_PER_ENCODER_STEP
from desta.core.artifacts import CONFIG, WEIGHTS, WEIGHTS_INDEX
from desta.core.hub import is_hub_id
from desta.core.llm import llm_config, load_causal_lm
from desta.model.bases import locate_base
from desta.model.parts import (
    DestaOutput,
    LogitPositions,
    PooledMLPConnector,
    QFormerConnector,
    default_tapped_layers,
    lm_forward,
    merge_audio,
    tapped_states,
)
from desta.model.processing import SLOTS, DestaProcessor, TranscriptFormat

if TYPE_CHECKING:
    import numpy as np


# A whole-model export (desta export --full) keeps each base's generation settings (Whisper's no-timestamps token,
# its length limit; the LLM's end-of-turn tokens), which the config alone does not carry.
GENERATION_CONFIGS = {"whisper": "whisper_generation_config.json", "llm": "llm_generation_config.json"}
Connector = Literal["qformer", "mlp"]
# How the Q-Former's Linear layers start: transformers' BERT init, or PyTorch's own (the official code never
# calls post_init, so its connector keeps PyTorch's kaiming-uniform init).
QFormerInit = Literal["bert", "pytorch"]
DEFAULT_LORA = {
    "r": 8,  # higher: more capacity, more memory, more forgetting
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass
class Architecture:
    """What a DeSTA model is built as besides its two base checkpoints: the connector, the audio slots, LoRA.
    DestaConfig holds these settings (it derives from this class) and `desta train`'s model section takes them:
    one owner of their types, defaults and docs."""

    tapped_layers: list[int] | None = None
    """encoder blocks feeding the connector; null: per Whisper size (small [2,5,8,11], large-v3 [7,15,23,31])"""
    connector: Connector = "qformer"
    """qformer: learnt queries read the frames (the papers); mlp: each window's frames averaged into num_queries
    equal spans, then a two-layer MLP (a plain projector, as Ultravox and LLaVA)"""
    frame_norm: bool = False
    """LayerNorm each tapped layer's frames before the connector reads them (as BLIP-2 normalises its vision
    features before the Q-Former)"""
    num_queries: int = SLOTS.num_queries
    """connector vectors per 30 s window (qformer: learnable queries per tapped layer; mlp: spans)"""
    qformer_layers: int = 2
    """Q-Former depth: 2 in DeSTA2, 6 in DeSTA2.5"""
    qformer_heads: int | None = None
    """Q-Former attention heads; null: the encoder's"""
    qformer_dropout: float = 0.1
    """dropout inside the Q-Former"""
    qformer_intermediate_size: int | None = None
    """Q-Former feed-forward width; null: 4 x Whisper's d_model (the official DeSTA2/2.5 code: 3072, BERT's)"""
    query_layernorm: bool = True
    """BLIP-2's LayerNorm and dropout on the queries; false: they enter the encoder as they are (official code)"""
    query_init_std: float = 0.02
    """standard deviation of the initial queries (official code: 1.0)"""
    qformer_init: QFormerInit = "bert"
    """Q-Former Linear weights start as BERT's normal(0.02), or PyTorch's default (official code)"""
    audio_token: str = SLOTS.audio_token
    """the audio placeholder in chat messages"""
    transcript_max_tokens: int = SLOTS.transcript_max_tokens
    """transcript tokens after the audio vectors in training (inference keeps the whole transcript)"""
    transcript_format: TranscriptFormat = SLOTS.transcript_format
    """what the transcript slot reads: the bare transcript (the papers), or "[00:00-00:03] transcript" as the
    text LLM's description gives it (the model then hears the clip's length in words)"""
    pad_to_30s: bool = SLOTS.pad_to_30s
    """pad every window to 30 s as the papers do: slower, kept for comparison"""
    lora: dict | None = None
    """LoRA on the LLM, e.g. {r: 8, lora_alpha: 16}; null: the LLM stays frozen"""

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with these sizes, as (setting, problem): DestaConfig raises them, `desta train` reports
        them with its other settings' problems."""
        problems = []
        if self.num_queries < 1 or self.qformer_layers < 1 or self.transcript_max_tokens < 0:
            problems.append(("num_queries", f"num_queries and qformer_layers must be at least 1, transcript_max_tokens "
                                            f"0 or more; got {self.num_queries}, {self.qformer_layers} and "
                                            f"{self.transcript_max_tokens}"))
        if self.qformer_intermediate_size is not None and self.qformer_intermediate_size < 1:
            problems.append(("qformer_intermediate_size", f"must be at least 1 (or null), got "
                                                          f"{self.qformer_intermediate_size}"))
        if not self.query_init_std > 0:
            problems.append(("query_init_std", f"must be positive, got {self.query_init_std}"))
        if not 0 <= self.qformer_dropout < 1:
            problems.append(("qformer_dropout", f"must be in [0, 1), got {self.qformer_dropout}"))
        return problems

    def architecture(self) -> dict[str, Any]:
        """These settings by name (a subclass's own left out)."""
        return {f.name: getattr(self, f.name) for f in fields(Architecture)}


@strict
class DestaConfig(PreTrainedConfig, Architecture):
    r"""Configuration of a DeSTA speech LLM.

    encoder_config / text_config: the Whisper and LLM configs (inline). encoder_name_or_path /
    llm_name_or_path: the checkpoints (Hub id or folder) the base weights load from; `None` means
    random weights from the inline config (tests). Build one from two checkpoints with
    `DestaConfig.from_components("openai/whisper-small", "meta-llama/Meta-Llama-3-8B-Instruct")`.
    """

    model_type = "desta"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    encoder_name_or_path: str | None = None
    """Whisper checkpoint the encoder (and ASR decoder) load from"""
    llm_name_or_path: str | None = None
    """chat LLM checkpoint"""
    audio_token_id: int | None = None
    """the audio placeholder's id in the LLM's tokenizer (desta.model.processing.add_audio_token; desta.build
    records it)"""
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.encoder_config.encoder_layers
        if self.tapped_layers is None:
            self.tapped_layers = default_tapped_layers(layers)
        bad = [i for i in self.tapped_layers if not 0 <= i < layers]
        if bad or not self.tapped_layers:
            raise ValueError(f"tapped_layers {self.tapped_layers} must be non-empty indices in [0, {layers - 1}] "
                             f"for a Whisper encoder of {layers} layers")
        if self.lora is not None:
            unknown = set(self.lora) - {"r", "lora_alpha", "lora_dropout", "target_modules"}
            if unknown:
                raise ValueError(f"unknown LoRA settings {sorted(unknown)}; "
                                 "use r, lora_alpha, lora_dropout, target_modules")
            self.lora = {**DEFAULT_LORA, **self.lora}
        problems = [(name, f"must be one of {get_args(choices)}, got {getattr(self, name)!r}")
                    for name, choices in (("connector", Connector), ("qformer_init", QFormerInit),
                                          ("transcript_format", TranscriptFormat))
                    if getattr(self, name) not in get_args(choices)]
        problems += self.problems()
        if problems:
            raise ValueError("; ".join(f"{name}: {problem}" for name, problem in problems))

    @classmethod
    def from_components(cls, encoder: str, llm: str, **kwargs: Any) -> DestaConfig:
        """A config naming a Whisper checkpoint and a chat LLM checkpoint (Hub ids or folders)."""
        return cls(
            encoder_config=AutoConfig.from_pretrained(encoder).to_dict(),
            text_config=llm_config(llm).to_dict(),
            encoder_name_or_path=_reference(encoder),
            llm_name_or_path=_reference(llm),
            **kwargs,
        )


# transformers then knows a checkpoint's model_type "desta" (loading its tokenizer reads config.json; an unknown type
# warned "You are using a model of type desta to instantiate a model of type ``")
AutoConfig.register(DestaConfig.model_type, DestaConfig, exist_ok=True)


class DestaModel(PreTrainedModel):
    """Frozen Whisper + Q-Former connector + frozen (optionally LoRA-tuned) chat LLM."""

    config_class = DestaConfig
    base_model_prefix = "desta"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: DestaConfig, whisper: WhisperForConditionalGeneration | None = None,
                 llm: PreTrainedModel | None = None):
        super().__init__(config)
        # The full Whisper is kept: its encoder feeds the connector, its decoder transcribes at inference.
        self.whisper = whisper if whisper is not None else WhisperForConditionalGeneration(config.encoder_config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        self.connector = PooledMLPConnector(config) if config.connector == "mlp" else QFormerConnector(config)
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            self.llm = get_peft_model(self.llm, LoraConfig(task_type="CAUSAL_LM", **config.lora))
        self.apply_freezing()

    # ----- freezing policy: the one place that decides what trains -----

    @staticmethod
    def is_trainable_name(name: str) -> bool:
        """Connector and LoRA weights train; the Whisper encoder and the base LLM stay frozen."""
        return name.startswith("connector.") or "lora_" in name

    def apply_freezing(self) -> None:
        """Set requires_grad by `is_trainable_name` and tell the Trainer the frozen weights are not saved."""
        for name, param in self.named_parameters():
            param.requires_grad_(self.is_trainable_name(name))
        # Checkpoints hold the trainable weights only; this tells transformers' Trainer that the frozen
        # ones are missing from them on purpose (it warns about any other missing weight).
        self._keys_to_ignore_on_save = [k for k in self.state_dict() if not self.is_trainable_name(k)]

    def parameter_counts(self) -> dict[str, int | float]:
        """Trainable and total parameter counts, and the trainable share."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total, "trainable_share": trainable / total}

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's token embeddings (FSDP shards them as a unit of their own)."""
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The LLM's output projection."""
        return self.llm.get_output_embeddings()

    def train(self, mode: bool = True) -> DestaModel:
        """nn.Module.train, except that Whisper (and the LLM, unless LoRA trains it) stays in eval mode.

        A frozen LLM with gradient checkpointing on (`model.llm.activation_checkpointing_enable()`)
        still recomputes its layers in the backward pass: transformers checkpoints a layer only
        while that layer is in training mode, so the checkpointed layers alone are flagged as
        training and every module inside them (attention and its dropout) stays in eval mode.
        """
        super().train(mode)
        self.whisper.eval()  # frozen: no dropout, ever
        if self.config.lora is None:
            self.llm.eval()
            for module in self.llm.modules():
                if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                    module.training = mode
        return self

    # ----- audio path -----

    def encode_audio(self, input_features: torch.Tensor,
                     feature_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen Whisper encoder's tapped layers for windows of any length up to 30 s (`tapped_states`).

        input_features: (windows, mel_bins, frames); feature_attention_mask: (windows, frames).
        Returns hidden states (layers, windows, steps, d_model) and a step mask (windows, steps).
        """
        return tapped_states(self.whisper.get_encoder(), self.config.tapped_layers, input_features,
                             feature_attention_mask)

    def embed_audio(self, input_features: torch.Tensor | None = None,
                    feature_attention_mask: torch.Tensor | None = None,
                    audio_hidden_states: torch.Tensor | None = None,
                    audio_step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Audio windows -> connector vectors (windows, queries, llm_hidden).

        Pass mel features, or tapped-layer hidden states computed earlier (the feature cache).
        """
        if audio_hidden_states is None:
            audio_hidden_states, audio_step_mask = self.encode_audio(input_features, feature_attention_mask)
        elif audio_step_mask is None:
            audio_step_mask = torch.ones(audio_hidden_states.shape[1:3], dtype=torch.bool,
                                         device=audio_hidden_states.device)
        # Under autocast the frames enter the connector in its 16-bit dtype, cast here once: in float32, each key and
        # value product of the Q-Former would cast them again and keep its own copy for the backward pass.
        device = audio_hidden_states.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.connector.norm.weight.dtype)
        return self.connector(audio_hidden_states.to(dtype), audio_step_mask)

    def embed_inputs(self, input_ids: torch.Tensor, input_features: torch.Tensor | None = None,
                     feature_attention_mask: torch.Tensor | None = None,
                     audio_hidden_states: torch.Tensor | None = None,
                     audio_step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the audio placeholder positions filled by connector vectors.

        input_ids: (batch, seq) -> (batch, seq, llm_hidden). Placeholders are filled in order:
        batch row by row, each clip's windows in time order.
        """
        audio_id = self.config.audio_token_id
        if audio_id is None:
            raise ValueError("config.audio_token_id is not set; build the model with desta.build, or give DestaConfig "
                             "audio_token_id=desta.model.processing.add_audio_token(tokenizer)")
        audio_mask = input_ids == audio_id  # (batch, seq)
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(audio_mask, 0))
        slots = int(audio_mask.sum())
        has_audio = input_features is not None or audio_hidden_states is not None
        if not has_audio:
            if slots:
                raise ValueError(f"the text holds {slots} audio placeholder positions but no audio features were "
                                 "given; pass input_features from DestaProcessor")
            if self.training and torch.is_grad_enabled():
                embeds = embeds + self._idle_audio(embeds.device).to(embeds.dtype)
            return embeds
        audio = self.embed_audio(input_features, feature_attention_mask, audio_hidden_states, audio_step_mask)
        return merge_audio(embeds, input_ids, audio_id, audio)

    def _idle_audio(self, device: torch.device) -> torch.Tensor:
        """Zero, computed by the whole audio path (encoder and connector) from one silent encoder step.

        A training batch of text-only rows never reaches the audio path. Added to its embeddings, this
        keeps every trainable weight in the graph (DDP without unused-parameter search needs them all)
        and runs the same sharded modules on every process (FSDP gathers their weights collectively).
        """
        silent = torch.zeros(1, self.config.encoder_config.num_mel_bins, FRAMES_PER_ENCODER_STEP, device=device)
        return self.embed_audio(silent).sum() * 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, audio_hidden_states: torch.Tensor | None = None,
                audio_step_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_at: LogitPositions | None = None, **kwargs: Any) -> DestaOutput:
        """Logits, and with `labels` the mean cross-entropy over the tokens whose label is not -100.

        logits_at: "labelled" projects only the positions that predict a labelled token (the response): the
        same loss and gradients without the (batch, seq, vocab) logits of every audio and prompt position;
        the output then holds `label_logits` (positions, vocab), row by row, and no `logits`. "all": every
        position, `logits` (batch, seq, vocab). Default: "labelled" while training with labels, else "all"
        (evaluation and generation see the logits they always saw).
        position_ids: (batch, seq) restarting at 0 for each sample of a packed row (desta.model.packing):
        attention is then block-diagonal, each sample seeing only itself.
        """
        inputs_embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask,
                                          audio_hidden_states, audio_step_mask)
        kwargs.setdefault("use_cache", False)  # one pass over the whole sequence: a key/value cache only holds memory
        mode = logits_at or ("labelled" if self.training and labels is not None else "all")
        return lm_forward(self.llm, inputs_embeds, attention_mask, labels, position_ids, mode, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                 audio_hidden_states: torch.Tensor | None = None, audio_step_mask: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Token-level generation (batched, left-padded inputs from the processor; the audio as mel features or
        cached encoder states): new token ids."""
        inputs_embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask, audio_hidden_states,
                                          audio_step_mask)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def transcribe(self, processor: DestaProcessor, audios: list[np.ndarray], max_new_tokens: int = 128,
                   vad: bool = True) -> list[str]:
        """Whisper's own decoder transcribes each clip (batched over all 30 s windows); with `vad`, a window where
        Silero VAD finds no speech reads "" (DeSTA2.5 gives the LLM an empty transcript there)."""
        from desta.audio.asr import transcribe_windows

        return transcribe_windows(self.whisper, processor.feature_extractor, audios, max_new_tokens, vad=vad)

    @torch.no_grad()
    def chat(self, processor: DestaProcessor, conversations: list[list[dict]] | list[dict],
             audios: list[list[np.ndarray]] | None = None, transcripts: list[list[str | None]] | None = None,
             max_new_tokens: int = 128, **generate_kwargs: Any) -> list[str]:
        """Answer chat conversations whose user turns hold the audio placeholder; returns the texts.

        With no transcripts given, Whisper transcribes every clip first (batched; "" where VAD finds no speech).
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
            audios = [audios] if audios is not None and (not audios or not isinstance(audios[0], list)) else audios
        if audios is not None and transcripts is None:
            flat = [a for clips in audios for a in clips]
            texts = iter(self.transcribe(processor, flat)) if flat else iter(())
            transcripts = [[next(texts) for _ in clips] for clips in audios]
        inputs = processor(conversations, audios=audios, transcripts=transcripts, add_generation_prompt=True)
        inputs = inputs.to(self.device)
        tokenizer = processor.tokenizer
        new_tokens = self.generate(**inputs, max_new_tokens=max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    # ----- save / load: trainable weights only, safetensors, no pickle -----

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds (connector and LoRA), detached and contiguous, by state-dict name.

        Under FSDP each weight is gathered from its shards: a collective, so every process must call it.
        """
        weights = {}
        for name, value in self.state_dict().items():
            if self.is_trainable_name(name):
                full = value.full_tensor() if isinstance(value, DTensor) else value
                weights[name] = full.detach().contiguous()
        return weights

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        full: bool = False, **_: Any) -> None:
        """Write config.json and the trainable weights (connector, LoRA) as model.safetensors; `state_dict`
        (gathered by the caller) replaces the model's own weights. With `full`, the whole model instead (`_save_full`),
        which loads with no base checkpoint."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if full:
            self._save_full(folder)
            return
        self.config.save_pretrained(folder)
        weights = self.trainable_state_dict() if state_dict is None else {
            k: v.detach().contiguous() for k, v in state_dict.items() if self.is_trainable_name(k)}
        save_file(weights, folder / WEIGHTS, metadata={"format": "pt", "desta": "trainable"})

    def _save_full(self, folder: Path) -> None:
        """Every weight (LoRA merged into this model's LLM, in place) as safetensors shards, a config naming no base,
        and both bases' generation settings (GENERATION_CONFIGS), which `from_pretrained` reads back."""
        from huggingface_hub import save_torch_state_dict

        if self.config.lora is not None:
            self.llm = self.llm.merge_and_unload()
            self.config.lora = None
        self.config.encoder_name_or_path = self.config.llm_name_or_path = None
        self.config.save_pretrained(folder)
        for part, name in GENERATION_CONFIGS.items():  # the config alone would leave Whisper's and the LLM's defaults
            getattr(self, part).generation_config.save_pretrained(folder, config_file_name=name)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        # shared (tied) tensors are written once; loading restores the tie
        save_torch_state_dict(state, folder, filename_pattern="model{suffix}.safetensors", max_shard_size="5GB",
                              metadata={"format": "pt", "desta": "full"})

    @classmethod
    def from_base(cls, config: DestaConfig, dtype: torch.dtype = torch.float32) -> DestaModel:
        """A fresh model: base Whisper and LLM weights from the checkpoints the config names, new connector.

        A side left unnamed (`None`) is built with random weights from its inline config. Weights
        load in float32 unless `dtype` says otherwise (bf16 on GPU: `dtype=torch.bfloat16`).
        Like transformers' from_pretrained, the model comes back in eval mode.
        """
        whisper = llm = None
        if config.encoder_name_or_path:
            whisper = WhisperForConditionalGeneration.from_pretrained(config.encoder_name_or_path, dtype=dtype)
        if config.llm_name_or_path:
            llm = load_causal_lm(config.llm_name_or_path, dtype=dtype)
        return cls(config, whisper=whisper, llm=llm).to(dtype).eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, token: str | None = None, **_: Any) -> DestaModel:
        """Load a saved model (folder or Hub id): base weights from the named checkpoints + trainable weights."""
        folder = resolve_checkpoint(pretrained_model_name_or_path, revision=revision, token=token)
        config = DestaConfig.from_pretrained(folder)
        weights = _load_weights(folder)  # safetensors: no code runs while loading
        if any(name.startswith("whisper.") for name in weights):  # a full export: no base checkpoint needed
            model = cls(config).to(dtype)
            missing, unexpected = model.load_state_dict(weights, strict=False)
            untied = [m for m in missing if not m.endswith(("proj_out.weight", "lm_head.weight"))]
            if untied or unexpected:
                raise ValueError(f"{folder} does not match the model: missing {untied[:3]}, unexpected "
                                 f"{unexpected[:3]}")
            for part, name in GENERATION_CONFIGS.items():  # the bases' generation settings, saved with the export
                if (folder / name).is_file():
                    getattr(model, part).generation_config = GenerationConfig.from_pretrained(folder, name)
            return model.eval()
        for field, what in (("encoder_name_or_path", "Whisper"), ("llm_name_or_path", "LLM")):
            if getattr(config, field):
                setattr(config, field, locate_base(getattr(config, field), f"the {what} base", folder))
        model = cls.from_base(config, dtype=dtype)
        expected = set(model.trainable_state_dict())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS} does not match the model: {len(missing)} missing weights "
                             f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {sorted(unexpected)[:3]})")
        model.load_state_dict(weights, strict=False)
        return model


def _reference(name_or_path: str | os.PathLike) -> str:
    """A base checkpoint as a config records it: a local folder by its absolute path (the checkpoint then loads
    from any working folder), a Hub id as it is."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else str(name_or_path)


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard listed in model.safetensors.index.json."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_file(folder / shard))
        return weights
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS}; point at a folder written by save_pretrained")
    return load_file(folder / WEIGHTS)


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                       token: str | None = None) -> Path:
    """A checkpoint folder: the local folder given, or a Hub repository's files downloaded (weights,
    configs, tokenizer; never pickles)."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"{path} holds no config.json; point at a folder written by save_pretrained")
        return path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"checkpoint {name_or_path} not found: give a folder written by save_pretrained "
                                "or a Hub repository id such as user/desta-model")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), revision=revision, token=token,
                                  allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))

