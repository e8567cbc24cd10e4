"""Webdataset shard sets as an index source (local paths, brace patterns, ``pipe:`` URLs): a local shard's
end and its members' sizes are checked from the tar headers before webdataset reads anything, and every
broken shard, oversized member and sample without an image is an item error, counted by the build."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

from gill.io import MAX_FILE_BYTES, file_kind
from index.items import IMAGE_SUFFIXES, Item, Skip, caption_text, size_text, unique_uids


def _all(urls):
    """Every shard: the split over ranks and workers is done by the caller, not by webdataset."""
    return urls


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


def webdataset_items(src: str, shard_filter: Callable[[int], bool], skip: Skip) -> Iterator[Item]:
    """The items of a shard set, in order (``shard_filter`` is asked about each shard by its number)."""
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
                    caption, warning = caption_text(caption, f"{key}.txt")
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
        extra = [(unique(f"{url}#{name}"), f"too large: {name} is {size_text(size)}; at most {size_text(MAX_FILE_BYTES)} is read")
                 for name, size in big.items()]
        extra += [(f"{url}#error{i}", f"broken shard: {err}") for i, err in enumerate(errors)]
        for i, (uid, reason) in enumerate(extra):
            yield Item((shard_no, pos + 1 + i), uid, url, error=reason)
