"""The one way images are opened: defensively, with bounded size and aspect ratio, and one error type.

Every caller (the app, the library, index building, training and the eval) opens files with
``open_image`` and checks in-memory images with ``check_image`` before any resize. Both bound the
decoded size (a 20000x20000 PNG of a few kB is a decompression bomb) and the aspect ratio (CLIP's
shortest-edge resize scales the long edge too: a 60000x1 image would become 13 million pixels wide),
decode truncated files as errors, and turn every mode (palette, transparency, 16-bit, CMYK) into RGB.
Callers that walk datasets catch ``ImageError`` and skip and count the item with ``error.reason``;
interactive callers show ``str(error)``, which names the file. Imports no torch.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any


class ImageError(ValueError):
    """An image that cannot be used: ``source`` names it, ``reason`` says why (short, countable)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be. The defaults admit any photo or scan people use (up to 40 megapixels,
    panoramas up to 20:1) and refuse what only a broken or hostile file is."""

    max_pixels: int = 40_000_000
    max_aspect: float = 20.0
    max_bytes: int | None = None  # the encoded file's size; None: no bound

    def check_size(self, width: int, height: int, source: str) -> None:
        if width < 1 or height < 1:
            raise ImageError(source, f"the image is {width}x{height} pixels (empty)")
        if width * height > self.max_pixels:
            raise ImageError(source, f"the image is {width}x{height} pixels; at most {self.max_pixels / 1e6:g} "
                                     "megapixels are accepted")
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect:
            raise ImageError(source, f"the image is {width}x{height} pixels, an aspect ratio of {aspect:.0f}:1; "
                                     f"at most {self.max_aspect:g}:1 is accepted")


DEFAULT_LIMITS = ImageLimits()

def _name(source: Any, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or "image"


def open_image(source: str | os.PathLike | bytes | IO[bytes], *, name: str | None = None,
               limits: ImageLimits = DEFAULT_LIMITS, prepare: Callable[[Any], Any] | None = None) -> Any:
    """Decode ``source`` (a path, the file's bytes or a binary file object) into a loaded RGB PIL image.

    The header's size is checked before any pixel is decoded; truncated, unidentifiable and oversized
    files raise ``ImageError`` naming ``name`` (default: the path). A missing file raises
    ``FileNotFoundError``, as opening any file does. ``prepare`` is applied to the decoded image in its
    own mode, before the conversion to RGB (an evaluation protocol that resizes as another code did).
    """
    from PIL import Image

    where = _name(source, name)
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise FileNotFoundError(f"{where}: no such image file")
    if limits.max_bytes is not None:
        size = len(source) if isinstance(source, bytes) else (
            os.path.getsize(source) if isinstance(source, (str, os.PathLike)) else None)
        if size is not None and size > limits.max_bytes:
            raise ImageError(where, f"the file is {size / 2**20:.1f} MB; at most {limits.max_bytes / 2**20:g} MB "
                                    "is accepted")
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                limits.check_size(im.width, im.height, where)
                im.load()
                prepared = prepare(im) if prepare is not None else im
                rgb = _to_rgb(prepared)
                return rgb if rgb is not im else im.copy()  # the copy outlives the closed file
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(where, f"the image is too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(where, "not an image file I can read") from None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # truncated data ("image file is truncated"), broken chunks, bad palettes, ...
        raise ImageError(where, f"the image data is broken ({type(e).__name__}: {e})") from None


def check_image(image: Any, *, name: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> Any:
    """An in-memory PIL image checked like a file (size, aspect ratio) and converted to RGB."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL.Image.Image, got {type(image).__name__}")
    limits.check_size(image.width, image.height, name)
    try:
        return _to_rgb(image)
    except (OSError, ValueError) as e:
        raise ImageError(name, f"the image data is broken ({type(e).__name__}: {e})") from None


def _to_rgb(im: Any) -> Any:
    """Any mode as RGB: transparency over white, 16-bit and float greyscale scaled to 8 bits."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and (a.max() > 255 or a.min() < 0):
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        elif im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def shrink(image: Any, max_side: int) -> Any:
    """``image`` scaled down (aspect ratio kept, reduced in integer steps first, then Lanczos) so that
    neither side exceeds ``max_side``; an image already that small is returned as it is. Palette, bilevel
    and 16-bit images are made RGB first (their own modes do not resample smoothly)."""
    from PIL import Image

    if max(image.size) <= max_side:
        return image
    if image.mode not in ("RGB", "RGBA", "L", "LA", "CMYK"):
        image = _to_rgb(image)
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.LANCZOS, reducing_gap=3.0)


def open_image_shrunk(source: str | os.PathLike | bytes | IO[bytes], *, max_side: int, name: str | None = None,
                      limits: ImageLimits = DEFAULT_LIMITS) -> Any:
    """``open_image``, the picture shrunk to at most ``max_side`` pixels a side as soon as it is decoded (before
    the conversion to RGB): a caller opening many large pictures holds one full-size decode at a time (a
    6300x6300 PNG takes 120 MB while it is read and 3 MB after, at 1024 a side)."""
    return open_image(source, name=name, limits=limits, prepare=lambda im: shrink(im, max_side))
