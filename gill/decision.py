"""The decision at an image slot: retrieve, generate, or edit.

The released head is ``Dropout(0.5) -> Linear(4096, 2)`` over the [IMG0] token's last hidden state, with
outputs ``(gen, ret)``; the paper-time head also read the max retrieval score (``Linear(4097, 2)``). A head
trained with a third label (``training.train_decision`` on annotations that carry "edit") is
``Linear(features, 3)`` with outputs ``(gen, ret, edit)``: edit redraws the conversation's last picture (or the
best retrieved one) under the slot's conditioning (``gill.diffusion.DiffusionGenerator.edit``). The labels are
the model config's ``decision.labels``; a head of two never edits unless the caller forces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gill.config import DECISION_LABELS, GILLConfig


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


POLICIES = ("auto", "generate", "retrieve", "edit", "both")
LABELS = DECISION_LABELS[-1]  # ("gen", "ret", "edit"): a head's outputs, its first two or all three
BRANCH = {"generate": "gen", "retrieve": "ret", "edit": "edit"}  # a forced policy's branch


@dataclass
class Decision:
    """What happens at one image slot: the policy asked for, the branch chosen, and the classifier's
    probabilities (None where no classifier ran, and ``p_edit`` where its head has no "edit" output)."""

    policy: str
    choice: str  # "gen", "ret" or "edit"
    p_gen: float | None = None
    p_ret: float | None = None
    p_edit: float | None = None

    @property
    def run_generation(self) -> bool:
        return self.policy == "both" or self.choice == "gen"

    @property
    def run_retrieval(self) -> bool:
        return self.policy == "both" or self.choice == "ret"

    @property
    def run_edit(self) -> bool:
        return self.choice == "edit"

    @property
    def probabilities(self) -> dict[str, float]:
        """The head's probabilities by label, those it has only ({} where no classifier ran)."""
        return {label: p for label, p in zip(LABELS, (self.p_gen, self.p_ret, self.p_edit)) if p is not None}


def decision_probs(head: DecisionHead, features: torch.Tensor) -> torch.Tensor:
    """(G, F) features -> (G, L) probabilities, in the order of ``LABELS`` (gen, ret[, edit])."""
    with torch.no_grad():
        return head(features).float().softmax(-1)


def decide(policy: str, probs: torch.Tensor | None, n_slots: int, can_generate: bool, can_retrieve: bool,
           can_edit: bool = False) -> list[Decision]:
    """One Decision per image slot.

    ``auto`` follows the classifier: the most probable of the branches that can run (gen on a tie, as the
    original's ``p_ret > p_gen``); "edit" only where the head has that output and ``can_edit`` (a diffusion
    pipeline and a picture to start from). Without a classifier, or when only one branch is available, it
    takes the available branch (gen first). ``generate``/``retrieve``/``edit`` force a branch and ``both``
    runs generation and retrieval; a forced branch that is not available is an error.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    if not (can_generate or can_retrieve):
        raise ValueError("neither a diffusion pipeline nor a retrieval index is loaded: no image can be produced")
    if policy in ("generate", "both", "edit") and not can_generate:
        raise ValueError(f"policy {policy!r} needs a diffusion pipeline, and none is loaded")
    if policy in ("retrieve", "both") and not can_retrieve:
        raise ValueError(f"policy {policy!r} needs a retrieval index, and none is loaded")
    if policy == "edit" and not can_edit:
        raise ValueError("policy 'edit' needs a picture to start from, and there is none")
    if probs is not None and probs.shape[-1] not in (2, 3):
        raise ValueError(f"a decision head has 2 or 3 outputs {LABELS}; this one has {probs.shape[-1]}")
    rows = probs.tolist() if probs is not None else [[]] * n_slots
    available = {"gen": can_generate, "ret": can_retrieve, "edit": can_edit}
    out = []
    for row in rows:
        p = dict(zip(LABELS, row))
        if policy in BRANCH:
            choice = BRANCH[policy]
        elif policy == "both":
            choice = "gen" if not p or p["gen"] >= p["ret"] else "ret"
        else:
            candidates = [label for label in LABELS if available[label] and (label in p or not p and label != "edit")]
            choice = max(candidates, key=lambda label: p.get(label, 0.0))  # the first of equals: gen on a tie
        out.append(Decision(policy, choice, p.get("gen"), p.get("ret"), p.get("edit")))
    return out
