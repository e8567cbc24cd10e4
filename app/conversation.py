"""The app's conversations, apart from Gradio: a message in, the chat as it grows out.

``Answers.answer`` takes one message of a session (its text and attached pictures, the controls' values),
turns it into the model's turn (``gill.chat``'s format), keeps the conversation inside the model's context
(whole turns), streams the model's answer into chat messages, and commits the conversation to the session
(``app.session``) unless Reset or Undo came since. It yields ``(messages, state, Box)``: the chat as shown,
the model's side of it, and what the message box does; ``app.demo`` wires it to Gradio.
"""

from __future__ import annotations

import enum
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.inputs import BadInput, load_user_image
from app.render import display_image, escaped, image_label
from gill import chat
from gill.settings import RunSettings

LOG = logging.getLogger("app")


class Box(enum.Enum):
    """What the message box does with an update."""

    TAKEN = "taken"  # the message was taken: the box is cleared, and read-only while it is answered
    BUSY = "busy"  # read-only (an answer streams)
    READY = "ready"  # editable again
    CLEARED = "cleared"  # cleared and editable (a message refused with a reason in the chat)


@dataclass(frozen=True)
class Controls:
    """The settings controls' values as the page sends them (numbers may come as floats or strings)."""

    temperature: Any
    top_p: Any
    max_tokens: Any
    frequency: Any  # the image-frequency factor
    policy: str
    steps: Any
    guidance: Any
    seed: Any

    def settings(self, given: RunSettings) -> RunSettings:
        """A message's run settings: the controls over what the app was started with (``given``); the rest
        are the model's (``GILL`` resolves them). BadInput for a value out of range."""
        try:
            return RunSettings(
                temperature=float(self.temperature), top_p=float(self.top_p), max_new_tokens=int(self.max_tokens),
                img_scale_factor=float(self.frequency), steps=int(self.steps), guidance_scale=float(self.guidance),
                seed=check_seed(self.seed)).over(given).validated("explicit run settings")
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"A setting is out of range: {e}.") from None


def fit_context(pipeline: Any, turns: list[list], turn: list, max_new_tokens: int) -> tuple[list[list], int]:
    """The most recent whole turns that fit the model's context (``context_length``: the positions it was trained
    on, else its LM's) with ``turn`` and room for the answer, and how many older ones were dropped. A turn that
    does not fit alone is refused (BadInput)."""
    limit = pipeline.context_length
    if limit is None:
        return turns, 0
    budget = limit - pipeline.answer_room(max_new_tokens)
    alone = pipeline.prompt_length(turn)
    if alone > budget:
        raise BadInput(f"This message takes {alone} tokens, but the model reads {limit} in all and keeps "
                       f"{limit - budget} for its answer: please shorten it to at most {max(budget, 0)} tokens.")
    fitted = chat.fit_turns(turns, turn, pipeline.prompt_length, budget)
    return fitted.turns, fitted.dropped


def model_hint(pipeline: Any) -> tuple[str, list[str]] | None:
    """What the model says a chat should know of it (its config's ``chat`` block: a hint, example
    messages); None where it says nothing."""
    card = pipeline.model.config.chat
    if not card.hint and not card.examples:
        return None
    return card.hint, list(card.examples)


def conversation_state(state: Any) -> dict:
    """The model's side of a chat: ``turns`` (each the items of one turn: attached images, the "Q: ...\\nA:"
    text, the answer's text and images), ``told`` (the chat has said older turns were dropped),
    ``exchanges`` (one per message shown, True where it became a turn, False where it was refused: Undo
    takes a turn back only for the former) and ``pictures`` (one list per answered turn since the chat began,
    older turns dropped from ``turns`` included: the pictures the user attached and the answer showed, each
    ``{"image", "place"}``, "attached picture 2" / "shown in answer 3": what an edit starts from, since the
    model reads a shown picture as its [IMG] tokens only)."""
    if isinstance(state, dict):
        turns = list(state.get("turns", []))
        exchanges = list(state.get("exchanges", [True] * len(turns)))
        return {"turns": turns, "told": bool(state.get("told", False)), "exchanges": exchanges,
                "pictures": list(state.get("pictures", []))}
    return {"turns": [], "told": False, "exchanges": [], "pictures": []}


def last_picture(state: dict) -> Any:
    """The conversation's last picture (attached or shown) as a ``gill.EditSource``, or None: where the
    model's edits start from."""
    from gill.pipeline import EditSource

    shown = [p for turn in state["pictures"] for p in turn]
    return EditSource(shown[-1]["image"], place=shown[-1]["place"]) if shown else None


def turn_pictures(state: dict, attached: list, answer: list) -> list[dict]:
    """The pictures of the turn about to be committed: ``attached`` (PIL images) and the images of ``answer``
    (its segments and text pieces) that could be shown, each with its place in the conversation."""
    before = sum(1 for turn in state["pictures"] for p in turn if p["place"].startswith("attached"))
    number = len(state["pictures"]) + 1  # this answer's number in the conversation
    pictures = [{"image": im, "place": f"attached picture {before + i}"} for i, im in enumerate(attached, 1)]
    return pictures + [{"image": s.image, "place": f"shown in answer {number}"} for s in answer
                       if not isinstance(s, str) and s.image is not None]


def drop_last_exchange(messages: list, state: Any) -> tuple[list, dict]:
    """Undo's work: the last message shown with its answer, and its turn where it had one."""
    messages, state = list(messages or []), conversation_state(state)

    def role(m: Any) -> str:
        return m.get("role", "assistant") if isinstance(m, dict) else getattr(m, "role", "assistant")

    while messages and role(messages[-1]) == "assistant":
        messages.pop()
    while messages and role(messages[-1]) == "user":
        messages.pop()
    turns, exchanges, pictures = state["turns"], state["exchanges"], state["pictures"]
    if not exchanges or exchanges.pop():
        turns, pictures = turns[:-1], pictures[:-1]
    return messages, {**state, "turns": turns, "exchanges": exchanges, "pictures": pictures}


def check_seed(seed: Any) -> int:
    """The seed box's value as an integer from 0 to ``gill.arguments.MAX_SEED``, or BadInput saying so."""
    from gill.arguments import MAX_SEED

    try:
        value = float(seed)
        if value != int(value):
            raise ValueError
        value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"The seed must be a whole number from 0 to {MAX_SEED}; got {escaped(seed)}.") from None
    if not 0 <= value <= MAX_SEED:
        raise BadInput(f"The seed must be a whole number from 0 to {MAX_SEED}; got {value}.")
    return value


def save_image(image: Any, folder: Path) -> dict:
    """An image as shown (``display_image``) saved in a session's folder: the chat message's content."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    display_image(image).save(path)
    return {"path": path}


def upload_path(f: Any) -> str:
    return f if isinstance(f, str) else (f or {}).get("path", "")


class Answers:
    """The answers of one app: its model (``pipeline``, a ``gill.GILL``) with the run settings it was started
    with (``given``). ``uploads``: where Gradio keeps the users' uploads; ``sessions_root``: the sessions'
    own folders (their files are not uploads)."""

    def __init__(self, pipeline: Any, given: RunSettings, uploads: Path, sessions_root: Path):
        self.pipeline, self.given = pipeline, given
        self.uploads, self.sessions_root = uploads, sessions_root.resolve()

    def answer(self, session: Any, ticket: int, message: Any, messages: list | None, history: Any,
               controls: Controls) -> Iterator[tuple[list, dict, Box]]:
        """Answer ``message`` (``{"text": ..., "files": [...]}``) in ``session``, which began answering it
        with ``ticket``. ``messages`` / ``history``: the page's copy of the chat and of the model's side."""
        # the conversation as this session last committed it (the page's copy can be stale), else the page's
        messages = list(session.messages if session.messages is not None else (messages or []))
        state = session.state if session.state is not None else conversation_state(history)
        session.commit(ticket, messages, state)  # what Undo returns to while this message is answered
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", []) or []
        for f in files:  # Gradio's copies of the user's uploads (not the sessions' own files) go with the session
            where = Path(upload_path(f)).resolve()
            if where.is_relative_to(self.uploads) and not where.is_relative_to(self.sessions_root):
                session.uploads.add(upload_path(f))
        shown: list[dict] = []
        try:
            turn, settings, turns, dropped = self._take(session, text, files, shown, state, controls)
        except BadInput as e:
            messages += shown + [{"role": "user", "content": escaped(text) or "(attachment)"},
                                 {"role": "assistant", "content": f"⚠️ {escaped(e)}"}]
            state = {**state, "exchanges": state["exchanges"] + [False]}
            if session.commit(ticket, messages, state, done=True):
                yield messages, state, Box.CLEARED
            return
        if text:
            shown.append({"role": "user", "content": escaped(text)})
        messages += shown
        if dropped and not state["told"]:
            messages.append({"role": "assistant", "content": (
                f"(The conversation no longer fits the model's context of {self.pipeline.context_length} tokens: "
                "it now reads only the most recent turns.)")})
            state = {**state, "told": True}
        if not session.current(ticket):
            return
        yield messages, state, Box.TAKEN
        yield from self._stream(session, ticket, messages, state, turns, turn, settings, controls.policy)

    def _take(self, session: Any, text: str, files: list, shown: list[dict], state: dict,
              controls: Controls) -> tuple[list, RunSettings, list[list], int]:
        """The message as the model's turn, its run settings, and the earlier turns that fit with it (and how
        many were dropped); the attached pictures are added to ``shown`` as they are read. BadInput says why
        a message cannot be answered."""
        turn = []
        for f in files:  # one at a time, each shrunk as it is decoded
            image = load_user_image(upload_path(f))
            turn.append(image)
            shown.append({"role": "user", "content": save_image(image, session.folder)})
        if not text and not turn:
            raise BadInput("Please type a message or attach an image.")
        if controls.policy == "edit" and not turn and last_picture(state) is None and self.pipeline.retriever is None:
            raise BadInput("Edit needs a picture to start from: attach one, or ask for a picture first "
                           "(this model has no retrieval index to take one from).")
        settings = controls.settings(self.given)
        turn = chat.turn_items(text, turn)  # the original demo's turn format
        turns, dropped = fit_context(self.pipeline, [list(t) for t in state["turns"]], turn, settings.max_new_tokens)
        return turn, settings, turns, dropped

    def _stream(self, session: Any, ticket: int, messages: list, state: dict, turns: list[list], turn: list,
                settings: RunSettings, policy: str) -> Iterator[tuple[list, dict, Box]]:
        """The model's answer streamed into the chat, then the turn committed with it; a model error is shown
        in the chat and the conversation stays as it was. Stops where Reset or Undo came since."""
        from gill.pipeline import NoEditSourceError, Text, TextDelta

        answer: list[Any] = []
        current = None  # the assistant text message being streamed
        attached = [item for item in turn if not isinstance(item, str)]
        # an edit starts from the conversation's last picture: this turn's last attachment, else the last one
        # attached or shown before (the model reads a shown picture as its [IMG] tokens, not as a picture)
        now = turn_pictures(state, attached, [])
        source = last_picture({"pictures": [now]}) or last_picture(state)
        try:
            for segment in self.pipeline.stream([item for t in turns + [turn] for item in t], settings=settings,
                                                policy=policy, deltas=True, stop_strings=chat.STOP_STRINGS,
                                                end_at_image=chat.END_AT_IMAGE, edit_source=source):
                if not session.current(ticket):  # Reset or Undo: the answer is abandoned
                    return
                if isinstance(segment, TextDelta):
                    if current is None:
                        current, raw = {"role": "assistant", "content": ""}, ""
                        messages.append(current)
                    raw += segment.text  # shown without the next question the model began ("\nQ:")
                    current["content"] = escaped(chat.shown_text(raw))
                    answer.append(segment.text)
                elif isinstance(segment, Text):
                    messages.append({"role": "assistant", "content": escaped(chat.shown_text(segment.text))})
                    answer.append(segment.text)
                    current = None
                else:
                    current = None
                    messages.append({"role": "assistant", "content": image_label(segment)})
                    if segment.image is not None:
                        messages.append({"role": "assistant", "content": save_image(segment.image, session.folder)})
                    answer.append(segment)  # (its [IMG] tokens were produced, shown or not)
                if not session.current(ticket):
                    return
                yield messages, state, Box.BUSY
        except Exception as e:  # a model error is shown in the chat; the conversation stays as it was
            if isinstance(e, NoEditSourceError):  # what was asked cannot be done: said as such, in one line
                failed = f"⚠️ {e}"
            else:
                LOG.exception("the model failed on a message")
                failed = f"⚠️ The model failed: {type(e).__name__}: {e}"
            messages.append({"role": "assistant", "content": escaped(failed)})
            state = {**state, "exchanges": state["exchanges"] + [False]}
            if session.commit(ticket, messages, state, done=True):
                yield messages, state, Box.READY
            return
        # the answer goes back as it was decoded, so the next turn's prompt holds the tokens the model produced
        turn += chat.answer_items(answer, self.pipeline.img_tokens.text)
        if not answer:
            messages.append({"role": "assistant", "content": "(no answer)"})
        state = {**state, "turns": turns + [turn], "exchanges": state["exchanges"] + [True],
                 "pictures": state["pictures"] + [turn_pictures(state, attached, answer)]}
        if session.commit(ticket, messages, state, done=True):
            yield messages, state, Box.READY
