"""The setup stage of ``training.train``: from parsed arguments to a ready ``Run`` (processes and devices,
the model with its trainable parts chosen, optimizer and schedule, the [IMG] row norms, DDP), resumed from
the last usable checkpoint with ``--resume``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.checkpoints import remove_stale_temporaries, resume
from training.state import Run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def processes(args: argparse.Namespace, cfg) -> tuple[torch.device, int, int, int]:
    """(device, world size, rank, per-process micro-batch) once the process group is up; a batch that does
    not divide over processes and accumulation steps is refused."""
    from training import distributed as D

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
    return device, world, rank, per_rank


def prepare_model(args: argparse.Namespace, cfg, world: int):
    """(model, tokenizer, image processor): built from ``--model``, with its run settings recorded, its [IMG]
    rows initialised (``--img-init``), the parts ``--reinit`` names reset and those ``--train-only`` names
    alone left trainable."""
    from training.step import adapter_parts, init_img_embeddings, reinit_parts, train_only

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
    return model, tokenizer, processor


def img_row_norms(model, cfg) -> tuple[float | None, float | None]:
    """The norms the [IMG] input and (untied) output rows are rescaled to after each step, applied once now;
    None where they are left as trained (frozen rows, --train-only, stay as loaded)."""
    from training.step import mean_row_norm, renorm_img_embeddings

    renorm = cfg.renorm_img_embeddings and model.adapter.img_embeddings.requires_grad
    emb_norm = mean_row_norm(model.lm.get_input_embeddings().weight) if renorm else None
    out_emb = model.lm.get_output_embeddings()
    out_norm = mean_row_norm(out_emb.weight) if out_emb is not None and cfg.renorm_img_output else None
    if emb_norm is not None:
        renorm_img_embeddings(model, emb_norm, out_norm)
    return emb_norm, out_norm


def data_parallel(step_module: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """The step module wrapped in DDP over its trainable parameters (itself in one process)."""
    if world == 1:
        return step_module
    frozen = [n for n, p in step_module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in step_module.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, frozen)
    return torch.nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)


def prepare_run(args: argparse.Namespace) -> Run:
    """A ready ``Run`` for parsed ``training.train`` arguments (resumed with ``--resume``)."""
    from training import distributed as D
    from training.config import from_args, lr_factor
    from training.step import TrainStep

    cfg = from_args(args.recipe, args)
    device, world, rank, per_rank = processes(args, cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer, processor = prepare_model(args, cfg, world)
    model.to(device).train()
    step_module = TrainStep(model, cfg.weights, cfg.contrastive_queue, cfg.queue_duplicate_cos, cfg.mapper_input_noise)
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    emb_norm, out_norm = img_row_norms(model, cfg)
    ddp = data_parallel(step_module, world, device)
    run = Run(args, cfg, device, world, rank, per_rank, Path(args.out), model, tokenizer, processor, step_module, ddp,
              trainable, optimizer, scheduler, emb_norm, out_norm, torch.Generator().manual_seed(cfg.seed + 1))
    if rank == 0:
        remove_stale_temporaries(run.out)
    D.barrier()  # no rank reads the run directory while rank 0 cleans it
    if args.resume:
        resume(run)
    return run
