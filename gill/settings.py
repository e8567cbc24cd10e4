"""Run settings: how a model is best run (diffusion steps, guidance, scheduler, image frequency, sampling,
seed, the evaluation's scorer, the context it was trained on), stored with the model and resolved in one
place.

A model directory's ``config.json`` carries a ``run`` block (a ``RunSettings``); fields it leaves out
(``None``) fall back to the library's defaults, ``LIBRARY_DEFAULTS``, the one place their values are
written. Every front end (``GILL.generate_interleaved``/``stream``, ``python -m gill generate``, the app,
``gill.eval``) calls ``resolve_settings``: explicit argument > the model's settings > the library default.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gill.arguments import MAX_SEED

MAX_STEPS = 1000  # the diffusion schedulers' training timesteps: more inference steps than these are refused

# Scheduler names -> diffusers class names (``gill.diffusion`` builds them from the pipeline's own config).
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


@dataclass(frozen=True)
class RunSettings:
    """Run settings; ``None`` means "not set here" (the next layer down decides). Frozen: settings are
    shared (``LIBRARY_DEFAULTS``, a model's own, a front end's) and a run derives new ones, never edits them."""

    steps: int | None = None  # diffusion steps
    guidance_scale: float | None = None  # classifier-free guidance
    scheduler: str | None = None  # a name of SCHEDULERS; unset everywhere: the pipeline's own
    img_scale_factor: float | None = None  # the original's image-frequency factor on the [IMG0] logit
    top_p: float | None = None
    temperature: float | None = None  # 0 is greedy
    max_new_tokens: int | None = None
    seed: int | None = None  # decoding and diffusion seed (image k of a conversation uses seed + k)
    scorer: str | None = None  # the evaluation's CLIP scorer: "hf:NAME_OR_PATH" or "open_clip:MODEL/PRETRAINED"
    # the LM positions (prompt and answer together) the model was trained on: its usable context, at most the
    # LM's own (a larger value is refused when the model is built); unset everywhere: the LM's own positions
    context_length: int | None = None

    def to_dict(self, *, set_only: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None} if set_only else data

    def over(self, lower: RunSettings) -> RunSettings:
        """These settings, with the fields left unset taken from ``lower``."""
        return RunSettings(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(lower, f.name)
                              for f in dataclasses.fields(self)})

    def validated(self, source: str = "run settings") -> RunSettings:
        """Raise ``ValueError`` naming the field for a value no run can use."""
        checks = {
            "steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_STEPS,
            "guidance_scale": lambda v: _number(v) and v >= 0,
            "img_scale_factor": lambda v: _number(v) and v >= 0,
            "top_p": lambda v: _number(v) and 0 < v <= 1,
            "temperature": lambda v: _number(v) and v >= 0,
            "max_new_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
            "scheduler": lambda v: isinstance(v, str) and v in SCHEDULERS,
            "scorer": lambda v: isinstance(v, str) and bool(v),
            "context_length": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        }
        wanted = {
            "steps": f"an integer from 1 to {MAX_STEPS}", "guidance_scale": "a number >= 0", "img_scale_factor": "a number >= 0",
            "top_p": "a number in (0, 1]", "temperature": "a number >= 0", "max_new_tokens": "an integer >= 1",
            "seed": f"an integer from 0 to {MAX_SEED}", "scheduler": f"one of {sorted(SCHEDULERS)}", "scorer": "a scorer spec",
            "context_length": "an integer >= 1 (the LM positions the model was trained on)",
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{source}: {name} is {value!r}; expected {wanted[name]}")
        return self


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_FIELDS = {f.name for f in dataclasses.fields(RunSettings)}

# The library's defaults: the original GILL's (``generate_for_images_and_texts`` and its evaluations:
# 50 PNDM steps at guidance 7.5, factor 1.0, greedy, seed 42). The one place these literals are written.
LIBRARY_DEFAULTS = RunSettings(
    steps=50,
    guidance_scale=7.5,
    scheduler=None,
    img_scale_factor=1.0,
    top_p=1.0,
    temperature=0.0,
    max_new_tokens=32,
    seed=42,
    scorer="hf:openai/clip-vit-large-patch14",
    context_length=None,  # the LM's own positions (``context_limit``)
)


def context_limit(settings: RunSettings, lm_positions: int | None, source: str = "run settings") -> int | None:
    """The positions a run may use: the settings' ``context_length``, else the LM's own (None: unbounded).
    A ``context_length`` above the LM's positions is refused (``ValueError`` naming both): the model
    directory says something about its LM that cannot be true."""
    wanted = settings.context_length
    if wanted is None:
        return lm_positions
    if lm_positions is not None and wanted > lm_positions:
        raise ValueError(f"{source}: context_length is {wanted}, more than its LM's {lm_positions} positions; "
                         f"give at most {lm_positions}, or leave it out to use the LM's own")
    return wanted


def resolve_settings(explicit: RunSettings | dict[str, Any] | None = None,
                     model: RunSettings | None = None) -> RunSettings:
    """Explicit argument > the model's settings > ``LIBRARY_DEFAULTS``. ``explicit`` may be a dict whose
    ``None`` values mean "not given" (as argparse leaves unset flags)."""
    if isinstance(explicit, dict):
        unknown = sorted(set(explicit) - _FIELDS)
        if unknown:
            raise ValueError(f"unknown run setting(s) {unknown}; known: {sorted(_FIELDS)}")
        explicit = RunSettings(**explicit)
    explicit = (explicit or RunSettings()).validated("explicit run settings")
    return explicit.over((model or RunSettings()).over(LIBRARY_DEFAULTS))


def fill_unset(options: Any, settings: RunSettings, source: str) -> Any:
    """A copy of an options dataclass whose run-setting fields (those named as in ``RunSettings``) left at
    None are taken from ``settings``, then from ``LIBRARY_DEFAULTS``; the given ones are validated first."""
    names = [f.name for f in dataclasses.fields(options) if f.name in _FIELDS]
    given = RunSettings(**{n: getattr(options, n) for n in names}).validated(source)
    full = given.over(settings).over(LIBRARY_DEFAULTS)
    return dataclasses.replace(options, **{n: getattr(full, n) for n in names})


def resolve_scorer_path(settings: RunSettings, base: str | os.PathLike) -> RunSettings:
    """A model's ``scorer`` naming a local folder relative to its model directory (``hf:../metric``)
    made absolute, so a directory carrying its own metric model can be moved."""
    spec = settings.scorer
    if not spec or not spec.startswith("hf:"):
        return settings
    path = spec[3:]
    if os.path.isabs(path) or not (Path(base) / path).exists():
        return settings
    return dataclasses.replace(settings, scorer="hf:" + str((Path(base) / path).resolve()))
