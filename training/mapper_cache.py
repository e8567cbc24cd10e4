"""Refit the mapper on cached [IMG] states (``training.train --train-only mapper --cache-states``).

With everything but the mapper frozen, each training sample's [IMG] states never change: they are
computed once (one pass over the data, one LM forward per sample) and the mapper is then fitted on them
alone, with the run's optimizer, schedule, loss weights and ``--mapper-input-noise``, drawing batches of
``--batch-size`` from the cache (seeded by ``--seed``). For data whose states fit in memory (N samples x
[IMG] tokens x the LM's width floats: the toy world's 6k samples, 18 MB; CC3M at OPT-6.7B's width,
~200 GB, does not: stream it with ``--train-only mapper`` alone). Each sample's states are its own (no
concat-captions pairs). The fit is short and is not checkpointed on the way: a killed run starts again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.state import TrainingError
from training.step import autocast, batch_text, img_states


@dataclass
class CachedStates:
    hidden: torch.Tensor  # (N, n, d) [IMG] states, as the mapper's TrainStep reads them
    target: torch.Tensor  # (N, L, D) the diffusion text encoder's states of each sample's caption
    weight: torch.Tensor  # (N,) per-sample mapper-loss weights (KEY.loss.json; 1 elsewhere)


@torch.no_grad()
def collect_states(run, batches) -> CachedStates:
    """Every sample's [IMG] states from ``batches`` (global batches of training samples, one epoch)."""
    model, cfg = run.model, run.cfg
    hidden, target, weight = [], [], []
    for samples, _ in batches:
        text, context = batch_text(run.tokenizer, samples, cfg, model.config)
        with autocast(cfg, run.device):
            img_hidden = img_states(model, text, context, run.device)
        hidden.append(img_hidden.float().cpu())
        target.append(torch.stack([s.sd_embedding for s in samples]).float())
        weight.append(torch.tensor([s.mapper_weight for s in samples], dtype=torch.float32))
    if not hidden:
        raise SystemExit("error: --cache-states: no training sample to compute [IMG] states from")
    return CachedStates(torch.cat(hidden), torch.cat(target), torch.cat(weight))


def fit(run, states: CachedStates, on_step=None) -> list[dict[str, float]]:
    """``run.cfg.steps`` optimizer steps of the mapper loss on batches drawn from ``states``; returns the
    logged losses per step (``on_step(step, logged)`` is called after each)."""
    import math

    from gill import losses

    cfg = run.cfg
    draw = torch.Generator().manual_seed(cfg.seed)
    n = len(states.hidden)
    history = []
    while run.state["step"] < cfg.steps:
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=draw)
        hidden = states.hidden[idx].to(run.device)
        weights = states.weight[idx].to(run.device)
        with autocast(cfg, run.device):
            pred = run.step_module.generation_embeddings(hidden)
            loss = losses.mapper_loss(pred, states.target[idx].to(run.device),
                                      weights if bool((weights != 1).any()) else None)
        if not math.isfinite(loss.item()):
            raise TrainingError(f"--cache-states: non-finite mapper loss at step {run.state['step'] + 1}; lower --lr")
        run.optimizer.zero_grad(set_to_none=True)
        (loss * cfg.weights.mapper).backward()
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.state["step"] += 1
        logged = {"mapper": loss.item(), "total": loss.item() * cfg.weights.mapper}
        history.append(logged)
        if on_step is not None:
            on_step(run.state["step"], logged)
    return history

