"""Training recipes: the original GILL's hyperparameters, and a tiny one for tests and smoke runs."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from gill.arguments import float_in, int_in, seed_arg
from gill.losses import LossWeights


@dataclass
class TrainConfig:
    steps: int = 20_000
    batch_size: int = 200  # global, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 2000  # linear from 0
    decay_every: int = 10_000  # then x decay_gamma every decay_every steps (the original: once, at 12k)
    decay_gamma: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 10  # steps in a row with a non-finite loss or gradient (each skipped) before the run stops
    max_len: int = 32  # caption tokens incl. BOS and the [IMG] tokens
    concat_prob: float = 0.5  # the original's concat-captions trick (pairs of examples in one sequence)
    renorm_img_embeddings: bool = True  # rescale [IMG] rows to the LM rows' mean norm after each step
    # With untied [IMG] output rows (config.tie_img_embeddings false): rescale them too (false: only the
    # input rows, so the LM reads [IMG] inputs at its own scale while [IMG0]'s logit may grow as sure as
    # the LM's own next tokens)
    renorm_img_output: bool = True
    # Start [IMG i]'s input row from the LM's input embedding of this text's token i (its first tokens only;
    # the other rows keep their random start). "": all random, as the original. E.g. "." starts [IMG0] as a
    # second full stop, a place where the LM already gathers what the sentences before it said.
    img_init: str = ""
    # Extra text -> image negatives: the frozen vision features of the last N training images (0: in-batch
    # negatives only, as the original); queued near-duplicates of a text's own image (cosine >= the bound)
    # are left out
    contrastive_queue: int = 0
    queue_duplicate_cos: float = 0.98
    # Gaussian noise on the mapper's input in training, as a fraction of that input's standard deviation
    # (over the batch; 0: none, as the original). A regulariser for small data: the mapper then cannot key
    # its output on small differences between [IMG] states, which is how it learns the training captions'
    # compositions by heart (what it did in the toy world: the README's toy section)
    mapper_input_noise: float = 0.0
    # Train only these parts of GILL's adapter (comma-separated: mapper, visual_prefix, image_retrieval,
    # text_retrieval, img_embeddings, img_output_embeddings, logit_scale); "": all of them (the original).
    # With --model a trained model directory, "mapper" refits the mapper on that model's final [IMG] states.
    train_only: str = ""
    # Start these parts afresh (same names; drawn with --seed) instead of from --model's weights
    reinit: str = ""
    precision: str = "bf16"  # "bf16": autocast with fp32 master weights; "fp32"
    backbone_dtype: str = "bf16"  # dtype the frozen LM and vision encoder are loaded in
    val_every: int = 2000
    val_batches: int = 0  # 0: the whole validation set
    log_every: int = 50
    save_every: int = 2000
    keep_last: int = 2
    seed: int = 0
    num_workers: int = 4
    shuffle_buffer: int = 1000
    weights: LossWeights = field(default_factory=LossWeights)


RECIPES = {
    "gill-opt-6.7b": TrainConfig(),
    "tiny": TrainConfig(
        steps=60, batch_size=8, lr=3e-3, warmup_steps=5, decay_every=40, val_every=20, log_every=5,
        save_every=20, precision="fp32", backbone_dtype="fp32", num_workers=0, shuffle_buffer=16,
    ),
}


# Allowed ranges, checked when the flag is parsed (gill.arguments: argparse names the flag).
_RANGES = {
    "steps": int_in(1), "batch_size": int_in(1), "grad_accum": int_in(1), "lr": float_in(0, above=True),
    "beta1": float_in(0, 1), "beta2": float_in(0, 1), "eps": float_in(0, above=True), "weight_decay": float_in(0),
    "warmup_steps": int_in(0), "decay_every": int_in(1), "decay_gamma": float_in(0, above=True),
    "grad_clip": float_in(0, above=True), "max_bad_steps": int_in(1), "max_len": int_in(2),
    "concat_prob": float_in(0, 1), "val_every": int_in(1), "val_batches": int_in(0), "log_every": int_in(1),
    "save_every": int_in(1), "keep_last": int_in(1), "seed": seed_arg(), "num_workers": int_in(0),
    "shuffle_buffer": int_in(0), "contrastive_queue": int_in(0), "queue_duplicate_cos": float_in(-1, 1),
    "mapper_input_noise": float_in(0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per scalar field, overriding the recipe, and ``--weight-NAME`` per loss weight
    (``LossWeights``: caption, retrieval-ce, contrastive, generation-ce, mapper); numbers are range-checked
    when parsed."""
    for f in dataclasses.fields(LossWeights):
        parser.add_argument("--weight-" + f.name.replace("_", "-"), dest="weight_" + f.name, type=float_in(0),
                            default=None, metavar="W", help=f"weight of the {f.name} loss (the original's: {f.default})")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "weights":
            continue
        kind = {"int": int, "float": float, "str": str, "bool": None}[f.type if isinstance(f.type, str) else f.type.__name__]
        name = "--" + f.name.replace("_", "-")
        if kind is None:
            parser.add_argument(name, type=lambda v: v.lower() in ("1", "true", "yes"), default=None, metavar="BOOL")
        elif kind is str:
            parser.add_argument(name, type=str, default=None)
        else:
            parser.add_argument(name, type=_RANGES.get(f.name, int_in() if kind is int else float_in()), default=None)


def from_args(recipe: str, args: argparse.Namespace) -> TrainConfig:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    cfg = dataclasses.replace(RECIPES[recipe])
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    weights = {f.name: getattr(args, "weight_" + f.name, None) for f in dataclasses.fields(LossWeights)}
    cfg.weights = dataclasses.replace(cfg.weights, **{k: v for k, v in weights.items() if v is not None})
    return cfg


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The original schedule: linear warmup from 0, then step decay (counted from the end of warmup)."""
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    return cfg.decay_gamma ** ((step - cfg.warmup_steps) // cfg.decay_every)
