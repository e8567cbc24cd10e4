"""Import the original release's CC3M embeddings (``cc3m_embeddings_urls.npy``) as an index directory.

    python -m index.import_original --embeddings cc3m_embeddings_urls.npy --model DIR --out cc3m-index

Despite its name the file is a Python pickle of ``{'paths': [urls], 'embeddings': [256-d vectors]}``. It
is read by a restricted unpickler that admits only lists, dicts, tuples, strings, numbers and numpy
arrays: a pickle that asks for anything else (a function to call, another class) is refused. The
vectors are the original model's un-normalised image-side embeddings, so ``--model`` must be the
converted original checkpoint: its image-retrieval fingerprint is stamped into the manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gill.retrieval import read_original_embeddings

read_original = read_original_embeddings  # the library's restricted reader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.import_original", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, help="the original cc3m_embeddings_urls.npy")
    p.add_argument("--model", required=True, help="the converted original model (its fingerprint is stamped)")
    p.add_argument("--out", required=True)
    p.add_argument("--index-type", choices=["auto", "flat", "ivf", "ivfpq", "hnsw"], default="auto")
    args = p.parse_args(argv)

    from gill.loading import load_image_embedder
    from index.store import Row, WorkDB, finalize

    try:
        paths, vectors = read_original(args.embeddings)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    embedder = load_image_embedder(args.model)
    if vectors.shape[1] != embedder.dim:
        print(f"error: embeddings are {vectors.shape[1]}-d, the model's retrieval space is {embedder.dim}-d", file=sys.stderr)
        return 1
    out = Path(args.out)
    work = WorkDB(out / "work" / "rank-00000.sqlite")
    rows = []
    for i, (url, v) in enumerate(zip(paths, vectors)):
        # no image bytes: the URL stands in for the content hash, so repeated URLs are dropped
        rows.append(Row(url, 0, i, "ok", source=url, sha256=f"url:{url}", vector=v.tobytes()))
        if len(rows) == 10_000:
            work.commit(rows)
            rows = []
    work.commit(rows)
    work.close()
    report = finalize(out, dim=embedder.dim, fingerprint=embedder.fingerprint, model=str(args.model),
                      index_type=None if args.index_type == "auto" else args.index_type)
    print(f"{out}: {report['count']} images ({report['index_type']}), {report['duplicates']} repeated URLs dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
