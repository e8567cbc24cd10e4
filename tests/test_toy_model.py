"""The shipped toy model (``GILL.from_pretrained("toy")``): it reads captions and stories, retrieves the
picture a caption names from its corpus, draws what captions say, and decides between the two."""

import random

import pytest
import torch

from gill import GILL, DiffusionOptions, GeneratedImage
from training.toy import world


@pytest.fixture(scope="module")
def toy():
    return GILL.from_pretrained("toy")


@pytest.fixture(scope="module")
def split():
    train, _ = world.split_compositions()  # the world's split, whatever the build's seed
    return train


def test_retrieves_the_picture_a_caption_names(toy, split):
    scenes = [s for s in world.all_scenes() if s.composition in split][::3]
    slots = toy.image_slot_embeddings([[f"{s.caption()}."] for s in scenes])  # as the toy reads captions
    hits = toy.retriever.search(slots.retrieval, k=5)
    top1 = [h[0].record.caption for h in hits]
    exact = sum(c == s.caption() for c, s in zip(top1, scenes)) / len(scenes)
    top5 = sum(s.caption() in [x.record.caption for x in h] for h, s in zip(hits, scenes)) / len(scenes)
    composition = sum(c.split()[2:4] == [s.color, s.shape] for c, s in zip(top1, scenes)) / len(scenes)
    # chance: 1/168 exact, 5/168 in the top 5, 1/14 right colour and shape
    assert exact >= RET_R1 and top5 >= RET_R5 and composition >= RET_COMPOSITION, (exact, top5, composition)


def test_draws_what_captions_say_also_for_unseen_compositions(toy, split):
    scenes = world.all_scenes()[::9]  # 24 scenes, some of compositions never trained on
    slots = toy.image_slot_embeddings([[f"{s.caption()}."] for s in scenes])
    images = toy.diffusion.generate(slots.generation, DiffusionOptions(steps=20, guidance_scale=toy.settings.guidance_scale),
                                    seeds=list(range(len(scenes))))
    colour = sum(world.dominant_colour(im) == s.color for im, s in zip(images, scenes)) / len(scenes)
    shape = sum(a.shape == b.shape for a, b in zip(world.nearest_scenes(images), scenes)) / len(scenes)
    assert colour >= GEN_COLOUR and shape >= GEN_SHAPE, (colour, shape)  # chance 1/6 and 1/3


def test_the_diffusion_model_draws_the_compositions_gill_never_saw_from_their_captions(toy, split):
    """The toy's diffusion model was pretrained on every composition (as Stable Diffusion on far more than
    CC3M), so what GILL cannot retrieve it can still have drawn."""
    from gill.eval.runner import generate_from_text

    scenes = [s for s in world.all_scenes() if s.composition not in split][::3]  # 16 of the unseen 48
    images = generate_from_text(toy.diffusion.pipe, [s.caption() for s in scenes],
                                DiffusionOptions(steps=20, guidance_scale=toy.settings.guidance_scale),
                                list(range(len(scenes))), False)
    both = sum(a.composition == s.composition for a, s in zip(world.scenes_shown(images), scenes)) / len(scenes)
    assert both >= SD_UNSEEN, both  # chance 1/18


def test_gill_draws_compositions_it_never_saw_from_their_captions(toy, split):
    """GILL's generation head never trained on the unseen compositions (nor can it retrieve them): it must
    compose colour and shape it saw apart (its mapper's dropout helps: see GILL_UNSEEN)."""
    scenes = [s for s in world.all_scenes() if s.composition not in split][1::3]  # 16 of the unseen 48
    slots = toy.image_slot_embeddings([[f"{s.caption()}."] for s in scenes])
    images = toy.diffusion.generate(slots.generation, DiffusionOptions(steps=20, guidance_scale=toy.settings.guidance_scale),
                                    seeds=list(range(len(scenes))))
    both = sum(a.composition == s.composition for a, s in zip(world.scenes_shown(images), scenes)) / len(scenes)
    assert both >= GILL_UNSEEN, both  # chance 1/18


def test_decides_retrieve_for_the_corpus_and_generate_for_the_unseen(toy, split):
    from gill.decision import decision_probs

    scenes = world.all_scenes()
    slots = toy.image_slot_embeddings([[f"{s.caption()}."] for s in scenes])
    hits = toy.retriever.search(slots.retrieval, k=1, scale=toy.model.adapter.logit_scale.exp().item())
    features = toy.model.decision_features(slots.hidden, torch.tensor([h[0].score for h in hits]))
    chose_ret = [p_ret > 0.5 for _, p_ret in decision_probs(toy.decision, features).tolist()]
    seen = [s.composition in split for s in scenes]
    recall_ret = sum(c and y for c, y in zip(chose_ret, seen)) / sum(seen)
    recall_gen = sum(not c and not y for c, y in zip(chose_ret, seen)) / (len(seen) - sum(seen))
    # balanced accuracy: 0.5 for any constant answer
    assert (recall_ret + recall_gen) / 2 >= 0.5 + DECISION_MARGIN, (recall_ret, recall_gen)


def test_chat_answers_a_caption_with_a_picture_of_it(toy):
    from gill import chat
    from gill.pipeline import Text

    right = 0
    for scene in (world.Scene("red", "square", "large", "left", "white"), world.Scene("blue", "square", "small", "right", "gray")):
        for seed in range(4):
            with torch.no_grad():  # a chat turn as the app frames it; otherwise the model's own settings
                answer = toy.generate_interleaved(chat.turn_items(f"{scene.caption()}."), policy="generate",
                                                  stop_strings=chat.STOP_STRINGS, end_at_image=chat.END_AT_IMAGE,
                                                  diffusion=DiffusionOptions(steps=20, seed=seed))
            images = [x.image for x in answer if isinstance(x, GeneratedImage)]
            assert images and isinstance(answer[-1], GeneratedImage), answer  # the answer ends at its picture
            assert "".join(x.text for x in answer if isinstance(x, Text)).strip() == f"{scene.caption()}."
            right += world.scenes_shown(images[:1])[0].composition == scene.composition
    assert right >= 6, right  # of 8 pictures


def test_the_scripted_chat_shows_a_picture_on_every_turn_that_asks_for_one(toy):
    """The report's 5-turn chat as the app runs it, the model's own settings: a picture after each scene
    and change, none after "what shape is it?", and never the LM's own word for a picture's place in an
    answer (at image factor 1.0 the move "it moves to the middle." got " (picture)" instead of [IMG0])."""
    from training.toy.report import CHAT_SCRIPT, chat

    got = chat(toy)
    shown = [len(t["image_colours"]) for t in got["turns"]]
    assert shown == [int(colour is not None) for _, colour in CHAT_SCRIPT], got["turns"]
    assert not any("(picture)" in t["answer"] for t in got["turns"]), got["turns"]
    assert got["on_topic_turns"] == 5 and got["images_of_the_asked_colour"] >= 3, got["turns"]


# The shipped model (v2.7, [IMG] input rows free) measured 1.0 / 1.0 / 1.0 (retrieval; v2.6: 0.89 / 1.0 / 0.96;
# v2.4: 0.89 / 1.0 / 0.95; v2.2: 0.91 / 1.0 / 0.93; v2.1: 0.34 / 0.93 / 0.82) and 0.92 / 0.88 (generation;
# v2.6: 0.83 / 0.96; v2.4: 0.88 / 0.88; v2.3: 0.92 / 0.83; v2.2: 0.79 / 0.88); a balanced decision accuracy of
# 0.98 (recall ret 0.96, gen 1.00; v2.4: 0.97; v2.2: 0.94); the bars leave room for float noise.
RET_R1, RET_R5, RET_COMPOSITION, GEN_COLOUR, GEN_SHAPE, DECISION_MARGIN = 0.95, 0.95, 0.95, 0.72, 0.75, 0.35
# The diffusion model (v2.4, pretrained on every composition) draws 0.81 of the unseen ones right from their
# own captions (v2.3's, which knew only the corpus's: about half).
SD_UNSEEN = 0.7
# GILL itself, from single captions of them (v2.6 and v2.7, mapper dropout 0.3): 0.56 of these 16 (v2.6: and of
# all 48 unseen scenes; v2.5, without the dropout: 0.50 and 0.44).
GILL_UNSEEN = 0.4


VALUES = {"background": world.BACKGROUNDS, "position": world.POSITIONS, "shape": world.SHAPES}


def _next_word_odds(tokenizer, lm, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True)  # (right-padded)
    with torch.no_grad():
        return lm(**enc).logits[torch.arange(len(texts)), enc.attention_mask.sum(1) - 1]


def _said(tokenizer, logits: torch.Tensor, attribute: str, values: tuple[str, ...]) -> list[str]:
    """Which of ``values`` the LM would say first (``world.FIRST[attribute]``), after each text."""
    ids = [tokenizer(world.FIRST[attribute].format(v), add_special_tokens=False)["input_ids"][0] for v in values]
    return [values[i] for i in logits[:, ids].argmax(1).tolist()]


def test_the_lm_holds_the_scene_at_a_captions_and_a_storys_full_stop():
    """The LM's state at a caption's "." (where [IMG0] follows) holds the scene's background, position and
    shape: its odds for the next word among each attribute's values follow the caption. With OPT's tied
    rows " white" and " gray" merged and the odds were the same after every caption (v2.1: right in half).
    After a story's last "." it holds them in most stories (the position only its later captions say: the
    full build's LM in 0.86 of 120 stories, 1.00 of captions)."""
    from transformers import AutoTokenizer, OPTForCausalLM

    from gill.presets import toy_dir

    tokenizer, lm = AutoTokenizer.from_pretrained(toy_dir() / "lm"), OPTForCausalLM.from_pretrained(toy_dir() / "lm")
    scenes = world.all_scenes()
    rng = random.Random(0)
    stories = [world.story(rng, {s.composition for s in scenes}) for _ in range(120)]
    for texts, ends, bound in (([f"{s.caption()}." for s in scenes], scenes, 0.95),
                               ([". ".join(c for _, c in st) + "." for st in stories], [st[-1][0] for st in stories], 0.8)):
        logits = _next_word_odds(tokenizer, lm, texts)
        for attribute in world.FIRST:
            said = _said(tokenizer, logits, attribute, tuple(sorted(VALUES[attribute])))
            right = sum(w == getattr(s, attribute) for w, s in zip(said, ends)) / len(ends)
            assert right >= bound, (attribute, texts[0], right)
