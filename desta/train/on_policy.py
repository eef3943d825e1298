"""On-policy distillation for `optim.loss: on_policy`: the speech model samples its own answer from the audio, the
text LLM reading the description scores the same tokens, and the loss is the reverse KL on the student's tokens
(desta.train.losses.response_kl with reverse; GKD, arXiv 2306.13649; CORD, arXiv 2601.16547, reports it beating
distillation on fixed targets).

A training batch of the collator (right-padded, labels on the targets' responses, the teacher's turns beside) is
cut back to its prompts; the student samples a response to each; both sides are rebuilt around the sampled tokens.
The targets' own responses are then not trained on: they only set what each prompt asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import LogitsProcessor, LogitsProcessorList

from desta.core.sequences import IGNORE_INDEX, pad_batch

if TYPE_CHECKING:
    from desta.model.modeling import DestaModel

# What the student's forward and generate take besides the token rows: the audio, in the batch's row order.
AUDIO_KEYS = ("input_features", "feature_attention_mask", "audio_hidden_states", "audio_step_mask")


def prompts(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's tokens before its first labelled one (the conversation up to the assistant's header).

    input_ids, labels, attention_mask: (batch, seq), right-padded.

    >>> ids, mask = torch.tensor([[5, 6, 7, 8, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    >>> prompts(ids, torch.tensor([[-100, -100, 7, 8, -100]]), mask)
    [[5, 6]]
    """
    rows = []
    for ids, row_labels, mask in zip(input_ids.tolist(), labels.tolist(), attention_mask.tolist(), strict=True):
        length = sum(mask)
        first = next((i for i, label in enumerate(row_labels[:length]) if label != IGNORE_INDEX), None)
        if first is None:
            raise ValueError("a training row holds no labelled token, so on-policy distillation cannot tell where its "
                             "prompt ends; was its response cut off by data.max_length with data.overlength=truncate?")
        rows.append(ids[:first])
    return rows


def cut_at_end(tokens: list[int], end_ids: set[int] | frozenset[int], pad_id: int | None = None) -> list[int]:
    """Generated ids up to and including the first end-of-turn id (the student learns where to stop), without the
    padding generate puts after it. With no end id: all of them, up to the first padding.

    >>> cut_at_end([4, 9, 2, 0, 0], end_ids={2}, pad_id=0), cut_at_end([4, 9, 0], end_ids={2}, pad_id=0)
    ([4, 9, 2], [4, 9])
    """
    kept = []
    for token in tokens:
        if token in end_ids:
            return [*kept, token]
        if token == pad_id:
            break
        kept.append(token)
    return kept


def with_responses(prompt_rows: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + response rows, right-padded, labels on the response tokens alone: (batch, seq) each.

    >>> batch = with_responses([[5, 6], [7]], [[8, 2], [2]], pad_id=0)
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[5, 6, 8, 2], [7, 2, 0, 0]], [[-100, -100, 8, 2], [-100, 2, -100, -100]])
    """
    rows = [prompt + response for prompt, response in zip(prompt_rows, responses, strict=True)]
    labels = [[IGNORE_INDEX] * len(prompt) + response for prompt, response in zip(prompt_rows, responses, strict=True)]
    return pad_batch(rows, pad_id, "right", labels=labels)


class RowSeededSampling(LogitsProcessor):
    """Sampling as a greedy pick: each row's scores / temperature plus Gumbel noise from that row's own generator
    (the Gumbel-max trick: the argmax is a draw from softmax(scores / temperature)). A row's sample then depends
    on its seed alone, not on which rows share its batch, so a step split into micro-batches or processes
    differently draws the same answers. Pass it with do_sample=False."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores (batch, vocab) -> scores / temperature + Gumbel noise, one generator per row."""
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                               for g in self.generators])  # (batch, vocab) in [0, 1)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
        return scores.float() / self.temperature + gumbel


@torch.no_grad()
def sample_responses(model: DestaModel, batch: dict[str, Any], prompt_rows: list[list[int]], seeds: list[int],
                     end_ids: set[int] | frozenset[int], pad_id: int, max_new_tokens: int,
                     temperature: float = 1.0) -> list[list[int]]:
    """The student's sampled answers (token ids) to `prompt_rows` (the batch's prompts, `prompts`), one seed a row
    (`RowSeededSampling`).

    Sampling runs in eval mode (no dropout), as the answers a user would get; the model's mode is restored after.
    With several processes, each decodes until every one has finished (synced_gpus): under FSDP each decoding step
    gathers the layers' weights from all processes, so one that stopped early would leave the others waiting.
    """
    left = pad_batch(prompt_rows, pad_id, "left")
    device = batch["input_ids"].device
    audio = {key: batch[key] for key in AUDIO_KEYS if key in batch}
    was_training = model.training
    model.eval()
    try:
        generated = model.generate(left["input_ids"].to(device), left["attention_mask"].to(device), **audio,
                                   do_sample=False, temperature=None, top_k=None, top_p=None,
                                   logits_processor=LogitsProcessorList([RowSeededSampling(seeds, temperature,
                                                                                           device)]),
                                   max_new_tokens=max_new_tokens, eos_token_id=sorted(end_ids), pad_token_id=pad_id,
                                   synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
    finally:
        model.train(was_training)
    return [cut_at_end(row, end_ids, pad_id) or [pad_id] for row in generated.tolist()]


def on_policy_batches(batch: dict[str, Any], teacher: dict[str, torch.Tensor], prompt_rows: list[list[int]],
                      responses: list[list[int]], pad_id: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The student's and the teacher's batches holding the sampled responses, labels on them alone. The student
    keeps the batch's audio (its rows are in the same order); the teacher (input_ids, labels, attention_mask of
    the text LLM's turns) keeps its description prompts."""
    device = batch["input_ids"].device
    student = {k: v.to(device) for k, v in with_responses(prompt_rows, responses, pad_id).items()}
    student.update({key: batch[key] for key in AUDIO_KEYS if key in batch})
    teacher_prompts = prompts(teacher["input_ids"], teacher["labels"], teacher["attention_mask"])
    text_turns = {k: v.to(device) for k, v in with_responses(teacher_prompts, responses, pad_id).items()}
    return student, text_turns

