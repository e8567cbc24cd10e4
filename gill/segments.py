"""What an answer is made of, and how a call's inputs are read: the segments ``GILL`` returns (``Text``,
``TextDelta``, ``GeneratedImage``, ``RetrievedImage``, ``EditedImage``, each image with the decision taken at
its slot), the input items it takes, where an edit starts from (``EditSource``), and the original's
post-processing for evaluation parity."""

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


@dataclass
class EditSource:
    """The picture an edit starts from, and where it is: its place in the conversation ("attached picture 2",
    "shown in answer 3"), or a record of the retrieval corpus (its source, caption, score, hash, licence)."""

    image: Any  # PIL.Image.Image (a pathlib.Path until it is opened)
    place: str = ""  # its place in the conversation; "" for a corpus record
    source: str = ""  # a corpus record's source path or URL
    caption: str = ""
    score: float | None = None  # a corpus record's retrieval score, exp(logit_scale) * cosine
    sha256: str = ""
    license: str = ""

    @property
    def from_corpus(self) -> bool:
        return not self.place

    def describe(self) -> str:
        """Where it came from, in words: its place, or "the corpus: SOURCE (“CAPTION”, score S)"."""
        if self.place:
            return self.place
        caption = f"“{self.caption}”, " if self.caption else ""
        score = f"score {self.score:.2f}" if self.score is not None else "no score"
        return f"the corpus: {self.source} ({caption}{score})"


@dataclass
class EditedImage:
    """A picture redrawn from ``source`` (image-to-image at ``strength``) under the slot's conditioning."""

    image: Any  # PIL.Image.Image
    source: EditSource
    strength: float  # the share of the diffusion schedule redrawn, (0, 1]
    decision: Decision


class NoEditSourceError(ValueError):
    """An edit was asked for with no picture to start from: none in the conversation, none given, and no
    retrieval index to take the best match from."""


Segment = Union[Text, GeneratedImage, RetrievedImage, EditedImage]
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


def edit_sources(conversations: list[list[InputItem]], given: Any, batched: bool) -> list[EditSource | None]:
    """The picture each conversation's edits start from: ``given`` (one for a conversation, a list of one per
    conversation for a batch; each a ``PIL.Image``, an image path or an ``EditSource``; None: not given), else
    the conversation's last picture ("attached picture N", N counting its pictures), else None (an edit then
    starts from the best retrieved image). Images are opened where an edit needs them."""
    from PIL import Image

    if given is None:
        given = [None] * len(conversations)
    elif batched:
        if not isinstance(given, (list, tuple)) or len(given) != len(conversations):
            raise TypeError(f"edit_source: a batch of {len(conversations)} conversations takes a list of as many "
                            "pictures (None where a conversation has none to give)")
    else:
        given = [given]
    out = []
    for c, (conv, source) in enumerate(zip(conversations, given)):
        if isinstance(source, Image.Image):
            source = EditSource(source, place="the given picture")
        elif isinstance(source, os.PathLike):
            source = EditSource(Path(source), place=f"the given picture {Path(source).name}")
        elif source is not None and not isinstance(source, EditSource):
            raise TypeError(f"edit_source{f' {c}' if batched else ''}: expected a PIL.Image, an image path or an "
                            f"EditSource, got {type(source).__name__}")
        if source is None:
            pictures = [item for item in conv if isinstance(item, (Path, Image.Image))]
            if pictures:
                source = EditSource(pictures[-1], place=f"attached picture {len(pictures)}")
        out.append(source)
    return out
