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
that is not UTF-8 is an item error; the rest of the folder is read. Every item of one source has its own ``uid``: a name seen
again (a table row repeated, a webdataset key that comes back later in its shard) gets ``~2``, ``~3``...
"""

from __future__ import annotations

import csv
import http.client
import os
import re
import socket
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gill.io import (MAX_CAPTION_BYTES, MAX_FILE_BYTES, FileTooLarge, NotRegularFile, file_kind, inside,
                     read_regular_file)

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


def unique_uids() -> Callable[[str], str]:
    """A function giving each uid of one source once: a uid seen before comes back as ``uid~2``, ``uid~3``..."""
    seen: set[str] = set()

    def unique(uid: str) -> str:
        new, n = uid, 1
        while new in seen:
            n += 1
            new = f"{uid}~{n}"
        seen.add(new)
        return new

    return unique


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
        yield from _webdataset(src, shard_filter, skip)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


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
            return None, f"too large: the file is {_mb(st.st_size)}; at most {_mb(max_bytes)} is read"
        # read without blocking and checked again on the open file: one swapped for a FIFO since the stat
        try:
            return read_regular_file(path, max_bytes), None
        except NotRegularFile as e:
            return None, f"not a regular file: {path.name} is {e.what}; it is not read"
        except FileTooLarge:
            return None, f"too large: the file is over {_mb(max_bytes)}; at most {_mb(max_bytes)} is read"
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


def _read_caption(path: Path, root: Path) -> tuple[str, str | None]:
    """The caption beside an image: none where there is no such entry; checked and bounded like an image."""
    if not os.path.lexists(path):
        return "", None
    data, problem = _read_file(path, root, max_bytes=MAX_CAPTION_BYTES)
    if data is None:
        return "", f"bad caption: {path.name} is unusable ({problem}); kept with an empty caption"
    return _text(data, path.name)


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


class _Sockets:
    """The sockets one fetch opens, shut down together when its total time is up: a server that sends a
    byte every second never holds a fetch past its deadline (a socket timeout alone bounds one read)."""

    def __init__(self):
        self.open: list[socket.socket] = []
        self.expired = False
        self.lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.append(sock)
            if self.expired:
                self._shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.open:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    class HTTP(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            sockets.add(self.sock)

    class HTTPS(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            sockets.add(self.sock)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPS, req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def fetch_url(url: str, timeout: float, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
    """(body, None) or (None, reason). At most ``timeout`` seconds in total (connection, headers and body,
    however slowly they come) and ``max_bytes`` of body: a larger ``Content-Length`` is refused unread, a
    body that grows past the bound is dropped as soon as it does."""
    sockets = _Sockets()
    timer = threading.Timer(timeout, sockets.expire)
    timer.daemon = True
    timer.start()
    start = time.monotonic()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "gill-index/0.1"})
        with _opener(sockets).open(req, timeout=timeout) as r:
            length = (r.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > max_bytes:
                return None, f"too large: the URL's body is {_mb(int(length))}; at most {_mb(max_bytes)} is read"
            chunks, size = [], 0
            while chunk := r.read1(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    return None, f"too large: the URL's body is over {_mb(max_bytes)}; at most {_mb(max_bytes)} is read"
                chunks.append(chunk)
            if sockets.expired:
                raise TimeoutError
            return b"".join(chunks), None
    except Exception as e:  # network errors come in many types; each is a skipped, reported item
        if sockets.expired or time.monotonic() - start >= timeout:
            return None, f"unreachable URL: timed out after {timeout:g} s in total (--url-timeout)"
        return None, f"unreachable URL: {type(e).__name__}: {e}"
    finally:
        timer.cancel()


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
        st = os.stat(path)
        if what := file_kind(st.st_mode):  # a FIFO would block the open below, and webdataset's
            return f"unreadable shard: {os.path.basename(path)} is {what}; it is not opened"
        size = st.st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        return f"unreadable shard: {e.strerror or e}"
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        return f"truncated shard: {size} bytes, no end-of-archive marker"
    return None


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # a shard member's name -> (sample key, extension)


def oversized_members(path: str, max_bytes: int = MAX_FILE_BYTES) -> dict[str, int]:
    """A local shard's members over ``max_bytes`` (name -> size), from the tar headers alone: the reader
    seeks past each member's data. A shard that cannot be read this way gives what was found so far (the
    read itself reports what is broken)."""
    import tarfile

    found: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isreg() and member.size > max_bytes:
                    found[member.name] = member.size
    except (tarfile.TarError, OSError, EOFError):
        pass
    return found


def _webdataset(src: str, shard_filter, skip) -> Iterator[Item]:
    import webdataset as wds

    for shard_no, url in enumerate(_expand(src)):
        if not shard_filter(shard_no):
            continue
        errors: list[str] = []
        local = "://" not in url and not url.startswith("pipe:")
        if local and (problem := tar_end_problem(url)):
            if "it is not opened" in problem:
                yield Item((shard_no, 0), f"{url}#error0", url, error=f"broken shard: {problem}")
                continue
            errors.append(problem)
        # members over the size bound are never read (webdataset reads each member whole): counted instead
        big = oversized_members(url) if local else {}
        big_keys = {m.group(1) for name in big if (m := _MEMBER.match(name))}

        def handler(exn: Exception) -> bool:
            errors.append(f"{type(exn).__name__}: {exn}")
            return True  # keep going with what could be read

        pos, unique = -1, unique_uids()
        try:
            samples = wds.WebDataset(url, shardshuffle=False, handler=handler, empty_check=False,
                                      nodesplitter=_all, workersplitter=_all,  # ranks are split here
                                      select_files=(lambda name: name not in big) if big else None)
            for pos, sample in enumerate(samples):
                key = sample.get("__key__", str(pos))
                image_ext = next((e for e in sample if "." + e.lower() in IMAGE_SUFFIXES), None)
                if image_ext is None and key in big_keys:
                    continue  # its image was too large: counted below, once
                uid = unique(f"{url}#{key}")  # a key that comes back later in the shard is another sample
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
        extra = [(unique(f"{url}#{name}"), f"too large: {name} is {_mb(size)}; at most {_mb(MAX_FILE_BYTES)} is read")
                 for name, size in big.items()]
        extra += [(f"{url}#error{i}", f"broken shard: {err}") for i, err in enumerate(errors)]
        for i, (uid, reason) in enumerate(extra):
            yield Item((shard_no, pos + 1 + i), uid, url, error=reason)
