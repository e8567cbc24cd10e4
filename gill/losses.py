"""GILL's training losses and the label masks they read. Pure functions of tensors.

Weights and definitions follow the original (see the project's reference notes): captioning CE, the
[IMG0] CE of the retrieval and generation forwards (0.5 each), symmetric InfoNCE between the text-side and
image-side retrieval embeddings, and the mapper loss, a per-token Euclidean distance averaged over tokens
and batch (not an MSE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: torch.Tensor | float | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (N, T, V) predict labels (N, T) shifted by one; -100 is ignored.

    Mean over the predicted tokens of the whole batch (as Hugging Face's causal-LM loss), or, with
    ``num_tokens``, the sum divided by it (data-parallel training divides by the global count so that
    averaged gradients equal a single process's). ``weights`` (N, T), aligned with ``labels``: each
    target token's loss scaled before the sum (the count is unchanged; None: all 1).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    if weights is not None:
        ce = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
        total = (ce * weights[:, 1:].reshape(-1).float()).sum()
        return total / (num_tokens if num_tokens is not None else num_targets(labels).clamp_min(1))
    if num_tokens is None:
        return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / num_tokens


def num_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens ``caption_loss`` predicts in ``labels`` (N, T)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def retrieval_logits(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Scaled cosine similarities: (Nt, D), (Ni, D) -> (Nt, Ni) = exp(logit_scale) * cos."""
    text = F.normalize(text.float(), dim=-1)
    image = F.normalize(image.float(), dim=-1)
    return logit_scale.float().exp() * text @ image.T


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor,
                     extra_images: torch.Tensor | None = None, extra_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over matched pairs (row i of ``text`` goes with row i of ``image``).

    (CE(text -> image) + CE(image -> text)) / 2 with logits exp(logit_scale) * cosine.
    ``extra_images`` (Q, D): more negatives for text -> image only (e.g. earlier batches' images);
    ``extra_mask`` (N, Q), True where an extra image must not count as a negative for that text (a
    duplicate of its own image).
    """
    if text.shape[0] != image.shape[0]:
        raise ValueError(f"contrastive_loss needs matched pairs, got {text.shape[0]} texts and {image.shape[0]} images")
    logits = retrieval_logits(text, image, logit_scale)
    target = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits.T, target)
    if extra_images is not None and len(extra_images):
        extra = retrieval_logits(text, extra_images, logit_scale)
        if extra_mask is not None:
            extra = extra.masked_fill(extra_mask, float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    return (F.cross_entropy(logits, target) + image_to_text) / 2


def mapper_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token Euclidean distance over the last dim, averaged over tokens and batch: (N, L, D) -> ().

    ``weights`` (N,): each sample's distance scaled before the batch mean (the mean stays over N, so a
    sample of weight 1 counts as it does without weights); None: all 1, the original's loss."""
    if pred.shape != target.shape:
        raise ValueError(f"mapper_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    # vector_norm has a zero (not NaN) gradient where pred == target, unlike sqrt(sum(...)).
    dist = torch.linalg.vector_norm(pred.float() - target.float(), dim=-1)
    if weights is None:
        return dist.mean()
    if weights.shape != pred.shape[:1]:
        raise ValueError(f"mapper_loss: weights {tuple(weights.shape)} do not match the batch of {pred.shape[0]}")
    return (dist.mean(-1) * weights.to(dist)).mean()


@dataclass
class LossWeights:
    """The original's loss weights."""

    caption: float = 1.0
    retrieval_ce: float = 0.5
    contrastive: float = 1.0
    generation_ce: float = 0.5
    mapper: float = 1.0


@dataclass
class GILLLosses:
    caption: torch.Tensor
    img_token_ce: torch.Tensor  # CE of the [IMG]-token forward (shared by retrieval and generation)
    contrastive: torch.Tensor
    mapper: torch.Tensor
    total: torch.Tensor


def gill_losses(
    caption: torch.Tensor,
    img_token_ce: torch.Tensor,
    contrastive: torch.Tensor,
    mapper: torch.Tensor,
    weights: LossWeights | None = None,
) -> GILLLosses:
    """Weighted total. With one shared forward for retrieval and generation, their two CE terms are the
    same tensor, so it enters with weight retrieval_ce + generation_ce (the original's 0.5 + 0.5)."""
    w = weights or LossWeights()
    total = (
        w.caption * caption
        + (w.retrieval_ce + w.generation_ce) * img_token_ce
        + w.contrastive * contrastive
        + w.mapper * mapper
    )
    return GILLLosses(caption, img_token_ce, contrastive, mapper, total)


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, img_token_ids: torch.Tensor) -> torch.Tensor:
    """Captioning targets: the text tokens; padding and [IMG] tokens are ignored."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels.masked_fill(torch.isin(input_ids, img_token_ids), IGNORE_INDEX)


def img_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, img_token_ids: torch.Tensor) -> torch.Tensor:
    """Targets of the [IMG]-token forward: the text and [IMG0]; [IMG1..n] (forced at inference) and
    padding are ignored, as in the original."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels.masked_fill(torch.isin(input_ids, img_token_ids[1:]), IGNORE_INDEX)
