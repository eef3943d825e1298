"""Prompts: the turns both LLMs read, the training pools and their distance from the eval instructions."""

import pytest

from desta.model.tiny import tiny_tokenizer
from desta.prompts import (
    EVAL_INSTRUCTIONS,
    TRAINING_POOLS,
    speech_messages,
    speech_turn,
    text_turn,
    training_pool,
    with_system,
)


def test_rendered_prompt_for_a_known_row():
    description = ("[00:00-00:02] Excuse me? (Gender: Female, Emotion: Neutral, Accent: British, Pitch: High, "
                   "Volume: Low, Speaking speed: Slow, Duration: 2s)")
    messages = text_turn(description, "What can you hear from the audio?", "Focus on the audio clips and "
                                                                               "instructions.")
    rendered = tiny_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nFocus on the audio clips and instructions.<|im_end|>\n"
        "<|im_start|>user\n[00:00-00:02] Excuse me? (Gender: Female, Emotion: Neutral, Accent: British, "
        "Pitch: High, Volume: Low, Speaking speed: Slow, Duration: 2s)\n\nWhat can you hear from the audio?"
        "<|im_end|>\n<|im_start|>assistant\n")


def test_training_pools_refuse_eval_instructions(monkeypatch):
    from desta import prompts

    assert all(training_pool(name)["open"][0] == "What can you hear from the audio?" for name in TRAINING_POOLS)
    with pytest.raises(ValueError, match="evaluation instructions \\(or near copies\\) and cannot be trained on"):
        training_pool(["Describe the speaker's voice.", "Tell me more."])
    monkeypatch.setitem(prompts.TRAINING_POOLS, "leaky", ["Tell me more.", EVAL_INSTRUCTIONS["gender"][0].upper()])
    with pytest.raises(AssertionError, match="evaluation instructions found in a training pool"):
        prompts.check_disjoint()


def test_no_training_prompt_is_an_eval_instruction_or_a_near_copy():
    from desta.prompts import _near, all_training_prompts

    evals = [t for templates in EVAL_INSTRUCTIONS.values() for t in templates]
    assert [(p, t) for p in all_training_prompts() for t in evals if _near(p, t)] == []
    with pytest.raises(ValueError, match="near copies"):
        training_pool(["Transcribe the speech, verbatim!"])


def test_every_front_end_lays_out_speech_turns_as_training_does():
    """Training, eval and chat (processor.conversation), the app and serve all build speech turns with
    speech_messages: the system prompt first, then one placeholder per clip before the text."""
    trained = speech_turn("<|AUDIO|>", "Who speaks?", "Focus.", clips=2)
    assert trained == [{"role": "system", "content": "Focus."},
                       {"role": "user", "content": "<|AUDIO|>\n<|AUDIO|>\nWho speaks?"}]
    assert speech_messages([{"role": "user", "text": "Who speaks?", "clips": 2}], "<|AUDIO|>", "Focus.") == trained
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    assert with_system(own, "Focus.") == own  # a request's own system turn wins
    assert with_system(own[1:], None) == own[1:]
