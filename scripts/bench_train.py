"""Training throughput: this project's step (one vision pass, one LM forward shared by retrieval and
generation) against the original's (three vision passes, three LM forwards), in one run.

    python scripts/bench_train.py                                              # small CPU config
    python scripts/bench_train.py --size full --device cuda --batch-size 50    # OPT-6.7B + CLIP ViT-L/14 sizes

Weights are random (throughput does not depend on their values); both steps compute the same losses with
the original's weights and run forward + backward + AdamW over the trainable parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gill import losses
from gill.config import GILLConfig, MapperConfig, PreprocessConfig, TokenConfig
from gill.model import GILLModel


def build(size: str, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

    if size == "full":
        lm_cfg = OPTConfig(vocab_size=50272, hidden_size=4096, word_embed_proj_dim=4096, num_hidden_layers=32,
                           num_attention_heads=32, ffn_dim=16384, max_position_embeddings=2048, dropout=0.0)
        v_cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 image_size=224, patch_size=14)
        mapper, gen = MapperConfig(), (77, 768)
    else:
        lm_cfg = OPTConfig(vocab_size=8192, hidden_size=256, word_embed_proj_dim=256, num_hidden_layers=4,
                           num_attention_heads=4, ffn_dim=1024, max_position_embeddings=512, dropout=0.0)
        v_cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=64, patch_size=8)
        mapper, gen = MapperConfig(hidden_dim=128, ffn_dim=512, num_encoder_layers=2, num_decoder_layers=2), (77, 128)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        lm, vision = OPTForCausalLM(lm_cfg).eval(), CLIPVisionModel(v_cfg).eval()
    torch.set_default_dtype(default)
    base = lm_cfg.vocab_size - 7
    config = GILLConfig(lm_hidden_size=lm_cfg.hidden_size, vision_hidden_size=v_cfg.hidden_size, mapper=mapper,
                        gen_seq_len=gen[0], gen_emb_dim=gen[1], preprocess=PreprocessConfig(image_size=v_cfg.image_size),
                        tokens=TokenConfig(img_token_ids=list(range(base + 1, base + 9)), vocab_size=base + 9))
    model = GILLModel(lm, vision, config)
    model.adapter.to(device)  # fp32 master weights
    model.img_token_ids = model.img_token_ids.to(device)
    model.img_slot = model.img_slot.to(device)
    return model.train()


def batch(model: GILLModel, n: int, device: str, dtype: torch.dtype, max_len: int = 32):
    g = torch.Generator().manual_seed(0)
    size = model.config.preprocess.image_size
    pixels = torch.randn(n, 3, size, size, generator=g).to(device, dtype)
    caption_len = max_len - 8
    ids = torch.randint(4, model.config.tokens.img_token_ids[0] - 1, (n, caption_len), generator=g)
    ids[:, 0] = 2
    img = torch.tensor(model.config.tokens.img_token_ids).expand(n, -1)
    target = torch.randn(n, model.config.gen_seq_len, model.config.gen_emb_dim, generator=g)
    return pixels, ids.to(device), torch.cat([ids, img], 1).to(device), target.to(device)


def shared_step(model, pixels, cap_ids, img_ids, target):
    """One vision pass; captioning forward; one LM forward for retrieval and generation."""
    image = model.encode_images(pixels)
    cap = model.caption(image.prefix, cap_ids, torch.ones_like(cap_ids))
    out = model.img_token_forward(img_ids, torch.ones_like(img_ids))
    text = model.text_retrieval_embeddings(out.img_hidden)
    return losses.gill_losses(cap.loss, out.loss, losses.contrastive_loss(text, image.retrieval, model.adapter.logit_scale),
                              losses.mapper_loss(model.generation_embeddings(out.img_hidden), target)).total


def original_step(model, pixels, cap_ids, img_ids, target):
    """The original's: each mode runs the vision encoder and the LM again (generation discards the image)."""
    cap = model.caption(model.encode_images(pixels).prefix, cap_ids, torch.ones_like(cap_ids))
    image = model.encode_images(pixels)
    ret = model.img_token_forward(img_ids, torch.ones_like(img_ids))
    contrastive = losses.contrastive_loss(model.text_retrieval_embeddings(ret.img_hidden), image.retrieval,
                                          model.adapter.logit_scale)
    model.encode_images(pixels)
    gen = model.img_token_forward(img_ids, torch.ones_like(img_ids))
    mapper = losses.mapper_loss(model.generation_embeddings(gen.img_hidden), target)
    return cap.loss + 0.5 * ret.loss + contrastive + 0.5 * gen.loss + mapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build(args.size, args.device, dtype)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    data = batch(model, args.batch_size, args.device, dtype)

    def run(step) -> float:
        times = []
        for i in range(args.repeats + 1):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                loss = step(model, *data)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t)
        return args.batch_size / statistics.median(times)

    results = {}
    for name, step in (("shared", shared_step), ("original", original_step)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        results[name] = run(step)
        if cuda:
            results[name + "_mem"] = torch.cuda.max_memory_allocated() / 2**30
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"size={args.size} device={where} batch={args.batch_size} ({'bf16 autocast' if cuda else 'fp32'})")
    for name in ("shared", "original"):
        mem = f", peak {results[name + '_mem']:.1f} GiB" if cuda else ""
        print(f"{name:9s} step: {results[name]:8.2f} samples/s{mem}")
    print(f"ratio shared/original: {results['shared'] / results['original']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
