"""Next-token selection: pure functions of logits. Batched, no host syncs, no Python loops over rows."""

from __future__ import annotations

import torch


def scale_img_logit(logits: torch.Tensor, img0_id: int, factor: float) -> torch.Tensor:
    """The original's image-frequency knob: logit[IMG0] <- |logit[IMG0]| * factor, for factor != 1.

    (The original applies it when its ret or gen scale factor exceeds 1; 1 leaves the logits as they are.)
    """
    if factor == 1.0:
        return logits
    logits = logits.clone()
    logits[..., img0_id] = logits[..., img0_id].abs() * factor
    return logits


def mask_ids(logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set the logits of ``ids`` to -inf (in all rows, or where the bool ``rows`` (N,) is True)."""
    if ids.numel() == 0:
        return logits
    logits = logits.clone()
    if rows is None:
        logits[..., ids] = float("-inf")
    else:
        cols = logits[..., ids]
        logits[..., ids] = torch.where(rows.view(-1, *([1] * (cols.dim() - 1))), float("-inf"), cols)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches p (the token that
    crosses p is kept). p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    remove_sorted = before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (N, V): greedy at temperature 0, else sample from
    softmax(logits / temperature) after top-k and top-p filtering."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
