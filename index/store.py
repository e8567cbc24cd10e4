"""Build state and the final index directory.

Each rank writes ``work/rank-R.sqlite``: one row per item it has read (embedded, duplicate or failed),
with the embedding for embedded ones, committed one batch per transaction. A killed build therefore
loses at most the batch in flight, and a resumed one skips every committed item: no image is embedded
twice and none is lost. ``finalize`` merges the ranks in source order, drops duplicates by content hash
(first one wins), and writes ``index.faiss``, ``metadata.sqlite``, ``report.json`` and, last,
``manifest.json``, each atomically.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gill.retrieval import INDEX_NAME, MANIFEST_NAME, METADATA_NAME, IndexManifest

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    uid TEXT PRIMARY KEY, shard INTEGER, pos INTEGER, status TEXT, reason TEXT,
    source TEXT, caption TEXT, license TEXT, sha256 TEXT, width INTEGER, height INTEGER, vector BLOB
);
CREATE INDEX IF NOT EXISTS items_sha ON items(sha256);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
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


class WorkDB:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.executescript(SCHEMA)

    def done_uids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT uid FROM items")}

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM items WHERE status = 'ok'")}

    def commit(self, rows: list[Row]) -> None:
        with self.db:  # one transaction
            self.db.executemany(
                "INSERT OR REPLACE INTO items VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.uid, r.shard, r.pos, r.status, r.reason, r.source, r.caption, r.license, r.sha256,
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
    except ValueError:
        return source


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


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    write(tmp)
    os.replace(tmp, path)


def finalize(out: Path, *, dim: int, fingerprint: str, model: str, index_type: str | None = None,
             **faiss_kwargs) -> dict:
    """Merge the ranks' work and write the index directory. Returns the report."""
    import faiss

    rows = merged_rows(out / "work")
    seen: set[str] = set()
    kept, duplicates, failed = [], [], []
    for r in rows:
        shard, pos, uid, status, reason, source, caption, lic, sha, w, h, vec = r
        if status == "failed":
            failed.append({"uid": uid, "reason": reason})
        elif status == "duplicate" or sha in seen:
            duplicates.append(uid)
        else:
            seen.add(sha)
            kept.append(r)
    vectors = np.stack([np.frombuffer(r[11], dtype=np.float32) for r in kept]) if kept else np.zeros((0, dim), np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
    index_type = index_type or choose_index_type(len(kept))
    index, params = build_faiss(vectors, index_type, **faiss_kwargs)

    _atomic(out / INDEX_NAME, lambda p: faiss.write_index(index, str(p)))

    def write_db(p: Path) -> None:
        db = sqlite3.connect(p)
        db.executescript(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, source TEXT, caption TEXT, sha256 TEXT, width INTEGER, "
            "height INTEGER, license TEXT); CREATE INDEX images_sha ON images(sha256); "
            "CREATE INDEX images_source ON images(source);"
        )
        with db:
            db.executemany("INSERT INTO images VALUES (?,?,?,?,?,?,?)",
                           [(i, stored_source(r[5], out), r[6], r[8], r[9], r[10], r[7]) for i, r in enumerate(kept)])
        db.close()

    _atomic(out / METADATA_NAME, write_db)
    report = {
        "count": len(kept), "items_read": len(rows), "duplicates": len(duplicates), "failed": len(failed),
        "failures": failed, "duplicate_uids": duplicates[:1000], "index_type": index_type, "index_params": params,
    }
    _atomic(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    manifest = IndexManifest(dim=dim, count=len(kept), index_type=index_type, fingerprint=fingerprint,
                             model=model, index_params=params)
    _atomic(out / MANIFEST_NAME, lambda p: p.write_text(manifest.to_json()))
    return report
