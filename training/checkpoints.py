"""Checkpoints of a training run: written atomically (``OUT/checkpoints/step-NNNNNNN``: a model directory
plus ``trainer_state.pt``), the last ``--keep-last`` kept, verified before a resume (the newest usable one
is taken, saying why newer ones were passed over), and what an interrupted write left removed. A SIGTERM
during a save leaves no half-written checkpoint (``exit_on_sigterm``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import Counter
from pathlib import Path

import torch

from training.state import Run, TrainingError, settings_record

LOG = logging.getLogger("training.train")


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
