"""The chat page (Gradio): ``build_demo(pipeline)`` lays out the page around any ``gill.GILL`` and wires its
controls to the app's Gradio-free parts (``app.conversation`` answers, ``app.session`` keeps each user's
conversation, ``app.render`` shows and saves it). Nothing is loaded at import time.
"""

# no ``from __future__ import annotations``: Gradio reads the handlers' annotations at run time to hand them
# the caller's session (``request: gr.Request``), and string annotations naming the local ``gr`` would not
# resolve
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.conversation import Answers, Box, Controls, conversation_state, drop_last_exchange, model_hint
from app.render import conversation_html, conversation_png

CACHE_MAX_AGE_S = 86400  # the app's files in Gradio's cache that no ended session removed go after a day
QUEUE_WAIT_S = 600  # a message sent while another is answered waits this long for its turn at most


def analytics_enabled() -> bool:
    """Gradio's usage analytics stay off (the app runs offline) unless the user sets
    ``GRADIO_ANALYTICS_ENABLED=True`` themselves; set before gradio is imported, which reads it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return os.environ["GRADIO_ANALYTICS_ENABLED"].strip().lower() in ("1", "true", "yes")


def build_demo(pipeline: Any, settings: Any = None, *, policy: str = "auto", title: str = "GILL") -> Any:
    """The Gradio Blocks app around a ``gill.GILL``. ``settings``: the app's run settings (a
    ``gill.RunSettings``, as its flags give them; unset fields: the model's, else the library's), the
    controls' initial values and, for the scheduler (no control), every answer's; ``policy``: the decision
    policy's initial value. Each session (browser tab) has its own folder for its files, inside Gradio's
    cache (served from there, never copied), removed when the tab closes."""
    analytics = analytics_enabled()
    import gradio as gr
    from gradio.utils import get_upload_folder

    from app.session import Sessions
    from gill.settings import RunSettings

    given = settings or RunSettings()  # what the app was started with: every answer's unless a control says
    uploads = Path(get_upload_folder()).resolve()
    uploads.mkdir(parents=True, exist_ok=True)
    sessions = Sessions(Path(tempfile.mkdtemp(prefix="gill-app-", dir=uploads)))
    handlers = _handlers(gr, sessions, Answers(pipeline, given, uploads, sessions.root))
    # what a session leaves is removed when it ends (demo.unload below); what none claims (a file attached but
    # never sent, a tab that never said goodbye) is swept hourly once a day old, and everything at shutdown
    with gr.Blocks(title=title, analytics_enabled=analytics, delete_cache=(3600, CACHE_MAX_AGE_S)) as demo:
        page = _layout(gr, title, model_hint(pipeline), pipeline.run_settings(given), policy)
        # "multiple": a message sent while another is being answered reaches the server and waits its turn
        answering = page.box.submit(handlers.respond, [page.box, page.chatbot, page.history, *page.controls],
                                    [page.chatbot, page.history, page.box], trigger_mode="multiple")
        page.undo.click(handlers.undo, [page.chatbot, page.history], [page.chatbot, page.history, page.box],
                        cancels=[answering])
        page.reset.click(handlers.reset, None, [page.chatbot, page.history, page.box], cancels=[answering])
        page.save.click(handlers.save, [page.chatbot], [page.saved])
        page.save_png.click(handlers.save_png, [page.chatbot], [page.saved])
        demo.unload(handlers.end_session)
    demo.sessions = sessions  # for the app's shutdown and for tests
    return demo


@dataclass
class _Page:
    """The page's components that the handlers read or write."""

    chatbot: Any
    history: Any
    box: Any
    undo: Any
    reset: Any
    save: Any
    save_png: Any
    saved: Any
    controls: list  # in the order of Controls' fields


def _layout(gr: Any, title: str, hint: tuple[str, list[str]] | None, d: Any, policy: str) -> _Page:
    """The page, inside an open ``gr.Blocks``: the model's hint and examples (if it gives them), the chat,
    the buttons, and the settings controls starting at the resolved run settings ``d``."""
    from gill.decision import POLICIES

    gr.Markdown(f"# {title}\nType a message and attach images; answers interleave text with **generated**, "
                "**retrieved** and **edited** images, each labelled with the decision behind it.")
    if hint is not None:
        gr.Markdown(hint[0], elem_id="hint")
    chatbot = gr.Chatbot(label="Conversation", height=620, elem_id="chat")
    history = gr.State(conversation_state(None))
    box = gr.MultimodalTextbox(placeholder="Type a message, attach images…", file_count="multiple",
                               show_label=False, elem_id="input")
    if hint is not None:
        gr.Examples([{"text": e, "files": []} for e in hint[1]], inputs=[box], label="Try")
    with gr.Row():
        buttons = [gr.Button("Undo", elem_id="undo"), gr.Button("Reset", elem_id="reset"),
                   gr.Button("Save conversation (HTML)", elem_id="save"),
                   gr.Button("Save as picture (PNG)", elem_id="save-png")]
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
            chosen_policy = gr.Radio(list(POLICIES), value=policy, label="Decision policy")
        with gr.Row():
            steps = gr.Slider(1, max(100, d.steps), value=d.steps, step=1, label="Diffusion steps")
            guidance = gr.Slider(0, max(15.0, d.guidance_scale), value=d.guidance_scale, step=0.5,
                                 label="Guidance scale")
            seed = gr.Number(value=d.seed, precision=0, label="Seed")
    controls = [temperature, top_p, max_tokens, frequency, chosen_policy, steps, guidance, seed]
    return _Page(chatbot, history, box, *buttons, saved, controls)


def _handlers(gr: Any, sessions: Any, answers: Answers) -> Any:
    """The page's event handlers (Gradio finds each user's session from ``request``)."""

    def box(state: Box) -> Any:  # the message box is cleared when a message is taken, read-only while answered
        return {Box.TAKEN: lambda: gr.update(value=None, interactive=False),
                Box.BUSY: lambda: gr.update(interactive=False),
                Box.READY: lambda: gr.update(interactive=True),
                Box.CLEARED: lambda: gr.update(value=None, interactive=True)}[state]()

    def respond(message, messages, history, temperature, top_p, max_tokens, frequency, policy, steps, guidance, seed,
                request: gr.Request = None):
        session = sessions.get(request)
        arrived = session.arrival()
        try:
            ticket = session.begin(arrived, timeout=QUEUE_WAIT_S)
        except TimeoutError:
            gr.Warning("Still answering your previous message: please send this one again when it has finished.")
            yield gr.update(), gr.update(), box(Box.READY)  # the message stays in the box
            return
        if ticket is None:  # Reset or Undo was pressed after it was sent: they win
            yield gr.update(), gr.update(), box(Box.READY)
            return
        controls = Controls(temperature, top_p, max_tokens, frequency, policy, steps, guidance, seed)
        answering = answers.answer(session, ticket, message, messages, history, controls)
        try:
            for shown, state, then in answering:
                yield shown, state, box(then)
        finally:
            answering.close()
            session.end(ticket)

    def undo(messages, history, request: gr.Request = None):
        messages, state = sessions.get(request).undo(list(messages or []), conversation_state(history),
                                                     drop_last_exchange)
        return messages, state, box(Box.READY)

    def reset(request: gr.Request = None):
        sessions.get(request).interrupt([], conversation_state(None))
        return [], conversation_state(None), box(Box.READY)

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

    return _Handlers(respond, undo, reset, save, save_png, end_session)


@dataclass
class _Handlers:
    respond: Any
    undo: Any
    reset: Any
    save: Any
    save_png: Any
    end_session: Any
