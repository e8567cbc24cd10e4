"""The GILL chat app (Gradio): type text, attach images, get interleaved text, generated and retrieved images.

    python -m app                                  # the offline default model, on http://127.0.0.1:7860
    python -m app --model DIR --index INDEX_DIR --device cuda

``build_demo(pipeline)`` builds the interface around any ``gill.GILL`` (tests inject a tiny one); ``main``
loads the model. Nothing is loaded at import time.
"""

# no ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time to hand them
# the caller's session (``request: gr.Request``), and string annotations naming build_demo's local ``gr``
# would not resolve
import argparse
import base64
import html
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gill import chat as turns_format

LOG = logging.getLogger("app")
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
MAX_SIDE = 1024  # an attached picture is kept (shown, read by the model) at most this many pixels a side
CACHE_MAX_AGE_S = 86400  # the app's files in Gradio's cache that no ended session removed go after a day
QUEUE_WAIT_S = 600  # a message sent while another is answered waits this long for its turn at most


@dataclass
class Defaults:
    """The controls' initial values: the model's run settings (``GILL.run_settings``), with the policy."""

    temperature: float
    top_p: float
    max_new_tokens: int
    img_scale_factor: float  # the original demo's "frequency multiplier for returning images"
    steps: int
    guidance: float
    seed: int
    scheduler: str | None = None
    policy: str = "auto"

    @classmethod
    def from_settings(cls, s: Any, policy: str = "auto") -> "Defaults":
        return cls(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                   img_scale_factor=s.img_scale_factor, steps=s.steps, guidance=s.guidance_scale, seed=s.seed,
                   scheduler=s.scheduler, policy=policy)


def settings_for(pipeline: Any, args: argparse.Namespace) -> Any:
    """The app's run settings: its flags > the model's settings > the library's defaults."""
    return pipeline.run_settings({"steps": args.steps, "seed": args.seed})


class BadInput(ValueError):
    """Input the app refuses, with a message for the chat."""


def load_user_image(path: str) -> Any:
    """An uploaded file -> RGB PIL image of at most ``MAX_SIDE`` pixels a side (``gill.images``: size and
    aspect ratio bounded before decoding, shrunk as soon as it is decoded, so a message with many large
    pictures holds one full decode at a time), or BadInput naming the file and saying why not."""
    from gill.images import ImageError, ImageLimits, open_image_shrunk

    name = Path(path).name
    try:
        return open_image_shrunk(path, name=name, max_side=MAX_SIDE,
                                 limits=ImageLimits(max_pixels=MAX_IMAGE_PIXELS, max_bytes=MAX_IMAGE_BYTES))
    except FileNotFoundError:
        raise BadInput(f"{name} did not arrive; please attach it again.") from None
    except ImageError as e:
        if e.reason.startswith("not an image"):
            raise BadInput(f"{name} is not an image I can read.") from None
        raise BadInput(f"{name} cannot be used: {e.reason}.") from None


_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def escaped(text: Any) -> str:
    """``text`` as literal chat text: every ASCII punctuation mark backslash-escaped (CommonMark), so
    markup in a caption, a file name or the model's words (``<img src=...>``, a backtick, ``**``, ``[x](y)``)
    is shown as the characters it is, never rendered."""
    return _PUNCTUATION.sub(r"\\\1", str(text))


def image_label(segment: Any) -> str:
    """The caption shown above an answer's image: kind, decision and provenance. What comes from the
    index (caption, source) is escaped: shown as text, whatever it holds."""
    d = segment.decision
    probs = f"p(gen)={d.p_gen:.2f} · p(ret)={d.p_ret:.2f}" if d.p_gen is not None else "no classifier"
    if type(segment).__name__ == "GeneratedImage":
        return f"**Generated image** · {probs} · policy: {escaped(d.policy)}"
    caption = f" · “{escaped(one_line(segment.caption))}”" if segment.caption else ""
    return (f"**Retrieved image** · {probs} · policy: {escaped(d.policy)} · score {segment.score:.2f} · "
            f"source: {escaped(one_line(segment.source))}{caption}")


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def message_parts(content: Any) -> list[tuple[str, str]]:
    """A chat message's content as ("text", markdown) and ("file", path) parts, in any of the forms Gradio
    uses (a string, a file dict, Gradio 6's list of typed parts, a component value)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    if isinstance(content, (list, tuple)):
        return [part for item in content for part in message_parts(item)]
    if isinstance(content, dict):
        if content.get("type") == "text" or ("text" in content and "file" not in content):
            return [("text", str(content.get("text", "")))]
        file = content.get("file", content)
        path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
        return [("file", path)] if path else []
    path = getattr(content, "path", None) or getattr(getattr(content, "file", None), "path", None)
    if path:
        return [("file", path)]
    text = getattr(content, "text", None)
    return [("text", text)] if text is not None else []


def _lite_tokens(text: str):
    """The chat's markdown as (kind, text) runs: "b" toggles bold (``**``), "c" toggles code (`` ` ``),
    "t" is literal text (backslash escapes undone)."""
    i, run = 0, []
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and _PUNCTUATION.match(text[i + 1]):
            run.append(text[i + 1])
            i += 2
        elif text.startswith("**", i) or text[i] == "`":
            if run:
                yield "t", "".join(run)
                run = []
            yield ("b", "**") if text[i] == "*" else ("c", "`")
            i += 2 if text[i] == "*" else 1
        else:
            run.append(text[i])
            i += 1
    if run:
        yield "t", "".join(run)


def _markdown_lite(text: str) -> str:
    """The chat's markdown as HTML: escaped text with the labels' **bold** and `code` kept."""
    out, open_tags = [], []
    for kind, value in _lite_tokens(text):
        if kind == "t":
            out.append(html.escape(value).replace("\n", "<br>"))
            continue
        tag = "b" if kind == "b" else "code"
        if tag in open_tags:
            open_tags.remove(tag)
            out.append(f"</{tag}>")
        else:
            open_tags.append(tag)
            out.append(f"<{tag}>")
    out.extend(f"</{tag}>" for tag in reversed(open_tags))
    return "".join(out)


def plain_text(text: str) -> str:
    """The chat's markdown as plain text (for the saved picture)."""
    return "".join(value for kind, value in _lite_tokens(text) if kind == "t")


def conversation_html(messages: list[dict]) -> str:
    """The chat as one self-contained HTML page: texts and labels (decisions, provenance) as shown, every
    image inlined as a data URI (readable size, pixels kept sharp)."""
    import mimetypes

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>GILL conversation</title><style>"
             "body{font-family:sans-serif;max-width:820px;margin:2em auto;line-height:1.4}"
             ".user{background:#eef;padding:8px 12px;border-radius:8px;margin:6px 0 6px 15%}"
             ".assistant{background:#f6f6f6;padding:8px 12px;border-radius:8px;margin:6px 15% 6px 0}"
             "img{min-width:256px;max-width:512px;image-rendering:pixelated;display:block}"
             "code{background:#e8e8e8;padding:0 3px;border-radius:3px}</style></head><body><h1>GILL conversation</h1>"]
    for m in messages:
        role = m.get("role", "assistant") if isinstance(m, dict) else getattr(m, "role", "assistant")
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        for kind, value in message_parts(content):
            if kind == "file":
                path = Path(value)
                if not path.is_file():
                    body = f"<i>(image {html.escape(path.name)} is no longer on the server)</i>"
                else:
                    mime = mimetypes.guess_type(path.name)[0] or "image/png"
                    data = base64.b64encode(path.read_bytes()).decode()
                    body = f"<img alt='{html.escape(path.name)}' src='data:{mime};base64,{data}'>"
            else:
                body = _markdown_lite(value)
            parts.append(f"<div class='{html.escape(str(role))}'>{body}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def conversation_png(messages: list[dict]) -> Any:
    """The chat as one tall picture (texts wrapped, labels as plain text, images at display size)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from gill.images import shrink

    width, pad, line_h = 860, 12, 22
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    blocks: list[tuple[str, Any]] = []
    for m in messages:
        role = m.get("role", "assistant") if isinstance(m, dict) else getattr(m, "role", "assistant")
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        for kind, value in message_parts(content):
            if kind == "file" and Path(value).is_file():
                try:  # opened like an upload (the page's chat is the client's to send), fitted to the page
                    blocks.append((role, display_image(shrink(load_user_image(value), width - 120 - 2 * pad))))
                except BadInput as e:
                    blocks.append((role, [str(e)]))
            elif kind == "text":
                plain = plain_text(value)
                lines = [w for para in plain.split("\n") for w in (textwrap.wrap(para, 90) or [""])]
                blocks.append((role, lines))
    heights = [(b.height if not isinstance(b, list) else len(b) * line_h) + 2 * pad for _, b in blocks]
    canvas = Image.new("RGB", (width, sum(heights) + (len(blocks) + 1) * 6), "white")
    draw = ImageDraw.Draw(canvas)
    y = 6
    for (role, block), h in zip(blocks, heights):
        x0 = 120 if role == "user" else 0
        draw.rounded_rectangle([x0, y, x0 + width - 120, y + h], 8, fill="#eeeeff" if role == "user" else "#f4f4f4")
        if isinstance(block, list):
            for i, line in enumerate(block):
                draw.text((x0 + pad, y + pad + i * line_h), line, fill="black", font=font)
        else:
            canvas.paste(block, (x0 + pad, y + pad))
        y += h + 6
    return canvas


DISPLAY_SIZE = 256  # images smaller than this are shown upscaled (nearest neighbour: no blur)


def display_image(image: Any) -> Any:
    """An image as shown in the chat: small ones (the toy's 32 px) scaled up by a whole factor, sharp."""
    from PIL import Image

    side = max(image.size)
    if side >= DISPLAY_SIZE:
        return image
    factor = -(-DISPLAY_SIZE // side)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


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
    fitted = turns_format.fit_turns(turns, turn, pipeline.prompt_length, budget)
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
    text, the answer's text and images), ``told`` (the chat has said older turns were dropped) and
    ``exchanges`` (one per message shown, True where it became a turn, False where it was refused: Undo
    takes a turn back only for the former)."""
    if isinstance(state, dict):
        turns = list(state.get("turns", []))
        exchanges = list(state.get("exchanges", [True] * len(turns)))
        return {"turns": turns, "told": bool(state.get("told", False)), "exchanges": exchanges}
    return {"turns": [], "told": False, "exchanges": []}


def drop_last_exchange(messages: list, state: Any) -> tuple[list, dict]:
    """Undo's work: the last message shown with its answer, and its turn where it had one."""
    messages, state = list(messages or []), conversation_state(state)

    def role(m: Any) -> str:
        return m.get("role", "assistant") if isinstance(m, dict) else getattr(m, "role", "assistant")

    while messages and role(messages[-1]) == "assistant":
        messages.pop()
    while messages and role(messages[-1]) == "user":
        messages.pop()
    turns, exchanges = state["turns"], state["exchanges"]
    if not exchanges or exchanges.pop():
        turns = turns[:-1]
    return messages, {**state, "turns": turns, "exchanges": exchanges}


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


def build_demo(pipeline: Any, defaults: Defaults | None = None, title: str = "GILL") -> Any:
    """The Gradio Blocks app around a ``gill.GILL``. Each session (browser tab) has its own folder for
    its files, inside Gradio's cache (served from there, never copied), removed when the tab closes."""
    analytics = analytics_enabled()
    import gradio as gr
    from gradio.utils import get_upload_folder

    from app.session import Sessions
    from gill import chat
    from gill.diffusion import DiffusionOptions
    from gill.pipeline import Text, TextDelta

    d = defaults or Defaults.from_settings(pipeline.run_settings())
    uploads = Path(get_upload_folder()).resolve()
    uploads.mkdir(parents=True, exist_ok=True)
    sessions = Sessions(Path(tempfile.mkdtemp(prefix="gill-app-", dir=uploads)))

    def save_image(image: Any, folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(suffix=".png", dir=folder)
        os.close(fd)
        display_image(image).save(path)
        return {"path": path}

    def upload_path(f: Any) -> str:
        return f if isinstance(f, str) else (f or {}).get("path", "")

    # the box is cleared when a message is taken, and read-only while it is answered
    def TAKEN():  # noqa: N802
        return gr.update(value=None, interactive=False)

    def BUSY():  # noqa: N802
        return gr.update(interactive=False)

    def READY():  # noqa: N802
        return gr.update(interactive=True)

    def CLEARED():  # noqa: N802
        return gr.update(value=None, interactive=True)

    def respond(message, messages, history, temperature, top_p, max_tokens, frequency, policy, steps, guidance, seed,
                request: gr.Request = None):
        session = sessions.get(request)
        arrived = session.arrival()
        try:
            ticket = session.begin(arrived, timeout=QUEUE_WAIT_S)
        except TimeoutError:
            gr.Warning("Still answering your previous message: please send this one again when it has finished.")
            yield gr.update(), gr.update(), READY()  # the message stays in the box
            return
        if ticket is None:  # Reset or Undo was pressed after it was sent: they win
            yield gr.update(), gr.update(), READY()
            return
        try:
            yield from answer_message(session, ticket, message, messages, history, temperature, top_p, max_tokens,
                                      frequency, policy, steps, guidance, seed)
        finally:
            session.end(ticket)

    def answer_message(session, ticket, message, messages, history, temperature, top_p, max_tokens, frequency, policy,
                       steps, guidance, seed):
        # the conversation as this session last committed it (the page's copy can be stale), else the page's
        messages = list(session.messages if session.messages is not None else (messages or []))
        state = session.state if session.state is not None else conversation_state(history)
        session.commit(ticket, messages, state)  # what Undo returns to while this message is answered
        turns = [list(t) for t in state["turns"]]
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", []) or []
        for f in files:  # Gradio's copies of the user's uploads (not the sessions' own files) go with the session
            where = Path(upload_path(f)).resolve()
            if where.is_relative_to(uploads) and not where.is_relative_to(sessions.root.resolve()):
                session.uploads.add(upload_path(f))
        turn, shown = [], []
        try:
            for f in files:  # one at a time, each shrunk as it is decoded
                image = load_user_image(upload_path(f))
                turn.append(image)
                shown.append({"role": "user", "content": save_image(image, session.folder)})
            if not text and not turn:
                raise BadInput("Please type a message or attach an image.")
            try:
                settings = pipeline.run_settings({
                    "temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_tokens),
                    "img_scale_factor": float(frequency), "steps": int(steps), "guidance_scale": float(guidance),
                    "seed": check_seed(seed)})
            except (TypeError, ValueError, OverflowError) as e:
                if isinstance(e, BadInput):
                    raise
                raise BadInput(f"A setting is out of range: {e}.") from None
            turn = chat.turn_items(text, turn)  # the original demo's turn format
            turns, dropped = fit_context(pipeline, turns, turn, settings.max_new_tokens)
        except BadInput as e:
            messages += shown + [{"role": "user", "content": escaped(text) or "(attachment)"},
                                 {"role": "assistant", "content": f"⚠️ {escaped(e)}"}]
            state = {**state, "exchanges": state["exchanges"] + [False]}
            if session.commit(ticket, messages, state, done=True):
                yield messages, state, CLEARED()
            return
        if text:
            shown.append({"role": "user", "content": escaped(text)})
        messages += shown
        if dropped and not state["told"]:
            messages.append({"role": "assistant", "content": (
                f"(The conversation no longer fits the model's context of {pipeline.context_length} tokens: "
                "it now reads only the most recent turns.)")})
            state = {**state, "told": True}
        if not session.current(ticket):
            return
        yield messages, state, TAKEN()

        answer: list[Any] = []
        current = None  # the assistant text message being streamed
        try:
            for segment in pipeline.stream(
                [item for t in turns + [turn] for item in t], policy=policy, seed=settings.seed, deltas=True,
                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p if settings.temperature > 0 else 1.0,
                img_scale_factor=settings.img_scale_factor, stop_strings=chat.STOP_STRINGS,
                end_at_image=chat.END_AT_IMAGE,
                diffusion=DiffusionOptions(steps=settings.steps, guidance_scale=settings.guidance_scale,
                                           seed=settings.seed, scheduler=d.scheduler),
            ):
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
                yield messages, state, BUSY()
        except Exception as e:  # a model error is shown in the chat; the conversation stays as it was
            LOG.exception("the model failed on a message")
            failed = f"⚠️ The model failed: {type(e).__name__}: {e}"
            messages.append({"role": "assistant", "content": escaped(failed)})
            state = {**state, "exchanges": state["exchanges"] + [False]}
            if session.commit(ticket, messages, state, done=True):
                yield messages, state, READY()
            return
        # the answer goes back as it was decoded, so the next turn's prompt holds the tokens the model produced
        turn += chat.answer_items(answer, pipeline.img_tokens.text)
        if not answer:
            messages.append({"role": "assistant", "content": "(no answer)"})
        state = {**state, "turns": turns + [turn], "exchanges": state["exchanges"] + [True]}
        if session.commit(ticket, messages, state, done=True):
            yield messages, state, READY()

    def undo(messages, history, request: gr.Request = None):
        messages, state = sessions.get(request).undo(list(messages or []), conversation_state(history),
                                                     drop_last_exchange)
        return messages, state, READY()

    def reset(request: gr.Request = None):
        sessions.get(request).interrupt([], conversation_state(None))
        return [], conversation_state(None), READY()

    def save(messages, request: gr.Request = None):
        path = sessions.get(request).save_dir() / "gill-conversation.html"
        path.write_text(conversation_html(messages or []), encoding="utf-8")
        return gr.update(value=str(path), visible=True)

    def save_png(messages, request: gr.Request = None):
        path = sessions.get(request).save_dir() / "gill-conversation.png"
        conversation_png(messages or []).save(path)
        return gr.update(value=str(path), visible=True)

    def end_session(request: gr.Request = None):
        sessions.close(request)

    # what a session leaves is removed when it ends (demo.unload below); what none claims (a file attached but
    # never sent, a tab that never said goodbye) is swept hourly once a day old, and everything at shutdown
    with gr.Blocks(title=title, analytics_enabled=analytics, delete_cache=(3600, CACHE_MAX_AGE_S)) as demo:
        gr.Markdown(f"# {title}\nType a message and attach images; answers interleave text with **generated** "
                    "and **retrieved** images, each labelled with the decision behind it.")
        hint = model_hint(pipeline)
        if hint is not None:
            gr.Markdown(hint[0], elem_id="hint")
        chatbot = gr.Chatbot(label="Conversation", height=620, elem_id="chat")
        history = gr.State(conversation_state(None))
        box = gr.MultimodalTextbox(placeholder="Type a message, attach images…", file_count="multiple",
                                   show_label=False, elem_id="input")
        if hint is not None:
            gr.Examples([{"text": e, "files": []} for e in hint[1]], inputs=[box], label="Try")
        with gr.Row():
            undo_btn = gr.Button("Undo", elem_id="undo")
            reset_btn = gr.Button("Reset", elem_id="reset")
            save_btn = gr.Button("Save conversation (HTML)", elem_id="save")
            save_png_btn = gr.Button("Save as picture (PNG)", elem_id="save-png")
        saved = gr.File(label="Saved conversation", visible=False)
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                # every range admits the model's own settings
                temperature = gr.Slider(0, max(1.0, d.temperature), value=d.temperature, step=0.05,
                                        label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, max(128, d.max_new_tokens), value=d.max_new_tokens, step=1, label="Max tokens")
            with gr.Row():
                frequency = gr.Slider(0, max(5.0, d.img_scale_factor), value=d.img_scale_factor, step=0.05,
                                      label="Image frequency (scale factor)")
                policy = gr.Radio(["auto", "generate", "retrieve", "both"], value=d.policy, label="Decision policy")
            with gr.Row():
                steps = gr.Slider(1, max(100, d.steps), value=d.steps, step=1, label="Diffusion steps")
                guidance = gr.Slider(0, max(15.0, d.guidance), value=d.guidance, step=0.5, label="Guidance scale")
                seed = gr.Number(value=d.seed, precision=0, label="Seed")
        controls = [temperature, top_p, max_tokens, frequency, policy, steps, guidance, seed]
        # "multiple": a message sent while another is being answered reaches the server and waits its turn
        answering = box.submit(respond, [box, chatbot, history, *controls], [chatbot, history, box],
                               trigger_mode="multiple")
        undo_btn.click(undo, [chatbot, history], [chatbot, history, box], cancels=[answering])
        reset_btn.click(reset, None, [chatbot, history, box], cancels=[answering])
        save_btn.click(save, [chatbot], [saved])
        save_png_btn.click(save_png, [chatbot], [saved])
        demo.unload(end_session)
    demo.sessions = sessions  # for the app's shutdown and for tests
    return demo


def build_parser() -> argparse.ArgumentParser:
    from gill.arguments import int_in, port_arg, seed_arg
    from gill.presets import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory or preset (default: {DEFAULT_MODEL})")
    p.add_argument("--index", default=None, help="retrieval index directory (your own image collection)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: localhost only; the app has no login: any other address "
                        "lets everyone who can reach it chat with the model)")
    p.add_argument("--port", type=port_arg(), default=7860)
    p.add_argument("--concurrency", type=int_in(1), default=1, help="requests served at once (the rest queue)")
    p.add_argument("--queue-size", type=int_in(1), default=16, help="requests that may wait (the rest are refused)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--steps", type=int_in(1), default=None,
                   help="initial diffusion steps (default: the model's run settings)")
    p.add_argument("--seed", type=seed_arg(), default=None, help="initial seed (default: the model's run settings)")
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    return p


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str) -> str | None:
    """The warning printed when the app listens beyond this machine (it has no login)."""
    import ipaddress

    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host in LOOPBACK:
            return None
    return (f"warning: --host {host}: the app has no login; everyone who can reach this address on the network "
            "can use it (and the model, and your index's pictures). Bind to 127.0.0.1 unless that is what you want.")


def launch(demo: Any, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1, queue_size: int = 16,
           block: bool = True) -> Any:
    """Serve ``demo`` as ``python -m app`` does: the queue's bounds, uploads refused above ``MAX_IMAGE_BYTES``
    (on Gradio's upload route too), and the sessions' files removed when the server stops."""
    import atexit

    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    sessions = getattr(demo, "sessions", None)
    if sessions is not None:
        atexit.register(sessions.close_all)
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_IMAGE_BYTES,
                       prevent_thread_lock=not block, quiet=not block)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    if not port_is_free(args.host, args.port):  # said before the model loads
        print(f"error: port {args.port} on {args.host} is in use (another app?); start this one with --port N",
              file=sys.stderr)
        return 1
    from gill._quiet import quiet

    quiet(args.verbose)
    analytics_enabled()
    import torch

    from gill.pipeline import GILL

    try:
        pipeline = GILL.from_pretrained(args.model, index=args.index, device=args.device,
                                        torch_dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    defaults = Defaults.from_settings(settings_for(pipeline, args))
    demo = build_demo(pipeline, defaults, title=f"GILL · {Path(str(args.model)).name}")
    try:
        launch(demo, args.host, args.port, args.concurrency, args.queue_size)
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


def analytics_enabled() -> bool:
    """Gradio's usage analytics stay off (the app runs offline) unless the user sets
    ``GRADIO_ANALYTICS_ENABLED=True`` themselves; set before gradio is imported, which reads it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return os.environ["GRADIO_ANALYTICS_ENABLED"].strip().lower() in ("1", "true", "yes")


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
