"""One whole GILL turn, ours against the original's way, in one run, with the time of each stage.

    python scripts/bench_turn.py                                   # small sizes on CPU (what CI runs)
    python scripts/bench_turn.py --size real --device cuda --dtype bfloat16 --sd-dtype float16

A turn: a 128-token prompt with one image -> vision -> prefill -> 16 text tokens -> one image slot ([IMG0..7])
-> heads (mapper, retrieval embedding, decision) -> retrieval over the index -> Stable Diffusion (25 steps,
classifier-free guidance) -> VAE decode. Ours: KV-cached decoding, and diffusion only where the image is
generated (reported for a generated and for a retrieved image). The original's way, at the same settings:
a full forward without cache for every token, diffusion at every image slot whatever the decision, and the
generated image re-encoded by CLIP to rank it against the retrieved one. Also turns per second with
``--concurrent`` conversations at once (ours: one batched decode and one batched diffusion call; the
original's: one turn after another).

Weights are random at the chosen size (timings do not depend on their values). ``real`` is OPT-6.7B,
CLIP ViT-L/14, the SD v1.5 UNet and VAE at 512 px and a 3.3M x 256 index (``--index-size`` to change).
Exits non-zero if ours is slower than the original's way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SIZES  # noqa: E402  (the LM sizes, shared with the decode benchmark)

from gill.config import GILLConfig, MapperConfig, TokenConfig  # noqa: E402
from gill.decision import DecisionHead, decision_probs  # noqa: E402
from gill.generate import DecodeOptions, decode, decode_uncached  # noqa: E402
from gill.model import GILLModel  # noqa: E402

STACKS = {
    # lm size, vision (hidden, layers, heads, image, patch), gen (seq_len, dim), ret dim, SD image px, index rows
    "small": ("small", (64, 2, 4, 32, 8), (16, 64), 64, 64, 20_000),
    "real": ("opt-6.7b", (1024, 24, 16, 224, 14), (77, 768), 256, 512, 3_300_000),
}


@dataclass
class Stack:
    model: GILLModel
    decision: DecisionHead
    pipe: Any
    index: Any  # a faiss inner-product index of the image-side retrieval embeddings
    image_size: int  # the vision encoder's input
    sd_size: int


def build(size: str, device: str, dtype: torch.dtype, sd_dtype: torch.dtype, index_size: int | None) -> Stack:
    import faiss
    from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

    lm_size, (v_hidden, v_layers, v_heads, v_image, v_patch), (gen_len, gen_dim), ret_dim, sd_px, rows = STACKS[size]
    hidden, layers, heads, ffn, vocab = SIZES[lm_size]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        lm = OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=hidden, word_embed_proj_dim=hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                                      max_position_embeddings=2048, dropout=0.0)).eval()
        vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=v_hidden, intermediate_size=4 * v_hidden,
                                                  num_hidden_layers=v_layers, num_attention_heads=v_heads,
                                                  image_size=v_image, patch_size=v_patch)).eval()
        base = vocab - 7
        mapper = MapperConfig() if size == "real" else MapperConfig(hidden_dim=64, num_heads=4, num_encoder_layers=2,
                                                                    num_decoder_layers=2, ffn_dim=256)
        config = GILLConfig(lm_hidden_size=hidden, vision_hidden_size=v_hidden, n_visual_tokens=4, ret_emb_dim=ret_dim,
                            gen_seq_len=gen_len, gen_emb_dim=gen_dim, mapper=mapper,
                            tokens=TokenConfig(img_token_ids=list(range(base + 1, base + 9)), vocab_size=base + 9))
        model = GILLModel(lm, vision, config).eval()
        decision = DecisionHead(hidden).eval()
    torch.set_default_dtype(default)
    pipe = build_sd(size, gen_len, gen_dim, sd_px).to(device, sd_dtype)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    n = index_size or rows
    index = faiss.IndexFlatIP(ret_dim)
    for start in range(0, n, 500_000):  # filled in chunks: 3.3M x 256 float32 is 3.4 GB
        chunk = rng.standard_normal((min(500_000, n - start), ret_dim), dtype=np.float32)
        faiss.normalize_L2(chunk)
        index.add(chunk)
    return Stack(model, decision, pipe, index, v_image, sd_px)


def build_sd(size: str, gen_len: int, gen_dim: int, px: int) -> Any:
    """A random Stable Diffusion pipeline: SD v1.5's UNet and VAE (``real``), or the project's tiny one."""
    from gill.backbones import tiny_stable_diffusion

    pipe = tiny_stable_diffusion(gen_dim, gen_len, image_size=px)
    if size != "real":
        return pipe
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(sample_size=px // 8, cross_attention_dim=gen_dim, attention_head_dim=8,
                                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    pipe.vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             sample_size=px)
    pipe.vae_scale_factor = 8
    return pipe


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Wall time per stage (synchronising the GPU), summed over a turn."""

    def __init__(self, device: str):
        self.device, self.times = device, {}

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        sync(self.device)
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t
        return out


@torch.no_grad()
def turn(stack: Stack, batch: int, args: argparse.Namespace, *, original: bool, generate: bool, clock: Clock) -> list[int]:
    """One turn for ``batch`` conversations; returns the text tokens of the first (for the agreement check)."""
    model, device = stack.model, args.device
    dtype = next(model.lm.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.tokens.img_token_ids[0] - 1, (batch, args.prompt_len), generator=g).to(device)
    pixels = torch.randn(batch, 3, stack.image_size, stack.image_size, generator=g).to(device, dtype)
    image = clock("vision", lambda: model.encode_images(pixels))
    embeds = torch.cat([image.prefix.to(dtype), model.embed_tokens(ids)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    # the text, then an image slot forced at once after it (as the evaluations force it)
    opts = DecodeOptions(max_new_tokens=args.new_tokens, allow_images=False, stop_on_eos=False)
    if original:  # one turn after another, each a full forward per token
        texts = [clock("decode", lambda r=r: decode_uncached(model, embeds[r:r + 1], opts).token_ids) for r in range(batch)]
    else:
        texts = [r.token_ids for r in clock("prefill+decode", lambda: decode(model, embeds, mask, opts))]
    text_ids = torch.tensor(texts, device=device)
    img_ids = model.img_token_ids[None].expand(batch, -1)
    full = torch.cat([embeds, model.embed_tokens(text_ids), model.embed_tokens(img_ids)], dim=1)
    full_mask = torch.ones(full.shape[:2], dtype=torch.long, device=device)
    hidden = clock("image slot", lambda: model.lm_forward(full, full_mask, logits_to_keep=1).hidden[:, -img_ids.shape[1]:])
    gen = clock("heads", lambda: model.generation_embeddings(hidden))
    ret = clock("heads", lambda: torch.nn.functional.normalize(model.text_retrieval_embeddings(hidden).float(), dim=-1))
    clock("heads", lambda: decision_probs(stack.decision, model.decision_features(hidden).to(dtype)))
    clock("retrieval", lambda: stack.index.search(ret.cpu().numpy(), 1))
    if original or generate:
        pipe = stack.pipe
        sd_dtype = next(pipe.unet.parameters()).dtype
        negative = torch.zeros_like(gen, dtype=sd_dtype)
        rows = [slice(r, r + 1) for r in range(batch)] if original else [slice(0, batch)]  # the original: one at a time
        latents = torch.cat([clock("diffusion", lambda r=r: _diffuse(pipe, gen[r], negative[r], args)) for r in rows])
        scale = pipe.vae.config.scaling_factor
        decoded = torch.cat([clock("vae", lambda r=r: pipe.vae.decode(latents[r] / scale).sample) for r in rows])
        if original:  # the original re-encoded its generated image with CLIP to rank it against the retrieved one
            small = torch.nn.functional.interpolate(decoded.float(), size=(stack.image_size,) * 2, mode="bilinear")
            clock("clip re-rank", lambda: model.encode_images(small.to(dtype)).retrieval)
    return texts[0]


def _diffuse(pipe: Any, gen: torch.Tensor, negative: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The stock pipeline's denoising loop, with classifier-free guidance, to latents."""
    return pipe(prompt_embeds=gen.to(negative.dtype), negative_prompt_embeds=negative, num_inference_steps=args.steps,
                guidance_scale=7.5, output_type="latent", generator=torch.Generator(args.device).manual_seed(0)).images


def timed(stack: Stack, batch: int, args: argparse.Namespace, **kw) -> tuple[float, dict[str, float], list[int]]:
    """Median wall time of ``--repeats`` turns after one warm-up, and the stages of the median one."""
    tokens = turn(stack, batch, args, clock=Clock(args.device), **kw)  # warm-up (and, compiled, the compile)
    runs = []
    for _ in range(args.repeats):
        clock = Clock(args.device)
        sync(args.device)
        t = time.perf_counter()
        turn(stack, batch, args, clock=clock, **kw)
        sync(args.device)
        runs.append((time.perf_counter() - t, clock.times))
    runs.sort(key=lambda r: r[0])
    total, stages = runs[len(runs) // 2]
    return total, stages, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(STACKS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="LM and CLIP")
    p.add_argument("--sd-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--index-size", type=int, default=None, help="rows in the retrieval index (default: the size's)")
    p.add_argument("--concurrent", type=int, nargs="*", default=[8], help="conversations at once for throughput")
    p.add_argument("--channels-last", action="store_true", help="ours: UNet and VAE in channels-last format")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile of the UNet and the VAE decoder "
                   "(gill.diffusion.speed_up_pipeline); the first call's compile time is reported apart")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stack = build(args.size, args.device, getattr(torch, args.dtype), getattr(torch, args.sd_dtype), args.index_size)
    # the original's way first, on the stock pipeline; then ours, with the opt-in speed-ups if asked
    orig, stages_orig, tok_orig = timed(stack, 1, args, original=True, generate=True)
    if args.channels_last or args.compile:
        from gill.diffusion import speed_up_pipeline

        speed_up_pipeline(stack.pipe, channels_last=args.channels_last, compile=args.compile)
        t = time.perf_counter()
        turn(stack, 1, args, original=False, generate=True, clock=Clock(args.device))
        print(f"first call after the speed-ups (compiling): {time.perf_counter() - t:.1f} s")
    ours_gen, stages_gen, tok_ours = timed(stack, 1, args, original=False, generate=True)
    ours_ret, stages_ret, _ = timed(stack, 1, args, original=False, generate=False)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"size={args.size} device={device} dtype={args.dtype} sd_dtype={args.sd_dtype} prompt={args.prompt_len}+1 image "
          f"new={args.new_tokens} steps={args.steps} index={stack.index.ntotal} rows, median of {args.repeats}")
    for name, total, stages in (("ours, generated image", ours_gen, stages_gen), ("ours, retrieved image", ours_ret, stages_ret),
                                ("original's way", orig, stages_orig)):
        parts = "  ".join(f"{k} {v * 1000:.0f}" for k, v in stages.items())
        print(f"{name:22s} {total:7.3f} s/turn   ({parts} ms)")
    print(f"speed-up, generated image: {orig / ours_gen:.2f}x; retrieved image: {orig / ours_ret:.2f}x; "
          f"same text tokens: {tok_ours == tok_orig}")
    slower = ours_gen > orig
    for n in args.concurrent:  # (with --compile, a new batch size compiles again in the warm-up)
        ours_n, _, _ = timed(stack, n, args, original=False, generate=True)
        orig_n, _, _ = timed(stack, n, args, original=True, generate=True)
        print(f"{n:3d} conversations at once: ours {n / ours_n:7.2f} turns/s, original's way {n / orig_n:7.2f} "
              f"turns/s ({orig_n / ours_n:.2f}x)")
        slower |= ours_n > orig_n
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if slower:
        print("ours is slower than the original's way", file=sys.stderr)
    return 1 if slower or (tok_ours != tok_orig and args.dtype == "float32") else 0


if __name__ == "__main__":
    raise SystemExit(main())
