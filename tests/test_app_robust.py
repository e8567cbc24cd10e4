"""The chat app with many users, hostile sources and large inputs: nothing leaks between sessions, Reset
and Undo win over an answer in flight, no message is silently dropped, markup from an index is shown as
text, bad flags are refused when parsed, uploads and memory stay bounded, a session's files go with it."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from app.app import build_demo, build_parser, main
from app.render import image_label, plain_text
from gill.settings import RunSettings
from synthetic import free_port

CONTROLS = (0.0, 0.95, 8, 1.0, "both", 2, 7.5, 0)


@pytest.fixture
def demo(tiny_gill):
    d = build_demo(tiny_gill, RunSettings(steps=2, max_new_tokens=8, img_scale_factor=1.0), policy="both")
    yield d
    d.sessions.close_all()


def handlers(demo) -> dict:
    return {f.fn.__name__: f.fn for f in demo.fns.values() if f.fn is not None}


def user(name: str) -> SimpleNamespace:
    """What a handler learns of its caller from Gradio: the session (one browser tab)."""
    return SimpleNamespace(session_hash=name)


def shown(messages) -> str:
    return " ".join(plain_text(m["content"]) for m in messages if isinstance(m["content"], str))


# --- privacy: each session saves its own conversation ---------------------------------------------------

def test_a_save_is_never_overwritten_by_another_sessions_save(demo):
    h = handlers(demo)
    a = Path(h["save"]([{"role": "user", "content": "alice-secret"}], request=user("alice"))["value"])
    b = Path(h["save"]([{"role": "user", "content": "bob-secret"}], request=user("bob"))["value"])
    assert a != b and "alice-secret" in a.read_text() and "bob-secret" not in a.read_text()
    pa = Path(h["save_png"]([{"role": "user", "content": "alice"}], request=user("alice"))["value"])
    pb = Path(h["save_png"]([{"role": "user", "content": "bob"}], request=user("bob"))["value"])
    assert pa != pb and pa.read_bytes() != pb.read_bytes()


def test_four_clients_saving_at_once_each_download_their_own_conversation(demo):
    """``--concurrency 4``, four gradio_client users pressing Save over and over at the same time."""
    from gradio_client import Client

    from app.app import launch

    port = free_port()
    launch(demo, "127.0.0.1", port, concurrency=4, block=False)
    try:
        url = f"http://127.0.0.1:{port}/"

        def saves(name: str) -> list[str]:
            client = Client(url, verbose=False)
            wrong = []
            for n in range(15):
                secret = f"secret-{name}-{n}"
                chat = [{"role": "user", "content": [{"type": "text", "text": secret}]}]
                path = client.predict(chat, api_name="/save")
                page = Path(path if isinstance(path, str) else path["value"]).read_text()
                if secret not in page:
                    wrong.append(f"{name} #{n} got {[w for w in page.split() if 'secret-' in w]}")
            return wrong

        with ThreadPoolExecutor(max_workers=4) as pool:
            wrong = [w for ws in pool.map(saves, ["ann", "ben", "cat", "dan"]) for w in ws]
        assert not wrong, f"{len(wrong)} of 60 saves downloaded another conversation: {wrong[:3]}"
        assert len(demo.sessions) == 4  # each client is a session of its own (Gradio hands the handlers it)
    finally:
        demo.close()


# --- Reset, Undo and a quick second message while an answer streams --------------------------------------

class Gate:
    """Makes the pipeline's stream wait, segment by segment, until the test opens the gate."""

    def __init__(self, pipeline, monkeypatch):
        self.open = threading.Event()
        original = pipeline.stream

        def stream(*args, **kwargs):
            for segment in original(*args, **kwargs):
                assert self.open.wait(30)
                yield segment

        monkeypatch.setattr(pipeline, "stream", stream)


def run_in_thread(gen) -> tuple[threading.Thread, list]:
    """Iterate a handler's generator in a thread (as Gradio does); its outputs, as they come."""
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(gen), daemon=True)
    thread.start()
    return thread, out


def wait_for(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_reset_during_an_answer_wins(demo, tiny_gill, monkeypatch):
    h, me = handlers(demo), user("tab")
    gate = Gate(tiny_gill, monkeypatch)
    thread, out = run_in_thread(h["respond"]({"text": "a red circle", "files": []}, [], None, *CONTROLS, request=me))
    wait_for(lambda: len(out) >= 1)  # the message is taken; its answer waits at the gate
    after_reset = len(out)
    messages, state, _ = h["reset"](request=me)
    gate.open.set()
    thread.join(30)
    assert messages == [] and state["turns"] == []
    assert out[after_reset:] == [], "the answer came back after Reset"
    session = demo.sessions.get(me)
    assert session.messages == [] and session.state["turns"] == []
    # the next message starts a new conversation, and is answered
    messages, state, _ = list(h["respond"]({"text": "a blue square", "files": []}, [], None, *CONTROLS, request=me))[-1]
    assert len(state["turns"]) == 1 and "a red circle" not in shown(messages) and "a blue square" in shown(messages)


def test_undo_during_an_answer_takes_back_only_that_message(demo, tiny_gill, monkeypatch):
    h, me = handlers(demo), user("tab")
    first, state1, _ = list(h["respond"]({"text": "a red circle", "files": []}, [], None, *CONTROLS, request=me))[-1]
    gate = Gate(tiny_gill, monkeypatch)
    thread, out = run_in_thread(h["respond"]({"text": "it turns blue", "files": []}, first, state1, *CONTROLS,
                                             request=me))
    wait_for(lambda: len(out) >= 1)
    page_now = out[-1][0]  # what the page shows: the second message, its answer on the way
    after_undo = len(out)
    messages, state, _ = h["undo"](page_now, state1, request=me)
    gate.open.set()
    thread.join(30)
    assert out[after_undo:] == [], "the answer came back after Undo"
    assert messages == first and len(state["turns"]) == 1  # the first exchange stays
    # Undo again, once nothing is in flight: the first exchange goes too
    messages, state, _ = h["undo"](messages, state, request=me)
    assert messages == [] and state["turns"] == []


def test_undo_after_a_refused_message_keeps_the_last_real_turn(demo):
    h, me = handlers(demo), user("tab")
    messages, state, _ = list(h["respond"]({"text": "a red circle", "files": []}, [], None, *CONTROLS, request=me))[-1]
    messages, state, _ = list(h["respond"]({"text": " ", "files": []}, messages, state, *CONTROLS, request=me))[-1]
    assert "Please type a message" in plain_text(messages[-1]["content"])
    messages, state, _ = h["undo"](messages, state, request=me)
    assert len(state["turns"]) == 1 and "a red circle" in shown(messages)


def test_a_second_message_sent_100_ms_after_the_first_is_answered_after_it(demo, tiny_gill, monkeypatch):
    """Both sent from the same page (so both carry the chat as it was before either): neither is lost."""
    h, me = handlers(demo), user("tab")
    gate = Gate(tiny_gill, monkeypatch)
    t1, out1 = run_in_thread(h["respond"]({"text": "a red circle", "files": []}, [], None, *CONTROLS, request=me))
    time.sleep(0.1)
    t2, out2 = run_in_thread(h["respond"]({"text": "a blue square", "files": []}, [], None, *CONTROLS, request=me))
    time.sleep(0.2)
    gate.open.set()
    t1.join(60)
    t2.join(60)
    messages, state, _ = out2[-1]
    assert "a red circle" in shown(messages) and "a blue square" in shown(messages)
    assert len(state["turns"]) == 2
    assert shown(messages).index("a red circle") < shown(messages).index("a blue square")


def test_reset_and_undo_cancel_the_answer_in_the_page(demo):
    """In the browser, Reset and Undo also stop the running answer (Gradio's cancels=)."""
    fns = list(demo.fns.values())
    respond = next(f for f in fns if f.fn is not None and f.fn.__name__ == "respond")
    for name in ("reset", "undo"):
        button = next(f for f in fns if f.fn is not None and f.fn.__name__ == name).targets
        assert any(f.is_cancel_function and respond._id in f.cancels and f.targets == button for f in fns), name
    assert respond.trigger_mode == "multiple"  # a quick second Enter reaches the server


# --- markup from an index is shown as text -------------------------------------------------------------

HOSTILE = ["<img src=https://evil.example/x.png>", "a `tick", "**bold** [link](https://evil.example) ![i](x.png)",
           "<script>alert(1)</script>", "$$x$$ & &amp; \\` _under_", "line\nbreak"]


def render(markdown: str) -> str:
    """CommonMark, as the chat's markdown renderer reads it (html allowed, as Gradio's is)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).render(markdown)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_captions_and_sources_from_an_index_are_shown_as_text(hostile):
    decision = SimpleNamespace(p_gen=0.25, p_ret=0.75, policy="auto")
    segment = SimpleNamespace(decision=decision, caption=hostile, source=f"folder/{hostile}.png", score=0.5)
    label = image_label(segment)
    page = render(label)
    assert "<img" not in page and "<script" not in page and "<a " not in page and "<em>" not in page
    assert page.count("<strong>") == 1 and "<code>" not in page  # only the label's own bold
    one_line = " ".join(hostile.split())
    assert one_line in plain_text(label) and f"folder/{one_line}.png" in plain_text(label)
    from app.render import conversation_html

    saved = conversation_html([{"role": "assistant", "content": label}])
    assert "<img" not in saved.split("<h1>")[1] and "<script" not in saved.split("<h1>")[1]


def test_file_names_and_model_text_are_shown_as_text(demo, tmp_path):
    h = handlers(demo)
    bad = tmp_path / "<img src=x onerror=alert(1)>.txt"
    bad.write_text("not an image")
    messages, _, _ = list(h["respond"]({"text": "look `here", "files": [str(bad)]}, [], None, *CONTROLS))[-1]
    for m in messages:
        if isinstance(m["content"], str):
            page = render(m["content"])
            assert "<img" not in page and "<code>" not in page, m["content"]
    assert "<img src=x onerror=alert(1)>.txt is not an image" in plain_text(messages[-1]["content"])


# --- flags and the seed box ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--concurrency", "0"], "--concurrency"), (["--concurrency", "-1"], "--concurrency"),
    (["--queue-size", "-1"], "--queue-size"), (["--port", "99999"], "--port"), (["--port", "0"], "--port"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed")])
def test_out_of_range_flags_are_refused_when_parsed(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line naming the flag and the range
    assert e.value.code == 2 and "Traceback" not in err and f"argument {flag}: must be an integer" in last


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, None, float("inf")])
def test_an_out_of_range_seed_in_the_page_is_said_in_the_chat(demo, seed):
    h = handlers(demo)
    controls = CONTROLS[:-1] + (seed,)
    messages, state, _ = list(h["respond"]({"text": "a red circle", "files": []}, [], None, *controls))[-1]
    said = plain_text(messages[-1]["content"])
    assert said.startswith("⚠️ The seed must be a whole number from 0 to 4294967295") and state["turns"] == []
    before = len(messages)
    messages, state, _ = list(h["respond"]({"text": "a red circle", "files": []}, messages, state, *CONTROLS))[-1]
    assert len(state["turns"]) == 1 and "⚠️" not in shown(messages[before:])


def _main_on_a_busy_port(host: str, capsys) -> str:
    """``main`` up to its first check (the port is taken), so no model loads; what it printed."""
    with socket.socket() as busy:
        busy.bind((host, 0))
        busy.listen()
        assert main(["--host", host, "--port", str(busy.getsockname()[1])]) == 1
    return capsys.readouterr().err


def test_a_host_beyond_this_machine_is_warned_about(capsys):
    err = _main_on_a_busy_port("0.0.0.0", capsys)
    assert "warning: --host 0.0.0.0" in err and "no login" in err
    assert "warning" not in _main_on_a_busy_port("127.0.0.1", capsys)


# --- uploads and a session's files ----------------------------------------------------------------------

def test_uploads_over_20_mb_are_refused_by_the_upload_route(demo, tmp_path):
    import httpx

    from app.app import launch
    from app.inputs import MAX_IMAGE_BYTES

    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        big = tmp_path / "big.png"
        with open(big, "wb") as f:
            f.truncate(MAX_IMAGE_BYTES + 1)
        with open(big, "rb") as f:
            r = httpx.post(url, files={"files": ("big.png", f, "image/png")}, timeout=60)
        assert r.status_code == 413, (r.status_code, r.text[:200])
        Image.new("RGB", (8, 8), "red").save(tmp_path / "small.png")
        with open(tmp_path / "small.png", "rb") as f:
            r = httpx.post(url, files={"files": ("small.png", f, "image/png")}, timeout=60)
        assert r.status_code == 200
    finally:
        demo.close()


def test_a_sessions_files_are_removed_when_it_ends(demo):
    from gradio.utils import get_upload_folder

    h, me = handlers(demo), user("tab")
    upload_dir = Path(get_upload_folder()) / "test-upload-abc"
    upload_dir.mkdir(parents=True, exist_ok=True)
    upload = upload_dir / "photo.png"
    Image.new("RGB", (40, 40), "blue").save(upload)
    messages, _, _ = list(h["respond"]({"text": "a red circle", "files": [str(upload)]}, [], None, *CONTROLS,
                                       request=me))[-1]
    files = [Path(m["content"]["path"]) for m in messages if isinstance(m["content"], dict)]
    saved = [Path(h["save"](messages, request=me)["value"])]
    assert saved[0].is_file()
    saved.append(Path(h["save_png"](messages, request=me)["value"]))  # replaces the page's saved file
    assert files and all(p.is_file() for p in files + saved[1:] + [upload])
    unload = next(f.fn for f in demo.fns.values() if any(t[1] == "unload" for t in f.targets))
    unload(request=me)
    left = [p for p in files + saved + [upload] if p.exists()]
    assert not left, left
    assert len(demo.sessions) == 0
    shutil.rmtree(upload_dir, ignore_errors=True)


# --- memory ---------------------------------------------------------------------------------------------

def test_twenty_huge_attachments_stay_under_1_gb(demo, tmp_path):
    """One message with 20 attached 6300x6300 PNGs (a solid colour: small on disk, 119 MB decoded each)."""
    from memory import peak_growth

    h = handlers(demo)
    Image.new("RGB", (6300, 6300), (200, 30, 30)).save(tmp_path / "huge-0.png", compress_level=1)
    paths = [str(tmp_path / "huge-0.png")]
    for i in range(1, 20):
        paths.append(str(shutil.copy(tmp_path / "huge-0.png", tmp_path / f"huge-{i}.png")))
    list(h["respond"]({"text": "a red circle", "files": paths[:1]}, [], None, *CONTROLS))  # warm up
    start = time.time()
    growth, result = peak_growth(lambda: list(h["respond"]({"text": "what are these?", "files": paths}, [], None,
                                                           *CONTROLS))[-1])
    took = time.time() - start
    assert not isinstance(result, Exception), result
    messages, state, _ = result
    assert len(state["turns"]) == 1 and sum(1 for x in state["turns"][0] if not isinstance(x, str)) >= 20
    assert all(max(x.size) <= 1024 for x in state["turns"][0] if not isinstance(x, str))
    assert growth < 2**30, f"peak grew by {growth / 2**30:.2f} GB"
    print(f"20 attachments: peak +{growth / 2**20:.0f} MB, {took:.1f} s")


def test_a_quick_second_message_over_the_server_is_answered_after_the_first(demo):
    """The same, through the running app (``--concurrency 4``, so both reach the model at once)."""
    from gradio_client import Client

    from app.app import launch

    port = free_port()
    launch(demo, "127.0.0.1", port, concurrency=4, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        first = client.submit({"text": "a red circle", "files": []}, [], api_name="/respond")
        time.sleep(0.1)
        second = client.submit({"text": "a blue square", "files": []}, [], api_name="/respond")
        messages = second.result(timeout=120)[0]
        first.result(timeout=120)
        texts = " ".join(plain_text(part.get("text", "")) for m in messages for part in m["content"]
                         if part.get("type") == "text")
        assert "a red circle" in texts and "a blue square" in texts
        assert texts.index("a red circle") < texts.index("a blue square")
    finally:
        demo.close()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16", "1", "CMYK"])
def test_attachments_are_shrunk_as_they_are_decoded_in_every_mode(tmp_path, mode):
    from app.inputs import MAX_SIDE, load_user_image

    image = Image.new("RGB", (3000, 1500), (250, 20, 20)).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "CMYK") else "x.png")
    image.save(path)
    got = load_user_image(str(path))
    assert got.mode == "RGB" and got.size == (MAX_SIDE, MAX_SIDE // 2)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), "red").save(small)
    assert load_user_image(str(small)).size == (40, 30)  # small pictures are kept as they are


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_reset_pressed_in_a_real_browser_while_an_answer_streams(demo, tiny_gill, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from app.app import launch

    gate = Gate(tiny_gill, monkeypatch)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            box = page.locator("#input textarea")
            box.wait_for(timeout=30_000)
            box.fill("a red circle")
            box.press("Enter")
            chat = page.locator("#chat")
            expect(chat.get_by_text("a red circle")).to_be_visible(timeout=30_000)  # taken; the answer waits
            page.locator("#reset").click()
            expect(chat.get_by_text("a red circle")).to_have_count(0, timeout=10_000)
            gate.open.set()  # the model goes on: nothing of it may come back
            page.wait_for_timeout(3_000)
            assert chat.get_by_text("a red circle").count() == 0 and chat.locator("img").count() == 0
            assert chat.get_by_text("Retrieved image").count() == 0 and chat.get_by_text("Generated image").count() == 0
            box.fill("a blue square")  # and the page takes the next message
            box.press("Enter")
            expect(chat.get_by_text("a blue square")).to_be_visible(timeout=30_000)
            browser.close()
    finally:
        gate.open.set()
        demo.close()


def test_sessions_that_never_say_goodbye_are_closed_once_idle(tmp_path):
    from app.session import Sessions

    sessions = Sessions(tmp_path, max_idle=0.2)
    gone = sessions.get(user("script"))
    gone.folder.mkdir(parents=True, exist_ok=True)
    (gone.folder / "picture.png").write_bytes(b"x")
    time.sleep(0.3)
    sessions.get(user("browser"))
    assert len(sessions) == 1 and not gone.folder.exists()
