"""GILLModel: a frozen causal LM and a frozen vision encoder, injected, joined by the trained GILLAdapter.

Only ``GILLAdapter`` holds trainable parameters. The [IMG] token embeddings are a small parameter of
their own, spliced into the LM's input embeddings and output logits; the LM's embedding matrix is never
resized or trained.

Shapes: N batch, T sequence, d LM width, n number of [IMG] tokens, k visual tokens per image.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gill import losses
from gill.config import GILLConfig
from gill.layers import GILLMapper, VisualPrefix


class GILLAdapter(nn.Module):
    """Every trained part of GILL; its state dict is what a model directory's ``gill.safetensors`` holds."""

    def __init__(self, config: GILLConfig):
        super().__init__()
        d, n = config.lm_hidden_size, config.tokens.num_img_tokens
        self.img_embeddings = nn.Parameter(torch.randn(n, d) * 0.02)  # input embeddings of [IMG0..n-1]
        if not config.tie_img_embeddings:
            self.img_output_embeddings = nn.Parameter(torch.randn(n, d) * 0.02)  # their lm_head rows
        self.visual_prefix = VisualPrefix(config.vision_hidden_size, d, config.n_visual_tokens)
        self.image_retrieval = nn.Linear(config.vision_hidden_size, config.ret_emb_dim)
        self.text_retrieval = nn.Linear(d, config.ret_emb_dim)
        m = config.mapper
        self.mapper = GILLMapper(
            d, config.gen_emb_dim, config.gen_seq_len, hidden_dim=m.hidden_dim, num_heads=m.num_heads,
            num_encoder_layers=m.num_encoder_layers, num_decoder_layers=m.num_decoder_layers,
            ffn_dim=m.ffn_dim, dropout=m.dropout, layer_norm_eps=m.layer_norm_eps,
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @property
    def img_output(self) -> torch.Tensor:
        return self.img_embeddings if not hasattr(self, "img_output_embeddings") else self.img_output_embeddings


@dataclass
class ImageEncoding:
    pooled: torch.Tensor  # (N, vision_hidden) vision encoder pooled output, pre-projection
    prefix: torch.Tensor  # (N, k, d) captioning soft tokens
    retrieval: torch.Tensor  # (N, ret_emb_dim) image-side retrieval embedding, not normalised


@dataclass
class LMOutput:
    logits: torch.Tensor  # (N, T', vocab_size) over the tokenizer's vocabulary, [IMG] columns spliced in
    hidden: torch.Tensor  # (N, T, d) last-layer hidden states (input of the LM head)
    past_key_values: Any = None


@dataclass
class CaptionOutput:
    logits: torch.Tensor  # (N, k + T, vocab_size)
    labels: torch.Tensor  # (N, k + T), -100 on the visual prefix and ignored tokens
    loss: torch.Tensor  # () next-token CE


@dataclass
class ImgTokenOutput:
    logits: torch.Tensor  # (N, T, vocab_size)
    labels: torch.Tensor  # (N, T)
    loss: torch.Tensor  # () next-token CE on the text and [IMG0]
    img_hidden: torch.Tensor  # (G, n, d) last-layer states of each [IMG0..n-1] group, G >= N groups in order


class GILLModel(nn.Module):
    """GILL around injected frozen backbones.

    ``lm``: a Hugging Face causal LM accepting ``inputs_embeds`` and returning ``hidden_states``.
    ``vision``: a vision encoder returning ``pooler_output`` (e.g. ``CLIPVisionModel``).
    Both are frozen here (no gradients, always in eval mode); only ``self.adapter`` trains.
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, config: GILLConfig):
        super().__init__()
        tokens = config.tokens
        if tokens.vocab_size is None or len(tokens.img_token_ids) != tokens.num_img_tokens:
            raise ValueError(
                "config.tokens has no [IMG] token ids or vocab_size; add the tokens to the tokenizer with "
                "gill.tokens.add_image_tokens and store the result with ImageTokens.to_config"
            )
        lm_width = lm.get_input_embeddings().embedding_dim
        if lm_width != config.lm_hidden_size:
            raise ValueError(f"config.lm_hidden_size is {config.lm_hidden_size} but the LM's embeddings are {lm_width}-d")
        vision_width = getattr(getattr(vision, "config", None), "hidden_size", None)
        if vision_width is not None and vision_width != config.vision_hidden_size:
            raise ValueError(
                f"config.vision_hidden_size is {config.vision_hidden_size} but the vision encoder is {vision_width}-d"
            )
        self.config = config
        self.lm = lm.requires_grad_(False).eval()
        self.vision = vision.requires_grad_(False).eval()
        self.adapter = GILLAdapter(config)

        ids = torch.tensor(tokens.img_token_ids, dtype=torch.long)
        if ids.max() >= tokens.vocab_size:
            raise ValueError(f"[IMG] ids {tokens.img_token_ids} exceed the tokenizer length {tokens.vocab_size}")
        slot = torch.full((tokens.vocab_size,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        self.register_buffer("img_token_ids", ids, persistent=False)
        self.register_buffer("img_slot", slot, persistent=False)  # token id -> [IMG] index, -1 elsewhere

    # ---- modes -----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> GILLModel:
        super().train(mode)
        self.lm.eval()
        self.vision.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]

    @property
    def vocab_size(self) -> int:
        return self.config.tokens.vocab_size

    # ---- building blocks -------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        """One pass of the frozen vision encoder, then both image-side heads."""
        with torch.no_grad():
            out = self.vision(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise TypeError(f"{type(self.vision).__name__} returned no pooler_output; GILL reads the pooled feature")
        a = self.adapter
        pooled_a = pooled.to(a.image_retrieval.weight.dtype)
        return ImageEncoding(pooled=pooled, prefix=a.visual_prefix(pooled_a), retrieval=a.image_retrieval(pooled_a))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, T) -> input embeddings (N, T, d): the LM's table, [IMG] rows from the adapter."""
        slot = self.img_slot[input_ids]
        is_img = slot >= 0
        base = self.lm.get_input_embeddings()(input_ids.masked_fill(is_img, 0))
        img = self.adapter.img_embeddings.to(base.dtype)[slot.clamp(min=0)]
        return torch.where(is_img.unsqueeze(-1), img, base)

    def lm_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Run the frozen LM on embeddings; logits cover the tokenizer's vocabulary with [IMG] spliced in.

        ``attention_mask`` covers the cached and the new positions (N, past + T); position ids follow it,
        so left padding works for any LM. ``logits_to_keep`` > 0 computes logits for the last positions only.
        """
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            positions = attention_mask.long().cumsum(-1) * attention_mask - 1
            kwargs["position_ids"] = positions[:, -inputs_embeds.shape[1]:]
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if past_key_values is not None:
            kwargs[self._cache_argument()] = past_key_values
        out = self.lm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache, output_hidden_states=True,
            return_dict=True, **kwargs,
        )
        hidden = out.hidden_states[-1]
        logits = self._splice_logits(out.logits, hidden[:, -out.logits.shape[1]:])
        cache = None
        if use_cache:  # transformers >= 5.x returns it as ``cache`` (``past_key_values`` deprecated), before as the latter
            cache = out["cache"] if "cache" in out else out.past_key_values
        return LMOutput(logits=logits, hidden=hidden, past_key_values=cache)

    def _cache_argument(self) -> str:
        """The LM's keyword for a KV cache: ``cache`` where its forward takes it (transformers 5.x, where
        ``past_key_values`` is deprecated), else ``past_key_values``."""
        name = getattr(self, "_cache_kw", None)
        if name is None:
            params = inspect.signature(self.lm.forward).parameters
            name = self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return name

    def _splice_logits(self, lm_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        vocab = self.vocab_size
        if lm_logits.shape[-1] >= vocab:
            logits = lm_logits[..., :vocab]
        else:  # ids past the LM's rows that are not [IMG] (e.g. the placeholder) can never be sampled
            pad = lm_logits.new_full((*lm_logits.shape[:-1], vocab - lm_logits.shape[-1]), float("-inf"))
            logits = torch.cat([lm_logits, pad], dim=-1)
        img_logits = hidden @ self.adapter.img_output.to(hidden.dtype).T  # (N, T, n)
        return logits.index_copy(-1, self.img_token_ids, img_logits.to(logits.dtype))

    def img_token_positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns (G, n) of every [IMG0..n-1] group, in order. Each [IMG0] must be followed by
        [IMG1..n-1]."""
        n = self.config.tokens.num_img_tokens
        rows, starts = (input_ids == self.img_token_ids[0]).nonzero(as_tuple=True)
        cols = starts.unsqueeze(1) + torch.arange(n, device=input_ids.device)
        if (cols >= input_ids.shape[1]).any() or not torch.equal(
            input_ids[rows.unsqueeze(1), cols.clamp(max=input_ids.shape[1] - 1)],
            self.img_token_ids.expand(len(rows), n),
        ):
            raise ValueError(f"every [IMG0] must be followed by [IMG1..{n - 1}] in order")
        return rows.unsqueeze(1).expand(-1, n), cols

    # ---- tasks -----------------------------------------------------------------------------------

    def caption(
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> CaptionOutput:
        """Captioning: [k visual tokens][caption] -> next-token CE on the caption.

        ``prefix`` is ``encode_images(...).prefix`` (N, k, d); labels default to the caption tokens.
        """
        if labels is None:
            labels = losses.caption_labels(input_ids, attention_mask, self.img_token_ids)
        text = self.embed_tokens(input_ids)
        embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
        k = prefix.shape[1]
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], k), attention_mask], dim=1)
        full_labels = torch.cat([labels.new_full((labels.shape[0], k), losses.IGNORE_INDEX), labels], dim=1)
        out = self.lm_forward(embeds, mask)
        return CaptionOutput(out.logits, full_labels, losses.caption_loss(out.logits, full_labels))

    def img_token_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> ImgTokenOutput:
        """Text ending in [IMG0..n-1] (one forward shared by retrieval and generation).

        Returns the CE on the text and [IMG0], and the [IMG] tokens' last-layer states for the heads.
        """
        if labels is None:
            labels = losses.img_token_labels(input_ids, attention_mask, self.img_token_ids)
        out = self.lm_forward(self.embed_tokens(input_ids), attention_mask)
        rows, cols = self.img_token_positions(input_ids)
        return ImgTokenOutput(out.logits, labels, losses.caption_loss(out.logits, labels), out.hidden[rows, cols])

    def text_retrieval_embeddings(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """[IMG] states (G, n, d) -> text-side retrieval embeddings (G, ret_emb_dim), from [IMG0] only."""
        head = self.adapter.text_retrieval
        return head(img_hidden[:, 0].to(head.weight.dtype))

    def generation_embeddings(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """[IMG] states (G, n, d) -> diffusion conditioning (G, gen_seq_len, gen_emb_dim).

        The mapper reads the states plus the [IMG] tokens' input embeddings, as the original.
        """
        return self.adapter.mapper(self.mapper_inputs(img_hidden))

    def mapper_inputs(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """What the mapper reads: the [IMG] states (G, n, d) plus the [IMG] tokens' input embeddings."""
        a = self.adapter
        return img_hidden.to(a.img_embeddings.dtype) + a.img_embeddings

    def decision_features(self, img_hidden: torch.Tensor, max_ret_score: torch.Tensor | None = None) -> torch.Tensor:
        """Input of the decision head: the [IMG0] state (G, d), with the max retrieval score appended
        (G, d + 1) for a head trained that way (``config.decision.use_ret_score``)."""
        features = img_hidden[:, 0]
        if self.config.decision.use_ret_score:
            if max_ret_score is None:
                raise ValueError("this decision head reads the max retrieval score; pass max_ret_score")
            features = torch.cat([features, max_ret_score.to(features.dtype).view(-1, 1)], dim=-1)
        return features
