"""Command line: ``python -m gill {demo,convert,info}``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and reload a tiny GILL on synthetic data (offline, CPU)")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps")
    demo.add_argument("--out", default=None, help="model directory to write (default: a temporary one)")
    demo.add_argument("--lm", choices=["opt", "llama"], default="opt", help="tiny LM family")
    demo.add_argument("--seed", type=int, default=0)

    conv = sub.add_parser("convert", help="convert the original release's files into a model directory")
    conv.add_argument("--model-args", required=True, help="original model_args.json")
    conv.add_argument("--checkpoint", required=True, help="original pretrained_ckpt.pth.tar")
    conv.add_argument("--decision", default=None, help="original decision_model.pth.tar (optional)")
    conv.add_argument("--out", required=True, help="model directory to write")

    info = sub.add_parser("info", help="print a model directory's config and weight counts")
    info.add_argument("model_dir")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gill.checkpoint import CheckpointError
    from gill.config import ConfigError

    try:
        return _run(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:

    if args.command == "demo":
        from gill import demo as demo_mod

        r = demo_mod.run(steps=args.steps, out_dir=args.out, seed=args.seed, lm_kind=args.lm)
        print(f"loss: {r.losses[0]:.3f} -> {r.losses[-1]:.3f} over {len(r.losses)} steps")
        print(f"text->image recall@1 over {len(demo_mod.COLORS)} colours: {r.recall_before:.2f} -> {r.recall_after:.2f}")
        print(f"saved {r.model_dir}; reloaded model differs by at most {r.reload_max_diff:.2e}")
        return 0
    if args.command == "convert":
        from gill.checkpoint import convert_original

        out = convert_original(args.model_args, args.checkpoint, args.out, decision=args.decision)
        print(f"wrote {out}")
        return 0
    if args.command == "info":
        from gill.checkpoint import read_model_dir

        files = read_model_dir(args.model_dir)
        print(files.config.to_json(), end="")
        n = sum(t.numel() for t in files.adapter.values())
        print(f"adapter: {len(files.adapter)} tensors, {n:,} parameters")
        if files.decision is not None:
            print(f"decision head: {sum(t.numel() for t in files.decision.values()):,} parameters")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
