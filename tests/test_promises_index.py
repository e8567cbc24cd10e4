"""Index promises with no test before: the ``ivfpq`` and ``auto`` index types, parquet tables and ``pipe:``
shard sources, each built and queried, the exact item found first."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill.retrieval import FaissIndex, open_index
from index.store import Row, WorkDB, finalize

from synthetic import png_bytes, write_shard

pytestmark = pytest.mark.usefixtures("own_index_key")

COLOURS = ["red", "green", "blue", "yellow", "purple"]


def planted(out: Path, n: int, dim: int, index_type: str | None) -> np.ndarray:
    """An index of ``n`` random vectors (in ``dim`` dimensions: far from each other), built as index.build does."""
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    work = WorkDB(out / "work" / "rank-00000.sqlite")
    work.commit([Row(f"img{i}", 0, i, "ok", source=f"/data/img{i}.jpg", caption=f"caption {i}", license="CC0",
                     sha256=f"sha{i}", width=10, height=20, vector=vectors[i].tobytes()) for i in range(n)])
    work.close()
    finalize(out, dim=dim, fingerprint="fp", model="test", index_type=index_type)
    return vectors


@pytest.mark.parametrize("index_type, built", [("ivfpq", "ivfpq"), (None, "flat")])  # None: --index-type auto
def test_ivfpq_and_auto_find_every_item_first(tmp_path, index_type, built):
    """Every one of 1000 items, queried with its own vector, comes back at rank 1 with its record (ivfpq at its
    default 64 codes per 256 dimensions; auto is exact search at this size)."""
    vectors = planted(tmp_path, 1000, 64, index_type)
    index = open_index(tmp_path, "fp")
    assert index.manifest.index_type == built and len(index) == 1000
    if built == "ivfpq":
        assert index.manifest.index_params["pq_m"] == 16  # 64 / 4: 1 byte per 4 dimensions
    hits = index.search(torch.from_numpy(vectors), k=1)
    assert [h[0].record.id for h in hits] == list(range(1000))
    assert (hits[7][0].record.source, hits[7][0].record.caption) == ("/data/img7.jpg", "caption 7")


def folder(root: Path) -> dict[str, bytes]:
    root.mkdir()
    pictures = {}
    for i, colour in enumerate(COLOURS):
        pictures[colour] = png_bytes(colour, (30 + i, 32))
        (root / f"{colour}.png").write_bytes(pictures[colour])
    return pictures


def first_hits(out: Path, embedder, pictures: dict[str, bytes]) -> dict[str, tuple]:
    """For each picture, the (source, caption, license) the built index ranks first when queried with it."""
    import io

    index = FaissIndex(out)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pictures.values()]
    with torch.no_grad():
        hits = index.search(embedder.embed(images), k=1)
    return {c: (h[0].record.source, h[0].record.caption, h[0].record.license) for c, h in zip(pictures, hits)}


def test_index_build_types_auto_and_ivfpq_from_the_command_line(tmp_path, build, embedder, capsys):
    """``--index-type auto`` on a folder builds exact search and finds each picture first; ``ivfpq`` on a
    source too small to train its codes is one line naming the type and the count, not faiss's traceback."""
    pictures = folder(tmp_path / "imgs")
    assert build(tmp_path / "imgs", tmp_path / "auto", "--index-type", "auto") == 0
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert (report["index_type"], report["count"], report["failed"]) == ("flat", 5, 0)
    found = first_hits(tmp_path / "auto", embedder, pictures)
    assert {c: Path(s).name for c, (s, _, _) in found.items()} == {c: f"{c}.png" for c in COLOURS}
    capsys.readouterr()
    assert build(tmp_path / "imgs", tmp_path / "pq", "--index-type", "ivfpq") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: index type ivfpq trains 256 codes per sub-vector and needs at least 256 images; this "
                   "index has 5: choose flat, ivf or hnsw (or auto)")


def test_a_parquet_table_is_an_index_source(tmp_path, build, embedder):
    """A parquet table of paths, captions and licenses: every row indexed with its caption and license, each
    picture found first."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pictures = folder(tmp_path / "imgs")
    table = pa.table({"path": [f"imgs/{c}.png" for c in COLOURS], "caption": [f"a {c} square" for c in COLOURS],
                      "license": ["CC0", "CC-BY", "CC0", "MIT", "CC0"]})
    pq.write_table(table, tmp_path / "list.parquet")
    assert build(tmp_path / "list.parquet", tmp_path / "idx") == 0
    report = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert (report["count"], report["failed"]) == (5, 0)
    found = first_hits(tmp_path / "idx", embedder, pictures)
    licenses = dict(zip(COLOURS, table.column("license").to_pylist()))
    assert found == {c: (str(tmp_path / "imgs" / f"{c}.png"), f"a {c} square", licenses[c]) for c in COLOURS}


def test_a_pipe_source_reads_its_shard(tmp_path, build, embedder):
    """``pipe:cat SHARD`` (webdataset's pipe URL): every sample of the shard indexed with its caption, each
    picture found first, its source the pipe URL and key."""
    pictures = {c: png_bytes(c, (30 + i, 32)) for i, c in enumerate(COLOURS)}
    shard = tmp_path / "s-0.tar"
    write_shard(shard, [(f"k{i}", pictures[c], f"a {c} square") for i, c in enumerate(COLOURS)])
    url = f"pipe:cat {shard}"
    assert build(url, tmp_path / "idx") == 0
    report = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert (report["count"], report["failed"], report["items_read"]) == (5, 0, 5)
    found = first_hits(tmp_path / "idx", embedder, pictures)
    assert found == {c: (f"{url}#k{i}", f"a {c} square", "") for i, c in enumerate(COLOURS)}
