import numpy as np
import pytest
import soundfile as sf

from desta.audio import SAMPLE_RATE, AudioError, load_audio, num_windows, split_windows


def test_load_audio_downmixes_and_resamples(tmp_path, clip):
    stereo = np.stack([clip, clip * 0.5], axis=1)
    import librosa

    stereo_44k = librosa.resample(stereo.T, orig_sr=SAMPLE_RATE, target_sr=44100).T
    sf.write(tmp_path / "stereo.flac", stereo_44k, 44100)
    loaded = load_audio(tmp_path / "stereo.flac")
    assert loaded.ndim == 1 and loaded.dtype == np.float32
    assert abs(len(loaded) - len(clip)) <= 2


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"this is not audio", "cannot decode audio"),
])
def test_load_audio_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=f"bad.wav: {message}"):
        load_audio(path)


def test_silent_file_is_rejected(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="silent"):
        load_audio(tmp_path / "quiet.wav")


def test_windows_cover_the_clip_in_order():
    samples = np.arange(70 * SAMPLE_RATE, dtype=np.float32)
    windows = split_windows(samples)
    assert [len(w) / SAMPLE_RATE for w in windows] == [30, 30, 10]
    assert np.array_equal(np.concatenate(windows), samples)
    assert num_windows(1) == 1 and num_windows(30 * SAMPLE_RATE) == 1 and num_windows(30 * SAMPLE_RATE + 1) == 2


