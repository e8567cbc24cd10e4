"""Run settings: how a model is best run (diffusion steps, guidance, scheduler, image frequency, sampling,
seed, the evaluation's scorer, the context it was trained on), stored with the model and resolved in one
place.

A model directory's ``config.json`` carries a ``run`` block (a ``RunSettings``); fields it leaves out
(``None``) fall back to the library's defaults, ``LIBRARY_DEFAULTS``, the one place their values are
written. ``resolve_settings`` is the one resolver: explicit argument > the model's settings > the library
default. ``GILL`` calls it once per run and hands the resolved values down to the decoder and Stable
Diffusion, which never fill a default of their own.

The front ends (the app, ``python -m gill generate``, ``gill.eval``) share one argument group,
``add_run_arguments``: the model, device, dtype and verbose flags and one flag per run setting, named as its
field (``--guidance-scale`` sets ``guidance_scale``); ``settings_from_args`` builds the ``RunSettings`` they
give, ``load_kwargs`` the keyword arguments of ``GILL.from_pretrained``.

This module imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gill.arguments import DTYPES, MAX_SEED, float_in, int_in, seed_arg

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
    edit_strength: float | None = None  # an edit's image-to-image strength, in (0, 1]: how much of the source is redrawn

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
            "edit_strength": lambda v: _number(v) and 0 < v <= 1,
        }
        wanted = {
            "steps": f"an integer from 1 to {MAX_STEPS}", "guidance_scale": "a number >= 0", "img_scale_factor": "a number >= 0",
            "top_p": "a number in (0, 1]", "temperature": "a number >= 0", "max_new_tokens": "an integer >= 1",
            "seed": f"an integer from 0 to {MAX_SEED}", "scheduler": f"one of {sorted(SCHEDULERS)}", "scorer": "a scorer spec",
            "context_length": "an integer >= 1 (the LM positions the model was trained on)",
            "edit_strength": "a number in (0, 1]",
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
    # an edit redraws 60% of the diffusion schedule from its source: SDEdit's (Meng et al. 2022) faithful-vs-
    # realistic range is 0.3-0.6; at its top, colours and small shapes change while the layout stays
    edit_strength=0.6,
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
    return as_settings(explicit).over((model or RunSettings()).over(LIBRARY_DEFAULTS))


def as_settings(explicit: RunSettings | dict[str, Any] | None, source: str = "explicit run settings") -> RunSettings:
    """``explicit`` (a RunSettings, a dict of fields or None) as validated RunSettings; an unknown field or a
    value no run can use raises ``ValueError`` naming it."""
    if isinstance(explicit, dict):
        unknown = sorted(set(explicit) - _FIELDS)
        if unknown:
            raise ValueError(f"unknown run setting(s) {unknown}; known: {sorted(_FIELDS)}")
        explicit = RunSettings(**explicit)
    return (explicit or RunSettings()).validated(source)


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


# ---- the front ends' flags -------------------------------------------------------------------------------

# earlier spellings of a run setting's flag, still read (not shown in --help): a flag is named as its field
FLAG_ALIASES = {"guidance_scale": ("--guidance",)}


def scorer_spec(text: str) -> str:
    """An argparse ``type=`` for ``--scorer``: ``hf:NAME_OR_PATH`` or ``open_clip:MODEL/PRETRAINED``."""
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("hf", "open_clip") or not name:
        raise argparse.ArgumentTypeError(f"must be 'hf:NAME_OR_PATH' or 'open_clip:MODEL/PRETRAINED', got {text!r}")
    return text


DECODING_FIELDS = ("max_new_tokens", "temperature", "top_p", "img_scale_factor")  # the decoder's run settings


def run_flags(*, scorer: bool = False, decoding: bool = True) -> dict[str, dict[str, Any]]:
    """RunSettings field -> the keyword arguments of its flag ``--FIELD-NAME`` (argparse's ``type`` or
    ``choices`` and ``help``). ``context_length`` is the model's (what it was trained on), not a flag;
    ``scorer`` (the evaluation's) only with ``scorer``; the decoder's settings (``DECODING_FIELDS``) only with
    ``decoding`` (a front end that never decodes, as the evaluation, takes no flag it would ignore)."""
    d = LIBRARY_DEFAULTS
    flags = {
        "max_new_tokens": dict(type=int_in(1), help=f"text tokens and [IMG] tokens of an answer, >= 1, at most the "
                                                    f"model's context less an [IMG] group (library: {d.max_new_tokens})"),
        "temperature": dict(type=float_in(0), help=f">= 0; 0 is greedy (library: {d.temperature:g})"),
        "top_p": dict(type=float_in(0, 1, above=True), help=f"nucleus sampling, in (0, 1] (library: {d.top_p:g})"),
        "img_scale_factor": dict(type=float_in(0), help="the original's image-frequency factor on the [IMG0] logit, "
                                                        f">= 0 (library: {d.img_scale_factor:g})"),
        "steps": dict(type=int_in(1, MAX_STEPS), help=f"diffusion steps, 1-{MAX_STEPS} (library: {d.steps})"),
        "guidance_scale": dict(type=float_in(0), help=f"classifier-free guidance scale, >= 0 (library: {d.guidance_scale:g})"),
        "scheduler": dict(choices=list(SCHEDULERS), help="diffusion scheduler (library: the pipeline's own)"),
        "seed": dict(type=seed_arg(), help=f"decoding and diffusion seed, 0-{MAX_SEED} (library: {d.seed})"),
    }
    if not decoding:
        flags = {name: kwargs for name, kwargs in flags.items() if name not in DECODING_FIELDS}
    if scorer:
        flags["scorer"] = dict(type=scorer_spec, help="the evaluation's CLIP scorer, hf:NAME_OR_PATH or "
                                                      "open_clip:MODEL/PRETRAINED (library: CLIP ViT-L/14, as the paper)")
    return flags


def add_run_arguments(parser: argparse.ArgumentParser, *, index: bool = True, verbose: bool = True,
                      scorer: bool = False, decoding: bool = True, title: str = "model and run settings",
                      helps: dict[str, str] | None = None) -> Any:
    """Add the flags every front end shares to ``parser``, as one argument group (returned): ``--model``,
    ``--index`` (with ``index``), ``--device``, ``--dtype``, ``--verbose`` (with ``verbose``; a front end with
    subcommands keeps it on its top parser), and one flag per run setting named as its field (``run_flags``:
    ``scorer`` and ``decoding`` as there), each left unset (None) unless given: the model's setting, else the
    library's. ``helps``: a front end's own help text for a flag, by its destination (``{"device": ...}``)."""
    from gill.presets import DEFAULT_MODEL

    helps = helps or {}

    group = parser.add_argument_group(title, "each run setting left out is the model's (its config.json's run "
                                             "block), else the library's")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model directory, preset or Hub repo id (default: {DEFAULT_MODEL}, the offline toy world)")
    if index:
        group.add_argument("--index", default=None, help="retrieval index directory (default: the model's own corpus)")
    group.add_argument("--device", default=None, help=helps.get("device", "e.g. cuda (default: cpu)"))
    group.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help=helps.get("dtype", "the backbones' dtype (default: as stored)"))
    if verbose:
        group.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    for name, kwargs in run_flags(scorer=scorer, decoding=decoding).items():
        kwargs = {**kwargs, "help": helps.get(name, kwargs["help"])}
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)
        for alias in FLAG_ALIASES.get(name, ()):
            group.add_argument(alias, dest=name, default=None, **{**kwargs, "help": argparse.SUPPRESS})
    return group


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run settings given on a command line with ``add_run_arguments``'s flags (unset fields None)."""
    return RunSettings(**{name: getattr(args, name) for name in _FIELDS if hasattr(args, name)})


def settings_for(gill: Any, args: argparse.Namespace) -> RunSettings:
    """The run settings a front end's flags give, resolved against ``gill``'s (a ``GILL``) and the library's."""
    return gill.run_settings(settings_from_args(args))


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``GILL.from_pretrained``'s keyword arguments from ``add_run_arguments``'s flags (``--model`` is its
    first argument): ``GILL.from_pretrained(args.model, **load_kwargs(args))``."""
    from gill.arguments import torch_dtype

    kwargs = {"torch_dtype": torch_dtype(args.dtype), "device": args.device}
    if hasattr(args, "index"):
        kwargs["index"] = args.index
    return kwargs
