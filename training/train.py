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

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger("training.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- model -------------------------------------------------------------------------------------------


def build_model(spec: str, backbone_dtype: torch.dtype):
    """(GILLModel, tokenizer, image_processor, img_tokens) for a model spec (see the module doc), read by
    ``gill.loading.load_for_training``."""
    from gill.loading import load_for_training

    parts = load_for_training(spec, torch_dtype=backbone_dtype)
    return parts.model, parts.tokenizer, parts.image_processor, parts.img_tokens


def record_run_settings(model, run_settings: str | None, training_data: str | None) -> None:
    """Write what the saved model directories carry besides weights: run settings (a JSON object or a
    file holding one, merged over the model's own) and a description of the training data."""
    from gill.settings import RunSettings, resolve_settings

    if run_settings:
        text = Path(run_settings).read_text(encoding="utf-8") if Path(run_settings).is_file() else run_settings
        try:
            given = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: --run-settings is neither a JSON object nor a file holding one ({e})") from None
        if not isinstance(given, dict):
            raise SystemExit("error: --run-settings must be a JSON object, e.g. '{\"guidance_scale\": 2.0}'")
        try:
            resolve_settings(given)  # names every unknown or bad field
        except ValueError as e:
            raise SystemExit(f"error: --run-settings: {e}") from None
        model.config.run = RunSettings(**given).over(model.config.run)
    if training_data:
        model.config.training_data = training_data


# ---- checkpoints -----------------------------------------------------------------------------------


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*[0-9]"))


# What an interrupted atomic write leaves in a run directory (gill.io: a hidden ``.NAME.<pid>.<random>.tmp``
# beside NAME, or ``.old`` for the copy being replaced): checkpoints, best, final and the run's JSON files.
TEMPORARY_PATTERNS = ("checkpoints/.step-*.tmp", "checkpoints/.step-*.old", ".best.*.tmp", ".best.*.old",
                      ".final.*.tmp", ".final.*.old", ".history.json.*.tmp", ".skipped.json.*.tmp",
                      "best/.*.tmp", "final/.*.tmp")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files and directories that a killed write left in the run directory ``out``
    (a kill -9 or a crash runs no cleanup). A run directory belongs to one run at a time, and this runs
    before that run writes anything or after its own write finished, so whatever is there is stale.
    Returns what was removed."""
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in sorted(out.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        LOG.info("removed %d temporary file(s) left by an interrupted run in %s: %s", len(removed), out,
                 ", ".join(str(p.relative_to(out)) for p in removed))
    return removed


@contextlib.contextmanager
def exit_on_sigterm():
    """While inside: SIGTERM (what ``kill``, a job scheduler and torchrun send) raises SystemExit(143)
    instead of ending the process on the spot, so ``finally`` blocks run and a checkpoint being written
    removes its temporary directory (the last complete checkpoint stays). Outside the main thread, where
    Python cannot set handlers, nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        LOG.warning("training terminated (signal %d); what was being written is removed, the last complete "
                    "checkpoint is kept (--resume continues from it)", signum)
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    from gill.checkpoint import save_model

    from gill.io import atomic_dir

    final = out / "checkpoints" / f"step-{state['step']:07d}"
    with atomic_dir(final) as tmp:
        save_model(tmp, model)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
                   tmp / "trainer_state.pt")
    for old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(out)
    return final


# ---- validation --------------------------------------------------------------------------------------


def batch_text(tokenizer, samples: list, cfg, model_config):
    """The batch's text (with the contexts of interleaved samples) and the pixels of the context images
    it keeps (M, 3, H, W), or None when no sample has a context."""
    from training.step import tokenize

    contexts = [[t for t, _ in s.context] for s in samples]
    text = tokenize(tokenizer, [s.caption for s in samples], cfg.max_len, model_config.tokens.num_img_tokens,
                    contexts=contexts if any(contexts) else None, n_visual=model_config.n_visual_tokens)
    if not text.interleaved:
        return text, None
    kept = [px for s, ids in zip(samples, text.context) for _, px in s.context[len(s.context) - len(ids):]]
    return text, torch.stack(kept) if kept else None


@torch.no_grad()
def evaluate(model, tokenizer, batches, cfg, device) -> dict[str, float]:
    """Caption loss and text<->image recall@1/5/10 over a held-out set (full similarity matrix)."""
    from gill import losses
    from training.step import caption_inputs, img_states

    model.eval()
    texts, images, loss_sum, n_tok = [], [], 0.0, 0.0
    for i, samples in enumerate(batches):
        if cfg.val_batches and i >= cfg.val_batches:
            break
        dtype = next(model.vision.parameters()).dtype
        pixels = torch.stack([s.pixel_values for s in samples]).to(device, dtype)
        text, context = batch_text(tokenizer, samples, cfg, model.config)
        with autocast(cfg, device):
            image = model.encode_images(pixels)
            embeds, mask, labels = caption_inputs(model, image.prefix, text, concat=False)
            logits = model.lm_forward(embeds, mask).logits
            count = losses.num_targets(labels)
            loss_sum += losses.caption_loss(logits, labels, 1.0).item()
            n_tok += count.item()
            img_hidden = img_states(model, text, context, device)
            texts.append(model.text_retrieval_embeddings(img_hidden).float())
            images.append(image.retrieval.float())
    model.train()
    if not texts:
        return {}
    sim = losses.retrieval_logits(torch.cat(texts), torch.cat(images), model.adapter.logit_scale)
    metrics = {"val/caption_loss": loss_sum / max(n_tok, 1.0)}
    for name, s in (("t2i", sim), ("i2t", sim.T)):
        ranks = (s > s.diagonal()[:, None]).sum(-1)  # how many candidates beat the right one
        for k in (1, 5, 10):
            metrics[f"val/{name}_recall@{k}"] = (ranks < k).float().mean().item()
    return metrics


def autocast(cfg, device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


# ---- the loop ----------------------------------------------------------------------------------------


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


def setup(argv: list[str] | None = None) -> Run:
    from training import distributed as D
    from training.config import from_args, lr_factor
    from training.step import (TrainStep, adapter_parts, init_img_embeddings, mean_row_norm, reinit_parts,
                               renorm_img_embeddings, train_only)

    args = parse(argv)
    cfg = from_args(args.recipe, args)
    device = torch.device(args.device or "cpu")
    D.setup(device.type)
    world, rank = D.world_size(), D.rank()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", D.local_rank())
    per_rank, rest = divmod(cfg.batch_size, world * cfg.grad_accum)
    if rest or per_rank == 0:
        raise SystemExit(f"error: batch size {cfg.batch_size} is not divisible by {world} processes x {cfg.grad_accum} accumulation steps")
    if cfg.concat_prob > 0 and per_rank % 2:
        raise SystemExit(f"error: concat-captions pairs examples: the per-process micro-batch ({per_rank}) must be even")
    torch.manual_seed(cfg.seed)
    model, tokenizer, processor, _ = build_model(args.model, DTYPES[cfg.backbone_dtype])
    record_run_settings(model, args.run_settings, args.training_data or model.config.training_data or args.data)
    if cfg.img_init:
        try:
            init_img_embeddings(model, tokenizer, cfg.img_init)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        fresh, only = adapter_parts(model, cfg.reinit, "--reinit"), adapter_parts(model, cfg.train_only, "--train-only")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.cache_states and (only != ["mapper"] or world > 1 or args.resume):
        raise SystemExit("error: --cache-states fits the mapper alone in one process: it needs --train-only mapper, "
                         "and no torchrun or --resume")
    reinit_parts(model, fresh)
    if only:
        train_only(model, only)
    model.to(device).train()
    step_module = TrainStep(model, cfg.weights, cfg.contrastive_queue, cfg.queue_duplicate_cos, cfg.mapper_input_noise)
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    # (frozen rows, --train-only, stay as loaded)
    renorm = cfg.renorm_img_embeddings and model.adapter.img_embeddings.requires_grad
    emb_norm = mean_row_norm(model.lm.get_input_embeddings().weight) if renorm else None
    out_emb = model.lm.get_output_embeddings()
    out_norm = mean_row_norm(out_emb.weight) if out_emb is not None and cfg.renorm_img_output else None
    if emb_norm is not None:
        renorm_img_embeddings(model, emb_norm, out_norm)
    if world > 1:
        frozen = [n for n, p in step_module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in step_module.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, frozen)
        ddp = torch.nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = step_module
    run = Run(args, cfg, device, world, rank, per_rank, Path(args.out), model, tokenizer, processor, step_module, ddp,
              trainable, optimizer, scheduler, emb_norm, out_norm, torch.Generator().manual_seed(cfg.seed + 1))
    if rank == 0:
        remove_stale_temporaries(run.out)
    D.barrier()  # no rank reads the run directory while rank 0 cleans it
    if args.resume:
        resume(run)
    return run


def settings_record(run: Run) -> dict:
    """What a resumed run compares against: the recipe's values and the data it reads."""
    import dataclasses

    cfg = dataclasses.asdict(run.cfg)
    return {**cfg, "model": run.args.model, "data": run.args.data, "sd_embeddings": run.args.sd_embeddings,
            "world_size": run.world}


class OtherModel(ValueError):
    """A checkpoint trained from another ``--model`` than this run's, whose weights do not fit this one."""

    def __init__(self, path: Path, trained_from: str, problem: Exception):
        super().__init__(f"{path.name} was trained from model {trained_from!r} ({problem})")
        self.trained_from = trained_from


def verified_checkpoint(path: Path, run: Run) -> dict:
    """A checkpoint's trainer state, after checking its weights against the model (raises naming the file;
    ``OtherModel`` where the weights do not fit because the checkpoint was trained from another model)."""
    from gill.checkpoint import check_state_dict, expected_shapes, load_safetensors, load_problem

    try:
        saved = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, missing, foreign: say which file and why (one line)
        raise ValueError(f"{path / 'trainer_state.pt'}: cannot be read ({load_problem(e)})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path / 'trainer_state.pt'}: holds a {type(saved).__name__}, not a trainer state")
    missing = {"optimizer", "scheduler", "concat_rng", "torch_rng", "step"} - set(saved)
    if missing:
        raise ValueError(f"{path / 'trainer_state.pt'}: lacks {sorted(missing)}")
    settings = saved.get("settings")
    trained_from = settings.get("model") if isinstance(settings, dict) else None
    try:
        weights = load_safetensors(path / "gill.safetensors")
        check_state_dict(weights, expected_shapes(run.model.adapter), str(path / "gill.safetensors"))
    except ValueError as e:
        if isinstance(trained_from, str) and trained_from != run.args.model:
            raise OtherModel(path, trained_from, e) from None
        raise
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise ValueError(f"{path / 'gill.safetensors'}: holds NaN or infinite weights")
    saved["weights"] = weights
    return saved


def resume(run: Run) -> Path | None:
    """Continue from the newest checkpoint that verifies, saying which and why newer ones were passed over,
    and what differs from the settings it was saved with. None when there is no checkpoint (a fresh run)."""
    from gill.checkpoint import load_strict

    found = checkpoints(run.out)
    if not found:
        LOG.info("no checkpoint in %s: starting from step 0", run.out / "checkpoints")
        return None
    problems, other_models = [], []
    for path in reversed(found):
        try:
            saved = verified_checkpoint(path, run)
        except (ValueError, OSError) as e:
            problems.append(str(e))
            if isinstance(e, OtherModel):
                other_models.append(e.trained_from)
                LOG.warning("checkpoint %s was trained from model %r, not this run's %r; trying the one before",
                            path.name, e.trained_from, run.args.model)
            else:
                LOG.warning("checkpoint %s is unusable (%s); trying the one before", path.name, e)
            continue
        load_strict(run.model.adapter, saved.pop("weights"), str(path))
        run.optimizer.load_state_dict(saved.pop("optimizer"))
        run.scheduler.load_state_dict(saved.pop("scheduler"))
        run.concat_rng.set_state(saved.pop("concat_rng"))
        torch.set_rng_state(saved.pop("torch_rng"))
        before = saved.pop("settings", None)
        run.state.update(saved)
        run.skipped = Counter(run.state["skipped"])
        if problems:
            LOG.warning("resumed from %s (step %d), the newest usable checkpoint", path, run.state["step"])
        else:
            LOG.info("resumed from %s (step %d)", path, run.state["step"])
        if before is not None:
            now = settings_record(run)
            changed = {k: (before.get(k), now[k]) for k in now if before.get(k) != now[k]}
            if changed:
                LOG.warning("resuming with changed settings: %s",
                            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))
        return path
    if other_models:  # good checkpoints of another model: not to be deleted, just not this run's
        names = ", ".join(repr(m) for m in dict.fromkeys(other_models))
        raise TrainingError(f"--resume: the checkpoints in {run.out / 'checkpoints'} were trained from model {names} "
                            f"and this run names {run.args.model!r}: pass the same --model to continue them, or "
                            "another --out to start a new run")
    raise TrainingError(f"--resume: none of the {len(found)} checkpoint(s) in {run.out / 'checkpoints'} is usable:\n  "
                        + "\n  ".join(problems) + "\nremove them to start again, or restore a good copy")


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


def save(run: Run) -> Path | None:
    """A checkpoint of the current step (rank 0 writes; every rank waits). Refused, keeping the older ones,
    if a weight is not finite."""
    from training import distributed as D

    run.state["skipped"] = dict(run.skipped)
    path = None
    if run.rank == 0:
        bad = [n for n, p in run.model.adapter.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"step {run.state['step']}: weights {bad[:5]} are not finite; no checkpoint written "
                                f"(the last good one is kept in {run.out / 'checkpoints'})")
        path = save_checkpoint(run.out, run.model, run.optimizer, run.scheduler,
                               {**run.state, "concat_rng": run.concat_rng.get_state(), "torch_rng": torch.get_rng_state(),
                                "settings": settings_record(run)},
                               run.cfg.keep_last)
    D.barrier()
    return path


def validate_and_keep_best(run: Run) -> dict[str, float]:
    metrics = validate(run.model, run.tokenizer, run.processor, run.args, run.cfg, run.device)
    if run.rank == 0:
        LOG.info("step %d %s", run.state["step"], json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        if run.writer is not None:
            for k, v in metrics.items():
                run.writer.add_scalar(k, v, run.state["step"])
    score = metrics.get("val/t2i_recall@1", -1.0)
    if run.rank == 0 and score > run.state["best"]:
        from gill.io import atomic_write_text
        from gill.checkpoint import save_model

        run.state["best"] = score
        save_model(run.out / "best", run.model)
        atomic_write_text(run.out / "best" / "metrics.json", json.dumps({"step": run.state["step"], **metrics}, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_sigterm():  # a kill during a save leaves no temporary checkpoint behind
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from training import distributed as D
    from training.data import ShardStream, expand_shards, global_batches

    try:
        run = setup(argv)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg, args, state, out = run.cfg, run.args, run.state, run.out
    if run.rank == 0 and not args.no_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            LOG.warning("tensorboard not installed: no TensorBoard logs")
    bar = None
    if run.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], unit="step", dynamic_ncols=True)

    train_shards = expand_shards(args.data)
    sd_shape = (run.model.config.gen_seq_len, run.model.config.gen_emb_dim)
    t_start, samples_seen = time.perf_counter(), 0

    def loader(epoch: int, start: int):
        stream = ShardStream(train_shards, run.processor, args.sd_embeddings, epoch=epoch, seed=cfg.seed, start=start,
                             shuffle_buffer=cfg.shuffle_buffer, sd_shape=sd_shape)
        dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                         collate_fn=lambda x: x)
        return global_batches(iter(dl), cfg.batch_size, run.skipped)

    if args.cache_states:
        from training.mapper_cache import collect_states, fit

        stream = ShardStream(train_shards, run.processor, args.sd_embeddings, seed=cfg.seed, shuffle_buffer=0,
                             sd_shape=sd_shape)
        states = collect_states(run, global_batches(iter(stream), cfg.batch_size, run.skipped, drop_last=False))
        LOG.info("--cache-states: [IMG] states of %d samples", len(states.hidden))

        def on_step(step: int, logged: dict) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logged['total']:.3f}")
            if run.writer is not None and step % cfg.log_every == 0:
                for k, v in logged.items():
                    run.writer.add_scalar(f"train/{k}", v, step)

        try:
            state["history"] = fit(run, states, on_step)
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        batches = iter(())
    else:
        batches = loader(state["epoch"], state["position"])
    fresh = False
    try:
        while state["step"] < cfg.steps:
            try:
                samples, consumed = next(batches)
            except StopIteration:
                if fresh:
                    raise SystemExit(f"error: no complete batch of {cfg.batch_size} in the training data") from None
                state["epoch"] += 1
                state["position"] = 0
                batches = loader(state["epoch"], 0)
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
                rate = samples_seen / max(time.perf_counter() - t_start, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{logged['total']:.3f}", samples_per_s=f"{rate:.1f}")
                if run.writer is not None and state["step"] % cfg.log_every == 0:
                    for k, v in logged.items():
                        run.writer.add_scalar(f"train/{k}", v, state["step"])
                    run.writer.add_scalar("train/lr", run.scheduler.get_last_lr()[0], state["step"])
                    run.writer.add_scalar("train/samples_per_s", rate, state["step"])
            if args.val_data and (state["step"] % cfg.val_every == 0 or state["step"] == cfg.steps):
                validate_and_keep_best(run)
            if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
                save(run)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        D.cleanup()
        return 1
    if run.rank == 0:
        from gill.io import atomic_write_text
        from gill.checkpoint import save_model

        save_model(out / "final", run.model)
        atomic_write_text(out / "history.json", json.dumps(state["history"]))
        report = {**dict(run.skipped), **({"non-finite steps": state["bad_steps"]} if state.get("bad_steps") else {})}
        atomic_write_text(out / "skipped.json", json.dumps(report, indent=2))
        if bar is not None:
            bar.close()
        if run.writer is not None:
            run.writer.close()
        LOG.info("done: %d steps; bad samples skipped (occurrences): %s; non-finite steps skipped: %d",
                 state["step"], dict(run.skipped) or "none", state.get("bad_steps", 0))
    D.cleanup()
    return 0


def validate(model, tokenizer, processor, args, cfg, device) -> dict[str, float]:
    from training.data import ShardStream, expand_shards, global_batches

    stream = ShardStream(expand_shards(args.val_data), processor, args.val_sd_embeddings, shuffle_buffer=0, need_sd=False)
    size = max(2, cfg.batch_size // max(1, cfg.grad_accum))
    batches = (b for b, _ in global_batches(iter(stream), size, Counter(), drop_last=False))
    return evaluate(model, tokenizer, batches, cfg, device)


if __name__ == "__main__":
    sys.exit(main())
