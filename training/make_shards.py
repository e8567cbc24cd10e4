"""Write webdataset shards of (image, caption) from an image folder (captions in NAME.txt beside
NAME.jpg) or a TSV/CSV table with ``path`` (or ``image``) and ``caption`` columns.

    python -m training.make_shards --source my_images/ --out shards/ --per-shard 10000

For CC3M, img2dataset writes such shards directly (``--output_format webdataset``; its ``KEY.txt`` holds
the caption): point ``training.precompute_sd_embeddings`` and ``training.train`` at them.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def caption_of(image: Path) -> str:
    """The caption beside an image (``NAME.txt``); one that is not UTF-8 is reported and left empty, so
    training counts the sample as "empty caption" instead of the whole conversion failing."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        print(f"warning: {path}: caption not readable as UTF-8 text ({e}); the sample gets no caption", file=sys.stderr)
        return ""


def rows(source: Path) -> list[tuple[Path, str]]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, caption_of(p)) for p in files]
    delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
    with open(source, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f, delimiter=delimiter))
    if table and not ({"path", "image"} & set(table[0])):
        raise ValueError(f"{source}: needs a 'path' or 'image' column, found {list(table[0])}")
    return [(source.parent / (r.get("path") or r.get("image")), r.get("caption", "")) for r in table]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-shard", type=int, default=10_000)
    args = p.parse_args(argv)
    import webdataset as wds

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = rows(Path(args.source))
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=args.per_shard, verbose=0) as sink:
        for i, (path, caption) in enumerate(items):
            ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sink.write({"__key__": f"{i:09d}", ext: path.read_bytes(), "txt": caption})
    print(f"{len(items)} samples in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
