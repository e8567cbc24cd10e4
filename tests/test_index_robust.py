"""Bad data, bad files and bad arguments for the index recipes and the index reader: bad items are skipped
and counted with their reasons, bad files are named, bad flags are refused when parsed, a hit's image is
never read from outside the folders an index may read, and an interrupted finalize loses nothing."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import os
import shutil
import sqlite3
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import index.store as store
from gill.images import ImageError
from gill.retrieval import FaissIndex, ImageRecord, IndexFormatError, SourceOutsideError, open_index
from index.store import Row, WorkDB, finalize

from memory import peak_growth
from synthetic import png_bytes

pytestmark = pytest.mark.usefixtures("own_index_key")


# ---- files ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of any size, streamed: a 20000x20000 one is 49 kB on disk."""
    c = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(c.compress(row) for _ in range(height)) + c.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def wide_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (60000, 1)).save(buf, format="PNG")
    return buf.getvalue()  # 138 bytes


GOOD = {"00.png": ("red", (32, 32), "a red square"), "01.png": ("green", (40, 32), "a green square"),
        "03.png": ("blue", (32, 36), None), "05.png": ("yellow", (32, 32), "a yellow square")}
BAD = {  # name -> (bytes, what its reason says)
    "02_truncated.png": (png_bytes("cyan")[:60], "broken"),
    "04_bomb.png": (blank_png(20000, 20000), "too large"),
    "04_bomb_49mp.png": (blank_png(7000, 7000), "megapixels"),
    "06_wide.png": (wide_png(), "aspect ratio"),
    "07_empty.png": (b"", "not an image"),
    "08_zero.png": (blank_png(0, 0), "not an image"),
    "09_text.png": (b"just some notes, not a picture\n", "not an image"),
}


def write_good(folder: Path, bad_caption: bool) -> None:
    folder.mkdir(parents=True)
    for name, (color, size, caption) in GOOD.items():
        (folder / name).write_bytes(png_bytes(color, size))
        if caption:
            (folder / name).with_suffix(".txt").write_text(caption)
    if bad_caption:  # Latin-1, not UTF-8
        (folder / "03.txt").write_bytes("a blue square, caf\xe9".encode("latin-1"))


def rows_of(out: Path) -> list[tuple]:
    index = FaissIndex(out)
    rows = index.db.execute("SELECT id, source, caption, sha256, width, height FROM images ORDER BY id").fetchall()
    return [(i, Path(src).name, cap, sha, w, h) for i, src, cap, sha, w, h in rows]


def vectors_of(out: Path) -> np.ndarray:
    index = FaissIndex(out)
    return index.index.reconstruct_n(0, len(index))


def test_a_build_over_bad_files_keeps_exactly_the_good_images(tmp_path, build):
    write_good(tmp_path / "good", bad_caption=False)
    write_good(tmp_path / "mixed", bad_caption=True)
    for name, (data, _) in BAD.items():
        (tmp_path / "mixed" / name).write_bytes(data)
    assert build(tmp_path / "good", tmp_path / "good-index", "--batch-size", 3) == 0
    assert build(tmp_path / "mixed", tmp_path / "mixed-index", "--batch-size", 3) == 0

    report = json.loads((tmp_path / "mixed-index" / "report.json").read_text())
    assert (report["count"], report["failed"], report["duplicates"], report["bad_captions"]) == (4, len(BAD), 0, 1)
    reasons = {f["uid"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == set(BAD)
    for name, (_, says) in BAD.items():
        assert reasons[name].startswith("bad image: ") and says in reasons[name], (name, reasons[name])
    assert report["failed_by_kind"] == {"bad image": len(BAD)}
    (bad_caption,) = report["bad_caption_items"]
    assert bad_caption["uid"] == "03.png" and "03.txt is not UTF-8" in bad_caption["reason"]

    # the same images, ids, captions (the unreadable one empty) and vectors as a build of the good ones alone
    assert rows_of(tmp_path / "mixed-index") == rows_of(tmp_path / "good-index")
    assert [r[2] for r in rows_of(tmp_path / "mixed-index")] == ["a red square", "a green square", "", "a yellow square"]
    np.testing.assert_allclose(vectors_of(tmp_path / "mixed-index"), vectors_of(tmp_path / "good-index"), atol=1e-6)


def test_a_60000x1_png_costs_no_memory_through_the_build_path(tmp_path, build, embedder):
    # a processor resizing to 64 px like CLIP's 224 would: unchecked, the 60000x1 image costs 2.3 GB here
    big = copy.copy(embedder)
    big.image_processor = copy.deepcopy(embedder.image_processor)
    big.image_processor.size, big.image_processor.crop_size = {"shortest_edge": 64}, {"height": 64, "width": 64}
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "wide.png").write_bytes(wide_png())
    growth, rc = peak_growth(lambda: build(tmp_path / "imgs", tmp_path / "out", model_embedder=big))
    assert rc == 1 and growth < 2**30, growth / 2**30  # 1: nothing could be indexed, said so
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["count"] == 0 and "60000x1" in report["failures"][0]["reason"]

    # and an in-memory image handed to the embedder directly is checked before the processor resizes it
    growth, err = peak_growth(lambda: big.embed([Image.new("RGB", (60000, 1))]))
    assert isinstance(err, ImageError) and "image 0" in str(err) and "aspect ratio" in str(err)
    assert growth < 2**30, growth / 2**30


def test_table_rows_with_bad_cells_and_paths_leaving_the_folder(tmp_path, build):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(png_bytes("red"))
    (tmp_path / "data" / "b.png").write_bytes(png_bytes("blue"))
    (tmp_path / "outside.png").write_bytes(png_bytes("green"))
    table = tmp_path / "data" / "list.tsv"
    table.write_bytes(b"path\tcaption\n"
                      b"a.png\ta red square\n"
                      b"b.png\ta blue square, caf\xe9\n"  # Latin-1 caption
                      b"../outside.png\tclimbing out\n"
                      b"\tno path\n"
                      b"\xff\xfe.png\ta path that is not UTF-8\n")
    assert build(table, tmp_path / "idx") == 0
    report = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert (report["count"], report["failed"], report["bad_captions"]) == (2, 3, 1)
    reasons = {f["uid"]: f["reason"] for f in report["failures"]}
    assert "points outside" in reasons["../outside.png"] and "--allow-outside" in reasons["../outside.png"]
    assert "row 4's 'path' column is empty" in reasons["list.tsv:row 4"]
    assert "row 5's 'path' column is not UTF-8" in reasons["list.tsv:row 5"]
    assert "row 2's caption is not UTF-8" in report["bad_caption_items"][0]["reason"]
    assert {r[2] for r in rows_of(tmp_path / "idx")} == {"a red square", ""}

    assert build(table, tmp_path / "idx-out", "--allow-outside") == 0  # the explicit opt-in reads it
    assert json.loads((tmp_path / "idx-out" / "report.json").read_text())["count"] == 3


def test_a_source_that_is_not_there_or_not_a_table_is_named(tmp_path, build, capsys):
    assert build(tmp_path / "nothing", tmp_path / "idx") == 1
    assert "nothing" in capsys.readouterr().err
    (tmp_path / "big.csv").write_text("path,caption\na.png," + "x" * 200_000 + "\n")
    assert build(tmp_path / "big.csv", tmp_path / "idx") == 1
    err = capsys.readouterr().err
    assert "big.csv: line" in err and "not a well-formed CSV row" in err


# ---- flags ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, flag, value, says", [
    ("build", "--batch-size", "0", ">= 1"), ("build", "--batch-size", "-3", ">= 1"),
    ("build", "--batch-size", "many", ">= 1"), ("build", "--nlist", "0", ">= 1"), ("build", "--nprobe", "0", ">= 1"),
    ("build", "--url-timeout", "0", "> 0"), ("build", "--url-timeout", "-1", "> 0"),
    ("build", "--url-timeout", "nan", "> 0"), ("update", "--batch-size", "0", ">= 1"), ("query", "-k", "0", ">= 1"),
])
def test_bad_flag_values_are_refused_when_parsed(module, flag, value, says, capsys):
    import index.build
    import index.query
    import index.update

    required = (["--model", "m", "--index", "i", "--text", "t"] if module == "query"
                else ["--model", "m", "--source", "s", "--out", "o"])
    main = {"build": index.build.main, "update": index.update.main, "query": index.query.main}[module]
    with pytest.raises(SystemExit) as exit_:
        main([*required, flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err and value in err


def test_query_names_a_bad_image_before_loading_the_model(tmp_path, capsys):
    from index.query import main

    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert main(["--model", "no-such-model", "--index", str(tmp_path), "--image", str(notes)]) == 1
    err = capsys.readouterr().err
    assert "--image" in err and str(notes) in err and "not an image" in err


# ---- reading index directories ---------------------------------------------------------------------


def planted(out: Path, n: int, *, sources=None, start=0, dim=16, seed=0) -> np.ndarray:
    """Commit ``n`` rows with known vectors to the work state and finalize (no model involved)."""
    vectors = np.random.default_rng(seed).normal(size=(start + n, dim)).astype(np.float32)
    work = WorkDB(out / "work" / "rank-00000.sqlite")
    work.commit([Row(f"img{i}", 0, i, "ok", source=sources[i - start] if sources else f"https://example.invalid/{i}.png",
                     caption=f"caption {i}", sha256=f"sha{i}", width=8, height=8, vector=vectors[i].tobytes())
                 for i in range(start, start + n)])
    work.close()
    vouched = {os.path.dirname(s) for s in sources or () if os.path.isabs(s)}  # the folders "given" as sources
    finalize(out, dim=dim, fingerprint="fp", model="test", index_type="flat", vouched_roots=vouched)
    return vectors


def assert_consistent(out: Path, vectors: np.ndarray) -> int:
    """The index opens, and each of its vectors finds its own metadata row: never a mix of generations."""
    index = open_index(out, "fp")
    n = len(index)
    hits = index.search(torch.from_numpy(vectors[:n]), k=1)
    assert [h[0].record.id for h in hits] == list(range(n))
    assert [h[0].record.caption for h in hits] == [f"caption {i}" for i in range(n)]
    index.db.close()
    return n


def files(out: Path) -> dict[str, Path]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {kind: out / name for kind, name in manifest["files"].items()}


def _corrupt(out: Path, what: str) -> str:
    """Damage one file of an index directory; returns the file name the error must name."""
    f = files(out)
    if what == "index truncated":
        f["index"].write_bytes(f["index"].read_bytes()[:50])
    elif what == "index garbage":
        f["index"].write_bytes(b"garbage" * 40)
    elif what == "index missing":
        f["index"].unlink()
    elif what == "index of another size":
        import faiss

        other = faiss.IndexFlatIP(16)
        other.add(np.ones((3, 16), np.float32))
        faiss.write_index(other, str(f["index"]))
    elif what == "metadata garbage":
        f["metadata"].write_bytes(b"not a database at all" * 300)
    elif what == "metadata truncated":
        f["metadata"].write_bytes(f["metadata"].read_bytes()[:2048])
    elif what == "metadata short a row":
        db = sqlite3.connect(f["metadata"])
        with db:
            db.execute("DELETE FROM images WHERE id = 4")
        db.close()
    elif what == "metadata without images":
        db = sqlite3.connect(f["metadata"])
        with db:
            db.execute("DROP TABLE images")
        db.close()
    return f["index" if what.startswith("index") else "metadata"].name


@pytest.mark.parametrize("what, says", [
    ("index truncated", "not a readable FAISS index"), ("index garbage", "not a readable FAISS index"),
    ("index missing", "missing"), ("index of another size", "holds 3 vectors of dim 16; the manifest says 10"),
    ("metadata garbage", "not a readable SQLite database"), ("metadata truncated", "image rows|not a readable SQLite"),
    ("metadata short a row", "has 9 image rows"), ("metadata without images", "has no table images"),
])
def test_a_damaged_index_file_is_named_when_the_index_is_opened(tmp_path, what, says):
    planted(tmp_path, 10)
    name = _corrupt(tmp_path, what)
    with pytest.raises(IndexFormatError, match=says) as err:
        open_index(tmp_path, "fp")
    assert name in str(err.value) and err.value.path.name == name


@pytest.mark.parametrize("change, says", [
    (lambda m: "{not json", "not JSON"),
    (lambda m: "[1, 2]", "JSON list; expected the index manifest"),
    (lambda m: {**m, "dim": "16"}, "field 'dim' is '16'; expected an integer >= 1"),
    (lambda m: {**m, "count": -1}, "field 'count' is -1"),
    (lambda m: {**m, "count": True}, "field 'count' is True"),
    (lambda m: {**m, "index_type": "magic"}, "field 'index_type'"),
    (lambda m: {**m, "index_params": {"nprobe": "8"}}, "field 'index_params'"),
    (lambda m: {**m, "files": {"index": "../../etc/passwd", "metadata": m["files"]["metadata"]}}, "field 'files'"),
    (lambda m: {**m, "source_roots": "/"}, "field 'source_roots'"),
    (lambda m: {k: v for k, v in m.items() if k != "dim"}, r"missing manifest field\(s\) \['dim'\]"),
    (lambda m: {**m, "surprise": 1}, "unknown manifest field"),
    (lambda m: {**m, "format_version": 99}, "index format 99 is newer"),
])
def test_a_bad_manifest_is_named_with_the_field_at_fault(tmp_path, change, says):
    planted(tmp_path, 4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    new = change(manifest)
    (tmp_path / "manifest.json").write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(IndexFormatError, match=says) as err:
        open_index(tmp_path, "fp")
    assert "manifest.json" in str(err.value)


def test_a_format_1_directory_is_still_read_and_upgraded_by_the_next_finalize(tmp_path):
    vectors = planted(tmp_path, 5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for kind, name in (("index", "index.faiss"), ("metadata", "metadata.sqlite")):
        os.replace(tmp_path / manifest["files"][kind], tmp_path / name)
    v1 = {k: v for k, v in manifest.items() if k not in ("files", "source_roots", "roots_signature")}
    (tmp_path / "manifest.json").write_text(json.dumps({**v1, "format_version": 1}))
    assert assert_consistent(tmp_path, vectors) == 5
    vectors = planted(tmp_path, 2, start=5)
    assert assert_consistent(tmp_path, vectors) == 7
    assert not (tmp_path / "index.faiss").exists() and not (tmp_path / "metadata.sqlite").exists()


# ---- where a hit's image may be read from ----------------------------------------------------------


def test_hits_images_are_read_only_from_the_index_and_its_signed_source_folders(tmp_path, monkeypatch):
    out, own, secret = tmp_path / "idx", tmp_path / "photos", tmp_path / "secret"
    for folder, color in ((out / "images", "red"), (own, "green"), (secret, "blue")):
        folder.mkdir(parents=True)
        (folder / f"{color}.png").write_bytes(png_bytes(color))
    (out / "images" / "link.png").symlink_to(secret / "blue.png")
    planted(out, 2, sources=[str(out / "images" / "red.png"), str(own / "green.png")])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_roots"] == [os.path.realpath(own)] and manifest["roots_signature"]

    index = open_index(out, "fp")
    inside_record, own_record = (ImageRecord(0, "images/red.png"), ImageRecord(1, str(own / "green.png")))
    assert index.load_image(inside_record).getpixel((1, 1)) == (255, 0, 0)
    assert index.load_image(own_record).getpixel((1, 1)) == (0, 128, 0)

    # what a tampered or hostile metadata table could name: refused, named, nothing read
    for source in ("../secret/blue.png", "images/../../secret/blue.png", str(secret / "blue.png"), "images/link.png",
                   "/etc/passwd", "../../../../../../etc/passwd"):
        with pytest.raises(SourceOutsideError, match="outside the index directory") as err:
            index.load_image(ImageRecord(7, source))
        assert repr(source) in str(err.value) and "allow_outside=True" in str(err.value)
    # the explicit opt-ins read it
    assert open_index(out, "fp", allow_outside=True).load_image(ImageRecord(7, "images/link.png")).size == (32, 32)
    assert open_index(out, "fp", source_roots=[secret]).load_image(ImageRecord(7, "../secret/blue.png")).size == (32, 32)
    # a huge image inside the index is refused by size, not decoded
    (out / "images" / "bomb.png").write_bytes(blank_png(7000, 7000))
    with pytest.raises(ImageError, match="megapixels"):
        index.load_image(ImageRecord(8, "images/bomb.png"))

    # the same directory from someone else (another key): only what it carries is read
    monkeypatch.setenv("GILL_INDEX_KEY_FILE", str(tmp_path / "someone-elses-key"))
    stranger = open_index(out, "fp")
    assert stranger.load_image(inside_record).size == (32, 32)
    with pytest.raises(SourceOutsideError):
        stranger.load_image(own_record)
    # and a manifest that widens its roots loses its signature
    monkeypatch.setenv("GILL_INDEX_KEY_FILE", str(tmp_path / "index-key"))
    (out / "manifest.json").write_text(json.dumps({**manifest, "source_roots": ["/"]}))
    with pytest.raises(SourceOutsideError):
        open_index(out, "fp").load_image(ImageRecord(7, str(secret / "blue.png")))


# ---- writes --------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Like a kill or Ctrl-C: nothing in the code under test catches it."""


def _interrupting(monkeypatch, at: int) -> itertools.count:
    """Make finalize's writes raise at the ``at``-th point: before a write, after its data (not yet
    renamed), after its rename, and around the removal of the replaced files."""
    points = itertools.count()
    real_path, real_remove = store.atomic_path, store._remove_replaced

    def point():
        if next(points) == at:
            raise Interrupted

    @contextlib.contextmanager
    def atomic_path(path):
        point()
        with real_path(path) as tmp:
            yield tmp
            point()
        point()

    def atomic_write_text(path, text):
        with atomic_path(path) as tmp:
            tmp.write_text(text)

    def remove_replaced(*args):
        point()
        real_remove(*args)
        point()

    monkeypatch.setattr(store, "atomic_path", atomic_path)
    monkeypatch.setattr(store, "atomic_write_text", atomic_write_text)
    monkeypatch.setattr(store, "_remove_replaced", remove_replaced)
    return points


def test_an_update_interrupted_at_any_write_leaves_the_old_index_or_the_new_one(tmp_path, monkeypatch):
    template = tmp_path / "template"
    planted(template, 5)
    old_manifest = (template / "manifest.json").read_text()
    vectors = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    work = WorkDB(template / "work" / "rank-00000.sqlite")  # an update's embedded rows, not yet finalized
    work.commit([Row(f"img{i}", 0, i, "ok", source=f"https://example.invalid/{i}.png", caption=f"caption {i}",
                     sha256=f"sha{i}", vector=vectors[i].tobytes()) for i in range(5, 8)])
    work.close()

    with monkeypatch.context() as m:  # count the points of an uninterrupted finalize
        points = _interrupting(m, at=-1)
        finalize(shutil.copytree(template, tmp_path / "count"), dim=16, fingerprint="fp", model="test")
        total = next(points)
    seen = []
    for at in range(total):
        out = shutil.copytree(template, tmp_path / f"at-{at}")
        with monkeypatch.context() as m:
            _interrupting(m, at)
            with pytest.raises(Interrupted):
                finalize(out, dim=16, fingerprint="fp", model="test")
        count = assert_consistent(out, vectors)
        committed = (out / "manifest.json").read_text() != old_manifest
        assert count == (8 if committed else 5), at
        seen.append(count)
        # rerunning finishes the job and, once leftovers are stale, leaves only the named files
        with monkeypatch.context() as m:
            m.setattr(store, "STALE_AFTER_S", -1.0)
            finalize(out, dim=16, fingerprint="fp", model="test")
        assert assert_consistent(out, vectors) == 8
        names = {p.name for p in out.iterdir()}
        assert names == {"manifest.json", "report.json", "work", *(f.name for f in files(out).values())}, names
    assert 5 in seen and 8 in seen and total >= 12  # both sides of the commit point were interrupted


def test_two_finalizes_of_one_directory_do_not_collide_and_files_follow_the_umask(tmp_path):
    vectors = planted(tmp_path, 6)
    errors = []

    def again():
        try:
            finalize(tmp_path, dim=16, fingerprint="fp", model="test", index_type="flat")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    old = os.umask(0o027)
    try:
        threads = [threading.Thread(target=again) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old)
    assert not errors and assert_consistent(tmp_path, vectors) == 6
    for f in [*files(tmp_path).values(), tmp_path / "manifest.json"]:
        assert f.stat().st_mode & 0o777 == 0o640, f
