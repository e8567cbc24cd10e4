"""Stage 1, the world's data: the retrieval corpus, GILL's training shards (single captions, chats in the
app's format, stories as text and as interleaved samples), VIST-format val/test stories, the LM's text and
the decision annotations. Everything is drawn from ``training.toy.world`` with one seed."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from gill.config import TokenConfig
from training.toy import world
from training.toy.plan import CHAT_TURNS, VISUAL_TOKENS, Plan, log


def _png(scene: world.Scene, jitter: tuple[int, int] = (0, 0)) -> bytes:
    buf = io.BytesIO()
    world.render(scene, jitter=jitter).save(buf, format="PNG")
    return buf.getvalue()


# Captioning (the visual prefix's only task of its own) only where the picture tells the text: a story told as
# one text (5 captions, the last one's picture), a story step ("it moves to the left.") or a chat's last turn
# (the user's words) cannot be read off their picture, and with them among the targets the prefix learnt
# almost nothing (single captions from v2.9's prefix: loss 0.90, against 0.06 for a prefix fitted on them;
# trained on the build's data without them, 300 steps: 0.77 -> 0.52). Their [IMG] tasks are unchanged.
NO_CAPTIONING = json.dumps({"caption": 0})


def interleaved(key: str, pairs: list[tuple[str, world.Scene]], text: str, target: world.Scene) -> dict:
    """A webdataset sample with a context (training.data's interleaved layout), not a captioning target."""
    sample = {"__key__": key, "png": _png(target), "txt": text, "sd.txt": target.caption(),
              "context.json": json.dumps([t for t, _ in pairs]), "loss.json": NO_CAPTIONING}
    for i, (_, scene) in enumerate(pairs):
        sample[f"context{i}.png"] = _png(scene)
    return sample


def training_samples(plan: Plan, rng: random.Random, train_comp: set, length=len) -> list[dict]:
    """GILL's training samples: what the [IMG] tokens follow (``txt``), the picture (``png``), the picture's
    own caption as the diffusion target (``sd.txt``) and, for stories and chats, the context. ``length``: a
    text's tokens (the LM's tokenizer with the [IMG] tokens), by which chats are fitted to ``plan.gill_len``."""
    samples = []
    for s in (s for s in world.all_scenes() if s.composition in train_comp):
        for k in range(plan.train_images_per_scene):
            jitter = (rng.randint(-1, 1), rng.randint(-1, 1)) if k else (0, 0)
            text = f"{s.caption()}." if k % 2 == 0 else f"Q: {world.describe(s, rng)}\nA: {s.caption()}."
            samples.append({"__key__": f"{s.key}-{k}", "png": _png(s, jitter), "txt": text, "sd.txt": s.caption()})
    for n in range(plan.train_stories):
        steps = world.unsaid_background(world.story(rng, train_comp))
        captions = [f"{c}." for _, c in steps]
        last = steps[-1][0]
        # the story as one text (the "5 captions" setting), and interleaved with its pictures (5 + 4)
        samples.append({"__key__": f"story-{n:05d}", "png": _png(last), "txt": " ".join(captions), "sd.txt": last.caption(),
                        "loss.json": NO_CAPTIONING})
        # half of them keep only their last 1-3 pairs: then the captions left only refer back ("it moves to
        # the left"), and the scene they change is in the pictures alone, which teaches the [IMG] tokens to
        # read the pictures (with the whole story the text already tells it)
        pairs = [(c, s) for c, (s, _) in zip(captions[:-1], steps[:-1])]
        pairs = pairs[-(1 + n // 2 % 3):] if n % 2 else pairs  # (no draw from rng: the test stories stay as they are)
        samples.append(interleaved(f"istory-{n:05d}", pairs, captions[-1], last))
    for n in range(plan.train_chats + plan.attach_chats):
        turns = world.conversation(rng, train_comp, rng.randint(1, CHAT_TURNS))
        if n >= plan.train_chats:  # more chats that begin with an attached picture: reading one is a task of its own
            while turns[0].attached is None:
                turns = world.conversation(rng, train_comp, rng.randint(2, CHAT_TURNS))
        while turns and turns[-1].scene is None:
            turns.pop()
        if turns:
            samples.append(interleaved(f"chat-{n:05d}", *fitted_chat(turns, length, plan.gill_len)))
    rng.shuffle(samples)
    return samples


IMG_TEXT = "".join(TokenConfig().strings)  # the [IMG] tokens GILL adds to the toy's tokenizer (gill_stage's config)


def fitted_chat(turns: list[world.Turn], length, max_len: int) -> tuple[list[tuple[str, world.Scene]], str, world.Scene]:
    """``world.chat_sample`` of the chat's most recent whole turns whose sample (texts by ``length``, visual
    tokens and the closing [IMG] tokens) fits ``max_len`` (GILL's training sequences), as the app keeps a chat inside the
    model's context: training.train would otherwise cut the end of the text, the answer the sample is for."""
    for start in range(len(turns)):
        pairs, text, scene = world.chat_sample(turns[start:], IMG_TEXT)
        used = length(text) + sum(length(t) + VISUAL_TOKENS for t, _ in pairs) + len(TokenConfig().strings) + 1
        if used <= max_len:
            break
    return pairs, text, scene


def write_shards(folder: Path, samples: list[dict], n_shards: int = 4) -> str:
    """The samples in ``n_shards`` webdataset shards; returns their brace pattern."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // n_shards)
    with wds.ShardWriter(str(folder / "train-%d.tar"), maxcount=per, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return str(folder / f"train-{{0..{n_shards - 1}}}.tar")


def stage_data(out: Path, plan: Plan, seed: int) -> None:
    data = out / "data"
    if (data / "done").exists():
        return
    # the world's split, the same for every seed: a build on reused backbones (--backbones) must keep the
    # compositions their LM was told there are photos of
    train_comp, test_comp = world.split_compositions()
    rng = random.Random(seed)
    corpus = data / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    scenes = [s for s in world.all_scenes() if s.composition in train_comp]
    for s in scenes:  # the retrieval corpus: one clean picture per scene of the training compositions
        world.render(s).save(corpus / f"{s.key}-0.png")
        (corpus / f"{s.key}-0.txt").write_text(s.caption())
    if not (out / "model" / "lm" / "tokenizer.json").exists():  # (reused by --backbones, the LM's or alone: kept)
        from gill.backbones import build_tokenizer  # the world's BPE, shared by the LM and the CLIP text towers

        # learnt from the text without its attribute-first lines (world.FIRST), which add no word: the
        # vocabulary, and so the CLIP towers and diffusion and metric models trained with it, stay v2.1's
        # (and its chats of up to 5 turns, as v2.1-v2.9's)
        bare = world.world_text(random.Random(seed + 1), train_comp | test_comp, common=train_comp, attribute_first=0,
                                chat_turns=5)
        build_tokenizer(448, corpus=bare).save_pretrained(out / "model" / "lm")
    samples = training_samples(plan, rng, train_comp, length=token_counter(out / "model" / "lm"))
    write_shards(data / "shards", samples)
    # the evaluation's stories and the decision annotations have seeds of their own, so they stay the same
    # whatever the plan draws for training (a test set that moved with the training data made two builds'
    # reports incomparable)
    held_out = random.Random(seed + 2)
    for split, n, comps in (("val", plan.val_stories, train_comp), ("test", plan.test_stories, train_comp | test_comp)):
        stories = [world.unsaid_background(steps) for steps in world.distinct_stories(held_out, comps, n)]
        ann, photos = world.vist_annotations(stories)
        folder = data / f"{split}-images"
        folder.mkdir(exist_ok=True)
        for photo, scene in photos.items():
            world.render(scene).save(folder / f"{photo}.png")
        (data / f"{split}-sis.json").write_text(json.dumps(ann))
        (data / f"{split}-scenes.json").write_text(json.dumps({p: s.__dict__ for p, s in photos.items()}))
    # the LM's text has its own seed, so the reduced build's LM reads the same kind of text as the full one's
    text = world.world_text(random.Random(seed + 1), train_comp | test_comp, common=train_comp, chat_turns=CHAT_TURNS)
    (data / "text.json").write_text(json.dumps(text))
    (data / "decisions.tsv").write_text(decision_annotations(plan, random.Random(seed + 3), train_comp, test_comp))
    (data / "split.json").write_text(json.dumps({"train": sorted(train_comp), "test": sorted(test_comp)}))
    (data / "done").write_text("ok")
    log(f"data: {len(samples)} training samples, corpus of {len(scenes)}, test compositions {sorted(test_comp)}")


def token_counter(lm: Path):
    """How many tokens a text takes for GILL: the LM's tokenizer with the [IMG] tokens added."""
    from transformers import AutoTokenizer

    from gill.tokens import add_image_tokens

    tokenizer = AutoTokenizer.from_pretrained(lm)
    add_image_tokens(tokenizer)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def decision_annotations(plan: Plan, rng: random.Random, train_comp: set, test_comp: set) -> str:
    """PartiPrompts-format decisions: retrieve what the corpus holds, generate unseen compositions; as
    captions, as the app's chat turns and after whole stories. Tabs and newlines cannot occur in a TSV
    cell, so a chat turn's newline is written as a space there (the features are read the same way)."""
    label = {True: "ret", False: "gen"}
    body = []
    for s in world.all_scenes():
        body.append(f"{s.caption()}.\t{label[s.composition in train_comp]}")  # as GILL's captions are typed
        body.append(f"Q: {world.describe(s, rng)} A: {s.caption()}.\t{label[s.composition in train_comp]}")
    for _ in range(plan.decision_stories):  # the decision is also taken after a whole story
        steps = world.unsaid_background(world.story(rng, train_comp | test_comp))
        body.append(f"{' '.join(c + '.' for _, c in steps)}\t{label[steps[-1][0].composition in train_comp]}")
    rng.shuffle(body)
    return "\n".join(["Prompt\tDecision", *body]) + "\n"
