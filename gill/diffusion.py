"""Image generation: GILL's mapper output drives a stock diffusers pipeline through ``prompt_embeds``.

Works with ``StableDiffusionPipeline`` and any SD-family pipeline whose ``__call__`` takes
``prompt_embeds`` (and ``negative_prompt_embeds``). Edits (``DiffusionGenerator.edit``) draw with diffusers'
stock image-to-image pipeline of the same family, built from the loaded pipeline's own components
(``AutoPipelineForImage2Image.from_pipe``: the same UNet, VAE and text encoder objects, no second copy).
diffusers is imported where used.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gill.settings import SCHEDULERS, RunSettings

MAX_IMAGE_SIDE = 2048  # pixels: SD v1.5 draws 512, SDXL 1024; larger sides are refused before any latent is made
MAX_TORCH_SEED = 2**64 - 1  # what a torch.Generator takes


@dataclass
class DiffusionOptions:
    """Diffusion options: values, read as given. ``GILL`` sets the run settings among them (steps,
    guidance_scale, scheduler, seed) from a call's resolved settings (``gill.run``); called directly, those
    left None are the pipeline's own (its call's default steps and guidance: SD v1.5's 50 and 7.5; its
    scheduler), and an unset seed draws unseeded."""

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None  # image i of a call uses seed + i
    scheduler: str | None = None  # one of SCHEDULERS; None keeps the pipeline's (SD v1.5: PNDM)
    # an edit's image-to-image strength in (0, 1]: the share of the schedule redrawn from the noised source
    # (None: the image-to-image pipeline's own, diffusers' 0.8)
    edit_strength: float | None = None
    height: int | None = None
    width: int | None = None
    # (1, L, D) or (G, L, D) conditioning for classifier-free guidance; None encodes the empty prompt.
    negative_prompt_embeds: torch.Tensor | None = None

    def validated(self) -> DiffusionOptions:
        """Raise naming the field for a value no draw can use (the run settings by ``RunSettings``' rules)."""
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8
                                      or value > MAX_IMAGE_SIDE):
                raise ValueError(f"diffusion options: {name} is {value!r}; expected a multiple of 8 from 8 to "
                                 f"{MAX_IMAGE_SIDE}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"diffusion options: scheduler is {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        RunSettings(steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed, scheduler=self.scheduler,
                    edit_strength=self.edit_strength).validated("diffusion options")
        return self


class DiffusionGenerator:
    """Wraps a diffusers pipeline; one ``generate`` call renders every image slot of a batch.

    A call's options are its own: a scheduler asked for by one call is put on the pipeline for that call
    only and the pipeline's own is put back after it, so calls that leave ``scheduler`` unset always draw
    with the pipeline's (the one it was loaded with, or one its owner set on ``pipe.scheduler``)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        # a diffusers pipeline keeps per-call state (its scheduler's timesteps): one call at a time
        self._lock = threading.Lock()

    def scheduler_for(self, name: str | None) -> Any:
        """The scheduler a call with ``scheduler=name`` draws with (None: the pipeline's own): a fresh one
        built from the pipeline's own scheduler config (milliseconds); the pipeline is not changed."""
        own = self.pipe.scheduler
        if name is None:
            return own
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
        import diffusers

        return getattr(diffusers, SCHEDULERS[name]).from_config(own.config)

    @contextlib.contextmanager
    def scheduled(self, name: str | None) -> Iterator[Any]:
        """The pipeline, to itself (one call at a time) and drawing with scheduler ``name`` (None: its own)
        inside the block; its own scheduler is back after it. For callers that drive ``pipe`` directly."""
        with self._lock:
            own = self.pipe.scheduler
            self.pipe.scheduler = self.scheduler_for(name)
            try:
                yield self.pipe
            finally:
                self.pipe.scheduler = own

    @torch.no_grad()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        options: DiffusionOptions | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        seeds: list[int] | None = None,
        latents: torch.Tensor | None = None,
    ) -> list[Any]:
        """(G, L, D) conditioning -> G PIL images. Image i is seeded with ``seeds[i]`` if given, else with
        ``options.seed + i``; or starts from ``latents[i]`` (the initial noise itself, (G, C, h, w), as a
        seed stream shared across calls gives it). Without negative embeddings the pipeline encodes the
        empty prompt, as the original did."""
        options = (options or DiffusionOptions()).validated()
        with self.scheduled(options.scheduler):
            return self._generate(prompt_embeds, options, negative_prompt_embeds, seeds, latents)

    def _generate(self, prompt_embeds: torch.Tensor, options: DiffusionOptions,
                  negative_prompt_embeds: torch.Tensor | None, seeds: list[int] | None,
                  latents: torch.Tensor | None = None) -> list[Any]:
        if latents is not None and seeds is not None:
            raise ValueError("give seeds or latents, not both")
        if latents is not None and len(latents) != len(prompt_embeds):
            raise ValueError(f"{len(latents)} latents for {len(prompt_embeds)} images")
        kwargs = self._call_kwargs(prompt_embeds, options, negative_prompt_embeds, seeds, seeded=latents is None)
        if latents is not None:
            kwargs["latents"] = latents.to(kwargs["prompt_embeds"].device)
        if options.height is not None:
            kwargs["height"] = options.height
        if options.width is not None:
            kwargs["width"] = options.width
        return list(self.pipe(**kwargs).images)

    def _call_kwargs(self, prompt_embeds: torch.Tensor, options: DiffusionOptions,
                     negative_prompt_embeds: torch.Tensor | None, seeds: list[int] | None,
                     seeded: bool = True) -> dict[str, Any]:
        """What a draw and an edit hand the pipeline alike: the conditioning (and the negative one), one seeded
        generator per image (``seeds``, else ``options.seed + i`` where ``seeded``), steps and guidance."""
        if negative_prompt_embeds is None:
            negative_prompt_embeds = options.negative_prompt_embeds
        device = getattr(self.pipe, "device", torch.device("cpu"))
        if seeds is None and seeded and options.seed is not None:
            seeds = [options.seed + i for i in range(len(prompt_embeds))]
        generator = None
        if seeds is not None:
            if len(seeds) != len(prompt_embeds):
                raise ValueError(f"{len(seeds)} seeds for {len(prompt_embeds)} images")
            bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_TORCH_SEED]
            if bad:
                raise ValueError(f"seeds: {bad[0]!r} is not an integer from 0 to {MAX_TORCH_SEED}")
            generator = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == 1 < prompt_embeds.shape[0]:
            negative_prompt_embeds = negative_prompt_embeds.expand(prompt_embeds.shape[0], -1, -1)
        kwargs = dict(prompt_embeds=prompt_embeds.to(device), generator=generator, output_type="pil")
        if options.steps is not None:  # else the pipeline's own
            kwargs["num_inference_steps"] = options.steps
        if options.guidance_scale is not None:
            kwargs["guidance_scale"] = options.guidance_scale
        if negative_prompt_embeds is not None:
            kwargs["negative_prompt_embeds"] = negative_prompt_embeds.to(device)
        return kwargs

    # ---- edits: image-to-image from a source picture ------------------------------------------------------

    def image_to_image(self, pipe: Any = None) -> Any:
        """diffusers' stock image-to-image pipeline of ``pipe``'s family (default: this generator's pipeline),
        built from its components: the very same UNet, VAE, text encoder and scheduler objects (no weights are
        copied; milliseconds). Its progress-bar setting is the pipeline's."""
        from diffusers import AutoPipelineForImage2Image

        pipe = self.pipe if pipe is None else pipe
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        progress = getattr(pipe, "_progress_bar_config", None)
        if progress is not None:
            img2img.set_progress_bar_config(**progress)
        return img2img

    def draw_size(self, options: DiffusionOptions) -> tuple[int, int]:
        """(width, height) of a draw with ``options``: theirs where set, else the pipeline's default (its UNet's
        sample size times the VAE's scale factor, as diffusers' text-to-image call takes it)."""
        side = self.pipe.unet.config.sample_size * getattr(self.pipe, "vae_scale_factor", 8)
        return options.width or side, options.height or side

    @torch.no_grad()
    def edit(
        self,
        prompt_embeds: torch.Tensor,
        images: list[Any],
        options: DiffusionOptions | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        seeds: list[int] | None = None,
    ) -> list[Any]:
        """(G, L, D) conditioning and G source pictures -> G PIL images: each source, noised to
        ``options.edit_strength`` of the schedule, redrawn under its conditioning by the stock image-to-image
        pipeline (``image_to_image``). Sources are resized to the size a draw has (``draw_size``), so an edit
        is the size of a generated image. Seeds, steps, guidance and scheduler as in ``generate``; an edit
        runs ``int(steps * edit_strength)`` of the steps (diffusers' rule), so a pair that leaves none is
        refused naming both."""
        from PIL import Image

        options = (options or DiffusionOptions()).validated()
        if len(images) != len(prompt_embeds):
            raise ValueError(f"{len(images)} source pictures for {len(prompt_embeds)} edits")
        if options.steps is not None and options.edit_strength is not None \
                and int(options.steps * options.edit_strength) < 1:
            raise ValueError(f"an edit at edit_strength {options.edit_strength:g} with {options.steps} diffusion steps "
                             f"runs none of them; give steps >= {math.ceil(1 / options.edit_strength)} or a larger "
                             "edit_strength")
        size = self.draw_size(options)
        sources = [im.convert("RGB").resize(size, Image.BICUBIC) if im.size != size or im.mode != "RGB" else im
                   for im in images]
        kwargs = self._call_kwargs(prompt_embeds, options, negative_prompt_embeds, seeds)
        kwargs["image"] = sources
        if options.edit_strength is not None:
            kwargs["strength"] = options.edit_strength
        with self._lock:  # built around the pipeline's own scheduler, then given the call's (as ``scheduled``)
            img2img = self.image_to_image()
            img2img.scheduler = self.scheduler_for(options.scheduler)
            return list(img2img(**kwargs).images)


def speed_up_pipeline(pipe: Any, *, channels_last: bool = True, compile: bool = False,
                      compile_mode: str | None = "max-autotune") -> Any:
    """Opt-in speed-ups of a stock diffusers pipeline, in place, without forking it; returns the pipeline.

    ``channels_last``: the UNet and the VAE in the channels-last memory format (faster convolutions on
    GPUs). ``compile``: ``torch.compile`` of the UNet and of the VAE decoder (``fullgraph``); the first call
    at a given image size compiles (minutes at SD v1.5 size), later calls at that size reuse it. Attention
    is diffusers' default scaled-dot-product kernel already. Precision is the caller's (``torch_dtype``).
    Off by default: on CPU compiling costs more than it saves for a few images.
    """
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    return pipe
