"""Resumable generation runs and their scoring.

Layout of an output directory::

    OUT/<setting>/images/<example id>.png   the generated image
    OUT/<setting>/records.jsonl             one line per finished example (id, seed, prompt, target, ...)
    OUT/summary.json                        every setting's scores (written by ``score``)
    OUT/report.html                         grids and the table beside the paper's numbers

An example is finished when its line is in ``records.jsonl`` and its image exists; a rerun skips
finished examples, so an interrupted run resumes and a finished one can be re-scored (``score``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gill.eval.data import Dataset, Example


@dataclass
class Setting:
    name: str  # folder name, e.g. "gill/5-captions-4-images" or "sd/1-caption"
    mode: str  # "gill" or "sd"
    build: Callable[[Example], Any]  # GILL: a list of inputs; SD: a prompt string


def stable_seed(base: int, example_id: str) -> int:
    """A per-example seed that does not depend on batching or order."""
    return base + int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 1_000_000


def read_records(path: Path) -> dict[str, dict]:
    records = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                records[r["id"]] = r
    return records


def run_setting(gill, dataset: Dataset, setting: Setting, out: Path, *, diffusion, batch_size: int = 8,
                seed: int = 42, truncate_left: bool = True) -> dict[str, int]:
    """Generate the missing outputs of one setting. Returns counts: computed, reused."""
    folder = out / setting.name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records_path = folder / "records.jsonl"
    done = {i for i, r in read_records(records_path).items() if (folder / r["image"]).is_file()}
    todo = [e for e in dataset.examples if e.id not in done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        seeds = [stable_seed(seed, e.id) for e in batch]
        inputs = [setting.build(e) for e in batch]
        extra: list[dict] = [{} for _ in batch]
        if setting.mode == "gill":
            slots = gill.image_slot_embeddings(inputs)
            images = gill.diffusion.generate(slots.generation, diffusion, seeds=seeds)
            for x, r in zip(extra, slots.retrieval.float().cpu()):
                x["retrieval_embedding"] = [round(v, 6) for v in r.tolist()]
        else:
            images = generate_from_text(gill.diffusion.pipe, inputs, diffusion, seeds, truncate_left)
        with open(records_path, "a", encoding="utf-8") as f:
            for e, s, prompt, image, x in zip(batch, seeds, inputs, images, extra):
                rel = f"images/{safe_name(e.id)}.png"
                tmp = folder / f"{rel}.tmp.png"
                image.save(tmp)
                os.replace(tmp, folder / rel)
                f.write(json.dumps({"id": e.id, "image": rel, "seed": s, "target": str(e.target),
                                    "target_id": e.target_id, "prompt": describe(prompt), **x}, ensure_ascii=False) + "\n")
                f.flush()
    return {"computed": len(todo), "reused": len(done)}


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


def score(out: Path, scorer, *, lpips=None, retrieval: dict | None = None, extra: dict | None = None) -> dict:
    """CLIP similarity (and LPIPS) of every setting's outputs with their targets -> summary.json."""
    from PIL import Image

    from gill.eval.metrics import mean_and_ci, paired_cosine

    summary: dict[str, Any] = {"scorer": getattr(scorer, "spec", type(scorer).__name__), "settings": {}}
    target_cache: dict[str, torch.Tensor] = {}
    for records_path in sorted(out.glob("*/*/records.jsonl")):
        folder = records_path.parent
        name = folder.relative_to(out).as_posix()
        records = list(read_records(records_path).values())
        if not records:
            continue
        outputs = [Image.open(folder / r["image"]) for r in records]
        missing = [r["target"] for r in records if r["target"] not in target_cache]
        if missing:
            feats = scorer.embed([Image.open(t) for t in missing])
            target_cache.update(dict(zip(missing, feats)))
        sims = paired_cosine(scorer.embed(outputs), torch.stack([target_cache[r["target"]] for r in records]))
        mean, ci = mean_and_ci(sims.tolist())
        entry = {"n": len(records), "clip_similarity": mean, "clip_similarity_ci95": ci}
        if lpips is not None:
            d = [lpips.distance(o, Image.open(r["target"])) for o, r in zip(outputs, records)]
            entry["lpips"], entry["lpips_ci95"] = mean_and_ci(d)
        summary["settings"][name] = entry
    if retrieval:
        summary["retrieval"] = retrieval
    summary.update(extra or {})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


@torch.no_grad()
def vist_retrieval(gill, dataset: Dataset, out: Path, settings: Sequence[str], batch_size: int = 32) -> dict:
    """Recall@1/5/10 of each story's last image among all stories' images, from the text-side embedding
    saved for each GILL setting, under both gallery protocols."""
    from PIL import Image

    from gill.eval.metrics import recall_at_k

    ids = sorted(dataset.gallery)
    index = {i: n for n, i in enumerate(ids)}
    feats = []
    for start in range(0, len(ids), batch_size):
        images = [Image.open(dataset.gallery[i]).convert("RGB") for i in ids[start:start + batch_size]]
        pixels = gill.image_processor(images=images, return_tensors="pt")["pixel_values"]
        param = next(gill.model.vision.parameters())
        feats.append(gill.model.encode_images(pixels.to(param.device, param.dtype)).retrieval.float().cpu())
    gallery = torch.nn.functional.normalize(torch.cat(feats), dim=-1)
    context = {e.id: [Path(p).stem for p in e.context_images] for e in dataset.examples}
    results = {"gallery_size": len(ids)}
    for name in settings:
        records = [r for r in read_records(out / name / "records.jsonl").values() if "retrieval_embedding" in r]
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
    return results
