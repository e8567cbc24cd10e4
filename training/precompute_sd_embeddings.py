"""Precompute the diffusion text encoder's states of every caption: the GILLMapper's targets.

    python -m training.precompute_sd_embeddings --sd stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data 'cc3m/{00000..00331}.tar' --out cc3m-sd --device cuda

For each shard ``NAME.tar`` it writes ``OUT/NAME.safetensors``: sample key -> (77, d) float16, the text
encoder's last hidden states (after its final LayerNorm) of the caption padded to the encoder's length
with right truncation, as the original's preprocessing. Files are written atomically and finished
shards are skipped, so a killed run resumes. ``--sd tiny-random`` uses the tiny preset's encoder; a GILL
model directory or preset means the diffusion pipeline it generates with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def encoder_for(name: str, device: str | None, dtype: torch.dtype | None):
    """(tokenizer, text encoder) for ``--sd``: a Stable Diffusion repo id or folder, ``tiny-random``, or a
    GILL model (preset or directory) whose diffusion pipeline is meant (``gill.loading``)."""
    from gill.loading import load_sd_text_encoder

    tokenizer, encoder = load_sd_text_encoder(name, torch_dtype=dtype)
    if device:
        encoder.to(device)
    return tokenizer, encoder.eval()


@torch.no_grad()
def encode(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    length = encoder.config.max_position_embeddings
    tok = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    return encoder(input_ids=tok.input_ids.to(device)).last_hidden_state.to(torch.float16).cpu()


def captions_of(url: str, text_key: str = "txt") -> list[tuple[str, str]]:
    """(key, caption) of every sample of a shard, in order; keys may repeat (see ``unique_keys``)."""
    import webdataset as wds

    out = []
    for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False, handler=wds.warn_and_continue,
                                  nodesplitter=lambda u: u, workersplitter=lambda u: u):
        text = sample.get(text_key, b"")
        text = text.decode("utf-8", "replace").strip() if isinstance(text, bytes) else str(text).strip()
        out.append((sample["__key__"], text))
    return out


def unique_keys(items: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The items whose key appears once, and the keys that appear more than once. A repeated key gets no
    embedding: one file entry cannot be the target of two samples (training counts both as left out)."""
    from collections import Counter

    counts = Counter(k for k, _ in items)
    repeated = sorted(k for k, n in counts.items() if n > 1)
    return [(k, c) for k, c in items if counts[k] == 1], repeated


def parse(argv: list[str] | None):
    from gill.arguments import int_in

    p = argparse.ArgumentParser(prog="python -m training.precompute_sd_embeddings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", required=True, help="Stable Diffusion repository id or path, or tiny-random")
    p.add_argument("--data", required=True, help="shards (brace pattern; '::' joins several)")
    p.add_argument("--out", required=True)
    p.add_argument("--text-key", default="txt",
                   help="the sample field whose text is encoded (default txt, the caption GILL reads); another "
                        "field, e.g. sd.txt, when the picture's own description differs from the training text")
    p.add_argument("--batch-size", type=int_in(1), default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    from safetensors.torch import save_file

    from gill.io import atomic_path

    from training.data import expand_shards, shard_name

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, encoder = encoder_for(args.sd, args.device, getattr(torch, args.dtype) if args.dtype else None)
    done = skipped = duplicates = 0
    for url in expand_shards(args.data):
        target = out / f"{shard_name(url)}.safetensors"
        if target.is_file():
            skipped += 1
            continue
        items, repeated = unique_keys(captions_of(url, args.text_key))
        if repeated:
            duplicates += len(repeated)
            print(f"warning: {url}: {len(repeated)} key(s) appear more than once ({', '.join(repeated[:5])}"
                  f"{', ...' if len(repeated) > 5 else ''}); their samples get no embedding and are left out of "
                  "training", file=sys.stderr)
        tensors = {}
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            states = encode(tokenizer, encoder, [c for _, c in chunk])
            tensors.update({k: s.contiguous() for (k, _), s in zip(chunk, states)})
        with atomic_path(target) as tmp:  # a unique temporary name: two runs over one folder do not collide
            save_file(tensors, str(tmp), metadata={"sd": args.sd})
        done += 1
        print(f"{target}: {len(tensors)} captions")
    print(f"{done} shards written, {skipped} already done"
          + (f"; {duplicates} repeated key(s) left without an embedding" if duplicates else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
