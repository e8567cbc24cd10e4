"""Command-line argument types shared by every front end (``gill.eval``, the index and training recipes):
a number out of range is refused when the command line is parsed, and argparse names the flag
("argument --batch-size: must be an integer >= 1, got '0'"). Imports no torch at import time (``torch_dtype``
does when called). The flags of a model and its run settings, shared by the app, ``python -m gill generate``
and ``gill.eval``, are ``gill.settings.add_run_arguments``."""

from __future__ import annotations

import argparse
import math


def _number_in(kind: type, low: float | None, high: float | None, above: bool):
    noun = "an integer" if kind is int else "a number"
    lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
    if low is None:
        wanted = noun if high is None else f"{noun} <= {hi}"
    elif high is None:
        wanted = f"{noun} {'>' if above else '>='} {lo}"
    else:
        wanted = f"{noun} from {lo} to {hi}" if not above else f"{noun} > {lo} and <= {hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # what argparse calls the type in its own messages
    return parse


def int_in(low: int | None = None, high: int | None = None, *, above: bool = False):
    """An argparse ``type=`` for integers in [low, high] (``above``: low itself excluded)."""
    return _number_in(int, low, high, above)


def float_in(low: float | None = None, high: float | None = None, *, above: bool = False):
    """An argparse ``type=`` for finite numbers in [low, high] (``above``: low itself excluded)."""
    return _number_in(float, low, high, above)


def out_dir_arg():
    """An argparse ``type=`` for an output folder that exists or can be made: refused when it, or a folder
    above it, is a file (found when the command line is parsed, not after the work that fills it)."""
    from pathlib import Path

    def parse(text: str) -> str:
        try:
            path = Path(text).expanduser()
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be a folder, got {text!r}: {text.split('/')[0]!r} is no user's "
                                             "home directory") from None
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"must be a folder (existing or to be made), got {text!r}: it is a file")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise argparse.ArgumentTypeError(f"must be a folder, got {text!r}: {str(parent)!r} is a file")
                break
        return str(path)

    parse.__name__ = "an output folder"
    return parse


MAX_SEED = 2**32 - 1
"""The largest seed any front end takes (numpy's and every torch generator's range alike)."""

MAX_PORT = 65535


def seed_arg():
    """An argparse ``type=`` for seeds: an integer from 0 to ``MAX_SEED``."""
    return int_in(0, MAX_SEED)


def port_arg():
    """An argparse ``type=`` for TCP ports: an integer from 1 to 65535."""
    return int_in(1, MAX_PORT)


DTYPES = ("float32", "bfloat16", "float16")
"""The ``--dtype`` choices of every front end (the backbones' dtype; unset: as stored)."""


def torch_dtype(name: str | None):
    """A ``--dtype`` value as a ``torch.dtype`` (None stays None: the dtype the weights are stored in)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype is {name!r}; choose one of {list(DTYPES)}")
    import torch

    return getattr(torch, name)
