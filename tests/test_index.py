import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gill.retrieval import FaissIndex, IndexMismatchError, open_index
from index.import_original import read_original
from index.store import Row, WorkDB, finalize

from synthetic import png_bytes, write_shard

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("own_index_key")


def run(module, *args, env=None, check=True):
    out = subprocess.run([sys.executable, "-m", module, *map(str, args), "--no-progress"] if module.startswith("index.build") or module == "index.update" else [sys.executable, "-m", module, *map(str, args)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(out.stderr)
    return out


def planted(tmp_path, n, dim=16, index_type=None, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    work = WorkDB(tmp_path / "work" / "rank-00000.sqlite")
    work.commit([Row(f"img{i}", 0, i, "ok", source=f"/data/img{i}.jpg", caption=f"caption {i}", license="CC-BY",
                     sha256=f"sha{i}", width=10 + i, height=20, vector=vectors[i].tobytes()) for i in range(n)])
    work.close()
    finalize(tmp_path, dim=dim, fingerprint="fp", model="test", index_type=index_type, nlist=32, nprobe=8)
    return vectors


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_planted_embeddings_come_back_first_with_provenance(tmp_path, index_type):
    vectors = planted(tmp_path, 2000, index_type=index_type)
    index = open_index(tmp_path, "fp")
    assert index.manifest.index_type == index_type and len(index) == 2000
    rng = np.random.default_rng(1)
    targets = [0, 17, 999, 1999]
    queries = torch.tensor(vectors[targets] + 0.01 * rng.normal(size=(4, 16)), dtype=torch.float32)
    hits = index.search(queries, k=3, scale=2.0)
    for t, row in zip(targets, hits):
        r = row[0].record
        assert (r.id, r.source, r.caption, r.sha256, r.width, r.license) == (t, f"/data/img{t}.jpg", f"caption {t}", f"sha{t}", 10 + t, "CC-BY")
        assert row[0].score == pytest.approx(2.0, abs=0.01)  # scale * cosine of a near-identical vector
    # excluding the planted image by hash or source returns the next best instead
    again = index.search(queries[:1], k=1, exclude=[{"sha0"}])[0][0]
    assert again.record.id != 0


def make_folder(root: Path):
    root.mkdir(parents=True)
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "navy"]):
        (root / f"{i:02d}.png").write_bytes(png_bytes(color, (30 + i, 32)))
        (root / f"{i:02d}.txt").write_text(f"a {color} square")
    (root / "10_dup.png").write_bytes(png_bytes("red", (30, 32)))
    (root / "11_corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "12_truncated.png").write_bytes(png_bytes("cyan")[:40])


def index_state(path: Path):
    import sqlite3

    manifest = json.loads((path / "manifest.json").read_text())
    files = manifest.pop("files")  # each generation's file names are its own
    manifest.pop("file_sha256")  # the files' hashes: their bytes and rows are compared below
    db = sqlite3.connect(path / files["metadata"])
    rows = db.execute("SELECT * FROM images ORDER BY id").fetchall()
    db.close()
    return (path / files["index"]).read_bytes(), rows, manifest


@pytest.mark.slow  # end to end through subprocesses: in the slow step
def test_folder_build_reports_bad_files(tmp_path):
    make_folder(tmp_path / "imgs")
    whole = tmp_path / "whole"
    run("index.build", "--model", "tiny-random", "--source", tmp_path / "imgs", "--out", whole, "--batch-size", "3")
    report = json.loads((whole / "report.json").read_text())
    assert report["count"] == 10 and report["duplicates"] == 1 and report["failed"] == 2
    reasons = {f["uid"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {"11_corrupt.jpg", "12_truncated.png"} and all(r.startswith("bad image:") for r in reasons.values())



class HangingImageServer:
    """A local HTTP server whose one image hangs until released: a build stalls on it at a known point."""

    def __init__(self, image: bytes):
        import http.server
        import threading

        self.release, self.asked = threading.Event(), threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.asked.set()
                outer.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/slow.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()


@pytest.mark.slow  # end to end through subprocesses: in the slow step
def test_a_build_killed_by_sigkill_mid_batch_resumes_to_an_identical_index(tmp_path):
    """kill -9 while a batch waits on a slow URL: the two committed batches are kept, the rerun reads only
    what was not committed, and the index equals one built without the kill."""
    import signal
    import time

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "navy"]
    for i, colour in enumerate(colours):
        (tmp_path / f"{i:02d}.png").write_bytes(png_bytes(colour, (30 + i, 32)))
    server = HangingImageServer(png_bytes("teal"))
    try:
        lines = [f"{i:02d}.png\ta {c} square" for i, c in enumerate(colours[:6])]
        lines += [f"{server.url}\ta slow teal square"]
        lines += [f"{i + 6:02d}.png\ta {c} square" for i, c in enumerate(colours[6:])]
        table = tmp_path / "list.tsv"
        table.write_text("url\tcaption\n" + "\n".join(lines) + "\n")
        build = [sys.executable, "-m", "index.build", "--model", "tiny-random", "--source", str(table),
                 "--batch-size", "3", "--url-timeout", "120", "--no-progress", "--out"]
        killed = tmp_path / "killed"
        proc = subprocess.Popen([*build, str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            work = killed / "work" / "rank-00000.sqlite"
            while not (server.asked.is_set() and work.exists() and len(WorkDB(work).done_uids()) == 6):
                assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it stalled"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL and not (killed / "manifest.json").exists()
        server.release.set()
        resumed = run("index.build", "--model", "tiny-random", "--source", table, "--out", killed,
                      "--batch-size", "3", "--url-timeout", "120")
        # the six committed rows were not read again; the stalled batch and the rest were
        assert "rank 0: {'embedded': 5, 'duplicates': 0, 'failed': 0, 'skipped_done': 6}" in resumed.stderr
        whole = tmp_path / "whole"
        run("index.build", "--model", "tiny-random", "--source", table, "--out", whole, "--batch-size", "3")
    finally:
        server.close()
    assert index_state(killed) == index_state(whole)
    assert len(FaissIndex(whole)) == 11


def test_shards_and_tables_with_broken_parts(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "s-0.tar", [(f"a{i}", png_bytes(c), f"shard zero {c}") for i, c in enumerate(["red", "green", "blue"])])
    write_shard(shards / "s-1.tar", [(f"b{i}", png_bytes(c, (20 + i, 20)), f"shard one {c}") for i, c in enumerate(["white", "black", "navy", "gray"])])
    data = (shards / "s-1.tar").read_bytes()
    cut = data.index(b"IEND", data.index(b"b2.png")) - 20
    (shards / "s-1.tar").write_bytes(data[:cut])  # truncated inside the third sample's image
    out = tmp_path / "from-shards"
    run("index.build", "--model", "tiny-random", "--source", f"{shards}/s-{{0..1}}.tar", "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 5  # s-0's three and the two samples of s-1 before the cut
    # the one broken shard: each of its errors reported under its name, nothing else failed
    assert report["failed"] == report["failed_by_kind"]["broken shard"] == len(report["failures"]) >= 1
    assert all(f["uid"].startswith(f"{shards}/s-1.tar#error") for f in report["failures"]), report["failures"]
    reasons = [f["reason"] for f in report["failures"]]
    assert any("truncated shard" in r for r in reasons), reasons
    index = FaissIndex(out)
    captions = {r[0] for r in index.db.execute("SELECT caption FROM images")}
    assert captions == {"shard zero red", "shard zero green", "shard zero blue", "shard one white", "shard one black"}

    table = tmp_path / "list.tsv"
    (tmp_path / "ok.png").write_bytes(png_bytes("teal"))
    table.write_text("url\tcaption\tlicense\n"
                     "ok.png\ta teal square\tCC0\n"
                     "missing.png\tgone\t\n"
                     "http://127.0.0.1:9/nothing.png\tunreachable\t\n")
    out = tmp_path / "from-table"
    run("index.build", "--model", "tiny-random", "--source", table, "--out", out, "--url-timeout", "2")
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 1 and report["failed"] == 2
    reasons = {f["uid"]: f["reason"] for f in report["failures"]}
    assert reasons["missing.png"].startswith("unreadable file") and reasons["http://127.0.0.1:9/nothing.png"].startswith("unreachable URL")
    rec = FaissIndex(out).search(torch.randn(1, 16), k=1)[0][0].record
    assert (rec.caption, rec.license, rec.source) == ("a teal square", "CC0", str(tmp_path / "ok.png"))


@pytest.mark.slow  # end to end through subprocesses: in the slow step
def test_update_appends_with_stable_ids_and_fingerprints_are_checked(tmp_path):
    make_folder(tmp_path / "imgs")
    more = tmp_path / "more"
    more.mkdir()
    for c in ["pink", "brown", "red"]:  # red is already in the index
        (more / f"{c}.png").write_bytes(png_bytes(c, (30, 32)))
    out = tmp_path / "idx"
    run("index.build", "--model", "tiny-random", "--source", tmp_path / "imgs", "--out", out)
    before = index_state(out)[1]
    refused = run("index.build", "--model", "tiny-random", "--source", more, "--out", out, check=False)
    assert refused.returncode == 1 and "index.update" in refused.stderr
    run("index.update", "--model", "tiny-random", "--source", more, "--out", out)
    after = index_state(out)[1]
    assert after[: len(before)] == before and len(after) == len(before) + 2

    from gill import GILL

    gill = GILL.from_pretrained("tiny-random", index=out, load_diffusion=False)
    assert len(gill.retriever) == 12
    with pytest.raises(IndexMismatchError, match="another model's image-retrieval projection"):
        open_index(out, "0" * 64)
    assert len(open_index(out, "0" * 64, allow_mismatch=True)) == 12


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_importer_reads_data_and_refuses_code(tmp_path):
    good = tmp_path / "cc3m_embeddings_urls.npy"
    vectors = [np.random.default_rng(i).normal(size=16).astype(np.float32) for i in range(5)]
    with open(good, "wb") as f:
        pickle.dump({"paths": [f"http://example.invalid/{i}.jpg" for i in range(5)], "embeddings": vectors}, f)
    paths, arr = read_original(good)
    assert paths[3] == "http://example.invalid/3.jpg" and np.array_equal(arr[2], vectors[2])
    out = tmp_path / "imported"
    run("index.import_original", "--embeddings", good, "--model", "tiny-random", "--out", out)
    hit = FaissIndex(out).search(torch.tensor(vectors[4])[None], k=1)[0][0]
    assert hit.record.source == "http://example.invalid/4.jpg"

    evil = tmp_path / "evil.npy"
    with open(evil, "wb") as f:
        pickle.dump({"paths": ["x"], "embeddings": [_Evil()]}, f)
    with pytest.raises(ValueError, match="refused: the pickle asks for posix.system"):
        read_original(evil)
    bad = run("index.import_original", "--embeddings", evil, "--model", "tiny-random", "--out", tmp_path / "no", check=False)
    assert bad.returncode == 1 and "refused" in bad.stderr and "pwned" not in bad.stdout


@pytest.mark.slow
def test_two_rank_torchrun_build_equals_one_rank(tmp_path):
    make_folder(tmp_path / "imgs")
    run("index.build", "--model", "tiny-random", "--source", tmp_path / "imgs", "--out", tmp_path / "one", "--batch-size", "2")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "index.build",
         "--model", "tiny-random", "--source", str(tmp_path / "imgs"), "--out", str(tmp_path / "two"), "--batch-size", "2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "two" / "work").glob("rank-*.sqlite"))) == 2
    one, two = index_state(tmp_path / "one"), index_state(tmp_path / "two")
    assert one[1] == two[1] and one[2] == two[2]
    a, b = FaissIndex(tmp_path / "one"), FaissIndex(tmp_path / "two")
    np.testing.assert_allclose(a.index.reconstruct_n(0, len(a)), b.index.reconstruct_n(0, len(b)), atol=1e-5)


@pytest.mark.slow
def test_ivf_recall_at_10_on_100k_synthetic_vectors():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_index

    r = bench_index.run(count=100_000, dim=256, n_queries=300, k=10, types=("ivf",))
    assert r["ivf"]["recall"] >= 0.95
    assert r["ivf"]["speedup_vs_flat"] > 1.0  # and faster than exact search, measured in the same run


def test_an_index_carrying_its_images_can_be_moved(tmp_path):
    """Images inside the index directory are recorded relative to it: move the directory, and search
    results still load their pictures; images elsewhere keep their absolute path."""
    out = tmp_path / "idx"
    (out / "images").mkdir(parents=True)
    for name, color in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        (out / "images" / f"{name}.png").write_bytes(png_bytes(color))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "green.png").write_bytes(png_bytes((30, 200, 40)))
    run("index.build", "--model", "tiny-random", "--source", out / "images", "--out", out)
    run("index.update", "--model", "tiny-random", "--source", outside, "--out", out)
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    index = FaissIndex(moved)
    sources = {r.source for r in index_records(index)}
    assert sources == {"images/blue.png", "images/red.png", str(outside / "green.png")}
    for record in index_records(index):
        image = index.load_image(record)
        assert image.size == (32, 32)
    red = next(r for r in index_records(index) if r.source.endswith("red.png"))
    assert index.load_image(red).getpixel((5, 5)) == (220, 30, 30)


def index_records(index):
    from gill.retrieval import read_records

    return list(read_records(index.db, list(range(len(index)))).values())


def test_index_query_finds_the_exact_picture_by_text_and_by_image(tmp_path, capsys):
    """A successful ``python -m index.query`` on the shipped toy model and its index: a scene's caption, and
    the scene's own picture, each put that scene's picture first; --json lines carry rank, score, source,
    caption and hash; the plain lines are ranked."""
    from gill.presets import toy_dir
    from training.toy import world
    from index.query import main

    index = str(toy_dir() / "index")
    scenes = {s.caption(): s for s in world.all_scenes()}
    for caption in ("a large red circle on the left on white", "a small blue square on the right on gray"):
        assert main(["--model", "toy", "--index", index, "--text", f"{caption}.", "-k", "3", "--json"]) == 0
        hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] > hits[1]["score"] >= hits[2]["score"]
        assert hits[0]["caption"] == caption and hits[0]["source"] == f"images/{scenes[caption].key}-0.png"
        assert len(hits[0]["sha256"]) == 64
    scene = scenes["a small green triangle in the middle on gray"]
    world.render(scene).save(tmp_path / "q.png")
    assert main(["--model", "toy", "--index", index, "--image", str(tmp_path / "q.png"), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and f"images/{scene.key}-0.png" in lines[0]
