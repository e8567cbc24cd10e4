"""Build the toy world (kept for old commands): the recipe is ``python -m training.toy``.

    python scripts/build_toy_world.py --out toy-build [--small] [--install]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.toy.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
