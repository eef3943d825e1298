"""The speech LLM's parts, as plain modules and functions: tapped Whisper encoder states, the Q-Former
connector, audio vectors merged into the LLM's input embeddings, and the LLM's forward pass (logits at the
labelled positions only, packed rows isolated).

DestaModel (modeling.py) is built from these; they need nothing but torch and transformers and only what
transformers has long had (4.5x and 5.x), so bench/gpu.py runs the same code on a GPU machine whose
transformers is older than the one desta's config classes need.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from desta.audio import FRAMES_PER_ENCODER_STEP
from desta.core.sequences import IGNORE_INDEX
from desta.model.packing import VARLEN_ATTENTION, one_row, packed_attention_mask

try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers before 4.56
    create_bidirectional_mask = None

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers 4.x's Whisper encoder layer takes a head mask as its third argument
_LAYER_KWARGS = {"layer_head_mask": None} if "layer_head_mask" in inspect.signature(
    WhisperEncoderLayer.forward).parameters else {}

# Tapped encoder layers per Whisper depth ("layer i" = output of block i), as in the DeSTA papers.
DEFAULT_TAPPED_LAYERS = {
    4: [0, 1, 2, 3],  # tiny
    6: [1, 2, 3, 5],  # base
    12: [2, 5, 8, 11],  # small
    24: [5, 11, 17, 23],  # medium
    32: [7, 15, 23, 31],  # large-v3 (DeSTA2.5)
}


def default_tapped_layers(num_layers: int) -> list[int]:
    """The tapped layers for a Whisper of `num_layers` blocks: the papers' choice, else 4 evenly spaced.

    >>> default_tapped_layers(12), default_tapped_layers(8)
    ([2, 5, 8, 11], [1, 3, 5, 7])
    """
    if num_layers in DEFAULT_TAPPED_LAYERS:
        return list(DEFAULT_TAPPED_LAYERS[num_layers])
    count = min(4, num_layers)
    return [round((i + 1) * num_layers / count) - 1 for i in range(count)]


LogitPositions = Literal["labelled", "all"]
# Config entries of LLMs whose logits are more than the output projection of the last hidden state (Gemma's
# soft-capping, Cohere's scale): for those the labelled positions are gathered from the model's own logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


@dataclass
class DestaOutput(CausalLMOutputWithPast):
    """The LLM's output; with logits_at="labelled", `label_logits` holds the logits of the positions that predict
    a labelled token, (positions, vocab) in row-major order, and `logits` is None."""

    label_logits: torch.FloatTensor | None = None


def labelled_logits(llm: PreTrainedModel, labels: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a causal LM (or its peft wrapper) and project only the positions that predict a labelled token.

    labels: (batch, seq), -100 where no loss is taken; inputs: what the LLM's forward takes (input_ids or
    inputs_embeds, attention_mask, ...). Position t predicts token t + 1, so the positions kept are those
    whose next label is not -100. Returns logits (positions, vocab) in row-major order of those positions and
    their targets (positions,): `cross_entropy(logits, targets)` is the LLM's own loss, and the LM head
    never sees an audio or prompt position.
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # (batch, seq - 1)
    targets = labels[:, 1:][keep]  # (positions,)
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # peft: LoRA lives inside the layers
    if any(getattr(base.config, name, None) for name in _LOGIT_TRANSFORMS):
        return base(**inputs).logits[:, :-1][keep], targets
    hidden = base.get_decoder()(**inputs).last_hidden_state  # (batch, seq, hidden)
    return base.get_output_embeddings()(hidden[:, :-1][keep]), targets  # (positions, hidden) -> (positions, vocab)


def tapped_states(encoder: nn.Module, tapped_layers: list[int], input_features: torch.Tensor,
                  feature_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a Whisper encoder on windows of any length up to 30 s; return the tapped layers.

    input_features: (windows, mel_bins, frames); feature_attention_mask: (windows, frames).
    Returns hidden states (layers, windows, steps, d_model) and a step mask (windows, steps).

    transformers' WhisperEncoder.forward insists on 3000 frames, so the blocks are driven here:
    positions are sliced to the real length, padded mel frames are zeroed before and after the
    first convolution (so the last real steps see what a clip alone sees: the convolutions'
    zero padding) and padded steps are masked out of self-attention, so a clip's features do
    not depend on its batch.
    """
    max_steps = encoder.max_source_positions
    dtype = encoder.conv1.weight.dtype
    with torch.set_grad_enabled(torch.is_grad_enabled() and encoder.conv1.weight.requires_grad):
        x = input_features.to(dtype)
        frame_mask = None
        if feature_attention_mask is not None and not bool(feature_attention_mask.all()):
            frame_mask = feature_attention_mask[:, None, :].to(dtype)  # (windows, 1, frames)
            x = x * frame_mask
        x = F.gelu(encoder.conv1(x))
        if frame_mask is not None:
            x = x * frame_mask
        x = F.gelu(encoder.conv2(x)).transpose(1, 2)  # (windows, steps, d_model)
        steps = x.shape[1]
        if steps > max_steps:
            raise ValueError(f"an audio window gives {steps} encoder steps but Whisper holds at most {max_steps} "
                             "(30 s); split long audio with desta.audio.split_windows (the processor does)")
        x = x + encoder.embed_positions.weight[:steps]
        if feature_attention_mask is None:
            step_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            step_mask = feature_attention_mask[:, ::FRAMES_PER_ENCODER_STEP].bool()  # (windows, steps)
        attn_mask = None
        if not bool(step_mask.all()):
            attn_mask = torch.zeros(step_mask.shape[0], 1, steps, steps, dtype=x.dtype, device=x.device)
            attn_mask = attn_mask.masked_fill(~step_mask[:, None, None, :], torch.finfo(x.dtype).min)
        taps = []
        wanted = set(tapped_layers)
        for index, layer in enumerate(encoder.layers[: max(wanted) + 1]):
            x = layer(x, attn_mask, **_LAYER_KWARGS)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x returns (hidden_states,)
            if index in wanted:
                taps.append(x)
    return torch.stack(taps), step_mask  # (layers, windows, steps, d_model), (windows, steps)


class QFormerConnector(nn.Module):
    """Whisper hidden states at several layers -> a fixed number of vectors in the LLM's width.

    One set of learnable queries per tapped layer reads that layer's frames through a shared
    BLIP-2 Q-Former (cross-attention in every block); a softmax over layers, learnt per query,
    mixes the results; LayerNorm and a Linear map them to the LLM width. With
    `query_layernorm=False` the queries go straight into the Q-Former's encoder stack, as in the
    official DeSTA2/2.5 code (a bare BERT encoder: no LayerNorm or dropout on the queries).
    """

    def __init__(self, config: Any):
        """config: a DestaConfig, or any object with its connector fields (encoder_config, text_config,
        tapped_layers, num_queries, query_init_std, qformer_*, query_layernorm)."""
        super().__init__()
        width = config.encoder_config.d_model
        layers = len(config.tapped_layers)
        self.queries = nn.Parameter(torch.randn(layers, config.num_queries, width) * config.query_init_std)
        qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=width,
            num_hidden_layers=config.qformer_layers,
            num_attention_heads=config.qformer_heads or config.encoder_config.encoder_attention_heads,
            intermediate_size=config.qformer_intermediate_size or 4 * width,
            encoder_hidden_size=width,
            cross_attention_frequency=1,
            hidden_dropout_prob=config.qformer_dropout,
            attention_probs_dropout_prob=config.qformer_dropout,
        ))
        if config.qformer_init == "pytorch":
            for module in qformer.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        # Without the query LayerNorm only the encoder stack is kept, so no parameter sits outside the graph.
        self.qformer = qformer if config.query_layernorm else qformer.encoder
        self.layer_logits = nn.Parameter(torch.zeros(layers, config.num_queries))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.text_config.hidden_size)
        self.frame_norm = FrameNorm(layers, width) if getattr(config, "frame_norm", False) else None

    def forward(self, hidden_states: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """(layers, windows, steps, d_model), (windows, steps) -> (windows, queries, llm_hidden)."""
        if self.frame_norm is not None:
            hidden_states = self.frame_norm(hidden_states)
        layers, windows, steps, width = hidden_states.shape
        queries = self.queries[:, None].expand(-1, windows, -1, -1)  # (layers, windows, queries, d_model)
        queries = queries.reshape(layers * windows, -1, width)
        frames = hidden_states.reshape(layers * windows, steps, width)
        frame_mask = step_mask.repeat(layers, 1)  # (layers * windows, steps)
        encoder = self.qformer
        if isinstance(self.qformer, Blip2QFormerModel):
            # BLIP-2's LayerNorm and dropout on the queries, then its encoder; not its forward, which casts the frames
            # to float32 (under autocast each key and value product would cast them back and keep its own copy)
            queries = self.qformer.dropout(self.qformer.layernorm(queries))
            encoder = self.qformer.encoder
        if create_bidirectional_mask is None:  # transformers before 4.56: an extended additive mask
            cross_mask = (~frame_mask[:, None, None, :]).to(queries.dtype) * torch.finfo(queries.dtype).min
        else:
            cross_mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=queries,
                                                   attention_mask=frame_mask, encoder_hidden_states=frames)
        out = encoder(queries, encoder_hidden_states=frames, encoder_attention_mask=cross_mask,
                      query_length=queries.shape[1]).last_hidden_state
        out = out.view(layers, windows, -1, width)  # (layers, windows, queries, d_model)
        weights = self.layer_logits.softmax(dim=0)[:, None, :, None]  # (layers, 1, queries, 1)
        fused = (out * weights.to(out.dtype)).sum(dim=0)  # (windows, queries, d_model)
        return self.proj(self.norm(fused))


class PooledMLPConnector(nn.Module):
    """A plain projector, as Ultravox and LLaVA connect their encoders: each window's frames averaged into
    `num_queries` equal spans of its real length, the tapped layers of a span concatenated, then LayerNorm and
    a two-layer MLP to the LLM width. Every output vector is a local summary of the clip (no learnt queries
    that first have to find the voice), so it varies from clip to clip from the first step.
    """

    def __init__(self, config: Any):
        """config: as QFormerConnector's (encoder_config, text_config, tapped_layers, num_queries)."""
        super().__init__()
        taps, d_model = len(config.tapped_layers), config.encoder_config.d_model
        width, hidden = taps * d_model, config.text_config.hidden_size
        self.num_queries = config.num_queries
        self.frame_norm = FrameNorm(taps, d_model) if getattr(config, "frame_norm", False) else None
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, hidden_states: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """(layers, windows, steps, d_model), (windows, steps) -> (windows, queries, llm_hidden)."""
        if self.frame_norm is not None:
            hidden_states = self.frame_norm(hidden_states)
        layers, windows, steps, width = hidden_states.shape
        lengths = step_mask.sum(1).clamp_min(1)  # (windows,) real steps of each window
        position = torch.arange(steps, device=step_mask.device)
        span = (position[None, :] * self.num_queries // lengths[:, None]).clamp_max(self.num_queries - 1)
        pool = F.one_hot(span, self.num_queries).to(hidden_states.dtype) * step_mask[..., None]  # (w, steps, q)
        pool = pool / pool.sum(1, keepdim=True).clamp_min(1)  # a span's frames averaged; an empty span reads 0
        frames = hidden_states.permute(1, 2, 0, 3).reshape(windows, steps, layers * width)  # (w, steps, layers*d)
        pooled = pool.transpose(1, 2) @ frames  # (windows, queries, layers x d_model)
        return self.mlp(self.norm(pooled))


class FrameNorm(nn.Module):
    """LayerNorm of each tapped layer's frames before the connector reads them (one per layer, as BLIP-2 normalises
    its vision encoder's output before the Q-Former): an intermediate Whisper layer is an unnormalised residual
    stream whose few large dimensions otherwise dominate the connector's attention."""

    def __init__(self, layers: int, width: int):
        """One LayerNorm of `width` per tapped layer."""
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(layers, windows, steps, d_model) -> the same, each layer normalised."""
        return torch.stack([norm(layer) for norm, layer in zip(self.norms, hidden_states, strict=True)])


def merge_audio(embeds: torch.Tensor, input_ids: torch.Tensor, audio_token_id: int,
                audio: torch.Tensor) -> torch.Tensor:
    """Token embeddings (batch, seq, hidden) with the audio placeholder positions filled by connector vectors
    (windows, queries, hidden), in order: batch row by row, each clip's windows in time order."""
    audio_mask = input_ids == audio_token_id  # (batch, seq)
    slots = int(audio_mask.sum())
    windows, queries, _ = audio.shape
    if slots != windows * queries:
        raise ValueError(f"the text holds {slots} audio placeholder positions but the audio gives "
                         f"{windows * queries} vectors ({windows} windows x {queries} queries); build the inputs "
                         "with DestaProcessor so each clip's placeholder is expanded to its window count")
    return embeds.masked_scatter(audio_mask[..., None], audio.to(embeds.dtype))


def lm_forward(llm: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
               logits_at: LogitPositions = "all", **kwargs: Any) -> DestaOutput:
    """The LLM's forward pass on input embeddings (batch, seq, hidden), with `labels` its mean cross-entropy.

    logits_at "labelled": only the positions that predict a labelled token are projected (`labelled_logits`);
    the output holds `label_logits` and no `logits`. position_ids restarting at 0 within a row mark packed
    samples: attention becomes block-diagonal (desta.model.packing). kwargs go to the LLM (num_items_in_batch:
    the loss is the sum over labelled tokens divided by it, as transformers' own loss takes it).
    """
    if logits_at not in get_args(LogitPositions):
        raise ValueError(f"logits_at must be one of {get_args(LogitPositions)}, got {logits_at!r}")
    rows = inputs_embeds.shape[0]
    flat = False
    if position_ids is not None:
        implementation = getattr(llm.config, "_attn_implementation", None) or "sdpa"
        flat = implementation in VARLEN_ATTENTION
        if flat:  # one row with the samples' lengths: the varlen kernel keeps each sample apart
            varlen = one_row(inputs_embeds, position_ids, labels)
            inputs_embeds, position_ids, labels = (varlen.pop(k) for k in ("inputs_embeds", "position_ids", "labels"))
            kwargs.update(varlen)
            attention_mask = None
        else:
            attention_mask = packed_attention_mask(position_ids, "additive" if implementation == "eager" else "bool",
                                                   inputs_embeds.dtype)
    inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids}
    if logits_at == "all" or labels is None:
        output = DestaOutput(**llm(**inputs, labels=labels, **kwargs))
        if flat:
            output.logits = output.logits.view(rows, -1, output.logits.shape[-1])  # (rows, seq, vocab) again
        return output
    num_items = kwargs.pop("num_items_in_batch", None)
    logits, targets = labelled_logits(llm, labels, **inputs, **kwargs)
    if num_items is None:
        loss = F.cross_entropy(logits.float(), targets)
    else:  # the Trainer's count over all processes and accumulated micro-batches
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / torch.as_tensor(num_items).to(logits.device)
    return DestaOutput(loss=loss, label_logits=logits)
