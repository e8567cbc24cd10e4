"""The retrieve-vs-generate classifier.

The released head is ``Dropout(0.5) -> Linear(4096, 2)`` over the [IMG0] token's last hidden state, with
outputs ``(gen, ret)``; the paper-time head also read the max retrieval score (``Linear(4097, 2)``).
"""

from __future__ import annotations

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
