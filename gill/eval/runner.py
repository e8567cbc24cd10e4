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
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gill.io import atomic_path, atomic_write_text, inside
from gill.eval.data import TOO_LONG, UNREADABLE, UNREADABLE_OUTPUT, Dataset, Example, skip_counts
from gill.eval.seeds import PerExampleSeeds, stable_seed  # noqa: F401  (stable_seed: re-exported)
from gill.eval.shard import Shard

LOG = logging.getLogger("gill.eval")


@dataclass
class Setting:
    name: str  # folder name, e.g. "gill/5-captions-4-images" or "sd/1-caption"
    mode: str  # "gill" or "sd"
    build: Callable[[Example], Any]  # GILL: a list of inputs; SD: a prompt string


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


def _write_records(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _rank_files(folder: Path, what: str) -> list[Path]:
    """The per-process files of a sharded run (``records.rank-00001.jsonl``), merged by rank 0 at the end."""
    return sorted(folder.glob(f"{what}.rank-*.json*"))


def _load_inputs(inputs: Any, prepare: Callable[[Any], Any] | None = None) -> Any:
    """A GILL conversation with its image files opened (bounded, RGB, then ``prepare``d); ``ImageError``
    or ``FileNotFoundError`` for one that cannot be read."""
    from gill.images import check_image, open_image

    if isinstance(inputs, str):
        return inputs
    def load(x: Any) -> Any:
        if isinstance(x, os.PathLike):
            return open_image(x, name=str(x), prepare=prepare)
        image = check_image(x)
        return prepare(image) if prepare is not None else image

    return [x if isinstance(x, str) else load(x) for x in inputs]


def _gill_input(gill, example_id: str, inputs: Any, prepare: Callable[[Any], Any] | None, truncate: bool, *,
                bos_every_text: bool = False) -> tuple[Any, int, dict[str, str] | None]:
    """(the conversation with its images opened, the positions it exceeds the model's context by, None), or
    (None, 0, a skip record) when an image cannot be read now or the prompt is too long without ``truncate``."""
    from gill.images import ImageError

    try:
        loaded = _load_inputs(inputs, prepare)
    except (ImageError, OSError) as err:  # broken or gone since the dataset was read
        return None, 0, {"id": example_id, "kind": UNREADABLE, "reason": f"an input image cannot be read: {err}"}
    over = gill.slot_overflow(loaded, bos_every_text=bos_every_text)
    if over and not truncate:
        n = len(gill.img_tokens.ids)
        return None, 0, {"id": example_id, "kind": TOO_LONG, "reason": (
            f"its prompt and the {n} [IMG] tokens take {over} positions more than the model's context of "
            f"{gill.context_length}; --truncate keeps its last {gill.context_length - n}")}
    return loaded, over, None


def output_owners(examples: Sequence[Example], score_only: Sequence[Example] = ()) -> dict[str, Example]:
    """Example id -> the example whose output it is scored with when outputs are kept per ground-truth
    image (the original protocol): the last example in order with the same target. ``score_only`` stories
    (not generated for) get that owner too where there is one."""
    last = {e.target_id or str(e.target): e for e in examples}
    owners = {e.id: last[e.target_id or str(e.target)] for e in examples}
    owners.update({e.id: last[e.target_id or str(e.target)] for e in score_only if (e.target_id or str(e.target)) in last})
    return owners


def run_setting(gill, dataset: Dataset, setting: Setting, out: Path, *, diffusion, batch_size: int = 8,
                seed: int = 42, truncate_left: bool = True, noise=None, truncate: bool = False,
                shard: Shard = Shard(), one_output_per_target: bool = False,
                prepare: Callable[[Any], Any] | None = None, sd_like_original: bool = False) -> dict[str, Any]:
    """Generate the missing outputs of one setting; this process's share of them under torchrun.

    ``noise``: ``gill.eval.seeds.PerExampleSeeds(seed)`` (the default) or a ``SeedStream``. ``truncate``: a
    GILL prompt longer than the model's context loses its oldest positions (recorded as ``truncated``)
    instead of being skipped. ``one_output_per_target``: examples sharing a ground-truth image share the
    output of the last of them (the original keyed its files by that image). ``prepare``: applied to each
    opened input image (the original protocol squashes them to 224x224). ``truncate_left`` and
    ``sd_like_original``: how the plain-SD settings cut long prompts (``generate_from_text``).

    Batches are cut from the whole dataset, then dealt out to the processes (``shard``), so an example's
    output does not depend on the number of processes. Returns counts: computed, reused, and ``skipped``:
    the examples this process could not run (``{"id", "kind", "reason"}``: an input image that cannot be
    read now, a prompt too long); they are not written and a rerun tries them again. Rank 0 merges every
    process's records into ``records.jsonl`` (``merge_setting``) once all are done."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    noise = noise or PerExampleSeeds(seed)
    folder = out / setting.name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    own = folder / ("records.jsonl" if shard.world == 1 else f"records.rank-{shard.rank:05d}.jsonl")
    done = _finished(folder, own)
    owners = output_owners(dataset.examples) if one_output_per_target else {}
    computed_here = [e for e in dataset.examples if owners.get(e.id, e) is e]
    position = {e.id: e.position if e.position >= 0 else n for n, e in enumerate(dataset.examples)}
    skipped: list[dict[str, str]] = []
    computed = reused = 0
    batches = [computed_here[i:i + batch_size] for i in range(0, len(computed_here), batch_size)]
    for number, batch in enumerate(batches):
        if not shard.takes(number):
            continue
        reused += sum(e.id in done for e in batch)
        ready = _ready(gill, setting, [e for e in batch if e.id not in done], prepare, truncate, skipped)
        if not ready:
            continue
        examples = [e for e, _, _, _ in ready]
        inputs = [x for _, _, x, _ in ready]
        plan = noise.noise([e.id for e in examples], [position[e.id] for e in examples])
        extra = [dict(x) for _, _, _, x in ready]
        if setting.mode == "gill":
            slots = gill.image_slot_embeddings(inputs, truncate=truncate)
            images = gill.diffusion.generate(slots.generation, diffusion, seeds=plan.seeds, latents=plan.latents)
            for x, r in zip(extra, slots.retrieval.float().cpu()):
                x["retrieval_embedding"] = [round(v, 6) for v in r.tolist()]
        else:
            with gill.diffusion.scheduled(diffusion.scheduler) as pipe:  # the scheduler GILL's settings draw with
                images = generate_from_text(pipe, inputs, diffusion, plan.seeds, truncate_left, latents=plan.latents,
                                            like_original=sd_like_original)
        computed += _write_outputs(folder, own, ready, plan.labels, images, extra)
    skip_file = folder / ("skipped.json" if shard.world == 1 else f"skipped.rank-{shard.rank:05d}.json")
    atomic_write_text(skip_file, json.dumps(skipped, indent=1, ensure_ascii=False) + "\n")
    return {"computed": computed, "reused": reused, "skipped": skipped}


def _finished(folder: Path, own: Path) -> set[str]:
    """The ids whose record (in this process's file, another process's or an earlier run's) and image are
    there; this process's file rewritten first when a line of it had to be dropped."""
    records, dropped, rewrite = _scan_records(own)
    for d in dropped:
        LOG.warning("%s: %s; dropped (its example will be recomputed)", own, d)
    if rewrite:
        _write_records(own, records.values())
    finished = dict(records)
    for other in [folder / "records.jsonl", *_rank_files(folder, "records")]:
        if other != own:
            finished.update(_scan_records(other)[0])
    return {i for i, r in finished.items() if _output_path(folder, r["image"]) is not None}


def _ready(gill, setting: Setting, examples: list[Example], prepare, truncate: bool,
           skipped: list[dict[str, str]]) -> list[tuple[Example, Any, Any, dict]]:
    """(example, its inputs as described, its inputs as given to the model, extra record fields) for each
    example that can run now; the others appended to ``skipped``."""
    ready = []
    for e in examples:
        inputs = setting.build(e)
        if setting.mode != "gill":
            ready.append((e, inputs, inputs, {}))
            continue
        loaded, over, skip = _gill_input(gill, e.id, inputs, prepare, truncate)
        if skip is not None:
            skipped.append(skip)
            continue
        ready.append((e, inputs, loaded, {"truncated": over} if over else {}))
    return ready


def _write_outputs(folder: Path, own: Path, ready: list, labels: list[dict], images: list, extra: list[dict]) -> int:
    """Each image under a unique temporary name renamed into place, then its record line; returns how many."""
    with open(own, "a", encoding="utf-8") as f:
        for (e, described, _, _), label, image, x in zip(ready, labels, images, extra):
            rel = f"images/{output_name(e.id)}.png"
            with atomic_path(folder / rel) as tmp:
                image.save(tmp, format="PNG")
            f.write(json.dumps({"id": e.id, "image": rel, **label, "target": str(e.target),
                                "target_id": e.target_id, "prompt": describe(described), **x},
                               ensure_ascii=False) + "\n")
            f.flush()
    return len(ready)


def merge_setting(dataset: Dataset, setting: Setting, out: Path, *, one_output_per_target: bool = False) -> dict:
    """Rank 0, once every process has finished ``run_setting``: every process's records (and those of
    earlier runs) into one ``records.jsonl`` in dataset order, examples that share another's output
    (``one_output_per_target``, with the dataset's ``score_only`` stories) recorded with it, and the skipped
    examples into ``skipped.json``. The per-process files are then removed. Returns ``{"records": n,
    "skipped": [...]}``."""
    folder = out / setting.name
    merged: dict[str, dict] = {}
    rank_records = _rank_files(folder, "records")
    for path in [folder / "records.jsonl", *rank_records]:
        merged.update(read_records(path))
    everyone = dataset.in_file_order() if one_output_per_target else dataset.examples
    owners = output_owners(dataset.examples, dataset.score_only) if one_output_per_target else {}
    for e in everyone:
        owner = owners.get(e.id, e)
        if owner is not e and owner.id in merged:
            shared = {k: v for k, v in merged[owner.id].items() if k not in ("id", "prompt", "truncated")}
            merged[e.id] = {"id": e.id, **shared, "prompt": describe(setting.build(e)), "output_of": owner.id}
    order = {e.id: n for n, e in enumerate(everyone)}
    ranked = sorted(merged.values(), key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    _write_records(folder / "records.jsonl", ranked)
    skipped: list[dict] = []
    rank_skips = _rank_files(folder, "skipped")
    for path in rank_skips or [folder / "skipped.json"]:
        if path.is_file():
            skipped += json.loads(path.read_text(encoding="utf-8"))
    skipped += [{"id": e.id, "kind": s["kind"], "reason": f"shares the output of {owners[e.id].id}, which was "
                 f"skipped: {s['reason']}"} for e in everyone for s in skipped
                if owners.get(e.id, e) is not e and s["id"] == owners[e.id].id]
    skipped.sort(key=lambda s: (order.get(s["id"], len(order)), s["id"]))
    atomic_write_text(folder / "skipped.json", json.dumps(skipped, indent=1, ensure_ascii=False) + "\n")
    for path in rank_records + rank_skips:
        path.unlink()
    return {"records": len(ranked), "skipped": skipped}


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


def original_left_cut(tokenizer, prompt: str) -> str:
    """The text the original's Stable Diffusion pipeline encodes for ``prompt`` (``gill/custom_sd.py`` with
    ``truncate_side='left'``): unchanged when its tokens, start and end tokens included, fit the tokenizer's
    length L; else the L tokens before its last token, decoded back to text. The pipeline then tokenises
    that text again and cuts it at L from the right, so the prompt's last two tokens are lost too."""
    ids = tokenizer(prompt).input_ids
    length = tokenizer.model_max_length
    if len(ids) <= length:
        return prompt
    return tokenizer.batch_decode([ids[-1 - length:-1]], clean_up_tokenization_spaces=True)[0]


@torch.no_grad()
def generate_from_text(pipe, prompts: Sequence[str], options, seeds: Sequence[int] | None, truncate_left: bool,
                       latents: torch.Tensor | None = None, *, like_original: bool = False) -> list[Any]:
    """Plain Stable Diffusion on text prompts (the baseline). A prompt over the text encoder's length keeps
    its end (``truncate_left``: the tokenizer's left truncation), where the story's last caption is, or its
    start (a plain diffusers call); ``like_original``: the original's left cut (``original_left_cut``)."""
    tokenizer = pipe.tokenizer
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "right" if like_original else "left" if truncate_left else side
    if like_original:
        prompts = [original_left_cut(tokenizer, p) for p in prompts]
    try:
        device = getattr(pipe, "device", torch.device("cpu"))
        kwargs = dict(prompt=list(prompts), num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
                      output_type="pil")
        if latents is not None:
            kwargs["latents"] = latents.to(device)
        else:
            kwargs["generator"] = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return list(pipe(**kwargs).images)
    finally:
        tokenizer.truncation_side = side


# ---- scoring -------------------------------------------------------------------------------------------


def _number(x: float) -> float | None:
    """A summary's number, or None (JSON null) where there is none (the CI of one example)."""
    return None if x != x else x


def score(out: Path, scorer, *, lpips=None, retrieval: dict | None = None, extra: dict | None = None,
          batch_size: int = 32, prepare_target: Callable[[Any], Any] | None = None, protocol=None) -> dict:
    """CLIP similarity (and LPIPS) of every setting's outputs with their targets -> summary.json.

    Each image is opened with ``gill.images.open_image`` (targets through ``prepare_target``: the original
    protocol's 224x224 squash of VIST images); a record whose output or target cannot be read is not scored
    but listed in its setting's ``skipped`` (``{"id", "kind", "reason"}``), and ``n`` counts the scored
    ones. CLIP similarity is averaged over examples (records: under the original protocol examples that
    share an output are each scored with it); LPIPS over examples, or once per distinct output file where
    ``protocol.lpips == "per-file"`` (the original's ``lpips_2dirs.py``). ``chance``: the mean similarity
    of each output with the next scored example's target (another image of the same dataset), the level
    an output unrelated to its prompt reaches. The runner's skipped examples (``skipped.json``) are listed
    with the scorer's. The dataset's own skipped examples (``extra["skipped"]``) are counted by kind in
    ``skipped_counts``."""
    per_file = protocol is not None and protocol.lpips == "per-file"
    summary: dict[str, Any] = {"scorer": getattr(scorer, "spec", type(scorer).__name__), "settings": {}}
    target_cache: dict[str, torch.Tensor | str] = {}  # target path -> its features, or why it cannot be read
    for records_path in sorted(out.glob("*/*/records.jsonl")):
        folder = records_path.parent
        records = list(read_records(records_path).values())
        if records:
            summary["settings"][folder.relative_to(out).as_posix()] = _score_setting(
                folder, records, scorer, lpips, per_file, target_cache, batch_size, prepare_target)
    if retrieval:
        summary["retrieval"] = retrieval
    summary.update(extra or {})
    if "skipped" in summary:
        summary["skipped_counts"] = skip_counts(summary["skipped"])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _open(path: Path | None, what: str, prepare=None) -> tuple[Any, str | None]:
    """(the image, None), or (None, why it cannot be read)."""
    from gill.images import ImageError, open_image

    try:
        if path is None:
            raise FileNotFoundError("no such file in the setting's folder")
        return open_image(path, name=str(path), prepare=prepare), None
    except (ImageError, OSError) as e:
        return None, f"{what} cannot be read: {e}"


def _score_setting(folder: Path, records: list[dict], scorer, lpips, per_file: bool, target_cache: dict,
                   batch_size: int, prepare_target) -> dict[str, Any]:
    """One setting's entry of the summary (``score``)."""
    from gill.eval.metrics import mean_and_ci, paired_cosine

    sims: list[float] = []
    distances: dict[str, float] = {}  # per example id, or per output file
    skip_file = folder / "skipped.json"
    skipped: list[dict[str, str]] = json.loads(skip_file.read_text(encoding="utf-8")) if skip_file.is_file() else []
    scored_outputs: list[torch.Tensor] = []
    scored_targets: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        opened = []
        for t in dict.fromkeys(r["target"] for r in chunk if r["target"] not in target_cache):
            im, why = _open(Path(t), "the ground-truth image", prepare_target)
            if im is None:
                target_cache[t] = why
            else:
                opened.append((t, im))
        if opened:
            target_cache.update(zip([t for t, _ in opened], scorer.embed([im for _, im in opened])))
        pairs, outputs = [], {}
        for r in chunk:
            if isinstance(target_cache[r["target"]], str):
                skipped.append({"id": r["id"], "kind": UNREADABLE, "reason": target_cache[r["target"]]})
                continue
            if r["image"] not in outputs:
                outputs[r["image"]] = _open(_output_path(folder, r["image"]), f"the output image {r['image']}")
            output, why = outputs[r["image"]]
            if output is None:
                skipped.append({"id": r["id"], "kind": UNREADABLE_OUTPUT, "reason": why})
            else:
                pairs.append((r, output))
        if not pairs:
            continue
        images = list(dict.fromkeys(r["image"] for r, _ in pairs))
        feats = dict(zip(images, scorer.embed([outputs[i][0] for i in images])))
        out_feats = torch.stack([feats[r["image"]] for r, _ in pairs])
        sims += paired_cosine(out_feats, torch.stack([target_cache[r["target"]] for r, _ in pairs])).tolist()
        scored_outputs += list(out_feats)
        scored_targets += [r["target"] for r, _ in pairs]
        for r, o in pairs if lpips is not None else ():
            key = r["image"] if per_file else r["id"]
            target = None if key in distances else _open(Path(r["target"]), "the ground-truth image", prepare_target)[0]
            if target is not None:
                distances[key] = lpips.distance(o, target)
    mean, ci = (_number(x) for x in mean_and_ci(sims))
    entry = {"n": len(sims), "clip_similarity": mean, "clip_similarity_ci95": ci, "skipped": skipped}
    if len(scored_outputs) > 1:
        shifted = [target_cache[t] for t in scored_targets[1:] + scored_targets[:1]]
        entry["chance"] = float(paired_cosine(torch.stack(scored_outputs), torch.stack(shifted)).mean())
    if lpips is not None:
        entry["lpips"], entry["lpips_ci95"] = (_number(x) for x in mean_and_ci(list(distances.values())))
        entry["lpips_n"] = len(distances)
        entry["lpips_per"] = "output file" if per_file else "example"
    return entry
