import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def same_segments(a: list, b: list) -> None:
    """Two answers are the same: the same kinds in order, identical texts, the same decisions, retrieved
    pictures of the same item and generated pictures equal pixel for pixel."""
    from gill import GeneratedImage, RetrievedImage, Text

    assert [type(s).__name__ for s in a] == [type(s).__name__ for s in b], (a, b)
    for x, y in zip(a, b):
        if isinstance(x, Text):
            assert x.text == y.text
            continue
        assert x.decision == y.decision
        if isinstance(x, RetrievedImage):
            assert (x.source, x.sha256, x.caption) == (y.source, y.sha256, y.caption)
            assert x.score == pytest.approx(y.score, abs=1e-5)
        if isinstance(x, (GeneratedImage, RetrievedImage)):
            assert x.image.size == y.image.size
            assert np.array_equal(np.asarray(x.image), np.asarray(y.image))


@pytest.fixture(scope="module")
def quick_start():
    """The README's first block run as written, with each ``gill.stream`` call's arguments and segments
    recorded (the README's own loop only passes over them)."""
    from gill import GILL

    streamed = []
    real = GILL.stream

    def recording(self, *args, **kwargs):
        segments = []
        streamed.append((args, kwargs, segments))
        for s in real(self, *args, **kwargs):
            segments.append(s)
            yield s

    scope: dict = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(GILL, "stream", recording)
    try:
        exec(compile(python_blocks()[0], "README.md", "exec"), scope)
    finally:
        mp.undo()
    scope["streamed"] = streamed
    return scope


def test_readme_answer_is_the_worlds_answer_with_its_picture(quick_start):
    """The README's chat ("it moves to the right.") gets the toy world's own answer and a picture of it."""
    from gill import GeneratedImage, RetrievedImage, Text
    from training.toy import world

    answer = quick_start["answer"]
    said = world.Scene("red", "circle", "large", "left", "white")
    shown = quick_start["gill"].img_tokens.text  # the first answer's picture, as a chat feeds it back
    assert quick_start["chat"] == [f"Q: {said.caption()}.\nA: {said.caption()}.{shown}\nQ: it moves to the right.\nA:"]
    moved = world.Scene("red", "circle", "large", "right", "white")
    assert isinstance(answer[0], Text) and answer[0].text.strip() == world.now_it_is(moved), answer
    pictures = [s.image for s in answer if isinstance(s, (GeneratedImage, RetrievedImage))]
    assert len(pictures) == 1, answer
    assert world.scenes_shown(pictures)[0].composition == moved.composition, answer


def test_readme_batch_rows_are_each_prompts_own_answer(quick_start):
    """Each row of the README's batch is the answer its prompt gets alone (same settings), and the two
    prompts' answers are their own, not one row repeated."""
    from gill import DiffusionOptions

    gill, batch = quick_start["gill"], quick_start["batch"]
    prompts = [["a red circle"], ["a blue square"]]
    assert len(batch) == len(prompts)
    for prompt, row in zip(prompts, batch):
        alone = gill.generate_interleaved(prompt, max_new_tokens=8, diffusion=DiffusionOptions(steps=2, seed=0))
        assert row and all(type(s).__name__ in ("Text", "GeneratedImage", "RetrievedImage") for s in row)
        same_segments(row, alone)
    texts = ["".join(getattr(s, "text", "") for s in row) for row in batch]
    assert texts[0] != texts[1], texts


def test_readme_stream_loop_yields_generate_interleaveds_answer(quick_start):
    """The README's stream loop yields exactly what generate_interleaved answers to the same call."""
    gill, streamed = quick_start["gill"], quick_start["streamed"]
    assert len(streamed) == 1
    args, kwargs, segments = streamed[0]
    assert segments, "the README's stream loop yielded nothing"
    same_segments(segments, gill.generate_interleaved(*args, **kwargs))


@pytest.mark.parametrize("policy", ["auto", "both"])
def test_stream_and_generate_interleaved_agree_on_images(quick_start, policy):
    """On the README's chat, which is answered with pictures: streamed segments equal generate_interleaved's
    for the same seed, texts identical and pictures (retrieved, and generated: "both") pixel-equal."""
    from gill import DiffusionOptions, GeneratedImage, RetrievedImage

    gill = quick_start["gill"]
    chat = quick_start["chat"]
    kw = dict(policy=policy, max_new_tokens=24, diffusion=DiffusionOptions(steps=2), seed=7)
    streamed = list(gill.stream(chat, **kw))
    answered = gill.generate_interleaved(chat, **kw)
    kinds = {type(s) for s in answered}
    assert RetrievedImage in kinds and (policy == "auto" or GeneratedImage in kinds), answered
    same_segments(streamed, answered)


def test_readme_model_quick_start_runs():
    scope: dict = {}
    exec(compile(python_blocks()[1], "README.md", "exec"), scope)
    assert scope["gen"].shape == (1, scope["config"].gen_seq_len, scope["config"].gen_emb_dim)
    assert scope["scores"].shape == (1, 1)


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'
    assert command in README.read_text() and command in ci
