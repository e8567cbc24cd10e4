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


def conv_weights(module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_channels_last_puts_the_unet_and_vae_in_that_format_and_gives_the_same_images():
    """Every (non-1x1) convolution weight of the UNet and the VAE is laid out channels-last, which the stock
    pipeline's are not, and the images equal the stock pipeline's."""
    stock_pipe = tiny_stable_diffusion(64, 16, image_size=32)
    stock = images(stock_pipe)
    pipe = speed_up_pipeline(tiny_stable_diffusion(64, 16, image_size=32), channels_last=True)
    for part in (pipe.unet, pipe.vae):
        weights = conv_weights(part)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(stock_pipe.unet))
    fast = images(pipe)
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
