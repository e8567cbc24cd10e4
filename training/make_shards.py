"""Write webdataset shards of (image, caption) from an image folder (captions in NAME.txt beside
NAME.jpg) or a TSV/CSV table with ``path`` (or ``image``) and ``caption`` columns.

    python -m training.make_shards --source my_images/ --out shards/ --per-shard 10000

Files stay inside the source: a table row whose path leaves the table's folder (``../x.png``, an absolute
path, a link out) and a link in a folder that points out of it are refused, unless ``--allow-outside``.
Only regular files are read (a FIFO, a device or a folder named ``x.png`` is not), each up to
``--max-bytes``. Every row or file left out is counted with its reason and reported at the end.

For CC3M, img2dataset writes such shards directly (``--output_format webdataset``; its ``KEY.txt`` holds
the caption): point ``training.precompute_sd_embeddings`` and ``training.train`` at them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gill.arguments import int_in
from gill.io import MAX_CAPTION_BYTES, MAX_FILE_BYTES, FileTooLarge, NotRegularFile, inside, read_regular_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class Entry:
    """One row of a table or file of a folder: ``name`` as the source gives it; ``path`` to read, or
    ``problem`` (the counted reason it is left out)."""

    name: str
    path: Path | None
    caption: str = ""
    problem: str | None = None


class SourceError(ValueError):
    """A source that cannot be read at all (no such folder, a table without a path column)."""


def caption_of(root: Path, image_name: str, allow_outside: bool = False) -> str:
    """The caption beside an image (``NAME.txt``, under the same rules as images: inside the source, a
    regular file, at most ``gill.io.MAX_CAPTION_BYTES``). One that breaks them or is not UTF-8 is reported and left
    empty, so training counts the sample as "empty caption" instead of the whole conversion failing."""
    name = str(Path(image_name).with_suffix(".txt"))
    if not os.path.lexists(root / name):
        return ""
    path, problem = _contained(root, name, allow_outside)
    try:
        if problem is not None:
            raise ValueError(problem)
        return read_entry(path, MAX_CAPTION_BYTES).decode("utf-8").strip()
    except (ValueError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        print(f"warning: {root / name}: caption left out ({reason}); the sample gets no caption", file=sys.stderr)
        return ""


def _contained(root: Path, relative: str, allow_outside: bool) -> tuple[Path | None, str | None]:
    """(path, None) for ``root / relative`` when it stays inside ``root`` (links resolved), else (None, reason)."""
    if allow_outside:
        return root / relative, None
    try:
        return inside(root, relative), None
    except ValueError:
        return None, "points outside the source"
    except OSError as e:  # a link loop, a name too long
        return None, f"unresolvable path ({e.strerror or e})"


def folder_entries(root: Path, allow_outside: bool = False) -> list[Entry]:
    """Image-named entries under ``root`` (links to folders are not followed), sorted by relative name."""
    names = []
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is not walked into
        # folders named like images are listed too: counted as left out, not silently passed over
        names += [os.path.relpath(os.path.join(folder, f), root) for f in files + dirs
                  if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    out = []
    for name in sorted(names):
        path, problem = _contained(root, name, allow_outside)
        out.append(Entry(name, path, caption_of(root, name, allow_outside) if problem is None else "", problem))
    return out


def table_entries(source: Path, allow_outside: bool = False) -> list[Entry]:
    """A TSV/CSV table's rows: paths relative to the table's folder, kept inside it."""
    delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
    try:
        with open(source, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{source}: not a readable {source.suffix[1:].upper() or 'CSV'} table ({e})") from None
    if table and not ({"path", "image"} & set(table[0])):
        raise SourceError(f"{source}: needs a 'path' or 'image' column, found {list(table[0])}")
    out = []
    for i, r in enumerate(table):
        name = (r.get("path") or r.get("image") or "").strip()
        caption = (r.get("caption") or "").strip()
        if not name:
            out.append(Entry(f"row {i + 1}", None, problem="empty path"))
            continue
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            out.append(Entry(name, None, problem=f"not an image file name (expected {', '.join(sorted(IMAGE_SUFFIXES))})"))
            continue
        path, problem = _contained(source.parent, name, allow_outside)
        out.append(Entry(name, path, caption, problem))
    return out


def entries(source: Path, allow_outside: bool = False) -> list[Entry]:
    if source.is_dir():
        return folder_entries(source, allow_outside)
    if source.is_file():
        return table_entries(source, allow_outside)
    if source.exists():
        raise SourceError(f"{source}: not a folder or a table file (a FIFO, socket or device?)")
    raise SourceError(f"{source}: no such folder or table")


def read_entry(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (``gill.io.read_regular_file``: a FIFO or a
    device is refused unopened for reading, whatever it is named); raises ValueError with a short reason."""
    try:
        return read_regular_file(path, max_bytes)
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror or e})") from None
    except NotRegularFile as e:
        raise ValueError("a folder, not a file" if e.what == "a directory"
                         else "not a regular file (a FIFO, socket or device)") from None
    except FileTooLarge as e:
        raise ValueError(f"larger than {max_bytes} bytes ({'grew while read' if e.size is None else e.size})") from None


def _reason(problem: str) -> str:
    """The countable part of a problem (without the numbers)."""
    return problem.split(" (")[0]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m training.make_shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-shard", type=int_in(1), default=10_000)
    p.add_argument("--max-bytes", type=int_in(1), default=MAX_FILE_BYTES,
                   help=f"largest image file read (default {MAX_FILE_BYTES})")
    p.add_argument("--allow-outside", action="store_true",
                   help="read table paths and folder links that leave the source (you trust its author)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import webdataset as wds

    try:
        items = entries(Path(args.source), args.allow_outside)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    written = 0
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=args.per_shard, verbose=0) as sink:
        for i, item in enumerate(items):
            problem = item.problem
            if problem is None:
                try:
                    data = read_entry(item.path, args.max_bytes)
                except ValueError as e:
                    problem = str(e)
            if problem is not None:
                print(f"skipped {item.name!r}: {problem}", file=sys.stderr)
                skipped[_reason(problem)] += 1
                continue
            # the name's suffix (a link's target may be named otherwise)
            ext = Path(item.name).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sink.write({"__key__": f"{i:09d}", ext: data, "txt": item.caption})
            written += 1
    left = f"; {sum(skipped.values())} skipped: {dict(skipped)}" if skipped else "; none skipped"
    print(f"{written} samples in {out}{left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
