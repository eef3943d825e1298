"""DestaProcessor: chat turns and audio -> ids, labels, masks and features; saved and loaded with its model."""

import numpy as np
import pytest
import torch

from desta.audio import SAMPLE_RATE
from desta.model.tiny import tiny_model
from tests.conftest import conversation


def test_45_second_clip_gives_two_windows_in_order(clip):
    model, processor = tiny_model()
    long_clip = np.tile(clip, int(np.ceil(45 * SAMPLE_RATE / len(clip))))[: 45 * SAMPLE_RATE]
    batch = processor([conversation()], audios=[[long_clip]], transcripts=[[None]])
    assert batch["input_features"].shape[0] == 2
    assert int((batch["input_ids"] == processor.audio_token_id).sum()) == 2 * 64
    assert torch.isfinite(model(**batch).loss)


def test_transcript_is_cut_in_training_only(clip):
    _, processor = tiny_model(transcript_max_tokens=3)
    transcript = "the quick brown fox jumps over the lazy dog"
    whole = processor.tokenizer(" " + transcript, add_special_tokens=False).input_ids
    assert len(whole) > 3

    def slot(batch):
        ids = batch["input_ids"][0].tolist()
        start = max(i for i, t in enumerate(ids) if t == processor.audio_token_id) + 1
        return ids[start:start + len(whole)]

    training = processor([conversation()], audios=[[clip]], transcripts=[[transcript]])
    inference = processor([conversation(None)], audios=[[clip]], transcripts=[[transcript]], add_generation_prompt=True)
    assert slot(training)[:3] == whole[:3] and slot(training)[3:] != whole[3:]
    assert slot(inference) == whole


def test_answer_with_trailing_whitespace_keeps_its_end_of_turn_label():
    from transformers import WhisperFeatureExtractor

    from desta.model.processing import DestaProcessor
    from desta.model.tiny import tiny_tokenizer

    processor = DestaProcessor(WhisperFeatureExtractor(), tiny_tokenizer(), num_queries=2)
    text_row = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4 \n"}]
    labels = processor([text_row])["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]) == "4<|im_end|>"


def test_labels_cover_response_and_end_of_turn_and_loss_is_their_mean(clip):
    model, processor = tiny_model()
    model.eval()
    batch = processor([conversation("A woman asks for the station.")], audios=[[clip]], transcripts=[["hi"]])
    labels = batch["labels"][0]
    kept = labels[labels != -100]
    assert processor.tokenizer.decode(kept) == "A woman asks for the station.<|im_end|>"
    out = model(**batch)
    logits = out.logits[0, :-1]
    targets = labels[1:]
    mask = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(out.loss, expected)


def test_processor_errors_name_the_fix(clip):
    _, processor = tiny_model()
    with pytest.raises(ValueError, match=r"expected a sampling rate of 16000 Hz, got 44100 Hz.*resample"):
        processor([conversation()], audios=[[clip]], sampling_rate=44100)
    with pytest.raises(ValueError, match="empty"):
        processor([conversation()], audios=[[np.zeros(0, dtype=np.float32)]])
    nan_clip = clip.copy()
    nan_clip[10] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor([conversation()], audios=[[nan_clip]])
    with pytest.raises(ValueError, match=r"1 audio placeholders .* but 2 audio clips"):
        processor([conversation()], audios=[[clip, clip]])
    tokenizer = processor.tokenizer
    tokenizer.chat_template = None
    from desta.model.processing import DestaProcessor
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        DestaProcessor(processor.feature_extractor, tokenizer)


def test_timestamped_transcripts_change_only_the_transcript_slot(clip):
    from transformers import WhisperFeatureExtractor

    from desta.model.processing import DestaProcessor
    from desta.model.tiny import tiny_tokenizer

    bare = DestaProcessor(WhisperFeatureExtractor(), tiny_tokenizer(), num_queries=2)
    stamped = DestaProcessor(WhisperFeatureExtractor(), tiny_tokenizer(), num_queries=2,
                             transcript_format="timestamped")
    batch_bare = bare([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
    batch_stamped = stamped([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
    ids_bare, ids_stamped = batch_bare["input_ids"][0].tolist(), batch_stamped["input_ids"][0].tolist()
    audio_end = max(i for i, t in enumerate(ids_bare) if t == bare.audio_token_id) + 1
    slot_bare, slot_stamped = bare.transcript_ids("excuse me"), stamped.transcript_ids("excuse me", len(clip) / 16000)
    assert stamped.tokenizer.decode(slot_stamped).strip() == "[00:00-00:02] excuse me"
    assert ids_bare[:audio_end] == ids_stamped[:audio_end]  # the audio positions are the same
    assert ids_bare[audio_end:audio_end + len(slot_bare)] == slot_bare
    assert ids_stamped[audio_end:audio_end + len(slot_stamped)] == slot_stamped
    assert ids_bare[audio_end + len(slot_bare):] == ids_stamped[audio_end + len(slot_stamped):]  # the rest too
    assert batch_bare["labels"][0].tolist()[audio_end + len(slot_bare):] == \
        batch_stamped["labels"][0].tolist()[audio_end + len(slot_stamped):]
    torch.testing.assert_close(batch_bare["input_features"], batch_stamped["input_features"])


def test_model_settings_live_in_config_json_and_the_processor_keeps_only_its_system_prompt(tmp_path):
    import json

    from desta.model.loading import build, load, save
    from desta.model.modeling import DestaConfig
    from desta.model.processing import DestaProcessor
    from desta.model.tiny import save_tiny_bases, tiny_llm_config, tiny_tokenizer, tiny_whisper_config

    whisper, llm = save_tiny_bases(tmp_path / "bases")
    model, processor = build(str(whisper), str(llm), num_queries=3, transcript_format="timestamped",
                             system_prompt="Listen closely.")
    save(model, processor, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "desta_processor.json").read_text()) == {"system_prompt": "Listen closely."}
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["num_queries"] == 3 and config["transcript_format"] == "timestamped"
    assert config["audio_token_id"] == processor.audio_token_id
    _, loaded = load(tmp_path / "ckpt")
    assert (loaded.num_queries, loaded.transcript_format, loaded.system_prompt) == (3, "timestamped", "Listen closely.")
    assert load(tmp_path / "ckpt", system_prompt="Be brief.")[1].system_prompt == "Be brief."
    assert load(tmp_path / "ckpt", system_prompt="")[1].system_prompt is None  # "": no system turn at all
    assert load(tmp_path / "ckpt", system_prompt=None)[1].system_prompt is None  # None: none, as in build
    assert build(str(whisper), str(llm), system_prompt=None)[1].system_prompt is None
    assert loaded.conversation("Hi?")[0] == {"role": "system", "content": "Listen closely."}

    fresh = DestaConfig(encoder_config=tiny_whisper_config().to_dict(),
                        text_config=tiny_llm_config(len(tiny_tokenizer())).to_dict())
    DestaProcessor.from_config(fresh, tiny_tokenizer())
    assert fresh.audio_token_id is None  # the processor reads the config and never writes it
    wrong = DestaConfig(encoder_config=fresh.encoder_config, text_config=fresh.text_config,
                        audio_token_id=processor.audio_token_id + 1)
    with pytest.raises(ValueError, match=r"audio token '<\|AUDIO\|>' has id \d+, but the tokenizer gives it id \d+"):
        DestaProcessor.from_config(wrong, tiny_tokenizer())
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        DestaProcessor.from_pretrained(tmp_path / "bases")
