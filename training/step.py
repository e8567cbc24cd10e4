"""One GILL training step: the three tasks with the original's losses, one vision pass and one shared LM
forward for retrieval and generation.

Differences from the original, all deliberate: CLIP runs once per batch (the original ran it 3 times),
retrieval and generation share one LM forward (their inputs are identical; the original ran two), and
the [IMG]-token labels keep the second caption of a concatenated pair (the original masked it by its
"from the first [IMG1] on" rule). With one shared forward, the concat-captions draw is made once for
retrieval+generation instead of once each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from gill import losses
from gill.losses import IGNORE_INDEX, LossWeights
from gill.model import GILLModel


@dataclass
class TextBatch:
    captions: list[list[int]]  # BOS + caption ids, truncated to leave room for the [IMG] tokens


def tokenize(tokenizer, captions: list[str], max_len: int, n_img: int) -> TextBatch:
    """BOS + caption, truncated so that caption + [IMG0..n-1] fit in max_len (as the original, which
    overwrote the last n ids of a truncated caption with the [IMG] ids)."""
    ids = tokenizer(captions, add_special_tokens=True)["input_ids"]
    return TextBatch([row[: max_len - n_img] for row in ids])


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


def img_token_inputs(model: GILLModel, text: TextBatch, concat: bool, device):
    """[BOS caption IMG0..n-1] (or two of them back to back, the second without BOS), right-padded:
    ids, mask, labels (text and [IMG0] are targets)."""
    img = model.config.tokens.img_token_ids
    rows = []
    step = 2 if concat else 1
    for i in range(0, len(text.captions) - step + 1, step):
        row = text.captions[i] + img
        if concat:
            row = row + text.captions[i + 1][1:] + img
        rows.append(torch.tensor(row, device=device))
    ids = _pad(rows, 0)
    mask = _pad([torch.ones(len(r), dtype=torch.long, device=device) for r in rows], 0)
    return ids, mask, losses.img_token_labels(ids, mask, model.img_token_ids)


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
    """The model under training as one module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: GILLModel, weights: LossWeights | None = None):
        super().__init__()
        self.model = model
        self.weights = weights or LossWeights()

    def forward(self, pixels: torch.Tensor, text: TextBatch, sd_target: torch.Tensor, concat_caption: bool,
                concat_img: bool) -> StepLosses:
        from training import distributed as D

        model = self.model
        world = D.world_size()
        image = model.encode_images(pixels)  # one vision pass for all three tasks

        embeds, mask, labels = caption_inputs(model, image.prefix, text, concat_caption)
        cap_logits = model.lm_forward(embeds, mask).logits
        caption = losses.caption_loss(cap_logits, labels, D.global_count(losses.num_targets(labels)) / world)

        ids, mask, labels = img_token_inputs(model, text, concat_img, pixels.device)
        out = model.lm_forward(model.embed_tokens(ids), mask)
        img_ce = losses.caption_loss(out.logits, labels, D.global_count(losses.num_targets(labels)) / world)
        rows, cols = model.img_token_positions(ids)
        img_hidden = out.hidden[rows, cols]  # (B, n, d): groups in image order, also when concatenated

        text_emb = model.text_retrieval_embeddings(img_hidden)
        contrastive = losses.contrastive_loss(D.gather_keep_local(text_emb), D.gather_keep_local(image.retrieval),
                                              model.adapter.logit_scale)
        mapper = losses.mapper_loss(model.generation_embeddings(img_hidden), sd_target)
        w = self.weights
        # Every rank computes the contrastive loss over the global batch with gradients into its own rows
        # only; x world makes the averaged gradient equal the single-process one.
        total = (w.caption * caption + (w.retrieval_ce + w.generation_ce) * img_ce
                 + w.contrastive * contrastive * world + w.mapper * mapper)
        return StepLosses(total, caption.detach(), img_ce.detach(), contrastive.detach(), mapper.detach(),
                          text_emb.detach(), image.retrieval.detach())


@torch.no_grad()
def renorm_img_embeddings(model: GILLModel, target_norm: float, target_out_norm: float | None = None) -> None:
    """The original's post-step rescaling of the [IMG] rows to the mean norm of the LM's other rows."""
    a = model.adapter
    a.img_embeddings.mul_(target_norm / a.img_embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    if hasattr(a, "img_output_embeddings") and target_out_norm is not None:
        a.img_output_embeddings.mul_(target_out_norm / a.img_output_embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def mean_row_norm(weight: torch.Tensor) -> float:
    return weight.detach().float().norm(dim=-1).mean().item()
