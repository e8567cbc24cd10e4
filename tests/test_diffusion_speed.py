"""The opt-in diffusion speed-ups leave the images as they were: channels-last memory format, and
torch.compile of the UNet and the VAE decoder (compiled once per image size)."""

import numpy as np
import pytest
import torch

from gill.backbones import tiny_stable_diffusion
from gill.diffusion import speed_up_pipeline


def images(pipe, seed=0):
    torch.manual_seed(1)
    cond = torch.randn(2, 16, 64)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_inference_steps=3,
               guidance_scale=7.5, output_type="np", generator=torch.Generator().manual_seed(seed)).images
    return np.asarray(out)


def test_channels_last_gives_the_same_images():
    stock = images(tiny_stable_diffusion(64, 16, image_size=32))
    fast = images(speed_up_pipeline(tiny_stable_diffusion(64, 16, image_size=32), channels_last=True))
    assert stock.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(fast, stock, atol=1e-4)


@pytest.mark.slow  # inductor compiles C++ on the CPU: about a minute
def test_a_compiled_pipeline_gives_the_same_images_and_compiles_once_per_size():
    from torch._dynamo.utils import counters

    stock = images(tiny_stable_diffusion(64, 16, image_size=32))
    torch._dynamo.reset()
    counters.clear()
    pipe = speed_up_pipeline(tiny_stable_diffusion(64, 16, image_size=32), channels_last=False, compile=True,
                             compile_mode=None)
    first = images(pipe)
    graphs = counters["stats"]["unique_graphs"]
    again = images(pipe, seed=3)
    np.testing.assert_allclose(first, stock, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == graphs > 0  # the second call at the same size compiled nothing
    assert not np.allclose(again, first)  # (another seed: a real call, not a cached image)
