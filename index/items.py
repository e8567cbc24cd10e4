"""What every index source yields: ``Item`` (one image with its caption and provenance, or the reason it is
skipped), ``SourceError`` (a source that cannot be read at all), and the helpers the folder, table and shard
readers share (``index.sources``, ``index.shards``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Item:
    order: tuple[int, int]  # (shard, position): the global order of the source
    uid: str  # stable identity: relative path, URL, or shard#key
    source: str  # what the index records as provenance (path or URL)
    caption: str = ""
    license: str = ""
    data: bytes | None = None
    error: str | None = None  # the item is skipped and counted, with this reason
    warning: str | None = None  # the item is kept, and this problem is counted (a bad caption)


class SourceError(ValueError):
    """A source that cannot be read at all; the message names it."""


Skip = Callable[[str], bool]


def unique_uids() -> Callable[[str], str]:
    """A function giving each uid of one source once: a uid seen before comes back as ``uid~2``, ``uid~3``..."""
    seen: set[str] = set()

    def unique(uid: str) -> str:
        new, n = uid, 1
        while new in seen:
            n += 1
            new = f"{uid}~{n}"
        seen.add(new)
        return new

    return unique


def size_text(n: int) -> str:
    """A byte count for messages: "12.5 MB", "1.2 GB"."""
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def caption_text(data: bytes, what: str) -> tuple[str, str | None]:
    """Caption bytes -> (text, None), or ("", warning) where they are not UTF-8 (a BOM is allowed)."""
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as e:
        return "", f"bad caption: {what} is not UTF-8 text (byte {e.start}); kept with an empty caption"
