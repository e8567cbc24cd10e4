"""Training data: webdataset shards of (image, caption) with precomputed diffusion text embeddings.

Shards hold ``KEY.jpg|png|webp`` and ``KEY.txt`` (img2dataset's webdataset output, or
``training.make_shards`` from a folder or table).

Interleaved samples (stories, documents) add a context before the caption: ``KEY.context.json``, a JSON
list of texts, one per context image, and the images ``KEY.context0.png``, ``KEY.context1.png``, ... (any
of the image extensions). Text ``i`` comes before image ``i`` ("" for an image with no text before it);
then ``KEY.txt`` and, last, ``KEY.png``, the image the [IMG] losses read. So a VIST story of five steps
is ``context.json = [caption_1 .. caption_4]``, ``context0..3`` its first four pictures, ``txt`` its fifth
caption and ``png`` its fifth picture; a document's earlier pairs go in its context the same way.
``training.precompute_sd_embeddings`` writes, for shard ``NAME.tar``, ``SD_DIR/NAME.safetensors`` mapping
each sample key to its caption's (77, d) text encoder states.

A sample may scale its own captioning and generation (mapper) losses with ``KEY.loss.json``, e.g.
``{"caption": 0, "mapper": 0.3}`` (each default 1; 0 leaves that task out for the sample): for samples
whose text is not their picture's caption, such as a story's last picture after "it turns yellow."
(captioning that pair teaches the visual prefix a sentence the picture does not show), or whose
diffusion target the text only implies.

The stream is deterministic: shard order is shuffled per epoch with a seeded generator, then samples pass
a seeded shuffle buffer. Every rank reads the same stream and takes its slice of each global batch, so a
run's batches do not depend on the number of processes (and a resumed run skips exactly the samples it
had consumed, without decoding them). Bad samples (corrupt image, empty caption, missing embedding) come
out as ``Sample`` with ``error`` set, so the loop can count them; they never reach a batch. A key met a
second time in one shard is counted as a duplicate (``precompute_sd_embeddings`` gives a repeated key no
embedding, so its first sample is counted as missing one: no sample trains on another's target).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str
    pixel_values: torch.Tensor | None = None  # (3, H, W)
    caption: str = ""
    sd_embedding: torch.Tensor | None = None  # (77, d)
    error: str | None = None
    # interleaved samples: the (text, pixels) pairs before the caption, oldest first; text i precedes image i
    context: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    # KEY.loss.json: how much this sample's captioning and generation (mapper) losses count
    caption_weight: float = 1.0
    mapper_weight: float = 1.0


def _all(urls):
    """Every shard: the split over ranks and workers is done by the caller, not by webdataset."""
    return urls


def expand_shards(pattern: str) -> list[str]:
    import braceexpand

    out: list[str] = []
    for part in pattern.split("::"):
        out.extend(braceexpand.braceexpand(part))
    return out


def shard_name(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".tar") else name


class BadEmbedding(ValueError):
    """A precomputed embedding that cannot be a training target; the message is the counted reason."""


class SDEmbeddings:
    """Per-shard safetensors files of precomputed diffusion text embeddings, opened lazily.

    ``shape``: the (L, d) every target must have (the model's ``gen_seq_len, gen_emb_dim``); a target of
    another shape, with a NaN or an infinity, or in a file that cannot be read raises ``BadEmbedding``."""

    def __init__(self, root: str | os.PathLike | None, shape: tuple[int, int] | None = None):
        self.root = Path(root) if root is not None else None
        self.shape = tuple(shape) if shape is not None else None
        self._open: dict[str, Any] = {}
        self._keys: dict[str, frozenset[str]] = {}  # (safe_open's keys() builds a list at every call)

    def get(self, shard: str, key: str) -> torch.Tensor | None:
        if self.root is None:
            return None
        name = shard_name(shard)
        if name not in self._open:
            from safetensors import safe_open

            path = self.root / f"{name}.safetensors"
            try:
                handle = safe_open(str(path), framework="pt") if path.is_file() else None
                self._keys[name] = frozenset(handle.keys()) if handle is not None else frozenset()
                self._open[name] = handle
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: every sample of it is counted
                self._open[name] = BadEmbedding(f"unreadable diffusion embeddings file: {path.name} ({e})")
        f = self._open[name]
        if isinstance(f, BadEmbedding):
            raise f
        if f is None or key not in self._keys[name]:
            return None
        try:
            emb = f.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise BadEmbedding(f"unreadable diffusion embedding: {name}/{key} ({e})") from None
        if self.shape is not None and tuple(emb.shape) != self.shape:
            raise BadEmbedding(f"mis-shaped diffusion embedding: {list(emb.shape)}, expected {list(self.shape)}")
        if not torch.isfinite(emb).all():
            raise BadEmbedding("non-finite diffusion embedding: NaN or infinity")
        return emb


class ShardStream(torch.utils.data.IterableDataset):
    """The samples of one epoch, in a seeded order, from ``start`` on (earlier ones are not decoded)."""

    def __init__(self, shards: list[str], image_processor: Any, sd_dir: str | None, *, epoch: int = 0,
                 seed: int = 0, start: int = 0, shuffle_buffer: int = 1000, need_sd: bool = True,
                 sd_shape: tuple[int, int] | None = None):
        self.shards, self.image_processor, self.sd_dir, self.sd_shape = shards, image_processor, sd_dir, sd_shape
        self.epoch, self.seed, self.start, self.buffer, self.need_sd = epoch, seed, start, shuffle_buffer, need_sd

    def _raw(self, generator: torch.Generator) -> Iterator[tuple[str, dict]]:
        import webdataset as wds

        order = torch.randperm(len(self.shards), generator=generator).tolist() if self.buffer else range(len(self.shards))
        for i in order:
            url = self.shards[i]
            errors: list[str] = []
            seen: set[str] = set()
            try:
                for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=_all, workersplitter=_all,
                                             handler=lambda e: errors.append(repr(e)) or True):
                    key = sample.get("__key__")
                    if key in seen:  # a second sample of one key: which target is whose cannot be told
                        sample = {"__key__": key, "__error__": f"duplicate key: {key} appears again in {shard_name(url)}"}
                    seen.add(key)
                    yield url, sample
            except Exception as e:  # an unopenable shard is counted, not fatal
                errors.append(repr(e))
            for n, err in enumerate(errors):
                yield url, {"__key__": f"{shard_name(url)}#error{n}", "__error__": f"broken shard: {err}"}

    def _shuffled(self) -> Iterator[tuple[str, dict]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if not self.buffer:
            yield from self._raw(g)
            return
        buf: list[tuple[str, dict]] = []
        for item in self._raw(g):
            buf.append(item)
            if len(buf) >= self.buffer:
                yield buf.pop(int(torch.randint(len(buf), (1,), generator=g)))
        while buf:
            yield buf.pop(int(torch.randint(len(buf), (1,), generator=g)))

    def __iter__(self) -> Iterator[Sample]:
        # DataLoader workers each decode every n-th item; the loader's round-robin restores the order.
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        sd = SDEmbeddings(self.sd_dir, self.sd_shape)
        for index, (url, raw) in enumerate(self._shuffled()):
            if index % workers != worker:
                continue
            key = f"{shard_name(url)}/{raw.get('__key__', index)}"
            if index < self.start:
                yield Sample(key, error="skipped: before the resume point")
                continue
            yield self._decode(url, key, raw, sd)

    def _decode(self, url: str, key: str, raw: dict, sd: SDEmbeddings) -> Sample:
        from gill.images import ImageError, open_image

        if "__error__" in raw:
            return Sample(key, error=raw["__error__"])
        caption = raw.get("txt", b"")
        caption = caption.decode("utf-8", "replace").strip() if isinstance(caption, bytes) else str(caption).strip()
        if not caption:
            return Sample(key, error="empty caption")
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return Sample(key, error="no image")
        try:
            emb = sd.get(url, raw["__key__"])
        except BadEmbedding as e:
            if self.need_sd:
                return Sample(key, error=str(e))
            emb = None
        if emb is None and self.need_sd:
            return Sample(key, error="missing diffusion embedding")
        try:
            weights = _loss_weights(raw)
        except ValueError as e:
            return Sample(key, error=f"bad loss.json: {e}")
        try:
            image = open_image(raw[ext], name=key)
            context = self._context(key, raw)
        except ImageError as e:  # bounded before the resize; the reason's first words are the counted kind
            return Sample(key, error=f"corrupt image: {e.reason}")
        except ValueError as e:
            return Sample(key, error=f"bad context: {e}")
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return Sample(key, pixels, caption, emb, context=context, **weights)

    def _context(self, key: str, raw: dict) -> list[tuple[str, torch.Tensor]]:
        """The (text, pixels) pairs of ``KEY.context.json`` and ``KEY.context{i}.<ext>``; [] if none."""
        import json

        from gill.images import open_image

        if "context.json" not in raw:
            return []
        try:
            texts = json.loads(raw["context.json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"context.json is not JSON ({e})") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("context.json must be a list of texts, one per context image")
        images = []
        for i in range(len(texts)):
            ext = next((e for e in IMAGE_EXTS if f"context{i}.{e}" in raw), None)
            if ext is None:
                raise ValueError(f"context.json has {len(texts)} texts but there is no context{i} image")
            images.append(open_image(raw[f"context{i}.{ext}"], name=f"{key}.context{i}.{ext}"))
        if not images:
            return []
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return [(t.strip(), px) for t, px in zip(texts, pixels)]


LOSS_WEIGHTS = ("caption", "mapper")  # the per-sample weights KEY.loss.json may set


def _loss_weights(raw: dict) -> dict[str, float]:
    """``KEY.loss.json`` (e.g. ``{"caption": 0, "mapper": 0.3}``) as Sample fields; {} when the sample has none."""
    import json
    import math

    if "loss.json" not in raw:
        return {}
    try:
        given = json.loads(raw["loss.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(given, dict) or set(given) - set(LOSS_WEIGHTS):
        raise ValueError(f'expected an object of weights {list(LOSS_WEIGHTS)}, e.g. {{"mapper": 0.3}}, got {given!r}')
    for name, w in given.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f'"{name}" must be a number >= 0, got {w!r}')
    return {f"{name}_weight": float(w) for name, w in given.items()}


def global_batches(stream: Iterator[Sample], batch_size: int, counts: Counter,
                   drop_last: bool = True) -> Iterator[tuple[list[Sample], int]]:
    """Group good samples into global batches; count bad ones by reason (each occurrence: a bad sample
    is met once per epoch). Yields the batch and the number of stream items consumed so far (the resume
    position)."""
    batch: list[Sample] = []
    consumed = 0
    for sample in stream:
        consumed += 1
        if sample.error is not None:
            if not sample.error.startswith("skipped"):
                counts[sample.error.split(":")[0]] += 1
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch, consumed
            batch = []
    if batch and not drop_last:
        yield batch, consumed
