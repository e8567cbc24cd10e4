"""What the app accepts from a user: attached pictures (bounded, shrunk as they are decoded) and the seed box;
anything else is refused with ``BadInput``, a message for the chat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
MAX_SIDE = 1024  # an attached picture is kept (shown, read by the model) at most this many pixels a side


class BadInput(ValueError):
    """Input the app refuses, with a message for the chat."""


def load_user_image(path: str) -> Any:
    """An uploaded file -> RGB PIL image of at most ``MAX_SIDE`` pixels a side (``gill.images``: size and
    aspect ratio bounded before decoding, shrunk as soon as it is decoded, so a message with many large
    pictures holds one full decode at a time), or BadInput naming the file and saying why not."""
    from gill.images import ImageError, ImageLimits, open_image_shrunk

    name = Path(path).name
    try:
        return open_image_shrunk(path, name=name, max_side=MAX_SIDE,
                                 limits=ImageLimits(max_pixels=MAX_IMAGE_PIXELS, max_bytes=MAX_IMAGE_BYTES))
    except FileNotFoundError:
        raise BadInput(f"{name} did not arrive; please attach it again.") from None
    except ImageError as e:
        if e.reason.startswith("not an image"):
            raise BadInput(f"{name} is not an image I can read.") from None
        raise BadInput(f"{name} cannot be used: {e.reason}.") from None
