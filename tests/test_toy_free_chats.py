"""The report's free chats (training.toy.free_chats): random chats of the toy world's grammar, from seeds the
build never draws from, run through the app's turn format on the shipped toy model and scored per turn index
and per kind of turn."""

import json
import random

import pytest
import torch

from gill import GILL
from training.toy import world
from training.toy import free_chats as fc


@pytest.fixture(scope="module")
def toy():
    return GILL.from_pretrained("toy")


@pytest.fixture(scope="module")
def run(toy):
    """free_chats on 3 chats of 4 turns (seed 0: every kind of turn among them), every generate call seen."""
    calls = []
    real = toy.generate_interleaved

    def spy(inputs, **kwargs):
        calls.append(([list(c) for c in inputs], kwargs))
        return real(inputs, **kwargs)

    toy.generate_interleaved = spy
    try:
        with torch.no_grad():
            got = fc.free_chats(toy, n=3, turns=4, seed=0)
    finally:
        del toy.generate_interleaved
    return got, calls


def _by_hand(records):
    """The figures of a set of records, counted from what each turn recorded."""
    text = [r["answer"] == r["right_answer"] for r in records]
    due = [r for r in records if r["right_scene"] is not None]
    pic = [r["shown"] is not None and (r["shown"]["color"], r["shown"]["shape"]) ==
           (r["right_scene"]["color"], r["right_scene"]["shape"]) for r in due]
    att = [r for r in records if r["attached"] is not None]
    read = [{r["attached"]["color"], r["attached"]["shape"]} <= set(r["answer"].replace(".", " ").split()) for r in att]
    return {"n": len(records), "text_right": sum(text) / len(text),
            "picture_right": sum(pic) / len(pic) if pic else None, "picture_right_n": len(pic),
            "attached_read": sum(read) / len(read) if read else None, "attached_read_n": len(read),
            "img_inside": sum(r["shown"] is not None and not r["answer"].endswith(".") for r in records)}


def test_free_chat_figures_count_the_recorded_turns_per_index_and_per_kind(run):
    got, _ = run
    records = got["records"]
    assert len(records) == 12 and sorted({r["index"] for r in records}) == [1, 2, 3, 4]
    assert {r["kind"] for r in records} == set(fc.KINDS)  # describe, change, ask and attach all asked
    for key, group in (("by_index", lambda r: str(r["index"])), ("by_kind", lambda r: r["kind"])):
        for name, figures in got[key].items():
            hand = _by_hand([r for r in records if group(r) == name])
            assert {k: figures[k] for k in hand} == pytest.approx(hand), (key, name)
    assert got["all"]["n"] == 12 and got["all"]["img_inside"] == sum(f["img_inside"] for f in got["by_index"].values())
    json.dumps(got)  # the whole result goes into the report's JSON


def test_free_chats_are_asked_as_the_app_asks_them_with_answers_and_pictures_fed_back(run, toy):
    """Turn k of every chat in one call; the app's turn format at the model's default settings (only the
    turn format's stop string and end at a picture; seed 0, as the report's chat_turn); an attached picture
    goes in before its question; each answer's text and its pictures' [IMG] tokens go back into its chat."""
    from PIL import Image

    from gill import chat

    got, calls = run
    assert len(calls) == 4 and all(len(convs) == 3 for convs, _ in calls)
    assert all(kw == {"stop_strings": chat.STOP_STRINGS, "end_at_image": chat.END_AT_IMAGE, "seed": 0} for _, kw in calls)
    chats = fc.draw_chats(3, 4, seed=0)
    for c, turns in enumerate(chats):
        for k, turn in enumerate(turns):
            conv = calls[k][0][c]
            assert conv[-1] == chat.question(turn.question)
            if turn.attached is not None:
                assert isinstance(conv[-2], Image.Image)
                assert world.nearest_scenes([conv[-2]])[0] == turn.attached
            if k + 1 < len(turns):  # the next turn's prompt: this one, the answer as shown, the next question
                after = calls[k + 1][0][c]
                items = after[len(conv): len(after) - len(_turn_items(turns[k + 1]))]
                assert after[: len(conv)] == conv
                answer = got["records"][c * 4 + k]
                said = "".join(x for x in items if isinstance(x, str))
                img = toy.img_tokens.text
                assert said.replace(img, "").strip() == answer["answer"]
                # a shown picture goes back as its [IMG] tokens, right after the text, never as a picture
                assert not any(isinstance(x, Image.Image) for x in items)
                assert said.count(img) == (answer["shown"] is not None) and (img not in said or said.rstrip().endswith(img))


def _turn_items(turn):
    from gill import chat

    return chat.turn_items(turn.question, [world.render(turn.attached)] if turn.attached is not None else [])


def test_free_chats_batched_answer_as_the_reports_chat_turn_does_one_chat_at_a_time(toy, run):
    from training.toy.report import chat_turn

    got, _ = run
    for c, turns in enumerate(fc.draw_chats(3, 4, seed=0)):
        history = []
        for k, turn in enumerate(turns):
            history += [world.render(turn.attached)] if turn.attached is not None else []
            with torch.no_grad():
                answer = chat_turn(toy, history, turn.question)
            shown = world.scenes_shown(answer.pictures[:1])[0].__dict__ if answer.pictures else None
            r = got["records"][c * 4 + k]
            assert (answer.text.strip(), shown) == (r["answer"], r["shown"]), (c, k)


def test_free_chats_are_none_of_the_builds_training_chats(monkeypatch):
    """Drawn from streams of their own: no free chat's first 3 or more turns are a chat the build trains on
    (GILL's chat samples and the LM's chats, world seed 0 and the full plan's draws)."""
    from training.toy import data
    from training.toy.plan import CHAT_TURNS, Plan

    from gill.presets import toy_dir

    monkeypatch.setattr(data, "_png", lambda *a, **k: b"")  # the texts are what is compared
    train_comp, test_comp = world.split_compositions()
    samples = data.training_samples(Plan(), random.Random(0), train_comp, length=data.token_counter(toy_dir() / "lm"))
    trained = {("".join(json.loads(s["context.json"])) + s["txt"]).replace(data.IMG_TEXT, "")
               for s in samples if s["__key__"].startswith("chat-")}
    lm = world.world_text(random.Random(1), train_comp | test_comp, common=train_comp, chat_turns=CHAT_TURNS)
    trained |= {line.replace(world.PICTURE, "").rstrip("\n") for line in lm if line.startswith("Q: ")}
    assert len(trained) > 1000
    free = fc.draw_chats(100, 10, seed=0)
    prefixes = {world.chat_text(turns[:m]).rstrip("\n") for turns in free for m in range(3, len(turns) + 1)}
    assert len(prefixes) == 800 and not prefixes & trained


def _result(text_right: float, kinds=fc.KINDS) -> dict:
    figures = {"n": 10, "text_right": text_right, "text_right_n": 10, "picture_right": None, "picture_right_n": 0,
               "attached_read": 0.5, "attached_read_n": 2, "img_inside": 3, "unasked_picture": 1, "context_cut": 0}
    return {"n": 10, "turns": 2, "seed": 0, "by_index": {"1": figures, "2": figures},
            "by_kind": {k: figures for k in kinds}, "all": figures}


def test_the_report_shows_free_chats_per_turn_and_kind_beside_the_shipped_models(tmp_path):
    from training.toy.report import report_markdown

    (tmp_path / "report.json").write_text(json.dumps({"free_chats": _result(0.25)}))
    previous = fc.previous_figures(tmp_path)
    assert previous["by_index"]["1"]["text_right"] == 0.25
    report = json.loads(_shipped().read_text())  # every other section as shipped
    report["free_chats"] = {**_result(0.75), "previous": previous}
    md = report_markdown(report)
    section = md[md.index("## Free chats"):]
    assert "| 1 | 10 | 0.75 (0.25) | - (-) | 0.50 (0.50) | 3 (3) |" in section
    assert "| attach | 10 | 0.75 (0.25) |" in section
    report["free_chats"]["previous"] = None  # none measured: "-"
    assert "| 2 | 10 | 0.75 (-) | - (-) | 0.50 (-) | 3 (-) |" in report_markdown(report)


def _shipped():
    from gill.presets import toy_dir

    return toy_dir() / "report" / "report.json"


def test_previous_figures_come_from_a_report_or_its_free_chats_file_else_none(tmp_path):
    assert fc.previous_figures(tmp_path) is None
    (tmp_path / "report.json").write_text("{not json")
    assert fc.previous_figures(tmp_path) is None
    (tmp_path / "report.json").write_text(json.dumps({"chat": {}}))  # a report from before free chats
    assert fc.previous_figures(tmp_path) is None
    (tmp_path / "free-chats.json").write_text(json.dumps({**_result(0.5), "records": []}))
    assert fc.previous_figures(tmp_path)["by_kind"]["ask"]["text_right"] == 0.5
