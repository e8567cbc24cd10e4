"""A call's run settings are resolved once (``gill.run.resolve_run``): the most specific explicit value wins, then
the model's, then the library's; the lower layers (the decoder, Stable Diffusion) read values and fill nothing in."""

from __future__ import annotations

import pytest
import torch

from gill.diffusion import DiffusionGenerator, DiffusionOptions
from gill.generate import DecodeOptions
from gill.run import resolve_run
from gill.settings import LIBRARY_DEFAULTS, RunSettings

MODEL = RunSettings(steps=25, guidance_scale=4.0, img_scale_factor=1.1, seed=9)


def test_nothing_given_is_the_models_then_the_librarys():
    run = resolve_run(MODEL)
    assert run.settings == MODEL.over(LIBRARY_DEFAULTS)
    assert (run.diffusion.steps, run.diffusion.guidance_scale, run.diffusion.scheduler, run.diffusion.seed) == (25, 4.0, None, 9)
    d = run.decode
    assert (d.max_new_tokens, d.temperature, d.top_p, d.img_scale_factor) == (32, 0.0, 1.0, 1.1)


def test_the_most_specific_value_wins():
    """seed= and keyword overrides > the options' own fields > settings= > the model's > the library's."""
    run = resolve_run(MODEL, settings=RunSettings(steps=3, temperature=0.5, top_p=0.7, seed=1, scheduler="ddim"),
                      options=DecodeOptions(temperature=0.8), diffusion=DiffusionOptions(steps=4),
                      overrides={"top_p": 0.6})
    assert (run.settings.steps, run.settings.temperature, run.settings.top_p, run.settings.seed) == (4, 0.8, 0.6, 1)
    assert (run.diffusion.steps, run.diffusion.scheduler, run.diffusion.guidance_scale) == (4, "ddim", 4.0)
    assert (run.decode.temperature, run.decode.top_p, run.decode.img_scale_factor) == (0.8, 0.6, 1.1)


@pytest.mark.parametrize("seed, diffusion_seed, settings_seed, decoding, drawing", [
    (None, None, None, 9, 9),  # the model's
    (None, None, 3, 3, 3),  # settings=
    (None, 5, 3, 5, 5),  # the diffusion options' seed seeds decoding too
    (7, 5, 3, 7, 5),  # seed= seeds decoding; the diffusion options keep their own
    (7, None, 3, 7, 7),
])
def test_seeds(seed, diffusion_seed, settings_seed, decoding, drawing):
    run = resolve_run(MODEL, seed=seed, diffusion=DiffusionOptions(seed=diffusion_seed),
                      settings=RunSettings(seed=settings_seed))
    assert (run.settings.seed, run.diffusion.seed) == (decoding, drawing)


def test_a_bad_or_unknown_setting_is_named():
    with pytest.raises(ValueError, match="unknown run setting"):
        resolve_run(MODEL, settings={"guidance": 2.0})
    with pytest.raises(ValueError, match="explicit run settings: top_p is 0"):
        resolve_run(MODEL, settings={"top_p": 0})
    with pytest.raises(ValueError, match="decoding options: temperature is -1"):
        resolve_run(MODEL, overrides={"temperature": -1})
    with pytest.raises(ValueError, match="diffusion options: guidance_scale is -2"):
        resolve_run(MODEL, diffusion=DiffusionOptions(guidance_scale=-2.0))


def test_the_decoder_fills_no_default(tiny_opt):
    from gill.generate import decode
    from gill.model import GILLModel

    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    embeds = torch.randn(1, 3, model.lm.config.hidden_size)
    with pytest.raises(ValueError, match="max_new_tokens is not set"):
        decode(model, embeds, torch.ones(1, 3, dtype=torch.long), DecodeOptions())


def test_stable_diffusion_gets_only_what_is_given():
    """Unset steps and guidance are the pipeline's own: no kwarg is passed (not the library's 50 and 7.5)."""
    calls = []

    class Pipe:
        scheduler = None
        device = torch.device("cpu")

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return type("Out", (), {"images": ["image"] * len(kwargs["prompt_embeds"])})()

    generator = DiffusionGenerator(Pipe())
    generator.generate(torch.zeros(1, 4, 8), DiffusionOptions(seed=1))
    assert "num_inference_steps" not in calls[-1] and "guidance_scale" not in calls[-1]
    generator.generate(torch.zeros(1, 4, 8), DiffusionOptions(steps=3, guidance_scale=2.0))
    assert (calls[-1]["num_inference_steps"], calls[-1]["guidance_scale"], calls[-1]["generator"]) == (3, 2.0, None)
