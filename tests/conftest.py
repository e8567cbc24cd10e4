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
