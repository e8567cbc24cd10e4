"""Named models for ``GILL.from_pretrained``.

- ``toy``: the toy world (``gill/toy``): every backbone trained from scratch on synthetic captioned shapes, GILL
  trained on top with the project's own recipes, with its retrieval corpus and decision head; shipped with the
  package (``gill/assets/toy``, a few MB), offline and CPU-fast. Rebuilt by ``scripts/build_toy_world.py``.
- ``tiny-random``: tiny random backbones, a tiny random Stable Diffusion and a small corpus of solid-colour
  images, built offline in seconds (for tests and smoke runs; its outputs mean nothing).
- ``gill-opt-6.7b``: the original GILL (OPT-6.7B, CLIP ViT-L/14, SD v1.5). Its trained weights come from
  the original release: convert them once with ``scripts/convert_original_checkpoint.py`` and pass the
  directory.
Anything else is read as a model directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

PRESETS = ("toy", "tiny-random", "gill-opt-6.7b")
DEFAULT_MODEL = "toy"  # what the app and the evals use when no model is named


# How the toy model is best run: its tiny diffusion model draws colours right at low guidance (colour
# 0.90 at 2.0 vs 0.51 at SD's usual 7.5, measured on 72 captions), and its [IMG0] logit, bounded by the
# original's [IMG]-row renormalisation, needs the original demo's image-frequency factor raised.
TOY_DEFAULTS = {"steps": 25, "guidance_scale": 2.0, "img_scale_factor": 4.0}


def model_defaults(name_or_dir: str | os.PathLike) -> dict[str, float]:
    """Recommended run settings of a named model (``steps``, ``guidance_scale``, ``img_scale_factor``);
    empty where the usual ones apply. The app, ``python -m gill generate`` and the evals start from them."""
    return dict(TOY_DEFAULTS) if is_toy(name_or_dir) else {}


def is_toy(name_or_dir: str | os.PathLike) -> bool:
    """Whether a model name or directory is the shipped toy model."""
    name = str(name_or_dir)
    return name == "toy" or (Path(name).is_dir() and Path(name).resolve() == toy_dir())


def toy_dir() -> Path:
    """The shipped toy-world model directory (its own corpus in ``index/``)."""
    return Path(__file__).resolve().parent / "assets" / "toy"


def toy_metric_dir() -> Path:
    """The toy world's evaluation model: a CLIP-style encoder trained with another seed than the model's own."""
    return Path(__file__).resolve().parent / "assets" / "toy-metric-clip"


def load(
    name_or_dir: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    index: Any = None,
    load_diffusion: bool = True,
    allow_index_mismatch: bool = False,
) -> Any:
    """``index``: an ``EmbeddingIndex``/``FaissIndex``, or an index directory, which is refused if it was
    built with another image-retrieval projection (unless ``allow_index_mismatch``)."""
    from gill.retrieval import open_index, projection_fingerprint

    name = str(name_or_dir)
    index_dir = None
    if isinstance(index, (str, os.PathLike)):
        index_dir, index = index, None
    if name == "tiny-random":
        gill = tiny_random(index=index, with_diffusion=load_diffusion)
    elif name == "toy":
        if not (toy_dir() / "config.json").is_file():
            raise FileNotFoundError(f"the toy model is missing from {toy_dir()}; rebuild it with "
                                    "python scripts/build_toy_world.py --out toy-build --install")
        return load(toy_dir(), torch_dtype=torch_dtype, device=device, index=index, load_diffusion=load_diffusion,
                    allow_index_mismatch=allow_index_mismatch)
    elif Path(name).is_dir():
        gill = from_model_dir(Path(name), torch_dtype=torch_dtype, index=index, load_diffusion=load_diffusion)
        if index is None and index_dir is None and (Path(name) / "index" / "manifest.json").is_file():
            index_dir = Path(name) / "index"  # a model directory that carries its own corpus
    elif name == "gill-opt-6.7b":
        raise FileNotFoundError(
            "preset 'gill-opt-6.7b' needs the original release converted once: run "
            "scripts/convert_original_checkpoint.py --model-args ... --checkpoint pretrained_ckpt.pth.tar "
            "--decision decision_model.pth.tar --out DIR, then load DIR"
        )
    else:
        raise FileNotFoundError(f"{name!r} is neither a model directory nor a preset (presets: {list(PRESETS)})")
    if index_dir is not None:
        fingerprint = projection_fingerprint(gill.model.adapter.image_retrieval)
        gill.retriever = open_index(index_dir, fingerprint, allow_mismatch=allow_index_mismatch)
    if device is not None:
        gill.model.to(device)
        if gill.decision is not None:
            gill.decision.to(device)
        if gill.diffusion is not None:
            gill.diffusion.pipe.to(device)
    return gill


def from_model_dir(path: Path, *, torch_dtype: torch.dtype | None, index: Any, load_diffusion: bool) -> Any:
    from gill.backbones import load_backbones, load_diffusion as load_sd
    from gill.checkpoint import load_model, read_model_dir, resolve_paths
    from gill.pipeline import GILL

    config = resolve_paths(read_model_dir(path).config, path)
    backbones = load_backbones(config, torch_dtype=torch_dtype)
    model, decision = load_model(path, backbones.lm, backbones.vision)
    pipe = None
    if load_diffusion and config.diffusion:
        pipe = load_sd(config.diffusion, torch_dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
    return GILL(model, backbones.tokenizer, backbones.image_processor, backbones.img_tokens, decision, index, pipe)


def tiny_random(index: Any = None, with_diffusion: bool = True, seed: int = 0) -> Any:
    from PIL import Image

    from gill.backbones import tiny_backbones, tiny_stable_diffusion
    from gill.decision import DecisionHead
    from gill.model import GILLModel
    from gill.pipeline import GILL
    from gill.retrieval import EmbeddingIndex, ImageRecord

    backbones, config = tiny_backbones(seed=seed)
    torch.manual_seed(seed)
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    decision = DecisionHead.from_config(config).eval()
    if index is None:
        colors = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
        images = {name: Image.new("RGB", (32, 32), rgb) for name, rgb in colors.items()}
        records = [ImageRecord(i, f"tiny-random://{name}", f"a {name} square", sha256=f"tiny-{name}")
                   for i, name in enumerate(colors)]
        pixels = backbones.image_processor(images=list(images.values()), return_tensors="pt")["pixel_values"]
        embeddings = model.encode_images(pixels).retrieval.detach()
        index = EmbeddingIndex(embeddings, records, image_loader=lambda r: images[r.source.split("://")[1]])
    pipe = None
    if with_diffusion:
        pipe = tiny_stable_diffusion(config.gen_emb_dim, config.gen_seq_len, image_size=32, seed=seed)
        pipe.set_progress_bar_config(disable=True)
    return GILL(model, backbones.tokenizer, backbones.image_processor, backbones.img_tokens, decision, index, pipe)
