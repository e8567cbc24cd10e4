"""The GILL chat app (Gradio): type text, attach images, get interleaved text, generated and retrieved images.

    python -m app                                  # the offline default model, on http://127.0.0.1:7860
    python -m app --model DIR --index INDEX_DIR --device cuda

This module is the command line (``main``: flags, the model loaded, the page served). The app's parts:
``app.demo`` lays out the page (``build_demo(pipeline)`` around any ``gill.GILL``; tests inject a tiny one),
``app.conversation`` answers a message apart from Gradio, ``app.session`` keeps each user's conversation,
``app.render`` shows and saves it, ``app.inputs`` checks what a user sends. Nothing is loaded at import time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.demo import analytics_enabled, build_demo
from app.inputs import MAX_IMAGE_BYTES, BadInput, load_user_image

__all__ = ["main", "build_parser", "launch", "exposure_warning", "port_is_free", "build_demo", "BadInput",
           "load_user_image"]


def build_parser() -> argparse.ArgumentParser:
    from gill.arguments import int_in, port_arg
    from gill.settings import add_run_arguments

    p = argparse.ArgumentParser(prog="python -m app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: localhost only; the app has no login: any other address "
                        "lets everyone who can reach it chat with the model)")
    p.add_argument("--port", type=port_arg(), default=7860)
    p.add_argument("--concurrency", type=int_in(1), default=1, help="requests served at once (the rest queue)")
    p.add_argument("--queue-size", type=int_in(1), default=16, help="requests that may wait (the rest are refused)")
    add_run_arguments(p, title="model and run settings (the controls' initial values)")
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
    from gill.quiet import quiet

    quiet(args.verbose)
    analytics_enabled()
    from gill.pipeline import GILL
    from gill.settings import load_kwargs, settings_from_args

    try:
        pipeline = GILL.from_pretrained(args.model, **load_kwargs(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    demo = build_demo(pipeline, settings_from_args(args), title=f"GILL · {Path(str(args.model)).name}")
    try:
        launch(demo, args.host, args.port, args.concurrency, args.queue_size)
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
