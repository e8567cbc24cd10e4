"""Train GILL: captioning, retrieval and generation over frozen backbones.

    python -m training.train --model gill-opt-6.7b --data 'cc3m/{00000..00331}.tar' --sd-embeddings cc3m-sd \\
        --val-data 'cc3m-val/{00000..00001}.tar' --val-sd-embeddings cc3m-val-sd --out runs/gill --device cuda
    torchrun --nproc_per_node 2 -m training.train ...        # data parallel (nccl on GPU, gloo on CPU)
    python -m training.train ... --resume                      # continue from the last checkpoint

``--model``: ``gill-opt-6.7b`` (OPT-6.7B + CLIP ViT-L/14, fresh trained layers), ``tiny-random``, a model
directory (continue from its weights), or a GILLConfig JSON naming other backbones. ``--recipe``
(``gill-opt-6.7b``: the original's hyperparameters; ``tiny``) sets the defaults every other flag overrides.

Checkpoints (``OUT/checkpoints/step-NNNNNNN``) are model directories plus ``trainer_state.pt`` (optimizer,
scheduler, RNG, data position), written atomically; the last ``--keep-last`` are kept, and ``OUT/best`` is
the checkpoint with the best validation text-to-image recall@1 (the original's criterion).
"""
# (The docstring above is the command's --help.) The stages, each a function a test or another loop can drive
# (torchtune-style): ``setup`` (``training.prepare``) builds a ``Run``; ``train_step`` takes one optimizer step;
# ``validate_and_keep_best`` (``training.validation``) and ``save`` (``training.checkpoints``) run every
# ``--val-every`` / ``--save-every`` steps; ``train_loop`` and ``main`` put them together.

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections import Counter
from typing import Any

import torch

# The stages' modules; their public names are importable from here too.
from training.checkpoints import (  # noqa: F401
    TEMPORARY_PATTERNS,
    OtherModel,
    checkpoints,
    exit_on_sigterm,
    remove_stale_temporaries,
    resume,
    save,
    save_checkpoint,
    verified_checkpoint,
)
from training.prepare import DTYPES, build_model, prepare_run, record_run_settings  # noqa: F401
from training.state import Run, TrainingError, settings_record  # noqa: F401
from training.step import autocast, batch_text
from training.validation import evaluate, validate, validate_and_keep_best  # noqa: F401

LOG = logging.getLogger("training.train")


def parse(argv: list[str] | None):
    from training.config import add_arguments

    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", default="gill-opt-6.7b")
    p.add_argument("--data", required=True, help="training shards (brace pattern; '::' joins several)")
    p.add_argument("--sd-embeddings", required=True, help="folder of precomputed diffusion text embeddings")
    p.add_argument("--val-data", default=None)
    p.add_argument("--val-sd-embeddings", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--cache-states", action="store_true",
                   help="with --train-only mapper: compute each sample's [IMG] states once and fit the mapper on "
                        "them in memory (training/mapper_cache.py; for data whose states fit in memory)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--run-settings", default=None,
                   help="run settings saved with the model (JSON object or file), e.g. '{\"guidance_scale\": 2.0}'; "
                        "fields: steps, guidance_scale, scheduler, img_scale_factor, top_p, temperature, "
                        "max_new_tokens, seed, scorer")
    p.add_argument("--training-data", default=None,
                   help="what the model is trained on, for its model card (default: the --data pattern)")
    add_arguments(p)
    return p.parse_args(argv)


def setup(argv: list[str] | None = None) -> Run:
    """The run for these command-line arguments, ready to step (``training.prepare.prepare_run``)."""
    return prepare_run(parse(argv))


def train_step(run: Run, samples: list) -> dict[str, float] | None:
    """One optimizer step on this rank's part of a global batch. Returns the step's losses, or None when
    the loss or the gradient is not finite: then nothing is updated, the step is counted in
    ``state["bad_steps"]``, and after ``cfg.max_bad_steps`` such steps in a row the run stops."""
    from gill import losses
    from training import distributed as D
    from training.data import LOSS_WEIGHTS
    from training.step import renorm_img_embeddings

    cfg, model = run.cfg, run.model
    vision_dtype = next(model.vision.parameters()).dtype
    mine = samples[run.rank * run.per_rank * cfg.grad_accum:(run.rank + 1) * run.per_rank * cfg.grad_accum]
    concat_cap = bool(torch.rand((), generator=run.concat_rng) < cfg.concat_prob)
    concat_img = bool(torch.rand((), generator=run.concat_rng) < cfg.concat_prob)
    run.optimizer.zero_grad(set_to_none=True)
    queued = run.step_module.queue  # replaced, never changed in place: a skipped step's images are not kept
    logged = Counter()
    for micro in range(cfg.grad_accum):
        part = mine[micro * run.per_rank:(micro + 1) * run.per_rank]
        pixels = torch.stack([s.pixel_values for s in part]).to(run.device, vision_dtype)
        target = torch.stack([s.sd_embedding for s in part]).to(run.device, torch.float32)
        # per-sample loss weights (KEY.loss.json); None when all are 1: the original's losses, bit for bit
        weights = {name: [getattr(s, f"{name}_weight") for s in part] for name in LOSS_WEIGHTS}
        weights = {k: torch.tensor(w, device=run.device) if any(x != 1.0 for x in w) else None for k, w in weights.items()}
        text, context = batch_text(run.tokenizer, part, cfg, model.config)
        sync = micro == cfg.grad_accum - 1 or run.world == 1
        ctx = run.ddp.no_sync() if (run.world > 1 and not sync) else contextlib.nullcontext()
        with ctx, autocast(cfg, run.device):
            result = run.ddp(pixels, text, target, concat_cap, concat_img,
                             context.to(run.device, vision_dtype) if context is not None else None,
                             weights["mapper"], weights["caption"])
        (result.total / cfg.grad_accum).backward()
        for name in ("caption", "img_token_ce", "contrastive", "mapper"):
            logged[name] += getattr(result, name).item() / cfg.grad_accum
    # gradients are all-reduced, so every rank sees the same norm and takes the same decision
    norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    logged = D.all_mean(dict(logged))
    # the objective that was optimised (with the original's weights, the plain sum)
    logged["total"] = losses.gill_losses(logged["caption"], logged["img_token_ce"], logged["contrastive"],
                                         logged["mapper"], cfg.weights).total
    if not (math.isfinite(float(norm)) and math.isfinite(logged["total"])):
        run.optimizer.zero_grad(set_to_none=True)
        run.step_module.queue = queued
        run.state["bad_steps"] = run.state.get("bad_steps", 0) + 1
        run.bad_in_a_row += 1
        LOG.warning("step %d skipped: non-finite %s (%d in a row, %d in all)", run.state["step"] + 1,
                    "gradient" if math.isfinite(logged["total"]) else "loss", run.bad_in_a_row, run.state["bad_steps"])
        if run.bad_in_a_row >= cfg.max_bad_steps:
            raise TrainingError(f"{run.bad_in_a_row} steps in a row had a non-finite loss or gradient (the last at "
                                f"step {run.state['step'] + 1}); the weights are those of step {run.state['step']}, and "
                                "no checkpoint was written from a bad step. Lower --lr, check the data, or raise "
                                "--max-bad-steps")
        return None
    run.bad_in_a_row = 0
    run.optimizer.step()
    run.scheduler.step()
    if run.emb_norm is not None:
        renorm_img_embeddings(model, run.emb_norm, run.out_norm)
    run.state["step"] += 1
    return logged


# ---- the loop ----------------------------------------------------------------------------------------


def open_progress(run: Run) -> Any:
    """On rank 0: TensorBoard logs in ``OUT/tensorboard`` (``run.writer``; unless --no-tensorboard) and a
    progress bar, returned (None with --no-progress and on the other ranks)."""
    if run.rank != 0:
        return None
    if not run.args.no_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(run.out / "tensorboard"))
        except ImportError:
            LOG.warning("tensorboard not installed: no TensorBoard logs")
    if run.args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=run.cfg.steps, initial=run.state["step"], unit="step", dynamic_ncols=True)


def sd_shape(run: Run) -> tuple[int, int]:
    """The shape of one sample's diffusion text embedding, as the model's mapper writes it."""
    return run.model.config.gen_seq_len, run.model.config.gen_emb_dim


def training_batches(run: Run, shards: list[str], epoch: int, start: int):
    """Global batches of an epoch's shuffled training stream, from stream item ``start`` on: yields
    (samples, items of the epoch consumed)."""
    from training.data import ShardStream, global_batches

    cfg = run.cfg
    stream = ShardStream(shards, run.processor, run.args.sd_embeddings, epoch=epoch, seed=cfg.seed, start=start,
                         shuffle_buffer=cfg.shuffle_buffer, sd_shape=sd_shape(run))
    dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, collate_fn=lambda x: x)
    return global_batches(iter(dl), cfg.batch_size, run.skipped)


def log_step(run: Run, logged: dict[str, float], bar: Any, rate: float | None = None) -> None:
    """Rank 0's record of a step: the progress bar, and every ``--log-every`` steps TensorBoard (the losses;
    with ``rate`` also the learning rate and samples per second)."""
    step = run.state["step"]
    if bar is not None:
        bar.update(1)
        if rate is None:
            bar.set_postfix(loss=f"{logged['total']:.3f}")
        else:
            bar.set_postfix(loss=f"{logged['total']:.3f}", samples_per_s=f"{rate:.1f}")
    if run.writer is not None and step % run.cfg.log_every == 0:
        for k, v in logged.items():
            run.writer.add_scalar(f"train/{k}", v, step)
        if rate is not None:
            run.writer.add_scalar("train/lr", run.scheduler.get_last_lr()[0], step)
            run.writer.add_scalar("train/samples_per_s", rate, step)


def fit_cached_states(run: Run, bar: Any) -> None:
    """--cache-states: every training sample's [IMG] states computed once, then the mapper fitted on them
    for the run's steps (``training.mapper_cache``)."""
    from training.data import ShardStream, expand_shards, global_batches
    from training.mapper_cache import collect_states, fit

    cfg = run.cfg
    stream = ShardStream(expand_shards(run.args.data), run.processor, run.args.sd_embeddings, seed=cfg.seed,
                         shuffle_buffer=0, sd_shape=sd_shape(run))
    states = collect_states(run, global_batches(iter(stream), cfg.batch_size, run.skipped, drop_last=False))
    LOG.info("--cache-states: [IMG] states of %d samples", len(states.hidden))
    run.state["history"] = fit(run, states, lambda step, logged: log_step(run, logged, bar))


def train_loop(run: Run, bar: Any) -> None:
    """Steps until ``--steps``, epoch after epoch, validating and saving on schedule; the data position is
    kept in ``run.state`` (the resume point). Raises ``TrainingError`` where the run cannot go on."""
    from training.data import expand_shards

    cfg, args, state = run.cfg, run.args, run.state
    shards = expand_shards(args.data)
    t_start, samples_seen, fresh = time.perf_counter(), 0, False
    batches = training_batches(run, shards, state["epoch"], state["position"])
    while state["step"] < cfg.steps:
        try:
            samples, consumed = next(batches)
        except StopIteration:
            if fresh:
                raise SystemExit(f"error: no complete batch of {cfg.batch_size} in the training data") from None
            state["epoch"] += 1
            state["position"] = 0
            batches = training_batches(run, shards, state["epoch"], 0)
            fresh = True
            continue
        fresh = False
        logged = train_step(run, samples)
        state["position"] = consumed  # stream items of this epoch consumed (the resume point)
        if logged is None:
            continue
        samples_seen += cfg.batch_size
        state["history"].append(logged)
        if run.rank == 0:
            log_step(run, logged, bar, samples_seen / max(time.perf_counter() - t_start, 1e-9))
        if args.val_data and (state["step"] % cfg.val_every == 0 or state["step"] == cfg.steps):
            validate_and_keep_best(run)
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            save(run)


def finish(run: Run, bar: Any) -> None:
    """On rank 0: the final model (``OUT/final``), the loss history and the skipped-sample report."""
    if run.rank != 0:
        return
    from gill.checkpoint import save_model
    from gill.io import atomic_write_text

    state = run.state
    save_model(run.out / "final", run.model)
    atomic_write_text(run.out / "history.json", json.dumps(state["history"]))
    report = {**dict(run.skipped), **({"non-finite steps": state["bad_steps"]} if state.get("bad_steps") else {})}
    atomic_write_text(run.out / "skipped.json", json.dumps(report, indent=2))
    if bar is not None:
        bar.close()
    if run.writer is not None:
        run.writer.close()
    LOG.info("done: %d steps; bad samples skipped (occurrences): %s; non-finite steps skipped: %d",
             state["step"], dict(run.skipped) or "none", state.get("bad_steps", 0))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_sigterm():  # a kill during a save leaves no temporary checkpoint behind
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from training import distributed as D

    try:
        run = setup(argv)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar = open_progress(run)
    try:
        if run.args.cache_states:
            fit_cached_states(run, bar)
        else:
            train_loop(run, bar)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        D.cleanup()
        return 1
    finish(run, bar)
    D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
