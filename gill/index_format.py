"""The index directory format: its manifest, its files' names, the checks a reader makes before trusting
them, and the fingerprint that ties an index to the model that built it. (``gill.retrieval`` opens and
searches index directories; ``index.build`` and ``index.store`` write them.)

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

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INDEX_FORMAT_VERSION = 3  # 2: ``files`` (the generation's file names), ``source_roots``, ``roots_signature``;
# 3: ``file_sha256``
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"  # format 1's fixed names; format 2 names each generation's files in the manifest
METADATA_NAME = "metadata.sqlite"
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
METADATA_COLUMNS = ("id", "source", "caption", "sha256", "width", "height", "license")


class IndexMismatchError(ValueError):
    """An index built with another model's image-retrieval projection."""


class IndexFormatError(ValueError):
    """A file of an index directory that is missing, unreadable, corrupt or inconsistent with the others;
    ``path`` names the file and the message says what was expected."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = Path(path)


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

