"""Image retrieval: search over the image-side retrieval embeddings of a corpus, with provenance.

``EmbeddingIndex`` holds L2-normalised embeddings in memory and searches them exactly (a matrix product).
``FaissIndex`` reads an index directory written by ``python -m index.build`` (format below). Both score
``exp(logit_scale) * cosine`` as the original, and exclude images already in the conversation by content
hash (sha256 of the file's bytes) or by source path. ``ImageEmbedder`` is the image side of a GILL
model alone (vision encoder + retrieval projection), for building indexes without loading the LM
(``gill.loading.load_image_embedder`` reads one from a model). ``read_original_embeddings`` reads the
original release's ``cc3m_embeddings_urls.npy`` with a restricted unpickler.

Index directory (``FORMAT_VERSION`` 1):
- ``manifest.json``: format_version, dim, metric ("inner_product" over L2-normalised vectors), count,
  index_type ("flat", "ivf", "ivfpq", "hnsw"), index_params, fingerprint (of the model's image-retrieval
  projection, ``projection_fingerprint``), model (name or path it was built with);
- ``index.faiss``: the FAISS index; vector i is the image with id i;
- ``metadata.sqlite``: table ``images(id, source, caption, sha256, width, height, license)``;
- ``report.json`` (build counts, skipped items) and ``work/`` (resumable build state) are the builder's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
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


# ---- index directories ---------------------------------------------------------------------------------

INDEX_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"
METADATA_NAME = "metadata.sqlite"


class IndexMismatchError(ValueError):
    """An index built with another model's image-retrieval projection."""


@dataclass
class IndexManifest:
    dim: int
    count: int
    index_type: str
    fingerprint: str
    model: str = ""
    metric: str = "inner_product"
    index_params: dict[str, Any] = field(default_factory=dict)
    format_version: int = INDEX_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: str | os.PathLike) -> IndexManifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no index manifest (is this an index directory?)") from None
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown manifest field(s) {unknown}")
        manifest = cls(**data)
        if manifest.format_version > INDEX_FORMAT_VERSION:
            raise ValueError(f"{path}: index format {manifest.format_version} is newer than this library reads")
        return manifest


def projection_fingerprint(projection: torch.nn.Linear) -> str:
    """sha256 of the image-retrieval projection's weight and bias (as float32), which fixes the space
    an index's vectors live in."""
    h = hashlib.sha256()
    for t in (projection.weight, projection.bias):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_records(db: sqlite3.Connection, ids: Sequence[int]) -> dict[int, ImageRecord]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"SELECT id, source, caption, sha256, width, height, license FROM images WHERE id IN ({marks})", list(ids)
    ).fetchall()
    return {r[0]: ImageRecord(*r) for r in rows}


class FaissIndex:
    """An index directory opened for search (same interface as ``EmbeddingIndex``)."""

    def __init__(self, path: str | os.PathLike, image_loader: Callable[[ImageRecord], Any] = open_local_image):
        import faiss

        self.path = Path(path)
        self.manifest = IndexManifest.read(self.path / MANIFEST_NAME)
        self.index = faiss.read_index(str(self.path / INDEX_NAME))
        if self.index.ntotal != self.manifest.count or self.index.d != self.manifest.dim:
            raise ValueError(
                f"{self.path}: {INDEX_NAME} holds {self.index.ntotal} vectors of dim {self.index.d}, the manifest "
                f"says {self.manifest.count} of dim {self.manifest.dim}"
            )
        for name, value in self.manifest.index_params.items():
            if name == "nprobe":
                faiss.extract_index_ivf(self.index).nprobe = value
            elif name == "ef_search":
                self.index.hnsw.efSearch = value
        self.db = sqlite3.connect(f"file:{self.path / METADATA_NAME}?mode=ro", uri=True, check_same_thread=False)
        self.image_loader = image_loader

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    def _excluded_ids(self, keys: set[str]) -> set[int]:
        if not keys:
            return set()
        marks = ",".join("?" * len(keys))
        rows = self.db.execute(
            f"SELECT id FROM images WHERE sha256 IN ({marks}) OR source IN ({marks})", [*keys, *keys]
        ).fetchall()
        return {r[0] for r in rows}

    def search(
        self, queries: torch.Tensor, k: int = 1, exclude: Sequence[set[str]] | None = None, scale: float = 1.0
    ) -> list[list[Hit]]:
        import numpy as np

        if queries.shape[-1] != self.dim:
            raise ValueError(f"queries are {queries.shape[-1]}-d but the index holds {self.dim}-d embeddings")
        q = F.normalize(queries.detach().float().cpu(), dim=-1).numpy().astype(np.float32)
        excluded = [self._excluded_ids(exclude[i]) if exclude else set() for i in range(len(q))]
        k_search = min(k + max((len(e) for e in excluded), default=0), len(self))
        scores, ids = self.index.search(q, k_search)
        records = read_records(self.db, sorted({int(i) for i in ids.ravel() if i >= 0}))
        hits = []
        for row in range(len(q)):
            kept = [Hit(records[int(i)], float(s) * scale) for s, i in zip(scores[row], ids[row])
                    if i >= 0 and int(i) not in excluded[row]]
            hits.append(kept[:k])
        return hits

    def load_image(self, record: ImageRecord) -> Any:
        """The record's image; a relative local source is read from inside the index directory."""
        if "://" not in record.source and not os.path.isabs(record.source):
            record = replace(record, source=str(self.path / record.source))
        return self.image_loader(record)


def open_index(
    path: str | os.PathLike,
    fingerprint: str | None = None,
    *,
    allow_mismatch: bool = False,
    image_loader: Callable[[ImageRecord], Any] = open_local_image,
) -> FaissIndex:
    """Open an index directory; refuse it if it was built with another image-retrieval projection than
    the one whose ``fingerprint`` is given (``allow_mismatch=True`` overrides)."""
    index = FaissIndex(path, image_loader=image_loader)
    if fingerprint is not None and index.manifest.fingerprint != fingerprint and not allow_mismatch:
        raise IndexMismatchError(
            f"{path} was built with another model's image-retrieval projection (index fingerprint "
            f"{index.manifest.fingerprint[:16]}..., built by {index.manifest.model or 'an unnamed model'}; this model "
            f"{fingerprint[:16]}...). Rebuild it with this model, or pass allow_mismatch=True to use it anyway."
        )
    return index


# ---- the image side of a model ----------------------------------------------------------------------


class ImageEmbedder:
    """Vision encoder + image-retrieval projection: images -> retrieval embeddings (not normalised)."""

    def __init__(self, vision: torch.nn.Module, projection: torch.nn.Linear, image_processor: Any, name: str = ""):
        self.vision = vision.eval()
        self.projection = projection.eval()
        self.image_processor = image_processor
        self.name = name

    @property
    def fingerprint(self) -> str:
        return projection_fingerprint(self.projection)

    @property
    def dim(self) -> int:
        return self.projection.out_features

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> (N, dim) float32 on the CPU."""
        param = next(self.vision.parameters())
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pooled = self.vision(pixel_values=pixels.to(param.device, param.dtype)).pooler_output
        return self.projection(pooled.to(self.projection.weight.dtype)).float().cpu()


def image_keys(item: Any) -> set[str]:
    """Keys by which a conversation image is excluded from retrieval: its path and file hash."""
    path = item if isinstance(item, (str, Path)) else getattr(item, "filename", "") or ""
    if not path or not Path(path).is_file():
        return set()
    return {str(path), file_sha256(path)}


# ---- the original release's embeddings file ---------------------------------------------------------

# (module, name) pairs a numpy-array pickle needs, across numpy 1.x and 2.x.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "str"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("_codecs", "encode"),
}


def read_original_embeddings(path: str | os.PathLike) -> tuple[list[str], Any]:
    """``cc3m_embeddings_urls.npy`` (despite its name a pickle of ``{'paths': [urls], 'embeddings': [vectors]}``)
    -> (urls, float32 array (N, D)). Only lists, dicts, tuples, strings, numbers and numpy arrays are
    admitted: a pickle that asks for anything else (a function to call, another class) is refused."""
    import pickle

    import numpy as np

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in _PICKLE_ALLOWED:
                raise pickle.UnpicklingError(f"refused: the pickle asks for {module}.{name}, which is not data")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        try:
            data = Restricted(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: {e or 'truncated file'}") from None
    if not isinstance(data, dict) or "paths" not in data or "embeddings" not in data:
        raise ValueError(f"{path}: expected a dict with 'paths' and 'embeddings'")
    paths = [str(p) for p in data["paths"]]
    vectors = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in data["embeddings"]])
    if len(paths) != len(vectors):
        raise ValueError(f"{path}: {len(paths)} paths but {len(vectors)} embeddings")
    return paths, vectors
