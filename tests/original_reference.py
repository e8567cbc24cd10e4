"""Hand-written reference computations over tensors named as in the original GILL checkpoint.

These re-derive the original's math step by step (explicit matmuls, head splitting, pre-LN residuals), so
tests can check our modules against known answers rather than against themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAPPER = "model.gen_text_hidden_fcs.0."


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x, sd, name, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def attention(q_in, kv_in, sd, name, heads):
    w, b = sd[f"{name}.in_proj_weight"], sd[f"{name}.in_proj_bias"]
    d = q_in.shape[-1]
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d : 2 * d].T + b[d : 2 * d]
    v = kv_in @ w[2 * d :].T + b[2 * d :]
    n, tq, tk, dh = q.shape[0], q.shape[1], k.shape[1], d // heads
    q = q.view(n, tq, heads, dh).transpose(1, 2)
    k = k.view(n, tk, heads, dh).transpose(1, 2)
    v = v.view(n, tk, heads, dh).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(n, tq, d)
    return linear(out, sd, f"{name}.out_proj")


def feed_forward(x, sd, name):
    return linear(F.relu(linear(x, sd, f"{name}.linear1")), sd, f"{name}.linear2")


def original_mapper(sd, hidden, img_input_embs, heads=4):
    """GILLMapper as the original computes it: (h + e) -> fc -> pre-LN nn.Transformer -> model."""
    p = MAPPER
    n_enc = len({k.split(".")[6] for k in sd if k.startswith(p + "tfm.encoder.layers.")})
    n_dec = len({k.split(".")[6] for k in sd if k.startswith(p + "tfm.decoder.layers.")})
    x = linear(hidden + img_input_embs, sd, p + "fc")
    for i in range(n_enc):
        L = f"{p}tfm.encoder.layers.{i}"
        h = layer_norm(x, sd, f"{L}.norm1")
        x = x + attention(h, h, sd, f"{L}.self_attn", heads)
        x = x + feed_forward(layer_norm(x, sd, f"{L}.norm2"), sd, L)
    memory = layer_norm(x, sd, p + "tfm.encoder.norm")
    y = sd[p + "query_embs"].expand(hidden.shape[0], -1, -1)
    for i in range(n_dec):
        L = f"{p}tfm.decoder.layers.{i}"
        h = layer_norm(y, sd, f"{L}.norm1")
        y = y + attention(h, h, sd, f"{L}.self_attn", heads)
        y = y + attention(layer_norm(y, sd, f"{L}.norm2"), memory, sd, f"{L}.multihead_attn", heads)
        y = y + feed_forward(layer_norm(y, sd, f"{L}.norm3"), sd, L)
    y = layer_norm(y, sd, p + "tfm.decoder.norm")
    return linear(y, sd, p + "model")


def original_state_dict(
    lm_dim=4096, vision_dim=1024, n_visual=4, ret_dim=256, gen_dim=768, gen_len=77, n_img=8,
    mapper_dim=512, ffn=2048, n_enc=4, n_dec=4, device=None, dtype=torch.float32, generator=None,
):
    """A state dict with the released checkpoint's exact key names (model.*) and random values."""
    shapes = {
        "model.logit_scale": (),
        "model.visual_embeddings.weight": (n_visual * lm_dim, vision_dim),
        "model.visual_embeddings.bias": (n_visual * lm_dim,),
        "model.visual_fc.weight": (ret_dim, vision_dim),
        "model.visual_fc.bias": (ret_dim,),
        "model.ret_text_hidden_fcs.0.model.weight": (ret_dim, lm_dim),
        "model.ret_text_hidden_fcs.0.model.bias": (ret_dim,),
        MAPPER + "fc.weight": (mapper_dim, lm_dim),
        MAPPER + "fc.bias": (mapper_dim,),
        MAPPER + "query_embs": (1, gen_len, mapper_dim),
        MAPPER + "model.weight": (gen_dim, mapper_dim),
        MAPPER + "model.bias": (gen_dim,),
        "model.input_embeddings.weight": (n_img, lm_dim),
    }
    attn = {"in_proj_weight": (3 * mapper_dim, mapper_dim), "in_proj_bias": (3 * mapper_dim,),
            "out_proj.weight": (mapper_dim, mapper_dim), "out_proj.bias": (mapper_dim,)}
    ff = {"linear1.weight": (ffn, mapper_dim), "linear1.bias": (ffn,), "linear2.weight": (mapper_dim, ffn),
          "linear2.bias": (mapper_dim,)}
    norm = {"weight": (mapper_dim,), "bias": (mapper_dim,)}
    for kind, count, attns, norms in (("encoder", n_enc, ["self_attn"], 2), ("decoder", n_dec, ["self_attn", "multihead_attn"], 3)):
        for i in range(count):
            L = f"{MAPPER}tfm.{kind}.layers.{i}."
            for a in attns:
                shapes.update({f"{L}{a}.{k}": s for k, s in attn.items()})
            shapes.update({L + k: s for k, s in ff.items()})
            for j in range(1, norms + 1):
                shapes.update({f"{L}norm{j}.{k}": s for k, s in norm.items()})
        shapes.update({f"{MAPPER}tfm.{kind}.norm.{k}": s for k, s in norm.items()})
    if device == "meta":
        return {k: torch.empty(s, device="meta", dtype=dtype) for k, s in shapes.items()}
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=generator) * 0.2
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm3.weight") or k.endswith("norm.weight"):
            t = 1 + t
        out[k] = t.to(dtype)
    return out
