"""How big the toy build is, and the shared helpers of its stages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# GILL's stage on two threads wherever it runs (alone, or beside the diffusion model in a build from scratch,
# where the side-by-side runner gives each stage one): float sums then come out the same, so `--backbones toy`
# and a whole build train the same GILL, byte for byte (until v2.8 the whole build's GILL, on one thread, was
# another). Two, not one: alone, the reduced build's GILL stage took 220 s on two threads (passive waits, see
# run) against 272 s on one, the full one 293 s (spinning) against ~490 s; in a build from scratch they share
# the cores with the diffusion model's one thread (GILL 452 s, the whole build 865 s; v2.8, GILL on one: 859 s).
GILL_THREADS = 2
INSTALLED_SCORER = "hf:../toy-metric-clip"  # where install puts the metric model, beside gill/assets/toy
TEXT_LEN = 16  # the CLIP-style text encoders' positions (captions are at most 15 tokens: one pad pools)
# The toy LM's positions: its model has LM_POSITIONS, it is trained on documents of up to LM_LEN (chats of up
# to CHAT_TURNS turns: ~300 tokens at 12). Until v2.9: 256 / 160 / chats of up to 5 turns, and free chats fell
# apart from turn 6.
LM_POSITIONS = 512
LM_LEN = 448
CHAT_TURNS = 12
VISUAL_TOKENS = 4  # GILL's visual prefix per picture (2 until v2.9, when attached pictures were not read)
# GILL's training sequences in the full build (Plan.gill_len: training.train --max-len; a chat's oldest whole
# turns dropped to fit), and so the model's context_length, which the library and the app keep a chat inside: [IMG] tokens and visual prefixes
# were never trained further in. v3.0 at the LM's 448 instead: 40 random 12-turn chats without attached
# pictures right at turns 1-10 in 0.93-1.00, then 0.47 and 0.15; at 256: 0.95-1.00 at every turn, 36 of the
# 40 chats right throughout (the app drops the oldest whole turns, which the current object outlives).
GILL_LEN = 256

# How the toy model is best run, saved in its config.json (run settings): its tiny diffusion model draws
# colour and shape right from its own captions best at guidance 4.0 (0.97 of 40 seen compositions'
# captions, 0.88 of 16 unseen ones; 0.85 / 0.94 at 2.0, 0.75 / 0.62 at SD's usual 7.5; v2.3's diffusion
# model, which knew only the corpus's compositions, was best at 2.0), and it is scored by the world's own
# metric model (beside the model). Image factor 1.1 (the original's ret_scale_factor: [IMG0]'s logit x 1.1;
# its demo's default is 1.3): at 1.0, after a chat answer that moves its object, [IMG0] lost to the LM's
# own word for a picture's place, " (picture)", by ~1% of its logit in v2.8, v2.9 and two of three reduced
# builds; 1.1 shows those pictures and left every other row of the report as it was, 1.2 already cost the
# story-following row, 1.4 cut a chat answer short (README's toy section, the figures). Its context is the
# positions GILL was trained on (GILL_LEN): the library and the app keep prompt and answer inside them.
TOY_RUN = {"steps": 25, "guidance_scale": 4.0, "img_scale_factor": 1.1, "scorer": "hf:../metric-clip",
           "context_length": GILL_LEN}


def run_settings(plan: Plan) -> dict:
    """The run settings a build of ``plan`` writes: TOY_RUN, its context the positions GILL trained on."""
    return {**TOY_RUN, "context_length": plan.gill_len}


@dataclass
class Plan:
    lm_steps: int = 2000  # (3000 until v2.2: its loss was flat after 2000; the time went to GILL's steps)
    clip_steps: int = 1200
    vae_steps: int = 1000
    unet_steps: int = 4200  # (3500 until v2.3, on the corpus's compositions only: 504 pictures, now 648)
    gill_len: int = GILL_LEN  # GILL's training sequences, and the built model's context_length (run_settings)
    gill_steps: int = 1700  # (1600 in v2.1, 2000 in v2.2, 1800 in v2.3-v2.4: the same report, 40 s more)
    # then the mapper alone, afresh, on the trained model's final [IMG] states (gill_stage; `--mapper-steps`;
    # 0: not refitted, as shipped: it draws unseen compositions better but costs minutes; README toy section)
    mapper_steps: int = 0
    train_images_per_scene: int = 8  # single-caption samples per scene (half as the app's chat turns)
    # v2.3: twice v2.2's stories and chats (with 2/3 of its single captions): GILL fitted only 0.30 of its
    # own training stories' ends (story retrieval 0.25 on the test stories) and took a chat's colour from
    # an earlier turn
    train_stories: int = 1600
    train_chats: int = 1600
    attach_chats: int = 800  # more chats, each beginning with an attached picture (training.toy.data)
    test_stories: int = 60
    val_stories: int = 30
    decision_stories: int = 300


# The reduced build (CI's slow test) trains GILL on sequences of 128, chats of about 3 turns: at 256 its GILL
# stage took 24 min beside another build (1000 steps), at 128 about a quarter of that
SMALL = Plan(gill_len=128, lm_steps=1500, clip_steps=400, vae_steps=300, unet_steps=800, gill_steps=1000, train_images_per_scene=4,
             train_stories=800, train_chats=800, attach_chats=400, test_stories=24, val_stories=12, decision_stories=200)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*cmd: str, threads: int | None = None) -> None:
    """A recipe as its own process (``python -m ...``), from the checkout's root; ``threads``: its intra-op
    threads (OMP/MKL), else what this process has. Pinned threads wait passively (``OMP_WAIT_POLICY``): more
    threads than free cores, spinning, slowed a reduced build's GILL from 182 s to over 19 minutes beside
    another; passive, 282-297 s beside another and 220 s alone (the same weights)."""
    log(" ".join(cmd))
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                                        "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, env=env)


def schedule(optimizer, warmup: int, steps: int, floor: float = 0.05):
    """Linear warmup, then cosine decay to ``floor`` of the peak (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, steps, min_lr_rate=floor)
