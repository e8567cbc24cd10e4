"""Add a source to an existing index directory (same model), keeping the ids of the images it holds.

    python -m index.update --model DIR|PRESET --source NEW_SRC --out INDEX_DIR

New images get the next ids; images already in the index (same sha256) are counted as duplicates.
The FAISS index is rebuilt from all stored embeddings with the index's type (IVF quantizers retrained).
An update killed at any point leaves the previous index whole: readers keep using it until the new
manifest is written in one rename (``index.store.finalize``); rerun the same command to resume.
Images of ``NEW_SRC`` are new even where their names repeat an earlier source's (items are keyed by source).
The folders a reader may load hits' images from are the ones you name with ``--source`` (now or in your
earlier builds, signed with your key), never those the index's own files name: updating an index received
from someone else does not make your key vouch for its folders.
"""

from __future__ import annotations

import sys

from index.build import main as build_main


def main(argv: list[str] | None = None) -> int:
    return build_main(argv, update=True)


if __name__ == "__main__":
    sys.exit(main())
