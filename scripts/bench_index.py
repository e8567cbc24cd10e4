"""Approximate against exact search on synthetic retrieval embeddings: recall@k and query time, one run.

    python scripts/bench_index.py                                  # 100k x 256, IVF (the build's defaults)
    python scripts/bench_index.py --count 3300000 --types flat ivf ivfpq hnsw   # CC3M size

Vectors are drawn like image embeddings: a mixture of clusters (CLIP spaces are clustered, uniform random
points are not what a corpus looks like), L2-normalised; queries are fresh draws from the same mixture.
``--clusters 0`` shows the worst case, isotropic points.
Index types and parameters are those ``python -m index.build`` uses (``index.store.build_faiss``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def synthetic(count: int, dim: int, queries: int, clusters: int = 2000, spread: float = 0.35, seed: int = 0):
    """``clusters=0`` draws isotropic Gaussian points instead: no structure at all, the worst case for
    any partitioning index (IVF recall collapses there; exact search is the honest choice)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(clusters, 1), dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        noise = rng.normal(size=(n, dim)).astype(np.float32)
        x = noise if clusters == 0 else centers[rng.integers(0, clusters, n)] + spread * noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return np.ascontiguousarray(draw(count)), np.ascontiguousarray(draw(queries))


def run(count: int = 100_000, dim: int = 256, n_queries: int = 1000, k: int = 10, types=("ivf",), seed: int = 0,
        nprobe: int | None = None, clusters: int = 2000) -> dict:
    from index.store import build_faiss

    xb, xq = synthetic(count, dim, n_queries, clusters=clusters, seed=seed)
    results = {"count": count, "dim": dim, "queries": n_queries, "k": k}
    exact, _ = build_faiss(xb, "flat")
    t = time.perf_counter()
    _, truth = exact.search(xq, k)
    exact_ms = (time.perf_counter() - t) / n_queries * 1e3
    results["flat"] = {"ms_per_query": exact_ms, "recall": 1.0, "bytes": int(exact.ntotal * dim * 4)}
    for index_type in types:
        t0 = time.perf_counter()
        index, params = build_faiss(xb, index_type, nprobe=nprobe)
        build_s = time.perf_counter() - t0
        t = time.perf_counter()
        _, found = index.search(xq, k)
        ms = (time.perf_counter() - t) / n_queries * 1e3
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
        import faiss

        size = len(faiss.serialize_index(index))
        results[index_type] = {"ms_per_query": ms, "recall": recall, "speedup_vs_flat": exact_ms / ms,
                               "build_s": build_s, "bytes": size, "params": params}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--types", nargs="+", default=["ivf"], choices=["ivf", "ivfpq", "hnsw"])
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--clusters", type=int, default=2000, help="mixture components; 0 = isotropic (worst case)")
    args = p.parse_args(argv)
    r = run(args.count, args.dim, args.queries, args.k, tuple(args.types), nprobe=args.nprobe, clusters=args.clusters)
    print(f"{r['count']:,} x {r['dim']} vectors, {r['queries']} queries, recall@{r['k']} against exact search")
    print(f"{'type':6s} {'recall':>7s} {'ms/query':>9s} {'exact/this':>10s} {'size MB':>8s}  params")
    for name in ["flat", *args.types]:
        x = r[name]
        print(f"{name:6s} {x['recall']:7.3f} {x['ms_per_query']:9.3f} {x.get('speedup_vs_flat', 1.0):10.1f} "
              f"{x['bytes'] / 2**20:8.1f}  {json.dumps(x.get('params', {}))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
