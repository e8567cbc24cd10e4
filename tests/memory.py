"""Peak resident memory of a call, for the tests that bound it (Linux: VmHWM, reset through clear_refs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_growth(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes the resident set peaked above its size before the call, what ``fn`` returned or raised).
    Skips the test where the kernel cannot reset the peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
    except (OSError, KeyError):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    try:
        result: Any = fn()
    except Exception as e:  # the call under test may refuse the input: that is its result
        result = e
    return _status("VmHWM") - before, result
