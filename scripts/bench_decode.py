"""Decode speed: GILL's KV-cached decoding against the original's uncached loop, in one run.

    python scripts/bench_decode.py                                    # small CPU config
    python scripts/bench_decode.py --size opt-6.7b --device cuda --dtype bfloat16   # real size, random weights

Both paths (and, for reference, transformers' own ``generate()`` on the bare LM) decode the same prompt greedily (text only, [IMG] tokens disabled so both emit the same number
of tokens) and must produce the same tokens; the script prints tokens/s of each (median of --repeats)
and their ratio. Weights are random: timings do not depend on their values.

Opt-in variants of the static OPT decoder, timed in the same run after those baselines (each flag alone,
and all the given flags together; their tokens are compared with the cached path's):

    --fused               q/k/v projections as one matmul (an extra copy of the q/k/v weights)
    --compile             torch.compile of the one-token step (--compile-mode); the first call, which
                          compiles, is reported apart
    --int8                int8 weight-only LM through torchao (pip install torchao); quantizes in place,
                          so it runs last; not with --fused
    --check-fp32-tokens   the fast path (--fused/--compile as given) and the eager transformers forward
                          decode the same greedy tokens in float32 (an fp32 copy of the model is built when
                          --dtype is not float32); prints pass/FAIL, exits 1 on FAIL

    python scripts/bench_decode.py --size opt-6.7b --device cuda --dtype bfloat16 --fused --compile --check-fp32-tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from gill.backbones import tiny_clip_vision
from gill.config import GILLConfig, MapperConfig, TokenConfig
from gill.generate import DecodeOptions, decode, decode_uncached
from gill.model import GILLModel
from gill.opt_static import DecoderOptions, quantize_lm_int8, set_decoder_options

SIZES = {
    # name: (hidden, layers, heads, ffn, vocab)
    "small": (256, 4, 4, 1024, 8192),
    "opt-1.3b": (2048, 24, 32, 8192, 50272),
    "opt-6.7b": (4096, 32, 32, 16384, 50272),
}


def build(size: str, device: str, dtype: torch.dtype) -> GILLModel:
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn, vocab = SIZES[size]
    lm_cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=2048, dropout=0.0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        lm = OPTForCausalLM(lm_cfg).eval()
        vision = tiny_clip_vision()
        base = vocab - 7  # as OPT: 50265 tokenizer entries, 7 padding rows
        config = GILLConfig(
            lm_hidden_size=hidden, vision_hidden_size=32, mapper=MapperConfig(),
            tokens=TokenConfig(img_token_ids=list(range(base + 1, base + 9)), vocab_size=base + 9),
        )
        model = GILLModel(lm, vision, config).eval()
    torch.set_default_dtype(default)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: str) -> float:
    """The median wall time of ``repeats`` calls of ``fn``, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def agreeing_prefix(a: list[int], b: list[int], whole: int) -> int:
    """How many leading tokens two decodes share; ``whole`` when they never differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), whole)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", choices=["auto", "static", "hf"], default="auto", help="cached path (auto: static on GPU)")
    p.add_argument("--fused", action="store_true", help="also time the static decoder with fused q/k/v projections")
    p.add_argument("--compile", action="store_true", help="also time it with torch.compile of the one-token step")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode for --compile ('default', 'reduce-overhead', ...)")
    p.add_argument("--int8", action="store_true", help="also time it with int8 weight-only LM weights (torchao)")
    p.add_argument("--check-fp32-tokens", action="store_true",
                   help="check that the fast path decodes the eager path's greedy tokens in float32")
    args = p.parse_args(argv)
    if args.int8 and args.fused:
        p.error("--int8 and --fused cannot be combined: fused q/k/v needs unquantized weights")
    if args.int8:
        try:
            import torchao  # noqa: F401
        except ImportError:
            p.error("--int8 needs torchao, which is not installed: pip install torchao")
    compile_mode = None if args.compile_mode == "default" else args.compile_mode
    dtype = getattr(torch, args.dtype)
    model = build(args.size, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.tokens.img_token_ids[0] - 1, (1, args.prompt_len), generator=g).to(args.device)
    with torch.no_grad():
        embeds = model.embed_tokens(ids)
    mask = torch.ones(ids.shape, dtype=torch.long, device=args.device)
    opts = DecodeOptions(max_new_tokens=args.new_tokens, allow_images=False, stop_on_eos=False, backend=args.backend)

    def cached() -> list[int]:
        return decode(model, embeds, mask, opts)[0].token_ids

    def uncached() -> list[int]:
        return decode_uncached(model, embeds, opts).token_ids

    def hf_generate() -> list[int]:
        with torch.no_grad():
            out = model.lm.generate(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False, pad_token_id=1)
        return out[0, ids.shape[1]:].tolist()

    results = {}
    tokens = {}
    for name, fn in (("cached", cached), ("uncached", uncached), ("hf_generate", hf_generate)):
        tokens[name] = fn()  # warm-up
        results[name] = args.new_tokens / median_seconds(fn, args.repeats, args.device)
    agree = agreeing_prefix(tokens["cached"], tokens["uncached"], args.new_tokens)
    same = agree == args.new_tokens
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"size={args.size} dtype={args.dtype} device={device_name} prompt={args.prompt_len} new={args.new_tokens} batch=1")
    print(f"cached   ({args.backend} backend, incl. prefill): {results['cached']:8.1f} tokens/s")
    print(f"uncached (original's loop)   : {results['uncached']:8.1f} tokens/s")
    print(f"transformers generate()      : {results['hf_generate']:8.1f} tokens/s (text only, dynamic cache)")
    print(f"ratio cached/uncached        : {results['cached'] / results['uncached']:8.2f}x   same tokens: {same} (first {agree} agree)")
    print(f"ratio cached/generate()      : {results['cached'] / results['hf_generate']:8.2f}x")

    # ---- opt-in variants of the static decoder, after the baselines (int8 last: it quantizes in place)
    flags = [f for f in ("fused", "compile", "int8") if getattr(args, f)]
    variants = [[f] for f in flags] + ([flags] if len(flags) > 1 else [])
    static_opts = dataclasses.replace(opts, backend="static")

    def options(names: list[str]) -> DecoderOptions:
        return DecoderOptions(fused_qkv="fused" in names, compile="compile" in names, compile_mode=compile_mode)

    def label(names: list[str]) -> str:
        words = {"fused": "fused qkv", "compile": f"compiled ({args.compile_mode})", "int8": "int8"}
        return "static, " + " + ".join(words[n] for n in names) if names else "static"

    def time_variant(names: list[str]) -> None:
        set_decoder_options(model, options(names))

        def fn() -> list[int]:
            return decode(model, embeds, mask, static_opts)[0].token_ids

        sync(args.device)
        t = time.perf_counter()
        got = fn()  # the first call compiles and captures
        sync(args.device)
        first = time.perf_counter() - t
        seconds = median_seconds(fn, args.repeats, args.device)
        rate = args.new_tokens / seconds
        n_same = agreeing_prefix(got, tokens["cached"], args.new_tokens)
        print(f"{label(names):<29}: {rate:8.1f} tokens/s   {rate / results['cached']:5.2f}x cached   "
              f"same tokens as cached: {n_same == args.new_tokens} (first {n_same} agree)")
        if "compile" in names:
            print(f"{'':<29}  first call {first:.1f} s (compiles; a decode takes {seconds:.3f} s)")

    for names in [v for v in variants if "int8" not in v]:
        time_variant(names)

    check_failed = False
    if args.check_fp32_tokens:
        fast = [f for f in flags if f != "int8"]
        check_model = model if dtype == torch.float32 else build(args.size, args.device, torch.float32)
        with torch.no_grad():
            check_embeds = check_model.embed_tokens(ids)
        eager = decode(check_model, check_embeds, mask, dataclasses.replace(opts, backend="hf"))[0].token_ids
        set_decoder_options(check_model, options(fast))
        got = decode(check_model, check_embeds, mask, static_opts)[0].token_ids
        set_decoder_options(check_model, None)
        n_same = agreeing_prefix(got, eager, args.new_tokens)
        check_failed = n_same != args.new_tokens
        note = " (int8 left out: quantized weights change the logits)" if args.int8 else ""
        print(f"fp32 tokens, {label(fast)} vs eager transformers: {'FAIL' if check_failed else 'pass'} "
              f"(first {n_same} of {args.new_tokens} agree){note}")
        if check_model is not model:
            del check_model, check_embeds
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    int8_variants = [v for v in variants if "int8" in v]
    if int8_variants:
        quantize_lm_int8(model.lm)
        for names in int8_variants:
            time_variant(names)
    set_decoder_options(model, None)

    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    # In fp32 the two paths must agree; in bf16 random weights make near-ties that rounding can flip.
    if check_failed:
        return 1
    return 0 if same or args.dtype != "float32" else 1


if __name__ == "__main__":
    raise SystemExit(main())
