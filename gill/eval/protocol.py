"""Evaluation protocols: ``original`` (what the released GILL and FROMAGe scripts do, quirks included,
so that numbers compare with the paper's) and ``clean`` (this project's own choices).

Every difference is a field here, so that ``summary.json`` can record the protocol whole. The file and
line of the original that each ``original`` value follows are listed in ``gill/eval/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

SQUASH_SIZE = 224  # the original stored every VIST image as a 224x224 PNG (utils.get_image_from_url)


@dataclass(frozen=True)
class Protocol:
    name: str
    caption_field: str  # VIST: the annotation field read for captions
    story_order: str  # "file": steps in the annotation file's order, the last one the target;
    # "annotated": sorted by worker_arranged_photo_order
    squash_vist_images: bool  # every VIST image resized to 224x224, aspect not kept (Pillow's default filter)
    seeds: str  # "stream": one generator seeded once, one draw per example in order; "per-example"
    outputs: str  # "per-target": examples sharing a ground-truth image share the last one's output
    five_captions: str  # "segments": each caption tokenised on its own (BOS before the first); "joined"
    visdial_lines: str  # "raw": "Q: " + question + "?" as stored; "tidy": stripped, one "?"
    retrieval: str  # "fromage": all val images, BOS before every caption, the 4 context images (a repeated
    # target too) pushed down by 10000, ranked by topk; "both-galleries": the target never masked, ties count
    # against it
    lpips: str  # "per-file": once per distinct output file; "per-example"
    missing_context: str  # "scored": a story whose own context images are missing is not generated for but
    # scored with the output of another story with the same last photo; "skipped": not scored either
    lm_dtype: str | None  # LM, vision encoder and mapper unless --dtype ("bfloat16"); None: as stored
    sd_dtype: str | None  # Stable Diffusion unless --sd-dtype ("float16"); None: --dtype, else as stored
    clip_processor: str  # the hf scorer's image processor: "pil" (CLIPImageProcessorPil, the PIL path the
    # original's transformers 4.30 ran) or "auto" (transformers' own choice: torchvision-backed where installed)
    sd_long_prompts: str  # SD baseline prompts over the text encoder's length: "original" (custom_sd.py's left
    # cut: the text of the last tokens before the end token, tokenised again); "keep-end" (the tokenizer's
    # left truncation: the last tokens, start and end tokens kept)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def prepare_vist_image(self) -> Callable[[Any], Any] | None:
        """The transform a VIST image gets when opened (``gill.images.open_image(prepare=...)``)."""
        return squash_like_original if self.squash_vist_images else None


def squash_like_original(image: Any) -> Any:
    """``image.resize((224, 224)).convert("RGB")``, in the image's own mode first, as the original's
    ``utils.get_image_from_url`` did on download (Pillow's default filter: bicubic, nearest for palette
    and 1-bit images). An image already 224x224 is unchanged."""
    return image.resize((SQUASH_SIZE, SQUASH_SIZE)).convert("RGB")


ORIGINAL = Protocol(
    name="original", caption_field="text", story_order="file", squash_vist_images=True, seeds="stream",
    outputs="per-target", five_captions="segments", visdial_lines="raw", retrieval="fromage", lpips="per-file",
    missing_context="scored", lm_dtype="bfloat16", sd_dtype="float16", clip_processor="pil",
    sd_long_prompts="original",
)
CLEAN = Protocol(
    name="clean", caption_field="original_text", story_order="annotated", squash_vist_images=False,
    seeds="per-example", outputs="per-example", five_captions="joined", visdial_lines="tidy",
    retrieval="both-galleries", lpips="per-example", missing_context="skipped", lm_dtype=None, sd_dtype=None,
    clip_processor="auto", sd_long_prompts="keep-end",
)
PROTOCOLS = {p.name: p for p in (ORIGINAL, CLEAN)}
