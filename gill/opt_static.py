"""A static-KV-cache decoder for OPT backbones (the original GILL's LM), with the one-token step captured
in a CUDA graph on GPUs.

Decoding a 6.7B model one token at a time through Hugging Face's eager forward is bound by Python and
kernel-launch overhead, not by the GPU. This module runs OPT's math directly on the backbone's own
modules and weights (pre-LN blocks, learned positions with OPT's offset of 2, ReLU MLP, final LayerNorm,
tied LM head) over preallocated key/value buffers, so one decode step has fixed shapes and can be
replayed as a CUDA graph. Outputs match the Hugging Face forward (tested on tiny OPT).

Cache columns are shared by the batch; a row that feeds padding marks its columns invalid, so rows
decode independently, as in ``gill.generate``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from gill.model import GILLModel


def supports(lm: Any) -> bool:
    """Whether ``lm`` is an OPT this decoder reproduces exactly (pre-LN, no projections, ReLU)."""
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", "") != "opt":
        return False
    dec = lm.get_decoder()
    return (
        cfg.do_layer_norm_before
        and dec.project_in is None
        and dec.project_out is None
        and dec.final_layer_norm is not None
        and cfg.activation_function == "relu"
        and getattr(cfg, "layerdrop", 0.0) == 0.0
    )


class StaticOPTDecoder:
    """Prefill, chunks and one-token steps over a static cache of ``max_len`` columns for ``batch`` rows."""

    def __init__(self, model: GILLModel, batch: int, max_len: int, use_cuda_graph: bool | None = None):
        if not supports(model.lm):
            raise ValueError("StaticOPTDecoder needs a pre-LN OPT without project_in/out (e.g. facebook/opt-6.7b)")
        self.model = model
        self.dec = model.lm.get_decoder()
        cfg = model.lm.config
        w = self.dec.embed_tokens.weight
        self.batch, self.max_len = batch, max_len
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        shape = (len(self.dec.layers), batch, self.heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=w.device)
        self.cur = torch.zeros(1, dtype=torch.long, device=w.device)  # next column to write
        self.used = 0  # the same count on the host, to check the bound
        self.use_cuda_graph = w.is_cuda if use_cuda_graph is None else use_cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._step_ids = torch.zeros(batch, 1, dtype=torch.long, device=w.device)
        self._step_valid = torch.zeros(batch, 1, dtype=torch.bool, device=w.device)
        self._step_out: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.key_valid.zero_()
        self.cur.zero_()
        self.used = 0

    # ---- the math ----------------------------------------------------------------------------------

    def _forward(self, embeds: torch.Tensor, valid: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds (B, W, d) for the next W columns; valid (B, W) marks real tokens. Returns logits
        (B, W or 1, vocab) with [IMG] spliced in, and last hidden states (B, W, d)."""
        b, width, _ = embeds.shape
        dec = self.dec
        device = embeds.device
        cols = self.cur + torch.arange(width, device=device)  # (W,)
        self.key_valid.index_copy_(1, cols, valid)
        positions = (self.key_valid.long().cumsum(-1).index_select(1, cols) - 1).clamp(min=0)  # (B, W)
        key_idx = torch.arange(self.max_len, device=device)
        allowed = self.key_valid[:, None, :] & (key_idx[None, None, :] <= cols[None, :, None])
        allowed = allowed | (key_idx[None, None, :] == cols[None, :, None])  # padding queries see themselves
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=device).masked_fill(~allowed, float("-inf"))
        mask = mask[:, None]  # (B, 1, W, max_len)

        x = embeds + dec.embed_positions.weight[positions + 2]  # OPT's learned positions are offset by 2
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q = (attn.q_proj(h) * attn.scaling).view(b, width, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, width, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, width, self.heads, self.head_dim).transpose(1, 2)
            self.k[i].index_copy_(2, cols, k)
            self.v[i].index_copy_(2, cols, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, scale=1.0)
            x = x + attn.out_proj(o.transpose(1, 2).reshape(b, width, -1))
            x = x + layer.fc2(F.relu(layer.fc1(layer.final_layer_norm(x))))
        hidden = dec.final_layer_norm(x)
        self.cur.add_(width)
        top = hidden[:, -1:] if last_only else hidden
        logits = self.model._splice_logits(self.model.lm.get_output_embeddings()(top), top)
        return logits, hidden

    def _advance(self, width: int) -> None:
        if self.used + width > self.max_len:
            raise RuntimeError(f"static cache of {self.max_len} columns is full")
        self.used += width

    # ---- the calls the decoding loop makes -----------------------------------------------------------

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A left-padded prompt (B, T, d) -> last-position logits (B, vocab)."""
        self.reset()
        self._advance(embeds.shape[1])
        logits, _ = self._forward(embeds, attention_mask.bool(), last_only=True)
        return logits[:, -1]

    def feed(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, W) -> logits (B, W, vocab), hidden (B, W, d). One-token steps replay a CUDA graph."""
        self._advance(ids.shape[1])
        if ids.shape[1] != 1 or not self.use_cuda_graph:
            return self._forward(self.model.embed_tokens(ids), valid.bool())
        self._step_ids.copy_(ids)
        self._step_valid.copy_(valid.bool())
        if self._graph is None:
            with _CAPTURE_LOCK:
                self._capture()
        self._graph.replay()
        return self._step_out

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(self.model.embed_tokens(self._step_ids), self._step_valid)

    def _capture(self) -> None:
        start = self.cur.clone()
        valid = self.key_valid.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (writes the next column, restored below)
                self._step()
                self.cur.copy_(start)
                self.key_valid.copy_(valid)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step_out = self._step()
        # capture records without running: the cache is as it was before the warm-up
        self.cur.copy_(start)
        self.key_valid.copy_(valid)


# Idle decoders per model, by shape; a call checks one out, so concurrent calls never share a cache.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POOL_LOCK = threading.Lock()
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time, whichever thread decodes
MAX_IDLE = 4  # idle decoders kept per model (their buffers can be large)


@contextlib.contextmanager
def decoder_for(model: GILLModel, batch: int, needed: int) -> Iterator[StaticOPTDecoder]:
    """A decoder with room for ``needed`` columns, for this call alone, reused across calls (so its CUDA
    graph is too). Calls running at the same time get different decoders."""
    max_len = -(-needed // 256) * 256
    key = (batch, max_len)
    with _POOL_LOCK:
        pool = _DECODERS.setdefault(model, {})
        for other in [k for k in pool if k != key]:
            del pool[other]  # keep one shape per model: a new shape usually means the old one is done
        idle = pool.setdefault(key, [])
        decoder = idle.pop() if idle else None
    if decoder is None:
        decoder = StaticOPTDecoder(model, batch, max_len)
    try:
        yield decoder
    finally:
        with _POOL_LOCK:
            idle = _DECODERS.setdefault(model, {}).setdefault(key, [])
            if len(idle) < MAX_IDLE:
                idle.append(decoder)
