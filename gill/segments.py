"""What an answer is made of, and how a call's inputs are read: the segments ``GILL`` returns (``Text``,
``TextDelta``, ``GeneratedImage``, ``RetrievedImage``, each image with the decision taken at its slot), the
input items it takes, and the original's post-processing for evaluation parity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from gill.decision import POLICIES, Decision


@dataclass
class Text:
    text: str


@dataclass
class TextDelta:
    """A piece of text as it is decoded (``GILL.stream(..., deltas=True)``)."""

    text: str


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    decision: Decision


@dataclass
class RetrievedImage:
    image: Any  # PIL.Image.Image, or None when the index could not load it
    score: float  # exp(logit_scale) * cosine
    source: str
    caption: str
    sha256: str
    license: str
    decision: Decision


Segment = Union[Text, GeneratedImage, RetrievedImage]
InputItem = Union[str, "os.PathLike[str]", Any]


def truncate_like_original(text: str) -> str:
    """The original's ``truncate_caption``: cut at the first newline, else at the first period."""
    if "\n" in text:
        return text[: text.index("\n")]
    if "." in text:
        return text[: text.index(".") + 1]
    return text


def as_conversations(inputs: Any) -> tuple[bool, list[list[InputItem]]]:
    """(batched, conversations) of ``generate_interleaved``'s ``inputs``: one text, image or path is a
    conversation of one item; a list of items is one conversation; a list of lists is a batch."""
    from PIL import Image

    if isinstance(inputs, (str, Path, Image.Image)):
        return False, [[inputs]]
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs: expected a text, an image, a list of texts and images or a list of such lists, "
                        f"got {type(inputs).__name__}")
    if not inputs:
        raise ValueError("inputs: empty; give a list of texts and images (or a list of such lists)")
    nested = [isinstance(c, (list, tuple)) for c in inputs]
    if all(nested):
        return True, [list(c) for c in inputs]
    if any(nested):
        raise TypeError("inputs: a mix of conversations (lists) and items; give one list of texts and images, "
                        "or a list of such lists")
    return False, [list(inputs)]


def check_policy(policy: Any) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy is {policy!r}; choose one of {list(POLICIES)}")


def finish(segments: list[Segment], original_truncation: bool) -> list[Segment]:
    """An answer's segments as returned: empty texts dropped; with ``original_truncation`` the original's
    post-processing (each text cut at its first newline or period, text after the last image dropped)."""
    if original_truncation:
        last_image = max((i for i, s in enumerate(segments) if not isinstance(s, Text)), default=None)
        if last_image is not None:
            segments = segments[: last_image + 1]
        segments = [Text(truncate_like_original(s.text)) if isinstance(s, Text) else s for s in segments]
    return [s for s in segments if not (isinstance(s, Text) and not s.text)]
