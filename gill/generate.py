"""KV-cached interleaved decoding.

The prompt is prefilled once; then one token per step, fed to the model as soon as it is picked (before
the host reads it, so the host's bookkeeping overlaps the GPU's work). When a row picks ``[IMG0]``,
``[IMG1..n-1]`` are fed next as one cached chunk, and the group's last-layer hidden states come straight
out of those forwards (no extra step, unlike the original's ``num_words=2``). Rows of a batch decode
independently: a row that feeds one token while another feeds an [IMG] group pads its chunk with masked
positions, and a finished row feeds masked padding until the batch is done.

``decode_uncached`` is the original's loop (a full forward over the whole sequence every step), kept as the
reference the cached path is tested against and as the baseline of ``scripts/bench_decode.py``.

No I/O here: the caller embeds the prompt and turns token ids and [IMG] states into text and images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from gill import sampling
from gill.model import GILLModel
from gill.settings import RunSettings


@dataclass
class DecodeOptions:
    """Decoding options: values, read as given. ``GILL`` sets the run settings among them (max_new_tokens,
    temperature, top_p, img_scale_factor) from a call's resolved settings (``gill.run``); called directly,
    the decoder needs ``max_new_tokens``, and the others left None are not applied (greedy, no nucleus
    filter, the [IMG0] logit as it is)."""

    max_new_tokens: int | None = None  # counts text tokens and each [IMG] token
    temperature: float | None = None  # 0 is greedy
    top_p: float | None = None
    top_k: int = 0
    stop_on_eos: bool = True
    stop_strings: tuple[str, ...] = ()  # checked on the decoded text of the row
    img_scale_factor: float | None = None  # the original's ret/gen scale factor: logit[IMG0] <- |logit| * factor
    min_tokens_before_image: int = 0  # the original's min_word_tokens
    max_images: int | None = None  # per row; None is unlimited
    allow_images: bool = True
    end_at_image: bool = False  # a row stops once it has emitted an [IMG] group (the original kept no text after it)
    # "auto": the static-cache OPT decoder (one-token steps replayed as a CUDA graph on GPUs) when the LM
    # is a pre-LN OPT, else Hugging Face's dynamic cache; "static" or "hf" force one.
    backend: str = "auto"

    def validated(self) -> DecodeOptions:
        """Raise naming the field for a value decoding cannot use (the run settings by ``RunSettings``'
        rules). A bare string for ``stop_strings`` is one stop string, not its characters."""
        RunSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    img_scale_factor=self.img_scale_factor).validated("decoding options")
        if isinstance(self.stop_strings, str):
            raise TypeError(f"decoding options: stop_strings is the string {self.stop_strings!r}; give a tuple "
                            f"of strings, e.g. ({self.stop_strings!r},)")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise TypeError(f"decoding options: stop_strings must be non-empty strings, got {self.stop_strings!r}")
        for name, lowest in (("top_k", 0), ("min_tokens_before_image", 0), ("max_images", 0)):
            value = getattr(self, name)
            if value is None and name == "max_images":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"decoding options: {name} is {value!r}; expected an integer >= {lowest}")
        for name in ("stop_on_eos", "allow_images", "end_at_image"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"decoding options: {name} is {getattr(self, name)!r}; expected True or False")
        if self.backend not in BACKENDS:
            raise ValueError(f"decoding options: backend is {self.backend!r}; choose one of {list(BACKENDS)}")
        return self


BACKENDS = ("auto", "static", "hf")


@dataclass
class ImageSlot:
    position: int  # index of [IMG0] in the row's generated tokens
    hidden: torch.Tensor  # (n, d) last-layer states of [IMG0..n-1]


@dataclass
class DecodeResult:
    token_ids: list[int] = field(default_factory=list)  # generated tokens, [IMG] ids included
    images: list[ImageSlot] = field(default_factory=list)
    stop_reason: str = ""  # "eos", "stop_string", "image" (end_at_image) or "max_new_tokens"


@dataclass
class TokenEvent:
    row: int
    token_id: int


@dataclass
class ImageEvent:
    row: int
    slot: ImageSlot


@dataclass
class DoneEvent:
    row: int
    stop_reason: str


DecodeEvent = TokenEvent | ImageEvent | DoneEvent


class _Rows:
    """Per-row bookkeeping shared by the cached and the uncached loop."""

    def __init__(self, n_rows: int, model: GILLModel, options: DecodeOptions, eos_token_id: int | None,
                 decode_text: Callable[[list[int]], str] | None):
        if options.stop_strings and decode_text is None:
            raise ValueError("stop_strings need decode_text (e.g. a tokenizer's decode)")
        self.results = [DecodeResult() for _ in range(n_rows)]
        self.done = [False] * n_rows
        options = options.validated()
        if options.max_new_tokens is None:
            raise ValueError("decoding options: max_new_tokens is not set; give the most tokens an answer may take "
                             "(GILL sets it from the run settings)")
        self.model, self.options, self.eos, self.decode_text = model, options, eos_token_id, decode_text
        self.n_img = model.config.tokens.num_img_tokens
        self.img_ids = model.img_token_ids
        self.img_id_list = model.img_token_ids.tolist()
        self.img0 = self.img_id_list[0]
        self._no_img_key: tuple[bool, ...] | None = None
        self._no_img: torch.Tensor | None = None

    def select(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token of every row (N,), on the device, from the last-position logits (N, V)."""
        o = self.options
        logits = logits.float()
        if o.img_scale_factor is not None:
            logits = sampling.scale_img_logit(logits, self.img0, o.img_scale_factor)
        logits = sampling.mask_ids(logits, self.img_ids[1:])  # [IMG1..] are forced, never sampled
        no_img = tuple(not self.image_allowed(r) for r in range(len(self.results)))
        if any(no_img):
            if self._no_img_key != no_img:  # copied to the device only when it changes
                self._no_img_key, self._no_img = no_img, torch.tensor(no_img, device=logits.device)
            logits = sampling.mask_ids(logits, self.img_ids[:1], self._no_img)
        greedy, everything = o.temperature is None, o.top_p is None  # not set: not applied
        return sampling.sample(logits, 0.0 if greedy else o.temperature, 1.0 if everything else o.top_p, o.top_k,
                               generator)

    def image_allowed(self, row: int) -> bool:
        o, r = self.options, self.results[row]
        return (
            o.allow_images
            and len(r.token_ids) >= o.min_tokens_before_image
            and (o.max_images is None or len(r.images) < o.max_images)
            and len(r.token_ids) + self.n_img <= o.max_new_tokens
        )

    def push(self, row: int, token: int) -> list[int]:
        """Record a chosen token; returns the ids the row feeds next ([IMG0..n-1] for [IMG0])."""
        ids = self.img_id_list if token == self.img0 else [token]
        self.results[row].token_ids.extend(ids)
        return ids

    def stop_reason(self, row: int) -> str | None:
        o, r = self.options, self.results[row]
        if o.stop_on_eos and self.eos is not None and r.token_ids and r.token_ids[-1] == self.eos:
            return "eos"
        if o.end_at_image and r.token_ids and r.token_ids[-1] == self.img_id_list[-1]:
            return "image"
        if o.stop_strings:
            text = self.decode_text([t for t in r.token_ids[-32:] if t not in self.img_id_list])
            if any(s in text for s in o.stop_strings):
                return "stop_string"
        if len(r.token_ids) >= o.max_new_tokens:
            return "max_new_tokens"
        return None


class _HFCache:
    """Decoding through the LM's own forward and a Hugging Face dynamic cache (any causal LM)."""

    def __init__(self, model: GILLModel):
        self.model, self.past, self.mask = model, None, None

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.lm_forward(embeds, attention_mask, use_cache=True, logits_to_keep=1)
        self.past, self.mask = out.past_key_values, attention_mask
        return out.logits[:, -1]

    def feed(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.mask = torch.cat([self.mask, valid.to(self.mask.dtype)], dim=1)
        out = self.model.lm_forward(self.model.embed_tokens(ids), self.mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits, out.hidden


def _backend(model: GILLModel, options: DecodeOptions, batch: int, prompt_len: int, device: torch.device):
    """A context manager giving this call's cache (never shared with a concurrent call)."""
    from gill import opt_static

    if options.backend not in BACKENDS:
        raise ValueError(f"decoding options: backend is {options.backend!r}; choose one of {list(BACKENDS)}")
    use_static = options.backend == "static" or (options.backend == "auto" and opt_static.supports(model.lm))
    if not use_static:
        return contextlib.nullcontext(_HFCache(model))
    n = model.config.tokens.num_img_tokens
    # Cache columns are shared: one step takes as many columns as the widest row feeds.
    needed = prompt_len + options.max_new_tokens * (n if batch > 1 else 1) + n
    return opt_static.decoder_for(model, batch, needed)


@torch.no_grad()
def iter_decode(
    model: GILLModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    options: DecodeOptions | None = None,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    decode_text: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[DecodeEvent]:
    """Decode a left-padded batch of prompt embeddings (N, T, d) with a KV cache, yielding events as
    tokens, [IMG] groups and stops happen. ``attention_mask`` (N, T) marks the real prompt positions."""
    options = options or DecodeOptions()
    rows = _Rows(inputs_embeds.shape[0], model, options, eos_token_id, decode_text)
    yield from _decode_events(rows, model, inputs_embeds, attention_mask, pad_token_id, generator)


@torch.no_grad()
def _decode_events(rows: _Rows, model: GILLModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                   pad_token_id: int, generator: torch.Generator | None) -> Iterator[DecodeEvent]:
    options = rows.options
    n_rows, device = inputs_embeds.shape[0], inputs_embeds.device
    with _backend(model, options, n_rows, inputs_embeds.shape[1], device) as cache:
        yield from _decode_loop(rows, cache, inputs_embeds, attention_mask, pad_token_id, generator)


@torch.no_grad()
def _decode_loop(rows: _Rows, cache: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 pad_token_id: int, generator: torch.Generator | None) -> Iterator[DecodeEvent]:
    n_rows, device = inputs_embeds.shape[0], inputs_embeds.device
    n = rows.n_img
    next_logits = cache.prefill(inputs_embeds, attention_mask)

    pad = torch.full((n_rows,), pad_token_id, dtype=torch.long, device=device)
    active = torch.ones(n_rows, dtype=torch.bool, device=device)  # rows still decoding, on the device
    while not all(rows.done):
        # 1. Pick every row's token and feed it at once: the host reads it while the GPU runs the step.
        tokens = torch.where(active, rows.select(next_logits, generator), pad)
        logits, hidden = cache.feed(tokens[:, None], active[:, None])
        next_logits = logits[:, -1]
        chosen = tokens.tolist()
        # 2. Rows that chose [IMG0] feed [IMG1..n-1] as one chunk; their states come from both forwards.
        img_rows = [r for r in range(n_rows) if not rows.done[r] and chosen[r] == rows.img0]
        if img_rows:
            is_img = torch.zeros(n_rows, dtype=torch.bool)
            is_img[img_rows] = True
            is_img = is_img.to(device)
            chunk = torch.where(is_img[:, None], rows.img_ids[1:], pad[:, None])
            img0_hidden = hidden[:, -1:].clone()
            chunk_logits, chunk_hidden = cache.feed(chunk, is_img[:, None].expand_as(chunk))
            next_logits = torch.where(is_img[:, None], chunk_logits[:, -1], next_logits)
            img_hidden = torch.cat([img0_hidden, chunk_hidden], dim=1)
        # 3. Bookkeeping and events.
        stopped = False
        for r in range(n_rows):
            if rows.done[r]:
                continue
            result = rows.results[r]
            rows.push(r, chosen[r])
            if chosen[r] == rows.img0:
                slot = ImageSlot(position=len(result.token_ids) - n, hidden=img_hidden[r])
                result.images.append(slot)
                yield ImageEvent(r, slot)
            else:
                yield TokenEvent(r, chosen[r])
            reason = rows.stop_reason(r)
            if reason is not None:
                rows.done[r] = stopped = True
                result.stop_reason = reason
                yield DoneEvent(r, reason)
        if stopped:
            active = torch.tensor([not d for d in rows.done], device=device)


def decode(model: GILLModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
           options: DecodeOptions | None = None, *, eos_token_id: int | None = None, pad_token_id: int = 0,
           decode_text: Callable[[list[int]], str] | None = None,
           generator: torch.Generator | None = None) -> list[DecodeResult]:
    """``iter_decode`` run to the end: one DecodeResult per row."""
    rows = _Rows(inputs_embeds.shape[0], model, options or DecodeOptions(), eos_token_id, decode_text)
    for _ in _decode_events(rows, model, inputs_embeds, attention_mask, pad_token_id, generator):
        pass
    return rows.results


@torch.no_grad()
def decode_uncached(
    model: GILLModel,
    inputs_embeds: torch.Tensor,
    options: DecodeOptions | None = None,
    *,
    eos_token_id: int | None = None,
    decode_text: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """The original's loop for one prompt (1, T, d): every step a full forward over the prompt and all
    tokens so far, without a cache. [IMG] states come from one final full forward."""
    options = options or DecodeOptions()
    rows = _Rows(1, model, options, eos_token_id, decode_text)
    result = rows.results[0]

    def forward() -> torch.Tensor:
        ids = torch.tensor([result.token_ids], dtype=torch.long, device=inputs_embeds.device)
        embeds = torch.cat([inputs_embeds, model.embed_tokens(ids)], dim=1)
        return model.lm_forward(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))

    out = model.lm_forward(inputs_embeds, torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device))
    while True:
        token = int(rows.select(out.logits[:, -1], generator)[0])
        rows.push(0, token)
        reason = rows.stop_reason(0)
        if reason is not None:
            result.stop_reason = reason
            break
        out = forward()
    out = forward()
    prompt_len = inputs_embeds.shape[1]
    for pos, t in enumerate(result.token_ids):
        if t == rows.img0:
            hidden = out.hidden[0, prompt_len + pos : prompt_len + pos + rows.n_img]
            result.images.append(ImageSlot(position=pos, hidden=hidden.clone()))
    return result
