"""Dataset readers: VIST (SIS annotations + an image folder) and VisDial (visdial_1.0_val).

Readers never raise on a bad example: it is skipped and kept in ``skipped`` as ``{"id", "kind", "reason"}``
(``kind`` is one of ``SKIP_KINDS``, for counting; ``reason`` names the file and says why). Only a file that
is not a dataset at all (unreadable, not JSON, the wrong format) raises ``ValueError`` naming it.

Every image a kept example uses (context images and the target) has been opened with
``gill.images.open_image`` (bounded size and aspect ratio, truncated files refused), unless the reader
is asked not to (``verify_images=False``); the runner and the scorer open them again the same way and
skip what has broken since.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from gill.io import inside

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")

# what a skipped example's "kind" may be
DUPLICATE = "duplicate id"
TOO_SHORT = "too few steps"
MISSING = "missing image"
UNREADABLE = "unreadable image"
OUTSIDE = "outside root"
BAD_ENTRY = "bad entry"
TOO_LONG = "too long"  # the runner: a prompt longer than the model's context (without --truncate)
UNREADABLE_OUTPUT = "unreadable output"  # the scorer: a generated image that cannot be read back
SKIP_KINDS = (DUPLICATE, TOO_SHORT, MISSING, UNREADABLE, OUTSIDE, BAD_ENTRY, TOO_LONG, UNREADABLE_OUTPUT)


@dataclass
class Example:
    id: str
    captions: list[str]  # VIST: the 5 captions in story order; VisDial: the dialogue lines
    context_images: list[Path]  # VIST: the first 4 images; VisDial: none
    target: Path  # the ground-truth image the output is compared with
    target_id: str = ""
    context_ids: list[str] = field(default_factory=list)  # VIST: the context images' photo ids
    position: int = -1  # its place in the original's loop over the dataset (its seed-stream draw); -1: its index


@dataclass
class Dataset:
    examples: list[Example]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"id", "kind", "reason"}
    gallery: dict[str, Path] = field(default_factory=dict)  # image id -> file (VIST retrieval)
    # VIST, original protocol: stories not generated for (a context image is missing) but scored with the
    # output of another story with the same last photo; and each story's place in the annotation file
    score_only: list[Example] = field(default_factory=list)
    file_order: dict[str, int] = field(default_factory=dict)

    def skip(self, example_id: str, kind: str, reason: str) -> None:
        self.skipped.append({"id": example_id, "kind": kind, "reason": reason})

    def first(self, n: int) -> None:
        """Keep the first ``n`` examples, and the ``score_only`` stories up to the last of them in the file."""
        self.examples = self.examples[:n]
        last = max((self.file_order.get(e.id, -1) for e in self.examples), default=-1)
        self.score_only = [e for e in self.score_only if self.file_order.get(e.id, -1) < last]

    def in_file_order(self) -> list[Example]:
        """``examples`` and ``score_only`` together, in the annotation file's order."""
        if not self.score_only:
            return list(self.examples)
        rank = {e.id: n for n, e in enumerate(self.examples)}
        return sorted(self.examples + self.score_only, key=lambda e: self.file_order.get(e.id, rank.get(e.id, 0)))


def skip_counts(skipped: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Skipped examples counted by kind (entries written before kinds existed count as ``"other"``)."""
    counts: dict[str, int] = {}
    for s in skipped:
        kind = s.get("kind", "other")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


class OutsideRootError(ValueError):
    pass


def find_image(folder: Path, image_id: str, allow_outside_root: bool = False) -> Path | None:
    """``folder/<image_id>.<suffix>`` for the first suffix that exists, else None. An id that leads outside
    ``folder`` (``..``, an absolute path, a symlink out) raises ``OutsideRootError`` unless allowed."""
    for suffix in IMAGE_SUFFIXES:
        name = f"{image_id}{suffix}"
        if allow_outside_root:
            path = Path(folder) / name
        else:
            try:
                path = inside(folder, name, what="image id")
            except ValueError as e:
                raise OutsideRootError(str(e)) from None
        if path.is_file():
            return path
    return None


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the {what} file ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON {what} file ({e})") from None


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (None: it can). Decodes it fully, with the size bounds."""
    from gill.images import ImageError, open_image

    try:
        open_image(path, name=str(path))
    except ImageError as e:
        return e.reason
    except FileNotFoundError:
        return "the file is gone"
    except OSError as e:
        return f"the file cannot be read ({e})"
    return None


def image_problems(paths: Iterable[Path], workers: int | None = None) -> dict[Path, str | None]:
    """Each distinct path -> why it cannot be used as an image (None: it can), opened in a few threads."""
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(_image_problem, paths)))


def verify_images(dataset: Dataset, images_of, workers: int | None = None) -> None:
    """Open every image of every example once (in a few threads); an example with an unreadable image is
    moved to ``skipped``. ``images_of(example)`` -> [(image id, path)]."""
    problems = image_problems((p for e in dataset.examples for _, p in images_of(e)), workers)
    kept = []
    for e in dataset.examples:
        bad = [(i, p, problems[p]) for i, p in images_of(e) if problems[p] is not None]
        if bad:
            dataset.skip(e.id, UNREADABLE, "unreadable image file(s): " + "; ".join(
                f"{i} ({p}): {why}" for i, p, why in bad))
        else:
            kept.append(e)
    dataset.examples = kept


def images_dir(images: str | Path) -> Path:
    """The dataset's image folder; ``NotADirectoryError`` naming it when it is a file or missing (every
    example would otherwise be skipped as missing its images)."""
    images = Path(images)
    if not images.is_dir():
        raise NotADirectoryError(f"{images}: {'a file, not a folder' if images.exists() else 'no such folder'}; "
                                 "the images must be a folder")
    return images


def image_folder(annotations: Path, images: Path) -> Path:
    """The folder holding a split's images: ``images`` itself (GILL's ``sis/val_images/<id>.png``), or its
    subfolder named after the split (VIST's official ``images/val/<id>.jpg``, for ``val.story-in-sequence.json``)."""
    split = annotations.name.split(".")[0]
    sub = images / split
    if split and sub.is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in islice(images.iterdir(), 64)):
        return sub
    return images


def load_vist(annotations: str | Path, images: str | Path, caption_field: str = "original_text",
              story_length: int = 5, *, allow_outside_root: bool = False, verify: bool = True,
              story_order: str = "annotated", whole_gallery: bool = False,
              score_missing_context: bool = False) -> Dataset:
    """SIS JSON (``{"annotations": [[{story_id, photo_flickr_id, worker_arranged_photo_order, original_text,
    text}], ...]}``) -> stories of ``story_length`` (caption, image) steps.

    ``story_order``: ``"annotated"`` sorts a story's steps by ``worker_arranged_photo_order``; ``"file"``
    keeps the file's order, as the original did (its last step is the target). Each kept story's
    ``position`` is its place in the original's generation loop: the stories, in file order, whose context
    images exist. ``whole_gallery``: the retrieval gallery is every readable image the file names (FROMAGe's),
    not only the kept stories' images.

    A story is skipped when it has fewer steps or any of its image files is missing (as the original), when
    one of its images cannot be read (``verify``), when an image id points outside ``images`` (unless
    ``allow_outside_root``), when an entry is malformed, and when two stories share its id (a step order
    that occurs twice: both copies are skipped, since their steps cannot be told apart).
    ``score_missing_context`` (the original protocol): a story whose ground-truth image is there but one of
    its context images is missing is skipped for generation but kept in ``score_only``, to be scored with
    the output of another story with the same last photo, as the original's scoring script does."""
    if story_order not in ("annotated", "file"):
        raise ValueError(f"story_order is {story_order!r}; expected 'annotated' or 'file'")
    annotations = Path(annotations)
    images = image_folder(annotations, images_dir(images))
    data = _read_json(annotations, "VIST annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{annotations}: not a VIST SIS file (no 'annotations' list)")
    out = Dataset([])
    stories = _vist_steps(out, data["annotations"], annotations)
    _vist_examples(out, stories, annotations, images, caption_field, story_length, allow_outside_root,
                   story_order, score_missing_context)

    def images_of(e: Example) -> list[tuple[str, Path]]:
        return list(zip(e.context_ids + [e.target_id], e.context_images + [e.target]))

    if verify:
        verify_images(out, images_of)
    for e in out.examples:
        for image_id, path in images_of(e):
            out.gallery.setdefault(image_id, path)  # duplicate image ids share one gallery entry
    if whole_gallery:
        _add_whole_gallery(out, stories, images, allow_outside_root, verify)
    return out


def _vist_steps(out: Dataset, annotations: list, source: Path) -> dict[str, list[dict]]:
    """Story id -> its steps in file order (``_order``: the step's ``worker_arranged_photo_order``); a story
    with a malformed entry gets ``_broken`` on its first step, saying why."""
    stories: dict[str, list[dict]] = {}
    for n, entry in enumerate(annotations):
        item = entry[0] if isinstance(entry, list) and len(entry) == 1 else entry
        if not isinstance(item, dict) or item.get("story_id") is None:
            out.skip(f"annotations[{n}]", BAD_ENTRY, f"annotation {n} in {source} is not a story step (no story_id)")
            continue
        steps = stories.setdefault(str(item["story_id"]), [])
        steps.append(item)
        pid = item.get("photo_flickr_id")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "" or "\x00" in str(pid):
            steps[0].setdefault("_broken", f"annotation {n} in {source} has photo_flickr_id {pid!r}")
        order = item.get("worker_arranged_photo_order", 0)
        try:
            item["_order"] = int(order)
        except (TypeError, ValueError):
            steps[0].setdefault("_broken", f"annotation {n} in {source} has worker_arranged_photo_order {order!r}")
            item["_order"] = 0
    return stories


def _vist_examples(out: Dataset, stories: dict[str, list[dict]], source: Path, images: Path, caption_field: str,
                   story_length: int, allow_outside_root: bool, story_order: str, score_missing_context: bool) -> None:
    """The stories -> ``out.examples`` (and ``out.score_only``), or ``out.skipped`` with the reason."""
    position = 0
    for number, (story_id, items) in enumerate(stories.items()):
        if "_broken" in items[0]:
            out.skip(story_id, BAD_ENTRY, items[0]["_broken"])
            continue
        orders = [a["_order"] for a in items if "worker_arranged_photo_order" in a]
        repeated = sorted({o for o in orders if orders.count(o) > 1})
        if repeated:
            copies = max(orders.count(o) for o in repeated)
            out.skip(story_id, DUPLICATE, f"duplicate story id {story_id!r} in {source}: step order "
                     f"{repeated[0]} occurs {copies} times ({len(items)} steps); all copies skipped")
            continue
        if story_order == "annotated":
            items.sort(key=lambda a: a["_order"])
        ids = [str(a["photo_flickr_id"]) for a in items[:story_length]]
        try:
            paths = [find_image(images, i, allow_outside_root) for i in ids]
        except OutsideRootError as e:
            out.skip(story_id, OUTSIDE, f"{e} (in {source}; pass --allow-outside-root to read it)")
            continue
        except OSError as e:
            out.skip(story_id, BAD_ENTRY, f"cannot look up its images in {images} ({e})")
            continue
        drew = all(p is not None for p in paths[:-1])  # the original generated for it (a draw of its seed stream)
        position += drew
        if len(items) < story_length:
            out.skip(story_id, TOO_SHORT, f"story has {len(items)} steps, needs {story_length}")
            continue
        captions = [_caption(a, caption_field) for a in items[:story_length]]
        missing = [i for i, p in zip(ids, paths) if p is None]
        example = Example(story_id, captions, [p or images / i for i, p in zip(ids[:-1], paths[:-1])],
                          paths[-1] or images / ids[-1], ids[-1], ids[:-1], position - 1 if drew else -1)
        out.file_order[story_id] = number
        if not missing:
            out.examples.append(example)
            continue
        scored = score_missing_context and paths[-1] is not None
        out.skip(story_id, MISSING, f"missing image file(s) {missing} in {images}" + (
            "; not generated for, but scored with the output of another story with the same last photo, if one "
            "has it (the original protocol)" if scored else ""))
        if scored:
            out.score_only.append(example)


def _caption(step: dict, field_name: str) -> str:
    """A step's caption from ``field_name`` as stored (the original read ``text`` untouched); the clean
    protocol's ``original_text`` is stripped, and falls back to ``text`` where it is empty."""
    if field_name == "text":
        value = step.get("text")
        return value if isinstance(value, str) else ""
    return str(step.get(field_name) or step.get("text") or "").strip()


def _add_whole_gallery(out: Dataset, stories: dict[str, list[dict]], images: Path, allow_outside_root: bool,
                       verify: bool) -> None:
    """Every other image the annotations name, where its file is there and readable (FROMAGe's gallery:
    all VIST val images it could download)."""
    extra: dict[str, Path] = {}
    for items in stories.values():
        for a in items:
            pid = a.get("photo_flickr_id")
            if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) in out.gallery or str(pid) in extra:
                continue
            try:
                path = find_image(images, str(pid), allow_outside_root)
            except (OutsideRootError, OSError, ValueError):
                continue
            if path is not None:
                extra[str(pid)] = path
    if verify and extra:
        problems = image_problems(extra.values())
        extra = {i: p for i, p in extra.items() if problems[p] is None}
    out.gallery.update(extra)


def _entry(table: list, index: Any, what: str) -> Any:
    """``table[index]`` for an index from 0 to len - 1; ``IndexError`` naming it otherwise (a negative index
    would read from the end of the file's list: -1 its last question)."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"{what} index {index!r} is not an integer")
    if not 0 <= index < len(table):
        raise IndexError(f"{what} index {index} is out of range: the file has {len(table)} {what}s (0 to {len(table) - 1})")
    return table[index]


def load_visdial(dialogs: str | Path, images: str | Path, image_name: str = "VisualDialog_val2018_{:012d}.jpg",
                 *, verify: bool = True, lines: str = "tidy") -> Dataset:
    """visdial_1.0_val.json -> one example per dialog: 10 rounds of ``Q: question?`` / ``A: answer``
    lines (the caption is not used, as in the paper) and the dialog's image as the target.

    A dialog is skipped when its image is missing or unreadable, when an entry is malformed, and when two
    dialogs share an image id (the example id): all of them are skipped."""
    dialogs, images = Path(dialogs), images_dir(images)
    raw = _read_json(dialogs, "VisDial dialogs")
    try:
        data = raw["data"]
        questions, answers, entries = data["questions"], data["answers"], data["dialogs"]
        if not all(isinstance(x, list) for x in (questions, answers, entries)):
            raise TypeError
    except (KeyError, TypeError):
        raise ValueError(f"{dialogs}: not a VisDial file (no data.questions, data.answers and data.dialogs)") from None
    out = Dataset([])
    parsed: dict[str, list[Example]] = {}
    for n, d in enumerate(entries):
        try:
            image_id = d["image_id"]
            if isinstance(image_id, (bool, float)):
                raise ValueError(f"image_id {image_id!r} is not an integer")
            image_id = int(image_id)
            text = []
            for turn in d["dialog"]:
                q = _entry(questions, turn["question"], "question")
                a = _entry(answers, turn["answer"], "answer") if "answer" in turn else ""
                if not isinstance(q, str) or not isinstance(a, str):
                    raise TypeError("a question or answer is not a string")
                if lines != "raw":
                    q, a = q.strip().rstrip("?"), a.strip()
                text += [f"Q: {q}?", f"A: {a}"]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            what = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"no {e}"
            out.skip(f"dialogs[{n}]", BAD_ENTRY, f"dialog {n} in {dialogs} is malformed ({what})")
            continue
        ex = Example(str(image_id), text, [], images / image_name.format(image_id), str(image_id), position=n)
        parsed.setdefault(ex.id, []).append(ex)
    for image_id, copies in parsed.items():
        if len(copies) > 1:
            out.skip(image_id, DUPLICATE, f"duplicate dialog image_id {image_id} in {dialogs}: {len(copies)} "
                                          "dialogs; all copies skipped")
            continue
        ex = copies[0]
        if not ex.target.is_file():
            out.skip(image_id, MISSING, f"missing image file {ex.target.name} in {images}")
            continue
        out.examples.append(ex)
    if verify:
        verify_images(out, lambda e: [(e.target_id, e.target)])
    return out
