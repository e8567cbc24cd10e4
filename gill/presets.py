"""Named models, as data. ``gill.loading`` turns a name (or a model directory, or a Hub repo id) into parts.

- ``toy``: the toy world (``training/toy``, its build): every backbone trained from scratch on synthetic captioned shapes, GILL
  trained on top with the project's own recipes, with its retrieval corpus and decision head; shipped with the
  package (``gill/assets/toy``, a few MB), offline and CPU-fast. Rebuilt by ``python -m training.toy``.
- ``tiny-random``: tiny random backbones, a tiny random Stable Diffusion and a small corpus of solid-colour
  images, built offline in seconds (for tests and smoke runs; its outputs mean nothing).
- ``gill-opt-6.7b``: the original GILL (OPT-6.7B, CLIP ViT-L/14, SD v1.5): the release's three files from the
  Hugging Face Hub repo ``jykoh/gill``, converted once into a cached model directory; the backbones load by
  their Hub ids. Its retrieval corpus (``cc3m_embeddings_urls.npy``) is not on the Hub: pass ``index=``.

This module imports no torch and loads nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_ASSETS = Path(__file__).resolve().parent / "assets"

# The original release on the Hugging Face Hub: where its users get it (the original demo downloads these
# three files with hf_hub_download). The revision is a branch name until a commit of that repository has
# been checked against these files; pass revision= to pin one (the converted directory records the
# commit it came from).
RELEASE_REPO = "jykoh/gill"
RELEASE_REVISION = "main"
RELEASE_FILES = ("model_args.json", "pretrained_ckpt.pth.tar", "decision_model.pth.tar")


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "package": a model directory inside the package; "release": the original on the Hub; "random"
    description: str
    path: Path | None = None  # kind "package"
    repo_id: str | None = None  # kind "release"
    revision: str | None = None
    files: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    "toy": Preset("toy", "package", "the offline toy world (coloured shapes), trained from scratch", path=_ASSETS / "toy"),
    "tiny-random": Preset("tiny-random", "random", "tiny random backbones for tests; outputs mean nothing"),
    "gill-opt-6.7b": Preset(
        "gill-opt-6.7b", "release", "the original GILL: OPT-6.7B, CLIP ViT-L/14, Stable Diffusion v1.5",
        repo_id=RELEASE_REPO, revision=RELEASE_REVISION, files=RELEASE_FILES,
    ),
}
DEFAULT_MODEL = "toy"  # what the app, the CLI and the evals use when no model is named


def find_preset(name: str | os.PathLike) -> Preset | None:
    """The preset a name or Hub repo id refers to (``jykoh/gill`` is ``gill-opt-6.7b``), or None."""
    name = str(name)
    if name in PRESETS:
        return PRESETS[name]
    return next((p for p in PRESETS.values() if p.repo_id and p.repo_id == name), None)


def toy_dir() -> Path:
    """The shipped toy-world model directory (its own corpus in ``index/``)."""
    return PRESETS["toy"].path


def toy_metric_dir() -> Path:
    """The toy world's evaluation model: a CLIP-style encoder trained with another seed than the model's own."""
    return _ASSETS / "toy-metric-clip"
