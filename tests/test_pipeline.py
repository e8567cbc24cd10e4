from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill.diffusion import DiffusionOptions
from gill.pipeline import GILL, GeneratedImage, RetrievedImage, Text, truncate_like_original
from gill.retrieval import EmbeddingIndex, ImageRecord, file_sha256

from synthetic import save_tiny_model_dir


@pytest.fixture(scope="module")
def gill(tiny_gill):
    return tiny_gill  # large [IMG] rows so that images appear in the answers (conftest)


FAST = DiffusionOptions(steps=2, seed=0)
CONVERSATIONS = [
    ["a red circle"],
    ["next to it", Image.new("RGB", (40, 40), "blue"), "a small square"],
    ["a large green triangle moves to the right"],
]


def kinds(segments):
    return [type(s).__name__ for s in segments]


def test_answer_interleaves_text_and_images_with_decisions(gill):
    out = gill.generate_interleaved(CONVERSATIONS[2], max_new_tokens=24, diffusion=FAST)
    assert any(isinstance(s, Text) for s in out) and any(isinstance(s, GeneratedImage) for s in out)
    for s in out:
        if not isinstance(s, Text):
            assert s.decision.policy == "auto"
            assert s.decision.p_gen + s.decision.p_ret == pytest.approx(1.0)
            assert s.decision.choice == ("ret" if s.decision.p_ret > s.decision.p_gen else "gen")
        if isinstance(s, GeneratedImage):
            assert s.image.size == (32, 32)


def test_batched_equals_unbatched(gill):
    batched = gill.generate_interleaved(CONVERSATIONS, max_new_tokens=24, policy="both", diffusion=FAST)
    assert len(batched) == len(CONVERSATIONS)
    for conv, row in zip(CONVERSATIONS, batched):
        single = gill.generate_interleaved(conv, max_new_tokens=24, policy="both", diffusion=FAST)
        assert kinds(row) == kinds(single)
        for a, b in zip(row, single):
            if isinstance(a, Text):
                assert a.text == b.text
            elif isinstance(a, RetrievedImage):
                assert (a.source, a.caption) == (b.source, b.caption) and a.score == pytest.approx(b.score, abs=1e-4)
            else:
                diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max()
                assert diff <= 2
                assert a.decision.p_ret == pytest.approx(b.decision.p_ret, abs=1e-4)


def test_retrieve_never_runs_diffusion_and_generate_never_searches(gill, monkeypatch):
    calls = {"diffusion": 0, "search": 0}
    real_generate, real_search = gill.diffusion.generate, gill.retriever.search

    def spy_generate(*a, **k):
        calls["diffusion"] += 1
        return real_generate(*a, **k)

    def spy_search(*a, **k):
        calls["search"] += 1
        return real_search(*a, **k)

    monkeypatch.setattr(gill.diffusion, "generate", spy_generate)
    monkeypatch.setattr(gill.retriever, "search", spy_search)
    out = gill.generate_interleaved(CONVERSATIONS[0], max_new_tokens=24, policy="retrieve", diffusion=FAST)
    assert calls == {"diffusion": 0, "search": 1} and "RetrievedImage" in kinds(out) and "GeneratedImage" not in kinds(out)
    out = gill.generate_interleaved(CONVERSATIONS[0], max_new_tokens=24, policy="generate", diffusion=FAST)
    assert calls == {"diffusion": 1, "search": 1} and "GeneratedImage" in kinds(out) and "RetrievedImage" not in kinds(out)


def test_several_image_slots_share_one_diffusion_call(gill, monkeypatch):
    calls = []
    real = gill.diffusion.generate
    monkeypatch.setattr(gill.diffusion, "generate", lambda e, *a, **k: calls.append(len(e)) or real(e, *a, **k))
    out = gill.generate_interleaved(CONVERSATIONS, max_new_tokens=24, policy="generate", diffusion=FAST)
    n_images = sum(isinstance(s, GeneratedImage) for row in out for s in row)
    assert n_images >= 3 and calls == [n_images]


def seen(segments) -> list[tuple]:
    """Everything a person sees of an answer: texts; each image's kind, pixels, provenance and decision."""
    return [("text", s.text) if isinstance(s, Text) else
            (type(s).__name__, s.image.tobytes() if s.image is not None else None, getattr(s, "source", None),
             getattr(s, "score", None), s.decision.choice, s.decision.p_ret) for s in segments]


@pytest.mark.parametrize("policy", ["retrieve", "both", "auto"])
def test_stream_yields_the_same_segments_and_no_answer_repeats_an_image(gill, policy):
    conv = CONVERSATIONS[2]
    kwargs = dict(max_new_tokens=24, policy=policy, img_scale_factor=3.0, diffusion=FAST)
    whole = gill.generate_interleaved(conv, **kwargs)
    streamed = list(gill.stream(conv, **kwargs))
    # the same texts, kinds, pixels, sources and choices; scores and probabilities to float precision
    # (one slot's heads run batched with the others in one call, alone in the other)
    exact = lambda rows: [r[:3] + r[4:5] for r in rows]  # noqa: E731
    assert exact(seen(streamed)) == exact(seen(whole))
    floats = [(x[3], x[5], y[3], y[5]) for x, y in zip(seen(streamed), seen(whole)) if x[0] != "text"]
    for a, pa, b, pb in floats:
        assert (a is b is None) or a == pytest.approx(b, rel=1e-5, abs=1e-6)
        assert (pa is pb is None) or pa == pytest.approx(pb, abs=1e-6)
    slots = [s for s in whole if not isinstance(s, Text)]
    assert len({id(s.decision) for s in slots}) >= 3, whole  # several image slots in one answer
    sources = [s.source for s in whole if isinstance(s, RetrievedImage)]
    assert len(sources) == len(set(sources)) >= (2 if policy != "auto" else 0), sources


def test_conversation_images_are_not_retrieved(tmp_path):
    g = GILL.from_pretrained("tiny-random", load_diffusion=False)
    path = tmp_path / "mine.png"
    Image.new("RGB", (32, 32), "red").save(path)
    records = [ImageRecord(0, str(path), "my red square", sha256=file_sha256(path)),
               ImageRecord(1, "elsewhere.png", "a far one", sha256="x")]
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    index = EmbeddingIndex(emb, records, image_loader=lambda r: None)
    # Query along the first record: rank 1 normally, excluded when the image is in the conversation.
    assert index.search(torch.tensor([[1.0, 0.1]]))[0][0].record.id == 0
    from gill.retrieval import image_keys
    assert index.search(torch.tensor([[1.0, 0.1]]), exclude=[image_keys(Path(path))])[0][0].record.id == 1
    # and through the pipeline, by file hash of an image given as a path
    prompts = g.build_prompts([[path, "a red circle"]])
    assert prompts[0].exclude == {str(path), file_sha256(path)}


def test_original_truncation():
    assert truncate_like_original("A dog. It runs.") == "A dog."
    assert truncate_like_original("first line\nsecond. x") == "first line"
    assert truncate_like_original("no stop") == "no stop"


def test_original_truncation_drops_text_after_the_last_image(gill):
    kwargs = dict(max_new_tokens=24, policy="generate", diffusion=FAST)
    full = gill.generate_interleaved(CONVERSATIONS[2], **kwargs)
    cut = gill.generate_interleaved(CONVERSATIONS[2], original_truncation=True, **kwargs)
    assert isinstance(full[-1], Text) and full[0].text  # text before and after the images
    assert not isinstance(cut[-1], Text)
    assert cut[0].text == truncate_like_original(full[0].text)


def test_bad_inputs_are_named(gill, tmp_path):
    with pytest.raises(ValueError, match="inputs: empty"):
        gill.generate_interleaved([])
    with pytest.raises(ValueError, match="conversation 1 is empty"):
        gill.generate_interleaved([["a"], []])
    with pytest.raises(TypeError, match="a mix of conversations"):
        gill.generate_interleaved([["a"], "b"])
    with pytest.raises(TypeError, match="inputs: expected a text, an image"):
        gill.generate_interleaved(3)
    with pytest.raises(TypeError, match="not a list of lists"):
        list(gill.stream([["a"], ["b"]]))
    with pytest.raises(FileNotFoundError, match=r"conversation 0, item 1 \(.*missing.png\): no such image file"):
        gill.generate_interleaved(["a", tmp_path / "missing.png"])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="conversation 0, item 0 .*notes.png.*: not an image file"):
        gill.generate_interleaved([bad])
    with pytest.raises(TypeError, match="item 0: expected str"):
        gill.generate_interleaved([3])
    for call in (gill.generate_interleaved, lambda *a, **k: list(gill.stream(*a, **k))):
        # refused before anything runs, not when an image slot happens
        with pytest.raises(ValueError, match="policy is 'sometimes'; choose one of"):
            call(["a red circle"], policy="sometimes", max_new_tokens=1)
    bad_options = {"max_new_tokens": 0, "temperature": -1.0, "top_p": 0.0, "img_scale_factor": float("nan"),
                   "top_k": -1, "min_tokens_before_image": -2, "max_images": -1, "backend": "fast"}
    for name, value in bad_options.items():
        with pytest.raises(ValueError, match=f"decoding options: {name} is"):
            gill.generate_interleaved(["a"], **{name: value})
    with pytest.raises(TypeError, match="stop_strings is the string"):
        gill.generate_interleaved(["a"], stop_strings=".")
    for name, value in {"steps": 0, "guidance_scale": -1.0, "height": 100, "scheduler": "fastest"}.items():
        with pytest.raises(ValueError, match=f"diffusion options: {name} is"):
            gill.generate_interleaved(["a"], diffusion=DiffusionOptions(**{name: value}))
    with pytest.raises(FileNotFoundError, match="neither a model directory, a preset"):
        GILL.from_pretrained("no-such-model")
    with pytest.raises(FileNotFoundError, match="model_args.json of the original GILL release .* jykoh/gill"):
        GILL.from_pretrained("gill-opt-6.7b", local_files_only=True, cache_dir=tmp_path / "hub")


def test_one_text_is_a_conversation_of_one_item_not_its_characters(gill):
    one = gill.generate_interleaved("a red circle", max_new_tokens=6, policy="generate", diffusion=FAST)
    assert one == gill.generate_interleaved(["a red circle"], max_new_tokens=6, policy="generate", diffusion=FAST)
    assert isinstance(one, list) and one and not isinstance(one[0], list)


def test_model_dir_loads_through_from_pretrained(tmp_path, tiny_opt):
    save_tiny_model_dir(tmp_path, tiny_opt)
    g = GILL.from_pretrained(tmp_path / "model")
    assert g.diffusion is None and g.retriever is None
    out = g.generate_interleaved(["a red circle"], max_new_tokens=5, img_scale_factor=1e5)
    assert kinds(out) == ["Text"]  # nothing to show images with: images are not decoded


def test_diffusion_options_reach_the_pipeline(gill, monkeypatch):
    seen = {}
    pipe = gill.diffusion.pipe
    real_call = type(pipe).__call__

    def spy(self, **kwargs):
        seen.update(kwargs, scheduler=type(self.scheduler).__name__)
        return real_call(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    neg = torch.zeros(1, gill.model.config.gen_seq_len, gill.model.config.gen_emb_dim)
    opts = DiffusionOptions(steps=3, guidance_scale=2.0, seed=5, scheduler="ddim", negative_prompt_embeds=neg)
    out = gill.generate_interleaved(CONVERSATIONS[0], max_new_tokens=12, policy="generate", diffusion=opts)
    n = sum(isinstance(s, GeneratedImage) for s in out)
    assert n >= 1
    assert seen["num_inference_steps"] == 3 and seen["guidance_scale"] == 2.0
    assert seen["prompt_embeds"].shape == (n, 5, 24) and seen["negative_prompt_embeds"].shape == (n, 5, 24)
    assert seen["scheduler"] == "DDIMScheduler"  # for this call: the pipeline keeps its own (no call's choice sticks)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert [g.initial_seed() for g in seen["generator"]] == list(range(5, 5 + n))
    with pytest.raises(ValueError, match="scheduler is 'fast'; choose one of"):
        gill.generate_interleaved(CONVERSATIONS[0], max_new_tokens=12, policy="generate",
                                  diffusion=DiffusionOptions(steps=1, scheduler="fast"), img_scale_factor=1e5)


def test_generate_command_keeps_the_order_of_texts_and_images(tmp_path):
    import subprocess
    import sys

    from gill.__main__ import _ordered_items

    options = {"--image": True, "--model": True, "--steps": True, "--out": True}
    argv = ["a photo of", "--image", "a.png", "--steps", "2", "and", "--image=b.png", "--model", "tiny-random"]
    assert _ordered_items(argv, options) == [("text", "a photo of"), ("image", "a.png"), ("text", "and"), ("image", "b.png")]

    img = tmp_path / "in.png"
    Image.new("RGB", (40, 40), "green").save(img)
    out = subprocess.run(
        [sys.executable, "-m", "gill", "generate", "a red circle", "--image", str(img), "what is it?",
         "--steps", "2", "--img-scale-factor", "1e5", "--max-new-tokens", "10", "--policy", "both", "--out", str(tmp_path / "o"),
         "--model", "tiny-random"],
        capture_output=True, text=True, check=True,
    )
    assert "[generated image" in out.stdout and "[retrieved image" in out.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir())[:2] == ["01-generated.png", "02-retrieved.png"]
    bad = subprocess.run([sys.executable, "-m", "gill", "generate", "x", "--image", str(tmp_path / "none.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "none.png): no such image file" in bad.stderr and "Traceback" not in bad.stderr


def test_forced_image_slot_equals_decoding_with_a_forced_image(gill):
    conv = CONVERSATIONS[1]
    slots = gill.image_slot_embeddings([conv, CONVERSATIONS[0]])
    out = gill.generate_interleaved([conv, CONVERSATIONS[0]], max_new_tokens=8, img_scale_factor=1e5, policy="generate",
                                    diffusion=FAST)
    from gill.generate import decode

    prompts = gill.build_prompts([conv])
    embeds, mask = gill._batch(prompts)
    res = decode(gill.model, embeds, mask, __import__("gill").DecodeOptions(max_new_tokens=8, img_scale_factor=1e5))[0]
    assert res.images[0].position == 0  # the huge factor forces [IMG0] first
    torch.testing.assert_close(slots.hidden[0], res.images[0].hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(slots.generation[0], gill.model.generation_embeddings(res.images[0].hidden[None])[0], rtol=1e-4, atol=1e-4)
    assert isinstance(out[0][0], GeneratedImage)


def test_decision_head_reading_the_retrieval_score_uses_each_slots_score(tmp_path):
    import math

    from gill.decision import DecisionHead

    g = GILL.from_pretrained("tiny-random")
    torch.manual_seed(0)
    with torch.no_grad():
        g.model.adapter.img_embeddings.normal_(0, 1.0)
    g.model.config.decision.use_ret_score = True
    g.decision = DecisionHead.from_config(g.model.config).eval()
    t = 1.0
    with torch.no_grad():  # a head that reads only the score: logit(ret) - logit(gen) = score - t
        g.decision.linear.weight.zero_()
        g.decision.linear.weight[1, -1] = 1.0
        g.decision.linear.bias.copy_(torch.tensor([0.0, -t]))
    out = g.generate_interleaved(CONVERSATIONS[2], max_new_tokens=24, policy="both", img_scale_factor=3.0, diffusion=FAST)
    retrieved = [s for s in out if isinstance(s, RetrievedImage)]
    assert len({round(s.score, 3) for s in retrieved}) >= 2, retrieved  # slots whose best matches differ
    for s in retrieved:  # each slot's decision read the score of the very image it retrieves
        assert s.decision.p_ret == pytest.approx(1 / (1 + math.exp(-(s.score - t))), abs=1e-5)
    # and "auto" follows it: retrieve exactly where that score beats the threshold
    t = sorted(s.score for s in retrieved)[len(retrieved) // 2] - 1e-3
    with torch.no_grad():
        g.decision.linear.bias.copy_(torch.tensor([0.0, -t]))
    auto = g.generate_interleaved(CONVERSATIONS[2], max_new_tokens=24, img_scale_factor=3.0, diffusion=FAST)
    chosen = [s for s in auto if not isinstance(s, Text)]
    assert {type(s) for s in chosen} == {GeneratedImage, RetrievedImage}, chosen
    assert all(s.score > t for s in chosen if isinstance(s, RetrievedImage))


def test_a_prompt_longer_than_the_lm_is_a_clear_error_or_truncated(gill):
    from gill.pipeline import PromptTooLongError

    limit = gill.max_positions
    long = " ".join(["red circle"] * limit)
    assert gill.prompt_length([long]) > limit
    with pytest.raises(PromptTooLongError, match=rf"takes {gill.prompt_length([long])} positions .* reads {limit} positions"):
        gill.generate_interleaved([long], max_new_tokens=8)
    with pytest.raises(PromptTooLongError):
        list(gill.stream([long], max_new_tokens=8))
    with pytest.raises(PromptTooLongError):
        gill.image_slot_embeddings([[long]])
    kept = gill.generate_interleaved([long], max_new_tokens=8, truncate=True)
    assert kept and gill.generate_interleaved(["a red circle"], max_new_tokens=8)  # and the next call works
    # the length counted without the vision encoder is the length of the embedded prompt
    from PIL import Image

    conv = ["a red", Image.new("RGB", (8, 8)), "circle and", Image.new("RGB", (8, 8))]
    assert gill.prompt_length(conv) == gill.build_prompts([conv])[0].embeds.shape[0]


def with_context(gill, monkeypatch, n):
    """The model with ``context_length=n`` in its run settings, as a model directory's ``run`` block sets it."""
    from gill.settings import RunSettings

    monkeypatch.setattr(gill, "settings", RunSettings(**{**gill.settings.to_dict(), "context_length": n}))


def test_the_models_context_length_is_the_limit_and_truncation_keeps_the_newest(gill, monkeypatch):
    """A model trained on fewer positions than its LM has refuses, or with truncate=True cuts from the start,
    a prompt that fits the LM but not that context; without the setting the LM's positions are the limit."""
    import gill.pipeline as pipeline
    from gill.pipeline import PromptTooLongError

    n = 64
    prompt = " ".join(f"w{i}" for i in range(20))  # distinct words: its start and its end differ
    length, room = gill.prompt_length([prompt]), gill.answer_room(8)
    assert n < length + room <= gill.max_positions  # fits the LM, not the context
    assert gill.context_length == gill.max_positions  # no setting: the LM's own positions
    gill.generate_interleaved([prompt], max_new_tokens=8, diffusion=FAST)
    with_context(gill, monkeypatch, n)
    assert gill.context_length == n
    with pytest.raises(PromptTooLongError, match=rf"takes {length} positions .* reads {n} positions .*its LM has 256"):
        gill.generate_interleaved([prompt], max_new_tokens=8, diffusion=FAST)
    with pytest.raises(PromptTooLongError, match=rf"reads {n} positions"):
        list(gill.stream([prompt], max_new_tokens=8, diffusion=FAST))
    with pytest.raises(PromptTooLongError, match=rf"reads {n} positions"):
        gill.image_slot_embeddings([[prompt]])
    assert gill.slot_overflow([prompt]) == length + len(gill.img_tokens.ids) - n
    # truncate=True: the prompt decoded is the newest n - room positions of the whole one
    seen = []
    real = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda **kw: seen.append(kw["inputs_embeds"][0].clone()) or real(**kw))
    gill.generate_interleaved([prompt], max_new_tokens=8, truncate=True, diffusion=FAST)
    full = gill.build_prompts([[prompt]])[0].embeds
    assert seen[0].shape[0] == n - room
    assert torch.equal(seen[0], full[-(n - room):]) and not torch.equal(seen[0], full[: n - room])


def test_max_new_tokens_is_checked_against_the_models_context(gill, monkeypatch):
    most = 40 - len(gill.img_tokens.ids)
    gill.generate_interleaved(["hi"], max_new_tokens=most + 1, diffusion=FAST)  # fits the LM's 256
    with_context(gill, monkeypatch, 40)
    with pytest.raises(ValueError, match=rf"max_new_tokens is {most + 1}.* reads 40 positions.*max_new_tokens <= {most}"):
        gill.generate_interleaved(["hi"], max_new_tokens=most + 1, diffusion=FAST)
    gill.generate_interleaved(["h"], max_new_tokens=most - 1, diffusion=FAST)  # a prompt of 2 positions fits


def test_a_context_longer_than_the_lm_is_refused_when_the_model_is_built(gill):
    from gill.settings import RunSettings

    with pytest.raises(ValueError, match="context_length is 300, more than its LM's 256 positions"):
        GILL(gill.model, gill.tokenizer, gill.image_processor, gill.img_tokens, settings=RunSettings(context_length=300))
    assert GILL(gill.model, gill.tokenizer, gill.image_processor, gill.img_tokens,
                settings=RunSettings(context_length=256)).context_length == 256
