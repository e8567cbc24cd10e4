"""The report's free chats: the toy model in free use, as a new user would try it. Random chats in the world's
own grammar (``world.conversation``: describe a scene, change it, ask its colour or shape, attach a picture and
ask what it is), of any composition, drawn from streams the build never draws from, run through the app's turn
format at the model's default settings, and scored per turn index and per kind of turn.

Per turn (``records``; each keeps what it was asked, the right answer, the answer and the judged picture, so
the figures can be recomputed from them):

- ``text_right``: the answer's text, stripped, is the right answer exactly;
- ``picture_right`` (turns whose right answer shows a scene: describe, change): a picture is shown and the
  world's judge (``world.scenes_shown``: nearest clean rendering, the foreground's colour) reads the scene's
  colour and shape in it; no picture counts as wrong;
- ``attached_read`` (attach turns): the answer's words name the attached scene's colour and its shape;
- ``img_inside``: a picture is shown while the answer's text is not a finished sentence: stripped, it does not
  end with "." (every right answer does; an empty text counts), i.e. [IMG0] came in the middle of the answer;
- ``unasked_picture``: a picture shown by an ask or attach turn, whose right answer shows none.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from training.toy import world

KINDS = ("describe", "change", "ask", "attach")
FIGURES = ("text_right", "picture_right", "attached_read")  # fractions; img_inside and unasked_picture: counts


def chat_seed(seed: int, i: int) -> str:
    """The seed of free chat ``i``: a string. Every stream the build draws from is seeded with an integer
    (training.toy.data: the build's --seed N for the training samples and chats, N+1 for the LM's text (its
    chats too), N+2 for the test stories, N+3 for the decision prompts; backbones: N, N+1000, 99; the report's
    chat changes: 5), and Python seeds a string through SHA-512 of its bytes, so no integer the build may be
    given draws these chats. One stream per chat: chat i is the same whatever n."""
    return f"toy free chat {seed} {i}"


def draw_chats(n: int, turns: int, seed: int = 0) -> list[list[world.Turn]]:
    """``n`` chats of ``turns`` turns of every composition (a user may type any), each from its own stream."""
    every = {(c, s) for c in world.COLORS for s in world.SHAPES}
    return [world.conversation(random.Random(chat_seed(seed, i)), every, turns) for i in range(n)]


def kind_of(turn: world.Turn) -> str:
    """Which of the grammar's turns ``turn`` is: attach (a picture before it), ask (a text-only answer),
    change (the user's words refer back: "it turns blue."), else describe."""
    if turn.attached is not None:
        return "attach"
    if turn.scene is None:
        return "ask"
    return "change" if turn.question.startswith("it ") else "describe"


def fit_turns(gill, turns: list[list], turn: list, max_new_tokens: int) -> tuple[list[list], int]:
    """The most recent whole turns that fit the model's context with ``turn`` and room for the answer, and how
    many older ones were dropped: what the app does (``gill.chat.fit_turns``)."""
    from gill import chat as fmt

    if gill.context_length is None:
        return turns, 0
    fitted = fmt.fit_turns(turns, turn, gill.prompt_length, gill.context_length - gill.answer_room(max_new_tokens))
    return fitted.turns, fitted.dropped


def run_chats(gill, chats: list[list[world.Turn]]) -> list[list[dict]]:
    """Every chat through the app's turn format (``gill.chat``), at the model's default settings, seed 0 as
    the report's ``chat_turn``: turn k of all chats in one batch; each answer's text and pictures fed back.
    Per chat, per turn: the answer's text, the judged scene of its first picture (None: none shown) and how
    many older turns were left out to fit the LM's positions."""
    from gill import chat as fmt
    from gill.pipeline import GeneratedImage, RetrievedImage, Text

    max_new_tokens = gill.run_settings().max_new_tokens
    history: list[list[list]] = [[] for _ in chats]  # per chat, the items of each turn so far
    out: list[list[dict]] = [[] for _ in chats]
    for k in range(max(map(len, chats), default=0)):
        rows = [c for c, turns in enumerate(chats) if k < len(turns)]
        asked, dropped = [], []
        for c in rows:
            t = chats[c][k]
            items = fmt.turn_items(t.question, [world.render(t.attached)] if t.attached is not None else [])
            history[c], n = fit_turns(gill, history[c], items, max_new_tokens)
            asked.append(items)
            dropped.append(n)
        answers = gill.generate_interleaved([[x for t in history[c] for x in t] + items for c, items in zip(rows, asked)],
                                            stop_strings=fmt.STOP_STRINGS, end_at_image=fmt.END_AT_IMAGE, seed=0)
        firsts = []  # each answer's first picture, judged together
        for c, items, n, answer in zip(rows, asked, dropped, answers):
            decoded = "".join(s.text for s in answer if isinstance(s, Text))
            pictures = [s.image for s in answer if isinstance(s, (GeneratedImage, RetrievedImage)) and s.image is not None]
            parts = [s.text if isinstance(s, Text) else s for s in answer if isinstance(s, (Text, GeneratedImage, RetrievedImage))]
            history[c].append(items + fmt.answer_items(parts, gill.img_tokens.text))
            out[c].append({"answer": fmt.answer_text(decoded), "shown": None, "dropped_turns": n})
            firsts += [(c, pictures[0])] if pictures else []
        for (c, _), scene in zip(firsts, world.scenes_shown([im for _, im in firsts]) if firsts else []):
            out[c][k]["shown"] = scene
    return out


def score(turn: world.Turn, answer: str, shown: world.Scene | None) -> dict:
    """One turn's figures (the module's docstring defines them); None where one does not apply."""
    text = answer.strip()
    words = set(text.replace(".", " ").split())
    a = turn.attached
    return {"text_right": text == turn.answer,
            "picture_right": None if turn.scene is None else shown is not None and shown.composition == turn.scene.composition,
            "attached_read": None if a is None else a.color in words and a.shape in words,
            "img_inside": shown is not None and not text.endswith("."),
            "unasked_picture": turn.scene is None and shown is not None}


def record(chat: int, index: int, turn: world.Turn, got: dict) -> dict:
    """What a turn asked, its right answer and what the model did (JSON), with its figures."""
    scene = (lambda s: None if s is None else dict(s.__dict__))
    return {"chat": chat, "index": index, "kind": kind_of(turn), "question": turn.question, "attached": scene(turn.attached),
            "right_answer": turn.answer, "right_scene": scene(turn.scene), "answer": got["answer"].strip(),
            "shown": scene(got["shown"]), "dropped_turns": got["dropped_turns"], **score(turn, got["answer"], got["shown"])}


def summarize(records: list[dict]) -> dict:
    """The figures of ``records``: each of ``FIGURES`` as the fraction of the turns it applies to (None if
    none), with how many; ``img_inside``, ``unasked_picture`` and ``context_cut`` as counts."""
    out: dict = {"n": len(records)}
    for name in FIGURES:
        apply = [r[name] for r in records if r[name] is not None]
        out[name] = sum(apply) / len(apply) if apply else None
        out[f"{name}_n"] = len(apply)
    out["img_inside"] = sum(r["img_inside"] for r in records)
    out["unasked_picture"] = sum(r["unasked_picture"] for r in records)
    out["context_cut"] = sum(r["dropped_turns"] > 0 for r in records)  # turns asked with older turns left out
    return out


def free_chats(gill, n: int = 100, turns: int = 10, seed: int = 0) -> dict:
    """``n`` random chats of ``turns`` turns (``draw_chats``) run as the app runs them (``run_chats``): the
    figures per turn index (1..turns), per kind of turn and over all, and every turn's record."""
    chats = draw_chats(n, turns, seed)
    got = run_chats(gill, chats)
    records = [record(c, k + 1, t, g) for c, (ts, gs) in enumerate(zip(chats, got)) for k, (t, g) in enumerate(zip(ts, gs))]
    return {"n": n, "turns": turns, "seed": seed,
            "by_index": {str(k): summarize([r for r in records if r["index"] == k]) for k in range(1, turns + 1)},
            "by_kind": {kind: summarize([r for r in records if r["kind"] == kind]) for kind in KINDS},
            "all": summarize(records), "records": records}


def previous_figures(folder: Path) -> dict | None:
    """The free-chat figures (per turn index and per kind) of the model whose report is in ``folder``: from
    its report.json's ``free_chats``, else its free-chats.json (the whole result); None where it has none."""
    for name, key in (("report.json", "free_chats"), ("free-chats.json", None)):
        path = folder / name
        if not path.is_file():
            continue
        try:
            got = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        got = got.get(key) if key and isinstance(got, dict) else got
        if isinstance(got, dict) and {"by_index", "by_kind"} <= set(got):
            return {"by_index": got["by_index"], "by_kind": got["by_kind"]}
    return None


def _cell(now: dict, before: dict | None, name: str) -> str:
    """``now``'s figure, the previous model's in brackets ("-": none)."""
    def fmt(d):
        if d is None or d.get(name) is None:
            return "-"
        return str(d[name]) if isinstance(d[name], int) else f"{d[name]:.2f}"
    return f"{fmt(now)} ({fmt(before)})"


def markdown(f: dict) -> list[str]:
    """The report's "Free chats" section: a table per turn index and one per kind of turn."""
    prev = f.get("previous") or {}
    head = ("| {} | n | answer text exactly right | picture's colour and shape right | attached picture read | "
            "[IMG0] inside an answer (count) |")
    lines = ["", f"## Free chats ({f['n']} random chats of {f['turns']} turns, seeds the build never draws from)", "",
             "Every kind of turn of the world's chat grammar (describe, change, ask, attach a picture), through the "
             "app's turn format at the model's default settings, answers and their pictures fed back. In brackets: "
             "the previously shipped model (-: not measured). Definitions: training/toy/free_chats.py.", ""]
    for title, key in (("turn", "by_index"), ("kind", "by_kind")):
        lines += [head.format(title), "|---|---|---|---|---|---|"]
        for name, now in f[key].items():
            before = prev.get(key, {}).get(name)
            lines.append(f"| {name} | {now['n']} | " + " | ".join(_cell(now, before, x) for x in (*FIGURES, "img_inside"))
                         + " |")
        lines.append("")
    a = f["all"]
    lines.append(f"Over all {a['n']} turns: text right {a['text_right']:.2f}; a picture where none was asked (ask and "
                 f"attach turns): {a['unasked_picture']}; turns asked with older turns left out to fit the LM's "
                 f"positions (as the app does): {a['context_cut']}.")
    return lines
