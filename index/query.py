"""Query an index with a text or an image; prints the top-k images with their provenance.

    python -m index.query --model DIR|PRESET --index INDEX_DIR --text "a red car" -k 5
    python -m index.query --model DIR|PRESET --index INDEX_DIR --image photo.jpg -k 5

A text is embedded as GILL retrieves: the caption followed by the [IMG] tokens, the [IMG0] state through
the text-side projection. An image is embedded by the image side. Scores are exp(logit_scale) * cosine.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gill.arguments import int_in


def text_query(gill, text: str) -> torch.Tensor:
    tok = gill.tokenizer(text + gill.img_tokens.text, return_tensors="pt")
    model = gill.model
    with torch.no_grad():
        out = model.img_token_forward(tok.input_ids.to(gill.device), tok.attention_mask.to(gill.device))
        return model.text_retrieval_embeddings(out.img_hidden)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m index.query", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image")
    p.add_argument("-k", type=int_in(1), default=5, help="hits to print, >= 1")
    p.add_argument("--allow-mismatch", action="store_true", help="use an index built by another model")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--verbose", action="store_true", help="show the libraries' messages (model loading, warnings)")
    return p


def empty_index_problem(path: str) -> str | None:
    """"INDEX: the index is empty ..." where the index directory holds no image (read from its manifest,
    before any model loads); None otherwise, and where the manifest cannot be read (opening names that)."""
    from pathlib import Path

    from gill.retrieval import MANIFEST_NAME, IndexManifest

    try:
        manifest = IndexManifest.read(Path(path) / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    if manifest.count:
        return None
    return f"{path}: the index is empty (0 images); build it from a source that holds images"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from gill.quiet import quiet

    quiet(args.verbose)  # no "Loading weights" bars nor library warnings unless --verbose
    if problem := empty_index_problem(args.index):
        print(f"error: {problem}", file=sys.stderr)
        return 1

    from gill import GILL
    from gill.images import ImageError, open_image

    image = None
    if args.image is not None:
        try:  # checked before the model loads: bounded size and aspect ratio, before the processor resizes
            image = open_image(args.image)
        except (FileNotFoundError, ImageError) as e:
            print(f"error: --image {e}", file=sys.stderr)
            return 1
    try:
        gill = GILL.from_pretrained(args.model, index=args.index, load_diffusion=False,
                                    allow_index_mismatch=args.allow_mismatch)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if image is None:
        query = text_query(gill, args.text)
    else:
        pixels = gill.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            query = gill.model.encode_images(pixels.to(gill.device)).retrieval
    scale = gill.model.adapter.logit_scale.exp().item()
    for rank, hit in enumerate(gill.retriever.search(query, k=args.k, scale=scale)[0], start=1):
        r = hit.record
        if args.json:
            print(json.dumps({"rank": rank, "score": hit.score, "id": r.id, "source": r.source, "caption": r.caption,
                              "sha256": r.sha256, "width": r.width, "height": r.height, "license": r.license}))
        else:
            print(f"{rank:3d}  {hit.score:7.3f}  {r.source}  {r.caption!r}  {r.width}x{r.height}  {r.license}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
