"""``GILL``: the model, its tokenizer and image processor, the decision head, a retrieval index and a
diffusion pipeline, behind one call, ``generate_interleaved(inputs)``.

Inputs are ordered lists of ``str`` (text), ``PIL.Image.Image`` and ``pathlib.Path`` (an image file). The
answer is an ordered list of segments: ``Text``, ``GeneratedImage`` and ``RetrievedImage``, each image
with the decision taken at its slot.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch

from gill.decision import Decision, DecisionHead, decide, decision_probs
from gill.diffusion import DiffusionGenerator, DiffusionOptions
from gill.generate import DecodeOptions, DoneEvent, ImageEvent, ImageSlot, TokenEvent, decode, iter_decode
from gill.model import GILLModel
from gill.retrieval import EmbeddingIndex, image_keys
from gill.run import Run, resolve_run
from gill.settings import RunSettings, context_limit, resolve_settings
from gill.tokens import ImageTokens


@dataclass
class Text:
    text: str


@dataclass
class TextDelta:
    """A piece of text as it is decoded (``GILL.stream(..., deltas=True)``)."""

    text: str


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    decision: Decision


@dataclass
class RetrievedImage:
    image: Any  # PIL.Image.Image, or None when the index could not load it
    score: float  # exp(logit_scale) * cosine
    source: str
    caption: str
    sha256: str
    license: str
    decision: Decision


Segment = Union[Text, GeneratedImage, RetrievedImage]
InputItem = Union[str, "os.PathLike[str]", Any]


def truncate_like_original(text: str) -> str:
    """The original's ``truncate_caption``: cut at the first newline, else at the first period."""
    if "\n" in text:
        return text[: text.index("\n")]
    if "." in text:
        return text[: text.index(".") + 1]
    return text


@dataclass
class SlotEmbeddings:
    generation: torch.Tensor  # (N, gen_seq_len, gen_emb_dim) diffusion conditioning
    retrieval: torch.Tensor  # (N, ret_emb_dim) text-side retrieval embedding, not normalised
    hidden: torch.Tensor  # (N, n, d) the [IMG] tokens' last-layer states


@dataclass
class _Prompt:
    embeds: torch.Tensor  # (T, d)
    exclude: set[str] = field(default_factory=set)  # keys of the conversation's images


class PromptTooLongError(ValueError):
    """A prompt that, with room for its answer, does not fit the model's context (``GILL.context_length``)."""


class GILL:
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
    ) -> GILL:
        """A preset name (``toy``, ``gill-opt-6.7b``, ``tiny-random``; see ``gill.presets``), a model
        directory, or a Hub repo id (``jykoh/gill``, the original release, is fetched and converted once).
        Backbones load from the ids or paths in its config; ``device`` and ``torch_dtype`` are the caller's
        choice (default: CPU, stored dtype). ``index``: an index directory (checked against this model's
        fingerprint), the original ``cc3m_embeddings_urls.npy``, or an index object; default: the model's
        own corpus, if it carries one. ``revision``, ``cache_dir``, ``local_files_only``, ``token``: as in
        transformers (``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured)."""
        from gill.loading import HubOptions, load

        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        parts = load(name_or_dir, torch_dtype=torch_dtype, index=index, load_diffusion=load_diffusion,
                     allow_index_mismatch=allow_index_mismatch, hub=hub)
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

    # ---- saving ----------------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | os.PathLike, *, copy_backbones: bool = False,
                        training_data: str | None = None) -> Path:
        """Write a model directory that ``GILL.from_pretrained`` loads back: config (with run settings),
        trained weights, decision head, model card (README.md). Backbones given as paths relative to the
        directory this model came from are written as absolute paths, or, with ``copy_backbones``, copied
        in (with the model's own corpus ``index/``) so the directory moves as one."""
        from gill.checkpoint import save_model_dir

        out = Path(out_dir)
        config = copy.deepcopy(self.model.config)
        config.run = self.settings
        if training_data is not None:
            config.training_data = training_data
        source = self.model_dir
        for name in ("lm", "vision", "tokenizer", "diffusion"):
            value = getattr(config, name)
            if not value or os.path.isabs(value) or source is None or not (source / value).exists():
                continue
            if copy_backbones and (source / value).resolve() != (out / value).resolve():
                if not (out / value).exists():
                    shutil.copytree(source / value, out / value)
            elif not copy_backbones:
                setattr(config, name, str((source / value).resolve()))
        if copy_backbones and source is not None and (source / "index" / "manifest.json").is_file():
            if (source / "index").resolve() != (out / "index").resolve() and not (out / "index").exists():
                shutil.copytree(source / "index", out / "index", ignore=shutil.ignore_patterns("work"))
        decision = self.decision.state_dict() if self.decision is not None else None
        return save_model_dir(out, config, self.model.adapter.state_dict(), decision)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                    commit_message: str = "Upload GILL model", api: Any = None) -> str:
        """Upload this model as a model directory (backbones that are local folders copied in) to a Hub
        repo of yours, created if needed. Returns the commit URL. ``api``: a ``huggingface_hub.HfApi``."""
        import tempfile

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="gill-push-") as tmp:
            self.save_pretrained(tmp, copy_backbones=True)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))

    @property
    def device(self) -> torch.device:
        return self.model.adapter.logit_scale.device

    # ---- 1. prompts ------------------------------------------------------------------------------

    def _load_image(self, item: Any, where: str) -> Any:
        """A PIL image or an image file, checked (size, aspect ratio) before any resize: ``ImageError``
        (a ValueError) names the item and the reason."""
        from PIL import Image

        from gill.images import check_image, open_image

        if isinstance(item, Image.Image):
            return check_image(item, name=where)
        return open_image(item, name=f"{where} ({item})")

    def build_prompts(self, conversations: Sequence[Sequence[InputItem]], *,
                      bos_every_text: bool = False) -> list[_Prompt]:
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
            prompts.append(_Prompt(torch.cat(parts, dim=0), exclude))
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

    def _fit(self, prompts: list[_Prompt], options: DecodeOptions, truncate: bool) -> None:
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

    def _batch(self, prompts: list[_Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad the prompts into (N, T, d) with an attention mask."""
        width = max(p.embeds.shape[0] for p in prompts)
        first = prompts[0].embeds
        embeds = first.new_zeros(len(prompts), width, first.shape[-1])
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=first.device)
        for r, p in enumerate(prompts):
            embeds[r, width - p.embeds.shape[0]:] = p.embeds
            mask[r, width - p.embeds.shape[0]:] = 1
        return embeds, mask

    # ---- 2. decoding -----------------------------------------------------------------------------

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

    def _check_answer_length(self, max_new_tokens: int) -> None:
        """Refuse, before anything runs, an answer that cannot fit the model's context whatever the prompt."""
        limit, n = self.context_length, len(self.img_tokens.ids)
        if limit is None or max_new_tokens <= limit - n:  # room left for a prompt of one position
            return
        raise ValueError(f"max_new_tokens is {max_new_tokens}, more than this model's context allows: "
                         f"it {self._reads(limit)} for prompt and answer together, and an [IMG] group takes {n}; "
                         f"give max_new_tokens <= {limit - n}")

    def _decode_args(self, prompts: list[_Prompt], run: Run) -> dict[str, Any]:
        embeds, mask = self._batch(prompts)
        generator = torch.Generator(device=self.device).manual_seed(run.settings.seed)
        return dict(
            model=self.model, inputs_embeds=embeds, attention_mask=mask, options=run.decode,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id or 0,
            decode_text=self.tokenizer.decode, generator=generator,
        )

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- 3. image slots --------------------------------------------------------------------------

    def _images(
        self,
        slots: list[tuple[int, ImageSlot]],
        prompts: list[_Prompt],
        policy: str,
        diffusion_options: DiffusionOptions,
        already_retrieved: list[set[str]],
        image_counts: list[int],
    ) -> list[list[Segment]]:
        """Image segments for each slot, in answer order: decision, then only the branches it needs, batched.

        A slot never retrieves an image of its conversation nor one an earlier slot retrieved (as the original
        down-weights shown images), so one call over all slots gives what slot-by-slot streaming gives."""
        if not slots:
            return []
        model = self.model
        hidden = torch.stack([s.hidden for _, s in slots])  # (G, n, d)
        with torch.no_grad():
            ret_emb = model.text_retrieval_embeddings(hidden)
        scale = model.adapter.logit_scale.exp().item()
        need_ret_score = self.decision is not None and model.config.decision.use_ret_score
        use_head = self.decision is not None and policy in ("auto", "both")
        if need_ret_score and use_head and self.retriever is None:
            raise ValueError("this decision head reads the max retrieval score; load a retrieval index")

        # one search for every slot, deep enough to skip what earlier slots of its row may take
        earlier, seen = [], [0] * len(prompts)
        for row, _ in slots:
            earlier.append(seen[row])
            seen[row] += 1
        candidates = None
        if self.retriever is not None and (policy != "generate" or need_ret_score):
            exclude = [prompts[r].exclude | already_retrieved[r] for r, _ in slots]
            candidates = self.retriever.search(ret_emb, k=1 + max(earlier), exclude=exclude, scale=scale)
        probs = None
        if use_head and not need_ret_score:
            probs = decision_probs(self.decision, model.decision_features(hidden))

        out: list[list[Segment]] = [[] for _ in slots]
        decisions: list[Decision] = []
        for j, (row, _) in enumerate(slots):
            taken = already_retrieved[row]
            hit = None
            if candidates is not None:
                hit = next((h for h in candidates[j] if not ({h.record.sha256, h.record.source} & taken)), None)
            p = probs[j : j + 1] if probs is not None else None
            if use_head and need_ret_score:
                score = torch.tensor([hit.score if hit is not None else 0.0], device=self.device)
                p = decision_probs(self.decision, model.decision_features(hidden[j : j + 1], score))
            decision = decide(policy, p, 1, self.diffusion is not None, self.retriever is not None)[0]
            decisions.append(decision)
            if decision.run_retrieval and hit is not None:
                try:
                    image = self.retriever.load_image(hit.record)
                except (OSError, ValueError):
                    image = None
                rec = hit.record
                taken |= {k for k in (rec.sha256, rec.source) if k}
                out[j].append(RetrievedImage(image, hit.score, rec.source, rec.caption, rec.sha256, rec.license, decision))

        gen_rows = [j for j, d in enumerate(decisions) if d.run_generation]
        if gen_rows:
            with torch.no_grad():
                embeds = model.generation_embeddings(hidden[gen_rows])
            seeds = None
            if diffusion_options.seed is not None:  # the k-th image of a conversation is seeded with seed + k
                seeds = [diffusion_options.seed + image_counts[slots[j][0]] + earlier[j] for j in gen_rows]
            images = self.diffusion.generate(embeds, diffusion_options, seeds=seeds)
            for j, image in zip(gen_rows, images):
                segment = GeneratedImage(image, decisions[j])
                # the chosen branch comes first
                out[j].insert(0 if decisions[j].choice == "gen" else len(out[j]), segment)
        return out

    # ---- forced image slots (evaluation) ---------------------------------------------------------

    @torch.no_grad()
    def image_slot_embeddings(self, conversations: Sequence[Sequence[InputItem]], *,
                              truncate: bool = False, bos_every_text: bool = False) -> SlotEmbeddings:
        """Append [IMG0..n-1] to each conversation and read the image slot in one forward: what the
        original's evaluations got from ``num_words=2, gen_scale_factor=1e5`` (an image forced at once),
        without decoding. Returns the diffusion conditioning and the text-side retrieval embedding.

        A conversation longer than the model's context (less the [IMG] tokens) raises
        ``PromptTooLongError``, or with ``truncate`` loses its oldest positions (see ``slot_overflow``).
        ``bos_every_text``: see ``build_prompts``."""
        prompts = self.build_prompts(conversations, bos_every_text=bos_every_text)
        limit, n = self.context_length, len(self.img_tokens.ids)
        for c, p in enumerate(prompts):
            if limit is None or p.embeds.shape[0] + n <= limit:
                continue
            if truncate and limit > n:
                p.embeds = p.embeds[p.embeds.shape[0] + n - limit:]
                continue
            raise PromptTooLongError(f"conversation {c} takes {p.embeds.shape[0]} positions and its [IMG] "
                                     f"tokens {n} more, but this model {self._reads(limit)}")
        ids = self.model.img_token_ids[None]
        img = self.model.embed_tokens(ids)[0]
        for p in prompts:
            p.embeds = torch.cat([p.embeds, img.to(p.embeds.dtype)])
        embeds, mask = self._batch(prompts)
        hidden = self.model.lm_forward(embeds, mask, logits_to_keep=1).hidden[:, -ids.shape[1]:]
        return SlotEmbeddings(self.model.generation_embeddings(hidden), self.model.text_retrieval_embeddings(hidden), hidden)

    # ---- 4. assembling the answer ----------------------------------------------------------------

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
        """
        batched, conversations = _conversations(inputs)
        _check_policy(policy)
        run = self._run(settings, options, diffusion, seed, decode_overrides)
        prompts = self.build_prompts(conversations)
        self._fit(prompts, run.decode, truncate)
        results = decode(**self._decode_args(prompts, run))
        slots = [(row, s) for row, r in enumerate(results) for s in r.images]
        images = self._images(slots, prompts, policy, run.diffusion, [set() for _ in prompts], [0] * len(prompts))
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
            answers.append(_finish(segments, original_truncation))
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
        **decode_overrides: Any,
    ) -> Iterator[Segment | TextDelta]:
        """Answer one conversation, yielding each segment as soon as it is complete: a text run when an
        image slot starts or decoding ends, an image when it has been retrieved or generated. With
        ``deltas=True`` text comes as ``TextDelta`` pieces while it is decoded (for chat UIs) instead."""
        batched, conversations = _conversations(inputs)
        if batched:
            raise TypeError("stream answers one conversation: give a list of texts and images, not a list of lists")
        _check_policy(policy)
        run = self._run(settings, options, diffusion, seed, decode_overrides)
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
                yield from self._images([(0, event.slot)], prompts, policy, run.diffusion, retrieved, count)[0]
                count[0] += 1
            elif isinstance(event, DoneEvent):
                text = self._text(pending)
                if text:
                    yield Text(text)


def _conversations(inputs: Any) -> tuple[bool, list[list[InputItem]]]:
    """(batched, conversations) of ``generate_interleaved``'s ``inputs``: one text, image or path is a
    conversation of one item; a list of items is one conversation; a list of lists is a batch."""
    from PIL import Image

    if isinstance(inputs, (str, Path, Image.Image)):
        return False, [[inputs]]
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs: expected a text, an image, a list of texts and images or a list of such lists, "
                        f"got {type(inputs).__name__}")
    if not inputs:
        raise ValueError("inputs: empty; give a list of texts and images (or a list of such lists)")
    nested = [isinstance(c, (list, tuple)) for c in inputs]
    if all(nested):
        return True, [list(c) for c in inputs]
    if any(nested):
        raise TypeError("inputs: a mix of conversations (lists) and items; give one list of texts and images, "
                        "or a list of such lists")
    return False, [list(inputs)]


def _check_policy(policy: Any) -> None:
    from gill.decision import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"policy is {policy!r}; choose one of {list(POLICIES)}")


def _finish(segments: list[Segment], original_truncation: bool) -> list[Segment]:
    if original_truncation:
        last_image = max((i for i, s in enumerate(segments) if not isinstance(s, Text)), default=None)
        if last_image is not None:
            segments = segments[: last_image + 1]
        segments = [Text(truncate_like_original(s.text)) if isinstance(s, Text) else s for s in segments]
    return [s for s in segments if not (isinstance(s, Text) and not s.text)]
