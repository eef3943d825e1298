"""Packing: several training samples in one row, each isolated from the others.

Used by the train stage's collator (`data.packing`) and by DestaModel.forward. A packed row holds
samples back to back up to a token budget; its position ids restart at 0 with every sample (so each
sample gets the rotary positions it has alone) and attention is block-diagonal: a token sees the
earlier tokens of its own sample only. Each sample's first label is -100 (the previous sample's
last token must not learn to predict it), which it already is in an unpacked row, where position 0
predicts nothing. So every sample's loss is the one it has unpacked; only padding goes.

With flash-attention (transformers' `flash_attention_2`) the packed rows are laid end to end as one
row (`one_row`) and the varlen kernel gets the samples' cumulative lengths: transformers reads packed
samples from position ids only at batch size 1, so a batch of several packed rows would let each
row's samples attend to each other. With SDPA or eager attention the block-diagonal mask is built
here (`packed_attention_mask`) and passed as a 4-D mask, which transformers uses as given.
"""

from __future__ import annotations

from typing import Literal

import torch

from desta.core.sequences import IGNORE_INDEX

# Attention implementations that read packed samples from the position ids (varlen kernels): no mask needed.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def balance_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices split into the fewest rows of at most `budget` tokens that this finds, balanced so the
    longest row (the padded width of the batch) is short: longest sample first, each into the row holding the
    fewest tokens; one more row while a row would overflow. A sample longer than the budget is an error
    (drop or truncate it first).

    >>> balance_rows([300, 700, 200, 500], budget=1000)
    [[1, 2], [3, 0]]
    """
    too_long = [(i, n) for i, n in enumerate(lengths) if n > budget]
    if too_long:
        index, length = too_long[0]
        raise ValueError(f"sample {index} holds {length} tokens, more than the packing budget of {budget}; raise "
                         "data.pack_length (it must be at least data.max_length)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    count = max(1, -(-sum(lengths) // budget))  # rows: at least the tokens over the budget
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        held = [0] * count
        for index in order:
            row = min(range(count), key=lambda r: (held[r], r))
            rows[row].append(index)
            held[row] += lengths[index]
        if max(held) <= budget:
            return [row for row in rows if row]
        count += 1  # ends by len(lengths) rows at most: one sample each, every one within the budget


def pack_rows(samples: list[tuple[list[int], list[int]]], rows: list[list[int]],
              pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, labels) per sample and the samples of each row -> input_ids, labels, position_ids and
    attention_mask (rows, longest row). Position ids restart at 0 for each sample (and for the padding at a
    row's end, which forms a block of its own); each sample's first label becomes -100.

    >>> batch = pack_rows([([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9])], [[0, 1]], pad_id=0)
    >>> batch["position_ids"].tolist(), batch["labels"].tolist()
    ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    """
    width = max(sum(len(samples[i][0]) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            sample_ids, sample_labels = samples[index]
            end = start + len(sample_ids)
            ids[r, start:end] = torch.tensor(sample_ids)
            labels[r, start:end] = torch.tensor(sample_labels)
            labels[r, start] = IGNORE_INDEX
            positions[r, start:end] = torch.arange(len(sample_ids))
            mask[r, start:end] = 1
            start = end
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}


def packed_attention_mask(position_ids: torch.Tensor, kind: Literal["bool", "additive"] = "bool",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids (batch, seq) that restart at 0 for each packed sample -> a block-diagonal causal mask
    (batch, 1, seq, seq): a token attends to the earlier tokens of its own sample. "bool": True where
    attention is allowed (SDPA); "additive": 0 there and the dtype's minimum elsewhere (eager attention).

    >>> packed_attention_mask(torch.tensor([[0, 1, 0]]))[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    segment = (position_ids == 0).cumsum(dim=-1)  # (batch, seq): which sample each token belongs to
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (batch, seq, seq)
    allowed = allowed[:, None]  # (batch, 1, seq, seq)
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def one_row(inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
            labels: torch.Tensor | None = None) -> dict[str, torch.Tensor | int | None]:
    """Packed rows laid end to end as one row, for flash-attention's varlen kernels, with the cumulative sequence
    lengths of its samples (each row's padding is a sample of its own) as transformers passes them to the kernel:
    computed once here, where transformers would otherwise derive them from the position ids in every layer.

    inputs_embeds (rows, seq, hidden), position_ids and labels (rows, seq) -> inputs_embeds (1, rows x seq, hidden),
    position_ids and labels (1, rows x seq), cu_seq_lens_q/k (samples + 1,), max_length_q/k.

    >>> flat = one_row(torch.zeros(2, 5, 8), torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]))
    >>> flat["inputs_embeds"].shape, flat["position_ids"].tolist(), flat["cu_seq_lens_q"].tolist(), flat["max_length_q"]
    (torch.Size([1, 10, 8]), [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]], [0, 3, 5, 9, 10], 4)
    """
    positions = position_ids.reshape(1, -1)  # (1, rows x seq)
    starts = (positions[0] == 0).nonzero().view(-1)  # every row starts a sample: its positions restart at 0
    cumulative = torch.cat([starts, starts.new_tensor([positions.shape[1]])]).to(torch.int32)
    longest = int(cumulative.diff().max())
    return {"inputs_embeds": inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1]), "position_ids": positions,
            "labels": None if labels is None else labels.reshape(1, -1), "cu_seq_lens_q": cumulative,
            "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}


def padding_share(attention_mask: torch.Tensor) -> float:
    """The share of a batch's positions that are padding (attention_mask (batch, seq) is 0 there).

    >>> padding_share(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    0.375
    """
    return 1.0 - float(attention_mask.sum()) / attention_mask.numel()
