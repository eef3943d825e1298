"""Real recorded speech: the Asterisk telephony prompts (Debian's asterisk-core-sounds-<lang>-g722) as a corpus.

Reads the sounds folder (/usr/share/asterisk/sounds), one speaker folder in it (en_US_f_Allison: locale,
gender and the speaker's name are in its name) or a folder inside one (en_US_f_Allison/digits), and each
language's transcripts (/usr/share/doc/asterisk-core-sounds-<lang>/core-sounds-<lang>.txt.gz, a
`name: text` line per prompt); decodes the G.722 files (16 kHz, 64 kbit/s, headerless) with the `g722`
package. Returns a `datasets` table, one row per prompt: id, audio (FLAC bytes, so the described dataset
needs neither Debian's packages nor g722 later), transcript, language, locale, gender, speaker, accent,
engine "human", voice `asterisk:<speaker>` and licence. A prompt without a transcript, a non-speech one (a
tone, silence: its transcript is only a note in brackets) or a file that does not decode is a reject with
its reason. Transcripts are kept as the package writes them: about 1 % hold a note inside the text
("at [@]", "(emphase)"). `desta describe --source /usr/share/asterisk/sounds --mapping asterisk` reads it.

Four professional voices, about 2.3 h: Allison Smith (en-US, es-MX; CC-BY-SA-3.0), June Wallack (fr-CA;
CC-BY-SA-3.0), Carlo Flora (it-IT; CC-BY-3.0) and a Russian voice (ru-RU; CC-BY-3.0).
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from desta.audio import SAMPLE_RATE
from desta.core.extras import require_extra

if TYPE_CHECKING:
    from datasets import Dataset

SOUNDS = Path("/usr/share/asterisk/sounds")
DOCS = Path("/usr/share/doc")
G722_BITRATE = 64000  # bit/s: Asterisk's G.722 files, 8000 bytes per second of 16 kHz audio
SPEAKER_FOLDER = re.compile(r"^(?P<language>[a-z]{2})_(?P<region>[A-Z]{2})_(?P<gender>[fm])_(?P<speaker>\w+)$")
# A transcript that is only a note, not words: "[ascending tones]", "(1 second of silence)".
NOT_SPEECH = re.compile(r"^\s*[\[(][^\])]*[\])]\s*$")
LANGUAGES = {"en": "English", "es": "Spanish", "fr": "French", "it": "Italian", "ru": "Russian"}
ACCENTS = {"US": "American", "MX": "Mexican", "CA": "Canadian", "IT": "Italian", "RU": "Russian"}  # by region
LICENCES = {"en": "CC-BY-SA-3.0", "es": "CC-BY-SA-3.0", "fr": "CC-BY-SA-3.0", "it": "CC-BY-3.0", "ru": "CC-BY-3.0"}
INSTALL = ("apt-get install -y asterisk-core-sounds-{lang} asterisk-core-sounds-{lang}-g722 (or bash "
           "tools/install_voices.sh from the desta repository)")


def read_g722(source: str | Path | bytes) -> np.ndarray:
    """Decode a headerless 64 kbit/s G.722 file (path or bytes) to 16 kHz mono float32 samples in [-1, 1).

    >>> import G722
    >>> tone = (8000 * np.sin(np.arange(1600) / 5)).astype(np.int16)  # peak 8000 / 32768 = 0.244
    >>> y = read_g722(bytes(G722.G722(16000, 64000).encode(tone)))
    >>> y.dtype, y.shape, round(float(np.abs(y[200:]).max()), 2)
    (dtype('float32'), (1600,), 0.25)
    """
    require_extra("voices", "reading G.722 (the Asterisk prompts)")
    import G722

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    decoded = G722.G722(SAMPLE_RATE, G722_BITRATE).decode(data)  # array('h'): 16-bit samples
    return np.frombuffer(decoded, dtype=np.int16).astype(np.float32) / 32768.0


def transcripts(language: str, docs: Path = DOCS) -> dict[str, str]:
    """A language's prompt texts by prompt name (`digits/1`, `agent-pass`, ...), from core-sounds-<lang>.txt.gz."""
    path = docs / f"asterisk-core-sounds-{language}" / f"core-sounds-{language}.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the transcripts of the {language} prompts; install: "
                                + INSTALL.format(lang=language))
    texts = {}
    for line in gzip.open(path, "rt", encoding="utf-8-sig").read().splitlines():
        name, colon, text = line.partition(":")
        if colon and not line.startswith(";") and name.strip() and " " not in name.strip():
            texts[name.strip()] = " ".join(text.split())
    return texts


def speaker_folders(source: Path) -> list[tuple[Path, Path]]:
    """(speaker folder, folder to read) pairs for a source: the sounds folder (every speaker folder xx_YY_g_Name in
    it; aliases such as `en` and `en_US`, symbolic links to them, are skipped), one speaker folder, or a folder
    inside one (`en_US_f_Allison/digits`: those prompts only)."""
    for folder in (source, *source.parents):
        if SPEAKER_FOLDER.match(folder.name):
            return [(folder, source)]
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.is_symlink() and SPEAKER_FOLDER.match(p.name))
    if not folders:
        raise FileNotFoundError(f"{source} holds no Asterisk speaker folders (like en_US_f_Allison); give "
                                f"{SOUNDS} or one of its speaker folders; install: " + INSTALL.format(lang="en"))
    return [(folder, folder) for folder in folders]


def _flac(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def asterisk_source(source: str | Path, docs: Path = DOCS) -> tuple[Dataset, list[dict]]:
    """The prompts under `source` as rows (see the module docstring) and the prompts that cannot be used, each
    with its reason. Row ids are `<prompt>@<locale>` (`agent-pass@en-US`), so the same prompt in each language
    sorts together."""
    from datasets import Dataset

    rows, rejects = [], []
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder; give {SOUNDS} (or one speaker folder in it); install: "
                                + INSTALL.format(lang="en"))
    for folder, under in speaker_folders(source):
        parts = SPEAKER_FOLDER.match(folder.name).groupdict()
        texts = transcripts(parts["language"], docs)
        locale = f"{parts['language']}-{parts['region']}"
        for path in sorted(under.rglob("*.g722")):
            name = path.relative_to(folder).with_suffix("").as_posix()
            row_id, text = f"{name}@{locale}", texts.get(name)
            if text is None or not text.strip("[]. "):
                rejects.append({"id": row_id, "source": str(path), "reason": f"no transcript for {name!r} in "
                                f"core-sounds-{parts['language']}.txt.gz"})
                continue
            if NOT_SPEECH.match(text):
                rejects.append({"id": row_id, "source": str(path), "reason": f"not speech: {text}"})
                continue
            try:
                samples = read_g722(path)
            except (OSError, ValueError) as err:
                rejects.append({"id": row_id, "source": str(path), "reason": f"cannot decode G.722: {err}"})
                continue
            rows.append({"id": row_id, "audio": {"bytes": _flac(samples), "path": str(path)}, "transcript": text,
                         "language": LANGUAGES.get(parts["language"], parts["language"]), "locale": locale,
                         "gender": "Female" if parts["gender"] == "f" else "Male", "speaker": parts["speaker"],
                         "accent": ACCENTS.get(parts["region"], parts["region"]), "engine": "human",
                         "voice": f"asterisk:{parts['speaker']}", "licence": LICENCES.get(parts["language"], "")})
    if not rows:
        return Dataset.from_dict({"id": [], "audio": []}), rejects
    return Dataset.from_list(rows), rejects
