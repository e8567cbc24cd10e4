"""Stages 2-4, the backbones trained from scratch on the world: a causal LM (OPT architecture, with its own
BPE tokenizer), CLIP-style dual encoders (GILL's vision tower and the diffusion text encoder; with another
seed, the evaluation's metric model) and a latent diffusion model saved as a StableDiffusionPipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from training.toy import world
from training.toy.plan import LM_LEN, LM_POSITIONS, TEXT_LEN, Plan, log, schedule


def image_processor():
    """The toy's CLIP preprocessing (the library's mean and std, at the world's size)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                              crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE})


def pixels(processor, images) -> torch.Tensor:
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def text_inputs(tokenizer, captions: list[str]):
    """Captions padded to TEXT_LEN; the CLIP text models pool at the first pad (their eos_token_id), the
    position right after the caption, which has read all of it."""
    return tokenizer(captions, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def reuse_backbones(out: Path, source: str, retrain: tuple[str, ...] = ()) -> None:
    """Copy frozen backbones into ``out`` so the lm, clip and sd stages find them and skip: from the shipped
    toy model (``source`` "toy") or an earlier build's output folder. Backbones already in ``out`` stay.
    ``retrain`` ("lm"): that backbone is trained anew; of the LM only its tokenizer is copied (the world's BPE,
    which the CLIP towers and the diffusion model read too, so they stay usable with the new LM)."""
    import shutil

    if source == "toy":
        from gill.presets import toy_dir, toy_metric_dir

        model, metric = toy_dir(), toy_metric_dir()
    else:
        model, metric = Path(source) / "model", Path(source) / "metric-clip"
    wanted = {out / "model" / name: model / name for name in ("lm", "vision", "sd")}
    wanted[out / "metric-clip"] = metric
    for dst, src in wanted.items():
        if not (src / "config.json").is_file() and not (src / "model_index.json").is_file():
            raise FileNotFoundError(f"--backbones {source}: no backbone at {src} (expected a config.json or model_index.json)")
        if dst.name == "lm" and "lm" in retrain:
            dst.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if not (dst / name).exists():
                    shutil.copy(src / name, dst / name)
        elif not dst.exists():
            shutil.copytree(src, dst)
    kept = [n for n in ("lm", "vision", "sd") if n not in retrain] + ["the metric model"]
    log(f"backbones from {source}: {', '.join(kept)}" + (" (and the LM's tokenizer: the LM is trained anew)" if "lm" in retrain else ""))


# ---- 2. the language model ------------------------------------------------------------------------------

def stage_lm(out: Path, plan: Plan, seed: int) -> None:
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    target = out / "model" / "lm"
    if (target / "config.json").exists():
        return
    docs = json.loads((out / "data" / "text.json").read_text())
    # written by the data stage, beside where the LM goes
    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    torch.manual_seed(seed)
    # untied output rows (OPT ties them): tied, the rows of words said in the same places ("on white." /
    # "on gray.") get the same output gradients and merge (" white" and " gray": cosine 0.995 in the v2.1
    # LM), after which nothing the LM computes tells them apart, nor can GILL's [IMG] tokens
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=96, word_embed_proj_dim=96, num_hidden_layers=3,
                                  num_attention_heads=4, ffn_dim=384, max_position_embeddings=LM_POSITIONS, dropout=0.0,
                                  pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=False))
    ids = [tokenizer(doc)["input_ids"][:LM_LEN - 1] + [2] for doc in docs]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    sched = schedule(opt, 100, plan.lm_steps, floor=0.1)
    rng = random.Random(seed)
    lm.train()
    for step in range(plan.lm_steps):
        # mixed batches, each padded to its longest row: batches of alike lengths (transformers'
        # LengthGroupedSampler) ran 2x faster but copied colours forward in only 50-83% of captions (vs 100%)
        batch = [ids[rng.randrange(len(ids))] for _ in range(32)]
        width = max(map(len, batch))
        x = torch.tensor([b + [1] * (width - len(b)) for b in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(b) for b in batch])[:, None]).long()
        loss = lm(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == plan.lm_steps - 1:
            log(f"lm step {step} loss {loss.item():.3f}")
    lm.eval()
    copies = copy_accuracy(lm, tokenizer)
    log(f"lm copies the colour forward ('<caption>. it is' -> colour) in {copies:.0%} of captions")
    follows = {how: story_end_accuracy(lm, tokenizer, pictured) for how, pictured in (("text", False), ("pictured", True))}
    log(f"lm says where a story ends in {follows['text']:.0%} of stories, {follows['pictured']:.0%} with their pictures' places")
    (out / "lm-check.json").write_text(json.dumps({"colour_copy_accuracy": copies, "story_end_accuracy": follows}) + "\n")
    lm.save_pretrained(target)
    tokenizer.save_pretrained(target)


@torch.no_grad()
def copy_accuracy(lm, tokenizer) -> float:
    """How often the LM's top next token after 'Q: <caption>.\\nA: <caption>. (picture)\\nQ: what colour is
    it?\\nA: it is' (a chat as the LM read them) is the caption's colour: whether it carries attributes
    forward, which GILL's [IMG] tokens rely on."""
    scenes = world.all_scenes()
    enc = tokenizer([f"Q: {s.caption()}.\nA: {s.caption()}.{world.PICTURE}\nQ: what colour is it?\nA: it is" for s in scenes],
                    return_tensors="pt", padding=True)
    last = enc.attention_mask.sum(1) - 1
    logits = lm(**enc).logits[torch.arange(len(scenes)), last]
    colours = {c: tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0] for c in world.COLORS}
    return sum(int(logits[i].argmax()) == colours[s.color] for i, s in enumerate(scenes)) / len(scenes)


@torch.no_grad()
def story_end_accuracy(lm, tokenizer, pictured: bool, n: int = 60) -> float:
    """How often the LM, greedy, ends '<5 captions> there are photos of it. now it is' with the story's last
    scene: whether it follows a story through its steps, with (``pictured``: ``world.PICTURE`` after each
    caption but the last: the places GILL's visual prefixes take in a story given with its pictures) or
    without. The shipped LM: 1.00 and 0.43 (it never read text after a picture's place); one trained on the
    same text with seed 1: 1.00 and 0.80."""
    train, test = world.split_compositions()
    ok = 0
    for steps in world.distinct_stories(random.Random(99), train | test, n):
        captions = [f"{c}." for _, c in steps]
        told = "".join(c + world.PICTURE for c in captions[:-1]) + captions[-1] if pictured else " ".join(captions)
        ids = tokenizer(world.ask_story_end(told), return_tensors="pt").input_ids
        said = lm.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        ok += tokenizer.decode(said).strip().startswith(steps[-1][0].caption())
    return ok / n


# ---- 3. CLIP-style dual encoders ----------------------------------------------------------------------------

def train_clip(out: Path, plan: Plan, seed: int):
    """A tiny CLIPModel trained contrastively on (picture, caption), pooled as CLIP pools (at eos_token_id,
    here the first pad)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(out / "model" / "lm", trust_remote_code=False)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LEN, pad_token_id=1, bos_token_id=2,
                         eos_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                           image_size=world.IMAGE_SIZE, patch_size=4),
        projection_dim=64,
    )
    clip = CLIPModel(cfg)
    train_comp = {tuple(x) for x in json.loads((out / "data" / "split.json").read_text())["train"]}
    scenes = [s for s in world.all_scenes() if s.composition in train_comp]
    rng = random.Random(seed)
    # every (scene, jitter) picture preprocessed once: rendering and preprocessing them anew at every step
    # took a fifth of the stage (the same pixels either way)
    pictures = [(s, (dx, dy)) for s in scenes for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    where = {(s.key, j): i for i, (s, j) in enumerate(pictures)}
    rendered = pixels(image_processor(), [world.render(s, jitter=j) for s, j in pictures])
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.05)
    sched = schedule(opt, 100, plan.clip_steps, floor=0.1)
    clip.train()
    for step in range(plan.clip_steps):
        batch = rng.sample(scenes, 48)
        px = rendered[[where[s.key, (rng.randint(-1, 1), rng.randint(-1, 1))] for s in batch]]
        tok = text_inputs(tokenizer, [s.caption() for s in batch])
        img = clip.get_image_features(pixel_values=px)
        txt = clip.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        img, txt = (getattr(f, "pooler_output", f) for f in (img, txt))  # transformers 5 returns output objects
        logits = clip.logit_scale.exp() * F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
        loss = (F.cross_entropy(logits, torch.arange(len(batch))) + F.cross_entropy(logits.T, torch.arange(len(batch)))) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == plan.clip_steps - 1:
            log(f"clip(seed {seed}) step {step} loss {loss.item():.3f}")
    return clip.eval(), tokenizer


def stage_clip(out: Path, plan: Plan, seed: int) -> None:
    """GILL's vision tower, and its text tower as the diffusion model's text encoder: saved as a diffusers
    repository's ``text_encoder/`` and ``tokenizer/`` (``out/sd-text``), which is all GILL's diffusion
    targets need, so GILL trains while the diffusion model does."""
    from transformers import CLIPTextModel, CLIPVisionModel

    model = out / "model"
    if (model / "vision" / "config.json").exists():  # (reused backbones bring theirs inside model/sd)
        return
    clip, tokenizer = train_clip(out, plan, seed)
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    tokenizer.model_max_length = TEXT_LEN
    tokenizer.save_pretrained(out / "sd-text" / "tokenizer")
    text.save_pretrained(out / "sd-text" / "text_encoder")
    vision.save_pretrained(model / "vision")


def stage_metric(out: Path, plan: Plan, seed: int) -> None:
    """The evaluation's metric model: the same kind of CLIP, with another seed."""
    metric = out / "metric-clip"
    if (metric / "config.json").exists():
        return
    clip, _ = train_clip(out, plan, seed + 1000)
    clip.save_pretrained(metric)
    image_processor().save_pretrained(metric)


# ---- 4. the diffusion model ---------------------------------------------------------------------------------

def stage_sd(out: Path, plan: Plan, seed: int) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.image_processor import VaeImageProcessor
    from transformers import AutoTokenizer, CLIPTextModel

    target = out / "model" / "sd"
    if (target / "model_index.json").exists():
        return
    torch.manual_seed(seed)
    # every composition of the world: the diffusion model was pretrained on far more than GILL's data, as
    # Stable Diffusion learnt LAION's pictures beside CC3M's, so an unseen composition (one GILL never
    # trained on nor can retrieve) is what generation is for. Trained on the corpus's compositions only (up
    # to v2.3), it drew them right from their own captions in 0.50 of them, and GILL in 0.25
    scenes = world.all_scenes()
    jitters = ((0, 0), (1, 0), (0, 1))
    images = VaeImageProcessor(do_resize=False).preprocess([world.render(s, jitter=j) for s in scenes for j in jitters])
    captions = [s.caption() for s in scenes for _ in jitters]
    vae, latents = train_vae(images, plan)
    tokenizer = AutoTokenizer.from_pretrained(out / "sd-text" / "tokenizer", trust_remote_code=False)
    text_encoder = CLIPTextModel.from_pretrained(out / "sd-text" / "text_encoder", trust_remote_code=False).eval()
    with torch.no_grad():
        unique = sorted(set(captions)) + [""]
        states = dict(zip(unique, text_encoder(input_ids=text_inputs(tokenizer, unique).input_ids).last_hidden_state))
    unet = train_unet(latents, torch.stack([states[c] for c in captions]), states[""], plan)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(target, safe_serialization=True)


def train_vae(images: torch.Tensor, plan: Plan):
    """The toy's VAE trained on ``images`` (in [-1, 1]), and their latents scaled to unit spread (the scale
    recorded in its config, as Stable Diffusion's 0.18215)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=world.IMAGE_SIZE, layers_per_block=1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(plan.vae_steps):
        x = images[torch.randint(len(images), (16,))]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == plan.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    return vae, latents * scale


def train_unet(latents: torch.Tensor, cond: torch.Tensor, empty: torch.Tensor, plan: Plan):
    """The toy's UNet trained to denoise ``latents`` given their captions' states ``cond`` (``empty``: the
    empty caption's, for classifier-free guidance); its weights' moving average, as diffusion models ship."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8,
    )
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    sched = schedule(opt, 200, plan.unet_steps)
    ema = EMAModel(unet.parameters(), decay=0.999)
    unet.train()
    for step in range(plan.unet_steps):
        idx = torch.randint(len(latents), (16,))
        x0, c = latents[idx], cond[idx].clone()
        c[torch.rand(len(idx)) < 0.1] = empty  # classifier-free guidance: sometimes no caption
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(idx),))
        loss = F.mse_loss(unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=c).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        if step % 250 == 0 or step == plan.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f}")
    ema.copy_to(unet.parameters())
    return unet
