"""The hearing check: label accuracy from the audio, chance it cannot beat by guessing, and a connector that
must learn a binary attribute the encoder features carry (the sanity ladder's CI-sized rung)."""

import json

import numpy as np
import pytest
import torch

from desta.evaluation.hearing import Clips, HearingCheck, answer_loglik, connector_spread, label_accuracy
from desta.model.tiny import tiny_model
from desta.prompts import field_answer

QUESTION = "Is the speaker male or female?"
VALUES = ["Female", "Male"]


def synthetic_clips(model, count: int, seed: int, name: str = "clips") -> Clips:
    """Encoder features whose first dimensions carry the gender: +1 for female, -1 for male, plus noise."""
    rng = np.random.default_rng(seed)
    layers, width = len(model.config.tapped_layers), model.config.encoder_config.d_model
    gold, windows = [], []
    for k in range(count):
        female = k % 2 == 0
        steps = int(rng.integers(20, 40))
        frames = rng.normal(0.0, 1.0, size=(layers, steps, width)).astype(np.float32)
        frames[:, :, :8] += 1.5 if female else -1.5
        gold.append("Female" if female else "Male")
        windows.append([torch.from_numpy(frames)])
    return Clips(name=name, ids=[f"{name}-{k}" for k in range(count)], gold=gold, transcripts=[None] * count,
                 durations=[1.0] * count, windows=windows)


def fit_connector(model, processor, clips: Clips, steps: int, lr: float = 3e-3, batch: int = 8, seed: int = 0):
    """The training loss of desta train (cross-entropy on the response, connector only) on label answers."""
    from desta.train.features import pad_cached

    torch.manual_seed(seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.choice(len(clips), size=batch, replace=False)
        inputs = processor([processor.conversation(QUESTION, field_answer("gender", clips.gold[k])) for k in rows],
                           transcripts=[[None] for _ in rows], window_counts=[[1] for _ in rows])
        hidden, mask = pad_cached([clips.windows[k][0] for k in rows])
        loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                     audio_hidden_states=hidden, audio_step_mask=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_answer_loglik_scores_each_answer_given_each_clip():
    model, processor = tiny_model()
    clips = synthetic_clips(model, 3, seed=0)
    answers = [field_answer("gender", v) for v in VALUES]
    scores = answer_loglik(model, processor, clips, QUESTION, answers, batch_size=4)
    assert scores.shape == (3, 2) and np.all(scores < 0)
    one = answer_loglik(model, processor, Clips("one", clips.ids[:1], clips.gold[:1], [None], [1.0],
                                                clips.windows[:1]), QUESTION, answers)
    np.testing.assert_allclose(one[0], scores[0], atol=1e-4)  # a clip's scores do not depend on its batch


def test_cached_scores_equal_the_training_loss_of_each_answer():
    """The prompt runs once and each answer continues from its cache: the same log-likelihood as the
    teacher-forced training forward of the whole conversation."""
    from desta.train.features import pad_cached

    model, processor = tiny_model()
    clips = synthetic_clips(model, 3, seed=5)
    answers = [field_answer("gender", v) for v in VALUES]
    scores = answer_loglik(model, processor, clips, QUESTION, answers)
    for a, answer in enumerate(answers):
        inputs = processor([processor.conversation(QUESTION, answer)] * 3, transcripts=[[None]] * 3,
                           window_counts=[[1]] * 3)
        hidden, mask = pad_cached([w[0] for w in clips.windows])
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    audio_hidden_states=hidden, audio_step_mask=mask, logits_at="labelled")
        keep = inputs["labels"][:, 1:] != -100
        token = out.label_logits.log_softmax(-1).gather(1, inputs["labels"][:, 1:][keep][:, None])[:, 0]
        per_row = torch.zeros(3).index_add_(0, keep.nonzero()[:, 0], token)
        np.testing.assert_allclose(scores[:, a], per_row.detach().numpy(), atol=1e-4)


def test_label_accuracy_reports_chance_and_refuses_unknown_values():
    model, processor = tiny_model()
    clips = synthetic_clips(model, 6, seed=1)
    result = label_accuracy(model, processor, clips, "gender", VALUES, QUESTION)
    assert result["n"] == 6 and result["chance"] == 0.5 and result["constant"] == 0.5
    assert result["ci"][0] <= result["accuracy"] <= result["ci"][1] and len(result["right"]) == 6
    with pytest.raises(ValueError, match=r"values \['Female'\] are not among the values checked \['Male'\]"):
        label_accuracy(model, processor, clips, "gender", ["Male"], QUESTION)


def test_a_connector_learns_a_binary_attribute_the_features_carry():
    """The CI-sized rung of the sanity ladder: from chance to >= 0.95 on its training clips in 60 steps."""
    model, processor = tiny_model()
    clips = synthetic_clips(model, 32, seed=2)
    before = label_accuracy(model, processor, clips, "gender", VALUES, QUESTION)["accuracy"]
    spread_before = connector_spread(model, clips)
    fit_connector(model, processor, clips, steps=60)
    after = label_accuracy(model, processor, clips, "gender", VALUES, QUESTION)
    held_out = label_accuracy(model, processor, synthetic_clips(model, 16, seed=3, name="held"), "gender", VALUES,
                              QUESTION)
    assert before <= 0.75, before  # the untrained model does not already know
    assert after["accuracy"] >= 0.95 and held_out["accuracy"] >= 0.9, (after["accuracy"], held_out["accuracy"])
    assert connector_spread(model, clips) > spread_before


def test_a_connector_that_drops_its_input_cannot_pass():
    """The same rung fails when the connector's output does not depend on the features (the guard can fail)."""
    model, processor = tiny_model()
    clips = synthetic_clips(model, 32, seed=2)
    for k in range(len(clips)):
        clips.windows[k] = [torch.zeros_like(clips.windows[k][0])]  # the attribute no longer reaches the connector
    fit_connector(model, processor, clips, steps=60)
    assert label_accuracy(model, processor, clips, "gender", VALUES, QUESTION)["accuracy"] <= 0.6


def test_hearing_check_logs_each_check_and_stops_at_the_gate(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model, processor = tiny_model()
    clips = synthetic_clips(model, 4, seed=4, name="train")
    check = HearingCheck(processor, [clips], "gender", VALUES, every=2, out=tmp_path, question=QUESTION,
                         stop_at={"train": 0.0})
    args, state, control = TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), TrainerControl()
    check.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    assert not check.on_step_end(args, state, control, model=model).should_training_stop  # not a check step
    state.global_step = 2
    assert check.on_step_end(args, state, control, model=model).should_training_stop
    lines = [json.loads(line) for line in (tmp_path / "hearing.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2] and check.passed_at == 0
    assert set(lines[1]["train"]) == {"n", "accuracy", "ci", "chance", "constant"} and "train_seconds" in lines[1]
    with pytest.raises(ValueError, match="stop_at names sets"):
        HearingCheck(processor, [clips], "gender", VALUES, every=2, out=tmp_path, stop_at={"held-out": 0.9})
