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
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

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


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    from gill.checkpoint import save_model

    final = out / "checkpoints" / f"step-{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- validation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, batches, cfg, device) -> dict[str, float]:
    """Caption loss and text<->image recall@1/5/10 over a held-out set (full similarity matrix)."""
    from gill import losses
    from training.step import caption_inputs, img_token_inputs, tokenize

    model.eval()
    texts, images, loss_sum, n_tok = [], [], 0.0, 0.0
    n = model.config.tokens.num_img_tokens
    for i, samples in enumerate(batches):
        if cfg.val_batches and i >= cfg.val_batches:
            break
        pixels = torch.stack([s.pixel_values for s in samples]).to(device, next(model.vision.parameters()).dtype)
        text = tokenize(tokenizer, [s.caption for s in samples], cfg.max_len, n)
        with autocast(cfg, device):
            image = model.encode_images(pixels)
            embeds, mask, labels = caption_inputs(model, image.prefix, text, concat=False)
            logits = model.lm_forward(embeds, mask).logits
            count = losses.num_targets(labels)
            loss_sum += losses.caption_loss(logits, labels, 1.0).item()
            n_tok += count.item()
            ids, mask, _ = img_token_inputs(model, text, False, device)
            out = model.img_token_forward(ids, mask)
            texts.append(model.text_retrieval_embeddings(out.img_hidden).float())
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

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", default="gill-opt-6.7b")
    p.add_argument("--data", required=True, help="training shards (brace pattern; '::' joins several)")
    p.add_argument("--sd-embeddings", required=True, help="folder of precomputed diffusion text embeddings")
    p.add_argument("--val-data", default=None)
    p.add_argument("--val-sd-embeddings", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
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


def main(argv: list[str] | None = None) -> int:
    from gill.checkpoint import load_strict, load_safetensors
    from training import distributed as D
    from training.config import from_args, lr_factor
    from training.data import ShardStream, expand_shards, global_batches
    from training.step import TrainStep, mean_row_norm, renorm_img_embeddings, tokenize

    args = parse(argv)
    cfg = from_args(args.recipe, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
    out = Path(args.out)
    torch.manual_seed(cfg.seed)

    model, tokenizer, processor, img_tokens = build_model(args.model, DTYPES[cfg.backbone_dtype])
    record_run_settings(model, args.run_settings, args.training_data or model.config.training_data or args.data)
    model.to(device).train()
    step_module = TrainStep(model, cfg.weights)
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    emb_norm = mean_row_norm(model.lm.get_input_embeddings().weight)
    out_emb = model.lm.get_output_embeddings()
    out_norm = mean_row_norm(out_emb.weight) if out_emb is not None else None
    if cfg.renorm_img_embeddings:
        renorm_img_embeddings(model, emb_norm, out_norm)

    state = {"step": 0, "epoch": 0, "position": 0, "best": -1.0, "skipped": {}}
    concat_rng = torch.Generator().manual_seed(cfg.seed + 1)
    if args.resume and checkpoints(out):
        last = checkpoints(out)[-1]
        load_strict(model.adapter, load_safetensors(last / "gill.safetensors"), str(last))
        saved = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        concat_rng.set_state(saved.pop("concat_rng"))
        torch.set_rng_state(saved.pop("torch_rng"))
        state.update(saved)
        LOG.info("resumed from %s (step %d)", last, state["step"])

    if world > 1:
        frozen = [n for n, p in step_module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in step_module.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, frozen)
        ddp = torch.nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = step_module

    writer = None
    if rank == 0 and not args.no_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            LOG.warning("tensorboard not installed: no TensorBoard logs")
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], unit="step", dynamic_ncols=True)

    train_shards = expand_shards(args.data)
    skipped = Counter(state["skipped"])
    exit_at = int(os.environ.get("GILL_TRAIN_TEST_EXIT_AT_STEP", "0"))  # test hook: simulate a kill
    history = []
    vision_dtype = next(model.vision.parameters()).dtype
    t_start, samples_seen = time.perf_counter(), 0

    def loader(epoch: int, start: int):
        stream = ShardStream(train_shards, processor, args.sd_embeddings, epoch=epoch, seed=cfg.seed, start=start,
                             shuffle_buffer=cfg.shuffle_buffer)
        dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                         collate_fn=lambda x: x)
        return global_batches(iter(dl), cfg.batch_size, skipped)

    batches = loader(state["epoch"], state["position"])
    fresh = False
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
        # this rank's micro-batches of the global batch
        mine = samples[rank * per_rank * cfg.grad_accum:(rank + 1) * per_rank * cfg.grad_accum]
        concat_cap = bool(torch.rand((), generator=concat_rng) < cfg.concat_prob)
        concat_img = bool(torch.rand((), generator=concat_rng) < cfg.concat_prob)
        optimizer.zero_grad(set_to_none=True)
        logged = Counter()
        for micro in range(cfg.grad_accum):
            part = mine[micro * per_rank:(micro + 1) * per_rank]
            pixels = torch.stack([s.pixel_values for s in part]).to(device, vision_dtype)
            target = torch.stack([s.sd_embedding for s in part]).to(device, torch.float32)
            text = tokenize(tokenizer, [s.caption for s in part], cfg.max_len, model.config.tokens.num_img_tokens)
            sync = micro == cfg.grad_accum - 1 or world == 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, autocast(cfg, device):
                result = ddp(pixels, text, target, concat_cap, concat_img)
            (result.total / cfg.grad_accum).backward()
            for name in ("caption", "img_token_ce", "contrastive", "mapper"):
                logged[name] += getattr(result, name).item() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if cfg.renorm_img_embeddings:
            renorm_img_embeddings(model, emb_norm, out_norm)
        state["step"] += 1
        state["position"] = consumed  # stream items of this epoch consumed (the resume point)
        samples_seen += cfg.batch_size
        logged = D.all_mean(dict(logged))
        logged["total"] = (logged["caption"] + logged["img_token_ce"] + logged["contrastive"] + logged["mapper"])
        history.append(logged)
        if rank == 0:
            rate = samples_seen / max(time.perf_counter() - t_start, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logged['total']:.3f}", samples_per_s=f"{rate:.1f}")
            if writer is not None and state["step"] % cfg.log_every == 0:
                for k, v in logged.items():
                    writer.add_scalar(f"train/{k}", v, state["step"])
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], state["step"])
                writer.add_scalar("train/samples_per_s", rate, state["step"])
        if args.val_data and (state["step"] % cfg.val_every == 0 or state["step"] == cfg.steps):
            metrics = validate(model, tokenizer, processor, args, cfg, device)
            if rank == 0:
                LOG.info("step %d %s", state["step"], json.dumps({k: round(v, 4) for k, v in metrics.items()}))
                if writer is not None:
                    for k, v in metrics.items():
                        writer.add_scalar(k, v, state["step"])
            score = metrics.get("val/t2i_recall@1", -1.0)
            if rank == 0 and score > state["best"]:
                state["best"] = score
                from gill.checkpoint import save_model

                shutil.rmtree(out / "best.tmp", ignore_errors=True)
                save_model(out / "best.tmp", model)
                (out / "best.tmp" / "metrics.json").write_text(json.dumps({"step": state["step"], **metrics}, indent=2))
                shutil.rmtree(out / "best", ignore_errors=True)
                os.replace(out / "best.tmp", out / "best")
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            state["skipped"] = dict(skipped)
            if rank == 0:
                save_checkpoint(out, model, optimizer, scheduler,
                                {**state, "concat_rng": concat_rng.get_state(), "torch_rng": torch.get_rng_state()},
                                cfg.keep_last)
            D.barrier()
        if exit_at and state["step"] == exit_at:
            os._exit(137)
    if rank == 0:
        from gill.checkpoint import save_model

        save_model(out / "final", model)
        (out / "history.json").write_text(json.dumps(history))
        (out / "skipped.json").write_text(json.dumps(dict(skipped), indent=2))
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        LOG.info("done: %d steps; bad samples skipped (occurrences): %s", state["step"], dict(skipped) or "none")
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
