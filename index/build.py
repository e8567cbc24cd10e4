"""Build a retrieval index from an image folder, a table of paths/URLs, or webdataset shards.

    python -m index.build --model DIR|PRESET --source SRC --out INDEX_DIR [--index-type flat|ivf|ivfpq|hnsw]
    torchrun --nproc_per_node 8 -m index.build --model DIR --source 'cc3m/{00000..00331}.tar' --out cc3m-index

Images are embedded in batches by the model's vision encoder and image-retrieval projection (the LM is
not loaded). Rerunning the same command resumes a killed build: committed batches are skipped, so no
image is embedded twice and none is lost. Unreadable, corrupt, oversized (over 40 megapixels) and
over-elongated (beyond 20:1) images, broken shards and unreachable URLs are skipped, counted and listed in
``report.json`` with their reasons; an image whose caption is not UTF-8 text is kept with an empty caption
and counted as a bad caption; duplicates (same sha256) are dropped. Bad flag values (``--batch-size 0``)
are refused when the command line is parsed. Dangling links, FIFOs, links out of the source folder, files
over 64 MB, URL bodies over 64 MB or slower than ``--url-timeout`` in total, and file names that are not
UTF-8 are skipped and counted too (``index.sources``). A build that indexes no image at all writes its
report and exits with status 1, saying so. A write that fails (a full disk) is one line naming the index
directory; the previous index stays whole and the same command resumes.
Under torchrun each rank embeds a disjoint part (shards for webdataset, rows for folders and tables) and
rank 0 merges them.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import sqlite3
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

from gill.arguments import float_in, int_in

LOG = logging.getLogger("index.build")
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def parser(description: str = __doc__, prog: str = "python -m index.build") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or preset (e.g. tiny-random)")
    p.add_argument("--source", required=True, help="image folder, .tsv/.csv/.parquet table, or .tar shards")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--index-type", choices=["auto", "flat", "ivf", "ivfpq", "hnsw"], default="auto",
                   help="auto: exact up to 200k images, IVF beyond")
    p.add_argument("--nlist", type=int_in(1), default=None, help="IVF lists, >= 1 (default 4*sqrt(N))")
    p.add_argument("--nprobe", type=int_in(1), default=None, help="IVF lists searched per query, >= 1")
    p.add_argument("--batch-size", type=int_in(1), default=64, help="images per batch, >= 1")
    p.add_argument("--device", default=None, help="e.g. cuda; under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--url-timeout", type=float_in(0, above=True), default=10.0, help="seconds per URL, > 0")
    p.add_argument("--allow-outside", action="store_true",
                   help="read a table's relative paths that leave the table's folder (../x.jpg)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the libraries' messages (model loading, warnings)")
    return p


MAX_BATCH_BYTES = 256 * 2**20  # encoded bytes one batch holds at once: fewer items where files are large
MAX_BATCH_PIXELS = 48_000_000  # decoded pixels held before they are embedded (144 MB of RGB, copied once)


def batched(items, n, max_bytes: int | None = None):
    """Lists of ``n`` items, cut earlier where their bytes (``item.data``) would pass ``max_bytes``."""
    if max_bytes is None:
        it = iter(items)
        while batch := list(islice(it, n)):
            yield batch
        return
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(getattr(item, "data", None) or b"")
        if len(batch) == n or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def decode_image(data: bytes, name: str = "image"):
    """bytes -> (RGB PIL image, None) or (None, reason). Size and aspect ratio are bounded from the header,
    before any pixel is decoded (``gill.images.open_image``)."""
    from gill.images import ImageError, open_image

    try:
        return open_image(data, name=name), None
    except ImageError as e:
        return None, f"bad image: {e.reason}"


def embed_images(embedder, images: list) -> list[tuple[np.ndarray | None, str | None]]:
    """(vector, None) or (None, reason) per image. A batch the embedder refuses (an image it will not
    resize) is embedded again one image at a time, so only the bad image is skipped."""
    from gill.images import ImageError

    try:
        return [(v, None) for v in embedder.embed(images).numpy().astype(np.float32)]
    except ValueError as e:
        if len(images) > 1:
            return [result for image in images for result in embed_images(embedder, [image])]
        reason = e.reason if isinstance(e, ImageError) else f"the image processor refused it ({e})"
        return [(None, f"bad image: {reason}")]


def dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def embed_source(embedder, source: str, out: Path, *, source_no: int, batch_size: int, url_timeout: float,
                 progress: bool, allow_outside: bool = False) -> dict:
    """Read ``source`` into this rank's work DB (resumable). Returns counts for this run."""
    from index.sources import iter_items
    from index.store import SOURCE_STRIDE, Row, WorkDB

    rank, world, _ = dist_info()
    work = WorkDB(out / "work" / f"rank-{rank:05d}.sqlite")
    done = work.done_uids(source_no)  # identity is (source, uid): x.png of another folder is not done
    hashes = work.known_hashes()
    counts = {"embedded": 0, "duplicates": 0, "failed": 0, "skipped_done": 0}
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(unit="img", desc=f"embedding {source}", smoothing=0.05)
    items = iter_items(source, shard_filter=lambda s: s % world == rank, skip=done.__contains__, url_timeout=url_timeout,
                       allow_outside=allow_outside)
    start = time.perf_counter()
    for batch in batched(items, batch_size, MAX_BATCH_BYTES):
        rows, images, image_rows = [], [], []

        def embed_pending() -> None:
            for row, (v, reason) in zip(image_rows, embed_images(embedder, images)):
                if v is None:
                    row.status, row.reason = "failed", reason
                    hashes.discard(row.sha256)
                else:
                    row.vector = v.tobytes()
            images.clear()
            image_rows.clear()

        for item in batch:
            if item.uid in done:
                counts["skipped_done"] += 1
                continue
            row = Row(item.uid, item.order[0] + source_no * SOURCE_STRIDE, item.order[1], "failed",
                      source=item.source, caption=item.caption, license=item.license, src=source_no)
            rows.append(row)
            if item.error:
                row.reason = item.error
                continue
            image, reason = decode_image(item.data, name=item.uid)
            if image is None:
                row.reason = reason
                continue
            row.reason = item.warning or ""  # kept: a bad caption is counted, not fatal
            row.sha256 = hashlib.sha256(item.data).hexdigest()
            row.width, row.height = image.size
            if row.sha256 in hashes:
                row.status = "duplicate"
                continue
            hashes.add(row.sha256)
            row.status = "ok"
            images.append(image)
            image_rows.append(row)
            item.data = None  # the bytes are hashed and decoded: not held for the rest of the batch
            if sum(im.width * im.height for im in images) >= MAX_BATCH_PIXELS:
                embed_pending()  # large photos: embedded in parts, so decoded pixels stay bounded
        if images:
            embed_pending()
        work.commit(rows)
        for row in rows:
            counts[{"ok": "embedded", "duplicate": "duplicates", "failed": "failed"}[row.status]] += 1
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(img_per_s=f"{counts['embedded'] / max(time.perf_counter() - start, 1e-9):.1f}",
                            failed=counts["failed"])
    if bar is not None:
        bar.close()
    work.close()
    return counts


def barrier() -> None:
    _, world, _ = dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


def main(argv: list[str] | None = None, *, update: bool = False) -> int:
    args = parser(prog="python -m index.update" if update else "python -m index.build").parse_args(argv)
    from gill.quiet import quiet

    quiet(args.verbose)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    from gill.retrieval import IndexFormatError
    from index.sources import SourceError
    from index.store import BuildStateError, IndexTypeError

    try:
        return run(args, update=update)
    except (SourceError, IndexFormatError, BuildStateError, IndexTypeError) as e:  # named: a source, a file, --index-type
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (sqlite3.OperationalError, OSError) as e:
        if isinstance(e, sqlite3.OperationalError) or e.errno in WRITE_ERRNOS:  # a full disk, a read-only place
            print(f"error: {args.out}: cannot write the index ({e}); the previous index is unchanged; free space "
                  "or fix the directory and rerun the same command to resume", file=sys.stderr)
        else:  # a model or file that is not there: the error names it
            print(f"error: {e}", file=sys.stderr)
        return 1


def source_key(src: str) -> str:
    """How the index's work state names a source: a local folder or table by its absolute path (so one
    named from two working directories is not taken for one source), shards as given."""
    from index.sources import kind_of

    return os.path.abspath(src) if kind_of(src) in ("folder", "table") else src


def run(args: argparse.Namespace, *, update: bool = False) -> int:
    from gill.loading import load_image_embedder
    from gill.retrieval import MANIFEST_NAME, IndexManifest
    from index.sources import local_roots
    from index.store import WorkDB, finalize

    key = source_key(args.source)  # a source that is not there fails before the model loads
    rank, world, local_rank = dist_info()
    out = Path(args.out)
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    embedder = load_image_embedder(args.model)
    if device is not None:
        embedder.vision.to(device)
        embedder.projection.to(device)
    fingerprint = embedder.fingerprint

    manifest_path = out / MANIFEST_NAME
    meta = WorkDB(out / "work" / "sources.sqlite")
    sources = (meta.get_meta("sources") or "").split("\n") if meta.get_meta("sources") else []
    known = [source_key(s) if os.path.exists(s) else s for s in sources]  # older work states: as given
    if manifest_path.exists() and not update and key not in known:
        print(f"error: {out} already holds an index of other sources; use python -m index.update to add one",
              file=sys.stderr)
        return 1
    if manifest_path.exists():
        existing = IndexManifest.read(manifest_path)
        if existing.fingerprint != fingerprint:
            print(f"error: {out} was built with another model's image-retrieval projection; "
                  "use that model or a new index directory", file=sys.stderr)
            return 1
    if key not in known:
        sources.append(key)
        known.append(key)
        if rank == 0:
            meta.set_meta("sources", "\n".join(sources))
    meta.close()
    counts = embed_source(embedder, args.source, out, source_no=known.index(key),
                          batch_size=args.batch_size, url_timeout=args.url_timeout, progress=not args.no_progress,
                          allow_outside=args.allow_outside)
    LOG.info("rank %d: %s", rank, counts)
    barrier()
    if rank != 0:
        return 0
    index_type = None if args.index_type == "auto" else args.index_type
    if update and manifest_path.exists() and index_type is None:
        index_type = IndexManifest.read(manifest_path).index_type
    # a reader may load hits' images from the folders of the sources named on this command line (and those
    # this user's earlier builds signed), never from folders the work state's rows name
    report = finalize(out, dim=embedder.dim, fingerprint=fingerprint, model=str(args.model), index_type=index_type,
                      nlist=args.nlist, nprobe=args.nprobe,
                      vouched_roots=local_roots(args.source, allow_outside=args.allow_outside))
    print(f"{out}: {report['count']} images ({report['index_type']}), {report['duplicates']} duplicates, "
          f"{report['failed']} failed, {report['bad_captions']} bad captions (listed in {out / 'report.json'})")
    if report["count"] == 0:
        print(f"error: {out}: the index is empty: no image of {args.source} could be indexed "
              f"({report['items_read']} read, {report['failed']} failed; the reasons are in {out / 'report.json'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
