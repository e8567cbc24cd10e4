"""Image retrieval: search over the image-side retrieval embeddings of a corpus, with provenance.

``EmbeddingIndex`` holds L2-normalised embeddings in memory and searches them exactly (a matrix product).
``FaissIndex`` reads an index directory written by ``python -m index.build`` (format below). Both score
``exp(logit_scale) * cosine`` as the original, and exclude images already in the conversation by content
hash (sha256 of the file's bytes) or by source path. ``ImageEmbedder`` is the image side of a GILL
model alone (vision encoder + retrieval projection), for building indexes without loading the LM
(``gill.loading.load_image_embedder`` reads one from a model). ``read_original_embeddings`` reads the
original release's ``cc3m_embeddings_urls.npy`` with a restricted unpickler.

Index directory (``INDEX_FORMAT_VERSION`` 3; format 1 and 2 directories are read too):
- ``manifest.json``: format_version, dim, metric ("inner_product" over L2-normalised vectors), count,
  index_type ("flat", "ivf", "ivfpq", "hnsw"), index_params, fingerprint (of the model's image-retrieval
  projection, ``projection_fingerprint``), model (name or path it was built with), files (the names of
  this generation's FAISS index and metadata table; format 1: ``index.faiss`` and ``metadata.sqlite``),
  file_sha256 (format 3: the sha256 of each of those two files, so a file swapped for another index's is
  refused even where its size and count agree), source_roots (the folders outside the directory of the
  sources the user named to the build and its updates, never folders the index's own rows name) and
  roots_signature;
- the FAISS index (``index-GENERATION.faiss``): vector i is the image with id i;
- the metadata table (``metadata-GENERATION.sqlite``): ``images(id, source, caption, sha256, width, height,
  license)``;
- ``report.json`` (build counts, skipped items) and ``work/`` (resumable build state) are the builder's.

The manifest is written last, in one rename: it is the commit point of a build or an update, so a reader
sees the previous generation's files or the new ones, never a mix. Every file is checked when the index
is opened (``IndexFormatError`` names the one at fault), and hits' local images are read only from
inside the index directory or the build's own source folders (``FaissIndex.image_path``).
"""

from __future__ import annotations

import contextlib
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

from gill.images import check_image, open_image


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

INDEX_FORMAT_VERSION = 3  # 2: ``files`` (the generation's file names), ``source_roots``, ``roots_signature``;
# 3: ``file_sha256``
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"  # format 1's fixed names; format 2 names each generation's files in the manifest
METADATA_NAME = "metadata.sqlite"
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
METADATA_COLUMNS = ("id", "source", "caption", "sha256", "width", "height", "license")
KEY_FILE_ENV = "GILL_INDEX_KEY_FILE"


class IndexMismatchError(ValueError):
    """An index built with another model's image-retrieval projection."""


class IndexFormatError(ValueError):
    """A file of an index directory that is missing, unreadable, corrupt or inconsistent with the others;
    ``path`` names the file and the message says what was expected."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = Path(path)


class SourceOutsideError(ValueError):
    """A hit's local source lies outside the folders an index may read images from."""


def _is_int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_file_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v and "\0" not in v


# field -> (check, what is expected), for reading a manifest written by anyone
_MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format_version": (_is_int(1), "an integer >= 1"),
    "dim": (_is_int(1), "an integer >= 1"),
    "count": (_is_int(0), "an integer >= 0"),
    "index_type": (lambda v: v in INDEX_TYPES, f"one of {', '.join(INDEX_TYPES)}"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "metric": (lambda v: v == "inner_product", '"inner_product"'),
    "index_params": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(1)(x) for k, x in v.items()),
                     "an object of integers >= 1 (nlist, nprobe, pq_m, hnsw_m, ef_search)"),
    "files": (lambda v: isinstance(v, dict) and set(v) == {"index", "metadata"} and all(map(_is_file_name, v.values())),
              'an object {"index": FILE, "metadata": FILE} of file names inside the index directory'),
    "file_sha256": (lambda v: isinstance(v, dict) and set(v) == {"index", "metadata"}
                    and all(isinstance(h, str) and len(h) == 64 for h in v.values()),
                    'an object {"index": SHA256, "metadata": SHA256} of hex digests'),
    "source_roots": (lambda v: isinstance(v, list) and all(isinstance(r, str) and os.path.isabs(r) for r in v),
                     "a list of absolute folder paths"),
    "roots_signature": (lambda v: isinstance(v, str), "a string"),
}
_REQUIRED = ("dim", "count", "index_type", "fingerprint")


def _legacy_files() -> dict[str, str]:
    return {"index": INDEX_NAME, "metadata": METADATA_NAME}


@dataclass
class IndexManifest:
    dim: int
    count: int
    index_type: str
    fingerprint: str
    model: str = ""
    metric: str = "inner_product"
    index_params: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=_legacy_files)
    file_sha256: dict[str, str] = field(default_factory=dict)  # format 3; empty: not recorded (older formats)
    source_roots: list[str] = field(default_factory=list)
    roots_signature: str = ""
    format_version: int = INDEX_FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        if not data["file_sha256"]:
            del data["file_sha256"]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def read(cls, path: str | os.PathLike) -> IndexManifest:
        """Read and check a manifest: a file that is not JSON, lacks a field or has one of the wrong type
        raises ``IndexFormatError`` naming the file and the field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no index manifest (is this an index directory?)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise IndexFormatError(path, f"cannot read the index manifest ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IndexFormatError(path, f"not JSON ({e}); expected the index manifest, a JSON object") from None
        if not isinstance(data, dict):
            raise IndexFormatError(path, f"holds a JSON {type(data).__name__}; expected the index manifest, a JSON object")
        version = data.get("format_version", 1)
        if _is_int(1)(version) and version > INDEX_FORMAT_VERSION:
            raise IndexFormatError(path, f"index format {version} is newer than this library reads "
                                         f"(up to {INDEX_FORMAT_VERSION})")
        unknown = sorted(set(data) - set(_MANIFEST_FIELDS))
        if unknown:
            raise IndexFormatError(path, f"unknown manifest field(s) {unknown}")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise IndexFormatError(path, f"missing manifest field(s) {missing}")
        for name, value in data.items():
            check, expected = _MANIFEST_FIELDS[name]
            if not check(value):
                raise IndexFormatError(path, f"manifest field {name!r} is {value!r}; expected {expected}")
        return cls(**data)


def projection_fingerprint(projection: torch.nn.Linear) -> str:
    """sha256 of the image-retrieval projection's weight and bias (as float32), which fixes the space
    an index's vectors live in."""
    h = hashlib.sha256()
    for t in (projection.weight, projection.bias):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- where an index may read images from ------------------------------------------------------------
#
# An index records local images as paths; a shared index is data from someone else, and its metadata (or
# its manifest) could name any file: ``../../etc/passwd``, ``/home/you/private.jpg``. So a hit's local
# image is read only from inside the index directory, or from a folder the build recorded in the
# manifest's ``source_roots`` *and* signed with this user's key (an HMAC with a random key kept in
# ``~/.config/gill/index-key``, or the file ``$GILL_INDEX_KEY_FILE``): an index this user built from their
# own folders reads them, an index from elsewhere reads only what it carries. ``allow_outside=True``
# or ``source_roots=[...]`` (folders the caller trusts) open it up.


def _key_file() -> Path:
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gill" / "index-key"


def _read_key(create: bool = False) -> bytes | None:
    """This user's signing key (32 random bytes, mode 0600); None where there is none and it cannot be made."""
    import secrets

    from gill.io import unique_temp_name

    path = _key_file()
    try:
        key = path.read_bytes()
        return key if len(key) >= 32 else None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = unique_temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a secret: not the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        key = path.read_bytes()
        return key if len(key) >= 32 else None
    except OSError:
        return None


def _roots_mac(key: bytes, roots: Sequence[str]) -> str:
    import hmac

    return hmac.new(key, json.dumps(sorted(roots)).encode("utf-8"), "sha256").hexdigest()


def sign_source_roots(roots: Sequence[str]) -> str:
    """The signature a build stores beside its ``source_roots`` ("" for none, or where no key can be kept)."""
    if not roots:
        return ""
    key = _read_key(create=True)
    return _roots_mac(key, roots) if key is not None else ""


def source_roots_signed(manifest: IndexManifest) -> bool:
    """Whether this user's key signed the manifest's ``source_roots`` (so this user's build recorded them)."""
    import hmac

    if not manifest.source_roots or not manifest.roots_signature:
        return False
    key = _read_key()
    return key is not None and hmac.compare_digest(_roots_mac(key, manifest.source_roots), manifest.roots_signature)


# The FAISS file's own header (``faiss/impl/index_write.cpp``): a four-byte type, then d (int32), ntotal (int64),
# two int64 placeholders, is_trained (one byte) and the metric (int32; 37 bytes in all). faiss allocates what
# the file claims before reading it, so a 61-byte file claiming 750M vectors would cost gigabytes: the header
# is checked against the manifest and the file's length first.
FAISS_FOURCC = {"flat": b"IxFI", "ivf": b"IwFl", "ivfpq": b"IwPQ", "hnsw": b"IHNf"}
_FAISS_HEADER = 37


def _min_vector_bytes(manifest: IndexManifest) -> int:
    """The fewest bytes one stored vector takes in a file of this index type (a lower bound)."""
    d = manifest.dim
    if manifest.index_type == "ivfpq":
        return manifest.index_params.get("pq_m", 1) + 8  # the code and its id
    return 4 * d + (8 if manifest.index_type == "ivf" else 0)


def check_faiss_header(path: Path, manifest: IndexManifest) -> None:
    """Refuse (``IndexFormatError``) a FAISS file whose type, dimension or count is not the manifest's, or
    whose length cannot hold the vectors it claims, before faiss reads (and allocates) anything. For a
    flat index the length of its one array is checked exactly."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_FAISS_HEADER + 8)
    except OSError as e:
        raise IndexFormatError(path, f"cannot read the FAISS index ({e.strerror or e})") from None
    if len(head) < _FAISS_HEADER:
        raise IndexFormatError(path, f"not a readable FAISS index, corrupt or truncated ({size} bytes)")
    fourcc, d, ntotal = head[:4], *struct.unpack("<iq", head[4:16])
    expected = FAISS_FOURCC[manifest.index_type]
    if fourcc != expected:
        raise IndexFormatError(path, f"not a readable FAISS index of type {manifest.index_type!r}: it starts with "
                                     f"{fourcc!r}, expected {expected!r}")
    if ntotal != manifest.count or d != manifest.dim:
        raise IndexFormatError(path, f"holds {ntotal} vectors of dim {d}; the manifest says {manifest.count} of "
                                     f"dim {manifest.dim}")
    need = _FAISS_HEADER + ntotal * _min_vector_bytes(manifest)
    if manifest.index_type == "flat" and len(head) == _FAISS_HEADER + 8:
        (floats,) = struct.unpack("<Q", head[_FAISS_HEADER:])
        if floats != ntotal * d or size != _FAISS_HEADER + 8 + 4 * floats:
            raise IndexFormatError(path, f"not a readable FAISS index, corrupt or truncated: it claims {floats} "
                                         f"floats for {ntotal} vectors of dim {d} in {size} bytes")
    elif size < need:
        raise IndexFormatError(path, f"not a readable FAISS index, corrupt or truncated: {ntotal} vectors of dim "
                                     f"{d} need at least {need} bytes, the file has {size}")


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


# ---- the original release's embeddings file ---------------------------------------------------------

# (module, name) pairs a numpy-array pickle needs, across numpy 1.x and 2.x.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "str"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5's arrays
}


def _bounded(module: str, name: str, make: Callable[..., Any], limit: int) -> Callable[..., Any]:
    """``make`` refusing arguments that would make more than ``limit`` bytes out of a few: a pickle holds
    its data, so no allowed call may build more than the file is long (``bytearray(3_000_000_000)`` is
    36 bytes of pickle)."""
    import pickle

    def sized(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return abs(value)
        if isinstance(value, (tuple, list)):  # a shape
            total = 1
            for v in value:
                total *= sized(v) if isinstance(v, int) else 1
            return total
        return 0

    def call(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if sized(value) > limit:
                raise pickle.UnpicklingError(f"refused: the pickle asks {module}.{name} for {sized(value)} items, "
                                             f"more than the file's {limit} bytes could hold")
        return make(*args, **kwargs)

    return call


def read_original_embeddings(path: str | os.PathLike) -> tuple[list[str], Any]:
    """``cc3m_embeddings_urls.npy`` (despite its name a pickle of ``{'paths': [urls], 'embeddings': [vectors]}``)
    -> (urls, float32 array (N, D)). Only lists, dicts, tuples, strings, numbers and numpy arrays are
    admitted: a pickle that asks for anything else (a function to call, another class) is refused."""
    import pickle

    import numpy as np

    limit = max(os.path.getsize(path), 1 << 16)

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module = "builtins" if module == "__builtin__" else module  # protocol 2 names them the Python 2 way
            if (module, name) not in _PICKLE_ALLOWED:
                raise pickle.UnpicklingError(f"refused: the pickle asks for {module}.{name}, which is not data")
            found = super().find_class(module, name)
            if name == "ndarray":
                return found  # named as _reconstruct's argument; numpy checks its state's size against its shape
            return _bounded(module, name, found, limit)

    with open(path, "rb") as f:
        try:
            data = Restricted(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: {e or 'truncated file'}") from None
        except (TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError) as e:
            raise ValueError(f"{path}: not the original embeddings pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "paths" not in data or "embeddings" not in data:
        raise ValueError(f"{path}: expected a dict with 'paths' and 'embeddings'")
    paths = [str(p) for p in data["paths"]]
    vectors = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in data["embeddings"]])
    if len(paths) != len(vectors):
        raise ValueError(f"{path}: {len(paths)} paths but {len(vectors)} embeddings")
    return paths, vectors
