"""One user's conversation on the server, apart from Gradio: its own folder for files, one answer at a
time, and Reset / Undo that win over an answer in flight.

Gradio hands every handler the page's copy of the chat, which is stale while an answer streams (a second
message sent then, or a Reset, would be overwritten by the first answer's later updates). A ``Session``
keeps the conversation as last committed and an ``epoch`` that Reset and Undo advance: an answer begun in
an older epoch stops at its next step and never commits. A message sent while another is answered waits
its turn and is answered after it, from the conversation that answer left.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class Session:
    """A user's conversation: ``messages`` (the chat as shown) and ``state`` (the model's side), as the
    last answer, Reset or Undo left them (None until the session's first message), and ``folder``, the
    only place its files are written (removed with the session)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.messages: list | None = None
        self.state: dict | None = None
        self.uploads: set[str] = set()  # files the user attached, removed with the session
        self._cond = threading.Condition()
        self._epoch = 0
        self._answering = False
        self._save_dir: Path | None = None
        self.last_seen = time.monotonic()

    @property
    def answering(self) -> bool:
        with self._cond:
            return self._answering

    def arrival(self) -> int:
        """The epoch a message arrives in (taken before it waits for its turn)."""
        with self._cond:
            return self._epoch

    def begin(self, arrived: int, timeout: float) -> int | None:
        """Wait until no answer is in flight, then start one: its ticket. None where Reset or Undo came
        after the message arrived (they win: it is not answered); TimeoutError if the wait outlasts
        ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._answering or self._epoch != arrived, timeout):
                raise TimeoutError
            if self._epoch != arrived:
                return None
            self._answering = True
            return self._epoch

    def current(self, ticket: int) -> bool:
        """Whether the answer with this ticket still counts (no Reset or Undo since it began)."""
        with self._cond:
            return self._epoch == ticket

    def commit(self, ticket: int | None, messages: list, state: dict, done: bool = False) -> bool:
        """Record the conversation an answer reached (``done``: and end the answer); False, and nothing
        recorded, where Reset or Undo came since the answer began."""
        with self._cond:
            if ticket is not None and ticket != self._epoch:
                return False
            self.messages, self.state = list(messages), state
            if done:
                self._answering = False
                self._cond.notify_all()
            return True

    def end(self, ticket: int) -> None:
        """An answer ends without committing (a model error, or its generator was closed)."""
        with self._cond:
            if ticket == self._epoch and self._answering:
                self._answering = False
                self._cond.notify_all()

    def interrupt(self, messages: list, state: dict) -> None:
        """Reset: the conversation becomes ``messages`` / ``state``; an answer in flight is abandoned."""
        with self._cond:
            self._epoch += 1
            self._answering = False
            self.messages, self.state = list(messages), state
            self._cond.notify_all()

    def undo(self, messages: list, state: dict, drop_last) -> tuple[list, dict]:
        """Undo: during an answer, the answer and its message go (the conversation as committed before
        it); otherwise ``drop_last(messages, state)`` removes the last exchange. Returns the result."""
        with self._cond:
            if self.messages is not None:
                messages, state = self.messages, self.state
            if not self._answering:
                messages, state = drop_last(messages, state)
            self._epoch += 1
            self._answering = False
            self.messages, self.state = list(messages), state
            self._cond.notify_all()
            return list(messages), state

    def save_dir(self) -> Path:
        """A fresh folder for one saved conversation (the previous save's folder is removed): every save
        is its own file, which no other session or save writes."""
        with self._cond:
            if self._save_dir is not None:
                shutil.rmtree(self._save_dir, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._save_dir = Path(tempfile.mkdtemp(prefix="save-", dir=self.folder))
            return self._save_dir

    def close(self) -> None:
        """The session ended: its folder and its uploads are removed."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for path in list(self.uploads):
            Path(path).unlink(missing_ok=True)
        self.uploads.clear()


class Sessions:
    """The sessions of one app, by Gradio's session hash, each with its own folder under ``root``. A session
    whose page never says goodbye (a script's client, a crashed browser) is closed once idle for ``max_idle``
    seconds; one closed early only loses its server copy: its page's copy of the chat is used again."""

    def __init__(self, root: Path, max_idle: float = 86400.0):
        self.root = root
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def get(self, request: Any) -> Session:
        """The session of a request (Gradio's ``gr.Request``); a call without one (a test calling a handler)
        gets a session of its own that is not kept."""
        key = getattr(request, "session_hash", None)
        if key is None:
            return Session(Path(tempfile.mkdtemp(prefix="session-", dir=self.root)))
        now = time.monotonic()
        with self._lock:
            idle = [k for k, s in self._by_id.items()
                    if k != key and now - s.last_seen > self.max_idle and not s.answering]
            closing = [self._by_id.pop(k) for k in idle]
            if key not in self._by_id:
                self._by_id[key] = Session(Path(tempfile.mkdtemp(prefix="session-", dir=self.root)))
            session = self._by_id[key]
            session.last_seen = now
        for old in closing:
            old.close()
        return session

    def close(self, request: Any) -> None:
        """The user closed or reloaded the page: the session and its files go."""
        key = getattr(request, "session_hash", None)
        with self._lock:
            session = self._by_id.pop(key, None) if key is not None else None
        if session is not None:
            session.close()

    def close_all(self) -> None:
        with self._lock:
            sessions, self._by_id = list(self._by_id.values()), {}
        for session in sessions:
            session.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)
