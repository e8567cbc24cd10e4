"""Fetching an image URL for an index build: bounded in size (``gill.io.MAX_FILE_BYTES``) and in total time,
however slowly a server sends."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request

from gill.io import MAX_FILE_BYTES
from index.items import size_text


class _Sockets:
    """The sockets one fetch opens, shut down together when its total time is up: a server that sends a
    byte every second never holds a fetch past its deadline (a socket timeout alone bounds one read)."""

    def __init__(self):
        self.open: list[socket.socket] = []
        self.expired = False
        self.lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.append(sock)
            if self.expired:
                self._shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.open:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    class HTTP(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            sockets.add(self.sock)

    class HTTPS(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            sockets.add(self.sock)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPS, req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def fetch_url(url: str, timeout: float, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
    """(body, None) or (None, reason). At most ``timeout`` seconds in total (connection, headers and body,
    however slowly they come) and ``max_bytes`` of body: a larger ``Content-Length`` is refused unread, a
    body that grows past the bound is dropped as soon as it does."""
    sockets = _Sockets()
    timer = threading.Timer(timeout, sockets.expire)
    timer.daemon = True
    timer.start()
    start = time.monotonic()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "gill-index/0.1"})
        with _opener(sockets).open(req, timeout=timeout) as r:
            length = (r.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > max_bytes:
                return None, f"too large: the URL's body is {size_text(int(length))}; at most {size_text(max_bytes)} is read"
            chunks, size = [], 0
            while chunk := r.read1(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    return None, f"too large: the URL's body is over {size_text(max_bytes)}; at most {size_text(max_bytes)} is read"
                chunks.append(chunk)
            if sockets.expired:
                raise TimeoutError
            return b"".join(chunks), None
    except Exception as e:  # network errors come in many types; each is a skipped, reported item
        if sockets.expired or time.monotonic() - start >= timeout:
            return None, f"unreachable URL: timed out after {timeout:g} s in total (--url-timeout)"
        return None, f"unreachable URL: {type(e).__name__}: {e}"
    finally:
        timer.cancel()
