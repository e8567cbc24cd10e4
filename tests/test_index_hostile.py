"""Hostile and careless sources for the index recipes (issue 37): items are known by their source, nothing
is overwritten or left out without a line in ``report.json``, links and received indexes never widen what
may be read, swapped files are refused, an empty index is said so, and every size and time is bounded."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gill.retrieval import FaissIndex, ImageRecord, IndexFormatError, SourceOutsideError, open_index
from index.store import Row, WorkDB, finalize

from memory import peak_growth
from synthetic import png_bytes, write_shard

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30

pytestmark = pytest.mark.usefixtures("own_index_key")


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def sources_of(out: Path) -> list[str]:
    index = FaissIndex(out)
    try:
        return [r[0] for r in index.db.execute("SELECT source FROM images ORDER BY id")]
    finally:
        index.db.close()


def reasons_of(out: Path) -> dict[str, str]:
    return {f["uid"]: f["reason"] for f in report_of(out)["failures"]}


def in_thread(fn, seconds: float):
    """``fn()`` in a thread, given ``seconds``: (finished, result); a call that hangs does not hang the test."""
    result: list = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive()), (result[0] if result else None)


# ---- identity: same names in two sources, repeated keys ------------------------------------------------


def test_same_named_files_from_two_folders_are_both_indexed(tmp_path, build):
    for folder, color in (("A", "red"), ("B", "blue")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(png_bytes(color))
    out = tmp_path / "idx"
    assert build(tmp_path / "A", out) == 0
    assert build(f"{tmp_path / 'B'}/", out, update=True) == 0
    assert sorted(Path(s).parent.name for s in sources_of(out)) == ["A", "B"]
    assert report_of(out)["count"] == 2
    assert build(tmp_path / "B", out, update=True) == 0  # the same folder again (no slash): nothing new
    assert report_of(out)["count"] == 2 and report_of(out)["items_read"] == 2


def test_a_work_file_of_the_previous_layout_is_migrated_and_resumes(tmp_path, build):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "x.png").write_bytes(png_bytes("red"))
    out = tmp_path / "idx"
    assert build(tmp_path / "A", out) == 0
    work = out / "work" / "rank-00000.sqlite"
    db = sqlite3.connect(work)  # rewrite it as the previous layout: uid alone is the key
    with db:
        db.executescript(
            "CREATE TABLE old (uid TEXT PRIMARY KEY, shard INTEGER, pos INTEGER, status TEXT, reason TEXT, source TEXT, "
            "caption TEXT, license TEXT, sha256 TEXT, width INTEGER, height INTEGER, vector BLOB);"
            "INSERT INTO old SELECT uid, shard, pos, status, reason, source, caption, license, sha256, width, height, "
            "vector FROM items; DROP TABLE items; ALTER TABLE old RENAME TO items;")
    db.close()
    assert WorkDB(work).done_uids(0) == {"x.png"}
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "x.png").write_bytes(png_bytes("blue"))
    assert build(tmp_path / "B", out, update=True) == 0 and report_of(out)["count"] == 2


def test_a_key_repeated_later_in_a_shard_and_a_repeated_table_row_lose_nothing(tmp_path, build):
    shards = tmp_path / "shards"
    shards.mkdir()
    colors = ["red", "green", "blue", "yellow", "white"]
    keys = ["a", "b", "a", "c", "d"]  # "a" again, not adjacent: another sample
    write_shard(shards / "s-0.tar", [(k, png_bytes(c), f"a {c} square") for k, c in zip(keys, colors)])
    out = tmp_path / "idx"
    assert build(shards / "s-0.tar", out) == 0
    report = report_of(out)
    assert (report["items_read"], report["count"], report["failed"]) == (5, 5, 0)
    captions = {r[0] for r in FaissIndex(out).db.execute("SELECT caption FROM images")}
    assert captions == {f"a {c} square" for c in colors}

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.png").write_bytes(png_bytes("red"))
    (tmp_path / "t" / "list.tsv").write_text("path\tcaption\na.png\tfirst\na.png\tagain\n")
    assert build(tmp_path / "t" / "list.tsv", tmp_path / "tidx") == 0
    report = report_of(tmp_path / "tidx")
    assert (report["count"], report["duplicates"], report["items_read"]) == (1, 1, 2)


# ---- what a folder holds besides files ---------------------------------------------------------------


def test_dangling_links_fifos_and_links_out_are_counted_never_opened(tmp_path, build):
    imgs, secret = tmp_path / "imgs", tmp_path / "outside" / "secret"
    imgs.mkdir()
    secret.mkdir(parents=True)
    (secret / "private.png").write_bytes(png_bytes("black"))
    (imgs / "ok.png").write_bytes(png_bytes("red"))
    (imgs / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(imgs / "fifo.png")
    os.mkfifo(imgs / "ok.txt")  # a caption that is a FIFO: the image kept, the caption counted
    (imgs / "linked.png").symlink_to("../outside/secret/private.png")
    (imgs / "album").symlink_to(secret)  # a folder link out
    (imgs / "z-inner.png").symlink_to("ok.png")  # a link that stays inside: read (a duplicate of ok.png)
    finished, rc = in_thread(lambda: build(imgs, tmp_path / "idx"), 60)
    assert finished and rc == 0
    out = tmp_path / "idx"
    reasons = reasons_of(out)
    assert reasons["dangling.png"].startswith("dangling link")
    assert reasons["fifo.png"].startswith("not a regular file") and "FIFO" in reasons["fifo.png"]
    assert "points outside the source" in reasons["linked.png"]
    assert "points outside the source" in reasons["album"]
    report = report_of(out)
    assert (report["count"], report["failed"], report["duplicates"], report["bad_captions"]) == (1, 4, 1, 1)
    assert "ok.txt is unusable" in report["bad_caption_items"][0]["reason"]
    assert report["failed_by_kind"] == {"dangling link": 1, "link outside the source": 2, "not a regular file": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_roots"] == [os.path.realpath(imgs)]
    assert all("secret" not in s for s in sources_of(out))


def test_a_folder_that_cannot_be_listed_is_counted(tmp_path, build, monkeypatch):
    imgs = tmp_path / "imgs"
    (imgs / "locked").mkdir(parents=True)
    (imgs / "ok.png").write_bytes(png_bytes("red"))
    (imgs / "locked" / "hidden.png").write_bytes(png_bytes("blue"))
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would, for any user (root lists everything)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        assert build(imgs, tmp_path / "idx") == 0
    assert reasons_of(tmp_path / "idx") == {"locked/": "unreadable folder: locked/ could not be listed (Permission denied)"}


def test_a_shard_that_is_a_fifo_is_counted_not_opened(tmp_path, build):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "s-0.tar", [("a", png_bytes("red"), "a red square")])
    os.mkfifo(shards / "s-1.tar")
    finished, rc = in_thread(lambda: build(f"{shards}/s-{{0..1}}.tar", tmp_path / "idx"), 60)
    assert finished and rc == 0
    (reason,) = reasons_of(tmp_path / "idx").values()
    assert reason == "broken shard: unreadable shard: s-1.tar is a FIFO; it is not opened"
    assert report_of(tmp_path / "idx")["count"] == 1


def test_a_file_name_that_is_not_utf8_is_counted_and_the_rest_indexed(tmp_path, build, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "ok.png").write_bytes(png_bytes("red"))
    (imgs / os.fsdecode(b"caf\xe9.png")).write_bytes(png_bytes("blue"))
    assert build(imgs, tmp_path / "idx") == 0
    reasons = reasons_of(tmp_path / "idx")
    assert reasons == {"caf\\xe9.png": "bad name: the file name 'caf\\\\xe9.png' is not UTF-8 text; rename it to index it"}
    assert report_of(tmp_path / "idx")["count"] == 1


# ---- trust: an index received from someone else ------------------------------------------------------


def test_updating_a_received_index_never_vouches_for_the_folders_its_rows_name(tmp_path, build, monkeypatch):
    private = tmp_path / "home" / "private"
    private.mkdir(parents=True)
    (private / "secret.png").write_bytes(png_bytes("black"))
    theirs, mine, out = tmp_path / "theirs", tmp_path / "mine", tmp_path / "received"
    for folder, color in ((theirs, "red"), (mine, "blue")):
        folder.mkdir()
        (folder / f"{color}.png").write_bytes(png_bytes(color))

    monkeypatch.setenv("GILL_INDEX_KEY_FILE", str(tmp_path / "their-key"))  # someone else builds it ...
    assert build(theirs, out) == 0
    work = WorkDB(out / "work" / "rank-00000.sqlite")  # ... and plants a row naming a file of yours
    work.commit([Row("planted", 0, 99, "ok", source=str(private / "secret.png"), sha256="f" * 64, width=32,
                     height=32, vector=np.ones(16, np.float32).tobytes())])
    work.close()

    monkeypatch.setenv("GILL_INDEX_KEY_FILE", str(tmp_path / "index-key"))  # you update it with your source
    assert build(mine, out, update=True) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_roots"] == [os.path.realpath(mine)]

    import gill.retrieval

    opened = []
    real_open = gill.retrieval.open_image
    monkeypatch.setattr(gill.retrieval, "open_image", lambda src, **kw: opened.append(str(src)) or real_open(src, **kw))
    index = open_index(out)
    records = {Path(s).name: ImageRecord(i, s) for i, s in enumerate(sources_of(out))}
    assert index.load_image(records["blue.png"]).size == (32, 32)  # your own folder: read
    for name in ("secret.png", "red.png"):  # what the received index names: not read
        with pytest.raises(SourceOutsideError):
            index.load_image(records[name])
    assert not any("secret" in p or "theirs" in p for p in opened), opened


# ---- swapped files -----------------------------------------------------------------------------------


def planted(out: Path, n: int, seed: int, caption: str) -> None:
    vectors = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    work = WorkDB(out / "work" / "rank-00000.sqlite")
    work.commit([Row(f"img{i}", 0, i, "ok", source=f"https://example.invalid/{i}.png", caption=f"{caption} {i}",
                     sha256=f"sha{i}", width=8, height=8, vector=vectors[i].tobytes()) for i in range(n)])
    work.close()
    finalize(out, dim=16, fingerprint="fp", model="test", index_type="flat")


@pytest.mark.parametrize("kind", ["index", "metadata"])
def test_a_file_swapped_for_another_indexs_of_the_same_size_is_refused_by_name(tmp_path, kind):
    planted(tmp_path / "a", 10, seed=0, caption="red")
    planted(tmp_path / "b", 10, seed=1, caption="blu")
    mine = tmp_path / "a" / json.loads((tmp_path / "a" / "manifest.json").read_text())["files"][kind]
    other = tmp_path / "b" / json.loads((tmp_path / "b" / "manifest.json").read_text())["files"][kind]
    assert mine.stat().st_size == other.stat().st_size
    shutil.copyfile(other, mine)
    with pytest.raises(IndexFormatError, match="sha256 differs") as err:
        open_index(tmp_path / "a", "fp")
    assert err.value.path == mine and mine.name in str(err.value)


# ---- an empty index ----------------------------------------------------------------------------------


def test_an_empty_index_is_said_so_by_build_query_and_generate(tmp_path, build, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.png").write_text("not a picture")
    out = tmp_path / "idx"
    assert build(tmp_path / "imgs", out) == 1
    err = capsys.readouterr().err
    assert f"{out}: the index is empty" in err and "1 failed" in err and "report.json" in err

    from index.query import main as query

    assert query(["--model", "no-such-model", "--index", str(out), "--text", "a red car"]) == 1
    assert f"{out}: the index is empty" in capsys.readouterr().err

    from gill.__main__ import main as gill_main

    assert gill_main(["generate", "--model", "tiny-random", "--index", str(out), "--policy", "retrieve",
                      "--max-new-tokens", "4", "--out", str(tmp_path / "answer"), "a red square"]) == 1
    assert f"the retrieval index {out} is empty" in capsys.readouterr().err


# ---- sizes and times ---------------------------------------------------------------------------------


def test_a_3gb_file_in_a_folder_is_refused_from_its_size_unread(tmp_path, build):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "ok.png").write_bytes(png_bytes("red"))
    with open(imgs / "huge.png", "wb") as f:
        f.truncate(3 * GB)  # sparse: no disk used
    growth, rc = peak_growth(lambda: build(imgs, tmp_path / "idx"))
    assert rc == 0 and growth < GB, growth / GB
    reasons = reasons_of(tmp_path / "idx")
    assert reasons["huge.png"] == "too large: the file is 3.0 GB; at most 64.0 MB is read"


def _sparse_tar(path: Path, members) -> None:
    """A tar of (name, bytes) members, or (name, size) for a member of ``size`` zero bytes left as a hole."""
    import tarfile

    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            if isinstance(data, int):
                f.seek(data, os.SEEK_CUR)
            else:
                f.write(data)
            f.seek((-info.size) % 512, os.SEEK_CUR)
        f.write(b"\0" * 1024)


def test_a_3gb_member_of_a_shard_is_refused_from_its_header_unread(tmp_path, build):
    shard = tmp_path / "s-0.tar"
    _sparse_tar(shard, [("a.png", png_bytes("red")), ("a.txt", b"a red square"), ("big.png", 3 * GB),
                        ("big.txt", b"huge"), ("c.png", png_bytes("blue"))])
    growth, rc = peak_growth(lambda: build(shard, tmp_path / "idx"))
    assert rc == 0 and growth < GB, growth / GB
    report = report_of(tmp_path / "idx")
    assert (report["count"], report["failed"], report["items_read"]) == (2, 1, 3)
    assert reasons_of(tmp_path / "idx") == {f"{shard}#big.png": "too large: big.png is 3.0 GB; at most 64.0 MB is read"}


class _Server:
    """A local HTTP server (127.0.0.1 only) whose handler is ``respond(handler)``."""

    def __init__(self, respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _stream_zeros(handler, total: int, length_header: bool) -> None:
    handler.send_response(200)
    if length_header:
        handler.send_header("Content-Length", str(total))
    handler.end_headers()
    block = b"\0" * (1 << 20)
    for _ in range(total // len(block)):
        handler.wfile.write(block)


@pytest.mark.parametrize("length_header", [True, False])
def test_a_1_5gb_url_body_is_refused_without_reading_it_all(tmp_path, build, length_header):
    server = _Server(lambda h: _stream_zeros(h, 1536 * 2**20, length_header) if "big" in h.path
                     else (h.send_response(200), h.send_header("Content-Length", "0"), h.end_headers()))
    try:
        (tmp_path / "list.tsv").write_text(f"url\n{server.url}/big.png\n")
        growth, rc = peak_growth(lambda: build(tmp_path / "list.tsv", tmp_path / "idx", "--url-timeout", "30"))
    finally:
        server.close()
    assert rc == 1 and growth < GB, growth / GB  # 1: nothing indexed
    (reason,) = reasons_of(tmp_path / "idx").values()
    assert reason.startswith("too large: the URL's body is")
    assert ("is 1.5 GB" if length_header else "is over 64.0 MB") in reason, reason


def _drip_body(handler) -> None:
    handler.send_response(200)
    handler.end_headers()
    for _ in range(30):
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(2)


def _drip_headers(handler) -> None:
    handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
    for _ in range(30):
        handler.wfile.write(b"X")
        handler.wfile.flush()
        time.sleep(2)


@pytest.mark.parametrize("drip", [_drip_body, _drip_headers])
def test_a_url_that_drips_a_byte_every_2s_is_given_up_after_the_total_timeout(drip):
    from index.sources import fetch_url

    server = _Server(drip)
    try:
        start = time.monotonic()
        finished, result = in_thread(lambda: fetch_url(server.url + "/drip.png", 3.0), 20)
        took = time.monotonic() - start
    finally:
        server.close()
    assert finished and took < 6, took
    data, reason = result
    assert data is None and reason == "unreachable URL: timed out after 3 s in total (--url-timeout)"


CLAIMED_VECTORS = 750_000_000


def _faiss_bomb(vectors: int = CLAIMED_VECTORS, d: int = 4) -> bytes:
    """61 bytes: an IndexFlatIP header claiming ``vectors`` vectors of dim ``d``, and 16 bytes of them."""
    header = b"IxFI" + struct.pack("<iqqq?i", d, vectors, 1 << 20, 1 << 20, True, 0)
    return header + struct.pack("<Q", vectors * d) + b"\0" * 16


@pytest.mark.parametrize("manifest_agrees", [False, True])
def test_a_61_byte_faiss_file_claiming_750m_vectors_is_refused_before_faiss_allocates(tmp_path, manifest_agrees):
    planted(tmp_path, 10, seed=0, caption="red")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    path = tmp_path / manifest["files"]["index"]
    path.write_bytes(_faiss_bomb())
    assert path.stat().st_size == 61
    if manifest_agrees:  # a manifest written to match: the file's length gives it away
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "count": CLAIMED_VECTORS, "dim": 4}))
    growth, err = peak_growth(lambda: open_index(tmp_path, "fp"))
    assert isinstance(err, IndexFormatError) and err.path == path, err
    assert growth < GB, growth / GB


def test_a_36_byte_pickle_calling_bytearray_3e9_is_refused(tmp_path):
    from gill.retrieval import read_original_embeddings

    bomb = tmp_path / "cc3m_embeddings_urls.npy"
    # PROTO 2, GLOBAL builtins.bytearray, LONG1 3e9, TUPLE1, REDUCE, STOP
    bomb.write_bytes(b"\x80\x02cbuiltins\nbytearray\n\x8a\x05" + (3 * 10**9).to_bytes(5, "little") + b"\x85R.")
    assert bomb.stat().st_size <= 36
    growth, err = peak_growth(lambda: read_original_embeddings(bomb))
    assert isinstance(err, ValueError) and "refused" in str(err) and "bytearray" in str(err), err
    assert growth < GB, growth / GB

    import pickle

    good = tmp_path / "good.npy"  # what the original's pickles hold still reads, in every protocol
    vectors = [np.arange(16, dtype=np.float32) + i for i in range(3)]
    for protocol in (2, 4, 5):
        good.write_bytes(pickle.dumps({"paths": ["u0", "u1", "u2"], "embeddings": vectors, "x": b""}, protocol=protocol))
        paths, arr = read_original_embeddings(good)
        assert paths == ["u0", "u1", "u2"] and np.array_equal(arr, np.stack(vectors))


# ---- a failed write; quiet output --------------------------------------------------------------------


def _full_work_db(m):
    def full(self, rows):
        raise sqlite3.OperationalError("database or disk is full")

    m.setattr(WorkDB, "commit", full)


def _full_faiss_write(m):
    import faiss

    def full(index, path):
        raise RuntimeError("Error in faiss::FileIOWriter: write error\nNo space left on device (disk is full)")

    m.setattr(faiss, "write_index", full)


@pytest.mark.parametrize("fill", [_full_work_db, _full_faiss_write])
def test_a_full_disk_during_an_update_is_one_line_and_the_old_index_stays(tmp_path, build, monkeypatch, capsys, fill):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "a.png").write_bytes(png_bytes("red"))
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "b.png").write_bytes(png_bytes("blue"))
    out = tmp_path / "idx"
    assert build(tmp_path / "A", out) == 0
    capsys.readouterr()

    with monkeypatch.context() as m:
        fill(m)
        assert build(tmp_path / "B", out, update=True) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "disk is full" in err and "previous index is unchanged" in err
    assert len(open_index(out)) == 1
    assert build(tmp_path / "B", out, update=True) == 0 and len(open_index(out)) == 2  # the next run works


@pytest.mark.slow  # a subprocess loading a model: in the slow step
def test_index_query_prints_no_loading_bars_or_library_warnings(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes("red"))
    env = {**os.environ, "GILL_INDEX_KEY_FILE": str(tmp_path / "key")}
    subprocess.run([sys.executable, "-m", "index.build", "--model", "tiny-random", "--source", tmp_path / "imgs",
                    "--out", tmp_path / "idx", "--no-progress"], cwd=ROOT, env=env, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "index.query", "--model", "tiny-random", "--index", tmp_path / "idx",
                          "--text", "a red square", "-k", "1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "a.png" in out.stdout
    assert out.stderr == "", out.stderr


def _blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, a few kB: decoded as RGB it is width * height * 3 bytes."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    c = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(c.compress(row) for _ in range(height)) + c.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_batch_of_large_photos_is_embedded_in_parts_within_a_memory_bound(tmp_path, build):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(12):  # 36 MP each, distinct: 12 held at once as RGB would be 1.3 GB
        (imgs / f"{i:02d}.png").write_bytes(_blank_png(6000 + i, 6000))
    growth, rc = peak_growth(lambda: build(imgs, tmp_path / "idx", "--batch-size", "12"))
    assert rc == 0 and growth < GB, growth / GB
    assert report_of(tmp_path / "idx")["count"] == 12
