"""Part of ``GILL``: the image slots of an answer (the decision at each slot, then only the branches it
needs: retrieval from the index, generation with Stable Diffusion), and the forced image slot of the
evaluations (``image_slot_embeddings``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gill.decision import Decision, DecisionHead, decide, decision_probs
from gill.diffusion import DiffusionGenerator, DiffusionOptions
from gill.generate import ImageSlot
from gill.prompts import Prompt, PromptTooLongError
from gill.retrieval import EmbeddingIndex
from gill.segments import GeneratedImage, InputItem, RetrievedImage, Segment


@dataclass
class SlotEmbeddings:
    generation: torch.Tensor  # (N, gen_seq_len, gen_emb_dim) diffusion conditioning
    retrieval: torch.Tensor  # (N, ret_emb_dim) text-side retrieval embedding, not normalised
    hidden: torch.Tensor  # (N, n, d) the [IMG] tokens' last-layer states


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
    ) -> list[list[Segment]]:
        """Image segments for each slot, in answer order: decision, then only the branches it needs, batched.

        A slot never retrieves an image of its conversation nor one an earlier slot retrieved (as the original
        down-weights shown images), so one call over all slots gives what slot-by-slot streaming gives."""
        if not slots:
            return []
        hidden = torch.stack([s.hidden for _, s in slots])  # (G, n, d)
        # the slots of its row before each slot (each retrieves past what they may take; each image's seed)
        earlier, seen = [], [0] * len(prompts)
        for row, _ in slots:
            earlier.append(seen[row])
            seen[row] += 1
        decisions, out = self._decide_and_retrieve(hidden, slots, prompts, policy, already_retrieved, earlier)
        gen_rows = [j for j, d in enumerate(decisions) if d.run_generation]
        if gen_rows:
            seeds = None
            if diffusion_options.seed is not None:  # the k-th image of a conversation is seeded with seed + k
                seeds = [diffusion_options.seed + image_counts[slots[j][0]] + earlier[j] for j in gen_rows]
            with torch.no_grad():
                embeds = self.model.generation_embeddings(hidden[gen_rows])
            images = self.diffusion.generate(embeds, diffusion_options, seeds=seeds)
            for j, image in zip(gen_rows, images):
                segment = GeneratedImage(image, decisions[j])
                # the chosen branch comes first
                out[j].insert(0 if decisions[j].choice == "gen" else len(out[j]), segment)
        return out

    def _decide_and_retrieve(self, hidden: torch.Tensor, slots: list[tuple[int, ImageSlot]], prompts: list[Prompt],
                             policy: str, already_retrieved: list[set[str]],
                             earlier: list[int]) -> tuple[list[Decision], list[list[Segment]]]:
        """Each slot's decision, and its retrieved image where the decision runs retrieval: one search for every
        slot, deep enough to skip what the ``earlier`` slots of its row may take."""
        model = self.model
        with torch.no_grad():
            ret_emb = model.text_retrieval_embeddings(hidden)
        scale = model.adapter.logit_scale.exp().item()
        need_ret_score = self.decision is not None and model.config.decision.use_ret_score
        use_head = self.decision is not None and policy in ("auto", "both")
        if need_ret_score and use_head and self.retriever is None:
            raise ValueError("this decision head reads the max retrieval score; load a retrieval index")
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
        return decisions, out

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
