"""The chat turn format of the original GILL demo, in one place for every front end that holds a
conversation (the app, the toy build's chats): a question is "Q: <text>\\nA:", the model answers until it
starts the next "\\nQ:" (or an "\\nA:" line) or has shown a picture, and the answer goes back into the
conversation as it was decoded (its leading space kept, trailing whitespace dropped), each picture it showed
as the [IMG] tokens that made it, then one newline: the next turn's prompt holds the very tokens the model
produced. The original demo did the same (demo/app_gradio.py: the history gets the answer's strings, which
end in "[IMG0]...[IMG7]", and never the shown picture itself); a user's attached picture goes in as a picture.

Pure functions on strings; no model code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Every turn marker: an answer ends where the model begins the next question, or writes an answer line of its
# own ("\nA: ...", which a model that lost track of the turns does)
STOP_STRINGS: tuple[str, ...] = ("\nQ:", "\nA:")
# An answer ends with its picture: the original demo dropped whatever the model wrote after its [IMG]
# tokens (and models are trained with the [IMG] tokens last, so what follows them is untrained).
END_AT_IMAGE = True


def question(text: str) -> str:
    """The prompt text of one user turn."""
    return f"Q: {text}\nA:"


def answer_text(decoded: str) -> str:
    """The answer's text as shown: what was decoded before the model began another turn (any stop string)."""
    cut = min((i for i in (decoded.find(stop) for stop in STOP_STRINGS) if i >= 0), default=len(decoded))
    return decoded[:cut]


def shown_text(decoded: str) -> str:
    """What a chat shows of an answer while it is decoded: ``answer_text``, less a trailing piece that may be
    the start of the next question ("\n", "\nQ"), so the stop string never flashes up or stays."""
    text = answer_text(decoded)
    for stop in STOP_STRINGS:
        for n in range(len(stop) - 1, 0, -1):
            if text.endswith(stop[:n]):
                return text[: -n]
    return text


def answer_items(parts: Iterable[Any], img_text: str) -> list[Any]:
    """The items an answer adds to the conversation: its ``parts`` in order (decoded text pieces, and each
    picture it showed, generated or retrieved), each picture as ``img_text`` (the model's [IMG] tokens,
    ``GILL.img_tokens.text``), cut where the model began another turn, then one newline: one text item."""
    if isinstance(parts, str) or not isinstance(img_text, str):
        # the form before [IMG] tokens were fed back, answer_items(decoded, pictures), would silently leave the
        # pictures out of the history, and a chat then loses its thread within a few turns
        raise TypeError("answer_items(parts, img_text): the answer's text pieces and pictures in order, and the "
                        "model's [IMG] tokens as text (GILL.img_tokens.text)")
    text = "".join(p if isinstance(p, str) else img_text for p in parts)
    return [answer_text(text).rstrip() + "\n"]


def turn_items(text: str, attachments: Sequence[Any] = ()) -> list[Any]:
    """The items of one user turn: the attached pictures first, then the question (if any text)."""
    return [*attachments, *([question(text)] if text else [])]


@dataclass(frozen=True)
class FittedTurns:
    turns: list  # the most recent whole earlier turns that fit
    dropped: int  # how many older turns were left out


def fit_turns(turns: Sequence[list], turn: list, prompt_length: Callable[[list], int], budget: int) -> FittedTurns:
    """The most recent whole earlier ``turns`` (each a list of items) that, followed by ``turn``, take at most
    ``budget`` positions by ``prompt_length`` (e.g. ``GILL.prompt_length``): what a chat keeps of itself when
    it outgrows a model's context. ``turn`` itself is always kept (whether it fits alone is the caller's)."""
    turns, dropped = list(turns), 0
    while turns and prompt_length([item for t in [*turns, turn] for item in t]) > budget:
        turns, dropped = turns[1:], dropped + 1
    return FittedTurns(turns, dropped)
