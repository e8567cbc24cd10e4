"""GILL's trained layers: the visual prefix, the GILLMapper, and the decision head's building block.

Modules take flat arguments; ``gill.model.GILLAdapter`` maps a config onto them.
"""

from __future__ import annotations

import torch
from torch import nn


class VisualPrefix(nn.Module):
    """Pooled image features -> ``num_tokens`` soft tokens for the LM (the captioning prefix).

    One Linear(in_dim -> num_tokens * out_dim) whose output is reshaped row-major, as the original.
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, num_tokens * out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # (N, in_dim) -> (N, num_tokens, out_dim)
        return self.proj(pooled).view(pooled.shape[0], self.num_tokens, self.out_dim)


class GILLMapper(nn.Module):
    """Maps the [IMG] tokens' LM states to a diffusion model's text conditioning.

    x = hidden + token embeddings (N, n, in_dim) -> Linear(in_dim -> d) -> transformer encoder over the n
    tokens; a decoder whose queries are ``num_queries`` learned vectors cross-attends to it -> Linear(d ->
    out_dim), giving (N, num_queries, out_dim). The transformer is the stock ``nn.Transformer`` with the
    original's settings: pre-LN, final encoder and decoder norms, ReLU, no masks.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int,
        hidden_dim: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        layer_kwargs = dict(
            d_model=hidden_dim, nhead=num_heads, dim_feedforward=ffn_dim, dropout=dropout,
            activation="relu", layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=True,
        )
        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer_kwargs), num_encoder_layers,
            norm=nn.LayerNorm(hidden_dim, eps=layer_norm_eps), enable_nested_tensor=False,
        )
        decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer_kwargs), num_decoder_layers,
            norm=nn.LayerNorm(hidden_dim, eps=layer_norm_eps),
        )
        self.transformer = nn.Transformer(
            d_model=hidden_dim, nhead=num_heads, custom_encoder=encoder, custom_decoder=decoder, batch_first=True
        )
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_dim))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, n, in_dim) -> (N, num_queries, out_dim)
        x = self.in_proj(x)
        queries = self.queries.expand(x.shape[0], -1, -1)
        return self.out_proj(self.transformer(x, queries))
