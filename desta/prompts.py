"""Prompts: the chat turns both LLMs see, the training prompt pools and the evaluation instructions.

The text LLM reads a description and an instruction (`text_turn`: the targets stage and the eval's
text reference); the speech LLM hears the clip in its place (`speech_turn`: training, eval, chat,
serving). Training pools and evaluation instructions are kept apart on purpose: "unseen" in
evaluation means no evaluation instruction (nor a near copy of one) is ever in a training pool;
`check_disjoint` enforces it at import time.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import numpy as np

DEFAULT_SYSTEM_PROMPT = "Focus on the audio clips and instructions."
Conversation = list[dict[str, Any]]


class Trained(enum.Enum):
    """The system prompt a checkpoint was trained with (saved beside it): what `desta.load` asks with unless told
    otherwise. A system_prompt of None means no system turn, in `desta.build` and `desta.load` alike."""

    PROMPT = "the system prompt the checkpoint was trained with"


TRAINED = Trained.PROMPT


def system_prompt_setting(value: str | None) -> str | None | Trained:
    """A command's system-prompt setting as `desta.load` takes it: null (not set) is the trained prompt, "" none.

    >>> system_prompt_setting(None) is TRAINED, system_prompt_setting(""), system_prompt_setting("Be brief.")
    (True, None, 'Be brief.')
    """
    return TRAINED if value is None else value or None


def _system(system_prompt: str | None) -> Conversation:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def user_turn(description: str, instruction: str) -> str:
    """The text LLM's user message: the description, a blank line, the instruction.

    >>> user_turn("[00:00-00:01] Hi. (Gender: Male)", "What can you hear from the audio?")
    '[00:00-00:01] Hi. (Gender: Male)\\n\\nWhat can you hear from the audio?'
    """
    return f"{description.strip()}\n\n{instruction.strip()}"


def text_turn(description: str, instruction: str, system_prompt: str | None) -> Conversation:
    """What the text LLM reads: the system prompt, then the description and the instruction."""
    return _system(system_prompt) + [{"role": "user", "content": user_turn(description, instruction)}]


def with_system(messages: Conversation, system_prompt: str | None) -> Conversation:
    """The messages with the system prompt first, unless they open with a system turn of their own (which wins).

    >>> with_system([{"role": "user", "content": "Hi"}], "Be brief.")[0]
    {'role': 'system', 'content': 'Be brief.'}
    """
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return _system(system_prompt) + list(messages)


def speech_messages(turns: list[dict[str, Any]], audio_token: str, system_prompt: str | None) -> Conversation:
    """What the speech LLM reads for turns of {"role", "text", "clips": how many clips the turn carries}: the
    system prompt first, and a turn with clips opening with one audio placeholder per clip, then its text. The
    one layout of speech turns: training, eval, chat, serve and the app all build theirs here.

    >>> speech_messages([{"role": "user", "text": "Who speaks?", "clips": 2}], "<|AUDIO|>", None)
    [{'role': 'user', 'content': '<|AUDIO|>\\n<|AUDIO|>\\nWho speaks?'}]
    """
    messages = [{"role": turn["role"], "content": f"{audio_token}\n" * turn.get("clips", 0) + turn["text"]}
                for turn in turns]
    return with_system(messages, system_prompt)


def speech_turn(audio_token: str, instruction: str, system_prompt: str | None, response: str | None = None,
                clips: int = 1) -> Conversation:
    """What the speech LLM reads: the same system prompt, one audio placeholder per clip in place of the
    description, the instruction, and the answer when training.

    >>> speech_turn("<|AUDIO|>", "Who speaks?", None, "A man.")
    [{'role': 'user', 'content': '<|AUDIO|>\\nWho speaks?'}, {'role': 'assistant', 'content': 'A man.'}]
    """
    turns = [{"role": "user", "text": instruction, "clips": clips}]
    return speech_messages(turns + ([{"role": "assistant", "text": response}] if response is not None else []),
                           audio_token, system_prompt)


TRAINING_POOLS: dict[str, list[str]] = {
    # DeSTA2: one open question; the LLM's own description of what it "hears" is the target.
    "desta2": ["What can you hear from the audio?"],
    # DeSTA2.5-style: varied open requests about content and voice, first entry as in DeSTA2.
    "desta25": [
        "What can you hear from the audio?",
        "Describe the audio in detail.",
        "What is being said, and how is it said?",
        "Tell me about the speaker and what they say.",
        "Summarize the audio clip.",
        "What can you tell about the person speaking?",
        "Give a short report on this recording.",
        "Explain what happens in the audio.",
        "Listen to the clip and describe it.",
        "What stands out in this recording?",
        "Characterize the voice in the audio.",
        "How would you describe this speech sample?",
    ],
}
OPEN = "open"  # the category of requests about the whole clip; the others are description fields
# Pools that also ask about each field a description holds, as DeSTA2.5's data asks many things of a clip:
# per clip one category is drawn among "open" and the fields its description holds (equal chances), then
# one phrasing of it. The answers stay the LLM's own: a question about the pitch makes it talk about the
# pitch, which an open request to a small LLM rarely does.
FIELD_POOLS: dict[str, dict[str, list[str]]] = {
    "voice": {
        OPEN: TRAINING_POOLS["desta25"],
        "gender": [
            "Tell me the speaker's gender.",
            "Does a man or a woman say this?",
            "Who is talking here: a male or a female voice?",
            "From the voice alone, what sex would you guess the speaker is?",
            "Identify whether the voice is male or female, and say why.",
            "Describe who is speaking: man or woman?",
        ],
        "emotion": [
            "What feeling comes through in the voice?",
            "Describe the emotional tone of the speaker.",
            "What mood is the speaker in?",
            "Which emotion do you perceive in this voice?",
            "Does the speaker sound happy, sad, angry or calm to you?",
            "How is the speaker feeling, judging by their voice?",
        ],
        "accent": [
            "What kind of English accent does the speaker have?",
            "Where might the speaker come from, judging by the accent?",
            "Describe the speaker's accent.",
            "Which regional accent can you detect in the speech?",
            "Tell me about the accent of the voice.",
            "What does the accent reveal about the speaker's origin?",
        ],
        "age": [
            "How old does the speaker sound?",
            "Estimate the speaker's age group.",
            "Is this a young or an older voice?",
            "What age range would you give the speaker?",
        ],
        "pitch": [
            "How would you characterize the pitch of this voice?",
            "Is the voice deep or high?",
            "Tell me about the speaker's pitch.",
            "Does the speaker have a high, low or medium-pitched voice?",
            "Comment on how high or deep the speaker sounds.",
            "What can you say about the tone height of the voice?",
        ],
        "volume": [
            "How loudly is the speaker talking?",
            "Is the speech soft or loud?",
            "Comment on the loudness of the voice.",
            "What is the volume of the speaker's voice like?",
            "Does the speaker talk quietly or loudly?",
            "Tell me how loud this recording sounds.",
        ],
        "speaking_speed": [
            "How quickly does the person speak?",
            "Is the speech rate slow, moderate or quick?",
            "Comment on the tempo of the speech.",
            "Does the speaker talk fast or slowly?",
            "Tell me about the speaker's pace.",
            "How would you describe the rhythm and speed of this speech?",
        ],
        "duration": [
            "How long is this recording?",
            "About how many seconds does the speech last?",
            "What is the clip's duration?",
            "Tell me the length of the audio.",
        ],
        "transcript": [
            "What is said in the recording?",
            "Please transcribe the audio.",
            "Write out the words you hear.",
            "Tell me the exact words of the speaker.",
            "What sentence is spoken here?",
            "Quote what the person says.",
        ],
    },
}
Pool = dict[str, list[str]]  # category (OPEN or a description field) -> its phrasings

# A label-style answer about one description field, naming its gold value and nothing else: the targets of
# `desta targets --kind labels` for a field question, and the candidate answers the hearing check scores.
FIELD_ANSWERS: dict[str, str] = {
    "gender": "The speaker is {value}.",
    "accent": "The speaker has {article} {value} accent.",
    "emotion": "The speaker sounds {value}.",
    "age": "The speaker sounds {value}.",
    "pitch": "The speaker's pitch is {value}.",
    "volume": "The speaker's volume is {value}.",
    "speaking_speed": "The speaker talks at a {value} pace.",
    "duration": "The clip lasts about {value} seconds.",
    "transcript": "{value}",
}


def field_answer(field: str, value: str | float) -> str:
    """The label-style answer naming one field's value.

    >>> field_answer("gender", "Female"), field_answer("accent", "American"), field_answer("duration", 2.6)
    ('The speaker is female.', 'The speaker has an American accent.', 'The clip lasts about 3 seconds.')
    """
    if field not in FIELD_ANSWERS:
        raise ValueError(f"no label answer for field {field!r}; one of {sorted(FIELD_ANSWERS)}")
    if field == "duration":
        text = str(max(1, round(float(value))))
    elif field in ("accent", "transcript"):
        text = str(value).strip()
    else:
        text = str(value).lower()
    return FIELD_ANSWERS[field].format(value=text, article="an" if text[:1].upper() in "AEIOU" else "a")


def restrict_pool(pool: Pool, fields: list[str] | None) -> Pool:
    """The pool's categories among `fields` (None: all), in the pool's order.

    >>> list(restrict_pool(training_pool("voice"), ["pitch", "gender"]))
    ['gender', 'pitch']
    >>> restrict_pool(training_pool("desta2"), ["gender"])
    Traceback (most recent call last):
    ...
    ValueError: the pool has no categories ['gender']; its categories: ['open']
    """
    if fields is None:
        return pool
    missing = [f for f in fields if f not in pool]
    if missing:
        raise ValueError(f"the pool has no categories {missing}; its categories: {list(pool)}")
    return {category: phrasings for category, phrasings in pool.items() if category in fields}


def prompt_category(pool: Pool, prompt: str) -> str:
    """The category a prompt of the pool asks about (OPEN when it is not one of the pool's phrasings)."""
    return next((category for category, phrasings in pool.items() if prompt in phrasings), OPEN)

# Evaluation instructions by category, in the styles of Speech-IFEval and Dynamic-SUPERB: a one-word
# answer, a choice from a list ({labels}: the attribute's label set), yes/no about a candidate label
# ({candidate}: the gold label or another, drawn per item), free form and a full sentence. One template
# is drawn per item (seeded), so a score is not one phrasing's luck.
EVAL_INSTRUCTIONS: dict[str, list[str]] = {
    "gender": [
        "Is the speaker male or female? Answer with one word.",
        "What is the gender of the person speaking?",
        "Choose the speaker's gender from this list: {labels}.",
        "Is the speaker {candidate}? Answer yes or no.",
        "In one sentence, tell me whether a man or a woman is talking.",
        "Would you say this voice belongs to a man or a woman?",
    ],
    "accent": [
        "Which accent does the speaker have? Choose one of: {labels}.",
        "Where is the speaker's accent from? Pick from: {labels}.",
        "Identify the accent of the voice. Options: {labels}.",
        "Is the speaker's accent {candidate}? Answer yes or no.",
        "In one sentence, describe the speaker's accent, choosing among {labels}.",
        "Name the speaker's accent in one word ({labels}).",
    ],
    "emotion": [
        "Which emotion does the voice convey? Choose one of: {labels}.",
        "How does the speaker feel? Pick from: {labels}.",
        "Identify the emotion in this recording. Options: {labels}.",
        "Does the speaker sound {candidate}? Answer yes or no.",
        "In one sentence, describe the speaker's emotional state ({labels}).",
        "Name the speaker's emotion in one word ({labels}).",
    ],
    "speaking_speed": [
        "Is the person talking slowly, at a normal pace, or fast?",
        "How fast does the speaker talk: slow, normal or fast?",
        "Rate the speaking rate of the voice. Options: {labels}.",
        "Would you describe the speaking pace as {candidate}? Answer yes or no.",
        "Describe the pace of the speech in one sentence.",
        "What is the speaking rate in this recording? Answer with one word.",
    ],
    "pitch": [
        "Is the speaker's voice low, normal or high in pitch?",
        "How high or low is the voice? Answer with one word: {labels}.",
        "Describe the pitch of the speaker's voice in one sentence.",
        "Would you describe the speaker's pitch as {candidate}? Answer yes or no.",
        "Is this voice deep, average or high-pitched?",
        "Rate the voice's pitch from these options: {labels}.",
    ],
    "volume": [
        "Is the recording quiet, normal or loud in volume?",
        "How loud is the speech? Choose from: {labels}.",
        "Describe the loudness of the recording in one sentence.",
        "Is the volume of this clip {candidate}? Answer yes or no.",
        "Would you call the speech soft, moderate or loud?",
        "What is the volume level of the audio? One word, please.",
    ],
    "duration": [
        "Roughly how many seconds long is the clip? Answer with a number.",
        "How long does the recording last, in seconds?",
        "Estimate the duration of the audio in seconds.",
        "What is the length of this clip? Give a number of seconds.",
        "In seconds, how long is the speech?",
        "In one sentence, tell me the approximate duration of the recording in seconds.",
    ],
    "transcription": [
        "Write down exactly the words spoken, nothing else.",
        "Transcribe the speech verbatim.",
        "What words does the speaker say? Reply with the words only.",
        "Give me a word-for-word transcript of the audio.",
        "Repeat exactly what was said in the clip.",
        "Type out the spoken sentence and nothing more.",
    ],
    # A question about the clip plus one verifiable format instruction (desta.core.instructions):
    # scored on the format only, as Speech-IFEval scores instruction following.
    "instruction_following": [
        "What does the speaker say?",
        "Describe the speaker's voice.",
        "What is the speaker's emotion?",
        "Summarise the content of the recording.",
        "What is the gender of the speaker, and what do they talk about?",
        "Tell me what the speaker is talking about.",
        "What is the speaker's accent, and what do they say?",
    ],
    "open": [
        "Describe the speaker's voice.",
        "What is the mood of this recording, and why do you think so?",
        "Who might be speaking here, and in what situation?",
        "Give your impression of the speaker.",
        "What can you infer about the speaker from how they talk?",
        "What impression does the speaker's tone give?",
    ],
}


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", re.sub(r"\{\w+\}", "", text.lower())).strip()


def _near(prompt: str, instruction: str, threshold: float = 0.7) -> bool:
    """Whether a prompt is an evaluation instruction or a near copy of one: the same words (normalised), or
    word sets overlapping by `threshold` of their union (Jaccard).

    >>> _near("Transcribe the speech verbatim!", "Transcribe the speech verbatim.")
    True
    >>> _near("Please transcribe the audio.", "Transcribe the speech verbatim.")
    False
    """
    a, b = set(_normal(prompt).split()), set(_normal(instruction).split())
    return _normal(prompt) == _normal(instruction) or len(a & b) / max(len(a | b), 1) >= threshold


def all_training_prompts() -> list[str]:
    """Every prompt of every named training pool, flat and per field."""
    prompts = [p for pool in TRAINING_POOLS.values() for p in pool]
    return prompts + [p for pool in FIELD_POOLS.values() for phrasings in pool.values() for p in phrasings]


def _clashes(prompts: list[str]) -> list[tuple[str, str]]:
    evals = [t for templates in EVAL_INSTRUCTIONS.values() for t in templates]
    return [(p, t) for p in prompts for t in evals if _near(p, t)]


def check_disjoint() -> None:
    """Raise if any evaluation instruction (or a near copy of one) is in a training pool."""
    clash = _clashes(all_training_prompts())
    if clash:
        raise AssertionError(f"evaluation instructions found in a training pool (prompt, instruction): {clash}")


def training_pool(name_or_list: str | list[str]) -> Pool:
    """A pool by name, or a custom list of open requests (checked against the evaluation instructions), as
    {category: phrasings}: a flat pool is all OPEN.

    >>> sorted(training_pool("voice"))[:3], training_pool("desta2")
    (['accent', 'age', 'duration'], {'open': ['What can you hear from the audio?']})
    """
    if isinstance(name_or_list, list):
        pool = [p.strip() for p in name_or_list if p.strip()]
        clash = _clashes(pool)
        if clash:
            raise ValueError(f"these prompts are evaluation instructions (or near copies) and cannot be trained on: "
                             f"{clash}")
        if not pool:
            raise ValueError("the custom prompt pool is empty")
        return {OPEN: pool}
    if name_or_list in FIELD_POOLS:
        return {category: list(phrasings) for category, phrasings in FIELD_POOLS[name_or_list].items()}
    if name_or_list not in TRAINING_POOLS:
        raise ValueError(f"unknown prompt pool {name_or_list!r}; choose one of {sorted(TRAINING_POOLS | FIELD_POOLS)} "
                         "or give a list of prompts")
    return {OPEN: list(TRAINING_POOLS[name_or_list])}


def pick_prompts(pool: Pool | list[str], index: int, seed: int, count: int = 1,
                 fields: set[str] | None = None) -> list[str]:
    """`count` distinct prompts for row `index`, a pure function of (seed, index) and the fields the row's
    description holds (`fields`; None: every category of the pool). Each category the row allows (OPEN always)
    has the same chance; a flat pool draws as it always has.

    >>> pick_prompts(["a", "b", "c"], index=4, seed=0, count=2) == pick_prompts(["a", "b", "c"], 4, 0, 2)
    True
    >>> pick_prompts({"open": ["Hi?"], "pitch": ["High?"], "age": ["Old?"]}, 0, 0, 3, fields={"pitch"})
    Traceback (most recent call last):
    ...
    ValueError: asked for 3 prompts per clip but the pool holds 2 for this row (categories ['open', 'pitch'])
    """
    pool = {OPEN: pool} if isinstance(pool, list) else pool
    allowed = [c for c in pool if c == OPEN or fields is None or c in fields]
    flat = [(c, p) for c in allowed for p in pool[c]]
    if count > len(flat):
        raise ValueError(f"asked for {count} prompts per clip but the pool holds {len(flat)} for this row "
                         f"(categories {allowed})")
    rng = np.random.default_rng([seed, index])
    if len(allowed) == 1:
        return [flat[i][1] for i in rng.choice(len(flat), size=count, replace=False)]
    weights = np.array([1.0 / (len(allowed) * len(pool[c])) for c, _ in flat])
    return [flat[i][1] for i in rng.choice(len(flat), size=count, replace=False, p=weights / weights.sum())]


check_disjoint()
