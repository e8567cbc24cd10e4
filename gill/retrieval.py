"""Image retrieval: exact search over the image-side retrieval embeddings of a corpus, with provenance.

``EmbeddingIndex`` holds L2-normalised embeddings in memory and searches them exactly (a matrix product);
scores are ``exp(logit_scale) * cosine`` as in the original. Images already in the conversation are
excluded by content hash (sha256 of the file's bytes) or by source path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageRecord:
    id: int
    source: str  # local path or URL
    caption: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    license: str = ""


@dataclass
class Hit:
    record: ImageRecord
    score: float  # exp(logit_scale) * cosine similarity


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_local_image(record: ImageRecord) -> Any:
    """Default loader: the record's source as a local file. URLs are not fetched here (no hidden network
    calls on the hot path); give the index a loader that fetches them, with a timeout, if you want that."""
    from PIL import Image

    if "://" in record.source:
        raise FileNotFoundError(f"image {record.id} is a URL ({record.source}); this index has no URL loader")
    with Image.open(record.source) as im:
        return im.convert("RGB")


class EmbeddingIndex:
    """Exact inner-product search over an in-memory corpus of image embeddings."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        records: Sequence[ImageRecord],
        image_loader: Callable[[ImageRecord], Any] = open_local_image,
    ):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(records):
            raise ValueError(
                f"embeddings must be (len(records), dim) = ({len(records)}, D), got {tuple(embeddings.shape)}"
            )
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.records = list(records)
        self.image_loader = image_loader
        self._by_key: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            for key in (r.sha256, r.source):
                if key:
                    self._by_key.setdefault(key, []).append(i)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.records)

    def search(
        self,
        queries: torch.Tensor,
        k: int = 1,
        exclude: Sequence[set[str]] | None = None,
        scale: float = 1.0,
    ) -> list[list[Hit]]:
        """Top-k records for each query (N, D). ``exclude[i]`` holds sha256 hashes or sources that row i
        must not return. Scores are ``scale * cosine``."""
        if queries.shape[-1] != self.dim:
            raise ValueError(f"queries are {queries.shape[-1]}-d but the index holds {self.dim}-d embeddings")
        q = F.normalize(queries.float().to(self.embeddings.device), dim=-1)
        scores = q @ self.embeddings.T * scale  # (N, M)
        if exclude:
            for row, keys in enumerate(exclude):
                idx = [i for key in keys for i in self._by_key.get(key, [])]
                if idx:
                    scores[row, idx] = float("-inf")
        k = min(k, len(self.records))
        top = torch.topk(scores, k, dim=-1)
        hits = []
        for vals, ids in zip(top.values.tolist(), top.indices.tolist()):
            hits.append([Hit(self.records[i], v) for v, i in zip(vals, ids) if v != float("-inf")])
        return hits

    def load_image(self, record: ImageRecord) -> Any:
        return self.image_loader(record)


def image_keys(item: Any) -> set[str]:
    """Keys by which a conversation image is excluded from retrieval: its path and file hash."""
    path = item if isinstance(item, (str, Path)) else getattr(item, "filename", "") or ""
    if not path or not Path(path).is_file():
        return set()
    return {str(path), file_sha256(path)}
