"""``python -m app --host``: the app listens on the address asked for, and only there."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from synthetic import free_port


def reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def test_the_app_listens_on_the_host_asked_for_and_nowhere_else(monkeypatch, capsys):
    """``--host 127.0.0.2`` (a loopback address other than the default): the page answers there, nothing
    listens on 127.0.0.1 at that port, and no warning is printed (loopback)."""
    import app.app as app_module
    import gill._quiet

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 cannot be bound here")
    served, real_launch = [], app_module.launch

    def launch(demo, host, port, *args):  # the app's own launch, returning instead of serving forever
        real_launch(demo, host, port, *args, block=False)
        served.append(demo)

    monkeypatch.setattr(app_module, "launch", launch)
    monkeypatch.setattr(gill._quiet, "quiet", lambda verbose=False: None)  # leave this process's logging alone
    port = free_port()
    try:
        assert app_module.main(["--host", "127.0.0.2", "--port", str(port), "--model", "tiny-random"]) == 0
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read(4096).lower()
        assert not reachable("127.0.0.1", port)
        assert "warning: --host" not in capsys.readouterr().err
    finally:
        if served:
            served[-1].close()
    assert not reachable("127.0.0.2", port)  # (closed: the check above saw this server, not another)
