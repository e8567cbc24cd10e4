"""Image sources for index builds: an image folder, a table (TSV / CSV / parquet) of paths or URLs with
captions, or a webdataset shard set (local paths, brace patterns, ``pipe:`` URLs).

Every source yields ``Item``s in a fixed order, with a stable ``uid`` and an order key, so a build can be
resumed and split over ranks. Reading an item never raises: a failure is carried in ``item.error``, and a
caption that cannot be used (a ``.txt`` or table cell that is not UTF-8 text, an unreadable caption file)
in ``item.warning``: the image is kept with an empty caption and the build counts it as a bad caption.
A source that cannot be read at all (no such folder, a table that is not CSV) raises ``SourceError``.

Local paths stay inside their root: a folder's entry that is a link out of the folder, or a table's
relative path that leaves the table's folder (``../x.jpg``, a symlink out), is refused as an item error
(a table's unless ``allow_outside``); absolute paths in a table name files the table's author chose and are
read as given. Folder and table sources are recorded as absolute paths.

Every local entry is looked at (``lstat``/``stat``) before it is opened: a dangling link, a FIFO, a socket or
a device is an item error (never opened, so a FIFO cannot hang a build), and a file over
``gill.io.MAX_FILE_BYTES`` is refused from its size, unread. A URL body is read up to the same bound (its
``Content-Length`` checked first) within a total time per URL, however slowly the server sends. A file name
that is not UTF-8 is an item error; the rest of the folder is read. Every item of one source has its own
``uid``: a name seen again (a table row repeated, a webdataset key that comes back later in its shard) gets
``~2``, ``~3``...

Folders and tables are read here; URLs are fetched by ``index.fetch``, shard sets read by ``index.shards``;
``Item`` and ``SourceError`` live in ``index.items`` (all importable from here).
"""

from __future__ import annotations

import csv
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gill.io import MAX_CAPTION_BYTES, MAX_FILE_BYTES, FileTooLarge, NotRegularFile, file_kind, inside, read_regular_file
from index.fetch import fetch_url  # noqa: F401  (public here too)
from index.items import (IMAGE_SUFFIXES, Item, Skip, SourceError, caption_text, size_text,  # noqa: F401
                         unique_uids)
from index.shards import oversized_members, tar_end_problem, webdataset_items  # noqa: F401

LOCATION_COLUMNS = ("path", "url", "image", "file", "filepath", "image_url")
CAPTION_COLUMNS = ("caption", "text", "title")
LICENSE_COLUMNS = ("license", "licence")


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


def local_roots(src: str, *, allow_outside: bool = False) -> list[str]:
    """The folders (symlinks resolved) whose files ``src`` reads: what the user vouches for by naming it.
    A folder source: the folder; a table: the folders of the local files it names; shards: none."""
    kind = kind_of(src)
    if kind == "folder":
        return [os.path.realpath(src)]
    if kind != "table":
        return []
    dirs = {os.path.dirname(os.path.realpath(item.source))
            for item in _table(Path(os.path.abspath(src)), lambda s: True, lambda uid: True, 1.0, 1, allow_outside)
            if not item.error and "://" not in item.source}
    return sorted(dirs)


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
        yield from webdataset_items(src, shard_filter, skip)


def _read_file(path: Path, root: Path | None = None, *,
               max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason). The entry's type and size are looked at before it is opened: a
    dangling link, a FIFO or a device is refused unopened, a file over ``max_bytes`` unread; with ``root``,
    a link that leaves it is refused too."""
    try:
        if os.path.islink(path) and not os.path.exists(path):
            return None, f"dangling link: {path.name} points to {os.readlink(path)!r}, which does not exist"
        if root is not None:
            try:
                inside(root, path)
            except ValueError:
                return None, (f"link outside the source: {path.name} points outside the source folder {root} "
                              f"(to {os.path.realpath(path)})")
        st = os.stat(path)
        if what := file_kind(st.st_mode):
            return None, f"not a regular file: {path.name} is {what}; it is not opened"
        if st.st_size > max_bytes:
            return None, f"too large: the file is {size_text(st.st_size)}; at most {size_text(max_bytes)} is read"
        # read without blocking and checked again on the open file: one swapped for a FIFO since the stat
        try:
            return read_regular_file(path, max_bytes), None
        except NotRegularFile as e:
            return None, f"not a regular file: {path.name} is {e.what}; it is not read"
        except FileTooLarge:
            return None, f"too large: the file is over {size_text(max_bytes)}; at most {size_text(max_bytes)} is read"
    except OSError as e:
        return None, f"unreadable file: {e.strerror or e}"
    except ValueError as e:  # a path with a NUL byte
        return None, f"unreadable file: {e}"


def _read_caption(path: Path, root: Path) -> tuple[str, str | None]:
    """The caption beside an image: none where there is no such entry; checked and bounded like an image."""
    if not os.path.lexists(path):
        return "", None
    data, problem = _read_file(path, root, max_bytes=MAX_CAPTION_BYTES)
    if data is None:
        return "", f"bad caption: {path.name} is unusable ({problem}); kept with an empty caption"
    return caption_text(data, path.name)


def _shown(name: str) -> str:
    """A name as text: bytes that are not UTF-8 (kept as surrogates by the OS layer) shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _folder_entries(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative names of every entry under ``root`` that a build looks at, in a fixed order: whatever has
    an image suffix (files, links, FIFOs...) and every link to a folder. Links to folders are not followed.
    Also (name, reason) for each folder that could not be listed."""
    entries: list[str] = []
    unlisted: list[tuple[str, str]] = []

    def onerror(e: OSError) -> None:
        rel = _shown(os.path.relpath(e.filename, root)) if e.filename else "?"
        unlisted.append((rel + "/", f"unreadable folder: {rel}/ could not be listed ({e.strerror or e})"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=onerror):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                entries.append(prefix + name)
        entries.extend(prefix + name for name in dirnames if os.path.islink(os.path.join(dirpath, name)))
    return sorted(entries, key=lambda rel: rel.split("/")), sorted(unlisted)


def _folder(root: Path, shard_filter, skip) -> Iterator[Item]:
    entries, unlisted = _folder_entries(root)
    for pos, (rel, reason) in enumerate(unlisted, start=len(entries)):  # after the entries: their order stays
        if shard_filter(pos):
            yield Item((0, pos), rel, str(root / rel), error=reason)
    for pos, rel in enumerate(entries):
        if not shard_filter(pos):
            continue
        path = root / rel
        if _not_utf8(rel):
            shown = _shown(rel)
            yield Item((0, pos), shown, str(root / shown),
                       error=f"bad name: the file name {shown!r} is not UTF-8 text; rename it to index it")
            continue
        if os.path.isdir(path):  # a link to a folder: followed only where it stays inside the source
            try:
                inside(root, path)
            except ValueError:
                yield Item((0, pos), rel, str(path), error=f"link outside the source: {rel} points outside the "
                                                           f"source folder {root} (to {os.path.realpath(path)})")
            continue
        caption, warning = _read_caption(path.with_suffix(".txt"), root)
        item = Item((0, pos), rel, str(path), caption, warning=warning)
        if not skip(rel):
            item.data, item.error = _read_file(path, root)
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

    items, unique = [], unique_uids()
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
        items.append(Item((0, pos), unique(where), source, caption, license_, error=error,
                          warning="; ".join(warnings) or None))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # bounded look-ahead, in order: at most ``workers`` items read ahead (each at most MAX_FILE_BYTES)
        ahead: deque = deque()
        for item in items:
            ahead.append(pool.submit(load, item))
            if len(ahead) >= workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
