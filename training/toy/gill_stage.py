"""Stage 5, GILL on the toy backbones, through the project's own recipes: the diffusion targets
(training.precompute_sd_embeddings), GILL (training.train, on single captions, chats and interleaved
stories), the retrieval index (index.build) and the decision head (training.train_decision)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from training.toy import world
from training.toy.plan import GILL_THREADS, TEXT_LEN, VISUAL_TOKENS, Plan, run, run_settings


def gill_config(out: Path) -> Path:
    from gill.config import GILLConfig, MapperConfig, PreprocessConfig

    cfg = GILLConfig(
        lm="lm", vision="vision", diffusion="sd", lm_hidden_size=96, vision_hidden_size=64, n_visual_tokens=VISUAL_TOKENS,
        ret_emb_dim=64, gen_seq_len=TEXT_LEN, gen_emb_dim=64,
        # dropout 0.3 in the mapper (the original's is 0): without it the mapper learnt the corpus's
        # compositions by heart and drew unseen ones right from single captions in 0.44, though its input
        # (the [IMG] states) tells their colour and shape to a linear probe trained on seen ones alone
        mapper=MapperConfig(hidden_dim=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=256,
                            dropout=0.3),
        preprocess=PreprocessConfig(image_size=world.IMAGE_SIZE), tie_img_embeddings=False,
    )
    path = out / "model" / "gill-config.json"
    cfg.to_json(path)
    return path


def _train(model: Path, run_dir: Path, steps: int, shards: str, out: Path, seed: int, max_len: int) -> list[str]:
    """training.train with the toy's schedule (AdamW 2e-3, warmup 50, x0.1 at 3/4 of the steps, batch 32) and
    its [IMG] rows left free; the caller adds what its run trains."""
    return ["-m", "training.train", "--model", str(model), "--recipe", "tiny", "--data", shards,
            "--sd-embeddings", str(out / "sd-emb"), "--out", str(run_dir), "--steps", str(steps),
            "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "50", "--decay-every", str(steps * 3 // 4),
            "--save-every", str(steps), "--seed", str(seed), "--no-progress", "--no-tensorboard",
            "--shuffle-buffer", "256", "--max-len", str(max_len), "--renorm-img-embeddings", "false", "--renorm-img-output", "false"]


def stage_gill(out: Path, plan: Plan, seed: int) -> None:
    model, data = out / "model", out / "data"
    if (model / "decision.safetensors").exists():
        return
    shards = str(data / "shards" / "train-{0..3}.tar")
    if not (out / "sd-emb" / "train-3.safetensors").exists():
        # the diffusion model's text encoder: from the clip stage (the diffusion model may still be training)
        encoder = out / "sd-text" if (out / "sd-text" / "text_encoder").is_dir() else model / "sd"
        run("-m", "training.precompute_sd_embeddings", "--sd", str(encoder), "--data", shards, "--out", str(out / "sd-emb"),
            "--text-key", "sd.txt", threads=GILL_THREADS)
    config = gill_config(out)
    if not (out / "gill-run" / "final" / "gill.safetensors").exists():
        # [IMG] output rows of their own, not rescaled: the toy LM is sure of its next token (the end of an
        # answer predicts its next word at logit ~13.6 from a state of norm 12.6), which a row of the LM rows'
        # mean norm (0.70) cannot outscore (at most ~8.8), so [IMG0] could never follow a chat answer. Free
        # output rows let it (logit ~18 there).
        # The input rows are not rescaled either (the original keeps them at the LM rows' mean norm): held
        # there, [IMG0]'s row cannot steer the small LM's state, whose gradient asks for a longer row, and
        # the retrieval head read whatever the LM's seed happened to leave at the "." (an LM of the same text
        # and another seed: exact retrieval 0.43, story retrieval 0.10); free, [IMG0]'s state holds the
        # scene after captions, chats and stories alike (see the README's toy section for the figures).
        run(*_train(config, out / "gill-run", plan.gill_steps, shards, out, seed, plan.gill_len),
            # [IMG0] starts as a second full stop: the LM's state at a "." already gathers the scene
            "--img-init", ".",
            # extra retrieval negatives: a batch of 32 rarely holds two scenes that differ in one attribute
            # (v2.1 also weighted the retrieval loss 4x with a queue of 2048, for an LM that kept little of
            # the background at the "."; with one that keeps it, that cost story retrieval: 0.17 vs 0.27);
            # see the README's toy section for the build's figures
            "--contrastive-queue", "512", "--weight-contrastive", "1", "--run-settings", json.dumps(run_settings(plan)),
            "--training-data", "the toy world (training/toy/world.py): synthetic captioned shapes, chats and 5-step "
            "stories (interleaved with their pictures), built by python -m training.toy", threads=GILL_THREADS)
    # the model directory: trained weights beside the backbones it names by relative path
    trained = out / "mapper-run" / "final" if plan.mapper_steps else out / "gill-run" / "final"
    if not (trained / "gill.safetensors").exists():
        for name in ("config.json", "gill.safetensors"):
            (model / name).write_bytes((out / "gill-run" / "final" / name).read_bytes())
        # Then the mapper alone, started afresh, on the trained model's final [IMG] states (everything else
        # frozen, the same data and schedule's shape). Trained with the rest, the mapper chased states that
        # kept moving and learnt the corpus's compositions by heart: refitted on the final ones it draws the
        # compositions GILL never trained on somewhat better (all 48 unseen scenes from single captions, GILL
        # seeds 0 / 1 / 2: 0.58 / 0.67 / 0.69 -> 0.67 / 0.77 / 0.71), story ends and chats mixed; the
        # README's toy section has the figures.
        run(*_train(model, out / "mapper-run", plan.mapper_steps, shards, out, seed, plan.gill_len),
            "--train-only", "mapper", "--reinit", "mapper", threads=GILL_THREADS)
    for name in ("config.json", "gill.safetensors"):
        (model / name).write_bytes((trained / name).read_bytes())
    write_chat_card(model / "config.json")
    if not (model / "index" / "manifest.json").exists():  # the corpus travels inside the index directory
        shutil.copytree(data / "corpus", model / "index" / "images", dirs_exist_ok=True)
        run("-m", "index.build", "--model", str(model), "--source", str(model / "index" / "images"),
            "--out", str(model / "index"), "--no-progress", threads=GILL_THREADS)
    n = sum(1 for _ in open(data / "decisions.tsv")) - 1
    run("-m", "training.train_decision", "--model", str(model), "--annotations", str(data / "decisions.tsv"),
        "--train-size", str(int(n * 0.7)), "--steps", "2000", "--lr", "1e-2", "--index", str(model / "index"),
        "--standardize", "--balance-classes", "--seed", str(seed), threads=GILL_THREADS)


def chat_card():
    """What the toy model tells a chat about itself (its config's ``chat`` block, which the app shows): the
    world's words and the turns it answers, as its report's free chats measure them."""
    from gill.config import ChatCard

    hint = (f"**The toy world** knows only coloured shapes: colours {', '.join(world.COLORS)}; shapes "
            f"{', '.join(world.SHAPES)}; sizes {', '.join(world.SIZES)}; positions {', '.join(world.POSITIONS)}; "
            f"backgrounds {', '.join(world.BACKGROUNDS)}. Describe a scene (“a large red circle on the left on "
            "white.”), change it (“it moves to the right.”, “it turns blue.”, “it grows.”), "
            "ask “what colour is it?” or “what shape is it?”. It reads a picture you attach to a chat's first "
            "message (“what is this?”), hardly ever one attached later. How often it is right, turn by turn: its "
            "report's “Free chats”.")
    examples = ["a large red circle on the left on white.", "a small blue square on the right on gray.",
                "it turns yellow.", "a large green triangle in the middle on white."]
    return ChatCard(hint=hint, examples=examples)


def write_chat_card(path: Path) -> None:
    """Put ``chat_card`` into the model's config.json."""
    from gill.config import GILLConfig

    cfg = GILLConfig.from_json(path)
    cfg.chat = chat_card()
    cfg.to_json(path)


def stage_eval(out: Path, plan: Plan, seed: int) -> None:
    data = out / "data"
    # two processes on two cores (torchrun; the same numbers as one process: test_eval_protocol): the eval
    # runs alone, and these models are too small for a second thread to speed one process up much
    procs = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if (os.cpu_count() or 1) >= 2 else []
    run(*procs, "-m", "gill.eval", "vist", "--model", str(out / "model"), "--annotations", str(data / "test-sis.json"),
        "--images", str(data / "test-images"), "--out", str(out / "eval"), "--seed", str(seed),
        "--protocol", "clean")  # the model's run settings; the toy's own protocol (its pictures are not VIST's)
