import pytest
import torch
from transformers import TrainerCallback

from desta.core.args import ConfigError, load_config
from desta.core.sequences import IGNORE_INDEX, end_of_turn_ids
from desta.train import losses as losses_module
from desta.train.config import ModelSection, TrainConfig
from desta.train.losses import response_kl
from desta.train.on_policy import RowSeededSampling, on_policy_batches, prompts, sample_responses
from desta.train.run import train
from tests.conftest import described_dataset, label_targets

BASE = ["optim.warmup_steps=1", "optim.batch_size=4", "optim.lr=3e-3", "log.logging_steps=1", "log.report_to=none"]


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("on-policy-data")
    return label_targets(described_dataset(folder, num_clips=8, seed=6), folder / "targets")


def _labelled(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    return [row[mask].tolist() for row, mask in zip(ids, labels != IGNORE_INDEX, strict=True)]


def test_both_sides_hold_the_students_sample_after_their_own_prompts(targets_dir, tmp_path):
    from desta.train.data import DestaCollator, DestaDataset, load_targets, speech_examples
    from desta.train.run import build_model

    model, processor = build_model(ModelSection(), tmp_path)
    dataset = DestaDataset(speech_examples(load_targets(str(targets_dir), "train"), processor, teacher=True)[:4])
    batch = DestaCollator(processor, 1024)([dataset[i] for i in range(4)])
    tokenizer = processor.tokenizer
    end_ids = end_of_turn_ids(tokenizer, model.llm.generation_config)
    model.train()
    torch.manual_seed(0)
    prompt_rows = prompts(batch["input_ids"], batch["labels"], batch["attention_mask"])
    responses = sample_responses(model, batch, prompt_rows, [0, 1, 2, 3], end_ids, tokenizer.pad_token_id,
                                 max_new_tokens=6)
    assert model.training  # sampled in eval mode, handed back in training mode
    assert len(responses) == 4 and all(1 <= len(r) <= 6 for r in responses)
    assert all(token not in end_ids for r in responses for token in r[:-1])  # cut after the first end of turn
    assert all(audio_id in row for row in prompt_rows for audio_id in [processor.audio_token_id])

    text = {k: batch[f"teacher_{k}"] for k in ("input_ids", "labels", "attention_mask")}
    student, teacher = on_policy_batches(batch, text, prompt_rows, responses, tokenizer.pad_token_id)
    assert _labelled(student["input_ids"], student["labels"]) == responses
    assert _labelled(teacher["input_ids"], teacher["labels"]) == responses
    for i, prompt in enumerate(prompt_rows):
        assert student["input_ids"][i, : len(prompt)].tolist() == prompt
    audio_id = processor.audio_token_id
    assert int((student["input_ids"] == audio_id).sum()) == int((batch["input_ids"] == audio_id).sum())
    assert torch.equal(student["audio_hidden_states" if "audio_hidden_states" in batch else "input_features"],
                       batch["audio_hidden_states" if "audio_hidden_states" in batch else "input_features"])
    text_prompts = prompts(batch["teacher_input_ids"], batch["teacher_labels"], batch["teacher_attention_mask"])
    assert not any(audio_id in row for row in text_prompts)  # the teacher reads the description, not the audio
    for i, prompt in enumerate(text_prompts):
        assert teacher["input_ids"][i, : len(prompt)].tolist() == prompt
    model.train()
    out = model(**student, logits_at="labelled")
    assert out.label_logits.shape[0] == sum(len(r) for r in responses)


def test_a_rows_sample_depends_on_its_seed_not_on_its_batch(targets_dir, tmp_path):
    from desta.train.data import DestaCollator, DestaDataset, load_targets, speech_examples
    from desta.train.run import build_model

    model, processor = build_model(ModelSection(), tmp_path)
    dataset = DestaDataset(speech_examples(load_targets(str(targets_dir), "train"), processor, teacher=True)[:4])
    collate, pad = DestaCollator(processor, 1024), processor.tokenizer.pad_token_id
    end_ids = end_of_turn_ids(processor.tokenizer, model.llm.generation_config)

    def sample(rows, seeds):
        batch = collate([dataset[i] for i in rows])
        found = prompts(batch["input_ids"], batch["labels"], batch["attention_mask"])
        return sample_responses(model, batch, found, seeds, end_ids, pad, max_new_tokens=8)

    together = sample([0, 1, 2, 3], [10, 11, 12, 13])
    assert sample([2], [12]) == together[2:3] and sample([3, 1], [13, 11]) == [together[3], together[1]]
    assert sample([2], [99]) != together[2:3]  # another seed, another draw
    # each pick is a draw from softmax(scores / temperature): the Gumbel-max trick
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    picks = torch.tensor([int(RowSeededSampling([seed], temperature=2.0)(None, scores).argmax())
                          for seed in range(4000)])
    frequencies = torch.bincount(picks, minlength=4) / len(picks)
    torch.testing.assert_close(frequencies, (scores[0] / 2.0).softmax(-1), atol=0.025, rtol=0)


def test_reverse_kl_is_the_students_expectation_and_trains_only_the_student():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    assert response_kl(student, student.detach(), reverse=True).abs().max().item() == pytest.approx(0, abs=1e-6)
    p, q = student.softmax(-1), teacher.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    loss = response_kl(student, teacher, reverse=True).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.item() != pytest.approx(response_kl(student, teacher).mean().item())  # not the forward KL
    loss.backward()
    assert student.grad.abs().sum() > 0
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(student.grad, expected_grad)  # the gradient of the student's expectation
    with pytest.raises(ValueError, match="the student's sequences hold 5 response positions but the teacher's 4"):
        response_kl(student, teacher[:4], reverse=True)


def test_a_row_without_a_response_is_refused_with_the_cause():
    with pytest.raises(ValueError, match="holds no labelled token.*data.max_length"):
        prompts(torch.tensor([[5, 6]]), torch.tensor([[IGNORE_INDEX, IGNORE_INDEX]]), torch.tensor([[1, 1]]))


def test_on_policy_training_samples_every_step_and_trains_the_connector(targets_dir, tmp_path, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        responses = sample_responses(*args, **kwargs)
        calls.append([len(r) for r in responses])
        return responses

    monkeypatch.setattr(losses_module, "sample_responses", counted)

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.model = model

    snapshot = Snapshot()
    config = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'run'}", f"data.train={targets_dir}", *BASE,
                                             "optim.max_steps=3", "optim.loss=on_policy",
                                             "optim.on_policy_max_new_tokens=5", "data.eval_fraction=0.25",
                                             "log.eval_steps=3"])
    summary = train(config, callbacks=[snapshot])
    assert summary["steps"] == 3 and len(calls) == 3  # one sampling per step, none for the validation loss
    assert all(1 <= n <= 5 for lengths in calls for n in lengths)
    assert summary["first_train_loss"] >= 0 and summary["eval_losses"] and summary["eval_losses"][-1][1] >= 0
    for name, param in snapshot.model.named_parameters():
        assert torch.equal(param, snapshot.before[name]) != name.startswith("connector."), name


def test_on_policy_settings_are_checked():
    with pytest.raises(ConfigError, match="data.packing: optim.loss on_policy samples"):
        load_config(TrainConfig, None, ["data.train=x", "optim.loss=on_policy", "data.packing=true"])
    with pytest.raises(ConfigError, match="on_policy_max_new_tokens: must be at least 1, got 0"):
        load_config(TrainConfig, None, ["data.train=x", "optim.on_policy_max_new_tokens=0"])
