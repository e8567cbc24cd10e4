"""Image-similarity scorers: CLIP image features (Hugging Face ``CLIPModel``, the original's metric, or
open_clip) and, optionally, LPIPS.

They take in-memory PIL images and check each with ``gill.images.check_image`` (bounded size and aspect
ratio) before any resize; files are opened by their callers with ``gill.images.open_image``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gill.settings import LIBRARY_DEFAULTS

DEFAULT_SCORER = LIBRARY_DEFAULTS.scorer


PROCESSORS = ("auto", "pil")


class ClipScorer:
    """``hf:NAME_OR_PATH`` (transformers CLIPModel.get_image_features, as the original's scripts) or
    ``open_clip:MODEL/PRETRAINED`` (e.g. ``open_clip:ViT-L-14/openai``; needs the ``eval`` extra).

    ``processor`` (``hf:`` only): ``"pil"``, transformers' PIL-backed ``CLIPImageProcessorPil`` (Pillow's
    bicubic resize, the path the original's transformers 4.30 ran; the original protocol), or ``"auto"``,
    ``CLIPImageProcessor`` (torchvision-backed under transformers 5 where torchvision is installed, PIL
    otherwise)."""

    def __init__(self, spec: str = DEFAULT_SCORER, device: str | None = None, processor: str = "auto"):
        self.spec, self.device = spec, device or "cpu"
        kind, _, name = spec.partition(":")
        if kind not in ("hf", "open_clip"):
            raise ValueError(f"scorer {spec!r}: expected 'hf:NAME_OR_PATH' or 'open_clip:MODEL/PRETRAINED'")
        if processor not in PROCESSORS:
            raise ValueError(f"processor {processor!r}: expected one of {PROCESSORS}")
        try:
            if kind == "hf":
                import transformers

                self.model = transformers.CLIPModel.from_pretrained(name, trust_remote_code=False).eval().to(self.device)
                # transformers 4's CLIPImageProcessor is the PIL path itself; 5 names it CLIPImageProcessorPil
                pil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
                cls = pil if processor == "pil" else transformers.CLIPImageProcessor
                self.processor = cls.from_pretrained(name, trust_remote_code=False)
                self._embed = self._hf
            else:
                import open_clip

                model_name, _, pretrained = name.partition("/")
                self.model, _, self.processor = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
                self.model = self.model.eval().to(self.device)
                self._embed = self._open_clip
        except OSError as e:  # not on disk and the Hub out of reach, or a broken download
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"scorer {spec!r} cannot be loaded ({first}); give a local copy "
                             "(--scorer hf:/path/to/clip-vit-large-patch14) or score later with "
                             "'python -m gill.eval score OUT --scorer ...'") from None

    def _hf(self, images: list[Any]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.get_image_features(pixel_values=pixels)
        return getattr(out, "pooler_output", out)

    def _open_clip(self, images: list[Any]) -> torch.Tensor:
        pixels = torch.stack([self.processor(im) for im in images]).to(self.device)
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def embed(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """(N, D) features; ``gill.images.ImageError`` for an image out of bounds (naming its position)."""
        from gill.images import check_image

        feats = [self._embed([check_image(im, name=f"image {i + j}") for j, im in enumerate(images[i:i + batch_size])])
                 .float().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(feats) if feats else torch.zeros(0)


LPIPS_SIZE = 256


def lpips_tensor(image: Any) -> torch.Tensor:
    """(1, 3, 256, 256) in [-1, 1], as the original's ``evals/lpips_2dirs.py``: the RGB image as
    ``uint8 / 127.5 - 1`` (``lpips.im2tensor``), then squashed to 256x256 by antialiased bilinear
    interpolation (``torchvision.transforms.functional.resize(..., antialias=True)`` on the tensor)."""
    import numpy as np

    from gill.images import check_image

    arr = np.asarray(check_image(image), dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(x, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False,
                                           antialias=True)


class LpipsScorer:
    """LPIPS (AlexNet, v0.1) on images squashed to 256x256 as the original's script (``lpips_tensor``);
    needs ``pip install lpips`` (which fetches torchvision's AlexNet weights on first use)."""

    def __init__(self, device: str | None = None, model: Any = None):
        self.device = device or "cpu"
        if model is None:
            import lpips

            model = lpips.LPIPS(net="alex", version="0.1")
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def distance(self, a: Any, b: Any) -> float:
        return float(self.model(lpips_tensor(a).to(self.device), lpips_tensor(b).to(self.device)).item())
