"""Convert the original GILL release into a model directory.

    python scripts/convert_original_checkpoint.py \
        --model-args gill/checkpoints/gill_opt/model_args.json \
        --checkpoint gill/checkpoints/gill_opt/pretrained_ckpt.pth.tar \
        --decision gill/checkpoints/gill_opt/decision_model.pth.tar \
        --out models/gill-opt-6.7b

Reads the torch files with weights_only=True on the CPU (no GPU needed, even for the decision model whose
tensors are tagged cuda:0), checks every key and shape strictly, and writes config.json,
gill.safetensors and decision.safetensors, keeping the original dtypes (bf16).
"""

from __future__ import annotations

import argparse
import sys

from gill import CheckpointError, ConfigError, convert_original, read_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-args", required=True, help="the original model_args.json")
    parser.add_argument("--checkpoint", required=True, help="the original pretrained_ckpt.pth.tar")
    parser.add_argument("--decision", default=None, help="the original decision_model.pth.tar (optional)")
    parser.add_argument("--out", required=True, help="model directory to write")
    args = parser.parse_args(argv)
    try:
        out = convert_original(args.model_args, args.checkpoint, args.out, decision=args.decision)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = read_model_dir(out)
    n = sum(t.numel() for t in files.adapter.values())
    print(f"wrote {out}: {len(files.adapter)} tensors, {n:,} parameters"
          + (", with decision head" if files.decision is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
