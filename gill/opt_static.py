"""A static-KV-cache decoder for OPT backbones (the original GILL's LM), with the one-token step captured
in a CUDA graph on GPUs.

Decoding a 6.7B model one token at a time through Hugging Face's eager forward is bound by Python and
kernel-launch overhead, not by the GPU. This module runs OPT's math directly on the backbone's own
modules and weights (pre-LN blocks, learned positions with OPT's offset of 2, ReLU MLP, final LayerNorm,
tied LM head) over preallocated key/value buffers, so one decode step has fixed shapes and can be
replayed as a CUDA graph. Outputs match the Hugging Face forward (tested on tiny OPT).

Cache columns are shared by the batch; a row that feeds padding marks its columns invalid, so rows
decode independently, as in ``gill.generate``.

Opt-in speed-ups (off by default; the default decoder runs exactly the modules' own calls):

- ``fused_qkv``: each layer's q/k/v projections run as one matmul over weights concatenated once, at
  construction, from the module's own weights. The fused tensors are an extra copy of the q/k/v weights
  (3·d² + 3·d values per layer: about 3.2 GB for OPT-6.7B in bf16), shared by every decoder of the same
  model; nothing else of the model is copied. They are a snapshot: a decoder built before the LM's
  weights change (the LM is frozen in GILL) keeps the old values.
- ``compile``: ``torch.compile`` of the one-token step (``compile_mode``, shapes static). The first step
  of each (batch, cache length, options) compiles; later steps and later decoders of that shape reuse it.
  With a mode that makes its own CUDA graphs ("reduce-overhead", "max-autotune") the step is not also
  captured here.
- ``quantize_lm_int8``: int8 weight-only quantization of the LM's linear layers through torchao.

``set_decoder_options(model, ...)`` chooses these for the decoders ``decoder_for`` builds (so for
``gill.generate.decode`` with the static backend).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator
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


# torch.compile modes that capture CUDA graphs themselves
_GRAPHING_MODES = ("reduce-overhead", "max-autotune")


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


# attention module -> (signature of its q/k/v tensors, fused weight, fused bias); decoders share them
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FUSED_LOCK = threading.Lock()


def _fused_qkv(attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (3d, d) weight and (3d,) bias from ``attn``'s q/k/v projections, made once per weight version."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    tensors = [t for p in projs for t in (p.weight, p.bias)]
    if not all(_plain(t) for t in tensors):
        kinds = sorted({type(t).__name__ for t in tensors if not _plain(t)})
        raise ValueError(f"fused_qkv needs plain q/k/v weights, not {kinds} (a quantized LM): build the decoder "
                         "without fused_qkv")
    signature = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
    with _FUSED_LOCK:
        hit = _FUSED.get(attn)
        if hit is not None and hit[0] == signature:
            return hit[1], hit[2]
        with torch.no_grad():
            weight = torch.cat([p.weight.detach() for p in projs])
            biases = [p.bias for p in projs]
            bias = None if all(b is None for b in biases) else torch.cat([
                p.weight.new_zeros(p.out_features) if p.bias is None else p.bias.detach() for p in projs])
        _FUSED[attn] = (signature, weight, bias)
        return weight, bias


class StaticOPTDecoder:
    """Prefill, chunks and one-token steps over a static cache of ``max_len`` columns for ``batch`` rows.

    ``fused_qkv``, ``compile``, ``compile_mode`` and ``compile_backend``: the opt-in speed-ups of the module
    docstring (``compile_backend`` is passed to ``torch.compile``). ``use_cuda_graph`` (default: on when the
    weights are on a GPU, unless the compile mode makes its own graphs) captures the one-token step.
    """

    def __init__(self, model: GILLModel, batch: int, max_len: int, use_cuda_graph: bool | None = None, *,
                 fused_qkv: bool = False, compile: bool = False,
                 compile_mode: str | None = "max-autotune-no-cudagraphs",
                 compile_backend: str | Callable = "inductor"):
        if not supports(model.lm):
            raise ValueError("StaticOPTDecoder needs a pre-LN OPT without project_in/out (e.g. facebook/opt-6.7b)")
        graphing_compile = compile and compile_mode in _GRAPHING_MODES
        if graphing_compile and use_cuda_graph:
            raise ValueError(f"compile_mode {compile_mode!r} captures CUDA graphs itself: leave use_cuda_graph unset "
                             "or False, or choose 'max-autotune-no-cudagraphs'")
        self.model = model
        self.dec = model.lm.get_decoder()
        cfg = model.lm.config
        w = self.dec.embed_tokens.weight
        self.batch, self.max_len = batch, max_len
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        # one buffer per layer (not views of one tensor), so a compiled step writes its column in place
        shape = (batch, self.heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.dec.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.dec.layers]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=w.device)
        self.cur = torch.zeros(1, dtype=torch.long, device=w.device)  # next column to write
        self.used = 0  # the same count on the host, to check the bound
        self.use_cuda_graph = (w.is_cuda and not graphing_compile) if use_cuda_graph is None else use_cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._step_ids = torch.zeros(batch, 1, dtype=torch.long, device=w.device)
        self._step_valid = torch.zeros(batch, 1, dtype=torch.bool, device=w.device)
        self._step_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._qkv = [_fused_qkv(layer.self_attn) for layer in self.dec.layers] if fused_qkv else None
        self.compiled = compile
        self._step_fn = self._step_impl
        if compile:
            if graphing_compile:  # the cache is written in place: its addresses stay put between graph replays
                for t in (*self.k, *self.v, self.key_valid, self.cur, self._step_ids, self._step_valid):
                    torch._dynamo.mark_static_address(t)
            self._step_fn = torch.compile(self._step_impl, mode=compile_mode, backend=compile_backend, dynamic=False)

    @property
    def extra_bytes(self) -> int:
        """Bytes of the fused q/k/v tensors this decoder uses (shared with the model's other decoders)."""
        return sum(t.numel() * t.element_size() for pair in self._qkv or [] for t in pair if t is not None)

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
            if self._qkv is None:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            else:
                q, k, v = F.linear(h, *self._qkv[i]).chunk(3, dim=-1)
            q = (q * attn.scaling).view(b, width, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(b, width, self.heads, self.head_dim).transpose(1, 2)
            v = v.view(b, width, self.heads, self.head_dim).transpose(1, 2)
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
        """Token ids (B, W) -> logits (B, W, vocab), hidden (B, W, d). One-token steps replay a CUDA graph
        and/or run the compiled step."""
        self._advance(ids.shape[1])
        if ids.shape[1] != 1 or not (self.use_cuda_graph or self.compiled):
            return self._forward(self.model.embed_tokens(ids), valid.bool())
        self._step_ids.copy_(ids)
        self._step_valid.copy_(valid.bool())
        if not self.use_cuda_graph:
            return self._step()
        if self._graph is None:
            with _CAPTURE_LOCK:
                self._capture()
        self._graph.replay()
        return self._step_out

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step_fn(self._step_ids, self._step_valid)

    def _step_impl(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(self.model.embed_tokens(ids), valid)

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


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
    """The opt-in speed-ups of ``StaticOPTDecoder`` (see the module docstring)."""

    fused_qkv: bool = False
    compile: bool = False
    compile_mode: str | None = "max-autotune-no-cudagraphs"
    compile_backend: str | Callable = "inductor"


_OPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> DecoderOptions


def set_decoder_options(model: GILLModel, options: DecoderOptions | None = None) -> None:
    """The options of the decoders ``decoder_for`` builds for ``model`` from now on (None: the defaults)."""
    with _POOL_LOCK:
        if options is None or options == DecoderOptions():
            _OPTIONS.pop(model, None)
        else:
            _OPTIONS[model] = options


# Idle decoders per model, by shape and options; a call checks one out, so concurrent calls never share a cache.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POOL_LOCK = threading.Lock()
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time, whichever thread decodes
MAX_IDLE = 4  # idle decoders kept per model (their buffers can be large)


@contextlib.contextmanager
def decoder_for(model: GILLModel, batch: int, needed: int) -> Iterator[StaticOPTDecoder]:
    """A decoder with room for ``needed`` columns, for this call alone, reused across calls (so its CUDA
    graph is too). Calls running at the same time get different decoders."""
    max_len = -(-needed // 256) * 256
    with _POOL_LOCK:
        options = _OPTIONS.get(model, DecoderOptions())
        key = (batch, max_len, options)
        pool = _DECODERS.setdefault(model, {})
        for other in [k for k in pool if k != key]:
            del pool[other]  # keep one shape per model: a new shape usually means the old one is done
        idle = pool.setdefault(key, [])
        decoder = idle.pop() if idle else None
    if decoder is None:
        decoder = StaticOPTDecoder(model, batch, max_len, **dataclasses.asdict(options))
    try:
        yield decoder
    finally:
        with _POOL_LOCK:
            idle = _DECODERS.setdefault(model, {}).setdefault(key, [])
            if len(idle) < MAX_IDLE:
                idle.append(decoder)


# ---- int8 weights ------------------------------------------------------------------------------------


def quantize_lm_int8(lm: torch.nn.Module, *, include_lm_head: bool = False) -> torch.nn.Module:
    """Quantize ``lm``'s linear layers to int8 weights (per output channel; activations stay in the weights'
    dtype) in place with torchao, and return it. The LM head is left as it is unless ``include_lm_head``
    (in OPT it is tied to the input embeddings, which quantizing it would untie). torchao also sets its
    recommended inductor options; its int8 kernels are fast under ``torch.compile`` (``compile=True``)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError("int8 weight-only quantization of the LM needs torchao, which is not installed: "
                          "pip install torchao") from e
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and (include_lm_head or module is not head)

    quantize_(lm, Int8WeightOnlyConfig(), filter_fn=wanted)
    return lm
