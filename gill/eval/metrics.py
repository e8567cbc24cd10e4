"""Evaluation metrics: pure functions of tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of ``a`` with row i of ``b``: (N, D), (N, D) -> (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def recall_at_k(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                exclude: torch.Tensor | None = None) -> dict[int, float]:
    """Fraction of queries whose target ranks within the top k.

    ``scores`` (Q, G) query-gallery similarities; ``targets`` (Q,) gallery index of each query's answer;
    ``exclude`` (Q, G) bool marks gallery items removed for that query (never the target). Ties count
    against the query (the target must beat them strictly to rank above).
    """
    scores = scores.float().clone()
    if exclude is not None:
        if exclude[torch.arange(len(targets)), targets].any():
            raise ValueError("a query's target is excluded from its own gallery")
        scores[exclude] = float("-inf")
    target_scores = scores[torch.arange(len(targets)), targets]
    rank = (scores >= target_scores[:, None]).sum(-1) - 1  # others at least as good as the target
    return {k: (rank < k).float().mean().item() for k in ks}


FROMAGE_PUSH_DOWN = 10000.0  # FROMAGe's eval_vist_retrieval.py: a story's earlier images get ``scores -= 10000``


def topk_recall(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                pushed_down: torch.Tensor | None = None) -> dict[int, float]:
    """FROMAGe's Recall@k: ``pushed_down`` (Q, G) counts, per query, how many times 10000 is taken off each
    gallery item's score (its story's context images, the target too where the story repeats it); then
    ``torch.topk`` of each query's row alone (as the original ranked one story at a time) gives the first
    max(ks), ties in topk's order, and a query hits at k when its target is among the first k. Scores are
    ranked in float64 (the original's were bf16 on the GPU, where ties are more frequent)."""
    scores = scores.double()
    if pushed_down is not None:
        scores = scores - FROMAGE_PUSH_DOWN * pushed_down.double()
    n = min(max(ks), scores.shape[1])
    top = torch.stack([row.topk(n).indices for row in scores]) if len(scores) else torch.zeros(0, n, dtype=torch.long)
    hits = top == targets[:, None]
    return {k: hits[:, :k].any(-1).float().mean().item() for k in ks}


def mean_and_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal-approximation confidence interval."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if len(t) == 0:
        return float("nan"), float("nan")
    if len(t) == 1:
        return t.item(), float("nan")
    return t.mean().item(), (1.96 * t.std(unbiased=True) / len(t) ** 0.5).item()
