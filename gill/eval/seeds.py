"""Where each evaluated image's initial noise comes from.

- ``PerExampleSeeds`` (the ``clean`` protocol): example ``id`` gets seed ``base + hash(id)``, so its image
  does not depend on batching, order, sharding or which other examples run.
- ``SeedStream`` (the ``original`` protocol): one generator seeded ``base`` once and consumed in dataset
  order, one draw of the initial latents per example, as the original's loop that passes one
  ``torch.Generator`` to every Stable Diffusion call. Draw ``k`` is replayed here for the example at
  position ``k``, so batches, resumes and shards still give each example the original's noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Noise:
    """A batch's noise: per-image seeds or the initial latents themselves, and what records say of it."""

    seeds: list[int] | None
    latents: torch.Tensor | None
    labels: list[dict[str, int]]  # per image, e.g. {"seed": 1234} or {"seed": 42, "draw": 17}


def stable_seed(base: int, example_id: str) -> int:
    """A per-example seed that does not depend on batching or order."""
    return base + int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 1_000_000


@dataclass
class PerExampleSeeds:
    base: int

    def noise(self, ids: list[str], positions: list[int]) -> Noise:
        seeds = [stable_seed(self.base, i) for i in ids]
        return Noise(seeds, None, [{"seed": s} for s in seeds])


class SeedStream:
    """Draw ``k`` of ``torch.randn(shape, generator=Generator(device).manual_seed(base), dtype=dtype)``,
    repeated; ``latents(positions)`` replays the stream forward (and restarts it for an earlier position)."""

    def __init__(self, base: int, shape: tuple[int, ...], *, device: Any = "cpu", dtype: torch.dtype = torch.float32):
        self.base, self.shape, self.device, self.dtype = base, tuple(shape), torch.device(device), dtype
        self._restart()

    def _restart(self) -> None:
        self._generator = torch.Generator(device=self.device).manual_seed(self.base)
        self._next = 0

    def draw(self, position: int) -> torch.Tensor:
        if position < 0:
            raise ValueError(f"a stream position is >= 0, got {position}")
        if position < self._next:
            self._restart()
        while True:
            x = torch.randn(self.shape, generator=self._generator, device=self.device, dtype=self.dtype)
            self._next += 1
            if self._next - 1 == position:
                return x

    def noise(self, ids: list[str], positions: list[int]) -> Noise:
        latents = torch.cat([self.draw(p) for p in positions]) if positions else None
        return Noise(None, latents, [{"seed": self.base, "draw": p} for p in positions])


def pipeline_latent_shape(pipe: Any, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
    """The (1, C, h, w) initial latents a Stable Diffusion pipeline draws for one image."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    height, width = height or size[0] * scale, width or size[1] * scale
    return 1, pipe.unet.config.in_channels, height // scale, width // scale
