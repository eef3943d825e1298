"""Hub ids and a checkpoint's public name: the one rule for each.

A reference to a model or a dataset is a local path or a Hub id (`owner/name`). What desta publishes or shows
(an export's config.json and model card, report titles, the app's page) names a checkpoint by `public_name`:
a Hub id as it is, a folder of the Hub's cache by its Hub id, any other folder by its name alone (a path says
nothing to a reader and something about the machine).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")  # owner/name, as the Hub names a repository
CACHE_FOLDER = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/([^/]+)")  # a Hub cache's model folder


def is_hub_id(reference: str | os.PathLike) -> bool:
    """Whether `reference` reads as a Hub repository id (owner/name) and is no local path.

    >>> is_hub_id("openai/whisper-small"), is_hub_id("whisper-small"), is_hub_id("/models/whisper-small")
    (True, False, False)
    """
    return bool(HUB_ID.fullmatch(str(reference))) and not Path(reference).exists()


def hub_id_of(path: str) -> str | None:
    """The Hub id of a folder in a Hub cache (models--ORG--NAME/snapshots/REVISION), or None.

    >>> hub_id_of("/home/me/.cache/huggingface/hub/models--openai--whisper-small/snapshots/abc123")
    'openai/whisper-small'
    """
    found = CACHE_FOLDER.search(path)
    return f"{found.group(1)}/{found.group(2)}" if found else None


def public_name(reference: str | None) -> str | None:
    """How a published file or a report names a checkpoint or a dataset: a Hub id as it is, a local folder by
    its name only.

    >>> public_name("openai/whisper-small"), public_name("/home/me/models/whisper-small"), public_name(None)
    ('openai/whisper-small', 'whisper-small', None)
    >>> public_name("/home/me/.cache/huggingface/hub/models--openai--whisper-small/snapshots/abc123")  # its Hub id
    'openai/whisper-small'
    """
    if not reference:
        return reference
    return hub_id_of(reference) or (reference if is_hub_id(reference) else Path(reference).name)
