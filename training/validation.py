"""The validation stage of ``training.train``: caption loss and text<->image recall@1/5/10 over a held-out
shard set (``--val-data``), logged, and the model with the best text-to-image recall@1 kept in ``OUT/best``
(the original's criterion)."""

from __future__ import annotations

import json
import logging
from collections import Counter

import torch

from training.state import Run
from training.step import autocast, batch_text

LOG = logging.getLogger("training.train")


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


def validate(model, tokenizer, processor, args, cfg, device) -> dict[str, float]:
    from training.data import ShardStream, expand_shards, global_batches

    stream = ShardStream(expand_shards(args.val_data), processor, args.val_sd_embeddings, shuffle_buffer=0, need_sd=False)
    size = max(2, cfg.batch_size // max(1, cfg.grad_accum))
    batches = (b for b, _ in global_batches(iter(stream), size, Counter(), drop_last=False))
    return evaluate(model, tokenizer, batches, cfg, device)


def validate_and_keep_best(run: Run) -> dict[str, float]:
    metrics = validate(run.model, run.tokenizer, run.processor, run.args, run.cfg, run.device)
    if run.rank == 0:
        LOG.info("step %d %s", run.state["step"], json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        if run.writer is not None:
            for k, v in metrics.items():
                run.writer.add_scalar(k, v, run.state["step"])
    score = metrics.get("val/t2i_recall@1", -1.0)
    if run.rank == 0 and score > run.state["best"]:
        from gill.checkpoint import save_model
        from gill.io import atomic_write_text

        run.state["best"] = score
        save_model(run.out / "best", run.model)
        atomic_write_text(run.out / "best" / "metrics.json", json.dumps({"step": run.state["step"], **metrics}, indent=2))
    return metrics
