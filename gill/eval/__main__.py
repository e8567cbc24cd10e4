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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gill.arguments import DTYPES, MAX_SEED, int_in, out_dir_arg
from gill.eval.protocol import PROTOCOLS, Protocol
from gill.settings import add_run_arguments, scorer_spec, settings_for  # settings_for: the one resolver, re-exported

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


def common(p: argparse.ArgumentParser) -> None:
    """A task's flags: the dataset, the output, and the front ends' shared group (``--model``, ``--device``,
    ``--dtype`` and one flag per run setting the evaluation uses, named as its field: ``--steps``,
    ``--guidance-scale``, ``--scheduler``, ``--seed``, ``--scorer``). The evaluation draws every image at
    once from the [IMG] slot (no decoding), so the decoder's settings are not among its flags."""
    helps = {"device": "e.g. cuda; under torchrun each process takes cuda:LOCAL_RANK (default: cpu)",
             "dtype": "the LM, vision encoder and mapper (default: original protocol bfloat16, as the original "
                      "ran them; clean: as stored)",
             "seed": f"base seed, 0-{MAX_SEED} (library: 42, as the original): the original protocol's one noise "
                     "stream, the clean protocol's per-example seeds",
             "scorer": "hf:NAME_OR_PATH or open_clip:MODEL/PRETRAINED (default: the model's run settings, e.g. the "
                       "toy world's own metric model; else CLIP ViT-L/14 as the paper)"}
    add_run_arguments(p, index=False, verbose=False, scorer=True, decoding=False, helps=helps)
    p.add_argument("--images", required=True, help="folder of the dataset's images")
    p.add_argument("--out", type=out_dir_arg(), required=True, help="output folder (made if missing; a rerun resumes it)")
    p.add_argument("--settings", nargs="+", default=None, help="subset of settings (default: all)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain Stable Diffusion settings")
    p.add_argument("--limit", type=int_in(1), default=None, help="first N (usable) examples only")
    p.add_argument("--batch-size", type=int_in(1), default=8, help="examples per forward (default: 8)")
    p.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package)")
    p.add_argument("--no-score", action="store_true",
                   help="generate only; score later with 'python -m gill.eval score OUT --task TASK'")
    p.add_argument("--sd-dtype", choices=list(DTYPES), default=None,
                   help="Stable Diffusion (default: original protocol float16, as the original; clean: --dtype)")
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
    from gill.quiet import quiet

    quiet(args.verbose)
    try:
        return run(args)
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, a full disk...
        print(f"error: {e}", file=sys.stderr)
        return 1


# what makes an earlier run's outputs in OUT reusable: the same model, protocol and generation settings
RESUME_KEYS = ("task", "model", "seed", "steps", "guidance", "scheduler")
RESUME_RUN_KEYS = ("truncate", "caption_field", "dtype", "sd_dtype")


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
        if was.get("name") != now["name"]:
            changed.append(f"protocol: {was.get('name')!r} -> {now['name']!r}")
        else:  # the same protocol, as an earlier version of gill.eval wrote its rules
            rules = [f"{k}: {was.get(k, '(none)')!r} -> {now.get(k, '(none)')!r}" for k in sorted(set(was) | set(now))
                     if was.get(k) != now.get(k)]
            changed.append(f"protocol {now['name']!r}'s rules as recorded then ({', '.join(rules)})")
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


@dataclass
class Job:
    """What a generating run works on, read from its flags before the model loads."""

    args: argparse.Namespace
    shard: Any
    protocol: Protocol
    dataset: Any  # gill.eval.data.Dataset
    table: dict  # setting name -> (mode, build)
    names: list[str]  # the settings run
    prepare: Any  # the VIST images' transform (the original's squash), or None
    per_target: bool  # one output per ground-truth image (the original protocol, VIST)
    out: Path


def _run(args: argparse.Namespace, shard) -> int:
    if args.command == "score":
        return rescore(args)
    from gill.eval.report import write_report

    job = prepare_job(args, shard)
    gill = load_model(args, job.protocol, shard)
    state = write_state(job, gill)
    if shard.is_main:
        print(announce(job))
    scorer = lpips = None
    if shard.is_main and not args.no_score:  # a scorer that cannot be loaded fails now, not after generating
        scorer, lpips = load_scorers(args.scorer, args.device, job.protocol, lpips=args.lpips)
    counts = generate(job, gill)
    if not shard.is_main:
        return 0
    retrieval = None
    if args.task == "vist":
        from gill.io import atomic_write_text
        from gill.eval.retrieval import vist_retrieval

        retrieval = vist_retrieval(gill, job.dataset, job.out, [n for n in job.names if n.startswith("gill/")],
                                   protocol=job.protocol, builds={n: job.table[n][1] for n in job.names},
                                   prepare=job.prepare, truncate=args.truncate)
        atomic_write_text(job.out / "retrieval.json", json.dumps(retrieval, indent=1, ensure_ascii=False) + "\n")
    if args.no_score:
        print(f"generated; score with: python -m gill.eval score {job.out} --task {args.task}")
        return 0
    summary = score_run(job, state, scorer, lpips, retrieval, counts)
    print_summary(job, summary)
    print(write_report(job.out, args.task))
    return 0


def rescore(args: argparse.Namespace) -> int:
    """``python -m gill.eval score OUT``: score a finished folder again, with its recorded protocol."""
    from gill.eval.report import write_report
    from gill.eval.runner import score

    out = Path(args.out)
    state = read_json_object(out / "run.json", "a finished output folder's run")
    recorded = state.get("protocol") if isinstance(state.get("protocol"), dict) else {}
    name = recorded.get("name", "clean")
    if name not in PROTOCOLS:
        raise ValueError(f"{out / 'run.json'}: protocol {name!r} is none of {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if not (args.scorer or state.get("scorer")):
        raise ValueError(f"{out / 'run.json'} names no scorer; give --scorer")
    scorer, lpips = load_scorers(args.scorer or state["scorer"], args.device, protocol, lpips=args.lpips)
    summary = read_json_object(out / "summary.json", "summary") if (out / "summary.json").is_file() else {}
    if "retrieval" not in summary and (out / "retrieval.json").is_file():
        summary["retrieval"] = read_json_object(out / "retrieval.json", "retrieval")
    score(out, scorer, lpips=lpips, retrieval=summary.get("retrieval"),
          prepare_target=protocol.prepare_vist_image() if args.task == "vist" else None, protocol=protocol,
          extra={k: state[k] for k in ("model", "skipped", "context_dir", "protocol", "run", "compare_with")
                 if k in state})
    print(write_report(out, args.task))
    return 0


def prepare_job(args: argparse.Namespace, shard) -> Job:
    """The dataset (read and checked) and the settings to run, before any model loads."""
    from gill.eval.data import load_visdial, load_vist

    check_inputs(args)
    protocol = PROTOCOLS[args.protocol]
    args.task = args.command
    prepare = None
    if args.task == "vist":
        args.caption_field = args.caption_field or protocol.caption_field
        dataset = load_vist(args.annotations, args.images, args.caption_field,
                            allow_outside_root=args.allow_outside_root, story_order=protocol.story_order,
                            whole_gallery=protocol.retrieval == "fromage",
                            score_missing_context=protocol.missing_context == "scored")
        table = vist_settings(protocol)
        prepare = protocol.prepare_vist_image()
    else:
        dataset = load_visdial(args.dialogs, args.images, lines=protocol.visdial_lines)
        table = visdial_settings(args.rounds)
    if args.limit is not None:
        dataset.first(args.limit)
    names = args.settings or [n for n in table if not (args.no_baseline and n.startswith("sd/"))]
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {list(table)}")
    per_target = protocol.outputs == "per-target" and args.task == "vist"
    return Job(args, shard, protocol, dataset, table, names, prepare, per_target, Path(args.out))


def dtypes(args: argparse.Namespace, protocol: Protocol) -> tuple[str | None, str | None]:
    """(the LM, vision encoder and mapper's dtype, Stable Diffusion's): the flags, else the protocol's
    (original: bfloat16 and float16, as the original ran them), else Stable Diffusion follows ``--dtype``."""
    lm = args.dtype or protocol.lm_dtype
    return lm, args.sd_dtype or protocol.sd_dtype or lm


def load_model(args: argparse.Namespace, protocol: Protocol, shard):
    """GILL in the run's dtypes (``dtypes``; the mapper too, which loads as stored) on its device."""
    from gill.arguments import torch_dtype
    from gill.pipeline import GILL
    from gill.settings import load_kwargs

    args.dtype, args.sd_dtype = dtypes(args, protocol)
    lm, sd = torch_dtype(args.dtype), torch_dtype(args.sd_dtype)
    gill = GILL.from_pretrained(args.model, **{**load_kwargs(args), "diffusion_dtype": sd,
                                               "device": shard.device(args.device)})
    if gill.diffusion is None:
        raise ValueError(f"model {args.model} has no diffusion pipeline: evaluation generates images")
    if lm is not None:
        gill.model.to(lm)
    if sd is not None:
        gill.diffusion.pipe.to(dtype=sd)
    return gill


def write_state(job: Job, gill) -> dict:
    """The run's settings resolved once (flags > the model's > the library's: ``gill.settings.settings_for``)
    into ``job.args``, each under its field's name, checked against an earlier run in the same folder and
    written to ``run.json`` (its keys as earlier runs wrote them: ``guidance``); returns that state."""
    from gill.io import atomic_write_text
    from gill.run import DIFFUSION_SETTINGS

    args = job.args
    settings = settings_for(gill, args)
    for name in (*DIFFUSION_SETTINGS, "scorer"):
        setattr(args, name, getattr(settings, name))
    job.out.mkdir(parents=True, exist_ok=True)
    run_info = {"steps": args.steps, "guidance": args.guidance_scale, "seed": args.seed, "scheduler": args.scheduler,
                "scorer": args.scorer, "batch_size": args.batch_size, "truncate": args.truncate,
                "caption_field": getattr(args, "caption_field", None), "limit": args.limit,
                "processes": job.shard.world, "dtype": args.dtype, "sd_dtype": args.sd_dtype,
                "rounds": getattr(args, "rounds", None)}
    state = {"task": args.task, "model": str(args.model), "scorer": args.scorer, "seed": args.seed, "steps": args.steps,
             "guidance": args.guidance_scale, "scheduler": args.scheduler, "settings": job.names,
             "skipped": job.dataset.skipped, "context_dir": str(Path(args.images).resolve()),
             "protocol": job.protocol.as_dict(), "run": run_info, "compare_with": compare_with(args)}
    check_resumable(job.out / "run.json", state)
    if job.shard.is_main:
        atomic_write_text(job.out / "run.json", json.dumps(state, indent=2, ensure_ascii=False) + "\n")
    return state


def announce(job: Job) -> str:
    """What the run will do: examples, outputs per setting and the stories scored with another's output."""
    from gill.eval.runner import output_owners

    examples, d = job.dataset.examples, job.dataset
    outputs = len({o.id for o in output_owners(examples).values()}) if job.per_target else len(examples)
    shared = len(output_owners(examples, d.score_only)) - len(examples) if job.per_target else 0
    return (f"{len(examples)} examples ({len(d.skipped)} skipped), {outputs} outputs per setting"
            + (" (one per ground-truth image: the original protocol)" if job.per_target else "")
            + (f"; {len(examples) + shared} stories scored per setting, {shared} of them not generated for (a context "
               "image missing) but scored with the output of another story with the same last photo, as the "
               "original" if shared else "")
            + f", protocol {job.protocol.name}, dtypes {job.args.dtype or 'as stored'} (LM, vision, mapper) and "
            f"{job.args.sd_dtype or 'as stored'} (Stable Diffusion), {job.shard.world} process(es)")


def load_scorers(spec: str, device: str | None, protocol: Protocol, *, lpips: bool = False) -> tuple[Any, Any]:
    """(the CLIP scorer ``spec`` with the protocol's image processor, the LPIPS scorer or None)."""
    from gill.eval.scorer import ClipScorer, LpipsScorer

    return ClipScorer(spec, device, processor=protocol.clip_processor), (LpipsScorer(device) if lpips else None)


def generate(job: Job, gill) -> dict[str, dict]:
    """Every setting's missing outputs (this process's share), merged by rank 0; counts per setting."""
    from gill.diffusion import DiffusionOptions
    from gill.eval.data import skip_counts
    from gill.eval.runner import Setting, merge_setting, run_setting
    from gill.eval.seeds import PerExampleSeeds, SeedStream, pipeline_latent_shape
    from gill.eval.shard import barrier
    from gill.run import DIFFUSION_SETTINGS

    args, shard, pipe = job.args, job.shard, gill.diffusion.pipe
    # the resolved settings (write_state): the noise below seeds each image, from the base seed
    options = DiffusionOptions(**{name: getattr(args, name) for name in DIFFUSION_SETTINGS})
    counts = {}
    for name in job.names:
        if job.protocol.seeds == "stream":  # a fresh stream per setting: the original ran one script per setting
            param = next(pipe.unet.parameters())
            noise = SeedStream(args.seed, pipeline_latent_shape(pipe), device=param.device, dtype=param.dtype)
        else:
            noise = PerExampleSeeds(args.seed)
        setting = Setting(name, *job.table[name])
        counts[name] = c = run_setting(gill, job.dataset, setting, job.out, diffusion=options,
                                       batch_size=args.batch_size, seed=args.seed, noise=noise, truncate=args.truncate,
                                       shard=shard, one_output_per_target=job.per_target, prepare=job.prepare,
                                       sd_like_original=job.protocol.sd_long_prompts == "original")
        barrier(shard)
        if shard.is_main:
            c["skipped"] = merge_setting(job.dataset, setting, job.out, one_output_per_target=job.per_target)["skipped"]
            print(f"{name}: {c['computed']} generated" + (f" here ({shard.world} processes)" if shard.world > 1 else "")
                  + f", {c['reused']} already done"
                  + (f", {len(c['skipped'])} skipped ({', '.join(f'{n} {k}' for k, n in skip_counts(c['skipped']).items())})"
                     if c["skipped"] else ""))
    return counts


def score_run(job: Job, state: dict, scorer, lpips, retrieval: dict | None, counts: dict) -> dict:
    from gill.eval.runner import score

    return score(job.out, scorer, lpips=lpips, retrieval=retrieval, prepare_target=job.prepare, protocol=job.protocol,
                 extra={"model": str(job.args.model), "skipped": job.dataset.skipped, "runs": counts,
                        "context_dir": state["context_dir"], "protocol": job.protocol.as_dict(), "run": state["run"],
                        "compare_with": state["compare_with"]})


def print_summary(job: Job, summary: dict) -> None:
    from gill.eval.data import skip_counts

    for name, s in summary["settings"].items():
        ci = "" if s["clip_similarity_ci95"] is None else f" +- {s['clip_similarity_ci95']:.4f}"
        sim = "-" if s["clip_similarity"] is None else f"{s['clip_similarity']:.4f}"
        print(f"{name:28s} n={s['n']:5d}  CLIP similarity {sim}{ci}"
              + (f"  ({len(s['skipped'])} not scored)" if s.get("skipped") else ""))
    if job.dataset.skipped:
        by_kind = ", ".join(f"{n} {kind}" for kind, n in skip_counts(job.dataset.skipped).items())
        print(f"skipped {len(job.dataset.skipped)} example(s) ({by_kind}): see {job.out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
