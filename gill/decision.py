"""The retrieve-vs-generate classifier.

The released head is ``Dropout(0.5) -> Linear(4096, 2)`` over the [IMG0] token's last hidden state, with
outputs ``(gen, ret)``; the paper-time head also read the max retrieval score (``Linear(4097, 2)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gill.config import GILLConfig


class DecisionHead(nn.Module):
    def __init__(self, in_features: int, num_labels: int = 2, dropout: float = 0.5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_labels)

    @classmethod
    def from_config(cls, config: GILLConfig) -> DecisionHead:
        return cls(config.decision_features, len(config.decision.labels), config.decision.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (N, in_features) -> (N, num_labels) logits
        return self.linear(self.dropout(features.to(self.linear.weight.dtype)))


POLICIES = ("auto", "generate", "retrieve", "both")


@dataclass
class Decision:
    """What happens at one image slot: the policy asked for, the branch chosen, and the classifier's
    probabilities (None where no classifier ran)."""

    policy: str
    choice: str  # "gen" or "ret"
    p_gen: float | None = None
    p_ret: float | None = None

    @property
    def run_generation(self) -> bool:
        return self.policy == "both" or self.choice == "gen"

    @property
    def run_retrieval(self) -> bool:
        return self.policy == "both" or self.choice == "ret"


def decision_probs(head: DecisionHead, features: torch.Tensor) -> torch.Tensor:
    """(G, F) features -> (G, 2) probabilities (gen, ret)."""
    with torch.no_grad():
        return head(features).float().softmax(-1)


def decide(policy: str, probs: torch.Tensor | None, n_slots: int, can_generate: bool, can_retrieve: bool) -> list[Decision]:
    """One Decision per image slot.

    ``auto`` follows the classifier (argmax, i.e. p_ret > 0.5, as the original); without a classifier, or
    when only one branch is available, it takes the available branch. ``generate``/``retrieve`` force a
    branch and ``both`` runs both; a forced branch that is not available is an error.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    if not (can_generate or can_retrieve):
        raise ValueError("neither a diffusion pipeline nor a retrieval index is loaded: no image can be produced")
    if policy in ("generate", "both") and not can_generate:
        raise ValueError(f"policy {policy!r} needs a diffusion pipeline, and none is loaded")
    if policy in ("retrieve", "both") and not can_retrieve:
        raise ValueError(f"policy {policy!r} needs a retrieval index, and none is loaded")
    p = probs.tolist() if probs is not None else [[None, None]] * n_slots
    out = []
    for p_gen, p_ret in p:
        if policy == "generate" or (policy == "both" and (p_ret is None or p_gen >= p_ret)):
            choice = "gen"
        elif policy in ("retrieve", "both"):
            choice = "ret"
        elif not can_retrieve:
            choice = "gen"
        elif not can_generate:
            choice = "ret"
        elif p_ret is None:
            choice = "gen"  # the original's default without a classifier
        else:
            choice = "ret" if p_ret > p_gen else "gen"
        out.append(Decision(policy, choice, p_gen, p_ret))
    return out
