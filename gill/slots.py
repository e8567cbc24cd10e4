"""Part of ``GILL``: the image slots of an answer (the decision at each slot, then only the branches it
needs: retrieval from the index, generation with Stable Diffusion, an edit of a picture by image-to-image),
and the forced image slot of the evaluations (``image_slot_embeddings``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from gill.decision import Decision, DecisionHead, decide, decision_probs
from gill.diffusion import DiffusionGenerator, DiffusionOptions
from gill.generate import ImageSlot
from gill.prompts import Prompt, PromptTooLongError
from gill.retrieval import EmbeddingIndex
from gill.segments import (EditedImage, EditSource, GeneratedImage, InputItem, NoEditSourceError, RetrievedImage,
                           Segment)


@dataclass
class SlotEmbeddings:
    generation: torch.Tensor  # (N, gen_seq_len, gen_emb_dim) diffusion conditioning
    retrieval: torch.Tensor  # (N, ret_emb_dim) text-side retrieval embedding, not normalised
    hidden: torch.Tensor  # (N, n, d) the [IMG] tokens' last-layer states


@dataclass
class _Slots:
    """Each slot's decision, the segments it has so far (a retrieved image), and the picture an edit starts from."""

    decisions: list[Decision]
    out: list[list[Segment]]
    edit_from: list[EditSource | None]


class ImageSlots:
    """``GILL``'s image slots (a part of the class: ``GILL`` sets these attributes; ``Prompting`` builds the
    prompts)."""

    decision: DecisionHead | None
    retriever: EmbeddingIndex | None
    diffusion: DiffusionGenerator | None

    def _images(
        self,
        slots: list[tuple[int, ImageSlot]],
        prompts: list[Prompt],
        policy: str,
        diffusion_options: DiffusionOptions,
        already_retrieved: list[set[str]],
        image_counts: list[int],
        sources: Sequence[EditSource | None] | None = None,
    ) -> list[list[Segment]]:
        """Image segments for each slot, in answer order: decision, then only the branches it needs, batched.

        A slot never retrieves an image of its conversation nor one an earlier slot retrieved (as the original
        down-weights shown images), so one call over all slots gives what slot-by-slot streaming gives. An edit
        starts from its conversation's ``sources`` entry (the picture before the answer), else from the best
        retrieved image; generated and edited images alike are seeded with seed + their index in the answer's
        conversation."""
        if not slots:
            return []
        sources = list(sources) if sources is not None else [None] * len(prompts)
        hidden = torch.stack([s.hidden for _, s in slots])  # (G, n, d)
        # the slots of its row before each slot (each retrieves past what they may take; each image's seed)
        earlier, seen = [], [0] * len(prompts)
        for row, _ in slots:
            earlier.append(seen[row])
            seen[row] += 1
        done = self._decide_and_retrieve(hidden, slots, prompts, policy, already_retrieved, earlier, sources)
        decisions, out = done.decisions, done.out

        def seeds_of(rows: list[int]) -> list[int] | None:  # the k-th image of a conversation: seed + k
            if diffusion_options.seed is None:
                return None
            return [diffusion_options.seed + image_counts[slots[j][0]] + earlier[j] for j in rows]

        gen_rows = [j for j, d in enumerate(decisions) if d.run_generation]
        if gen_rows:
            with torch.no_grad():
                embeds = self.model.generation_embeddings(hidden[gen_rows])
            images = self.diffusion.generate(embeds, diffusion_options, seeds=seeds_of(gen_rows))
            for j, image in zip(gen_rows, images):
                segment = GeneratedImage(image, decisions[j])
                # the chosen branch comes first
                out[j].insert(0 if decisions[j].choice == "gen" else len(out[j]), segment)
        edit_rows = [j for j, d in enumerate(decisions) if d.run_edit]
        if edit_rows:
            with torch.no_grad():
                embeds = self.model.generation_embeddings(hidden[edit_rows])
            images = self.diffusion.edit(embeds, [done.edit_from[j].image for j in edit_rows], diffusion_options,
                                         seeds=seeds_of(edit_rows))
            for j, image in zip(edit_rows, images):
                out[j].append(EditedImage(image, done.edit_from[j], diffusion_options.edit_strength, decisions[j]))
        return out

    def _decide_and_retrieve(self, hidden: torch.Tensor, slots: list[tuple[int, ImageSlot]], prompts: list[Prompt],
                             policy: str, already_retrieved: list[set[str]], earlier: list[int],
                             sources: list[EditSource | None]) -> _Slots:
        """Each slot's decision, its retrieved image where the decision runs retrieval, and the picture an edit
        starts from: one search for every slot, deep enough to skip what the ``earlier`` slots of its row may
        take."""
        model = self.model
        with torch.no_grad():
            ret_emb = model.text_retrieval_embeddings(hidden)
        scale = model.adapter.logit_scale.exp().item()
        need_ret_score = self.decision is not None and model.config.decision.use_ret_score
        use_head = self.decision is not None and policy in ("auto", "both")
        if need_ret_score and use_head and self.retriever is None:
            raise ValueError("this decision head reads the max retrieval score; load a retrieval index")
        may_edit = self.diffusion is not None and (
            policy == "edit" or (policy == "auto" and use_head and self.decision.linear.out_features == 3))
        from_corpus = may_edit and any(sources[r] is None for r, _ in slots)  # an edit may start from the best hit
        candidates = None
        if self.retriever is not None and (policy in ("auto", "retrieve", "both") or need_ret_score or from_corpus):
            exclude = [prompts[r].exclude | already_retrieved[r] for r, _ in slots]
            candidates = self.retriever.search(ret_emb, k=1 + max(earlier), exclude=exclude, scale=scale)
        probs = None
        if use_head and not need_ret_score:
            probs = decision_probs(self.decision, model.decision_features(hidden))

        done = _Slots([], [[] for _ in slots], [])
        for j, (row, _) in enumerate(slots):
            taken = already_retrieved[row]
            hit = None
            if candidates is not None:
                hit = next((h for h in candidates[j] if not ({h.record.sha256, h.record.source} & taken)), None)
            p = probs[j : j + 1] if probs is not None else None
            if use_head and need_ret_score:
                score = torch.tensor([hit.score if hit is not None else 0.0], device=self.device)
                p = decision_probs(self.decision, model.decision_features(hidden[j : j + 1], score))
            decision, source = self._decide_slot(policy, p, sources[row], hit if may_edit else None)
            done.decisions.append(decision)
            done.edit_from.append(source)
            if decision.run_retrieval and hit is not None:
                rec = hit.record
                taken |= {k for k in (rec.sha256, rec.source) if k}
                done.out[j].append(RetrievedImage(self._corpus_image(rec), hit.score, rec.source, rec.caption,
                                                  rec.sha256, rec.license, decision))
        return done

    def _decide_slot(self, policy: str, probs: torch.Tensor | None, source: EditSource | None,
                     hit: Any) -> tuple[Decision, EditSource | None]:
        """One slot's decision, and the picture its edit starts from (None unless it edits): ``source`` (the
        conversation's), else the best retrieval ``hit``'s image. A forced edit with neither raises
        ``NoEditSourceError`` naming what is missing."""
        can_generate, can_retrieve = self.diffusion is not None, self.retriever is not None
        if policy == "edit" and can_generate and source is None and hit is None:
            raise NoEditSourceError(no_source_message(self.retriever))
        can_edit = source is not None or hit is not None
        decision = decide(policy, probs, 1, can_generate, can_retrieve, can_edit)[0]
        if not decision.run_edit:
            return decision, None
        if source is None:
            rec = hit.record
            image = self._corpus_image(rec)
            if image is None:  # the best match cannot be loaded: nothing to edit
                if policy == "edit":
                    raise NoEditSourceError(f"policy 'edit' has no picture to start from: the conversation has none "
                                            f"and the best retrieved image ({rec.source}) cannot be loaded")
                return decide(policy, probs, 1, can_generate, can_retrieve, False)[0], None
            return decision, EditSource(image, source=rec.source, caption=rec.caption, score=hit.score,
                                        sha256=rec.sha256, license=rec.license)
        # opened (a path), checked (size, aspect ratio) and in RGB, as every picture the model reads
        return decision, replace(source, image=self._load_image(source.image, f"the picture to edit ({source.place})"))

    def _corpus_image(self, record: Any) -> Any:
        """A corpus record's picture, or None where the index cannot load it."""
        try:
            return self.retriever.load_image(record)
        except (OSError, ValueError):
            return None

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


def no_source_message(retriever: Any) -> str:
    """The one line a forced edit with no picture to start from raises (``NoEditSourceError``)."""
    why = "no retrieval index is loaded" if retriever is None else "the retrieval index has no image left to give"
    return (f"policy 'edit' has no picture to start from: the conversation has none and {why}; attach a picture "
            "or give one to edit (edit_source)")
