"""``GILL``: the model, its tokenizer and image processor, the decision head, a retrieval index and a
diffusion pipeline, behind one call, ``generate_interleaved(inputs)`` (or ``stream``).

Inputs are ordered lists of ``str`` (text), ``PIL.Image.Image`` and ``pathlib.Path`` (an image file). The
answer is an ordered list of segments: ``Text``, ``GeneratedImage``, ``RetrievedImage`` and ``EditedImage``
(a picture redrawn from the conversation's last one), each image with the decision taken at its slot.

The class is written in parts, one module each: this one loads a model and answers (a call's run settings
resolved once, ``gill.run``; decoding, ``gill.generate``); ``gill.prompts`` builds prompts and keeps them in
the model's context; ``gill.slots`` decides, retrieves and generates at each image slot; ``gill.saving``
writes model directories; ``gill.segments`` holds what an answer is made of. Everything is imported from
here as before (``from gill.pipeline import GILL, Text, GeneratedImage, RetrievedImage, EditedImage, ...``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gill.decision import DecisionHead
from gill.diffusion import DiffusionGenerator, DiffusionOptions
from gill.generate import DecodeOptions, DoneEvent, ImageEvent, TokenEvent, decode, iter_decode
from gill.model import GILLModel
from gill.prompts import Prompt, Prompting, PromptTooLongError
from gill.retrieval import EmbeddingIndex
from gill.run import Run, resolve_run
from gill.saving import Saving
from gill.segments import (EditedImage, EditSource, GeneratedImage, InputItem, NoEditSourceError, RetrievedImage,
                           Segment, Text, TextDelta, as_conversations, check_policy, edit_sources, finish,
                           truncate_like_original)
from gill.settings import RunSettings, context_limit, resolve_settings
from gill.slots import ImageSlots, SlotEmbeddings, no_source_message
from gill.tokens import ImageTokens

__all__ = ["GILL", "Text", "TextDelta", "GeneratedImage", "RetrievedImage", "EditedImage", "EditSource", "Segment",
           "InputItem", "SlotEmbeddings", "PromptTooLongError", "NoEditSourceError", "truncate_like_original"]


class GILL(Prompting, ImageSlots, Saving):
    """GILL behind one call. Build with ``GILL.from_pretrained`` or from parts (tests inject tiny ones)."""

    def __init__(
        self,
        model: GILLModel,
        tokenizer: Any,
        image_processor: Any,
        img_tokens: ImageTokens,
        decision: DecisionHead | None = None,
        retriever: EmbeddingIndex | None = None,
        diffusion: DiffusionGenerator | Any | None = None,
        settings: RunSettings | None = None,
        model_dir: str | os.PathLike | None = None,
    ):
        """``settings``: the model's run settings (unset fields: the library's defaults; a ``context_length``
        above the LM's positions is refused); ``model_dir``: the directory it was loaded from, if any
        (``save_pretrained`` copies what it refers to)."""
        self.model = model.eval()
        self.settings = settings or RunSettings()
        context_limit(self.settings, self.max_positions)  # a context the LM cannot read is refused here
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.img_tokens = img_tokens
        self.decision = decision.eval() if decision is not None else None
        self.retriever = retriever
        if diffusion is not None and not isinstance(diffusion, DiffusionGenerator):
            diffusion = DiffusionGenerator(diffusion)
        self.diffusion = diffusion

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        index: Any = None,
        load_diffusion: bool = True,
        allow_index_mismatch: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        diffusion_dtype: torch.dtype | None = None,
    ) -> GILL:
        """A preset name (``toy``, ``gill-opt-6.7b``, ``tiny-random``; see ``gill.presets``), a model
        directory, or a Hub repo id (``jykoh/gill``, the original release, is fetched and converted once).
        Backbones load from the ids or paths in its config; ``device`` and ``torch_dtype`` are the caller's
        choice (default: CPU, stored dtype). ``index``: an index directory (checked against this model's
        fingerprint), the original ``cc3m_embeddings_urls.npy``, or an index object; default: the model's
        own corpus, if it carries one. ``revision``, ``cache_dir``, ``local_files_only``, ``token``: as in
        transformers (``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured). ``diffusion_dtype``: the diffusion
        pipeline's dtype where it differs from ``torch_dtype``."""
        from gill.loading import HubOptions, load

        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        parts = load(name_or_dir, torch_dtype=torch_dtype, index=index, load_diffusion=load_diffusion,
                     allow_index_mismatch=allow_index_mismatch, hub=hub, diffusion_dtype=diffusion_dtype)
        gill = cls(parts.model, parts.tokenizer, parts.image_processor, parts.img_tokens, parts.decision, parts.index,
                   parts.diffusion, settings=parts.settings, model_dir=parts.model_dir)
        if device is not None:
            gill.to(device)
        return gill

    def to(self, device: str | torch.device) -> GILL:
        """Move the model, the decision head and the diffusion pipeline to ``device``."""
        self.model.to(device)
        if self.decision is not None:
            self.decision.to(device)
        if self.diffusion is not None:
            self.diffusion.pipe.to(device)
        return self

    def run_settings(self, explicit: RunSettings | dict[str, Any] | None = None) -> RunSettings:
        """The settings a run uses: ``explicit`` > this model's settings > the library's defaults."""
        return resolve_settings(explicit, self.settings)

    @property
    def device(self) -> torch.device:
        return self.model.adapter.logit_scale.device

    # ---- a call's run settings, resolved once; decoding ----------------------------------------------

    def _run(self, settings: RunSettings | dict[str, Any] | None, options: DecodeOptions | None,
             diffusion: DiffusionOptions | None, seed: int | None, overrides: dict[str, Any]) -> Run:
        """A call's options resolved once (``gill.run.resolve_run``) against this model's settings, and
        checked against its context before anything runs."""
        run = resolve_run(self.settings, settings=settings, options=options, diffusion=diffusion, seed=seed,
                          overrides=overrides)
        if self.diffusion is None and self.retriever is None:
            run = replace(run, decode=replace(run.decode, allow_images=False))
        self._check_answer_length(run.decode.max_new_tokens)
        return run

    def _decode_args(self, prompts: list[Prompt], run: Run) -> dict[str, Any]:
        embeds, mask = self._batch(prompts)
        generator = torch.Generator(device=self.device).manual_seed(run.settings.seed)
        return dict(
            model=self.model, inputs_embeds=embeds, attention_mask=mask, options=run.decode,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id or 0,
            decode_text=self.tokenizer.decode, generator=generator,
        )

    def _edit_sources(self, conversations: list[list[InputItem]], given: Any, batched: bool,
                      policy: str) -> list[EditSource | None]:
        """Each conversation's picture an edit starts from (``gill.segments.edit_sources``); a forced edit that
        has none and no index to take one from is refused here, before anything runs."""
        sources = edit_sources(conversations, given, batched)
        if policy == "edit":
            if self.diffusion is None:
                raise ValueError("policy 'edit' needs a diffusion pipeline, and none is loaded")
            if self.retriever is None and any(s is None for s in sources):
                raise NoEditSourceError(no_source_message(None))
        return sources

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- answering ------------------------------------------------------------------------------------

    def generate_interleaved(
        self,
        inputs: Sequence[InputItem] | Sequence[Sequence[InputItem]],
        *,
        policy: str = "auto",
        settings: RunSettings | dict[str, Any] | None = None,
        options: DecodeOptions | None = None,
        diffusion: DiffusionOptions | None = None,
        seed: int | None = None,
        original_truncation: bool = False,
        truncate: bool = False,
        edit_source: Any = None,
        **decode_overrides: Any,
    ) -> list[Segment] | list[list[Segment]]:
        """Answer one conversation (a list of items) or several (a list of lists, decoded as one batch).

        A prompt that with its answer (``max_new_tokens`` plus an [IMG] group) exceeds the model's context
        (``context_length``: its run settings', else its LM's positions) raises ``PromptTooLongError`` naming
        the lengths; ``truncate=True`` drops its oldest positions instead.
        Run settings (decoding, diffusion steps, guidance, scheduler, seed) come as ``settings`` (a
        ``RunSettings`` or a dict of its fields: what the front ends pass), or as keyword arguments and
        ``options`` / ``diffusion`` fields of the same names, which win over ``settings``; those not given are
        the model's (``self.settings``), else the library's, resolved once (``gill.run.resolve_run``).
        ``decode_overrides`` set fields of ``DecodeOptions`` (max_new_tokens, temperature, top_p, top_k,
        stop_strings, img_scale_factor, min_tokens_before_image, ...). ``original_truncation`` reproduces
        the original's post-processing for evaluation parity: each text cut at its first newline or
        period, and text after the last image dropped.

        An edit (``policy="edit"``, or ``auto`` with a three-way decision head that chooses it) redraws a picture
        at the run's ``edit_strength``: ``edit_source`` (a ``PIL.Image``, an image path, or an ``EditSource``
        saying where it is, e.g. ``EditSource(image, place="shown in answer 3")``; a list of such, one per
        conversation, for a batch), else the conversation's last picture ("attached picture N"), else the best
        retrieved image. A chat, whose shown pictures go back as [IMG] tokens, passes its last shown picture.
        A forced edit with none of these raises ``NoEditSourceError`` before anything runs.
        """
        batched, conversations = as_conversations(inputs)
        check_policy(policy)
        run = self._run(settings, options, diffusion, seed, decode_overrides)
        sources = self._edit_sources(conversations, edit_source, batched, policy)
        prompts = self.build_prompts(conversations)
        self._fit(prompts, run.decode, truncate)
        results = decode(**self._decode_args(prompts, run))
        slots = [(row, s) for row, r in enumerate(results) for s in r.images]
        images = self._images(slots, prompts, policy, run.diffusion, [set() for _ in prompts], [0] * len(prompts),
                              sources)
        answers = []
        k = 0
        for r in results:
            segments: list[Segment] = []
            start = 0
            for s in r.images:
                segments.append(Text(self._text(r.token_ids[start:s.position])))
                segments.extend(images[k])
                k += 1
                start = s.position + len(self.img_tokens.ids)
            segments.append(Text(self._text(r.token_ids[start:])))
            answers.append(finish(segments, original_truncation))
        return answers if batched else answers[0]

    def stream(
        self,
        inputs: Sequence[InputItem],
        *,
        policy: str = "auto",
        settings: RunSettings | dict[str, Any] | None = None,
        options: DecodeOptions | None = None,
        diffusion: DiffusionOptions | None = None,
        seed: int | None = None,
        deltas: bool = False,
        truncate: bool = False,
        edit_source: Any = None,
        **decode_overrides: Any,
    ) -> Iterator[Segment | TextDelta]:
        """Answer one conversation, yielding each segment as soon as it is complete: a text run when an
        image slot starts or decoding ends, an image when it has been retrieved, generated or edited. With
        ``deltas=True`` text comes as ``TextDelta`` pieces while it is decoded (for chat UIs) instead.
        ``edit_source``: as in ``generate_interleaved``."""
        batched, conversations = as_conversations(inputs)
        if batched:
            raise TypeError("stream answers one conversation: give a list of texts and images, not a list of lists")
        check_policy(policy)
        run = self._run(settings, options, diffusion, seed, decode_overrides)
        sources = self._edit_sources(conversations, edit_source, False, policy)
        prompts = self.build_prompts(conversations)
        self._fit(prompts, run.decode, truncate)
        retrieved: list[set[str]] = [set()]
        pending: list[int] = []
        count = [0]
        shown = ""
        for event in iter_decode(**self._decode_args(prompts, run)):
            if isinstance(event, TokenEvent):
                pending.append(event.token_id)
                if deltas:
                    text = self._text(pending)
                    if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
                        yield TextDelta(text[len(shown):])
                        shown = text
                continue
            if deltas and pending:
                text = self._text(pending)
                if text.startswith(shown) and len(text) > len(shown):
                    yield TextDelta(text[len(shown):])
                pending, shown = [], ""
            if isinstance(event, ImageEvent):
                text = self._text(pending)
                pending = []
                if text:
                    yield Text(text)
                yield from self._images([(0, event.slot)], prompts, policy, run.diffusion, retrieved, count,
                                        sources)[0]
                count[0] += 1
            elif isinstance(event, DoneEvent):
                text = self._text(pending)
                if text:
                    yield Text(text)
