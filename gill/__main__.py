"""Command line: ``python -m gill {demo,convert,info,generate}``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (its ``generate`` subcommand's parser is ``.generate``). Numbers out of range
    and an --out that is a file are refused when the command line is parsed, naming the flag."""
    from gill.arguments import MAX_SEED, float_in, int_in, out_dir_arg, seed_arg
    from gill.decision import POLICIES
    from gill.settings import LIBRARY_DEFAULTS, add_run_arguments

    parser = argparse.ArgumentParser(prog="python -m gill", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and reload a tiny GILL on synthetic data (offline, CPU)")
    demo.add_argument("--steps", type=int_in(1), default=60, help="optimizer steps")
    demo.add_argument("--out", type=out_dir_arg(), default=None, help="model directory to write (default: a temporary one)")
    demo.add_argument("--lm", choices=["opt", "llama"], default="opt", help="tiny LM family")
    demo.add_argument("--seed", type=seed_arg(), default=0, help=f"0-{MAX_SEED}")

    conv = sub.add_parser("convert", help="convert the original release's files into a model directory")
    conv.add_argument("--model-args", required=True, help="original model_args.json")
    conv.add_argument("--checkpoint", required=True, help="original pretrained_ckpt.pth.tar")
    conv.add_argument("--decision", default=None, help="original decision_model.pth.tar (optional)")
    conv.add_argument("--out", type=out_dir_arg(), required=True, help="model directory to write")

    info = sub.add_parser("info", help="print a model directory's config and weight counts")
    info.add_argument("model_dir")

    gen = sub.add_parser("generate", help="answer interleaved text and images with text and images",
                         description="Texts and --image files are read in the order given, e.g. "
                                     "'python -m gill generate --model DIR \"a photo of\" --image a.png \"and?\"'.")
    gen.add_argument("items", nargs="*", help="text segments (in order with the --image options)")
    gen.add_argument("--image", action="append", default=[], help="an image file (repeatable, keeps its position)")
    gen.add_argument("--out", type=out_dir_arg(), default="gill-output", help="folder for the answer's images")
    gen.add_argument("--policy", choices=list(POLICIES), default="auto",
                     help="auto: the model's decision head; edit: redraw the picture to edit (default: auto)")
    gen.add_argument("--edit-source", default=None, metavar="PATH",
                     help="the picture an edit starts from (default: the last --image, else the best retrieved one)")
    gen.add_argument("--top-k", type=int_in(0), default=0, help=">= 0; 0 keeps every token")
    group = add_run_arguments(gen, verbose=False)  # --model, --index, --device, --dtype and the run settings
    group.add_argument("--edit-strength", dest="edit_strength", type=float_in(0, 1, above=True), default=None,
                       help="an edit's image-to-image strength, in (0, 1]: the share of the diffusion schedule "
                            f"redrawn (library: {LIBRARY_DEFAULTS.edit_strength:g})")

    parser.generate = gen
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    gen = parser.generate
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)  # texts after an --image option come back as extra
    if extra and (args.command != "generate" or any(e.startswith("--") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "generate":
        # the items follow the command word (global options such as --verbose may come before it)
        args.ordered = _ordered_items(argv[argv.index("generate") + 1:], parser_options(gen))
    from gill.quiet import quiet

    quiet(args.verbose)
    from gill.checkpoint import CheckpointError
    from gill.config import ConfigError

    try:
        return _run(args)
    except (CheckpointError, ConfigError, OSError, ValueError) as e:  # OSError: FileNotFoundError, a full disk...
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
    if args.command == "generate":
        return _generate(args)
    return 2


def parser_options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Option string -> whether it takes a value."""
    return {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}


def _ordered_items(argv: list[str], options: dict[str, bool]) -> list[tuple[str, str]]:
    """("text"|"image", value) in command-line order."""
    items, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if name in options:
            if options[name] and not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if name == "--image":
                items.append(("image", value))
        else:
            items.append(("text", tok))
        i += 1
    return items


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gill.images import open_image
    from gill.pipeline import GILL, EditSource, Text
    from gill.settings import load_kwargs, settings_from_args

    inputs = [Path(v) if kind == "image" else v for kind, v in args.ordered]
    if not inputs:
        print("error: give at least one text or --image", file=sys.stderr)
        return 2
    source = None
    if args.edit_source is not None:  # opened before the model loads: a bad file is said at once
        source = EditSource(open_image(args.edit_source, name=f"--edit-source {args.edit_source}"),
                            place=f"--edit-source {args.edit_source}")
    gill = GILL.from_pretrained(args.model, **load_kwargs(args))
    if gill.retriever is not None and len(gill.retriever) == 0:  # an empty index: said, not a vanished image
        where = args.index or f"{args.model}'s own corpus"
        if args.policy == "retrieve":
            print(f"error: the retrieval index {where} is empty: --policy retrieve has no image to retrieve",
                  file=sys.stderr)
            return 1
        print(f"warning: the retrieval index {where} is empty: no image will be retrieved", file=sys.stderr)
    answer = gill.generate_interleaved(inputs, policy=args.policy, settings=settings_from_args(args), top_k=args.top_k,
                                       edit_source=source)
    out = Path(args.out)
    n = 0
    for segment in answer:
        if isinstance(segment, Text):
            print(segment.text)
            continue
        d = segment.decision
        probs = " ".join(f"p_{k}={v:.3f}" for k, v in d.probabilities.items()) or "no classifier"
        if segment.image is None:
            print(f"[retrieved image {segment.source} could not be loaded; {probs}]")
            continue
        n += 1
        out.mkdir(parents=True, exist_ok=True)
        kind = image_kind(segment)
        path = out / f"{n:02d}-{kind}.png"
        segment.image.save(path)
        print(f"[{kind} image {path}{provenance(segment)}; policy {d.policy}, chose {d.choice}, {probs}]")
    return 0


def image_kind(segment) -> str:
    """"generated", "retrieved" or "edited": how an image segment is named in the output and its file."""
    return {"GeneratedImage": "generated", "RetrievedImage": "retrieved", "EditedImage": "edited"}[type(segment).__name__]


def provenance(segment) -> str:
    """Where an image came from, as the command prints it after its path."""
    kind = image_kind(segment)
    if kind == "retrieved":
        return f" from {segment.source} ({segment.caption!r}, score {segment.score:.2f})"
    if kind == "edited":
        return f" from {segment.source.describe()}, strength {segment.strength:.2f}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
