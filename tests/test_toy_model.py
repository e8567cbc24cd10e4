"""The shipped toy model (``GILL.from_pretrained("toy")``): it reads captions and stories, retrieves the
picture a caption names from its corpus, draws what captions say, and decides between the two."""

import pytest
import torch

from gill import GILL, DiffusionOptions, GeneratedImage
from gill.toy import world


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
            right += world.dominant_colour(images[0]) == scene.color and world.nearest_scenes(images[:1])[0].shape == scene.shape
    assert right >= 6, right  # of 8 pictures (the shipped model: 7; one red square came out orange)


# The shipped model measured 0.77 / 1.0 / 0.82 (retrieval; v2.1: 0.34 / 0.93 / 0.82), 0.83 / 0.83
# (generation) and a balanced decision accuracy of 0.96 (recall ret 0.93, gen 1.0); the bars leave room
# for float noise.
RET_R1, RET_R5, RET_COMPOSITION, GEN_COLOUR, GEN_SHAPE, DECISION_MARGIN = 0.65, 0.9, 0.7, 0.75, 0.7, 0.3


def test_the_lm_names_a_captions_background_after_its_full_stop():
    """The LM's state at a caption's "." (where [IMG0] follows) holds the background: its odds for the
    next word " white" against " gray" follow the caption. With OPT's tied rows the two words merged and
    the odds were the same after every caption (v2.1: right in half)."""
    from transformers import AutoTokenizer, OPTForCausalLM

    from gill.presets import toy_dir

    tokenizer, lm = AutoTokenizer.from_pretrained(toy_dir() / "lm"), OPTForCausalLM.from_pretrained(toy_dir() / "lm")
    scenes = world.all_scenes()
    enc = tokenizer([f"{s.caption()}." for s in scenes], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm(**enc).logits[torch.arange(len(scenes)), enc.attention_mask.sum(1) - 1]
    white, gray = (tokenizer(f" {b}", add_special_tokens=False)["input_ids"][0] for b in ("white", "gray"))
    said = ["white" if logits[i, white] > logits[i, gray] else "gray" for i in range(len(scenes))]
    assert sum(w == s.background for w, s in zip(said, scenes)) / len(scenes) >= 0.95
