from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gill.backbones import tiny_backbones

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gill-original"


@pytest.fixture(scope="session")
def _tiny_cache():
    return {}


@pytest.fixture(params=["opt", "llama"])
def tiny(request, _tiny_cache):
    """Fresh copies of tiny random backbones (OPT-style tied, or Llama-style untied) and their config."""
    kind = request.param
    if kind not in _tiny_cache:
        _tiny_cache[kind] = tiny_backbones(lm_kind=kind, seed=0)
    backbones, config = _tiny_cache[kind]
    return copy.deepcopy(backbones), copy.deepcopy(config)


@pytest.fixture
def tiny_opt(_tiny_cache):
    if "opt" not in _tiny_cache:
        _tiny_cache["opt"] = tiny_backbones(lm_kind="opt", seed=0)
    backbones, config = _tiny_cache["opt"]
    return copy.deepcopy(backbones), copy.deepcopy(config)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data/gill-original is not present (a user's clone)")
    return SHARED


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_gill():
    """The tiny-random GILL with large [IMG] rows, so that it answers with images (the app's tests)."""
    from gill import GILL

    g = GILL.from_pretrained("tiny-random")
    torch.manual_seed(0)
    with torch.no_grad():
        g.model.adapter.img_embeddings.normal_(0, 1.0)
    return g


@pytest.fixture
def own_index_key(tmp_path, monkeypatch):
    """Index builds sign the source folders they record with this test's key, not the user's
    (~/.config/gill). The index test modules take it for every test (``pytestmark``)."""
    monkeypatch.setenv("GILL_INDEX_KEY_FILE", str(tmp_path / "index-key"))


@pytest.fixture(scope="module")
def embedder():
    """The tiny-random image embedder, loaded once a module."""
    from gill.loading import load_image_embedder

    return load_image_embedder("tiny-random")


@pytest.fixture
def build(embedder, monkeypatch):
    """``python -m index.build`` (or ``index.update``) in this process, with the module's embedder (or
    ``model_embedder``)."""
    import gill.loading
    from index.build import main

    def run(source, out, *extra, update=False, model_embedder=None):
        monkeypatch.setattr(gill.loading, "load_image_embedder", lambda name: model_embedder or embedder)
        argv = ["--model", "tiny-random", "--source", str(source), "--out", str(out), "--no-progress", *map(str, extra)]
        return main(argv, update=update)

    return run
