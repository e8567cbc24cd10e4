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


class ClipScorer:
    """``hf:NAME_OR_PATH`` (transformers CLIPModel.get_image_features, as the original's scripts) or
    ``open_clip:MODEL/PRETRAINED`` (e.g. ``open_clip:ViT-L-14/openai``; needs the ``eval`` extra)."""

    def __init__(self, spec: str = DEFAULT_SCORER, device: str | None = None):
        self.spec, self.device = spec, device or "cpu"
        kind, _, name = spec.partition(":")
        if kind == "hf":
            from transformers import CLIPImageProcessor, CLIPModel

            self.model = CLIPModel.from_pretrained(name).eval().to(self.device)
            self.processor = CLIPImageProcessor.from_pretrained(name)
            self._embed = self._hf
        elif kind == "open_clip":
            import open_clip

            model_name, _, pretrained = name.partition("/")
            self.model, _, self.processor = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
            self.model = self.model.eval().to(self.device)
            self._embed = self._open_clip
        else:
            raise ValueError(f"scorer {spec!r}: expected 'hf:NAME_OR_PATH' or 'open_clip:MODEL/PRETRAINED'")

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


class LpipsScorer:
    """LPIPS (AlexNet, v0.1) on images resized to 256x256, as the original's script; needs ``lpips``."""

    def __init__(self, device: str | None = None):
        import lpips

        self.device = device or "cpu"
        self.model = lpips.LPIPS(net="alex", version="0.1").eval().to(self.device)

    @torch.no_grad()
    def distance(self, a: Any, b: Any) -> float:
        import numpy as np

        from gill.images import check_image

        def tensor(im):
            arr = np.asarray(check_image(im).resize((256, 256)), dtype=np.float32) / 127.5 - 1.0
            return torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.device)

        return self.model(tensor(a), tensor(b)).item()
