"""Image sources for index builds: an image folder, a table (TSV / CSV / parquet) of paths or URLs with
captions, or a webdataset shard set (local paths, brace patterns, ``pipe:`` URLs).

Every source yields ``Item``s in a fixed order, with a stable ``uid`` and an order key, so a build can be
resumed and split over ranks. Reading an item never raises: a failure is carried in ``item.error``, and a
caption that cannot be used (a ``.txt`` or table cell that is not UTF-8 text, an unreadable caption file)
in ``item.warning``: the image is kept with an empty caption and the build counts it as a bad caption.
A source that cannot be read at all (no such folder, a table that is not CSV) raises ``SourceError``.

Local paths stay inside their root: a table's relative path that leaves the table's folder (``../x.jpg``,
a symlink out) is refused as an item error unless ``allow_outside``; absolute paths in a table name files
the table's author chose and are read as given. Folder and table sources are recorded as absolute paths.
"""

from __future__ import annotations

import csv
import os
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gill._io import inside

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LOCATION_COLUMNS = ("path", "url", "image", "file", "filepath", "image_url")
CAPTION_COLUMNS = ("caption", "text", "title")
LICENSE_COLUMNS = ("license", "licence")


@dataclass
class Item:
    order: tuple[int, int]  # (shard, position): the global order of the source
    uid: str  # stable identity: relative path, URL, or shard#key
    source: str  # what the index records as provenance (path or URL)
    caption: str = ""
    license: str = ""
    data: bytes | None = None
    error: str | None = None  # the item is skipped and counted, with this reason
    warning: str | None = None  # the item is kept, and this problem is counted (a bad caption)


class SourceError(ValueError):
    """A source that cannot be read at all; the message names it."""


Skip = Callable[[str], bool]


def _all(urls):
    """Every shard: the split over ranks and workers is done by the caller, not by webdataset."""
    return urls


def kind_of(src: str) -> str:
    if src.startswith("pipe:") or ".tar" in src:
        return "webdataset"
    if os.path.isdir(src):
        return "folder"
    if Path(src).suffix.lower() in {".tsv", ".csv", ".parquet"}:
        return "table"
    if not os.path.exists(src):
        raise SourceError(f"source {src!r}: no such folder or file")
    raise SourceError(f"source {src!r}: expected an image folder, a .tsv/.csv/.parquet table or .tar shards")


def iter_items(src: str, *, shard_filter: Callable[[int], bool] = lambda s: True, skip: Skip = lambda uid: False,
               url_timeout: float = 10.0, url_workers: int = 16, allow_outside: bool = False) -> Iterator[Item]:
    """Items of ``src`` in order. ``shard_filter`` picks this rank's part (folders and tables: one
    position per "shard"); ``skip(uid)`` items are yielded without their bytes (already done).
    ``allow_outside``: read a table's relative paths that leave its folder."""
    kind = kind_of(src)
    if kind == "folder":
        yield from _folder(Path(os.path.abspath(src)), shard_filter, skip)
    elif kind == "table":
        yield from _table(Path(os.path.abspath(src)), shard_filter, skip, url_timeout, url_workers, allow_outside)
    else:
        yield from _webdataset(src, shard_filter, skip)


def _read_file(path: Path) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as e:
        return None, f"unreadable file: {e.strerror or e}"
    except ValueError as e:  # a path with a NUL byte
        return None, f"unreadable file: {e}"


def _text(data: bytes, what: str) -> tuple[str, str | None]:
    """Caption bytes -> (text, None), or ("", warning) where they are not UTF-8 (a BOM is allowed)."""
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as e:
        return "", f"bad caption: {what} is not UTF-8 text (byte {e.start}); kept with an empty caption"


def _read_caption(path: Path) -> tuple[str, str | None]:
    try:
        data = path.read_bytes()
    except OSError as e:
        return "", f"bad caption: {path.name} is unreadable ({e.strerror or e}); kept with an empty caption"
    return _text(data, path.name)


def _folder(root: Path, shard_filter, skip) -> Iterator[Item]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for pos, path in enumerate(files):
        if not shard_filter(pos):
            continue
        uid = path.relative_to(root).as_posix()
        caption_file = path.with_suffix(".txt")
        caption, warning = _read_caption(caption_file) if caption_file.is_file() else ("", None)
        item = Item((0, pos), uid, str(path), caption, warning=warning)
        if not skip(uid):
            item.data, item.error = _read_file(path)
        yield item


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return str(v)


def _not_utf8(text: str) -> bool:
    """Whether ``text`` came from bytes that are not UTF-8 (decoded with surrogateescape)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _rows(path: Path) -> list[dict[str, str]]:
    """The table's rows; cells that are not UTF-8 keep their bytes as surrogates (``_not_utf8``), so one
    bad row is skipped or loses its caption rather than failing the table."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types for a broken file
            raise SourceError(f"{path}: not a readable parquet table ({type(e).__name__}: {e})") from None
        return [{k: _cell(v) for k, v in r.items()} for r in table.to_pylist()]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise SourceError(f"{path}: unreadable table ({e.strerror or e})") from None
    with f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            return list(reader)
        except csv.Error as e:
            raise SourceError(f"{path}: line {reader.line_num}: not a well-formed {path.suffix[1:].upper()} row "
                              f"({e})") from None


def _pick(row: dict[str, str], names: tuple[str, ...]) -> str | None:
    lower = {k.lower().strip(): k for k in row}
    for name in names:
        if name in lower:
            return lower[name]
    return None


def fetch_url(url: str, timeout: float) -> tuple[bytes | None, str | None]:
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "gill-index/0.1"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read(), None
    except Exception as e:  # network errors come in many types; each is a skipped, reported item
        return None, f"unreachable URL: {type(e).__name__}: {e}"


def _table(path: Path, shard_filter, skip, timeout: float, workers: int, allow_outside: bool = False) -> Iterator[Item]:
    rows = _rows(path)
    if not rows:
        return
    loc = _pick(rows[0], LOCATION_COLUMNS)
    if loc is None:
        raise SourceError(f"{path}: no image column; expected one of {list(LOCATION_COLUMNS)}, found {list(rows[0])}")
    cap, lic = _pick(rows[0], CAPTION_COLUMNS), _pick(rows[0], LICENSE_COLUMNS)

    def load(item: Item) -> Item:
        if item.error or skip(item.uid):
            return item
        if "://" in item.source:
            item.data, item.error = fetch_url(item.source, timeout)
        else:
            item.data, item.error = _read_file(Path(item.source))
        return item

    items = []
    for pos, row in enumerate(rows):
        if not shard_filter(pos):
            continue
        line = f"row {pos + 1}"
        where = (row.get(loc) or "").strip()
        if not where or _not_utf8(where):
            bad = "is empty" if not where else "is not UTF-8 text"
            items.append(Item((0, pos), f"{path.name}:{line}", str(path),
                              error=f"bad row: {line}'s {loc!r} column {bad}"))
            continue
        source, error = where, None
        if "://" not in where and not os.path.isabs(where):
            source = str(path.parent / where)
            if not allow_outside:
                try:
                    inside(path.parent, where, what=f"{line}'s path")
                except ValueError as e:
                    error = f"path outside the table's folder: {e} (--allow-outside reads it)"
        warnings = []
        caption, license_ = "", ""
        for column, name in ((cap, "caption"), (lic, "license")):
            value = (row.get(column) or "").strip() if column else ""
            if _not_utf8(value):
                warnings.append(f"bad caption: {line}'s {name} is not UTF-8 text; kept with an empty {name}")
                value = ""
            if name == "caption":
                caption = value
            else:
                license_ = value
        items.append(Item((0, pos), where, source, caption, license_, error=error,
                          warning="; ".join(warnings) or None))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # bounded look-ahead: fetch a window at a time, in order
        window = max(workers * 4, 1)
        for start in range(0, len(items), window):
            yield from pool.map(load, items[start:start + window])


def _expand(src: str) -> list[str]:
    import braceexpand

    urls = []
    for part in src.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def tar_end_problem(path: str) -> str | None:
    """For a local shard: why it does not end like a complete tar archive (a multiple of 512 bytes
    ending in two zero blocks), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        return f"unreadable shard: {e.strerror or e}"
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        return f"truncated shard: {size} bytes, no end-of-archive marker"
    return None


def _webdataset(src: str, shard_filter, skip) -> Iterator[Item]:
    import webdataset as wds

    for shard_no, url in enumerate(_expand(src)):
        if not shard_filter(shard_no):
            continue
        errors: list[str] = []
        if "://" not in url and not url.startswith("pipe:") and (problem := tar_end_problem(url)):
            errors.append(problem)

        def handler(exn: Exception) -> bool:
            errors.append(f"{type(exn).__name__}: {exn}")
            return True  # keep going with what could be read

        pos = -1
        try:
            samples = wds.WebDataset(url, shardshuffle=False, handler=handler, empty_check=False,
                                      nodesplitter=_all, workersplitter=_all)  # ranks are split here, not by webdataset
            for pos, sample in enumerate(samples):
                key = sample.get("__key__", str(pos))
                uid = f"{url}#{key}"
                image_ext = next((e for e in sample if "." + e.lower() in IMAGE_SUFFIXES), None)
                caption, warning = sample.get("txt", b""), None
                if isinstance(caption, bytes):
                    caption, warning = _text(caption, f"{key}.txt")
                else:
                    caption = str(caption).strip()
                item = Item((shard_no, pos), uid, uid, caption, warning=warning)
                if image_ext is None:
                    item.error = "sample has no image"
                elif not skip(uid):
                    item.data = sample[image_ext]
                yield item
        except Exception as e:  # an unopenable shard is reported, not fatal
            errors.append(f"{type(e).__name__}: {e}")
        for i, err in enumerate(errors):
            yield Item((shard_no, pos + 1 + i), f"{url}#error{i}", url, error=f"broken shard: {err}")
