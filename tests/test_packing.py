import pytest
import torch

from desta.core.sequences import IGNORE_INDEX
from desta.model.packing import balance_rows, pack_rows, packed_attention_mask, padding_share


def test_rows_hold_the_budget_place_every_sample_once_and_are_balanced():
    lengths = [130, 395, 220, 310, 180, 260, 150, 400, 205, 275, 330, 145]
    rows = balance_rows(lengths, budget=1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    held = [sum(lengths[i] for i in row) for row in rows]
    assert held == [995, 1000, 1005]  # 3000 tokens in 3 x 1005 positions, where padded rows take 12 x 400
    assert len(balance_rows(lengths, budget=600)) == 6 and balance_rows([7], budget=7) == [[0]]
    with pytest.raises(ValueError, match="sample 1 holds 395 tokens, more than the packing budget of 300"):
        balance_rows(lengths[:2], budget=300)


def test_packed_rows_restart_positions_and_drop_each_samples_first_label():
    samples = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [8, 9]), ([4, 4, 4, 4], [IGNORE_INDEX, 4, 4, 4])]
    batch = pack_rows(samples, [[2, 1], [0]], pad_id=0)
    assert batch["input_ids"].tolist() == [[4, 4, 4, 4, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 4, 4, 4, -100, 9], [-100, 6, 7, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert padding_share(batch["attention_mask"]) == 0.25


def test_block_diagonal_mask_lets_a_token_see_only_earlier_tokens_of_its_sample():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = packed_attention_mask(positions)
    assert allowed.shape == (1, 1, 6, 6)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0],
                                            [1, 1, 1, 0, 0, 0],
                                            [0, 0, 0, 1, 0, 0],
                                            [0, 0, 0, 1, 1, 0],
                                            [0, 0, 0, 0, 0, 1]]
    additive = packed_attention_mask(positions, "additive", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed) and additive.min() == torch.finfo(torch.bfloat16).min


def varlen_attention(seen):
    """flash_attention_2 as transformers runs it (modeling_flash_attention_utils._flash_attention_forward), on a CPU
    where the kernel cannot: the samples come from cu_seq_lens when given, else from restarting position ids at
    batch size 1 (transformers' rule), else each row is one causal sequence. `seen` records what it was handed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, _, width, _ = query.shape  # (batch, heads, seq, head width)
        lengths, positions = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
        seen.append({"batch": batch, "cu_seq_lens": None if lengths is None else lengths.tolist()})
        if lengths is not None:
            segment = torch.repeat_interleave(torch.arange(len(lengths) - 1), lengths.diff().long())[None]
        elif _is_packed_sequence(positions, batch):
            segment = (positions == 0).cumsum(dim=-1)
        else:
            segment = torch.zeros(batch, width, dtype=torch.long)
        allowed = (segment[:, :, None] == segment[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
        return sdpa_attention_forward(module, query, key, value, allowed[:, None], dropout=dropout, scaling=scaling)

    return attention


def test_flash_attention_gets_packed_rows_as_one_row_with_each_samples_length(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from desta.model.parts import lm_forward
    from desta.model.tiny import tiny_llm

    torch.manual_seed(0)
    llm = tiny_llm().eval()
    seen = []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", varlen_attention(seen))
    monkeypatch.setattr(llm.config, "_attn_implementation", "flash_attention_2")
    samples = []
    for length in (7, 5, 9, 4):
        ids = torch.randint(5, 400, (length,)).tolist()
        samples.append((ids, [IGNORE_INDEX] * (length - 3) + ids[-3:]))  # the last 3 tokens are the answer
    packed = pack_rows(samples, [[0, 1], [2, 3]], pad_id=0)  # rows of 12 and 13 tokens: the first padded by one
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(packed["input_ids"])
        out = lm_forward(llm, embeds, packed["attention_mask"], packed["labels"], packed["position_ids"], "all")
        labelled = lm_forward(llm, embeds, packed["attention_mask"], packed["labels"], packed["position_ids"],
                              "labelled")
    assert seen[0] == {"batch": 1, "cu_seq_lens": [0, 7, 12, 13, 22, 26]}  # the padding: a sample of its own
    assert out.logits.shape == (2, 13, llm.config.vocab_size)
    torch.testing.assert_close(labelled.loss, out.loss)
    spans = [(0, 0, 7), (0, 7, 12), (1, 0, 9), (1, 9, 13)]
    for (ids, labels), (row, start, end) in zip(samples, spans, strict=True):
        with torch.no_grad():
            alone = lm_forward(llm, llm.get_input_embeddings()(torch.tensor([ids])), None, torch.tensor([labels]))
        torch.testing.assert_close(out.logits[row, start:end], alone.logits[0], atol=1e-5, rtol=1e-5)
