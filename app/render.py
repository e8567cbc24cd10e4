"""What the chat shows and saves: text escaped so markup in a caption, a file name or the model's words is shown
as the characters it is, the labels of the answer's images, and the conversation as one HTML page or one
picture."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from app.inputs import BadInput, load_user_image

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
    probs = " · ".join(f"p({k})={v:.2f}" for k in ("gen", "ret", "edit")
                       if (v := getattr(d, f"p_{k}", None)) is not None) or "no classifier"  # those the head has
    kind = type(segment).__name__
    if kind == "GeneratedImage":
        return f"**Generated image** · {probs} · policy: {escaped(d.policy)}"
    if kind == "EditedImage":
        return (f"**Edited image** · from {escaped(one_line(segment.source.describe()))} · strength "
                f"{segment.strength:.2f} · {probs} · policy: {escaped(d.policy)}")
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
