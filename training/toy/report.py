"""Stage 7, the report: each of GILL's claims as a row beside its baseline and chance, the generation and
retrieval tables of the VIST-format eval, single captions, a scripted chat, free chats (training.toy.free_chats)
and the picture grid. OUT/report: report.json, report.md, grid.png and free-chats.json (every free-chat turn)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.toy import free_chats, world
from training.toy.backbones import image_processor, pixels, text_inputs
from training.toy.plan import log

# a scripted 5-turn chat (turns as a person types them) and the colour each asked picture must have
CHAT_SCRIPT = [("a large red circle on the left on white.", "red"), ("it turns blue.", "blue"),
               ("what shape is it?", None), ("a small green square on the right on gray.", "green"),
               ("it moves to the middle.", "green")]


class AttributeJudge:
    """What a picture shows, read two ways: the nearest clean rendering of any scene (pixel distance: the
    world's own ground truth; colour from the foreground's pixels) and the metric CLIP's best caption."""

    def __init__(self, out: Path):
        from transformers import AutoTokenizer, CLIPModel

        self.scenes = world.all_scenes()
        self.clip = CLIPModel.from_pretrained(out / "metric-clip", trust_remote_code=False).eval()
        self.processor = image_processor()
        lm_tokenizer = AutoTokenizer.from_pretrained(out / "model" / "lm", trust_remote_code=False)
        tok = text_inputs(lm_tokenizer, [s.caption() for s in self.scenes])
        with torch.no_grad():
            feats = self.clip.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        self.text = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)

    @torch.no_grad()
    def __call__(self, images) -> dict[str, list[world.Scene]]:
        images = [im.convert("RGB").resize((world.IMAGE_SIZE,) * 2) for im in images]
        feats = self.clip.get_image_features(pixel_values=pixels(self.processor, images))
        zero_shot = (F.normalize(getattr(feats, "pooler_output", feats), dim=-1) @ self.text.T).argmax(-1)
        render = world.scenes_shown(images, self.scenes)
        return {"render": render, "metric_clip": [self.scenes[i] for i in zero_shot]}


def attribute_accuracy(judged: list[world.Scene], targets: list[world.Scene]) -> dict[str, float]:
    n = max(len(targets), 1)
    return {"colour": sum(j.color == t.color for j, t in zip(judged, targets)) / n,
            "shape": sum(j.shape == t.shape for j, t in zip(judged, targets)) / n,
            "colour_and_shape": sum(j.composition == t.composition for j, t in zip(judged, targets)) / n,
            "position": sum(j.position == t.position for j, t in zip(judged, targets)) / n, "n": len(targets)}


def decisions(gill, prompts: list[str], labels: list[str]) -> dict[str, float]:
    """The decision head as the library runs it (features of ``prompt + [IMG]``, best retrieval score,
    ``gill.decision.decide`` with policy auto) against 'ret' where the corpus holds the scene."""
    from gill.decision import decide, decision_probs
    from training.train_decision import balanced_accuracy, features

    retriever = gill.retriever if gill.model.config.decision.use_ret_score else None
    x = features(gill.model, gill.tokenizer, gill.img_tokens, prompts, retriever=retriever)
    chosen = [d.choice for d in decide("auto", decision_probs(gill.decision, x), len(prompts), True, True)]
    y = torch.tensor([("gen", "ret").index(v) for v in labels])
    pred = torch.tensor([("gen", "ret").index(c) for c in chosen])
    recall = {k: ((pred == i) & (y == i)).sum().item() / max((y == i).sum().item(), 1) for i, k in enumerate(("gen", "ret"))}
    return {"balanced_accuracy": balanced_accuracy(pred, y), "accuracy": (pred == y).float().mean().item(),
            "majority_baseline": max(labels.count("ret"), labels.count("gen")) / len(labels),
            "recall_ret": recall["ret"], "recall_gen": recall["gen"], "n": len(labels)}


@torch.no_grad()
def single_captions(gill, judge: AttributeJudge, train_comp: set) -> dict:
    """GILL on single captions (every scene of the world: 216, 48 of unseen compositions; until v2.7 every
    third, whose 16 unseen scenes measured the unseen claim to about +-0.2): what it draws beside what the
    diffusion model draws from the caption itself (the most GILL's generation can reach), and, for corpus
    scenes, whether it retrieves the exact picture (R@1 among the whole corpus)."""
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import generate_from_text

    scenes = world.all_scenes()
    slots = gill.image_slot_embeddings([[f"{s.caption()}."] for s in scenes])  # as a person types one
    run = gill.run_settings()
    options = DiffusionOptions(steps=run.steps, guidance_scale=run.guidance_scale)
    seeds = list(range(len(scenes)))
    judged = judge(gill.diffusion.generate(slots.generation, options, seeds=seeds))["render"]
    sd = judge(generate_from_text(gill.diffusion.pipe, [s.caption() for s in scenes], options, seeds, False))["render"]
    unseen = [i for i, s in enumerate(scenes) if s.composition not in train_comp]
    hits = gill.retriever.search(slots.retrieval, k=5)
    corpus = [i for i, s in enumerate(scenes) if s.composition in train_comp]
    r1 = sum(hits[i][0].record.caption == scenes[i].caption() for i in corpus) / len(corpus)
    r5 = sum(scenes[i].caption() in [h.record.caption for h in hits[i]] for i in corpus) / len(corpus)
    return {"n": len(scenes), "generation": attribute_accuracy(judged, scenes),
           "generation_unseen": attribute_accuracy([judged[i] for i in unseen], [scenes[i] for i in unseen]),
           "sd_own_caption": attribute_accuracy(sd, scenes),
           "sd_own_caption_unseen": attribute_accuracy([sd[i] for i in unseen], [scenes[i] for i in unseen]),
           "retrieval_exact": {"R@1": r1, "R@5": r5, "n": len(corpus), "chance_R@1": 1 / len(gill.retriever)}}


@dataclass
class ChatAnswer:
    text: str  # the answer's words, as the app shows them
    pictures: list  # the PIL images it shows, retrieved or generated


def chat_turn(gill, history: list, question: str, feed_back_pictures: bool = True) -> ChatAnswer:
    """One turn as the app runs it (the "Q: ...\nA:" format, default settings, seed 0): the answer's text and
    pictures; ``history`` is extended with the turn and the answer (its pictures as their [IMG] tokens, unless
    not ``feed_back_pictures``), as the app feeds an answer back."""
    from gill import chat as turns_format
    from gill.pipeline import GeneratedImage, RetrievedImage, Text

    turn = turns_format.turn_items(question)
    # the most recent whole turns that fit the model's context, as the app keeps a chat (free_chats.fit_turns)
    kept, _ = free_chats.fit_turns(gill, split_turns(history), turn, gill.run_settings().max_new_tokens)
    answer = gill.generate_interleaved([x for t in kept for x in t] + turn, stop_strings=turns_format.STOP_STRINGS,
                                       end_at_image=turns_format.END_AT_IMAGE, seed=0)
    decoded = "".join(s.text for s in answer if isinstance(s, Text))
    pictures = [s.image for s in answer if isinstance(s, (GeneratedImage, RetrievedImage)) and s.image is not None]
    parts = [s.text if isinstance(s, Text) else s for s in answer
             if isinstance(s, Text) or (feed_back_pictures and isinstance(s, (GeneratedImage, RetrievedImage)))]
    history += turn + turns_format.answer_items(parts, gill.img_tokens.text)
    return ChatAnswer(turns_format.answer_text(decoded), pictures)


def split_turns(history: list) -> list[list]:
    """A chat's items (``chat_turn``'s history) as its turns: each from its attached pictures or its question
    ("Q: ...") to the end of its answer."""
    turns: list[list] = []
    for item in history:
        opens = not isinstance(item, str) or item.startswith("Q: ")
        after_picture = bool(turns) and not isinstance(turns[-1][-1], str)  # a question after its attachment
        if not turns or (opens and not after_picture):
            turns.append([])
        turns[-1].append(item)
    return turns


def chat(gill) -> dict:
    """CHAT_SCRIPT through the app's turn format ("Q: ...\nA:", the answer's text and pictures fed back),
    default settings: per turn, the answer, whether it names a colour or shape of the world, and the
    colour of each picture it shows."""
    words = set(world.COLORS) | set(world.SHAPES)
    history: list = []
    turns = []
    for question, colour in CHAT_SCRIPT:
        answer = chat_turn(gill, history, question)
        text = answer.text
        colours = [world.dominant_colour(im) for im in answer.pictures]
        turns.append({"question": question, "answer": text.strip(), "asked_colour": colour, "image_colours": colours,
                      "on_topic": any(w in text.replace(".", " ").split() for w in words)})
    return {"turns": turns, "on_topic_turns": sum(t["on_topic"] for t in turns),
            "images_of_the_asked_colour": sum(t["asked_colour"] in t["image_colours"] for t in turns if t["asked_colour"])}


@torch.no_grad()
def retrieval_refit(gill, train_comp: set, ridge: float = 0.1, seed: int = 0) -> dict:
    """Whether GILL's trained text-side retrieval head gets what its [IMG] states hold: each corpus scene's
    caption, as typed, retrieves its picture among the corpus's (R@1) through the trained head, and through
    ridge regressions onto the image-side embeddings fitted on 2/3 of the scenes and scored on the other
    third, from [IMG0]'s state (what the head reads) and from the mean of all [IMG] states."""
    scenes = [s for s in world.all_scenes() if s.composition in train_comp]
    slots = gill.image_slot_embeddings([[f"{s.caption()}."] for s in scenes])
    pixels = gill.image_processor(images=[world.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    images = F.normalize(gill.model.encode_images(pixels).retrieval.float(), dim=-1)
    truth = torch.arange(len(scenes))
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed))
    fit, held = order[: len(scenes) * 2 // 3], order[len(scenes) * 2 // 3:]

    def refit(states: torch.Tensor) -> float:
        x = torch.cat([states.float(), torch.ones(len(states), 1)], 1)
        w = torch.linalg.solve(x[fit].T @ x[fit] + ridge * torch.eye(x.shape[1]), x[fit].T @ images[fit])
        return ((x[held] @ w) @ images.T).argmax(-1).eq(truth[held]).float().mean().item()

    trained = (F.normalize(slots.retrieval.float(), dim=-1) @ images.T).argmax(-1).eq(truth)
    return {"n": len(scenes), "held_out": len(held), "trained_head_R@1": trained.float().mean().item(),
            "trained_head_R@1_held_out_scenes": trained[held].float().mean().item(),
            "refit_img0_R@1": refit(slots.hidden[:, 0]), "refit_mean_img_R@1": refit(slots.hidden.mean(1))}


def chat_changes(gill, n: int = 36) -> dict:
    """Two chat turns, as the app runs them (default settings): a scene, then a change to it ("it turns
    yellow."; a story's first two steps, any composition). How often the second answer names the changed
    scene, and how often its picture shows the scene the answer names (colour and shape, the world's judge),
    with and without the first turn's picture in the history (the pictures a chat shows are read back as
    visual prefixes)."""
    rng = random.Random(5)
    scenes = world.all_scenes()
    every = {s.composition for s in scenes}
    chats = [(steps[0][0], f"{steps[1][1]}.", steps[1][0]) for steps in (world.story(rng, every) for _ in range(n))]
    out: dict = {"n": n}
    for how in ("with_pictures", "text_only"):
        words_right = shown_as_said = 0
        for scene, change, changed in chats:
            history: list = []
            chat_turn(gill, history, f"{scene.caption()}.", feed_back_pictures=how == "with_pictures")
            answer = chat_turn(gill, history, change)
            text, pictures = answer.text.strip(), answer.pictures
            words_right += text == world.now_it_is(changed)
            named = next((s for s in scenes if text.endswith(f" {s.caption()}.")), None)
            shown = world.scenes_shown(pictures[:1])[0] if pictures else None
            shown_as_said += named is not None and shown is not None and shown.composition == named.composition
        out[how] = {"answer_names_the_change": words_right / n, "picture_shows_what_it_says": shown_as_said / n}
    return out


def stories_followed(gill, stories: list[list[tuple[str, world.Scene]]]) -> dict:
    """Whether the frozen LM follows a story to its end, as GILL gives it the story's text alone and with its
    pictures between the captions (the "5 captions + 4 images" input): how often the greedy words after
    '<story> there are photos of it. now it is' (the LM's own text after a story) are its last scene's caption,
    up to what the captions tell (GILL's stories leave the background to their pictures)."""
    from gill.pipeline import Text

    ends = [steps[-1][1].caption(background=False) for steps in stories]
    inputs = {"text": [[world.ask_story_end(" ".join(c for c, _ in steps))] for steps in stories],
              "pictures": [[x for c, s in steps[:-1] for x in (c, world.render(s))] + [world.ask_story_end(steps[-1][0])]
                           for steps in stories]}
    out = {"n": len(stories)}
    for how, conversations in inputs.items():
        answers = gill.generate_interleaved(conversations, policy="retrieve", seed=0, max_new_tokens=14)
        said = ["".join(x.text for x in a if isinstance(x, Text)).strip() for a in answers]
        out[how] = sum(t.startswith(e) for t, e in zip(said, ends)) / max(len(stories), 1)
    return out


def attached_pictures(gill, train_comp: set) -> dict:
    """The app's "attach a picture and ask" turn: every scene's clean picture, then "what is this?" in
    the chat's turn format, default settings (pictures in answers retrieved: only the text is read). Per
    attribute, how often the answer names the picture's own (chance: 1 / the attribute's values)."""
    from gill import chat as turns_format
    from gill.pipeline import Text

    scenes = world.all_scenes()
    answers = gill.generate_interleaved([turns_format.turn_items("what is this?", [world.render(s)]) for s in scenes],
                                        policy="retrieve", stop_strings=turns_format.STOP_STRINGS,
                                        end_at_image=turns_format.END_AT_IMAGE, seed=0)
    texts = [turns_format.answer_text("".join(x.text for x in a if isinstance(x, Text))) for a in answers]
    words = [set(t.replace(".", " ").split()) for t in texts]

    def named(idx):
        attrs = {"colour": ("color",), "shape": ("shape",), "size": ("size",), "position": ("position",),
                 "background": ("background",), "colour_and_shape": ("color", "shape")}
        return {name: sum(all(getattr(scenes[i], a) in words[i] for a in these) for i in idx) / max(len(idx), 1)
                for name, these in attrs.items()} | {"n": len(idx)}

    unseen = [i for i, s in enumerate(scenes) if s.composition not in train_comp]
    return {"named": named(range(len(scenes))), "named_unseen": named(unseen),
            "examples": [{"picture": scenes[i].caption(), "answer": texts[i].strip()} for i in range(0, len(scenes), 37)]}


def stage_report(out: Path, plan, seed: int) -> None:
    from PIL import Image

    from gill.pipeline import GILL
    from gill.presets import toy_dir
    from training.toy import free_chats

    data, ev = out / "data", out / "eval"
    summary = json.loads((ev / "summary.json").read_text())
    scenes = {p: world.Scene(**d) for p, d in json.loads((data / "test-scenes.json").read_text()).items()}
    train_comp = {tuple(x) for x in json.loads((data / "split.json").read_text())["train"]}
    judge = AttributeJudge(out)
    report: dict = {"generation": {}, "retrieval": {}, "decision": {}}
    if (out / "lm-check.json").is_file():
        report["lm"] = json.loads((out / "lm-check.json").read_text())
    records = {}
    for name, entry in summary["settings"].items():
        recs = [json.loads(line) for line in (ev / name / "records.jsonl").read_text().splitlines() if line.strip()]
        records[name] = recs
        targets = [scenes[r["target_id"]] for r in recs]
        judged = judge([Image.open(ev / name / r["image"]) for r in recs])
        unseen = [i for i, t in enumerate(targets) if t.composition not in train_comp]
        report["generation"][name] = {
            "clip_similarity": entry["clip_similarity"], "clip_similarity_ci95": entry["clip_similarity_ci95"],
            "n": entry["n"], **{f"by_{how}": attribute_accuracy(j, targets) for how, j in judged.items()},
            "by_render_unseen_compositions": attribute_accuracy([judged["render"][i] for i in unseen], [targets[i] for i in unseen]),
        }
    report["generation"]["chance"] = {"colour": 1 / len(world.COLORS), "shape": 1 / len(world.SHAPES),
                                      "colour_and_shape": 1 / (len(world.COLORS) * len(world.SHAPES)),
                                      "position": 1 / len(world.POSITIONS)}
    gallery = summary["retrieval"]["gallery_size"]
    for name, entry in summary["retrieval"].items():
        if isinstance(entry, dict):
            report["retrieval"][name] = entry["context_masked"]
    report["retrieval"]["chance"] = {f"R@{k}": k / gallery for k in (1, 5, 10)}
    report["retrieval"]["gallery_size"] = gallery

    gill = GILL.from_pretrained(out / "model")
    ann = json.loads((data / "test-sis.json").read_text())["annotations"]
    by_story: dict[str, list] = {}
    for (a,) in ann:
        by_story.setdefault(a["story_id"], []).append(a)
    texts, labels = [], []
    for steps in by_story.values():
        steps.sort(key=lambda a: a["worker_arranged_photo_order"])
        texts.append(" ".join(a["original_text"] for a in steps))
        labels.append("ret" if scenes[steps[-1]["photo_flickr_id"]].composition in train_comp else "gen")
    report["decision"]["test_stories"] = decisions(gill, texts, labels)
    held_out = out / "model" / "decision_metrics.json"
    if held_out.is_file():
        report["decision"]["held_out_prompts"] = json.loads(held_out.read_text())
    report["stories_followed"] = stories_followed(gill, [[(a["original_text"], scenes[a["photo_flickr_id"]]) for a in steps]
                                                         for steps in by_story.values()])
    report["captions"] = single_captions(gill, judge, train_comp)
    report["captions"]["retrieval_refit"] = retrieval_refit(gill, train_comp)
    report["chat"] = chat(gill)
    report["chat_changes"] = chat_changes(gill)
    report["pictures_read"] = attached_pictures(gill, train_comp)
    start = time.time()
    free = free_chats.free_chats(gill)  # its every turn's record goes beside the report, not into report.json
    report["free_chats"] = {k: v for k, v in free.items() if k != "records"}
    report["free_chats"]["previous"] = free_chats.previous_figures(toy_dir() / "report")  # (before --install)
    log(f"free chats: {free['n']} chats of {free['turns']} turns in {time.time() - start:.0f} s; the shipped model's "
        f"figures beside them: {'yes' if report['free_chats']['previous'] else 'none in ' + str(toy_dir() / 'report')}")
    report["claims"] = claims(report)

    folder = out / "report"
    folder.mkdir(exist_ok=True)
    (folder / "free-chats.json").write_text(json.dumps(free, indent=1) + "\n")
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(report_markdown(report))
    grid(gill, ev, by_story, records, folder / "grid.png")
    log(f"report: {folder / 'report.md'}")
    print((folder / "report.md").read_text())


def claims(r: dict) -> list[dict]:
    """Each claim the toy must show: what was measured, the baseline it must beat (or the bound it must
    reach), chance, and whether it holds."""
    g, ch = r["generation"], r["generation"]["chance"]
    sim = {k: v["clip_similarity"] for k, v in g.items() if "clip_similarity" in v}
    rows = []

    def row(claim, value, baseline, chance, holds):
        rows.append({"claim": claim, "measured": value, "baseline": baseline, "chance": chance, "holds": bool(holds)})

    if {"gill/5-captions-4-images", "gill/5-captions", "gill/1-caption", "sd/1-caption"} <= set(sim):
        row("generation: 5 captions + 4 images >= 5 captions (CLIP similarity)", sim["gill/5-captions-4-images"],
            sim["gill/5-captions"], None, sim["gill/5-captions-4-images"] >= sim["gill/5-captions"])
        row("generation: 5 captions > the last caption", sim["gill/5-captions"], sim["gill/1-caption"], None,
            sim["gill/5-captions"] > sim["gill/1-caption"])
        row("generation: GILL on the last caption > SD on it", sim["gill/1-caption"], sim["sd/1-caption"], None,
            sim["gill/1-caption"] > sim["sd/1-caption"])
    c = r["captions"]
    both, unseen = c["generation"]["colour_and_shape"], c["generation_unseen"]["colour_and_shape"]
    row("single captions drawn with colour and shape right >= 0.8", both, 0.8, ch["colour_and_shape"], both >= 0.8)
    row("... of unseen compositions >= 0.8", unseen, 0.8, ch["colour_and_shape"], unseen >= 0.8)
    ret = r["retrieval"].get("gill/5-captions-4-images") or r["retrieval"].get("gill/5-captions")
    if ret:
        row("contextual story retrieval R@1 >= 0.3", ret["R@1"], 0.3, r["retrieval"]["chance"]["R@1"], ret["R@1"] >= 0.3)
    e = c["retrieval_exact"]
    row("exact single-caption retrieval R@1 >= 0.8", e["R@1"], 0.8, e["chance_R@1"], e["R@1"] >= 0.8)
    d = r["decision"]["test_stories"]["balanced_accuracy"]
    row("decision on test stories, balanced accuracy >= 0.8", d, 0.8, 0.5, d >= 0.8)
    h = r["decision"].get("held_out_prompts", {}).get("test_balanced_accuracy")
    if h is not None:
        row("decision on held-out prompts, balanced accuracy >= 0.8", h, 0.8, 0.5, h >= 0.8)
    t = r["chat"]
    row("5-turn chat: every turn on topic", t["on_topic_turns"], 5, None, t["on_topic_turns"] == 5)
    row("5-turn chat: >= 3 pictures of the asked colour", t["images_of_the_asked_colour"], 3, None,
        t["images_of_the_asked_colour"] >= 3)
    return rows


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def report_markdown(r: dict) -> str:
    g, ch = r["generation"], r["generation"]["chance"]
    lines = ["# Toy world: GILL's claims", "", "| claim | measured | baseline or bound | chance | holds |",
             "|---|---|---|---|---|"]
    for c in r["claims"]:
        lines.append(f"| {c['claim']} | {_fmt(c['measured'])} | {_fmt(c['baseline'])} | {_fmt(c['chance'])} | "
                     f"{'yes' if c['holds'] else '**no**'} |")
    lines += ["", "## Generation on the VIST-format test stories", "",
              "| setting | CLIP similarity (metric model) | colour / shape / both right (rendering) | "
              "both right (metric CLIP) | both right, unseen compositions |", "|---|---|---|---|---|"]
    for name, e in g.items():
        if name == "chance":
            continue
        a, m, u = e["by_render"], e["by_metric_clip"], e["by_render_unseen_compositions"]
        lines.append(f"| {name} | {e['clip_similarity']:.3f} ± {e['clip_similarity_ci95']:.3f} | "
                     f"{a['colour']:.2f} / {a['shape']:.2f} / {a['colour_and_shape']:.2f} | {m['colour_and_shape']:.2f} | "
                     f"{u['colour_and_shape']:.2f} (n={u['n']}) |")
    lines.append(f"| chance | | {ch['colour']:.2f} / {ch['shape']:.2f} / {ch['colour_and_shape']:.2f} | "
                 f"{ch['colour_and_shape']:.2f} | |")
    if "stories_followed" in r:
        f = r["stories_followed"]
        lines += ["", f"The frozen LM says where a test story ends (greedy, after \"there are photos of it. now it is\"; all "
                  f"but the background, which the captions leave to the pictures) in {f['text']:.2f} of them from their "
                  f"text, {f['pictures']:.2f} with their pictures between the captions."]
    lines += ["", f"## Retrieval (the story's last picture among {r['retrieval']['gallery_size']}, context masked)", "",
              "| setting | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for name, e in r["retrieval"].items():
        if isinstance(e, dict):
            lines.append(f"| {name} | {e['R@1']:.3f} | {e['R@5']:.3f} | {e['R@10']:.3f} |")
    d = r["decision"]["test_stories"]
    lines += ["", "## Decision (retrieve when the corpus holds the scene, generate otherwise)", "",
              f"- test stories: balanced accuracy {d['balanced_accuracy']:.2f} (chance 0.50; recall ret {d['recall_ret']:.2f}, "
              f"gen {d['recall_gen']:.2f}); accuracy {d['accuracy']:.2f} (majority class {d['majority_baseline']:.2f}, n={d['n']})"]
    if "held_out_prompts" in r["decision"]:
        h = r["decision"]["held_out_prompts"]
        lines.append(f"- held-out prompts (captions, chat turns, stories; n={h['test_examples']}): balanced accuracy "
                     f"{h.get('test_balanced_accuracy', float('nan')):.2f}, macro-F1 {h['test_macro_f1']:.2f} "
                     f"(majority class {h['test_majority_macro_f1']:.2f})")
    c = r["captions"]
    gen, un = c["generation"], c["generation_unseen"]
    lines += ["", f"## Single captions ({c['n']} scenes, {un['n']} of unseen compositions)", "",
              f"- GILL draws: colour {gen['colour']:.2f}, shape {gen['shape']:.2f}, both {gen['colour_and_shape']:.2f}, "
              f"position {gen['position']:.2f}; unseen compositions: both {un['colour_and_shape']:.2f}"]
    sd, sd_un = c["sd_own_caption"], c["sd_own_caption_unseen"]
    lines.append(f"- the diffusion model from the caption itself: colour {sd['colour']:.2f}, shape {sd['shape']:.2f}, "
                 f"both {sd['colour_and_shape']:.2f}; unseen compositions: both {sd_un['colour_and_shape']:.2f}")
    lines.append(f"- retrieved, the exact picture among {round(1 / c['retrieval_exact']['chance_R@1'])}: R@1 "
                 f"{c['retrieval_exact']['R@1']:.2f}, R@5 {c['retrieval_exact']['R@5']:.2f} (n={c['retrieval_exact']['n']})")
    if "retrieval_refit" in c:
        f = c["retrieval_refit"]
        lines.append(f"- the trained retrieval head on [IMG0] vs a ridge refit on 2/3 of the corpus captions (scored on the "
                     f"other {f['held_out']}, among all {f['n']}): R@1 {f['trained_head_R@1_held_out_scenes']:.2f} vs "
                     f"{f['refit_img0_R@1']:.2f} from [IMG0], {f['refit_mean_img_R@1']:.2f} from the mean of the [IMG] states")
    lines += ["", "## A scripted chat (the app's turn format, default settings)", ""]
    for t in r["chat"]["turns"]:
        lines.append(f"- Q: {t['question']} — A: {t['answer'] or '(nothing)'} — pictures: "
                     f"{', '.join(t['image_colours']) or 'none'}" + (f" (asked: {t['asked_colour']})" if t["asked_colour"] else ""))
    if "chat_changes" in r:
        c, w, t = r["chat_changes"], r["chat_changes"]["with_pictures"], r["chat_changes"]["text_only"]
        lines += ["", f"Changes in a chat ({c['n']} two-turn chats, a scene then \"it turns yellow.\" or the like): the "
                  f"answer names the changed scene in {w['answer_names_the_change']:.2f}, its picture shows the colour and "
                  f"shape it names in {w['picture_shows_what_it_says']:.2f}; with the first turn's picture left out of the "
                  f"history {t['answer_names_the_change']:.2f} and {t['picture_shows_what_it_says']:.2f}."]
    if "pictures_read" in r:
        p, pu = r["pictures_read"]["named"], r["pictures_read"]["named_unseen"]
        lines += ["", f"## Attached pictures read (\"what is this?\" after a picture, {p['n']} scenes)", "",
                  f"- the answer names the picture's colour {p['colour']:.2f} (chance {ch['colour']:.2f}), shape "
                  f"{p['shape']:.2f} ({ch['shape']:.2f}), both {p['colour_and_shape']:.2f} "
                  f"({ch['colour_and_shape']:.2f}), size {p['size']:.2f}, position {p['position']:.2f}, background "
                  f"{p['background']:.2f}; unseen compositions: both {pu['colour_and_shape']:.2f} (n={pu['n']})"]
        lines += [f"- {e['picture']} -> {e['answer'] or '(nothing)'}" for e in r["pictures_read"]["examples"]]
    if "free_chats" in r:
        from training.toy.free_chats import markdown

        lines += markdown(r["free_chats"])
    lines += ["", "![grid](grid.png)", "",
              "Grid: the 5 story pictures, then SD on the last caption, GILL on the last caption, on 5 captions, "
              "on 5 captions + 4 pictures, and GILL's retrieved picture (5 captions + 4 pictures).", ""]
    return "\n".join(lines)


def grid(gill, ev: Path, by_story: dict, records: dict, path: Path, rows: int = 10, scale: int = 4) -> None:
    """The first ``rows`` test stories as a picture grid, each cell upscaled ``scale`` times (nearest
    neighbour: sharp)."""
    from PIL import Image

    order = ["sd/1-caption", "gill/1-caption", "gill/5-captions", "gill/5-captions-4-images"]
    lookup = {name: {r["id"]: r for r in recs} for name, recs in records.items()}
    cell = world.IMAGE_SIZE * scale
    ids = list(by_story)[:rows]
    canvas = Image.new("RGB", (cell * (5 + len(order) + 1) + 2 * scale * 2, cell * len(ids)), (0, 0, 0))
    scale_ret = gill.model.adapter.logit_scale.exp().item()
    context_dir = Path(json.loads((ev / "run.json").read_text())["context_dir"])
    blank = Image.new("RGB", (world.IMAGE_SIZE,) * 2)
    for row, sid in enumerate(ids):
        images = [Image.open(context_dir / f"{a['photo_flickr_id']}.png") for a in by_story[sid]]
        for name in order:
            r = lookup.get(name, {}).get(sid)
            images.append(Image.open(ev / name / r["image"]) if r else blank)
        example = lookup.get("gill/5-captions-4-images", {}).get(sid) or lookup.get("gill/5-captions", {}).get(sid)
        if example and gill.retriever is not None and "retrieval_embedding" in example:
            hit = gill.retriever.search(torch.tensor([example["retrieval_embedding"]]), k=1, scale=scale_ret)[0]
            images.append(gill.retriever.load_image(hit[0].record) if hit else blank)
        x = 0
        for col, im in enumerate(images):
            if col in (5, 5 + len(order)):
                x += 2 * scale  # a gap between the story, the generations and the retrieval
            canvas.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, row * cell))
            x += cell
    canvas.save(path)
