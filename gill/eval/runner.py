"""Resumable generation runs and their scoring.

Layout of an output directory::

    OUT/<setting>/images/<example id>.png   the generated image (an id that is not a safe file name gets
                                            a hash suffix: see ``output_name``)
    OUT/<setting>/records.jsonl             one line per finished example (id, seed, prompt, target, ...)
    OUT/summary.json                        every setting's scores (written by ``score``)
    OUT/report.html                         grids and the table beside the paper's numbers

An example is finished when its line is in ``records.jsonl`` and its image exists; a rerun skips
finished examples, so an interrupted run resumes and a finished one can be re-scored (``score``).
A line that cannot be read (the torn last line of a killed run) is dropped with a warning and its example
recomputed. Images are written under unique temporary names and renamed into place.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gill._io import atomic_path, atomic_write_text, inside
from gill.eval.data import UNREADABLE, UNREADABLE_OUTPUT, Dataset, Example, skip_counts

LOG = logging.getLogger("gill.eval")


@dataclass
class Setting:
    name: str  # folder name, e.g. "gill/5-captions-4-images" or "sd/1-caption"
    mode: str  # "gill" or "sd"
    build: Callable[[Example], Any]  # GILL: a list of inputs; SD: a prompt string


def stable_seed(base: int, example_id: str) -> int:
    """A per-example seed that does not depend on batching or order."""
    return base + int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 1_000_000


def _scan_records(path: Path) -> tuple[dict[str, dict], list[str], bool]:
    """(records by id, a description of each line that was dropped, whether the file must be rewritten
    before appending: a dropped line, or a last line without its newline)."""
    records: dict[str, dict] = {}
    dropped: list[str] = []
    if not path.is_file():
        return records, dropped, False
    text = path.read_bytes().decode("utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            dropped.append(f"line {n} is not JSON ({e.msg}; a run killed while writing it?)")
            continue
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("id", "image", "target")):
            dropped.append(f"line {n} is not a record (no id, image and target)")
            continue
        records[r["id"]] = r
    return records, dropped, bool(dropped) or (text != "" and not text.endswith("\n"))


def read_records(path: Path) -> dict[str, dict]:
    """The records of a ``records.jsonl`` by id (the last line of an id wins). Lines that cannot be read (a
    torn last line, when a run was killed mid-write) are dropped with a warning: their examples count as
    not done, and a rerun recomputes them."""
    records, dropped, _ = _scan_records(path)
    for d in dropped:
        LOG.warning("%s: %s; dropped (its example will be recomputed)", path, d)
    return records


def _repair_records(path: Path, records: dict[str, dict]) -> None:
    """Rewrite ``records.jsonl`` with its readable records only, so that appending starts on a fresh line."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()))


def _load_inputs(inputs: Any) -> Any:
    """A GILL conversation with its image files opened (bounded, RGB); ``ImageError`` or
    ``FileNotFoundError`` for one that cannot be read."""
    from gill.images import check_image, open_image

    if isinstance(inputs, str):
        return inputs
    return [x if isinstance(x, str) else open_image(x, name=str(x)) if isinstance(x, os.PathLike)
            else check_image(x) for x in inputs]


def run_setting(gill, dataset: Dataset, setting: Setting, out: Path, *, diffusion, batch_size: int = 8,
                seed: int = 42, truncate_left: bool = True) -> dict[str, Any]:
    """Generate the missing outputs of one setting. Returns counts: computed, reused, and ``skipped``: the
    examples whose input images could not be read now (``{"id", "kind", "reason"}``; they are not written
    and a rerun tries them again)."""
    from gill.images import ImageError

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder = out / setting.name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records_path = folder / "records.jsonl"
    records, dropped, rewrite = _scan_records(records_path)
    for d in dropped:
        LOG.warning("%s: %s; dropped (its example will be recomputed)", records_path, d)
    if rewrite:
        _repair_records(records_path, records)
    done = {i for i, r in records.items() if _output_path(folder, r["image"]) is not None}
    todo = [e for e in dataset.examples if e.id not in done]
    skipped: list[dict[str, str]] = []

    def ready():  # (example, its inputs as described, its inputs as given to the model), unreadable ones skipped
        for e in todo:
            inputs = setting.build(e)
            if setting.mode != "gill":
                yield e, inputs, inputs
                continue
            try:
                yield e, inputs, _load_inputs(inputs)
            except (ImageError, OSError) as err:  # broken or gone since the dataset was read
                skipped.append({"id": e.id, "kind": UNREADABLE, "reason": f"an input image cannot be read: {err}"})

    computed = 0
    stream = ready()
    while batch := list(itertools.islice(stream, batch_size)):
        examples = [e for e, _, _ in batch]
        described = [describe(d) for _, d, _ in batch]
        inputs = [x for _, _, x in batch]
        seeds = [stable_seed(seed, e.id) for e in examples]
        extra: list[dict] = [{} for _ in batch]
        if setting.mode == "gill":
            slots = gill.image_slot_embeddings(inputs)
            images = gill.diffusion.generate(slots.generation, diffusion, seeds=seeds)
            for x, r in zip(extra, slots.retrieval.float().cpu()):
                x["retrieval_embedding"] = [round(v, 6) for v in r.tolist()]
        else:
            images = generate_from_text(gill.diffusion.pipe, inputs, diffusion, seeds, truncate_left)
        with open(records_path, "a", encoding="utf-8") as f:
            for e, s, prompt, image, x in zip(examples, seeds, described, images, extra):
                rel = f"images/{output_name(e.id)}.png"
                with atomic_path(folder / rel) as tmp:
                    image.save(tmp, format="PNG")
                f.write(json.dumps({"id": e.id, "image": rel, "seed": s, "target": str(e.target),
                                    "target_id": e.target_id, "prompt": prompt, **x}, ensure_ascii=False) + "\n")
                f.flush()
                computed += 1
    return {"computed": computed, "reused": len(done), "skipped": skipped}


def _output_path(folder: Path, rel: str) -> Path | None:
    """A record's image inside its setting's folder, if it is there."""
    try:
        path = inside(folder, rel, what="output image")
    except ValueError:
        return None
    return path if path.is_file() else None


def output_name(example_id: str) -> str:
    """The file name (without suffix) of an example's output: its id when that is a safe file name, else
    the id made safe plus a hash of it, so that two ids never share a file (``a/b`` and ``a_b``)."""
    name = safe_name(example_id)
    if name == example_id and not name.startswith("."):
        return name
    return f"{name.lstrip('.') or '_'}-{hashlib.sha256(example_id.encode()).hexdigest()[:8]}"


def safe_name(example_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in example_id)


def describe(prompt: Any) -> Any:
    if isinstance(prompt, str):
        return prompt
    return [p if isinstance(p, str) else f"<image {Path(str(p)).name}>" for p in prompt]


@torch.no_grad()
def generate_from_text(pipe, prompts: Sequence[str], options, seeds: Sequence[int], truncate_left: bool) -> list[Any]:
    """Plain Stable Diffusion on text prompts (the baseline). Long prompts keep their end
    (left truncation), where the story's last caption is."""
    tokenizer = pipe.tokenizer
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "left" if truncate_left else side
    try:
        device = getattr(pipe, "device", torch.device("cpu"))
        generator = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        kwargs = dict(prompt=list(prompts), num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
                      generator=generator, output_type="pil")
        return list(pipe(**kwargs).images)
    finally:
        tokenizer.truncation_side = side


# ---- scoring -------------------------------------------------------------------------------------------


def score(out: Path, scorer, *, lpips=None, retrieval: dict | None = None, extra: dict | None = None,
          batch_size: int = 32) -> dict:
    """CLIP similarity (and LPIPS) of every setting's outputs with their targets -> summary.json.

    Each image is opened with ``gill.images.open_image``; a record whose output or target cannot be read is
    not scored but listed in its setting's ``skipped`` (``{"id", "kind", "reason"}``), and ``n`` counts
    the scored ones. The dataset's own skipped examples (``extra["skipped"]``) are counted by kind in
    ``skipped_counts``."""
    from gill.eval.metrics import mean_and_ci, paired_cosine
    from gill.images import ImageError, open_image

    def load(path: Path | None, what: str) -> tuple[Any, str | None]:  # (image, None) or (None, why not)
        try:
            if path is None:
                raise FileNotFoundError("no such file in the setting's folder")
            return open_image(path, name=str(path)), None
        except (ImageError, OSError) as e:
            return None, f"{what} cannot be read: {e}"

    summary: dict[str, Any] = {"scorer": getattr(scorer, "spec", type(scorer).__name__), "settings": {}}
    target_cache: dict[str, torch.Tensor | str] = {}  # target path -> its features, or why it cannot be read
    for records_path in sorted(out.glob("*/*/records.jsonl")):
        folder = records_path.parent
        name = folder.relative_to(out).as_posix()
        records = list(read_records(records_path).values())
        if not records:
            continue
        sims: list[float] = []
        distances: list[float] = []
        skipped: list[dict[str, str]] = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            new_targets = list(dict.fromkeys(r["target"] for r in chunk if r["target"] not in target_cache))
            opened = []
            for t in new_targets:
                im, why = load(Path(t), "the ground-truth image")
                if im is None:
                    target_cache[t] = why
                else:
                    opened.append((t, im))
            if opened:
                target_cache.update(zip([t for t, _ in opened], scorer.embed([im for _, im in opened])))
            pairs = []
            for r in chunk:
                if isinstance(target_cache[r["target"]], str):
                    skipped.append({"id": r["id"], "kind": UNREADABLE, "reason": target_cache[r["target"]]})
                    continue
                output, why = load(_output_path(folder, r["image"]), f"the output image {r['image']}")
                if output is None:
                    skipped.append({"id": r["id"], "kind": UNREADABLE_OUTPUT, "reason": why})
                else:
                    pairs.append((r, output))
            if not pairs:
                continue
            feats = scorer.embed([o for _, o in pairs])
            sims += paired_cosine(feats, torch.stack([target_cache[r["target"]] for r, _ in pairs])).tolist()
            if lpips is not None:
                for r, o in pairs:
                    target, _ = load(Path(r["target"]), "the ground-truth image")
                    if target is not None:
                        distances.append(lpips.distance(o, target))
        mean, ci = mean_and_ci(sims)
        entry = {"n": len(sims), "clip_similarity": mean, "clip_similarity_ci95": ci, "skipped": skipped}
        if lpips is not None:
            entry["lpips"], entry["lpips_ci95"] = mean_and_ci(distances)
        summary["settings"][name] = entry
    if retrieval:
        summary["retrieval"] = retrieval
    summary.update(extra or {})
    if "skipped" in summary:
        summary["skipped_counts"] = skip_counts(summary["skipped"])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


@torch.no_grad()
def vist_retrieval(gill, dataset: Dataset, out: Path, settings: Sequence[str], batch_size: int = 32) -> dict:
    """Recall@1/5/10 of each story's last image among all stories' images, from the text-side embedding
    saved for each GILL setting, under both gallery protocols.

    Gallery images are opened with ``gill.images.open_image``; one that cannot be read is left out of the
    gallery and listed in ``gallery_skipped``, and a query whose target is not in the gallery is not scored
    (listed in its setting's ``skipped``)."""
    from gill.eval.metrics import recall_at_k
    from gill.images import ImageError, open_image

    ids, feats, gallery_skipped = [], [], []
    candidates = sorted(dataset.gallery)
    param = next(gill.model.vision.parameters())
    for start in range(0, len(candidates), batch_size):
        images = []
        for i in candidates[start:start + batch_size]:
            try:
                images.append(open_image(dataset.gallery[i], name=str(dataset.gallery[i])))
                ids.append(i)
            except (ImageError, OSError) as e:
                gallery_skipped.append({"id": i, "kind": UNREADABLE, "reason": f"a gallery image cannot be read: {e}"})
        if images:
            pixels = gill.image_processor(images=images, return_tensors="pt")["pixel_values"]
            feats.append(gill.model.encode_images(pixels.to(param.device, param.dtype)).retrieval.float().cpu())
    results: dict[str, Any] = {"gallery_size": len(ids)}
    if gallery_skipped:
        results["gallery_skipped"] = gallery_skipped
    if not ids:
        return results
    index = {i: n for n, i in enumerate(ids)}
    gallery = torch.nn.functional.normalize(torch.cat(feats), dim=-1)
    context = {e.id: e.context_ids or [Path(p).stem for p in e.context_images] for e in dataset.examples}
    for name in settings:
        records = [r for r in read_records(out / name / "records.jsonl").values() if "retrieval_embedding" in r]
        skipped = [{"id": r["id"], "kind": UNREADABLE, "reason": f"its target {r['target_id']} is not in the gallery"}
                   for r in records if r["target_id"] not in index]
        records = [r for r in records if r["target_id"] in index]
        if not records:
            continue
        q = torch.nn.functional.normalize(torch.tensor([r["retrieval_embedding"] for r in records]), dim=-1)
        scores = q @ gallery.T
        targets = torch.tensor([index[r["target_id"]] for r in records])
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, r in enumerate(records):
            for image_id in context.get(r["id"], []):
                if image_id != r["target_id"] and image_id in index:
                    mask[row, index[image_id]] = True
        results[name] = {
            "context_masked": {f"R@{k}": v for k, v in recall_at_k(scores, targets, exclude=mask).items()},
            "full_gallery": {f"R@{k}": v for k, v in recall_at_k(scores, targets).items()},
            "n": len(records),
        }
        if skipped:
            results[name]["skipped"] = skipped
    return results
