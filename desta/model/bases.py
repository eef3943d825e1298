"""Where a model's base checkpoints load from: a local folder, a folder beside a moved checkpoint, a Hub id, or
the local Hub cache when the Hub cannot be reached; a missing base fails at once, naming it and the fix.

desta.model.modeling (loading a saved model) and desta.model.loading (building a new one) both find their bases
here.
"""

from __future__ import annotations

import os
from pathlib import Path

from desta.core.hub import CACHE_FOLDER, hub_id_of, is_hub_id

HUB_PROBE_SECONDS = 5.0  # one request says whether the Hub can be reached (transformers retries for ~30 s)


def locate_base(reference: str, what: str, checkpoint: str | os.PathLike | None = None) -> str:
    """Where a base checkpoint loads from: `reference` itself when it is a local folder; else, for a base a saved
    `checkpoint` names, a folder of that name beside the checkpoint (CHECKPOINT/.., CHECKPOINT/../bases); else a
    Hub id, as it is when the Hub answers for it, or its folder in the local Hub cache when the Hub cannot be
    reached. FileNotFoundError naming the base (`what`), the places looked and the fix otherwise."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path.resolve())
    looked = [path.resolve()]
    if checkpoint is not None:
        near = Path(checkpoint).resolve()
        candidates = [near.parent / path.name, near.parent / "bases" / path.name]
        if not path.is_absolute():
            candidates.insert(0, near.parent / path)
        for candidate in candidates:
            if candidate.is_dir():
                return str(candidate)
        looked += [c for c in candidates if c not in looked]
    snapshot = CACHE_FOLDER.search(reference)  # a folder of another machine's Hub cache: the same repository here
    if snapshot is not None:
        here = _hub_cache_folder(hub_id_of(reference), revision=snapshot.group(3))
        return here or locate_base(hub_id_of(reference), what, checkpoint)
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    fix = ("put the folder in one of those places, export naming its Hub id (desta export --encoder-id / "
           "--llm-id ORG/NAME), or export the whole model (desta export --full), which needs no base"
           if checkpoint is not None else "give an existing folder or a Hub id such as ORG/NAME")
    problem = _hub_problem(reference)
    if problem is None:
        return reference
    cached = _hub_cache_folder(reference) if problem.startswith("the Hub cannot be reached") else None
    if cached is not None:
        return cached
    raise FileNotFoundError(f"{what} {reference!r} is not a folder here (looked in {where}) and {problem}; {fix}")


def _hub_problem(reference: str) -> str | None:
    """Why `reference` cannot load from the Hub now (not a repository id, not found there, the Hub unreachable),
    or None when the Hub has it. One request with a short timeout, no retries; the token (if any) is sent, never
    shown."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    if not is_hub_id(reference):
        return "it is not a Hub repository id (owner/name)"
    if constants.HF_HUB_OFFLINE:
        return "the Hub cannot be reached: HF_HUB_OFFLINE is set"
    try:
        response = httpx.head(f"{constants.ENDPOINT}/{reference}/resolve/main/config.json",
                              headers=build_hf_headers(), timeout=HUB_PROBE_SECONDS, follow_redirects=True)
    except httpx.HTTPError as err:
        return f"the Hub cannot be reached ({type(err).__name__}: {err})"
    if response.status_code in (401, 403, 404):
        return f"the Hub has no repository {reference!r} (HTTP {response.status_code}; a private one needs a login)"
    if response.status_code >= 400:
        return f"the Hub cannot be reached (HTTP {response.status_code})"
    return None


def _hub_cache_folder(repo_id: str, revision: str | None = None) -> str | None:
    """The local Hub cache's snapshot folder of a model repository (its main revision, or `revision`), or None
    when it holds none."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return str(Path(found).parent) if isinstance(found, str) else None
