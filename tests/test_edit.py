"""Edits beside retrieve and generate (issue 39), with the tiny random pipeline: Stable Diffusion's stock
image-to-image pipeline, built from the loaded pipeline's own components, redraws the conversation's last
picture (or the best retrieved one) under the mapper's prompt embeddings, at the run's edit strength and seed;
a three-way decision head chooses it, a two-way one never does unless asked; every front end says where an
edited picture came from."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from PIL import Image

from gill.pipeline import GILL, EditedImage, EditSource, GeneratedImage, NoEditSourceError, RetrievedImage, Text

FORCE = dict(img_scale_factor=1e5, max_new_tokens=10)  # an image at once (its 8 [IMG] tokens), then text


def picture(seed: int, size=(32, 32)) -> Image.Image:
    """A picture no other test draws: random pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def img2img_calls(monkeypatch) -> list[dict]:
    """Every image-to-image call's arguments (and the images it returned, as ``out``)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    calls = []
    real = StableDiffusionImg2ImgPipeline.__call__

    def spy(self, **kwargs):
        result = real(self, **kwargs)
        calls.append({**kwargs, "pipe": self, "out": list(result.images),
                      "seeds": [g.initial_seed() for g in kwargs["generator"] or []]})
        return result

    monkeypatch.setattr(StableDiffusionImg2ImgPipeline, "__call__", spy)
    return calls


def without_index(g: GILL) -> GILL:
    """The same model with no retrieval index: an edit has only the conversation's pictures to start from."""
    return GILL(g.model, g.tokenizer, g.image_processor, g.img_tokens, g.decision, None, g.diffusion,
                settings=g.settings)


def three_way(g: GILL, monkeypatch, favour: str) -> torch.nn.Module:
    """A three-way head (gen, ret, edit) that favours ``favour`` whatever the features."""
    from gill.decision import LABELS, DecisionHead

    head = DecisionHead(g.model.config.decision_features, 3).eval()
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        head.linear.bias[LABELS.index(favour)] = 2.0
        head.linear.weight[:, 0] = torch.tensor([0.01, -0.02, 0.03])  # probabilities that depend on the slot
    monkeypatch.setattr(g, "decision", head)
    return head


# ---- the image-to-image pipeline and what it receives ----------------------------------------------------


def test_the_img2img_pipeline_is_stock_diffusers_built_from_the_loaded_components(tiny_gill):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_gill.diffusion.pipe
    img2img = tiny_gill.diffusion.image_to_image()
    assert type(img2img) is StableDiffusionImg2ImgPipeline  # diffusers' own class, no fork
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(img2img, name) is getattr(pipe, name), name  # the same objects: no second copy


@pytest.mark.parametrize("route", ["settings", "options", "model"])
def test_an_edit_hands_img2img_the_source_the_mappers_embeddings_the_strength_and_the_seed(
        tiny_gill, img2img_calls, monkeypatch, route):
    """The source picture, the mapper's (77-style) prompt embeddings of this slot, the run's edit strength and
    seed, whichever way the strength is given: a call's settings, its DiffusionOptions, the model's own."""
    from gill.diffusion import DiffusionOptions
    from gill.settings import RunSettings

    source = picture(1)
    inputs = ["a red circle", source, "it turns blue."]
    kwargs = dict(FORCE, settings={"steps": 4, "seed": 7})
    if route == "settings":
        kwargs["settings"]["edit_strength"] = 0.5
    elif route == "options":
        kwargs["diffusion"] = DiffusionOptions(edit_strength=0.5)
    else:
        monkeypatch.setattr(tiny_gill, "settings", RunSettings(**{**tiny_gill.settings.to_dict(), "edit_strength": 0.5}))
    answer = tiny_gill.generate_interleaved(inputs, policy="edit", **kwargs)

    assert len(img2img_calls) == 1
    call = img2img_calls[0]
    assert len(call["image"]) == 1 and np.array_equal(pixels(call["image"][0]), pixels(source))
    expected = tiny_gill.image_slot_embeddings([inputs]).generation  # the mapper's output at this slot
    torch.testing.assert_close(call["prompt_embeds"], expected, rtol=1e-4, atol=1e-5)
    assert call["strength"] == 0.5 and call["num_inference_steps"] == 4 and call["seeds"] == [7]
    edited = [s for s in answer if not isinstance(s, Text)]
    assert len(edited) == 1 and isinstance(edited[0], EditedImage)
    e = edited[0]
    assert e.strength == 0.5 and e.decision.policy == "edit" and e.decision.choice == "edit"
    assert e.source.place == "attached picture 1" and np.array_equal(pixels(e.source.image), pixels(source))
    assert np.array_equal(pixels(e.image), pixels(call["out"][0]))  # the picture img2img drew


def test_a_batch_edits_each_conversations_own_picture_seeded_as_its_first_image(tiny_gill, img2img_calls):
    """Each conversation's k-th image is seeded with seed + k (as generated ones): two conversations' first
    edits both draw with the seed itself, each from its own picture."""
    a, b = picture(20), picture(21)
    answers = tiny_gill.generate_interleaved([["a red circle", a, "it turns blue."], ["a square", b, "now green."]],
                                             policy="edit", **FORCE, settings={"steps": 4, "seed": 7})
    assert len(img2img_calls) == 1 and img2img_calls[0]["seeds"] == [7, 7]
    assert [pixels(x).tolist() for x in img2img_calls[0]["image"]] == [pixels(a).tolist(), pixels(b).tolist()]
    sources = [next(s for s in answer if isinstance(s, EditedImage)).source.image for answer in answers]
    assert np.array_equal(pixels(sources[0]), pixels(a)) and np.array_equal(pixels(sources[1]), pixels(b))


def test_the_library_default_strength_is_0_6_and_a_strength_outside_0_1_is_refused_naming_it(tiny_gill, img2img_calls):
    from gill.settings import LIBRARY_DEFAULTS, RunSettings

    assert LIBRARY_DEFAULTS.edit_strength == 0.6
    tiny_gill.generate_interleaved(["a red circle", picture(2), "it turns blue."], policy="edit", **FORCE,
                                   settings={"steps": 5})
    assert img2img_calls[-1]["strength"] == 0.6
    for bad in (0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=r"edit_strength is .*; expected a number in \(0, 1\]"):
            RunSettings(edit_strength=bad).validated()
    assert RunSettings(edit_strength=1).validated().edit_strength == 1
    with pytest.raises(ValueError, match="runs none of them; give steps >= 4"):  # int(3 * 0.3) = 0 steps
        tiny_gill.generate_interleaved(["x", picture(2)], policy="edit", **FORCE, settings={"steps": 3, "edit_strength": 0.3})


def test_a_given_source_wins_and_the_best_retrieved_image_is_the_source_when_the_conversation_has_none(
        tiny_gill, img2img_calls):
    given = picture(3)
    answer = tiny_gill.generate_interleaved(["a red circle", picture(4), "it turns blue."], policy="edit", **FORCE,
                                            settings={"steps": 4}, edit_source=EditSource(given, place="shown in answer 3"))
    edited = next(s for s in answer if isinstance(s, EditedImage))
    assert edited.source.place == "shown in answer 3" and np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(given))

    answer = tiny_gill.generate_interleaved(["a red circle"], policy="edit", **FORCE, settings={"steps": 4})
    edited = next(s for s in answer if isinstance(s, EditedImage))
    best = tiny_gill.generate_interleaved(["a red circle"], policy="retrieve", **FORCE)
    best = next(s for s in best if isinstance(s, RetrievedImage))  # what retrieval gives at this slot
    assert edited.source.from_corpus and edited.source.source == best.source and edited.source.caption == best.caption
    assert edited.source.score == pytest.approx(best.score)
    assert np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(best.image.resize((32, 32), Image.BICUBIC)))
    assert edited.source.describe() == f"the corpus: {best.source} (“{best.caption}”, score {best.score:.2f})"


# ---- stream and generate_interleaved agree ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["attached", "given", "corpus", "auto three-way"])
def test_stream_equals_generate_interleaved_for_edits(tiny_gill, monkeypatch, case):
    from gill.pipeline import TextDelta

    inputs, kwargs = ["a red circle", picture(5), "it turns blue."], dict(FORCE, policy="edit", settings={"steps": 4})
    if case == "given":
        kwargs["edit_source"] = EditSource(picture(6), place="shown in answer 1")
    elif case == "corpus":
        inputs = ["a red circle"]
    elif case == "auto three-way":
        three_way(tiny_gill, monkeypatch, "edit")
        kwargs["policy"] = "auto"
    whole = tiny_gill.generate_interleaved(inputs, **kwargs)
    streamed = list(tiny_gill.stream(inputs, **kwargs))
    assert any(isinstance(s, EditedImage) for s in whole)
    assert streamed == whole  # every segment: images (pixels), sources, strengths, decisions
    pieces = list(tiny_gill.stream(inputs, deltas=True, **kwargs))
    assert [s for s in pieces if not isinstance(s, TextDelta)] == [s for s in whole if not isinstance(s, Text)]
    assert "".join(s.text for s in pieces if isinstance(s, TextDelta)) == "".join(
        s.text for s in whole if isinstance(s, Text))


# ---- the decision: two-way never edits, three-way chooses, every probability reported ---------------------


def test_a_two_way_head_never_edits_unless_asked(tiny_gill, img2img_calls):
    from gill.decision import decide

    assert tiny_gill.decision.linear.out_features == 2  # the release's head shape
    # whatever its probabilities, with a picture to edit at hand
    for p_ret in (0.0, 0.3, 0.5, 0.7, 1.0):
        d = decide("auto", torch.tensor([[1 - p_ret, p_ret]]), 1, True, True, can_edit=True)[0]
        assert d.choice in ("gen", "ret") and d.p_edit is None
    for text in ("a red circle", "it turns blue.", "now make it green", "the same picture, but smaller"):
        answer = tiny_gill.generate_interleaved([text, picture(7), text], policy="auto", **FORCE, settings={"steps": 2})
        images = [s for s in answer if not isinstance(s, Text)]
        assert images and not any(isinstance(s, EditedImage) for s in images)
        assert all(s.decision.p_gen is not None and s.decision.p_edit is None for s in images)
    assert img2img_calls == []
    asked = tiny_gill.generate_interleaved(["x", picture(7)], policy="edit", **FORCE, settings={"steps": 2})
    assert any(isinstance(s, EditedImage) for s in asked)  # asked: it edits


@pytest.mark.parametrize("favour, kind", [("edit", EditedImage), ("gen", GeneratedImage), ("ret", RetrievedImage)])
def test_a_three_way_head_chooses_its_most_probable_branch_and_reports_all_three(tiny_gill, monkeypatch, favour, kind):
    from gill.decision import decision_probs

    head = three_way(tiny_gill, monkeypatch, favour)
    inputs = ["a red circle", picture(8), "it turns blue."]
    answer = tiny_gill.generate_interleaved(inputs, policy="auto", **FORCE, settings={"steps": 4})
    images = [s for s in answer if not isinstance(s, Text)]
    assert len(images) == 1 and isinstance(images[0], kind)
    hidden = tiny_gill.image_slot_embeddings([inputs]).hidden
    want = decision_probs(head, tiny_gill.model.decision_features(hidden))[0].tolist()
    d = images[0].decision
    assert [d.p_gen, d.p_ret, d.p_edit] == pytest.approx(want, abs=1e-5) and sum(want) == pytest.approx(1.0)
    assert d.choice == favour and d.probabilities == {"gen": d.p_gen, "ret": d.p_ret, "edit": d.p_edit}


def test_a_three_way_head_that_favours_edit_takes_the_next_best_branch_with_nothing_to_edit(tiny_gill, monkeypatch):
    g = without_index(tiny_gill)
    three_way(g, monkeypatch, "edit")
    answer = g.generate_interleaved(["a red circle"], policy="auto", **FORCE, settings={"steps": 2})
    images = [s for s in answer if not isinstance(s, Text)]
    assert len(images) == 1 and isinstance(images[0], GeneratedImage) and images[0].decision.p_edit > 0.5


# ---- a forced edit with nothing to start from: one clear line, everywhere --------------------------------


def test_a_forced_edit_with_no_picture_is_one_clear_error_before_anything_runs(tiny_gill, monkeypatch):
    import gill.pipeline

    g = without_index(tiny_gill)
    decoded = []
    monkeypatch.setattr(gill.pipeline, "decode", lambda **k: decoded.append(k))
    with pytest.raises(NoEditSourceError) as e:
        g.generate_interleaved(["it turns blue."], policy="edit", **FORCE)
    with pytest.raises(NoEditSourceError):
        next(g.stream(["it turns blue."], policy="edit", **FORCE))
    assert decoded == []
    message = str(e.value)
    assert "\n" not in message and "no picture to start from" in message and "no retrieval index" in message
    no_sd = GILL(g.model, g.tokenizer, g.image_processor, g.img_tokens, g.decision, tiny_gill.retriever, None)
    with pytest.raises(ValueError, match="policy 'edit' needs a diffusion pipeline, and none is loaded"):
        no_sd.generate_interleaved(["x", picture(1)], policy="edit", **FORCE)


def test_a_forced_edit_with_no_picture_is_one_line_from_the_command_line(tiny_gill, monkeypatch, capsys, tmp_path):
    from gill.__main__ import main

    monkeypatch.setattr(GILL, "from_pretrained", classmethod(lambda cls, *a, **k: without_index(tiny_gill)))
    assert main(["generate", "it turns blue.", "--policy", "edit", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: policy 'edit' has no picture to start from") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    assert main(["generate", "x", "--policy", "edit", "--edit-source", str(tmp_path / "none.png")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --edit-source {tmp_path / 'none.png'}: no such image file\n"


def test_a_forced_edit_with_no_picture_is_a_chat_message_in_the_app(tiny_gill):
    from app.demo import build_demo
    from gill.settings import RunSettings

    demo = build_demo(without_index(tiny_gill), RunSettings(steps=2, max_new_tokens=10))
    try:
        messages, state, _ = list(respond(demo)({"text": "it turns blue.", "files": []}, [], None,
                                                *controls("edit")))[-1]
        said = messages[-1]["content"]
        assert said.startswith("⚠️ Edit needs a picture to start from") and "Traceback" not in said
        assert state["turns"] == [] and state["pictures"] == []
    finally:
        demo.sessions.close_all()


# ---- the command line ---------------------------------------------------------------------------------------


def test_the_command_line_saves_and_labels_an_edit_from_the_last_image_or_edit_source(
        tiny_gill, monkeypatch, capsys, tmp_path, img2img_calls):
    from gill.__main__ import main

    monkeypatch.setattr(GILL, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_gill))
    first, last, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((first, 10), (last, 11), (other, 12)):
        picture(seed).save(path)
    flags = ["--img-scale-factor", "1e5", "--max-new-tokens", "10", "--steps", "4", "--policy", "edit"]
    assert main(["generate", "a red circle", "--image", str(first), "and", "--image", str(last), "it turns blue.",
                 *flags, "--edit-strength", "0.75", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert (f"[edited image {tmp_path / 'o' / '01-edited.png'} from attached picture 2, strength 0.75; "
            "policy edit, chose edit, no classifier]") in out
    assert np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(Image.open(last)))
    assert img2img_calls[-1]["strength"] == 0.75
    assert np.array_equal(pixels(Image.open(tmp_path / "o" / "01-edited.png")), pixels(img2img_calls[-1]["out"][0]))

    assert main(["generate", "it turns blue.", "--image", str(first), "--edit-source", str(other), *flags,
                 "--out", str(tmp_path / "p")]) == 0
    assert f"from --edit-source {other}, strength 0.60" in capsys.readouterr().out
    assert np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(Image.open(other)))


# ---- the app ------------------------------------------------------------------------------------------------


def respond(demo):
    return next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "respond")


def controls(policy: str) -> tuple:
    return (0.0, 1.0, 10, 1e5, policy, 4, 7.5, 0)  # temperature ... seed, as the page sends them


def test_the_app_edits_the_picture_it_showed_and_labels_the_edit_with_its_source(tiny_gill, img2img_calls, tmp_path):
    """A scene, then "it turns blue.": the second answer is the first answer's picture, edited, labelled with
    where it came from; then the edit of the edit; Undo takes the source back with the turn; an attached
    picture is the next source."""
    from app.demo import build_demo
    from app.render import plain_text
    from gill.settings import RunSettings

    demo = build_demo(tiny_gill, RunSettings(steps=4, max_new_tokens=10))
    try:
        fn = respond(demo)
        messages, state, _ = list(fn({"text": "a red circle", "files": []}, [], None, *controls("generate")))[-1]
        shown_first = Image.open(messages[-1]["content"]["path"])  # the generated picture as the chat shows it
        messages, state, _ = list(fn({"text": "it turns blue.", "files": []}, messages, state, *controls("edit")))[-1]
        label = plain_text(messages[-2]["content"])
        assert label.startswith("Edited image · from shown in answer 1 · strength 0.60 · ") and "policy: edit" in label
        first = state["pictures"][0][0]["image"]
        assert np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(first))
        assert shown_first.size[0] % first.size[0] == 0  # shown scaled up by a whole factor, the same picture
        assert np.array_equal(pixels(shown_first.resize(first.size, Image.NEAREST)), pixels(first))
        second = state["pictures"][1][0]["image"]
        assert np.array_equal(pixels(second), pixels(img2img_calls[-1]["out"][0]))

        messages, state, _ = list(fn({"text": "now smaller.", "files": []}, messages, state, *controls("edit")))[-1]
        assert "from shown in answer 2" in plain_text(messages[-2]["content"])
        assert np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(second))

        undo = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "undo")
        messages, state, _ = undo(messages, state)
        assert len(state["pictures"]) == 2
        messages, state, _ = list(fn({"text": "again.", "files": []}, messages, state, *controls("edit")))[-1]
        assert "from shown in answer 2" in plain_text(messages[-2]["content"])

        attached = tmp_path / "mine.png"
        picture(13).save(attached)
        messages, state, _ = list(fn({"text": "this one turns blue.", "files": [str(attached)]}, messages, state,
                                     *controls("edit")))[-1]
        assert "from attached picture 1" in plain_text(messages[-2]["content"])
        assert np.array_equal(pixels(img2img_calls[-1]["image"][0]), pixels(Image.open(attached)))
    finally:
        demo.sessions.close_all()


def test_the_apps_label_shows_every_probability_the_head_has():
    from app.render import image_label, plain_text
    from gill.decision import Decision

    source = EditSource(None, source="folder/red.png", caption="a red circle", score=2.5)
    edited = EditedImage(None, source, 0.6, Decision("auto", "edit", 0.2, 0.1, 0.7))
    assert plain_text(image_label(edited)) == ("Edited image · from the corpus: folder/red.png (“a red circle”, "
                                               "score 2.50) · strength 0.60 · p(gen)=0.20 · p(ret)=0.10 · "
                                               "p(edit)=0.70 · policy: auto")
    generated = GeneratedImage(None, Decision("auto", "gen", 0.6, 0.4))
    assert plain_text(image_label(generated)) == "Generated image · p(gen)=0.60 · p(ret)=0.40 · policy: auto"


# ---- configs and training -------------------------------------------------------------------------------


def test_a_config_names_its_heads_labels_and_other_labels_are_refused_in_one_line():
    from gill.config import ConfigError, GILLConfig

    assert GILLConfig.from_dict({"decision": {"labels": ["gen", "ret", "edit"]}}).decision.labels == ("gen", "ret", "edit")
    assert GILLConfig.from_dict({}).decision.labels == ("gen", "ret")  # the release's
    for bad in (["ret", "gen"], ["gen", "edit"], ["gen", "ret", "edit", "x"]):
        with pytest.raises(ConfigError, match=r"field decision.labels is .*; expected one of \[\['gen', 'ret'\], "
                                              r"\['gen', 'ret', 'edit'\]\]") as e:
            GILLConfig.from_dict({"decision": {"labels": bad}})
        assert "\n" not in str(e.value)


def test_train_decision_learns_a_three_way_head_from_annotations_with_edit(tmp_path):
    """Annotations with all three labels on a rule the tiny LM can see (the prompt's first words): the held-out
    prompts are predicted far above chance (1/3); the head and its labels are saved and load back three-way."""
    import subprocess
    import sys

    from gill.checkpoint import read_model_dir
    from training.train_decision import read_annotations

    words = {"ret": "a photo of", "gen": "a painting of", "edit": "now it turns"}
    rows = ["Prompt\tDecision"]
    for i in range(180):
        label = ("ret", "gen", "edit")[i % 3]
        rows.append(f"{words[label]} thing {i % 7}\t{label}")
    rows.append("a photo of a cat\tsame")
    (tmp_path / "ann.tsv").write_text("\n".join(rows) + "\n")
    ann = read_annotations(tmp_path / "ann.tsv")
    assert ann.names == ("gen", "ret", "edit") and len(ann.prompts) == 180 and sorted(set(ann.labels)) == [0, 1, 2]
    out = subprocess.run([sys.executable, "-m", "training.train_decision", "--model", "tiny-random", "--annotations",
                          str(tmp_path / "ann.tsv"), "--train-size", "120", "--steps", "400", "--lr", "1e-2",
                          "--out", str(tmp_path / "m")], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == ["gen", "ret", "edit"] and result["test_examples"] == 60
    assert result["test_balanced_accuracy"] >= 0.9 and result["test_recall_edit"] >= 0.9
    files = read_model_dir(tmp_path / "m")
    assert files.config.decision.labels == ("gen", "ret", "edit")
    assert files.decision["linear.weight"].shape[0] == 3
    assert "| decision head | yes: gen, ret, edit |" in (tmp_path / "m" / "README.md").read_text()  # the model card
    two = tmp_path / "two.tsv"
    two.write_text("\n".join(r for r in rows if not r.endswith("\tedit")) + "\n")
    assert read_annotations(two).names == ("gen", "ret")  # no "edit": the original's two-way head
