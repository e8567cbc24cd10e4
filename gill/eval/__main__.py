"""``python -m gill.eval vist|visdial|score``: GILL's evaluations, resumable, scored side by side with
plain Stable Diffusion on the same prompts.

    python -m gill.eval vist --model DIR --annotations sis/val.story-in-sequence.json --images vist_images --out eval/vist
    python -m gill.eval visdial --model DIR --dialogs visdial_1.0_val.json --images VisualDialog_val2018 --out eval/visdial
    python -m gill.eval score eval/vist --task vist        # re-score finished outputs (e.g. with another scorer)

Rerunning a command resumes it: finished examples are not recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gill.arguments import MAX_SEED, float_in, int_in, out_dir_arg
from gill.eval.protocol import PROTOCOLS
from gill.settings import MAX_STEPS, SCHEDULERS
MAX_ROUNDS = 10  # a VisDial dialog has 10 rounds

def vist_settings(protocol) -> dict:
    """Setting name -> (mode, the example's input). The 5-captions settings differ by protocol: each caption
    tokenised on its own (``segments``, as the original's 5 captions + 4 images prompt) or one string."""
    if protocol.five_captions == "segments":
        five = ("gill", lambda e: list(e.captions))
    else:
        five = ("gill", lambda e: [" ".join(e.captions)])
    return {
        "gill/1-caption": ("gill", lambda e: [e.captions[-1]]),
        "gill/5-captions": five,
        "gill/5-captions-4-images": ("gill", lambda e: [x for c, i in zip(e.captions, e.context_images + [None])
                                                        for x in (c, i) if x is not None]),
        "sd/1-caption": ("sd", lambda e: e.captions[-1]),
        "sd/5-captions": ("sd", lambda e: " ".join(e.captions)),
    }


def visdial_settings(rounds: list[int]) -> dict:
    """The first N rounds as one text (``Q: ...?`` / ``A: ...`` lines joined by newlines), for GILL and plain
    SD. The original scripted all 10 rounds only; 1 and 5 follow it with fewer rounds."""
    out = {}
    for r in rounds:
        label = f"{r}-round" + ("s" if r > 1 else "")
        out[f"gill/{label}"] = ("gill", lambda e, r=r: ["\n".join(e.captions[: 2 * r])])
        out[f"sd/{label}"] = ("sd", lambda e, r=r: "\n".join(e.captions[: 2 * r]))
    return out


def settings_for(gill, args: argparse.Namespace):
    """The evaluation's run settings: its flags > the model's settings (the toy's own metric model as
    scorer, for instance) > the library's defaults (CLIP ViT-L/14 as the paper, seed 42 as the original)."""
    return gill.run_settings({"steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
                              "scorer": args.scorer, "scheduler": getattr(args, "scheduler", None)})


def scorer_spec(text: str) -> str:
    """``hf:NAME_OR_PATH`` or ``open_clip:MODEL/PRETRAINED``, checked before any image is generated."""
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("hf", "open_clip") or not name:
        raise argparse.ArgumentTypeError(f"must be 'hf:NAME_OR_PATH' or 'open_clip:MODEL/PRETRAINED', got {text!r}")
    return text


def common(p: argparse.ArgumentParser) -> None:
    from gill.presets import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory or preset (default: {DEFAULT_MODEL})")
    p.add_argument("--images", required=True, help="folder of the dataset's images")
    p.add_argument("--out", type=out_dir_arg(), required=True, help="output folder (made if missing; a rerun resumes it)")
    p.add_argument("--settings", nargs="+", default=None, help="subset of settings (default: all)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain Stable Diffusion settings")
    p.add_argument("--limit", type=int_in(1), default=None, help="first N (usable) examples only")
    own = "default: the model's run settings, else the library's"
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=None, help=f"diffusion steps, 1-{MAX_STEPS} ({own}: 50)")
    p.add_argument("--guidance", type=float_in(0), default=None, help=f"classifier-free guidance, >= 0 ({own}: 7.5)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, help=f"diffusion scheduler ({own}: the pipeline's)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=None,
                   help=f"base seed, 0-{MAX_SEED} ({own}: 42, as the original)")
    p.add_argument("--batch-size", type=int_in(1), default=8, help="examples per forward (default: 8)")
    p.add_argument("--scorer", type=scorer_spec, default=None, help="hf:NAME_OR_PATH or open_clip:MODEL/PRETRAINED (default: the "
                   "model's run settings, e.g. the toy world's own metric model; else CLIP ViT-L/14 as the paper)")
    p.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package)")
    p.add_argument("--no-score", action="store_true",
                   help="generate only; score later with 'python -m gill.eval score OUT --task TASK'")
    p.add_argument("--device", default=None, help="e.g. cuda; under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="original",
                   help="original (default): the released scripts' way, quirks included, to compare with the paper; "
                        "clean: per-example seeds, no squashing, one output per example (gill/eval/README.md)")
    p.add_argument("--truncate", action="store_true",
                   help="a prompt longer than the LM's positions keeps its end (recorded) instead of being skipped")
    p.add_argument("--compare-with", choices=["auto", "paper", "chance"], default="auto",
                   help="what the report sets beside the scores: the paper's numbers (real datasets) or chance and "
                        "the baselines (the toy world, random models); auto: chance for the presets toy and tiny-random")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gill.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    vist = sub.add_parser("vist", help="VIST contextual generation and retrieval")
    vist.add_argument("--annotations", required=True, help="SIS annotations, e.g. sis/val.story-in-sequence.json")
    vist.add_argument("--caption-field", default=None,
                      help="annotation field read for captions (default: the protocol's: original 'text', clean 'original_text')")
    vist.add_argument("--allow-outside-root", action="store_true",
                      help="read image ids that point outside --images ('../x', '/abs/path', symlinks out); "
                           "by default such stories are skipped and counted")
    common(vist)
    visdial = sub.add_parser("visdial", help="VisDial generation after 1, 5, 10 rounds")
    visdial.add_argument("--dialogs", required=True, help="visdial_1.0_val.json")
    visdial.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), nargs="+", default=[1, 5, 10],
                         help=f"dialogue rounds before the image, each 1-{MAX_ROUNDS} (default: 1 5 10)")
    common(visdial)
    rescore = sub.add_parser("score", help="re-score a finished output directory")
    rescore.add_argument("out", type=out_dir_arg(), help="a finished output folder")
    rescore.add_argument("--task", choices=["vist", "visdial"], required=True)
    rescore.add_argument("--scorer", type=scorer_spec, default=None)
    rescore.add_argument("--lpips", action="store_true")
    rescore.add_argument("--device", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gill._quiet import quiet

    quiet(args.verbose)
    try:
        return run(args)
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, a full disk...
        print(f"error: {e}", file=sys.stderr)
        return 1


# what makes an earlier run's outputs in OUT reusable: the same model, protocol and generation settings
RESUME_KEYS = ("task", "model", "seed", "steps", "guidance", "scheduler")
RESUME_RUN_KEYS = ("truncate", "caption_field", "dtype")


def check_resumable(path: Path, state: dict) -> None:
    """Refuse to resume into an output folder made with other settings (its finished examples would be
    mixed with new ones), naming what differs; the scorer, batch size, limit and process count may change."""
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # an unreadable run.json is rewritten
    if not isinstance(before, dict):
        return
    changed = [f"{k}: {before.get(k)!r} -> {state[k]!r}" for k in RESUME_KEYS if k in before and before[k] != state[k]]
    was, now = before.get("protocol", {}), state["protocol"]
    if isinstance(was, dict) and was and was != now:
        changed.append(f"protocol: {was.get('name')!r} -> {now['name']!r}")
    was_run = before.get("run", {}) if isinstance(before.get("run"), dict) else {}
    changed += [f"{k}: {was_run[k]!r} -> {state['run'][k]!r}" for k in RESUME_RUN_KEYS
                if k in was_run and was_run[k] != state["run"][k]]
    if changed:
        raise ValueError(f"{path.parent} holds a run made with other settings ({'; '.join(changed)}); its outputs "
                         "cannot be resumed with these: give another --out, or the same settings")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` (``FileNotFoundError``) naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (not {what} file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as {what} file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def check_inputs(args: argparse.Namespace) -> None:
    """The dataset's files and folder, checked before anything loads, naming the flag."""
    images = Path(args.images)
    if not images.is_dir():
        raise ValueError(f"--images {args.images}: {'a file, not a folder' if images.exists() else 'no such folder'}; "
                         "give the folder of the dataset's images")
    flag, path = ("--annotations", args.annotations) if args.command == "vist" else ("--dialogs", args.dialogs)
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: {'a folder, not a file' if Path(path).is_dir() else 'no such file'}")


def compare_with(args: argparse.Namespace) -> str:
    """``paper`` for a real model (a directory or Hub id, the release), ``chance`` for the toy world and
    random models, whose numbers say nothing next to the paper's."""
    from gill.presets import find_preset

    if args.compare_with != "auto":
        return args.compare_with
    preset = find_preset(args.model)
    return "chance" if preset is not None and preset.kind in ("package", "random") else "paper"


def run(args: argparse.Namespace) -> int:
    from gill.eval.shard import finish, from_env, init

    shard = from_env()
    init(shard, args.device if args.command != "score" else None)
    try:
        return _run(args, shard)
    finally:
        finish(shard)


def _run(args: argparse.Namespace, shard) -> int:
    import torch

    from gill._io import atomic_write_text
    from gill.eval.data import skip_counts
    from gill.eval.report import write_report
    from gill.eval.runner import Setting, merge_setting, run_setting, score
    from gill.eval.scorer import ClipScorer, LpipsScorer
    from gill.eval.shard import barrier

    out = Path(args.out)
    if args.command == "score":
        state = read_json_object(out / "run.json", "a finished output folder's run")
        recorded = state.get("protocol") if isinstance(state.get("protocol"), dict) else {}
        name = recorded.get("name", "clean")
        if name not in PROTOCOLS:
            raise ValueError(f"{out / 'run.json'}: protocol {name!r} is none of {sorted(PROTOCOLS)}")
        protocol = PROTOCOLS[name]
        if not (args.scorer or state.get("scorer")):
            raise ValueError(f"{out / 'run.json'} names no scorer; give --scorer")
        scorer = ClipScorer(args.scorer or state["scorer"], args.device)
        summary = read_json_object(out / "summary.json", "summary") if (out / "summary.json").is_file() else {}
        if "retrieval" not in summary and (out / "retrieval.json").is_file():
            summary["retrieval"] = read_json_object(out / "retrieval.json", "retrieval")
        score(out, scorer, lpips=LpipsScorer(args.device) if args.lpips else None, retrieval=summary.get("retrieval"),
              prepare_target=protocol.prepare_vist_image() if args.task == "vist" else None, protocol=protocol,
              extra={k: state[k] for k in ("model", "skipped", "context_dir", "protocol", "run", "compare_with")
                     if k in state})
        print(write_report(out, args.task))
        return 0

    from gill.diffusion import DiffusionOptions
    from gill.eval.data import load_visdial, load_vist
    from gill.eval.seeds import PerExampleSeeds, SeedStream, pipeline_latent_shape
    from gill.pipeline import GILL

    check_inputs(args)
    protocol = PROTOCOLS[args.protocol]
    args.task = args.command
    prepare = None
    if args.task == "vist":
        args.caption_field = args.caption_field or protocol.caption_field
        dataset = load_vist(args.annotations, args.images, args.caption_field,
                            allow_outside_root=args.allow_outside_root, story_order=protocol.story_order,
                            whole_gallery=protocol.retrieval == "fromage")
        table = vist_settings(protocol)
        prepare = protocol.prepare_vist_image()
    else:
        dataset = load_visdial(args.dialogs, args.images, lines=protocol.visdial_lines)
        table = visdial_settings(args.rounds)
    if args.limit is not None:
        dataset.examples = dataset.examples[: args.limit]
    names = args.settings or [n for n in table if not (args.no_baseline and n.startswith("sd/"))]
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {list(table)}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    gill = GILL.from_pretrained(args.model, torch_dtype=dtype, device=shard.device(args.device))
    if gill.diffusion is None:
        raise ValueError(f"model {args.model} has no diffusion pipeline: evaluation generates images")
    settings = settings_for(gill, args)
    args.steps, args.guidance, args.seed, args.scorer = settings.steps, settings.guidance_scale, settings.seed, settings.scorer
    out.mkdir(parents=True, exist_ok=True)
    pipe = gill.diffusion.pipe
    run_info = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "scheduler": settings.scheduler,
                "scorer": args.scorer, "batch_size": args.batch_size, "truncate": args.truncate,
                "caption_field": getattr(args, "caption_field", None), "limit": args.limit, "processes": shard.world,
                "dtype": args.dtype, "rounds": getattr(args, "rounds", None)}
    state = {"task": args.task, "model": str(args.model), "scorer": args.scorer, "seed": args.seed, "steps": args.steps,
             "guidance": args.guidance, "scheduler": settings.scheduler, "settings": names, "skipped": dataset.skipped,
             "context_dir": str(Path(args.images).resolve()), "protocol": protocol.as_dict(), "run": run_info,
             "compare_with": compare_with(args)}
    check_resumable(out / "run.json", state)
    if shard.is_main:
        atomic_write_text(out / "run.json", json.dumps(state, indent=2, ensure_ascii=False) + "\n")
    per_target = protocol.outputs == "per-target" and args.task == "vist"
    if shard.is_main:
        from gill.eval.runner import output_owners

        outputs = len({o.id for o in output_owners(dataset.examples).values()}) if per_target else len(dataset.examples)
        print(f"{len(dataset.examples)} examples ({len(dataset.skipped)} skipped), {outputs} outputs per setting"
              + (" (one per ground-truth image: the original protocol)" if per_target else "")
              + f", protocol {protocol.name}, {shard.world} process(es)")
    scorer = lpips = None
    if shard.is_main and not args.no_score:  # a scorer that cannot be loaded fails now, not after generating
        scorer = ClipScorer(args.scorer, args.device)
        lpips = LpipsScorer(args.device) if args.lpips else None
    options = DiffusionOptions(steps=args.steps, guidance_scale=args.guidance, scheduler=settings.scheduler)
    counts = {}
    for name in names:
        mode, build = table[name]
        if protocol.seeds == "stream":  # a fresh stream per setting: the original ran one script per setting
            param = next(pipe.unet.parameters())
            noise = SeedStream(args.seed, pipeline_latent_shape(pipe), device=param.device, dtype=param.dtype)
        else:
            noise = PerExampleSeeds(args.seed)
        setting = Setting(name, mode, build)
        counts[name] = run_setting(gill, dataset, setting, out, diffusion=options, batch_size=args.batch_size,
                                   seed=args.seed, noise=noise, truncate=args.truncate, shard=shard,
                                   one_output_per_target=per_target, prepare=prepare)
        barrier(shard)
        if shard.is_main:
            merged = merge_setting(dataset, setting, out, one_output_per_target=per_target)
            counts[name]["skipped"] = merged["skipped"]
        c = counts[name]
        if shard.is_main:
            print(f"{name}: {c['computed']} generated" + (f" here ({shard.world} processes)" if shard.world > 1 else "")
                  + f", {c['reused']} already done"
                  + (f", {len(c['skipped'])} skipped ({', '.join(f'{n} {k}' for k, n in skip_counts(c['skipped']).items())})"
                     if c["skipped"] else ""))
    if not shard.is_main:
        return 0
    retrieval = None
    if args.task == "vist":
        from gill.eval.runner import vist_retrieval

        retrieval = vist_retrieval(gill, dataset, out, [n for n in names if n.startswith("gill/")],
                                   protocol=protocol, builds={n: table[n][1] for n in names}, prepare=prepare,
                                   truncate=args.truncate)
        atomic_write_text(out / "retrieval.json", json.dumps(retrieval, indent=1, ensure_ascii=False) + "\n")
    if args.no_score:
        print(f"generated; score with: python -m gill.eval score {out} --task {args.task}")
        return 0
    summary = score(out, scorer, lpips=lpips, retrieval=retrieval, prepare_target=prepare, protocol=protocol,
                    extra={"model": str(args.model), "skipped": dataset.skipped, "runs": counts,
                           "context_dir": state["context_dir"], "protocol": protocol.as_dict(), "run": run_info,
                           "compare_with": state["compare_with"]})
    for name, s in summary["settings"].items():
        ci = "" if s["clip_similarity_ci95"] is None else f" +- {s['clip_similarity_ci95']:.4f}"
        sim = "-" if s["clip_similarity"] is None else f"{s['clip_similarity']:.4f}"
        print(f"{name:28s} n={s['n']:5d}  CLIP similarity {sim}{ci}"
              + (f"  ({len(s['skipped'])} not scored)" if s.get("skipped") else ""))
    if dataset.skipped:
        by_kind = ", ".join(f"{n} {kind}" for kind, n in skip_counts(dataset.skipped).items())
        print(f"skipped {len(dataset.skipped)} example(s) ({by_kind}): see {out / 'summary.json'}")
    print(write_report(out, args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
