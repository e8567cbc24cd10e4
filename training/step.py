"""One GILL training step: the three tasks with the original's losses, one vision pass and one shared LM
forward for retrieval and generation.

Differences from the original, all deliberate: CLIP runs once per batch (the original ran it 3 times),
retrieval and generation share one LM forward (their inputs are identical; the original ran two), and
the [IMG]-token labels keep the second caption of a concatenated pair (the original masked it by its
"from the first [IMG1] on" rule). With one shared forward, the concat-captions draw is made once for
retrieval+generation instead of once each.

Interleaved samples (an extension; the original trained on single pairs): a sample may carry a context of
(text, image) pairs before its caption, a VIST story or an MMC4/OBELICS-style document. Its retrieval and
generation sequence is then ``text_1 [image_1] ... text_m [image_m] caption [IMG0..n-1]``, laid out as
``GILL.build_prompts`` lays out a conversation at inference (BOS only before the first text; each image
as its visual prefix), and the [IMG] losses read the last image. The text after a context image is a
target too, so the visual prefix learns to carry meaning in the middle of text, not only before a
caption. Interleaved sequences are never concatenated in pairs; the captioning task reads the last
(image, caption) pair alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from gill import losses
from gill.losses import IGNORE_INDEX, LossWeights
from gill.model import GILLModel


@dataclass
class TextBatch:
    captions: list[list[int]]  # BOS + caption ids, truncated to leave room for the [IMG] tokens
    # per sample, the token ids (no BOS) of each context text, each followed by one context image; [] for
    # a plain (image, caption) sample. None: no sample of the batch has a context.
    context: list[list[list[int]]] | None = None
    bos: int | None = None  # the BOS id that starts an interleaved sequence

    @property
    def interleaved(self) -> bool:
        return self.context is not None and any(self.context)


def tokenize(tokenizer, captions: list[str], max_len: int, n_img: int,
             contexts: list[list[str]] | None = None, n_visual: int = 0) -> TextBatch:
    """BOS + caption, truncated so that caption + [IMG0..n-1] fit in max_len (as the original, which
    overwrote the last n ids of a truncated caption with the [IMG] ids).

    ``contexts``: per sample, the texts of its context pairs (one per context image, in order). The
    oldest pairs are dropped until context (``n_visual`` positions per image) + caption + [IMG] fit in
    max_len; ``kept_context`` tells how many each sample kept, as the trailing pairs."""
    ids = tokenizer(captions, add_special_tokens=True)["input_ids"]
    captions_ids = [row[: max_len - n_img] for row in ids]
    if contexts is None or not any(contexts):
        return TextBatch(captions_ids)
    bos = tokenizer.bos_token_id
    context = []
    for row, texts in zip(captions_ids, contexts):
        parts = [tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
        budget = max_len - n_img - (len(row) - 1)  # the caption loses its BOS when a text comes before it
        while parts and sum(len(p) + n_visual for p in parts) + (bos is not None) > budget:
            parts = parts[1:]
        context.append(parts)
    return TextBatch(captions_ids, context, bos)


def batch_text(tokenizer, samples: list, cfg, model_config) -> tuple[TextBatch, torch.Tensor | None]:
    """The batch's text (with the contexts of interleaved samples) and the pixels of the context images
    it keeps (M, 3, H, W), or None when no sample has a context."""
    contexts = [[t for t, _ in s.context] for s in samples]
    text = tokenize(tokenizer, [s.caption for s in samples], cfg.max_len, model_config.tokens.num_img_tokens,
                    contexts=contexts if any(contexts) else None, n_visual=model_config.n_visual_tokens)
    if not text.interleaved:
        return text, None
    kept = [px for s, ids in zip(samples, text.context) for _, px in s.context[len(s.context) - len(ids):]]
    return text, torch.stack(kept) if kept else None


def autocast(cfg, device: torch.device):
    """bf16 autocast where the recipe's ``precision`` is bf16 (fp32 master weights); a no-op otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _pad(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    return pad_sequence(rows, batch_first=True, padding_value=value)


def caption_inputs(model: GILLModel, prefix: torch.Tensor, text: TextBatch, concat: bool):
    """Captioning sequences [visual tokens][BOS caption] (or, concatenated, [vis_a BOS cap_a][vis_b cap_b])
    right-padded: embeds (N', T, d), mask (N', T), labels (N', T)."""
    device = prefix.device
    k = prefix.shape[1]
    embeds, labels = [], []
    ids = [torch.tensor(c, device=device) for c in text.captions]
    table = model.embed_tokens(_pad(ids, 0))  # one lookup for the batch
    token_embeds = [table[i, : len(x)] for i, x in enumerate(ids)]
    dtype = token_embeds[0].dtype
    ignore = torch.full((k,), IGNORE_INDEX, device=device)
    step = 2 if concat else 1
    for i in range(0, len(ids) - step + 1, step):
        e = [prefix[i].to(dtype), token_embeds[i]]
        lab = [ignore, ids[i]]
        if concat:
            e += [prefix[i + 1].to(dtype), token_embeds[i + 1][1:]]  # the second caption without its BOS
            lab += [ignore, ids[i + 1][1:]]
        embeds.append(torch.cat(e))
        labels.append(torch.cat(lab))
    mask = _pad([torch.ones(len(x), dtype=torch.long, device=device) for x in labels], 0)
    return _pad(embeds, 0.0), mask, _pad(labels, IGNORE_INDEX)


def caption_token_weights(labels: torch.Tensor, text: TextBatch, concat: bool, weights: torch.Tensor,
                          n_visual: int) -> torch.Tensor:
    """Per-position weights (N', T) of ``caption_inputs``'s labels: each sample's weight over its own
    positions (a concatenated row: the first sample's prefix and caption, then the second's), 0 on padding."""
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    step = 2 if concat else 1
    for row, i in enumerate(range(0, len(text.captions) - step + 1, step)):
        first = n_visual + len(text.captions[i])
        out[row, :first] = weights[i]
        if concat:
            out[row, first:first + n_visual + len(text.captions[i + 1]) - 1] = weights[i + 1]
    return out


def img_token_inputs(model: GILLModel, text: TextBatch, concat: bool, device):
    """[BOS caption IMG0..n-1] (or two of them back to back, the second without BOS), right-padded:
    ids, mask, labels (text and [IMG0] are targets) and the rows and columns (G, n) of the [IMG] groups
    appended here, in order (a caption may hold [IMG] tokens of its own: a chat's earlier pictures)."""
    img = model.config.tokens.img_token_ids
    n = len(img)
    rows, starts = [], []
    step = 2 if concat else 1
    for i in range(0, len(text.captions) - step + 1, step):
        row = text.captions[i] + img
        starts.append((len(rows), len(row) - n))
        if concat:
            row = row + text.captions[i + 1][1:] + img
            starts.append((len(rows), len(row) - n))
        rows.append(torch.tensor(row, device=device))
    ids = _pad(rows, 0)
    mask = _pad([torch.ones(len(r), dtype=torch.long, device=device) for r in rows], 0)
    r = torch.tensor([a for a, _ in starts], device=device)[:, None].expand(-1, n)
    cols = torch.tensor([b for _, b in starts], device=device)[:, None] + torch.arange(n, device=device)
    return ids, mask, losses.img_token_labels(ids, mask, model.img_token_ids), (r, cols)


def interleaved_inputs(model: GILLModel, text: TextBatch, context_prefix: torch.Tensor | None, device):
    """The retrieval and generation sequences of a batch with contexts, right-padded: embeds (N, T, d),
    mask, labels (text after each image, the caption and [IMG0] are targets; visual positions and
    [IMG1..n-1] are not), and the rows and columns (N, n) of each sample's [IMG0..n-1].

    ``context_prefix``: the visual prefixes (M, k, d) of all context images of the batch in sample order,
    the trailing ``len(text.context[i])`` images of each sample's context (``tokenize`` keeps the newest
    pairs)."""
    img = model.config.tokens.img_token_ids
    n = len(img)
    k = model.config.n_visual_tokens
    embeds, labels, starts = [], [], []
    taken = 0
    for i, caption in enumerate(text.captions):
        parts, lab, seen_text = [], [], False
        context = text.context[i] if text.context is not None else []
        for ids in context:
            if ids:
                row = ([text.bos] if not seen_text and text.bos is not None else []) + ids
                seen_text = True
                row_t = torch.tensor(row, device=device)
                parts.append(model.embed_tokens(row_t[None])[0])
                lab.append(row_t)
            parts.append(context_prefix[taken].to(model.adapter.img_embeddings.dtype))
            lab.append(torch.full((k,), IGNORE_INDEX, device=device))
            taken += 1
        row = (caption if not seen_text else caption[1:] if caption and caption[0] == text.bos else caption) + img
        row_t = torch.tensor(row, device=device)
        e = model.embed_tokens(row_t[None])[0]
        parts.append(e)
        lab.append(row_t.masked_fill(torch.isin(row_t, model.img_token_ids[1:]), IGNORE_INDEX))
        starts.append(sum(len(p) for p in parts) - n)
        dtype = e.dtype
        embeds.append(torch.cat([p.to(dtype) for p in parts]))
        labels.append(torch.cat(lab))
    mask = _pad([torch.ones(len(x), dtype=torch.long, device=device) for x in labels], 0)
    cols = torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device)
    rows = torch.arange(len(starts), device=device)[:, None].expand(-1, n)
    return _pad(embeds, 0.0), mask, _pad(labels, IGNORE_INDEX), (rows, cols)


def img_token_forward(model: GILLModel, text: TextBatch, concat: bool, device,
                      context_prefix: torch.Tensor | None = None):
    """The shared retrieval + generation forward: (LM output, labels, [IMG] hidden states (B, n, d))."""
    if text.interleaved:
        embeds, mask, labels, (rows, cols) = interleaved_inputs(model, text, context_prefix, device)
    else:
        ids, mask, labels, (rows, cols) = img_token_inputs(model, text, concat, device)
        embeds = model.embed_tokens(ids)
    out = model.lm_forward(embeds, mask)
    return out, labels, out.hidden[rows, cols]


def img_states(model: GILLModel, text: TextBatch, context: torch.Tensor | None, device) -> torch.Tensor:
    """The [IMG] hidden states (B, n, d) of a batch as inference reads them (no caption concatenation), its
    context pictures (interleaved samples' ``context`` pixels) encoded as their visual prefixes: what the
    validation pass and the mapper's state cache read."""
    prefix = None
    if context is not None:
        prefix = model.encode_images(context.to(device, next(model.vision.parameters()).dtype)).prefix
    return img_token_forward(model, text, False, device, prefix)[2]


@dataclass
class StepLosses:
    total: torch.Tensor  # what is backpropagated (already scaled for data parallelism)
    caption: torch.Tensor
    img_token_ce: torch.Tensor
    contrastive: torch.Tensor
    mapper: torch.Tensor
    text_emb: torch.Tensor  # (B, ret) local, for recall logging
    image_emb: torch.Tensor


class TrainStep(nn.Module):
    """The model under training as one module, so DistributedDataParallel can wrap it.

    ``queue_size`` > 0 (an extension; the original used in-batch negatives only): the frozen vision
    features of the last ``queue_size`` training images are kept and, projected by the current image-side
    head, serve as extra negatives of the text -> image retrieval loss. The vision encoder is frozen, so
    these never go stale. A batch of 200 CC3M pairs rarely holds two images that differ in one detail; a
    queue of a few hundred does, which is what teaches the [IMG] states the detail. Queued images whose
    features have cosine >= ``duplicate_cos`` with a text's own image are not its negatives. The queue is
    not saved in checkpoints: a resumed run starts it empty."""

    def __init__(self, model: GILLModel, weights: LossWeights | None = None, queue_size: int = 0,
                 duplicate_cos: float = 0.98, mapper_input_noise: float = 0.0):
        super().__init__()
        self.model = model
        self.mapper_input_noise = mapper_input_noise
        self.weights = weights or LossWeights()
        self.queue_size = queue_size
        self.duplicate_cos = duplicate_cos
        self.register_buffer("queue", torch.empty(0, model.config.vision_hidden_size), persistent=False)

    def queued_negatives(self, pooled: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The queue's images through the image-side head (Q, ret) and which are duplicates of each of
        ``pooled``'s images (N, Q); then ``pooled`` joins the queue (newest first)."""
        if not self.queue_size:
            return None, None
        head = self.model.adapter.image_retrieval
        queued = self.queue
        extra = mask = None
        if len(queued):
            extra = head(queued.to(head.weight.dtype))
            mask = F.normalize(pooled.float(), dim=-1) @ F.normalize(queued.float(), dim=-1).T >= self.duplicate_cos
        self.queue = torch.cat([pooled.detach().float(), queued])[: self.queue_size]
        return extra, mask

    def generation_embeddings(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """The mapper's output, its input noised by ``mapper_input_noise`` (in training mode only)."""
        x = self.model.mapper_inputs(img_hidden)
        if self.model.training and self.mapper_input_noise:
            x = x + self.mapper_input_noise * x.detach().std() * torch.randn_like(x)
        return self.model.adapter.mapper(x)

    def caption_loss(self, prefix: torch.Tensor, text: TextBatch, concat: bool,
                     caption_weights: torch.Tensor | None) -> torch.Tensor:
        from training import distributed as D

        model = self.model
        embeds, mask, labels = caption_inputs(model, prefix, text, concat)
        weights = None
        if caption_weights is not None:  # per-sample (KEY.loss.json): a weight-0 sample's tokens are not targets
            weights = caption_token_weights(labels, text, concat, caption_weights, prefix.shape[1])
            labels = labels.masked_fill(weights == 0, IGNORE_INDEX)
        cap_logits = model.lm_forward(embeds, mask).logits
        return losses.caption_loss(cap_logits, labels, D.global_count(losses.num_targets(labels)) / D.world_size(), weights)

    def forward(self, pixels: torch.Tensor, text: TextBatch, sd_target: torch.Tensor, concat_caption: bool,
                concat_img: bool, context_pixels: torch.Tensor | None = None,
                mapper_weights: torch.Tensor | None = None, caption_weights: torch.Tensor | None = None) -> StepLosses:
        from training import distributed as D

        model = self.model
        world = D.world_size()
        b = len(pixels)
        both = pixels if context_pixels is None or not len(context_pixels) else torch.cat([pixels, context_pixels])
        encoded = model.encode_images(both)  # one vision pass for all three tasks and every context image
        image = type(encoded)(encoded.pooled[:b], encoded.prefix[:b], encoded.retrieval[:b])

        concat = concat_caption and not text.interleaved
        if any(p.requires_grad for p in model.adapter.visual_prefix.parameters()):
            caption = self.caption_loss(image.prefix, text, concat, caption_weights)
        else:  # only the visual prefix learns from captioning: with it frozen (--train-only) the LM pass is saved
            caption = image.prefix.new_zeros((), dtype=torch.float32)

        # (B, n, d): groups in image order, also when concatenated
        out, labels, img_hidden = img_token_forward(model, text, concat_img, pixels.device, encoded.prefix[b:])
        img_ce = losses.caption_loss(out.logits, labels, D.global_count(losses.num_targets(labels)) / world)

        text_emb = model.text_retrieval_embeddings(img_hidden)
        extra, extra_mask = self.queued_negatives(D.gather_keep_local(image.pooled))
        contrastive = losses.contrastive_loss(D.gather_keep_local(text_emb), D.gather_keep_local(image.retrieval),
                                              model.adapter.logit_scale, extra, extra_mask)
        mapper = losses.mapper_loss(self.generation_embeddings(img_hidden), sd_target, mapper_weights)
        # Every rank computes the contrastive loss over the global batch with gradients into its own rows
        # only; x world makes the averaged gradient equal the single-process one.
        total = losses.gill_losses(caption, img_ce, contrastive * world, mapper, self.weights).total
        return StepLosses(total, caption.detach(), img_ce.detach(), contrastive.detach(), mapper.detach(),
                          text_emb.detach(), image.retrieval.detach())


@torch.no_grad()
def renorm_img_embeddings(model: GILLModel, target_norm: float, target_out_norm: float | None = None) -> None:
    """The original's post-step rescaling of the [IMG] rows to the mean norm of the LM's other rows."""
    a = model.adapter
    a.img_embeddings.mul_(target_norm / a.img_embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    if hasattr(a, "img_output_embeddings") and target_out_norm is not None:
        a.img_output_embeddings.mul_(target_out_norm / a.img_output_embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def init_img_embeddings(model: GILLModel, tokenizer, text: str) -> None:
    """Set [IMG i]'s input row to the LM's input embedding of ``text``'s token i (TrainConfig.img_init)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = model.adapter.img_embeddings
    if not ids or len(ids) > rows.shape[0]:
        raise ValueError(f"--img-init {text!r} is {len(ids)} tokens; expected 1 to {rows.shape[0]} (one per [IMG] token)")
    rows[: len(ids)] = model.lm.get_input_embeddings().weight[ids].to(rows.dtype)


def adapter_parts(model: GILLModel, names: str, flag: str) -> list[str]:
    """The parts of GILL's adapter named in ``names`` (comma-separated top-level names, e.g. "mapper");
    raises naming ``flag`` and the parts there are for an unknown one."""
    a = model.adapter
    known = [n for n, _ in a.named_children()] + [n for n, _ in a.named_parameters(recurse=False)]
    parts = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in parts if n not in known]
    if unknown:
        raise ValueError(f"{flag}: no adapter part named {', '.join(unknown)}; the parts are {', '.join(sorted(known))}")
    return parts


@torch.no_grad()
def reinit_parts(model: GILLModel, parts: list[str]) -> None:
    """Start these adapter parts afresh, as a new model's (drawn from torch's global generator)."""
    from gill.model import GILLAdapter

    if not parts:  # (nothing drawn: a run without --reinit takes the same random numbers as before)
        return
    fresh = GILLAdapter(model.config).state_dict()
    model.adapter.load_state_dict({k: v for k, v in fresh.items() if k.split(".")[0] in parts}, strict=False)


def train_only(model: GILLModel, parts: list[str]) -> None:
    """Freeze every adapter parameter outside ``parts``."""
    for name, p in model.adapter.named_parameters():
        p.requires_grad_(name.split(".")[0] in parts)


def mean_row_norm(weight: torch.Tensor) -> float:
    return weight.detach().float().norm(dim=-1).mean().item()
