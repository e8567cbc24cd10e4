"""One call's options, resolved once: what ``GILL.generate_interleaved`` and ``GILL.stream`` hand down.

A call gives its run settings as a ``RunSettings`` (``settings=``, what the front ends build from their
flags), as keyword arguments named as its fields (``seed=``, ``max_new_tokens=``, ...), or inside the
``DecodeOptions`` / ``DiffusionOptions`` it passes; fields left None there are unset. ``resolve_run`` takes
them once against the model's settings and the library's defaults (``gill.settings.resolve_settings``) and
returns the decoder's and Stable Diffusion's options with every run setting set: the lower layers read
values, they fill nothing in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gill.diffusion import DiffusionOptions
from gill.generate import DecodeOptions
from gill.settings import RunSettings, as_settings, resolve_settings

DECODE_SETTINGS = ("max_new_tokens", "temperature", "top_p", "img_scale_factor")  # DecodeOptions' run settings
DIFFUSION_SETTINGS = ("steps", "guidance_scale", "scheduler", "seed", "edit_strength")  # DiffusionOptions' run settings


@dataclass(frozen=True)
class Run:
    """A call's options with every run setting resolved."""

    settings: RunSettings  # explicit > the model's > the library's; ``seed`` seeds decoding
    decode: DecodeOptions  # the decoder's options
    diffusion: DiffusionOptions  # Stable Diffusion's; its seed is the options' own if given, else ``settings.seed``


def _given(options: Any, names: tuple[str, ...]) -> RunSettings:
    """The run settings set in a (validated) options object."""
    return RunSettings(**{n: getattr(options, n) for n in names})


def resolve_run(model: RunSettings, *, settings: RunSettings | dict[str, Any] | None = None,
                options: DecodeOptions | None = None, diffusion: DiffusionOptions | None = None,
                seed: int | None = None, overrides: dict[str, Any] | None = None) -> Run:
    """Resolve a call's options once. Explicit values, most specific first: ``seed`` and ``overrides``
    (``DecodeOptions`` fields by name), then the fields set in ``options`` and ``diffusion``, then
    ``settings``; then the model's settings (``model``), then the library's defaults. The decoding seed is
    the resolved ``seed``; Stable Diffusion's is ``diffusion.seed`` where given, else that one.
    ``ValueError`` names a value no run can use (before anything runs)."""
    decode = replace(options or DecodeOptions(), **(overrides or {})).validated()
    explicit = RunSettings(seed=seed).validated("explicit run settings").over(_given(decode, DECODE_SETTINGS))
    diffusion = (diffusion or DiffusionOptions()).validated()
    explicit = explicit.over(_given(diffusion, DIFFUSION_SETTINGS)).over(as_settings(settings))
    resolved = resolve_settings(explicit, model)
    drawn = {n: getattr(resolved, n) for n in DIFFUSION_SETTINGS}
    if diffusion.seed is not None:
        drawn["seed"] = diffusion.seed
    return Run(resolved, replace(decode, **{n: getattr(resolved, n) for n in DECODE_SETTINGS}),
               replace(diffusion, **drawn))
