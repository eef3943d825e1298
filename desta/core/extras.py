"""The optional parts of the install: which extra of `pip install 'desta[...]'` brings which modules.

`pip install desta` is the core: describe, targets, train, eval, export, chat and `desta demo`. The web demo,
the server, trl's trainers, lhotse corpora and the extra voices are extras (pyproject.toml lists their packages);
code that needs one calls `require_extra` first, so a missing extra is an error naming the command that installs it.
"""

from __future__ import annotations

import importlib.util

# extra -> the modules it brings that desta imports (pyproject.toml's [project.optional-dependencies] holds the
# package names and versions).
EXTRAS = {
    "app": ("gradio",),  # desta app; gradio brings fastapi and uvicorn
    "serve": ("fastapi", "uvicorn"),  # desta serve
    "posttrain": ("trl",),  # desta posttrain's trl trainers: rl (GRPO), self_align (DPO), on_policy_distill
    "lhotse": ("lhotse",),  # lhotse corpora as a describe source
    "voices": ("piper", "G722"),  # piper's neural voice; the G.722 decoder of the Asterisk prompts
}


class MissingExtra(ModuleNotFoundError):
    """An optional part of desta is not installed; the message names the `pip install` that brings it."""


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here.

    >>> missing("app") in ([], ["gradio"])
    True
    """
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def install_hint(extra: str) -> str:
    """The command that installs an extra.

    >>> install_hint("app")
    "pip install 'desta[app]'"
    """
    return f"pip install 'desta[{extra}]'"


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtra naming `what` needs it and the install command, unless `extra`'s modules import."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"{what} needs the {extra!r} extra ({', '.join(absent)} not installed): "
                           f"{install_hint(extra)}", name=absent[0])
