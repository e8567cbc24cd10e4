"""python -m training.toy --out DIR [--small] [--seed N] [--stages ...] [--jobs N] [--install]

Stages (each skipped when its output exists, so a killed build resumes): data, lm, clip, metric, sd, gill,
eval, report. See training/toy/__init__.py. With --jobs 2 (the default where there are two cores or more)
stages that need only what is done run side by side, each as its own process with its share of the cores
(the LM beside the CLIP towers, GILL beside the diffusion model): these models are too small for two
threads to run one of them twice as fast, so two at once finish sooner."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

from training.toy.plan import ROOT, SMALL, Plan, log

STAGES = ("data", "lm", "clip", "metric", "sd", "gill", "eval", "report")
NEEDS = {"data": (), "lm": ("data",), "clip": ("data",), "metric": ("data",), "sd": ("clip",), "gill": ("lm", "clip"),
         "eval": ("gill", "sd", "metric"), "report": ("eval",)}
BACKBONE_STAGES = ("lm", "clip", "metric", "sd")
ORDER = ("data", "lm", "clip", "gill", "sd", "metric", "eval", "report")  # which ready stage starts first


def stage(name: str):
    from training.toy import backbones, data, gill_stage, report

    return {"data": data.stage_data, "lm": backbones.stage_lm, "clip": backbones.stage_clip,
            "metric": backbones.stage_metric, "sd": backbones.stage_sd, "gill": gill_stage.stage_gill,
            "eval": gill_stage.stage_eval, "report": report.stage_report}[name]


def _ancestors(name: str) -> set[str]:
    """The stages ``name`` waits for, directly or through others."""
    out = set(NEEDS[name])
    for n in NEEDS[name]:
        out |= _ancestors(n)
    return out


def run_side_by_side(names: list[str], jobs: int, child_args: list[str]) -> None:
    """Run ``names`` as child processes (``python -m training.toy ... --stages NAME --jobs 1``), up to
    ``jobs`` at once, each as soon as the stages it needs are done; a failed stage stops the others."""
    done = {n for n in STAGES if n not in names}  # not asked for: taken as done (their outputs exist)
    pending, running = [n for n in ORDER if n in names], {}
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    while pending or running:
        for name in [n for n in pending if _ancestors(n) <= done]:  # (through stages not asked for too)
            if len(running) >= jobs:
                break
            # all the cores where nothing can run beside it (every other stage left waits for it)
            alone = not running and all(name in _ancestors(other) for other in pending if other != name)
            env = dict(os.environ) if alone else {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            log(f"stage {name} started" + ("" if alone else f" ({threads} thread(s))"))
            cmd = [sys.executable, "-m", "training.toy", *child_args, "--stages", name, "--jobs", "1"]
            running[name] = subprocess.Popen(cmd, cwd=ROOT, env=env)
            pending.remove(name)
        time.sleep(0.5)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                for other in running.values():
                    other.terminate()
                raise SystemExit(f"error: the toy build's {name} stage failed (exit {proc.returncode}); "
                                 "rerun the same command to resume from the stages already done")
            done.add(name)


def main(argv: list[str] | None = None) -> int:
    from gill.arguments import int_in, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="the reduced build (minutes)")
    p.add_argument("--seed", type=seed_arg(), default=0)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--install", action="store_true",
                   help="afterwards copy the model and the metric model into gill/assets (the toy preset)")
    p.add_argument("--gill-steps", type=int_in(1), default=None, help="override the plan's GILL training steps")
    p.add_argument("--mapper-steps", type=int_in(0), default=None,
                   help="then refit the mapper alone, afresh, on GILL's final [IMG] states for this many steps "
                        "(default 0: not; training.train --train-only mapper --reinit mapper)")
    p.add_argument("--backbones", default=None, metavar="toy|BUILD",
                   help="reuse the frozen backbones (LM, CLIP, diffusion, metric model) of the shipped toy model "
                        "('toy') or of an earlier build's output folder, and train only GILL on them")
    p.add_argument("--retrain", nargs="+", default=[], choices=("lm",),
                   help="with --backbones: train these backbones anew all the same (lm: the LM, on its tokenizer)")
    p.add_argument("--jobs", type=int, default=2 if (os.cpu_count() or 1) >= 2 else 1, choices=(1, 2),
                   help="stages run side by side (default: 2 on two cores or more; 1: one after another)")
    args = p.parse_args(argv)
    out = Path(args.out)
    plan = dataclasses.replace(SMALL if args.small else Plan())
    if args.gill_steps is not None:
        plan.gill_steps = args.gill_steps
    if args.mapper_steps is not None:
        plan.mapper_steps = args.mapper_steps
    start = time.time()
    if args.backbones is not None:
        from training.toy.backbones import reuse_backbones

        try:
            reuse_backbones(out, args.backbones, retrain=tuple(args.retrain))
        except FileNotFoundError as e:
            p.error(str(e))
    names = [n for n in STAGES if n in args.stages]
    if args.backbones is not None:  # reused: nothing to train, and GILL then gets every core
        names = [n for n in names if n not in BACKBONE_STAGES or n in args.retrain]
    elif args.retrain:
        p.error("--retrain needs --backbones (without it every backbone is trained)")
    if args.jobs > 1 and len(names) > 1:
        child = ["--out", str(out), "--seed", str(args.seed), *(["--small"] if args.small else []),
                 *(["--gill-steps", str(args.gill_steps)] if args.gill_steps is not None else []),
                 *(["--mapper-steps", str(args.mapper_steps)] if args.mapper_steps is not None else [])]
        run_side_by_side(names, args.jobs, child)
    else:
        for name in names:
            t = time.time()
            stage(name)(out, plan, args.seed)
            log(f"stage {name} done in {time.time() - t:.0f} s")
    log(f"build done in {time.time() - start:.0f} s")
    if args.install:
        from training.toy.install import install

        reused = f" --backbones {args.backbones}" if args.backbones is not None else ""
        reused += f" --mapper-steps {args.mapper_steps}" if args.mapper_steps else ""
        install(out, plan, args.seed, f"python -m training.toy --out OUT --seed {args.seed}{reused} --install")
    return 0


if __name__ == "__main__":
    sys.exit(main())
