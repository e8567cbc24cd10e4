"""What one training run holds while it runs (``Run``, built by ``training.prepare``), and the error that
stops it. The stages of ``training.train`` (step, validate, save, resume) read and update a ``Run``, so a
test or another loop can drive any of them."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class TrainingError(RuntimeError):
    """A run that cannot go on (too many bad steps in a row, no usable checkpoint to resume)."""


@dataclass
class Run:
    """Everything ``setup`` builds; ``train_step``, ``validate_and_keep_best`` and ``save`` drive it, so a
    test (or another loop) can run any part."""

    args: argparse.Namespace
    cfg: Any
    device: torch.device
    world: int
    rank: int
    per_rank: int
    out: Path
    model: Any
    tokenizer: Any
    processor: Any
    step_module: Any
    ddp: Any
    trainable: list
    optimizer: Any
    scheduler: Any
    emb_norm: float | None  # what the [IMG] input rows are rescaled to after each step; None: left as trained
    out_norm: float | None  # what untied [IMG] output rows are rescaled to; None: left as trained
    concat_rng: torch.Generator
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "position": 0, "best": -1.0, "skipped": {},
                                                 "bad_steps": 0, "history": []})
    skipped: Counter = field(default_factory=Counter)
    bad_in_a_row: int = 0
    writer: Any = None


def settings_record(run: Run) -> dict:
    """What a resumed run compares against: the recipe's values and the data it reads."""
    import dataclasses

    cfg = dataclasses.asdict(run.cfg)
    return {**cfg, "model": run.args.model, "data": run.args.data, "sd_embeddings": run.args.sd_embeddings,
            "world_size": run.world}
