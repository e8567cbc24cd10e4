"""VIST contextual retrieval: Recall@1/5/10 of each story's last image among a gallery of images.

Two ways to rank (``gill/eval/README.md`` gives the original's lines):

- ``fromage`` (the original protocol; FROMAGe's ``evals/eval_vist_retrieval.py``, which GILL's table
  follows): each of the story's 4 context images has 10000 taken off its score, once per time the story
  shows it, the target included where the story repeats it as a context image; the top 10 are
  ``torch.topk``'s, ties in its order, and a query hits at k when its target is among the first k.
- ``both-galleries`` (clean): the context images are removed except the target, which is never masked,
  and a tie counts against the query (the target must beat every other image strictly); reported with the
  context masked and over the full gallery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gill.eval.data import UNREADABLE, Dataset, Example
from gill.eval.metrics import recall_at_k, topk_recall
from gill.eval.runner import _gill_input, read_records

KS = (1, 5, 10)


def _gallery_features(gill, dataset: Dataset, prepare, batch_size: int) -> tuple[list[str], torch.Tensor | None, list[dict]]:
    """(image ids, their L2-normalised image-side retrieval embeddings, the gallery images that could not
    be read). Each image is opened with ``gill.images.open_image`` (and ``prepare``)."""
    from gill.images import ImageError, open_image

    ids, feats, gallery_skipped = [], [], []
    candidates = sorted(dataset.gallery)
    param = next(gill.model.vision.parameters())
    for start in range(0, len(candidates), batch_size):
        images = []
        for i in candidates[start:start + batch_size]:
            try:
                images.append(open_image(dataset.gallery[i], name=str(dataset.gallery[i]), prepare=prepare))
                ids.append(i)
            except (ImageError, OSError) as e:
                gallery_skipped.append({"id": i, "kind": UNREADABLE, "reason": f"a gallery image cannot be read: {e}"})
        if images:
            pixels = gill.image_processor(images=images, return_tensors="pt")["pixel_values"]
            feats.append(gill.model.encode_images(pixels.to(param.device, param.dtype)).retrieval.float().cpu())
    gallery = torch.nn.functional.normalize(torch.cat(feats), dim=-1) if feats else None
    return ids, gallery, gallery_skipped


def context_mask(pairs: Sequence[tuple[str, str]], context: dict[str, list[str]], index: dict[str, int],
                 shape: tuple[int, int]) -> torch.Tensor:
    """(Q, G) bool: the gallery images each query's story showed before, except its target (clean)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, (example_id, target_id) in enumerate(pairs):
        for image_id in context.get(example_id, []):
            if image_id != target_id and image_id in index:
                mask[row, index[image_id]] = True
    return mask


def context_counts(pairs: Sequence[tuple[str, str]], context: dict[str, list[str]], index: dict[str, int],
                   shape: tuple[int, int]) -> torch.Tensor:
    """(Q, G) int: how many times each query's story showed each gallery image as a context image, the
    target included (FROMAGe takes 10000 off a score once per time)."""
    counts = torch.zeros(shape, dtype=torch.int64)
    for row, (example_id, _) in enumerate(pairs):
        for image_id in context.get(example_id, []):
            if image_id in index:
                counts[row, index[image_id]] += 1
    return counts


def rank(scores: torch.Tensor, pairs: Sequence[tuple[str, str]], context: dict[str, list[str]],
         index: dict[str, int], fromage: bool) -> dict[str, Any]:
    """Recall@1/5/10 of queries ``pairs`` ((example id, target image id)) with ``scores`` (Q, G) against
    the gallery ``index`` (image id -> column), by the protocol's rule (module docstring)."""
    targets = torch.tensor([index[t] for _, t in pairs])
    if fromage:
        pushed = context_counts(pairs, context, index, tuple(scores.shape))
        return {"context_masked": {f"R@{k}": v for k, v in topk_recall(scores, targets, KS, pushed).items()}}
    mask = context_mask(pairs, context, index, tuple(scores.shape))
    return {"context_masked": {f"R@{k}": v for k, v in recall_at_k(scores, targets, KS, exclude=mask).items()},
            "full_gallery": {f"R@{k}": v for k, v in recall_at_k(scores, targets, KS).items()}}


@torch.no_grad()
def _fromage_queries(gill, examples: list[Example], build, prepare, batch_size: int, truncate: bool
                     ) -> tuple[list[Example], torch.Tensor | None, list[dict]]:
    """FROMAGe's retrieval query: the setting's input with BOS before every caption, then the [IMG] tokens,
    in one forward; the text-side retrieval embedding, L2-normalised."""
    kept, feats, skipped = [], [], []
    for start in range(0, len(examples), batch_size):
        batch, inputs = [], []
        for e in examples[start:start + batch_size]:
            loaded, _, skip = _gill_input(gill, e.id, build(e), prepare, truncate, bos_every_text=True)
            if skip is not None:
                skipped.append(skip)
                continue
            batch.append(e)
            inputs.append(loaded)
        if inputs:
            slots = gill.image_slot_embeddings(inputs, truncate=truncate, bos_every_text=True)
            feats.append(torch.nn.functional.normalize(slots.retrieval.float().cpu(), dim=-1))
            kept += batch
    return kept, (torch.cat(feats) if feats else None), skipped


def _not_in_gallery(items: Sequence[tuple[str, str]], index: dict[str, int]) -> list[dict]:
    return [{"id": i, "kind": UNREADABLE, "reason": f"its target {t} is not in the gallery"}
            for i, t in items if t not in index]


def _queries(gill, dataset: Dataset, out: Path, name: str, index: dict[str, int], fromage: bool, build, prepare,
             batch_size: int, truncate: bool) -> tuple[list[tuple[str, str]], torch.Tensor | None, list[dict]]:
    """(pairs (example id, target id), their L2-normalised queries, the examples not scored)."""
    if fromage:
        skipped = _not_in_gallery([(e.id, e.target_id) for e in dataset.examples], index)
        examples = [e for e in dataset.examples if e.target_id in index]
        examples, q, more = _fromage_queries(gill, examples, build, prepare, batch_size, truncate)
        return [(e.id, e.target_id) for e in examples], q, skipped + more
    records = [r for r in read_records(out / name / "records.jsonl").values() if "retrieval_embedding" in r]
    skipped = _not_in_gallery([(r["id"], r["target_id"]) for r in records], index)
    records = [r for r in records if r["target_id"] in index]
    q = torch.nn.functional.normalize(torch.tensor([r["retrieval_embedding"] for r in records]), dim=-1) if records else None
    return [(r["id"], r["target_id"]) for r in records], q, skipped


@torch.no_grad()
def vist_retrieval(gill, dataset: Dataset, out: Path, settings: Sequence[str], batch_size: int = 32, *,
                   protocol=None, builds: dict[str, Callable] | None = None, prepare=None,
                   truncate: bool = False) -> dict:
    """Recall@1/5/10 of each story's last image among the gallery's images, for each GILL setting.

    ``protocol.retrieval == "fromage"`` (the original protocol): the gallery is every readable image the
    annotations name, the query is the setting's input (``builds[name]``) with BOS before every caption
    followed by the [IMG] tokens, ranked as FROMAGe (``context_masked`` only). Otherwise the text-side
    embedding saved with each record is the query, the gallery is the evaluated stories' images, and both
    ``context_masked`` and ``full_gallery`` are reported.

    A gallery image that cannot be read is left out and listed in ``gallery_skipped``; a query whose
    target is not in the gallery is not scored (listed in its setting's ``skipped``)."""
    fromage = protocol is not None and protocol.retrieval == "fromage"
    ids, gallery, gallery_skipped = _gallery_features(gill, dataset, prepare, batch_size)
    results: dict[str, Any] = {"gallery_size": len(ids), "protocol": "fromage" if fromage else "both-galleries"}
    if gallery_skipped:
        results["gallery_skipped"] = gallery_skipped
    if gallery is None:
        return results
    index = {i: n for n, i in enumerate(ids)}
    context = {e.id: e.context_ids or [Path(p).stem for p in e.context_images] for e in dataset.examples}
    for name in settings:
        if fromage and (builds is None or name not in builds):
            continue
        pairs, q, skipped = _queries(gill, dataset, out, name, index, fromage, (builds or {}).get(name), prepare,
                                     batch_size, truncate)
        if q is None or not pairs:
            continue
        results[name] = {**rank(q @ gallery.T, pairs, context, index, fromage), "n": len(pairs),
                         "chance": {f"R@{k}": min(1.0, k / max(1, len(ids) - 4)) for k in KS}}
        if skipped:
            results[name]["skipped"] = skipped
    return results
