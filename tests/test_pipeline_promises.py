"""What GILL's answers promise, checked against values computed apart from the pipeline: the decision's
numbers are the decision head's own softmax on the [IMG0] state, and ``truncate=True`` drops the oldest part."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from gill.diffusion import DiffusionOptions
from gill.pipeline import GeneratedImage, RetrievedImage, Text
from gill.settings import RunSettings

FAST = DiffusionOptions(steps=2, seed=0)


def head_probs_by_hand(gill, prompt: str, groups: int) -> torch.Tensor:
    """(groups, 2) softmax of the decision head's linear layer on the last-layer state of each [IMG0] of
    ``prompt`` followed by ``groups`` [IMG] groups: one plain forward of the LM, no cache, no pipeline."""
    model = gill.model
    ids = gill.tokenizer(prompt)["input_ids"] + list(gill.img_tokens.ids) * groups
    ids = torch.tensor([ids])
    lm_rows = model.lm.get_input_embeddings().weight
    rows = []
    for i in ids[0].tolist():
        if i in gill.img_tokens.ids:
            rows.append(model.adapter.img_embeddings[gill.img_tokens.ids.index(i)])  # [IMG] rows are the adapter's
        else:
            rows.append(lm_rows[i])
    with torch.no_grad():
        out = model.lm(inputs_embeds=torch.stack(rows)[None], output_hidden_states=True)
        last = out.hidden_states[-1][0]
        n = len(gill.img_tokens.ids)
        start = ids.shape[1] - groups * n
        img0 = last[[start + g * n for g in range(groups)]]  # each group's first token
        head = gill.decision.linear
        return (img0 @ head.weight.T + head.bias).softmax(-1)


@pytest.mark.parametrize("shift", [None, "middle"])
def test_decisions_are_the_heads_softmax_on_the_img0_state(tiny_gill, monkeypatch, shift):
    """Each image's p_gen and p_ret are the head's softmax on its [IMG0] state, computed here by hand, and
    ``auto`` takes the larger. ``middle``: the head's bias moved so that the answer's slots fall on both sides."""
    gill = tiny_gill
    prompt = "a large green triangle moves to the right"
    # a huge image factor makes [IMG0] the first token and again after each group (the original's forced image)
    kw = dict(max_new_tokens=24, img_scale_factor=1e5, diffusion=FAST)
    groups = 24 // len(gill.img_tokens.ids)
    if shift:
        probs = head_probs_by_hand(gill, prompt, groups)
        logit_gap = (probs[:, 1].log() - probs[:, 0].log()).sort().values  # ret - gen, per slot
        head = copy.deepcopy(gill.decision)
        with torch.no_grad():  # put the gap's zero between the smallest and the next
            head.linear.bias[1] -= float(logit_gap[0] + logit_gap[1]) / 2
        monkeypatch.setattr(gill, "decision", head)
    expected = head_probs_by_hand(gill, prompt, groups)
    out = gill.generate_interleaved([prompt], **kw)
    images = [s for s in out if not isinstance(s, Text)]
    assert len(images) == groups and not any(isinstance(s, Text) for s in out), out
    for s, (p_gen, p_ret) in zip(images, expected.tolist()):
        assert s.decision.policy == "auto"
        assert s.decision.p_gen == pytest.approx(p_gen, abs=1e-5)
        assert s.decision.p_ret == pytest.approx(p_ret, abs=1e-5)
        kind = "ret" if p_ret > p_gen else "gen"
        assert s.decision.choice == kind
        assert isinstance(s, RetrievedImage if kind == "ret" else GeneratedImage)
    if shift:  # both branches taken in one answer
        assert {s.decision.choice for s in images} == {"gen", "ret"}, images


def answer_key(segments) -> list:
    """An answer's content: texts, each image's kind, decision numbers and pixels."""
    key = []
    for s in segments:
        if isinstance(s, Text):
            key.append(s.text)
        else:
            key.append((type(s).__name__, round(s.decision.p_ret, 5), np.asarray(s.image).tobytes()))
    return key


def test_truncate_drops_the_oldest_items(tiny_gill, monkeypatch):
    """A conversation of an old picture, a new picture and a question, in a context that holds only the new
    picture and the question: with ``truncate=True`` the answer is exactly the answer to the conversation
    without its old picture, and differs from what keeping the old picture instead gives."""
    gill = tiny_gill
    old, new = Image.new("RGB", (40, 40), "blue"), Image.new("RGB", (40, 40), (250, 220, 10))
    question = "what is it and where does it move"
    kw = dict(max_new_tokens=16, img_scale_factor=3.0, diffusion=FAST)
    kept = gill.prompt_length([new, question])
    n = kept + gill.answer_room(kw["max_new_tokens"])  # room for the new picture and the question, no more
    monkeypatch.setattr(gill, "settings", RunSettings(**{**gill.settings.to_dict(), "context_length": n}))
    assert gill.prompt_length([old, new, question]) == kept + gill.model.config.n_visual_tokens
    truncated = gill.generate_interleaved([old, new, question], truncate=True, **kw)
    without_old = gill.generate_interleaved([new, question], **kw)
    without_new = gill.generate_interleaved([old, question], **kw)
    assert answer_key(truncated) == answer_key(without_old)
    assert answer_key(without_new) != answer_key(without_old)  # which picture is kept changes the answer
