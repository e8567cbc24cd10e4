"""Independent calls on one GILL from several threads get exactly the answers they get one at a time."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gill import GILL
from gill.diffusion import DiffusionOptions

PROMPTS = [["a red circle"], ["a large blue square on the left"], ["a small green triangle moves to the right"],
           ["a yellow circle next to it and a red square"]]


@pytest.fixture(scope="module")
def gill():
    g = GILL.from_pretrained("tiny-random")
    torch.manual_seed(0)
    with torch.no_grad():  # large [IMG] rows: the tiny model answers with images too
        g.model.adapter.img_embeddings.normal_(0, 1.0)
    return g


def fingerprint(segments) -> list[tuple]:
    """What a person sees of an answer: texts, and each image's kind, pixels and provenance."""
    out = []
    for s in segments:
        if hasattr(s, "text"):
            out.append(("text", s.text))
        else:
            out.append((type(s).__name__, s.image.tobytes() if s.image is not None else None,
                        getattr(s, "source", None), s.decision.choice))
    return out


@pytest.mark.parametrize("backend", ["static", "hf"])
@pytest.mark.parametrize("call", ["generate_interleaved", "stream"])
def test_threads_get_the_answers_they_get_alone(gill, backend, call):
    def answer(prompt):
        kwargs = dict(policy="both", max_new_tokens=12, backend=backend, img_scale_factor=3.0,
                      diffusion=DiffusionOptions(steps=2, seed=1))
        if call == "stream":
            return fingerprint(list(gill.stream(prompt, **kwargs)))
        return fingerprint(gill.generate_interleaved(prompt, **kwargs))

    alone = [answer(p) for p in PROMPTS]
    assert len({repr(a) for a in alone}) == len(PROMPTS)  # the prompts do get different answers
    assert any(kind != "text" for a in alone for kind, *_ in a)  # and images, so diffusion runs concurrently
    jobs = [i for i in range(len(PROMPTS)) for _ in range(3)]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda i: answer(PROMPTS[i]), jobs))
    wrong = [i for i, got in zip(jobs, together) if got != alone[i]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} concurrent answers differ from the same call alone"
