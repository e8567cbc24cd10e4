import json
import random
from collections import Counter
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gill.eval.data import load_vist
from gill import chat
from training.toy import world

ROOT = Path(__file__).resolve().parents[1]


def test_split_keeps_test_compositions_out_of_training():
    train, test = world.split_compositions(0)
    assert train and test and not (train & test)
    assert len(train | test) == len(world.COLORS) * len(world.SHAPES)
    assert world.split_compositions(0) == (train, test)  # deterministic


def test_render_draws_the_caption():
    im = np.asarray(world.render(world.Scene("red", "square", "large", "left", "white")), dtype=int)
    left, right = im[:, :12].reshape(-1, 3), im[:, 22:].reshape(-1, 3)
    red = (left[:, 0] > 180) & (left[:, 1] < 90) & (left[:, 2] < 90)
    assert red.mean() > 0.3  # the left third is mostly the red square
    assert (np.abs(right - 245) < 10).all()  # the right is white background
    small = np.asarray(world.render(world.Scene("red", "square", "small", "left", "white")), dtype=int)
    assert ((small[..., 0] > 180) & (small[..., 1] < 90)).sum() < ((im[..., 0] > 180) & (im[..., 1] < 90)).sum()


def test_stories_refer_back_and_load_as_vist(tmp_path):
    train, _ = world.split_compositions(0)
    rng = random.Random(1)
    stories = [world.story(rng, train) for _ in range(5)]
    for steps in stories:
        assert len(steps) == 5 and steps[0][1].startswith("a ")
        assert all(caption.startswith("it ") for _, caption in steps[1:])
        assert all(scene.composition in train for scene, _ in steps)
    ann, photos = world.vist_annotations(stories)
    images = tmp_path / "images"
    images.mkdir()
    for photo, scene in photos.items():
        world.render(scene).save(images / f"{photo}.png")
    (tmp_path / "sis.json").write_text(__import__("json").dumps(ann))
    data = load_vist(tmp_path / "sis.json", images)
    assert len(data.examples) == 5 and not data.skipped
    assert data.examples[0].captions == [f"{c}." for _, c in stories[0]]


def test_gills_stories_leave_the_background_to_their_pictures():
    """As GILL is given stories (training data, test stories, decisions): no caption says the background,
    which the story never changes, so only the pictures tell it; everything else as the world tells it."""
    train, _ = world.split_compositions(0)
    rng = random.Random(3)
    for steps in (world.story(rng, train) for _ in range(20)):
        told = world.unsaid_background(steps)
        first = steps[0][0]
        assert told[0] == (first, f"a {first.size} {first.color} {first.shape} " +
                           ("in the middle" if first.position == "middle" else f"on the {first.position}"))
        assert told[1:] == steps[1:] and all(s.background == first.background for s, _ in steps)
        assert not any(b in c for _, c in told for b in world.BACKGROUNDS)


def test_nearest_scene_reads_back_renderings():
    scenes = world.all_scenes()
    jittered = [world.render(s, jitter=(1, 0)) for s in scenes[::7]]
    assert world.nearest_scenes(jittered) == scenes[::7]
    assert world.scenes_shown(jittered) == scenes[::7]


def test_a_shape_drawn_in_the_wrong_colour_reads_as_that_colour():
    scene = world.Scene("red", "circle", "large", "left", "white")
    picture = world.render(scene)
    x = picture.load()
    for i in range(picture.width):  # repaint the red foreground blue
        for j in range(picture.height):
            r, g, b = x[i, j]
            if r > 150 and g < 120 and b < 120:
                x[i, j] = tuple(int(c) for c in world.COLORS["blue"])
    assert world.scenes_shown([picture]) == [world.Scene("blue", "circle", "large", "left", "white")]


def test_chats_are_in_the_apps_turn_format_and_stay_on_their_object():
    train, _ = world.split_compositions(0)
    rng = random.Random(3)
    chats = [world.conversation(rng, train, 5) for _ in range(50)]
    for turns in chats:
        assert 1 <= len(turns) <= 5
        text = world.chat_text(turns)
        assert text.startswith("Q: ") and text.endswith("\n") and text.count("\nA: ") == len(turns)
        for t in turns:
            if t.scene is not None:  # a shown picture is what the answer says, of a training composition
                assert t.scene.caption() in t.answer and t.scene.composition in train
            if t.question == "what colour is it?":
                assert t.answer.split()[-1].rstrip(".") in world.COLORS
    kinds = Counter(("attach" if t.attached else "show" if t.scene else "ask") for c in chats for t in c)
    assert min(kinds.values()) >= 20, kinds  # every kind of turn is common


def test_a_chat_sample_is_laid_out_as_the_app_lays_out_a_conversation():
    a = world.Scene("red", "circle", "large", "left", "white")
    b = world.Scene("blue", "circle", "large", "left", "white")
    turns = [world.Turn("what is this?", f"it is {a.caption()}.", None, attached=a),
             world.Turn("what colour is it?", "it is red."),
             world.Turn("it turns blue.", f"now it is {b.caption()}.", b)]
    pairs, text, target = world.chat_sample(turns, "<I>")
    # the attached picture comes first, then its question; the last answer is what [IMG] follows
    assert pairs == [("", a)]
    assert text == (f"Q: what is this?\nA: it is {a.caption()}.\nQ: what colour is it?\nA: it is red.\n"
                    f"Q: it turns blue.\nA: now it is {b.caption()}.")
    assert target == b
    # a picture shown in an earlier turn is its [IMG] tokens right after that answer's text, the newline after
    # them (gill.chat.answer_items), as the app feeds an answer back
    c = world.Scene("blue", "circle", "small", "left", "white")
    pairs, text, target = world.chat_sample([turns[2], world.Turn("it shrinks.", f"now it is {c.caption()}.", c)], "<I>")
    assert pairs == []
    assert text == f"Q: it turns blue.\nA: now it is {b.caption()}.<I>\nQ: it shrinks.\nA: now it is {c.caption()}."
    assert target == c
    history = chat.turn_items(turns[2].question) + chat.answer_items([f" now it is {b.caption()}.", object()], "<I>")
    assert "".join(history) + chat.question("it shrinks.") + f" now it is {c.caption()}." == text


def test_story_sets_give_each_last_picture_one_right_answer():
    train, test = world.split_compositions(0)
    stories = world.distinct_stories(random.Random(0), train | test, 60)
    finals = [s[-1][0] for s in stories]
    every = [scene for s in stories for scene, _ in s]
    assert len(stories) == 60 and all(every.count(f) == 1 for f in finals)


def test_the_lms_text_holds_chats_and_what_the_corpus_holds():
    train, test = world.split_compositions(0)
    text = world.world_text(random.Random(0), train | test, n_stories=10, n_chats=10, common=train)
    assert sum(t.startswith("Q: ") for t in text) == 10
    seen = next(s for s in world.all_scenes() if s.composition in train)
    unseen = next(s for s in world.all_scenes() if s.composition in test)
    assert f"{seen.caption()}.{world.PHOTOS}" in "\n".join(text)
    assert f"{unseen.caption()}.{world.NO_PHOTO}" in "\n".join(text)
    # the two answers differ in the word right after the ".", so the LM's state there holds the answer
    assert world.PHOTOS.split()[0] != world.NO_PHOTO.split()[0]
    # a story says whether its end is a thing there are photos of; a chat keeps a shown picture's place
    stories = [t for t in text if ". now it is " in t and not t.startswith("Q: ")]
    assert len(stories) == 10 and all(any(f"{bit} now it is " in t for bit in (world.PHOTOS, world.NO_PHOTO)) for t in stories)
    # two copies of each caption say one of the scene's attributes right after the "." for each attribute
    # of world.FIRST (so the LM's state there holds them all), the others whether there are photos of the
    # thing; so do most stories' ends, of the scene they end in
    joined = "\n".join(text)
    assert f"{seen.caption()}.{world.PHOTOS}" in joined
    for attribute in world.FIRST:
        assert f"{seen.caption()}.{world.said_first(seen, attribute)}{world.PHOTOS}" in joined
    by_caption = {s.caption(): s for s in world.all_scenes()}
    ends = [by_caption[t.split(" now it is ")[1].rstrip(".")] for t in stories]
    assert sum(any(f".{world.said_first(e, a)}" in t for a in world.FIRST) for e, t in zip(ends, stories)) == \
        sum(1 for i in range(10) if i % (len(world.FIRST) + 1))  # all but one in len(FIRST) + 1
    m = world.Scene("red", "circle", "large", "middle", "gray")
    assert world.said_first(m, "position") == " middle."
    assert world.said_first(m, "background") == " gray background." and world.said_first(m, "shape") == " circle."
    assert any(world.PICTURE in t for t in text if t.startswith("Q: "))
    a = world.Scene("red", "circle", "large", "left", "white")
    turns = [world.Turn("what is this?", f"it is {a.caption()}.", None, attached=a), world.Turn("draw it.", f"{a.caption()}.", a)]
    assert world.chat_text(turns, world.PICTURE) == (f"Q: what is this?\nA: it is {a.caption()}.\n"
                                                     f"Q: draw it.\nA: {a.caption()}.{world.PICTURE}\n")


def test_the_lm_check_tells_whether_the_lm_follows_a_story_through_its_pictures_places():
    """The lm stage's check (lm-check.json): the shipped LM says where a story ends from its text, and less
    often once each caption is followed by a picture's place (as GILL gives it a story with its pictures),
    text it never read; the report measures the same through GILL's own visual prefixes."""
    from transformers import AutoTokenizer, OPTForCausalLM

    from gill.presets import toy_dir
    from training.toy.backbones import story_end_accuracy

    tok = AutoTokenizer.from_pretrained(toy_dir() / "lm")
    lm = OPTForCausalLM.from_pretrained(toy_dir() / "lm").eval()
    text, pictured = story_end_accuracy(lm, tok, False, n=20), story_end_accuracy(lm, tok, True, n=20)
    assert text >= 0.95 and pictured < text - 0.2, (text, pictured)


def test_the_reports_retrieval_refit_finds_the_shipped_head_as_good_as_a_linear_refit_of_img0():
    """The report's check of the trained retrieval head against ridge refits from the same [IMG] states
    (fitted on 2/3 of the corpus captions, scored on the rest): on the shipped model (v2.7, [IMG] input rows
    free) the head gets all a refit on [IMG0] gets (1.00 vs 0.96); v2.6, its rows held at the LM rows'
    norm, got 0.77 vs 0.79, and an LM of another seed 0.32 vs 0.71 (README)."""
    from gill import GILL
    from training.toy.report import retrieval_refit

    train, _ = world.split_compositions()
    r = retrieval_refit(GILL.from_pretrained("toy"), train)
    assert r["n"] == 168 and r["held_out"] == 56
    assert r["trained_head_R@1_held_out_scenes"] >= r["refit_img0_R@1"] - 0.05, r
    assert r["refit_mean_img_R@1"] >= 0.9 and r["trained_head_R@1"] >= 0.95, r


def test_the_test_stories_and_decisions_stay_the_same_whatever_the_plan_draws_for_training(tmp_path):
    """The eval's stories and the decision annotations have seeds of their own: a plan with more training
    stories (which draws more from the training rng) is measured on the same test set."""
    from training.toy.data import stage_data
    from training.toy.plan import Plan

    outs = []
    for n, stories in enumerate((4, 9)):
        out = tmp_path / str(n)
        (out / "model" / "lm").mkdir(parents=True)
        (out / "model" / "lm" / "config.json").write_text("{}")  # an LM is there: no tokenizer to learn
        stage_data(out, Plan(train_images_per_scene=1, train_stories=stories, train_chats=3, test_stories=6,
                             val_stories=3, decision_stories=5), seed=0)
        outs.append(out / "data")
    assert len(list((outs[0] / "shards").glob("*.tar"))) == 4
    for name in ("test-sis.json", "test-scenes.json", "val-sis.json", "decisions.tsv"):
        assert (outs[0] / name).read_text() == (outs[1] / name).read_text(), name


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """The reduced toy build, once for the tests below: the world's data, then GILL trained with the
    project's recipes (training.train, index.build, training.train_decision) on the shipped model's frozen
    backbones, the eval and the report, as the README's `--small --backbones toy` command."""
    out = tmp_path_factory.mktemp("toy-build") / "toy"
    run = subprocess.run([sys.executable, "-m", "training.toy", "--out", str(out), "--small", "--backbones", "toy"],
                         cwd=ROOT, capture_output=True, text=True, timeout=2400)  # v3.0: 18.6 min beside two others (10 min of CPU)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, json.loads((out / "report" / "report.json").read_text())


# The reduced build's bounds (`python -m training.toy --out OUT --small --backbones toy --seed N`), each 0.9 x the
# lowest of seeds 0 / 1 / 2 on the shipped v3.0 backbones (GILL on sequences of 128, plan.SMALL; the three built
# side by side): 5 captions + 4 pictures over 5 captions +0.097 / +0.164 / +0.176, 5 captions over the last
# caption +0.61 / +0.51 / +0.48; single captions colour 0.82 / 0.90 / 0.87, colour and shape 0.71 / 0.81 / 0.73;
# story retrieval R@1 0.96 / 0.83 / 0.83; exact caption retrieval R@1 1.00 / 0.99 / 0.99 (R@5 1.00); decision
# balanced accuracy on test stories 1.00 each, held out 1.00 / 1.00 / 0.99; the scripted chat 5 turns on topic
# and 4 pictures of the asked colour each; changes in a chat named 1.00 each, shown 0.86 / 0.81 / 0.89; a
# picture opening a chat read (colour and shape, all 216 scenes) 0.47 / 0.69 / 0.65; free chats (100 x 10
# turns): text right 0.55 / 0.58 / 0.57, describe turns 0.96 / 0.97 / 0.96, pictures 0.67 / 0.75 / 0.70, turn 1's
# attached pictures read 0.54 / 0.58 / 0.46, [IMG0] inside an answer and pictures where none was asked 0 each.
# (v2.9's: 5 + 4 over 5 +0.15 / +0.19 / +0.16, colour and shape 0.74 / 0.83 / 0.81, story R@1 0.79 / 0.79 / 0.88.)
COLOUR, BOTH, CONTEXT_R1, EXACT_R1, EXACT_R5, DECIDE_STORIES, DECIDE_HELD_OUT, CHAT_PICTURES = 0.73, 0.64, 0.75, 0.89, 0.9, 0.9, 0.89, 4
PICTURES_GAIN, CONTEXT_MARGIN = 0.088, 0.43
CHANGE_NAMED, CHANGE_SHOWN = 0.9, 0.72
FIRST_READ, FREE_TEXT, FREE_DESCRIBE, FREE_PICTURES, FREE_TURN1_READ = 0.42, 0.49, 0.86, 0.6, 0.41


@pytest.mark.slow
def test_small_build_learns_to_retrieve_and_generate_and_context_helps(small_build):
    out, report = small_build
    gen, ret, captions = report["generation"], report["retrieval"], report["captions"]
    sim = {k: v["clip_similarity"] for k, v in gen.items() if "clip_similarity" in v}
    # generation on the test stories: the whole story beats its last caption by far, and its pictures, which
    # show the background its captions leave unsaid, help
    assert sim["gill/5-captions-4-images"] >= sim["gill/5-captions"] + PICTURES_GAIN, sim
    assert sim["gill/5-captions"] >= sim["gill/1-caption"] + CONTEXT_MARGIN, sim
    # single captions drawn right (chance: colour 0.17, both 0.06)
    drawn = captions["generation"]
    assert drawn["colour"] >= COLOUR and drawn["colour_and_shape"] >= BOTH, drawn
    # retrieval: the story's last picture among all story pictures, and a caption's exact corpus picture
    assert ret["gill/5-captions-4-images"]["R@1"] >= CONTEXT_R1, ret  # chance 0.008
    exact = captions["retrieval_exact"]
    assert exact["R@1"] >= EXACT_R1 and exact["R@5"] >= EXACT_R5, captions  # chance 0.006, 0.03
    assert (out / "report" / "grid.png").is_file()


@pytest.mark.slow
def test_small_build_learns_to_decide_and_chats_with_pictures(small_build):
    _, report = small_build
    decision = report["decision"]
    assert decision["test_stories"]["balanced_accuracy"] >= DECIDE_STORIES, decision  # chance 0.5
    assert decision["held_out_prompts"]["test_balanced_accuracy"] >= DECIDE_HELD_OUT, decision
    chat = report["chat"]
    assert chat["on_topic_turns"] >= 4 and chat["images_of_the_asked_colour"] >= CHAT_PICTURES, chat["turns"]
    # a picture wherever the script asks for one, and only there (never " (picture)" written instead)
    assert [len(t["image_colours"]) > 0 for t in chat["turns"]] == [t["asked_colour"] is not None for t in chat["turns"]], chat["turns"]
    # whether the frozen LM follows the test stories: from their text as the lm stage's check found (the
    # shipped LM; all but the background, which the captions leave unsaid: v3.0 seeds 0 / 1 / 2 1.00 each; v2.8 0.96 / 0.88 /
    # 0.96, its text never began a story without one), and through GILL's visual prefixes where the pictures
    # are (no bound: measured)
    followed = report["stories_followed"]
    assert followed["n"] == 24 and followed["text"] >= 0.9 and 0 <= followed["pictures"] <= 1, followed
    # the retrieval head gets what a linear refit from the same [IMG0] states gets (with the [IMG] input rows
    # held at the LM rows' norm, an LM of another seed left it at 0.32 against 0.71: README)
    refit = report["captions"]["retrieval_refit"]
    assert refit["held_out"] == 56 and refit["trained_head_R@1_held_out_scenes"] >= refit["refit_img0_R@1"] - 0.1, refit
    # changes in a chat ("it turns yellow." after a scene), as the app runs them: the answer names the changed
    # scene and its picture shows what the answer says, well above chance (about 1/18 for the picture) though
    # far from always (v2.8, seeds 0 / 1 / 2: 0.78 / 0.86 / 0.86 and 0.53 / 0.67 / 0.53; v2.7 0.72 / 0.75 / 0.64
    # and 0.44 / 0.56 / 0.47; the shipped model 0.81 and 0.58; v2.6 0.25 for the picture)
    changes = report["chat_changes"]
    assert changes["n"] == 36 and all(0 <= v <= 1 for how in ("with_pictures", "text_only") for v in changes[how].values())
    said = changes["with_pictures"]
    assert said["answer_names_the_change"] >= CHANGE_NAMED and said["picture_shows_what_it_says"] >= CHANGE_SHOWN, changes
    # the report's "attached pictures" section asks about every scene, each picture opening a chat
    read = report["pictures_read"]
    assert read["named"]["n"] == len(world.all_scenes()) and read["named"]["colour_and_shape"] >= FIRST_READ, read
    # its free chats: random 10-turn chats of every kind of turn (bounds from the section, as measured)
    free = report["free_chats"]
    assert free["n"] == 100 and free["turns"] == 10 and free["all"]["n"] == 1000
    assert free["all"]["text_right"] >= FREE_TEXT and free["by_kind"]["describe"]["text_right"] >= FREE_DESCRIBE, free["all"]
    assert free["all"]["picture_right"] >= FREE_PICTURES and free["by_index"]["1"]["attached_read"] >= FREE_TURN1_READ, free["all"]
    assert free["all"]["img_inside"] == 0 and free["all"]["unasked_picture"] == 0, free["all"]


@pytest.mark.slow
def test_a_build_refits_its_mapper_alone_when_asked(small_build, tmp_path):
    """--mapper-steps N (the plan's mapper_steps): after GILL, the mapper alone is trained afresh on the final
    [IMG] states, and the model directory gets those weights: a mapper unlike GILL's own, every other trained
    weight GILL's, bit for bit; then the index and the decision head as usual."""
    import dataclasses
    import shutil

    from gill.checkpoint import load_safetensors
    from gill.pipeline import GILL
    from training.toy.gill_stage import stage_gill
    from training.toy.plan import SMALL

    built, _ = small_build
    out = tmp_path / "toy"
    for name in ("data", "sd-emb", "gill-run"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(built / name)
    shutil.copytree(built / "model", out / "model", ignore=shutil.ignore_patterns("decision*", "index"))
    stage_gill(out, dataclasses.replace(SMALL, mapper_steps=30), seed=0)
    joint = load_safetensors(built / "gill-run" / "final" / "gill.safetensors")
    shipped = load_safetensors(out / "model" / "gill.safetensors")
    assert shipped.keys() == joint.keys()
    assert all(torch.equal(shipped[k], joint[k]) for k in joint if not k.startswith("mapper."))
    assert not torch.equal(shipped["mapper.out_proj.weight"], joint["mapper.out_proj.weight"])
    history = json.loads((out / "mapper-run" / "history.json").read_text())
    assert len(history) == 30 and history[-1]["mapper"] < history[0]["mapper"] and history[0]["caption"] == 0.0
    model = GILL.from_pretrained(out / "model")  # with its index and decision head
    assert model.decision is not None and len(model.retriever) == 168


def test_backbones_reused_from_the_shipped_model_or_a_build_make_their_stages_skip(tmp_path):
    """--backbones copies the frozen LM, vision tower, diffusion model and metric model, so the build trains
    only GILL on them; a folder without them is named in the error."""
    from gill.presets import toy_dir
    from training.toy.backbones import reuse_backbones, stage_clip, stage_lm, stage_metric, stage_sd

    out = tmp_path / "build"
    reuse_backbones(out, "toy")
    for name in ("lm", "vision", "sd"):
        assert sorted(p.name for p in (out / "model" / name).iterdir()) == sorted(p.name for p in (toy_dir() / name).iterdir())
    assert (out / "metric-clip" / "config.json").is_file()
    before = (out / "model" / "lm" / "model.safetensors").read_bytes()
    for stage in (stage_lm, stage_clip, stage_metric, stage_sd):  # each skips: no data is read, nothing trained
        stage(out, None, 0)
    assert (out / "model" / "lm" / "model.safetensors").read_bytes() == before
    assert not (out / "sd-text").exists()  # GILL's diffusion targets then come from model/sd's text encoder
    again = tmp_path / "again"
    reuse_backbones(again, str(out))  # an earlier build's output folder
    assert (again / "model" / "sd" / "model_index.json").is_file()
    with pytest.raises(FileNotFoundError, match="no backbone at .*nowhere"):
        reuse_backbones(tmp_path / "x", str(tmp_path / "nowhere"))


def test_backbones_reused_with_the_lm_retrained_keep_only_its_tokenizer(tmp_path, monkeypatch):
    """--backbones toy --retrain lm: the vision tower, diffusion and metric models are the shipped ones, the LM
    folder holds only the shipped tokenizer (the world's BPE, which those models read too), so the lm stage
    trains a new LM on it and the data stage does not learn another tokenizer; --retrain alone is refused."""
    from gill.presets import toy_dir
    from training.toy.__main__ import main
    from training.toy.backbones import TOKENIZER_FILES, reuse_backbones

    out = tmp_path / "build"
    reuse_backbones(out, "toy", retrain=("lm",))
    assert sorted(p.name for p in (out / "model" / "lm").iterdir()) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:
        assert (out / "model" / "lm" / name).read_bytes() == (toy_dir() / "lm" / name).read_bytes()
    assert (out / "model" / "vision" / "config.json").is_file() and (out / "metric-clip" / "config.json").is_file()
    import training.toy.__main__ as toy_main

    ran = []
    monkeypatch.setattr(toy_main, "stage", lambda name: lambda out, plan, seed: ran.append(name))
    assert main(["--out", str(tmp_path / "b"), "--backbones", "toy", "--retrain", "lm", "--jobs", "1"]) in (0, None)
    assert ran == ["data", "lm", "gill", "eval", "report"]  # the LM trained anew; clip, metric and sd reused
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "c"), "--retrain", "lm"])


def test_a_failed_stage_of_a_side_by_side_build_is_named_and_stops_the_build(tmp_path):
    """--jobs 2 runs stages as child processes; one that fails (here: no data stage has run) ends the build
    with an error naming it, and the stages that would wait for it never start."""
    from training.toy.__main__ import _ancestors, main

    assert _ancestors("gill") == {"data", "lm", "clip"} and "sd" not in _ancestors("gill")
    with pytest.raises(SystemExit, match="toy build's (lm|clip) stage failed.*rerun the same command"):
        main(["--out", str(tmp_path / "b"), "--stages", "lm", "clip", "gill", "--jobs", "2"])
    assert not (tmp_path / "b" / "model" / "gill.safetensors").exists() and not (tmp_path / "b" / "gill-run").exists()


def test_gills_stage_runs_every_recipe_on_the_same_threads_wherever_it_runs(tmp_path, monkeypatch):
    """GILL's stage pins its processes' threads (plan.GILL_THREADS), so a build from scratch (GILL beside the
    diffusion model) and `--backbones toy` (GILL alone) sum floats alike and train the same GILL; the pin
    reaches the child's torch whatever the parent's environment says."""
    from training.toy import gill_stage
    from training.toy.plan import GILL_THREADS, SMALL, run

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    got = tmp_path / "threads.txt"
    run("-c", "import os, sys, torch; open(sys.argv[1], 'w').write(f\"{torch.get_num_threads()} {os.environ['OMP_WAIT_POLICY']}\")",
        str(got), threads=1)
    assert got.read_text() == "1 PASSIVE"  # and waiting threads sleep: more threads than free cores then cost little

    out = tmp_path / "b"
    (out / "data" / "corpus").mkdir(parents=True)
    (out / "data" / "decisions.tsv").write_text("prompt\tdecision\na\tret\n")
    (out / "model").mkdir()
    calls = []

    def fake_run(*cmd, threads=None):  # each recipe's outputs, as far as the stage reads them
        calls.append((cmd[1], threads))
        if cmd[1] == "training.train":
            final = out / "gill-run" / "final"
            final.mkdir(parents=True)
            (final / "config.json").write_text("{}")
            (final / "gill.safetensors").write_bytes(b"")
        if cmd[1] == "index.build":
            (out / "model" / "index" / "manifest.json").write_text("{}")

    monkeypatch.setattr(gill_stage, "run", fake_run)
    gill_stage.stage_gill(out, SMALL, seed=0)
    assert [c for c, _ in calls] == ["training.precompute_sd_embeddings", "training.train", "index.build",
                                     "training.train_decision"]
    assert {t for _, t in calls} == {GILL_THREADS}, calls


def test_the_lms_chats_are_as_long_as_asked():
    """world_text's chats have 1 to ``chat_turns`` turns (5 by default, as v2.1-v2.9's LM and tokenizer read)."""
    import random

    train, test = world.split_compositions()

    def longest(**kw):
        text = world.world_text(random.Random(1), train | test, n_stories=0, n_chats=300, **kw)
        return max(t.count("Q: ") for t in text if t.startswith("Q: "))

    assert longest() == 5 and longest(chat_turns=12) == 12
