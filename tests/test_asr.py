import numpy as np
import pytest
import torch

from desta.audio import SAMPLE_RATE
from desta.audio.asr import has_speech, transcribe_windows
from desta.model.tiny import tiny_model


@pytest.fixture(scope="module")
def non_speech():
    seconds = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    return {"noise": (np.random.default_rng(0).standard_normal(len(seconds)) * 0.1).astype(np.float32),
            "tone": (0.3 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32),
            "silence": np.zeros(len(seconds), dtype=np.float32)}


def test_vad_finds_speech_only_in_speech(clip, non_speech):
    assert has_speech(clip)
    assert {name: has_speech(audio) for name, audio in non_speech.items()} == dict.fromkeys(non_speech, False)


def test_whisper_decodes_only_the_windows_with_speech(clip, non_speech):
    model, processor = tiny_model()
    decoded = []
    generate = model.whisper.generate

    def counting_generate(mel, **kwargs):
        decoded.append(mel.shape[0])
        return generate(mel, **kwargs)

    model.whisper.generate = counting_generate
    clips = [*non_speech.values(), clip]
    texts = model.transcribe(processor, clips, max_new_tokens=4)
    assert texts[:3] == ["", "", ""] and decoded == [1]  # the LLM reads no transcript for noise, a tone, silence
    model.transcribe(processor, clips, max_new_tokens=4, vad=False)
    assert decoded == [1, 4]


def test_multilingual_transcripts_hold_no_language_task_or_timestamp_tokens():
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from desta.audio.asr import whisper_text_tokenizer

    config = WhisperConfig(vocab_size=51866, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)  # large-v3's vocabulary
    whisper = WhisperForConditionalGeneration(config).eval()
    tokenizer = whisper_text_tokenizer(config)
    text_ids = tokenizer.encode(" Où est la gare ?")
    row = [*tokenizer.sot_sequence_including_notimestamps, *text_ids, tokenizer.timestamp_begin + 50, tokenizer.eot]
    whisper.generate = lambda mel, **_: torch.tensor([row])
    heard = transcribe_windows(whisper, WhisperFeatureExtractor(), [np.zeros(SAMPLE_RATE, np.float32)], vad=False)
    assert heard == ["Où est la gare ?"]


@pytest.mark.real
def test_real_whisper_hallucinates_on_noise_without_vad(real_models, clip, non_speech):
    from desta.audio.asr import TransformersWhisper
    from desta.demo import SMALL_WHISPER

    clips = [non_speech["noise"], non_speech["tone"], clip]
    without = TransformersWhisper(str(real_models / SMALL_WHISPER), vad=False)(clips)
    with_vad = TransformersWhisper(str(real_models / SMALL_WHISPER))(clips)
    assert without[0] and without[1]  # e.g. "You" and "Beeping"
    assert with_vad[:2] == ["", ""] and with_vad[2] == without[2]
