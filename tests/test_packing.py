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
