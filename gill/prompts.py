"""Part of ``GILL``: conversations into prompt embeddings, and the model's context (how many positions a
prompt and its answer may take, what happens to a prompt that does not fit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gill.generate import DecodeOptions
from gill.model import GILLModel
from gill.retrieval import image_keys
from gill.segments import InputItem
from gill.settings import RunSettings, context_limit
from gill.tokens import ImageTokens


@dataclass
class Prompt:
    """One conversation's prompt: its embeddings, and the keys of its images (an answer never retrieves them)."""

    embeds: torch.Tensor  # (T, d)
    exclude: set[str] = field(default_factory=set)  # keys of the conversation's images


class PromptTooLongError(ValueError):
    """A prompt that, with room for its answer, does not fit the model's context (``GILL.context_length``)."""


class Prompting:
    """``GILL``'s prompts and context (a part of the class: ``GILL`` sets these attributes)."""

    model: GILLModel
    tokenizer: Any
    image_processor: Any
    img_tokens: ImageTokens
    settings: RunSettings
    device: torch.device

    def _load_image(self, item: Any, where: str) -> Any:
        """A PIL image or an image file, checked (size, aspect ratio) before any resize: ``ImageError``
        (a ValueError) names the item and the reason."""
        from PIL import Image

        from gill.images import check_image, open_image

        if isinstance(item, Image.Image):
            return check_image(item, name=where)
        return open_image(item, name=f"{where} ({item})")

    def build_prompts(self, conversations: Sequence[Sequence[InputItem]], *,
                      bos_every_text: bool = False) -> list[Prompt]:
        """Embed each conversation: images -> k soft tokens each (one vision pass for all images of the
        batch), text -> token embeddings, BOS only before the first text segment (as the original), or
        before every one with ``bos_every_text`` (as FROMAGe's retrieval evaluation)."""
        from PIL import Image

        images, where = [], []
        for c, conv in enumerate(conversations):
            if not conv:
                raise ValueError(f"conversation {c} is empty: give at least one text or image")
            for i, item in enumerate(conv):
                if isinstance(item, (Path, Image.Image)):
                    images.append(self._load_image(item, f"conversation {c}, item {i}"))
                    where.append((c, i))
                elif not isinstance(item, str):
                    raise TypeError(
                        f"conversation {c}, item {i}: expected str (text), pathlib.Path or PIL.Image, got {type(item).__name__}"
                    )
        prefixes: dict[tuple[int, int], torch.Tensor] = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            vision_dtype = next(self.model.vision.parameters()).dtype
            prefix = self.model.encode_images(pixels.to(self.device, vision_dtype)).prefix
            prefixes = {w: prefix[j] for j, w in enumerate(where)}

        prompts = []
        embed_dtype = self.model.lm.get_input_embeddings().weight.dtype
        for c, conv in enumerate(conversations):
            parts, exclude, seen_text = [], set(), False
            for i, item in enumerate(conv):
                if (c, i) in prefixes:
                    parts.append(prefixes[(c, i)].to(embed_dtype))
                    exclude |= image_keys(item)
                    continue
                ids = self.tokenizer(item, add_special_tokens=bos_every_text or not seen_text)["input_ids"]
                seen_text = True
                if ids:
                    ids_t = torch.tensor([ids], device=self.device)
                    with torch.no_grad():
                        parts.append(self.model.embed_tokens(ids_t)[0])
            prompts.append(Prompt(torch.cat(parts, dim=0), exclude))
        return prompts

    @property
    def max_positions(self) -> int | None:
        """How many positions the LM reads (prompt and answer together), or None if it does not say."""
        return getattr(self.model.lm.config, "max_position_embeddings", None)

    @property
    def context_length(self) -> int | None:
        """The positions a run may use, prompt and answer together: the model's run setting ``context_length``
        (the positions it was trained on), else the LM's own; None if neither says. Every limit below is this."""
        return context_limit(self.settings, self.max_positions)

    def _reads(self, limit: int) -> str:
        """The limit as an error names it: "reads N positions", with where N comes from when it is not the LM's."""
        lm = self.max_positions
        if lm is None or lm == limit:
            return f"reads {limit} positions"
        return (f"reads {limit} positions (its run settings' context_length, the positions it was trained on; "
                f"its LM has {lm})")

    def prompt_length(self, conversation: Sequence[InputItem], *, bos_every_text: bool = False) -> int:
        """Positions a conversation takes in the prompt (text tokens, BOS included, and k per image),
        counted without running the vision encoder."""
        from PIL import Image

        length, seen_text = 0, False
        for item in conversation:
            if isinstance(item, (Path, Image.Image)):
                length += self.model.config.n_visual_tokens
            else:
                length += len(self.tokenizer(item, add_special_tokens=bos_every_text or not seen_text)["input_ids"])
                seen_text = True
        return length

    def slot_overflow(self, conversation: Sequence[InputItem], *, bos_every_text: bool = False) -> int:
        """Positions by which a conversation followed by the [IMG] tokens exceeds the model's context (0: it
        fits): what ``image_slot_embeddings(..., truncate=True)`` drops from its start."""
        limit = self.context_length
        if limit is None:
            return 0
        length = self.prompt_length(conversation, bos_every_text=bos_every_text)
        return max(0, length + len(self.img_tokens.ids) - limit)

    def answer_room(self, max_new_tokens: int) -> int:
        """Positions an answer of ``max_new_tokens`` may take: an [IMG] group can start at the last token."""
        return max_new_tokens + len(self.img_tokens.ids) - 1

    def _fit(self, prompts: list[Prompt], options: DecodeOptions, truncate: bool) -> None:
        """Check each prompt against the model's context; with ``truncate``, drop its oldest positions."""
        limit = self.context_length
        if limit is None:
            return
        room = self.answer_room(options.max_new_tokens)
        budget = limit - room
        for c, p in enumerate(prompts):
            length = p.embeds.shape[0]
            if length <= budget:
                continue
            if truncate and budget > 0:
                p.embeds = p.embeds[length - budget:]
                continue
            raise PromptTooLongError(
                f"conversation {c} takes {length} positions and its answer up to {room} more "
                f"(max_new_tokens={options.max_new_tokens}), but this model {self._reads(limit)}: shorten it by "
                f"{length - max(budget, 0)}, lower max_new_tokens, or pass truncate=True to drop the oldest part"
            )

    def _batch(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad the prompts into (N, T, d) with an attention mask."""
        width = max(p.embeds.shape[0] for p in prompts)
        first = prompts[0].embeds
        embeds = first.new_zeros(len(prompts), width, first.shape[-1])
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=first.device)
        for r, p in enumerate(prompts):
            embeds[r, width - p.embeds.shape[0]:] = p.embeds
            mask[r, width - p.embeds.shape[0]:] = 1
        return embeds, mask

    def _check_answer_length(self, max_new_tokens: int) -> None:
        """Refuse, before anything runs, an answer that cannot fit the model's context whatever the prompt."""
        limit, n = self.context_length, len(self.img_tokens.ids)
        if limit is None or max_new_tokens <= limit - n:  # room left for a prompt of one position
            return
        raise ValueError(f"max_new_tokens is {max_new_tokens}, more than this model's context allows: "
                         f"it {self._reads(limit)} for prompt and answer together, and an [IMG] group takes {n}; "
                         f"give max_new_tokens <= {limit - n}")
