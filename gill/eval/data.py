"""Dataset readers: VIST (SIS annotations + an image folder) and VisDial (visdial_1.0_val).

Readers never raise on a bad example: it is skipped and its reason is kept in ``skipped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass
class Example:
    id: str
    captions: list[str]  # VIST: the 5 captions in story order; VisDial: the dialogue lines
    context_images: list[Path]  # VIST: the first 4 images; VisDial: none
    target: Path  # the ground-truth image the output is compared with
    target_id: str = ""


@dataclass
class Dataset:
    examples: list[Example]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"id", "reason"}
    gallery: dict[str, Path] = field(default_factory=dict)  # image id -> file (VIST retrieval)


def find_image(folder: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def load_vist(annotations: str | Path, images: str | Path, caption_field: str = "original_text",
              story_length: int = 5) -> Dataset:
    """SIS JSON (``{"annotations": [[{story_id, photo_flickr_id, worker_arranged_photo_order, original_text,
    text}], ...]}``) -> stories of ``story_length`` (caption, image) steps in annotated order.

    A story is skipped when it has fewer steps or any of its image files is missing (as the original)."""
    annotations, images = Path(annotations), Path(images)
    data = json.loads(annotations.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{annotations}: not a VIST SIS file (no 'annotations')")
    stories: dict[str, list[dict]] = {}
    for entry in data["annotations"]:
        item = entry[0] if isinstance(entry, list) else entry
        stories.setdefault(str(item["story_id"]), []).append(item)
    out = Dataset([])
    for story_id, items in stories.items():
        items.sort(key=lambda a: int(a.get("worker_arranged_photo_order", 0)))
        if len(items) < story_length:
            out.skipped.append({"id": story_id, "reason": f"story has {len(items)} steps, needs {story_length}"})
            continue
        items = items[:story_length]
        paths = [find_image(images, str(a["photo_flickr_id"])) for a in items]
        missing = [str(a["photo_flickr_id"]) for a, p in zip(items, paths) if p is None]
        if missing:
            out.skipped.append({"id": story_id, "reason": f"missing image file(s) {missing}"})
            continue
        captions = [str(a.get(caption_field) or a.get("text") or "").strip() for a in items]
        for a, p in zip(items, paths):
            out.gallery.setdefault(str(a["photo_flickr_id"]), p)  # duplicate ids share one gallery entry
        out.examples.append(Example(story_id, captions, paths[:-1], paths[-1], str(items[-1]["photo_flickr_id"])))
    return out


def load_visdial(dialogs: str | Path, images: str | Path, image_name: str = "VisualDialog_val2018_{:012d}.jpg") -> Dataset:
    """visdial_1.0_val.json -> one example per dialog: 10 rounds of ``Q: question?`` / ``A: answer``
    lines (the caption is not used, as in the paper) and the dialog's image as the target."""
    dialogs, images = Path(dialogs), Path(images)
    data = json.loads(dialogs.read_text(encoding="utf-8"))["data"]
    questions, answers = data["questions"], data["answers"]
    out = Dataset([])
    for d in data["dialogs"]:
        image_id = int(d["image_id"])
        target = images / image_name.format(image_id)
        if not target.is_file():
            out.skipped.append({"id": str(image_id), "reason": f"missing image file {target.name}"})
            continue
        lines = []
        for turn in d["dialog"]:
            q = questions[turn["question"]].strip().rstrip("?")
            a = answers[turn["answer"]].strip() if "answer" in turn else ""
            lines += [f"Q: {q}?", f"A: {a}"]
        out.examples.append(Example(str(image_id), lines, [], target, str(image_id)))
    return out
