"""Quiet front ends: third-party messages a user cannot act on are hidden unless asked for (``--verbose``).

Public API for front ends: called by the command lines (``python -m app``, ``python -m gill``,
``python -m gill.eval``, ``python -m index.build`` / ``index.query``), never at import time and never by library
code: a program that embeds gill keeps its own logging. (``gill._quiet`` is this module's old name.)
"""

from __future__ import annotations

import logging
import warnings

NOISY_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "faiss", "httpx", "gradio")


def quiet(verbose: bool = False) -> None:
    """Show gill's own INFO messages; from the libraries below it only errors, and no progress bars."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    # deprecation notices from inside the libraries (e.g. transformers' own past_key_values rename)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
