"""Build the toy world: tiny backbones trained from scratch on synthetic captioned shapes, then GILL on top
of them with the project's own recipes (training.train, index.build, training.train_decision, gill.eval).

    python scripts/build_toy_world.py --out toy-build            # the full build (deterministic, CPU)
    python scripts/build_toy_world.py --out toy-small --small    # the reduced build the tests run
    python scripts/build_toy_world.py --out toy-build --install  # ... and ship it as the `toy` preset

Stages (each skipped when its output exists, so a killed build resumes):
  1. data      rendered corpus (train compositions only), shards, VIST-format val/test stories
  2. lm        a causal LM (OPT architecture) on the world's text, with its own BPE tokenizer
  3. clip      a CLIP-style dual encoder (GILL's vision tower, and the SD text encoder) and, with
               another seed, the metric model used by the evaluation
  4. sd        AutoencoderKL + UNet2DConditionModel trained as a text-to-image diffusion model; saved as
               a StableDiffusionPipeline directory
  5. gill      SD text embeddings (training.precompute_sd_embeddings), GILL (training.train), the
               retrieval index (index.build), the decision head (training.train_decision)
  6. eval      python -m gill.eval vist on the test stories, scored by the metric model
  7. report    OUT/report: report.md / report.json (generation read by the metric model and by the world's
               own renderings, retrieval against chance, decision accuracy) and grid.png
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from gill.config import CLIP_MEAN, CLIP_STD
from gill.toy import world

ROOT = Path(__file__).resolve().parents[1]

# How the toy model is best run, saved in its config.json (run settings): its tiny diffusion model draws
# colours right at low guidance (colour 0.90 at 2.0 vs 0.51 at SD's usual 7.5, measured on 72 captions),
# its [IMG0] logit, bounded by the original's [IMG]-row renormalisation, needs the original demo's
# image-frequency factor raised, and it is scored by the world's own metric model (beside the model).
TOY_RUN = {"steps": 25, "guidance_scale": 2.0, "img_scale_factor": 4.0, "scorer": "hf:../metric-clip"}
INSTALLED_SCORER = "hf:../toy-metric-clip"  # where install puts the metric model, beside gill/assets/toy


@dataclass
class Plan:
    lm_steps: int = 4000
    clip_steps: int = 1500
    vae_steps: int = 1500
    unet_steps: int = 5000
    gill_steps: int = 2000
    train_images_per_scene: int = 6
    train_stories: int = 800
    test_stories: int = 60
    val_stories: int = 30
    decision_stories: int = 300


SMALL = Plan(lm_steps=4000, clip_steps=400, vae_steps=300, unet_steps=800, gill_steps=1000, train_images_per_scene=2,
             train_stories=300, test_stories=24, val_stories=12)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*cmd: str) -> None:
    log(" ".join(cmd))
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


# ---- 1. data -----------------------------------------------------------------------------------------------

def stage_data(out: Path, plan: Plan, seed: int) -> None:
    import io
    import tarfile

    data = out / "data"
    if (data / "done").exists():
        return
    train_comp, test_comp = world.split_compositions(seed)
    rng = random.Random(seed)
    corpus = data / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    scenes = [s for s in world.all_scenes() if s.composition in train_comp]
    samples = []
    for s in scenes:
        for k in range(plan.train_images_per_scene):
            jitter = (rng.randint(-1, 1), rng.randint(-1, 1)) if k else (0, 0)
            im = world.render(s, jitter=jitter)
            name = f"{s.key}-{k}"
            if k == 0:  # the retrieval corpus: one clean picture per scene
                im.save(corpus / f"{name}.png")
                (corpus / f"{name}.txt").write_text(s.caption())
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            samples.append((name, buf.getvalue(), s.caption(), s.caption()))
    # stories as training text too: the whole story, then its last picture (context is what tells it); the
    # diffusion target is the picture's own caption (sd.txt), not the story
    for n in range(plan.train_stories):
        steps = world.story(rng, train_comp)
        buf = io.BytesIO()
        world.render(steps[-1][0]).save(buf, format="PNG")
        samples.append((f"story-{n:05d}", buf.getvalue(), ". ".join(c for _, c in steps) + ".", steps[-1][0].caption()))
    rng.shuffle(samples)
    shards = data / "shards"
    shards.mkdir(exist_ok=True)
    per = math.ceil(len(samples) / 4)
    for i in range(4):
        with tarfile.open(shards / f"train-{i}.tar", "w") as tar:
            for key, png, caption, sd_caption in samples[i * per:(i + 1) * per]:
                for ext, payload in (("png", png), ("txt", caption.encode()), ("sd.txt", sd_caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    for split, n, comps in (("val", plan.val_stories, train_comp), ("test", plan.test_stories, train_comp | test_comp)):
        stories = [world.story(rng, comps) for _ in range(n)]
        ann, photos = world.vist_annotations(stories)
        folder = data / f"{split}-images"
        folder.mkdir(exist_ok=True)
        for photo, scene in photos.items():
            world.render(scene).save(folder / f"{photo}.png")
        (data / f"{split}-sis.json").write_text(json.dumps(ann))
        (data / f"{split}-scenes.json").write_text(json.dumps({p: s.__dict__ for p, s in photos.items()}))
    # the LM's text has its own seed, so the reduced build trains the very same LM as the full one
    text = world.world_text(random.Random(seed + 1), train_comp | test_comp)
    (data / "text.txt").write_text("\n".join(text))
    # retrieve what the corpus holds, generate unseen compositions
    label = {True: "ret", False: "gen"}
    body = [f"{s.caption()}\t{label[s.composition in train_comp]}" for s in world.all_scenes()]
    for _ in range(plan.decision_stories):  # stories too: the decision is also taken after a whole story
        steps = world.story(rng, train_comp | test_comp)
        body.append(f"{' '.join(c + '.' for _, c in steps)}\t{label[steps[-1][0].composition in train_comp]}")
    rng.shuffle(body)
    (data / "decisions.tsv").write_text("\n".join(["Prompt\tDecision", *body]) + "\n")
    (data / "split.json").write_text(json.dumps({"train": sorted(train_comp), "test": sorted(test_comp)}))
    (data / "done").write_text("ok")
    log(f"data: {len(samples)} training pictures, corpus of {len(scenes)}, test compositions {sorted(test_comp)}")


# ---- 2. the language model ------------------------------------------------------------------------------

def stage_lm(out: Path, plan: Plan, seed: int) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    from gill.backbones import build_tokenizer

    target = out / "model" / "lm"
    if (target / "config.json").exists():
        return
    lines = (out / "data" / "text.txt").read_text().splitlines()
    tokenizer = build_tokenizer(384, corpus=lines)
    torch.manual_seed(seed)
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=96, word_embed_proj_dim=96, num_hidden_layers=3,
                                  num_attention_heads=4, ffn_dim=384, max_position_embeddings=256, dropout=0.0,
                                  pad_token_id=1, bos_token_id=2, eos_token_id=2))
    ids = [tokenizer(line)["input_ids"][:64] + [2] for line in lines]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    rng = random.Random(seed)
    lm.train()
    for step in range(plan.lm_steps):
        batch = [ids[rng.randrange(len(ids))] for _ in range(32)]
        width = max(map(len, batch))
        x = torch.tensor([b + [1] * (width - len(b)) for b in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(b) for b in batch])[:, None]).long()
        labels = x.masked_fill(mask == 0, -100)
        lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / plan.lm_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = lm(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == plan.lm_steps - 1:
            log(f"lm step {step} loss {loss.item():.3f}")
    lm.eval()
    copies = copy_accuracy(lm, tokenizer)
    log(f"lm copies the colour forward ('<caption>. it is' -> colour) in {copies:.0%} of captions")
    (out / "lm-check.json").write_text(json.dumps({"colour_copy_accuracy": copies}) + "\n")
    lm.save_pretrained(target)
    tokenizer.save_pretrained(target)


@torch.no_grad()
def copy_accuracy(lm, tokenizer) -> float:
    """How often the LM's top next token after '<caption>. it is' is the caption's colour: whether it has
    learned to carry attributes forward, which GILL's [IMG] tokens rely on."""
    scenes = world.all_scenes()
    enc = tokenizer([f"{s.caption()}. it is" for s in scenes], return_tensors="pt", padding=True)
    last = enc.attention_mask.sum(1) - 1
    logits = lm(**enc).logits[torch.arange(len(scenes)), last]
    colours = {c: tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0] for c in world.COLORS}
    return sum(int(logits[i].argmax()) == colours[s.color] for i, s in enumerate(scenes)) / len(scenes)


# ---- 3. CLIP-style dual encoders ----------------------------------------------------------------------------

def train_clip(out: Path, plan: Plan, seed: int):
    """A tiny CLIPModel trained contrastively on (picture, caption); the text side pools by masked mean."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(out / "model" / "lm")
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=2),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                           image_size=world.IMAGE_SIZE, patch_size=4),
        projection_dim=64,
    )
    clip = CLIPModel(cfg)
    scenes = world.all_scenes()
    train_comp = {tuple(x) for x in json.loads((out / "data" / "split.json").read_text())["train"]}
    scenes = [s for s in scenes if s.composition in train_comp]
    rng = random.Random(seed)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.05)
    clip.train()
    for step in range(plan.clip_steps):
        batch = rng.sample(scenes, 48)
        pixels = torch.stack([to_tensor(world.render(s, jitter=(rng.randint(-1, 1), rng.randint(-1, 1)))) for s in batch])
        pixels = (pixels - mean) / std
        tok = tokenizer([s.caption() for s in batch], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        img = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        hidden = clip.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        m = tok.attention_mask[..., None].float()
        txt = clip.text_projection((hidden * m).sum(1) / m.sum(1))
        logits = clip.logit_scale.exp() * F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
        # captions repeat across backgrounds: every picture with the same caption is a positive
        same = torch.tensor([[a.caption() == b.caption() for b in batch] for a in batch], dtype=torch.float)
        loss = (-(same / same.sum(1, keepdim=True) * logits.log_softmax(-1)).sum(1).mean()
                - (same / same.sum(1, keepdim=True) * logits.T.log_softmax(-1)).sum(1).mean()) / 2
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / plan.clip_steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == plan.clip_steps - 1:
            log(f"clip(seed {seed}) step {step} loss {loss.item():.3f}")
    return clip.eval(), tokenizer


def to_tensor(im) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def stage_clip(out: Path, plan: Plan, seed: int) -> None:
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModel

    model = out / "model"
    if not (model / "vision" / "config.json").exists():
        clip, _ = train_clip(out, plan, seed)
        vision = CLIPVisionModel(clip.config.vision_config)
        vision.load_state_dict(clip.vision_model.state_dict())
        vision.save_pretrained(model / "vision")
        text = CLIPTextModel(clip.config.text_config)
        text.load_state_dict(clip.text_model.state_dict())
        text.save_pretrained(out / "text_encoder")
    metric = out / "metric-clip"
    if not (metric / "config.json").exists():
        clip, _ = train_clip(out, plan, seed + 1000)
        clip.save_pretrained(metric)
        CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                           crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE}).save_pretrained(metric)


# ---- 4. the diffusion model ---------------------------------------------------------------------------------

def stage_sd(out: Path, plan: Plan, seed: int) -> None:
    from diffusers import (AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import AutoTokenizer, CLIPTextModel

    target = out / "model" / "sd"
    if (target / "model_index.json").exists():
        return
    torch.manual_seed(seed)
    train_comp = {tuple(x) for x in json.loads((out / "data" / "split.json").read_text())["train"]}
    scenes = [s for s in world.all_scenes() if s.composition in train_comp]
    images = torch.stack([to_tensor(world.render(s, jitter=j)) * 2 - 1 for s in scenes for j in ((0, 0), (1, 0), (0, 1))])
    captions = [s.caption() for s in scenes for _ in range(3)]

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=world.IMAGE_SIZE, layers_per_block=1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(plan.vae_steps):
        x = images[torch.randint(len(images), (16,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == plan.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    tokenizer = AutoTokenizer.from_pretrained(out / "model" / "lm")
    tokenizer.model_max_length = 16
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    with torch.no_grad():
        unique = sorted(set(captions)) + [""]
        tok = tokenizer(unique, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        states = dict(zip(unique, text_encoder(input_ids=tok.input_ids).last_hidden_state))
    cond = torch.stack([states[c] for c in captions])
    empty = states[""]

    unet = UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8,
    )
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    unet.train()
    for step in range(plan.unet_steps):
        idx = torch.randint(len(latents), (16,))
        x0, c = latents[idx], cond[idx].clone()
        drop = torch.rand(len(idx)) < 0.1  # classifier-free guidance: sometimes no caption
        c[drop] = empty
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(idx),))
        pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=c).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / plan.unet_steps)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == plan.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f}")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(target, safe_serialization=True)


# ---- 5. GILL ------------------------------------------------------------------------------------------------

def gill_config(out: Path) -> Path:
    from gill.config import GILLConfig, MapperConfig, PreprocessConfig

    cfg = GILLConfig(
        lm="lm", vision="vision", diffusion="sd", lm_hidden_size=96, vision_hidden_size=64, n_visual_tokens=2,
        ret_emb_dim=64, gen_seq_len=16, gen_emb_dim=64,
        mapper=MapperConfig(hidden_dim=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=256),
        preprocess=PreprocessConfig(image_size=world.IMAGE_SIZE),
    )
    path = out / "model" / "gill-config.json"
    cfg.to_json(path)
    return path


def stage_gill(out: Path, plan: Plan, seed: int) -> None:
    model = out / "model"
    data = out / "data"
    if (model / "decision.safetensors").exists():
        return
    shards = str(data / "shards" / "train-{0..3}.tar")
    if not (out / "sd-emb" / "train-3.safetensors").exists():
        run("-m", "training.precompute_sd_embeddings", "--sd", str(model / "sd"), "--data", shards, "--out", str(out / "sd-emb"),
            "--text-key", "sd.txt")
    config = gill_config(out)
    if not (out / "gill-run" / "final" / "gill.safetensors").exists():
        run("-m", "training.train", "--model", str(config), "--recipe", "tiny", "--data", shards,
            "--sd-embeddings", str(out / "sd-emb"), "--out", str(out / "gill-run"), "--steps", str(plan.gill_steps),
            "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "50", "--decay-every", str(plan.gill_steps * 3 // 4),
            "--save-every", str(plan.gill_steps), "--seed", str(seed), "--no-progress", "--no-tensorboard",
            "--shuffle-buffer", "256", "--max-len", "64", "--run-settings", json.dumps(TOY_RUN),
            "--training-data", "the toy world (gill/toy/world.py): synthetic captioned shapes and 5-step stories, "
            "built by scripts/build_toy_world.py")
    # the model directory: trained weights beside the backbones it names by relative path
    for name in ("config.json", "gill.safetensors"):
        (model / name).write_bytes((out / "gill-run" / "final" / name).read_bytes())
    if not (model / "index" / "manifest.json").exists():  # the corpus travels inside the index directory
        shutil.copytree(data / "corpus", model / "index" / "images", dirs_exist_ok=True)
        run("-m", "index.build", "--model", str(model), "--source", str(model / "index" / "images"),
            "--out", str(model / "index"), "--no-progress")
    n = sum(1 for _ in open(data / "decisions.tsv")) - 1
    run("-m", "training.train_decision", "--model", str(model), "--annotations", str(data / "decisions.tsv"),
        "--train-size", str(int(n * 0.7)), "--steps", "2000", "--lr", "1e-2", "--index", str(model / "index"))


def stage_eval(out: Path, plan: Plan, seed: int) -> None:
    data = out / "data"
    run("-m", "gill.eval", "vist", "--model", str(out / "model"), "--annotations", str(data / "test-sis.json"),
        "--images", str(data / "test-images"), "--out", str(out / "eval"), "--seed", str(seed),
        "--protocol", "clean")  # the model's run settings; the toy's own protocol (its pictures are not VIST's)


# ---- 7. the report ------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_text_features(clip, tokenizer, captions: list[str]) -> torch.Tensor:
    """The toy CLIP's text side as trained: masked mean of the text states, then the projection."""
    tok = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    hidden = clip.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    m = tok.attention_mask[..., None].float()
    return F.normalize(clip.text_projection((hidden * m).sum(1) / m.sum(1)), dim=-1)


class AttributeJudge:
    """What a generated picture shows, read two ways: the nearest clean rendering of any scene (pixel
    distance: the world's own ground truth) and the metric CLIP's best-matching caption (zero-shot)."""

    def __init__(self, out: Path):
        from transformers import AutoTokenizer, CLIPModel

        self.scenes = world.all_scenes()
        self.clip = CLIPModel.from_pretrained(out / "metric-clip").eval()
        tokenizer = AutoTokenizer.from_pretrained(out / "model" / "lm")
        self.text = clip_text_features(self.clip, tokenizer, [s.caption() for s in self.scenes])

    @torch.no_grad()
    def __call__(self, images) -> dict[str, list[world.Scene]]:
        x = torch.stack([to_tensor(im.convert("RGB").resize((world.IMAGE_SIZE,) * 2)) for im in images])
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        feats = self.clip.get_image_features(pixel_values=(x - mean) / std)
        img = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)  # transformers 5 returns an output object
        zero_shot = (img @ self.text.T).argmax(-1)
        # colour from the foreground's pixels, the rest from the nearest clean rendering
        render = [replace(s, color=world.dominant_colour(im)) for s, im in zip(world.nearest_scenes(images, self.scenes), images)]
        return {"render": render, "metric_clip": [self.scenes[i] for i in zero_shot]}


def attribute_accuracy(judged: list[world.Scene], targets: list[world.Scene]) -> dict[str, float]:
    n = max(len(targets), 1)
    return {"colour": sum(j.color == t.color for j, t in zip(judged, targets)) / n,
            "shape": sum(j.shape == t.shape for j, t in zip(judged, targets)) / n,
            "colour_and_shape": sum(j.composition == t.composition for j, t in zip(judged, targets)) / n,
            "position": sum(j.position == t.position for j, t in zip(judged, targets)) / n}


@torch.no_grad()
def decision_on_stories(gill, stories: list[list[str]], labels: list[str]) -> dict[str, float]:
    """The decision head on the test stories (as one text each): 'ret' where the corpus holds the final
    scene (a training composition), 'gen' otherwise."""
    from gill.decision import decision_probs

    slots = gill.image_slot_embeddings([[" ".join(s)] for s in stories])
    max_score = None
    if gill.model.config.decision.use_ret_score:
        scale = gill.model.adapter.logit_scale.exp().item()
        hits = gill.retriever.search(slots.retrieval, k=1, scale=scale)
        max_score = torch.tensor([h[0].score if h else 0.0 for h in hits])
    probs = decision_probs(gill.decision, gill.model.decision_features(slots.hidden, max_score))
    chosen = ["ret" if p_ret > 0.5 else "gen" for _, p_ret in probs.tolist()]
    majority = max(labels.count("ret"), labels.count("gen")) / len(labels)
    recall = [sum(c == y for c, y in zip(chosen, labels) if y == k) / max(labels.count(k), 1) for k in ("ret", "gen")]
    return {"accuracy": sum(c == y for c, y in zip(chosen, labels)) / len(labels), "majority_baseline": majority,
            "balanced_accuracy": sum(recall) / 2, "recall_ret": recall[0], "recall_gen": recall[1],
            "n": len(labels), "chose_retrieve": chosen.count("ret") / len(labels)}


@torch.no_grad()
def single_captions(gill, judge: AttributeJudge, train_comp: set) -> dict:
    """GILL on single captions (every 3rd scene: 72, some of unseen compositions): what it draws (colour
    and shape by the renderings) and, for corpus scenes, whether it retrieves the exact picture."""
    from gill.diffusion import DiffusionOptions

    scenes = world.all_scenes()[::3]
    slots = gill.image_slot_embeddings([[s.caption()] for s in scenes])
    run = gill.run_settings()
    options = DiffusionOptions(steps=run.steps, guidance_scale=run.guidance_scale)
    images = gill.diffusion.generate(slots.generation, options, seeds=list(range(len(scenes))))
    drawn = attribute_accuracy(judge(images)["render"], scenes)
    hits = gill.retriever.search(slots.retrieval, k=5)
    corpus = [i for i, s in enumerate(scenes) if s.composition in train_comp]
    r1 = sum(hits[i][0].record.caption == scenes[i].caption() for i in corpus) / len(corpus)
    r5 = sum(scenes[i].caption() in [h.record.caption for h in hits[i]] for i in corpus) / len(corpus)
    return {"n": len(scenes), "generation": drawn, "retrieval_exact": {"R@1": r1, "R@5": r5, "n": len(corpus),
            "chance_R@1": 1 / len(gill.retriever)}}


def stage_report(out: Path, plan: Plan, seed: int) -> None:
    """OUT/report: report.json, report.md and grid.png from the eval outputs."""
    from PIL import Image

    from gill.pipeline import GILL

    data, ev = out / "data", out / "eval"
    summary = json.loads((ev / "summary.json").read_text())
    scenes = {p: world.Scene(**d) for p, d in json.loads((data / "test-scenes.json").read_text()).items()}
    train_comp = {tuple(x) for x in json.loads((data / "split.json").read_text())["train"]}
    judge = AttributeJudge(out)
    report: dict = {"generation": {}, "retrieval": {}, "decision": {}}
    if (out / "lm-check.json").is_file():
        report["lm"] = json.loads((out / "lm-check.json").read_text())
    records = {}
    for name, entry in summary["settings"].items():
        recs = [json.loads(line) for line in (ev / name / "records.jsonl").read_text().splitlines() if line.strip()]
        records[name] = recs
        targets = [scenes[r["target_id"]] for r in recs]
        judged = judge([Image.open(ev / name / r["image"]) for r in recs])
        unseen = [i for i, t in enumerate(targets) if t.composition not in train_comp]
        report["generation"][name] = {
            "clip_similarity": entry["clip_similarity"], "clip_similarity_ci95": entry["clip_similarity_ci95"],
            "n": entry["n"], **{f"by_{how}": attribute_accuracy(j, targets) for how, j in judged.items()},
            "by_render_unseen_compositions": attribute_accuracy([judged["render"][i] for i in unseen],
                                                                [targets[i] for i in unseen]) | {"n": len(unseen)},
        }
    report["generation"]["chance"] = {"colour": 1 / len(world.COLORS), "shape": 1 / len(world.SHAPES),
                                      "colour_and_shape": 1 / (len(world.COLORS) * len(world.SHAPES)),
                                      "position": 1 / len(world.POSITIONS)}
    gallery = summary["retrieval"]["gallery_size"]
    for name, entry in summary["retrieval"].items():
        if isinstance(entry, dict):
            report["retrieval"][name] = entry["context_masked"]
    report["retrieval"]["chance"] = {f"R@{k}": k / gallery for k in (1, 5, 10)}
    report["retrieval"]["gallery_size"] = gallery

    gill = GILL.from_pretrained(out / "model")
    ann = json.loads((data / "test-sis.json").read_text())["annotations"]
    by_story: dict[str, list] = {}
    for (a,) in ann:
        by_story.setdefault(a["story_id"], []).append(a)
    texts, labels = [], []
    for steps in by_story.values():
        steps.sort(key=lambda a: a["worker_arranged_photo_order"])
        texts.append([a["original_text"] for a in steps])
        labels.append("ret" if scenes[steps[-1]["photo_flickr_id"]].composition in train_comp else "gen")
    report["decision"]["test_stories"] = decision_on_stories(gill, texts, labels)
    report["captions"] = single_captions(gill, judge, train_comp)
    held_out = out / "model" / "decision_metrics.json"
    if held_out.is_file():
        report["decision"]["held_out_prompts"] = json.loads(held_out.read_text())

    folder = out / "report"
    folder.mkdir(exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(report_markdown(report))
    grid(gill, ev, by_story, records, folder / "grid.png")
    log(f"report: {folder / 'report.md'}")
    print((folder / "report.md").read_text())


def report_markdown(r: dict) -> str:
    g, ch = r["generation"], r["generation"]["chance"]
    lines = ["# Toy world: GILL on the VIST-format test stories", "",
             "## Generation", "",
             "| setting | CLIP similarity (metric model) | colour / shape / both right (rendering) | "
             "both right (metric CLIP) | both right, unseen compositions |", "|---|---|---|---|---|"]
    for name, e in g.items():
        if name == "chance":
            continue
        a, m, u = e["by_render"], e["by_metric_clip"], e["by_render_unseen_compositions"]
        lines.append(f"| {name} | {e['clip_similarity']:.3f} ± {e['clip_similarity_ci95']:.3f} | "
                     f"{a['colour']:.2f} / {a['shape']:.2f} / {a['colour_and_shape']:.2f} | {m['colour_and_shape']:.2f} | "
                     f"{u['colour_and_shape']:.2f} (n={u['n']}) |")
    lines.append(f"| chance | | {ch['colour']:.2f} / {ch['shape']:.2f} / {ch['colour_and_shape']:.2f} | "
                 f"{ch['colour_and_shape']:.2f} | |")
    lines += ["", f"## Retrieval (story's last picture among {r['retrieval']['gallery_size']}, context masked)", "",
              "| setting | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for name, e in r["retrieval"].items():
        if isinstance(e, dict):
            lines.append(f"| {name} | {e['R@1']:.2f} | {e['R@5']:.2f} | {e['R@10']:.2f} |")
    d = r["decision"]["test_stories"]
    lines += ["", "## Decision (retrieve when the corpus holds the scene, generate otherwise)", "",
              f"- test stories: accuracy {d['accuracy']:.2f} (majority class {d['majority_baseline']:.2f}, n={d['n']}); "
              f"balanced accuracy {d['balanced_accuracy']:.2f} (chance 0.50; recall ret {d['recall_ret']:.2f}, "
              f"gen {d['recall_gen']:.2f})"]
    if "held_out_prompts" in r["decision"]:
        h = r["decision"]["held_out_prompts"]
        lines.append(f"- held-out prompts (captions and stories, n={h['test_examples']}): macro-F1 {h['test_macro_f1']:.2f} "
                     f"(majority class {h['test_majority_macro_f1']:.2f})")
    c = r["captions"]
    lines += ["", f"## Single captions ({c['n']} scenes, some of unseen compositions)", "",
              f"- drawn: colour {c['generation']['colour']:.2f}, shape {c['generation']['shape']:.2f}, both "
              f"{c['generation']['colour_and_shape']:.2f}, position {c['generation']['position']:.2f}",
              f"- retrieved, exact picture among {round(1 / c['retrieval_exact']['chance_R@1'])}: R@1 "
              f"{c['retrieval_exact']['R@1']:.2f}, R@5 {c['retrieval_exact']['R@5']:.2f} (n={c['retrieval_exact']['n']})"]
    lines += ["", "![grid](grid.png)", "",
              "Grid: the 5 story pictures, then SD on the last caption, GILL on the last caption, on 5 captions, "
              "on 5 captions + 4 pictures, and GILL's retrieved picture (5 captions).", ""]
    return "\n".join(lines)


def grid(gill, ev: Path, by_story: dict, records: dict, path: Path, rows: int = 10, scale: int = 3) -> None:
    from PIL import Image

    order = ["sd/1-caption", "gill/1-caption", "gill/5-captions", "gill/5-captions-4-images"]
    lookup = {name: {r["id"]: r for r in recs} for name, recs in records.items()}
    cell = world.IMAGE_SIZE * scale
    ids = list(by_story)[:rows]
    canvas = Image.new("RGB", (cell * (5 + len(order) + 1) + 2 * scale * 2, cell * len(ids)), (0, 0, 0))
    scale_ret = gill.model.adapter.logit_scale.exp().item()
    context_dir = Path(json.loads((ev / "run.json").read_text())["context_dir"])
    for row, sid in enumerate(ids):
        images = [Image.open(context_dir / f"{a['photo_flickr_id']}.png") for a in by_story[sid]]
        example = lookup.get("gill/5-captions", {}).get(sid)
        for name in order:
            r = lookup.get(name, {}).get(sid)
            images.append(Image.open(ev / name / r["image"]) if r else Image.new("RGB", (32, 32)))
        if example and gill.retriever is not None:
            hit = gill.retriever.search(torch.tensor([example["retrieval_embedding"]]), k=1, scale=scale_ret)[0]
            images.append(gill.retriever.load_image(hit[0].record) if hit else Image.new("RGB", (32, 32)))
        x = 0
        for col, im in enumerate(images):
            if col in (5, 5 + len(order)):
                x += 2 * scale  # a gap between the story, the generations and the retrieval
            canvas.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, row * cell))
            x += cell
    canvas.save(path)


def install(out: Path, plan: Plan, seed: int) -> None:
    """Copy the built model (with its corpus) and the metric model into the package (gill/assets), where
    the ``toy`` preset and the evals' default scorer find them. Each directory is replaced atomically."""
    assets = ROOT / "gill" / "assets"
    skip = shutil.ignore_patterns("gill-config.json", "work", "*.tmp")
    for src, name in ((out / "model", "toy"), (out / "metric-clip", "toy-metric-clip")):
        tmp = assets / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=skip)
        if name == "toy":
            if (out / "report").is_dir():
                shutil.copytree(out / "report", tmp / "report")
            config = json.loads((tmp / "config.json").read_text())
            config["run"]["scorer"] = INSTALLED_SCORER
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            manifest = tmp / "index" / "manifest.json"  # provenance: the preset, not the build's scratch path
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model": "toy"}, indent=2) + "\n")
            (tmp / "BUILD.json").write_text(json.dumps({
                "command": f"python scripts/build_toy_world.py --out OUT --seed {seed} --install",
                "seed": seed, "plan": plan.__dict__,
                "report": json.loads((out / "report" / "report.json").read_text()) if (out / "report" / "report.json").is_file() else None,
            }, indent=2) + "\n")
        old = assets / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (assets / name).exists():
            (assets / name).rename(old)
        tmp.rename(assets / name)
        shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    log(f"installed into {assets} ({size / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="the reduced build (minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=["data", "lm", "clip", "sd", "gill", "eval", "report"])
    p.add_argument("--install", action="store_true",
                   help="afterwards copy the model and the metric model into gill/assets (the toy preset)")
    p.add_argument("--gill-steps", type=int, default=None, help="override the plan's GILL training steps")
    args = p.parse_args(argv)
    out = Path(args.out)
    plan = SMALL if args.small else Plan()
    if args.gill_steps is not None:
        plan.gill_steps = args.gill_steps
    stages = {"data": stage_data, "lm": stage_lm, "clip": stage_clip, "sd": stage_sd, "gill": stage_gill, "eval": stage_eval,
              "report": stage_report}
    start = time.time()
    for name in args.stages:
        t = time.time()
        stages[name](out, plan, args.seed)
        log(f"stage {name} done in {time.time() - t:.0f} s")
    log(f"build done in {time.time() - start:.0f} s")
    if args.install:
        install(out, plan, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
