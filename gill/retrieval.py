"""Image retrieval: search over the image-side retrieval embeddings of a corpus, with provenance.

``EmbeddingIndex`` holds L2-normalised embeddings in memory and searches them exactly (a matrix product).
``FaissIndex`` reads an index directory written by ``python -m index.build`` (format below). Both score
``exp(logit_scale) * cosine`` as the original, and exclude images already in the conversation by content
hash (sha256 of the file's bytes) or by source path. ``ImageEmbedder`` is the image side of a GILL
model alone (vision encoder + retrieval projection), for building indexes without loading the LM
(``gill.loading.load_image_embedder`` reads one from a model). ``read_original_embeddings`` reads the
original release's ``cc3m_embeddings_urls.npy`` with a restricted unpickler.

Index directories and their format: ``gill.index_format`` (the manifest, the files, the checks before a file
is trusted); where an index may read images from: ``gill.index_trust``; the original release's embeddings
file: ``gill.original_embeddings``. Their public names are importable from here too.

Every file of an index directory is checked when it is opened (``IndexFormatError`` names the one at fault),
and hits' local images are read only from inside the index directory or the build's own source folders
(``FaissIndex.image_path``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gill.images import check_image, open_image
from gill.index_format import (  # noqa: F401  (public names of the index format, importable from here)
    FAISS_FOURCC,
    INDEX_FORMAT_VERSION,
    INDEX_NAME,
    INDEX_TYPES,
    MANIFEST_NAME,
    METADATA_COLUMNS,
    METADATA_NAME,
    IndexFormatError,
    IndexManifest,
    IndexMismatchError,
    check_faiss_header,
    projection_fingerprint,
)
from gill.index_trust import KEY_FILE_ENV, SourceOutsideError, sign_source_roots, source_roots_signed  # noqa: F401
from gill.original_embeddings import read_original_embeddings  # noqa: F401


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
    if "://" in record.source:
        raise FileNotFoundError(f"image {record.id} is a URL ({record.source}); this index has no URL loader")
    return open_image(record.source)  # bounded size and aspect ratio; ImageError names the file


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


def read_records(db: sqlite3.Connection, ids: Sequence[int]) -> dict[int, ImageRecord]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"SELECT id, source, caption, sha256, width, height, license FROM images WHERE id IN ({marks})", list(ids)
    ).fetchall()
    return {r[0]: ImageRecord(*r) for r in rows}


class _Replaced(Exception):
    """The manifest changed while the files it named were being opened (a concurrent update)."""


class FaissIndex:
    """An index directory opened for search (same interface as ``EmbeddingIndex``).

    Opening checks every file: a manifest that is not JSON or has a field of the wrong type, an
    ``index.faiss`` that is corrupt, truncated or disagrees with the manifest, a ``metadata.sqlite`` that
    is not a database or holds another number of rows than the index holds vectors: each raises
    ``IndexFormatError`` naming the file. ``load_image`` reads local sources only from inside the index
    directory or a signed source root (see above) unless ``allow_outside`` or ``source_roots`` say more.
    """

    def __init__(self, path: str | os.PathLike, image_loader: Callable[[ImageRecord], Any] = open_local_image, *,
                 allow_outside: bool = False, source_roots: Sequence[str | os.PathLike] = ()):
        self.path = Path(path)
        self.image_loader = image_loader
        self.allow_outside = allow_outside
        for attempt in range(3):
            self.manifest = IndexManifest.read(self.path / MANIFEST_NAME)
            try:
                self.index = self._read_faiss()
                self.db = self._open_metadata()
                break
            except _Replaced:
                if attempt == 2:
                    raise IndexFormatError(self.path / MANIFEST_NAME, "kept changing while the index was opened; "
                                                                      "is an update running? try again") from None
        roots = [os.path.realpath(self.path)]
        if source_roots_signed(self.manifest):
            roots += self.manifest.source_roots
        roots += [os.path.realpath(r) for r in source_roots]
        self.image_roots = list(dict.fromkeys(roots))  # where load_image may read local images

    def _file(self, kind: str) -> Path:
        path = self.path / self.manifest.files[kind]
        if not path.is_file():
            try:
                if IndexManifest.read(self.path / MANIFEST_NAME) != self.manifest:
                    raise _Replaced
            except (OSError, ValueError):
                pass
            what = "FAISS index" if kind == "index" else "metadata table"
            raise IndexFormatError(path, f"missing; the manifest names it as the index's {what}")
        return path

    def _check_hash(self, kind: str, path: Path) -> None:
        """A file whose content is not the one the manifest recorded (swapped for another index's file of
        the same size, or changed in place) is refused."""
        expected = self.manifest.file_sha256.get(kind)
        if expected and file_sha256(path) != expected:
            what = "FAISS index" if kind == "index" else "metadata table"
            raise IndexFormatError(path, f"its content is not the {what} this manifest was written with (sha256 "
                                         "differs); was it replaced by another index's file? rebuild the index or "
                                         "restore the file")

    def _read_faiss(self) -> Any:
        import faiss

        m, path = self.manifest, self._file("index")
        check_faiss_header(path, m)  # sizes the file claims checked against its length before faiss allocates
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as e:
            raise IndexFormatError(path, f"not a readable FAISS index, corrupt or truncated ({e})") from None
        if index.ntotal != m.count or index.d != m.dim:
            raise IndexFormatError(path, f"holds {index.ntotal} vectors of dim {index.d}; the manifest says "
                                         f"{m.count} of dim {m.dim}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFormatError(path, "is not an inner-product index; expected metric inner_product")
        for name, value in m.index_params.items():
            if name == "nprobe":
                try:
                    faiss.extract_index_ivf(index).nprobe = value
                except RuntimeError:
                    raise IndexFormatError(path, f"is not an IVF index, but the manifest's index_type is "
                                                 f"{m.index_type!r} with nprobe") from None
            elif name == "ef_search":
                if not hasattr(index, "hnsw"):
                    raise IndexFormatError(path, f"is not an HNSW index, but the manifest's index_type is "
                                                 f"{m.index_type!r} with ef_search")
                index.hnsw.efSearch = value
        self._check_hash("index", path)
        return index

    def _open_metadata(self) -> sqlite3.Connection:
        path, count = self._file("metadata"), self.manifest.count
        db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        try:
            columns = {r[1]: (r[2].upper(), r[5]) for r in db.execute("PRAGMA table_info(images)")}
            if set(METADATA_COLUMNS) - set(columns) or columns["id"] != ("INTEGER", 1):
                raise IndexFormatError(path, f"has no table images({', '.join(METADATA_COLUMNS)}) with an INTEGER "
                                             f"PRIMARY KEY id; found columns {sorted(columns)}")
            n, lo, hi = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM images").fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            raise IndexFormatError(path, f"not a readable SQLite database, corrupt or truncated ({e}); expected "
                                         "the index's metadata table") from None
        except IndexFormatError:
            db.close()
            raise
        if n != count or (n and (lo, hi) != (0, n - 1)):
            db.close()
            span = f" (ids {lo}..{hi})" if n else ""
            raise IndexFormatError(path, f"has {n} image rows{span}; the index holds {count} vectors, one row "
                                         f"per vector with ids 0..{count - 1} expected")
        try:
            self._check_hash("metadata", path)
        except IndexFormatError:
            db.close()
            raise
        return db

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    @contextlib.contextmanager
    def _reading_metadata(self):
        """A metadata table that breaks after opening (a disk error, a file replaced) named, as at open."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(self.path / self.manifest.files["metadata"], f"unreadable ({e})") from None

    def _excluded_ids(self, keys: set[str]) -> set[int]:
        if not keys:
            return set()
        marks = ",".join("?" * len(keys))
        with self._reading_metadata():
            rows = self.db.execute(f"SELECT id FROM images WHERE sha256 IN ({marks}) OR source IN ({marks})",
                                   [*keys, *keys]).fetchall()
        return {r[0] for r in rows}

    def search(
        self, queries: torch.Tensor, k: int = 1, exclude: Sequence[set[str]] | None = None, scale: float = 1.0
    ) -> list[list[Hit]]:
        import numpy as np

        if queries.shape[-1] != self.dim:
            raise ValueError(f"queries are {queries.shape[-1]}-d but the index holds {self.dim}-d embeddings")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = F.normalize(queries.detach().float().cpu(), dim=-1).numpy().astype(np.float32)
        excluded = [self._excluded_ids(exclude[i]) if exclude else set() for i in range(len(q))]
        k_search = min(k + max((len(e) for e in excluded), default=0), len(self))
        if k_search == 0:
            return [[] for _ in range(len(q))]
        scores, ids = self.index.search(q, k_search)
        with self._reading_metadata():
            records = read_records(self.db, sorted({int(i) for i in ids.ravel() if i >= 0}))
        hits = []
        for row in range(len(q)):
            kept = [Hit(records[int(i)], float(s) * scale) for s, i in zip(scores[row], ids[row])
                    if i >= 0 and int(i) not in excluded[row] and int(i) in records]
            hits.append(kept[:k])
        return hits

    def image_path(self, source: str) -> Path:
        """The file a local ``source`` names (relative ones are read from the index directory), refused with
        ``SourceOutsideError`` where it (symlinks followed) leaves the folders this index may read."""
        from gill.io import inside

        try:
            target = Path(os.path.realpath(self.path / source))  # an absolute source replaces the index path
        except ValueError as e:  # e.g. an embedded NUL
            raise SourceOutsideError(f"{self.path}: image source {source!r} is not a path ({e})") from None
        if self.allow_outside:
            return target
        for root in self.image_roots:
            try:
                return inside(root, target, what="image source")
            except ValueError:
                continue
        raise SourceOutsideError(
            f"{self.path}: image source {source!r} is outside the index directory"
            + (" and the source folders its build recorded" if len(self.image_roots) > 1 else "")
            + "; it is not read (pass allow_outside=True, or source_roots=[FOLDER] for a folder you trust)")

    def load_image(self, record: ImageRecord) -> Any:
        """The record's image. A relative local source is read from inside the index directory; no local
        source is read from outside the folders this index may read (``image_path``)."""
        if "://" not in record.source:
            record = replace(record, source=str(self.image_path(record.source)))
        return self.image_loader(record)


def open_index(
    path: str | os.PathLike,
    fingerprint: str | None = None,
    *,
    allow_mismatch: bool = False,
    image_loader: Callable[[ImageRecord], Any] = open_local_image,
    allow_outside: bool = False,
    source_roots: Sequence[str | os.PathLike] = (),
) -> FaissIndex:
    """Open an index directory; refuse it if it was built with another image-retrieval projection than
    the one whose ``fingerprint`` is given (``allow_mismatch=True`` overrides). ``allow_outside`` and
    ``source_roots``: where hits' local images may be read from beyond the index directory and its signed
    source roots (see ``FaissIndex``)."""
    index = FaissIndex(path, image_loader=image_loader, allow_outside=allow_outside, source_roots=source_roots)
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
        """PIL images -> (N, dim) float32 on the CPU. An image too large or too elongated to embed safely
        raises ``gill.images.ImageError`` (naming it by its position) before any resize."""
        param = next(self.vision.parameters())
        # checked before the processor's resize: a 60000x1 image would become a 13-megapixel-wide one
        images = [check_image(im, name=f"image {i}") for i, im in enumerate(images)]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pooled = self.vision(pixel_values=pixels.to(param.device, param.dtype)).pooler_output
        return self.projection(pooled.to(self.projection.weight.dtype)).float().cpu()


def image_keys(item: Any) -> set[str]:
    """Keys by which a conversation image is excluded from retrieval: its path and file hash."""
    path = item if isinstance(item, (str, Path)) else getattr(item, "filename", "") or ""
    if not path or not Path(path).is_file():
        return set()
    return {str(path), file_sha256(path)}
