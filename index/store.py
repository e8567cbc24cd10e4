"""Build state and the final index directory.

Each rank writes ``work/rank-R.sqlite``: one row per item it has read (embedded, duplicate or failed),
with the embedding for embedded ones, committed one batch per transaction. An item is known by its source
(the k-th source added to the index) and its uid within it, so ``x.png`` of a second folder is another
item than ``x.png`` of the first. A killed build therefore
loses at most the batch in flight, and a resumed one skips every committed item: no image is embedded
twice and none is lost. ``finalize`` merges the ranks in source order, drops duplicates by content hash
(first one wins), and writes a new *generation*: ``index-GEN.faiss`` and ``metadata-GEN.sqlite`` under
names no other finalize uses, then ``manifest.json`` naming them (the commit point: one rename), then
``report.json``, and only then removes the files of the generation it replaced. A build or an update
killed at any point leaves the previous index whole and readable; two finalizing at once never write
one temporary file (the last manifest wins, the other's files are removed by a later finalize).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gill.io import atomic_path, atomic_write_text
from gill.retrieval import MANIFEST_NAME, IndexManifest, file_sha256, sign_source_roots, source_roots_signed

REPORT_NAME = "report.json"
STALE_AFTER_S = 3600.0  # an unnamed generation file this old is a crashed or outraced finalize's: removed
SOURCE_STRIDE = 1_000_000  # order key of the k-th source added to an index: shard + k * SOURCE_STRIDE

COLUMNS = "src, uid, shard, pos, status, reason, source, caption, license, sha256, width, height, vector"
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    src INTEGER NOT NULL, uid TEXT NOT NULL, shard INTEGER, pos INTEGER, status TEXT, reason TEXT,
    source TEXT, caption TEXT, license TEXT, sha256 TEXT, width INTEGER, height INTEGER, vector BLOB,
    PRIMARY KEY (src, uid)
);
CREATE INDEX IF NOT EXISTS items_sha ON items(sha256);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
# a work file from before items were keyed by their source: the source number is in the order key
MIGRATE_V1 = f"""
BEGIN;
ALTER TABLE items RENAME TO items_v1;
DROP INDEX IF EXISTS items_sha;
{SCHEMA}
INSERT INTO items ({COLUMNS}) SELECT shard / {SOURCE_STRIDE}, {COLUMNS.split(", ", 1)[1]} FROM items_v1;
DROP TABLE items_v1;
COMMIT;
"""


@dataclass
class Row:
    uid: str
    shard: int
    pos: int
    status: str  # "ok", "duplicate" or "failed"
    reason: str = ""
    source: str = ""
    caption: str = ""
    license: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    vector: bytes | None = None
    src: int = 0  # which source of the index (its number in the order they were added)


class BuildStateError(ValueError):
    """A build's work file that cannot be read; the message names it."""


class IndexTypeError(ValueError):
    """An index type the build's vectors are too few to train; the message says what to choose instead."""


class WorkDB:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        try:
            columns = [r[1] for r in self.db.execute("PRAGMA table_info(items)")]
            self.db.executescript(MIGRATE_V1 if columns and "src" not in columns else SCHEMA)
        except sqlite3.OperationalError:
            self.db.close()
            raise  # a full disk or a locked file: not the file's fault, reported by the caller
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise BuildStateError(f"{path}: not a readable build state database ({e}); remove it (and rebuild "
                                  "what it held) or use a new index directory") from None

    def done_uids(self, src: int | None = None) -> set[str]:
        """The uids of source ``src`` read so far (every source's where None)."""
        if src is None:
            return {r[0] for r in self.db.execute("SELECT uid FROM items")}
        return {r[0] for r in self.db.execute("SELECT uid FROM items WHERE src = ?", (src,))}

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM items WHERE status = 'ok'")}

    def commit(self, rows: list[Row]) -> None:
        with self.db:  # one transaction
            self.db.executemany(
                f"INSERT OR REPLACE INTO items ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.src, r.uid, r.shard, r.pos, r.status, r.reason, r.source, r.caption, r.license, r.sha256,
                  r.width, r.height, r.vector) for r in rows],
            )

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()


def rank_dbs(work: Path) -> list[Path]:
    return sorted(work.glob("rank-*.sqlite"))


def stored_source(source: str, out: Path) -> str:
    """A local image inside the index directory is recorded relative to it, so the directory can be moved
    (or shipped) together with its images; anything else is recorded as given."""
    if "://" in source:
        return source
    try:
        return Path(source).resolve().relative_to(out.resolve()).as_posix()
    except (ValueError, OSError):
        return source


def source_roots(folders: Iterable[str], out: Path) -> list[str]:
    """The fewest of ``folders`` (symlinks resolved) that hold all of them, less those inside ``out``: what
    the manifest records (signed) as the folders a reader may load hits from."""
    out_real = os.path.realpath(out)
    dirs = {os.path.realpath(d) for d in folders}
    kept: set[str] = set()
    for d in sorted(dirs, key=len):  # ancestors first
        p, covered = d, False
        while not covered:
            covered = p in kept or p == out_real
            if os.path.dirname(p) == p:
                break
            p = os.path.dirname(p)
        if not covered:
            kept.add(d)
    return sorted(kept)


def merged_rows(work: Path) -> list[tuple]:
    """All ranks' rows in source order: (shard, pos, uid, status, reason, source, caption, license, sha256,
    width, height, vector)."""
    rows = []
    for path in rank_dbs(work):
        db = sqlite3.connect(path)
        rows.extend(db.execute(
            "SELECT shard, pos, uid, status, reason, source, caption, license, sha256, width, height, vector FROM items"
        ).fetchall())
        db.close()
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return rows


# ---- index types ------------------------------------------------------------------------------------

def choose_index_type(count: int) -> str:
    """Exact search up to 200k vectors (a few ms per query on a CPU); IVF beyond."""
    return "flat" if count <= 200_000 else "ivf"


def default_nlist(count: int) -> int:
    return int(min(65536, max(16, 4 * math.sqrt(count))))


PQ_CODES = 256  # ivfpq's codes per sub-vector (8 bits): its k-means needs at least this many vectors


def build_faiss(vectors: np.ndarray, index_type: str, *, nlist: int | None = None, nprobe: int | None = None,
                pq_m: int | None = None, hnsw_m: int = 32, ef_search: int = 128, train_size: int = 200_000,
                seed: int = 0):
    """A FAISS inner-product index over L2-normalised ``vectors`` (N, D) float32; returns (index, params).

    IVF quantizers are trained on a seeded sample of at most ``train_size`` vectors. With faiss-gpu
    installed and a GPU present, training and adding run on the GPU; the index is saved for the CPU.
    """
    import faiss

    n, d = vectors.shape
    params: dict[str, int] = {}
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type in ("ivf", "ivfpq"):
        nlist = nlist or default_nlist(n)
        nlist = max(1, min(nlist, n))
        quantizer = faiss.IndexFlatIP(d)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = pq_m or max(1, d // 4)  # 64 bytes per 256-d vector
            if d % m:
                raise ValueError(f"ivfpq: pq_m={m} must divide the dimension {d}")
            if n < PQ_CODES:  # faiss would stop with a RuntimeError from its k-means
                raise IndexTypeError(f"index type ivfpq trains {PQ_CODES} codes per sub-vector and needs at least "
                                     f"{PQ_CODES} images; this index has {n}: choose flat, ivf or hnsw (or auto)")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            params["pq_m"] = m
        rng = np.random.default_rng(seed)
        train_size = max(train_size, 39 * nlist)  # faiss wants >= 39 points per list
        sample = vectors if n <= train_size else vectors[np.sort(rng.choice(n, train_size, replace=False))]
        trainer = index
        if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # pragma: no cover - needs faiss-gpu
            trainer = faiss.index_cpu_to_all_gpus(index)
        trainer.train(sample)
        if trainer is not index:  # pragma: no cover
            index = faiss.index_gpu_to_cpu(trainer)
        params["nlist"] = nlist
        params["nprobe"] = nprobe or max(1, min(nlist, max(16, nlist // 32)))
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        params.update(hnsw_m=hnsw_m, ef_search=ef_search)
    else:
        raise ValueError(f"unknown index type {index_type!r}; choose flat, ivf, ivfpq or hnsw")
    if n:
        index.add(vectors)
    return index, params


def _current_manifest(out: Path) -> IndexManifest | None:
    try:
        return IndexManifest.read(out / MANIFEST_NAME)
    except (OSError, ValueError):  # none yet, or unreadable: this finalize replaces it
        return None


def _generation_names() -> tuple[str, str]:
    gen = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"index-{gen}.faiss", f"metadata-{gen}.sqlite"


def _remove_replaced(out: Path, previous: IndexManifest | None, current: IndexManifest) -> None:
    """Remove the replaced generation's files, and generation or temporary files no manifest names that
    are older than ``STALE_AFTER_S`` (left by a killed finalize, or by one that lost a race)."""
    keep = set(current.files.values())
    doomed = set(previous.files.values()) - keep if previous is not None else set()
    now = time.time()
    for pattern in ("index-*.faiss", "metadata-*.sqlite", ".index-*.tmp", ".metadata-*.tmp",
                    f".{MANIFEST_NAME}.*.tmp", f".{REPORT_NAME}.*.tmp", ".*.faiss.tmp", ".*.sqlite.tmp"):
        for p in out.glob(pattern):
            try:
                if p.name not in keep and now - p.stat().st_mtime > STALE_AFTER_S:
                    doomed.add(p.name)
            except OSError:
                pass
    for name in doomed:
        (out / name).unlink(missing_ok=True)


def trusted_roots(out: Path, previous: IndexManifest | None, vouched: Iterable[str]) -> list[str]:
    """The folders the new manifest records and signs: those this user vouches for now (``vouched``: the
    sources given on this command line) and those this user's key signed before. Never the folders rows
    of the work state name: an index received from someone else names whatever it likes there."""
    folders = list(vouched)
    if previous is not None and source_roots_signed(previous):
        folders += previous.source_roots
    return source_roots(folders, out)


def _write_faiss(index, path: Path) -> None:
    import faiss

    try:
        faiss.write_index(index, str(path))
    except RuntimeError as e:  # faiss reports a failed write (a full disk) as a RuntimeError
        raise OSError(errno.EIO, f"{path}: cannot write the FAISS index ({str(e).strip().splitlines()[-1]})") from None


def finalize(out: Path, *, dim: int, fingerprint: str, model: str, index_type: str | None = None,
             vouched_roots: Iterable[str] = (), **faiss_kwargs) -> dict:
    """Merge the ranks' work and write a new generation of the index directory (see the module's
    docstring). ``vouched_roots``: the folders this user's own sources read (``index.sources.local_roots``);
    they and the folders the previous manifest recorded under this user's signature are the ones a reader
    of the index may load hits' images from. Returns the report."""
    rows = merged_rows(out / "work")
    seen: set[str] = set()
    kept, duplicates, failed, bad_captions = [], [], [], []
    for r in rows:
        shard, pos, uid, status, reason, source, caption, lic, sha, w, h, vec = r
        if status == "failed":
            failed.append({"uid": uid, "reason": reason})
        elif status == "duplicate" or sha in seen:
            duplicates.append(uid)
        else:
            seen.add(sha)
            kept.append(r)
            if reason:  # kept with a problem: a caption that could not be read
                bad_captions.append({"uid": uid, "reason": reason})
    vectors = np.stack([np.frombuffer(r[11], dtype=np.float32) for r in kept]) if kept else np.zeros((0, dim), np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
    index_type = index_type or choose_index_type(len(kept))
    index, params = build_faiss(vectors, index_type, **faiss_kwargs)
    stored = [stored_source(r[5], out) for r in kept]

    previous = _current_manifest(out)
    index_name, metadata_name = _generation_names()
    hashes = {}
    with atomic_path(out / index_name) as p:
        _write_faiss(index, p)
        hashes["index"] = file_sha256(p)
    with atomic_path(out / metadata_name) as p:
        db = sqlite3.connect(p)
        db.executescript(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, source TEXT, caption TEXT, sha256 TEXT, width INTEGER, "
            "height INTEGER, license TEXT); CREATE INDEX images_sha ON images(sha256); "
            "CREATE INDEX images_source ON images(source);"
        )
        with db:
            db.executemany("INSERT INTO images VALUES (?,?,?,?,?,?,?)",
                           [(i, src, r[6], r[8], r[9], r[10], r[7]) for i, (src, r) in enumerate(zip(stored, kept))])
        db.close()
        hashes["metadata"] = file_sha256(p)
    roots = trusted_roots(out, previous, vouched_roots)
    manifest = IndexManifest(dim=dim, count=len(kept), index_type=index_type, fingerprint=fingerprint,
                             model=model, index_params=params, files={"index": index_name, "metadata": metadata_name},
                             file_sha256=hashes, source_roots=roots, roots_signature=sign_source_roots(roots))
    atomic_write_text(out / MANIFEST_NAME, manifest.to_json())  # the commit point
    kinds: dict[str, int] = {}
    for f in failed:
        kind = (f["reason"] or "unknown").split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    report = {
        "count": len(kept), "items_read": len(rows), "duplicates": len(duplicates), "failed": len(failed),
        "failed_by_kind": dict(sorted(kinds.items())), "bad_captions": len(bad_captions),
        "failures": failed, "bad_caption_items": bad_captions, "duplicate_uids": duplicates[:1000],
        "index_type": index_type, "index_params": params, "files": manifest.files,
    }
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    _remove_replaced(out, previous, manifest)
    return report
