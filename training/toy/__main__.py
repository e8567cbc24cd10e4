"""python -m training.toy --out DIR [--small] [--seed N] [--stages ...] [--install]

Stages (each skipped when its output exists, so a killed build resumes): data, lm, clip, sd, gill, eval,
report. See training/toy/__init__.py."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from training.toy.plan import SMALL, Plan, log

STAGES = ("data", "lm", "clip", "sd", "gill", "eval", "report")


def stage(name: str):
    from training.toy import backbones, data, gill_stage, report

    return {"data": data.stage_data, "lm": backbones.stage_lm, "clip": backbones.stage_clip, "sd": backbones.stage_sd,
            "gill": gill_stage.stage_gill, "eval": gill_stage.stage_eval, "report": report.stage_report}[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="the reduced build (minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--install", action="store_true",
                   help="afterwards copy the model and the metric model into gill/assets (the toy preset)")
    p.add_argument("--gill-steps", type=int, default=None, help="override the plan's GILL training steps")
    p.add_argument("--backbones", default=None, metavar="toy|BUILD",
                   help="reuse the frozen backbones (LM, CLIP, diffusion, metric model) of the shipped toy model "
                        "('toy') or of an earlier build's output folder, and train only GILL on them")
    args = p.parse_args(argv)
    out = Path(args.out)
    plan = dataclasses.replace(SMALL if args.small else Plan())
    if args.gill_steps is not None:
        plan.gill_steps = args.gill_steps
    start = time.time()
    if args.backbones is not None:
        from training.toy.backbones import reuse_backbones

        try:
            reuse_backbones(out, args.backbones)
        except FileNotFoundError as e:
            p.error(str(e))
    for name in args.stages:
        t = time.time()
        stage(name)(out, plan, args.seed)
        log(f"stage {name} done in {time.time() - t:.0f} s")
    log(f"build done in {time.time() - start:.0f} s")
    if args.install:
        from training.toy.install import install

        install(out, plan, args.seed, f"python -m training.toy --out OUT --seed {args.seed} --install")
    return 0


if __name__ == "__main__":
    sys.exit(main())
