"""The original release's embeddings file, ``cc3m_embeddings_urls.npy`` (a pickle of URLs and vectors),
read with a restricted unpickler that admits only data (``index.import_original`` turns it into an index)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# (module, name) pairs a numpy-array pickle needs, across numpy 1.x and 2.x.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "str"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5's arrays
}


def _bounded(module: str, name: str, make: Callable[..., Any], limit: int) -> Callable[..., Any]:
    """``make`` refusing arguments that would make more than ``limit`` bytes out of a few: a pickle holds
    its data, so no allowed call may build more than the file is long (``bytearray(3_000_000_000)`` is
    36 bytes of pickle)."""
    import pickle

    def sized(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return abs(value)
        if isinstance(value, (tuple, list)):  # a shape
            total = 1
            for v in value:
                total *= sized(v) if isinstance(v, int) else 1
            return total
        return 0

    def call(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if sized(value) > limit:
                raise pickle.UnpicklingError(f"refused: the pickle asks {module}.{name} for {sized(value)} items, "
                                             f"more than the file's {limit} bytes could hold")
        return make(*args, **kwargs)

    return call


def read_original_embeddings(path: str | os.PathLike) -> tuple[list[str], Any]:
    """``cc3m_embeddings_urls.npy`` (despite its name a pickle of ``{'paths': [urls], 'embeddings': [vectors]}``)
    -> (urls, float32 array (N, D)). Only lists, dicts, tuples, strings, numbers and numpy arrays are
    admitted: a pickle that asks for anything else (a function to call, another class) is refused."""
    import pickle

    import numpy as np

    limit = max(os.path.getsize(path), 1 << 16)

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module = "builtins" if module == "__builtin__" else module  # protocol 2 names them the Python 2 way
            if (module, name) not in _PICKLE_ALLOWED:
                raise pickle.UnpicklingError(f"refused: the pickle asks for {module}.{name}, which is not data")
            found = super().find_class(module, name)
            if name == "ndarray":
                return found  # named as _reconstruct's argument; numpy checks its state's size against its shape
            return _bounded(module, name, found, limit)

    with open(path, "rb") as f:
        try:
            data = Restricted(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: {e or 'truncated file'}") from None
        except (TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError) as e:
            raise ValueError(f"{path}: not the original embeddings pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "paths" not in data or "embeddings" not in data:
        raise ValueError(f"{path}: expected a dict with 'paths' and 'embeddings'")
    paths = [str(p) for p in data["paths"]]
    vectors = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in data["embeddings"]])
    if len(paths) != len(vectors):
        raise ValueError(f"{path}: {len(paths)} paths but {len(vectors)} embeddings")
    return paths, vectors
