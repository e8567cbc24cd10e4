"""Stories per second of ``python -m gill.eval vist``: one process against ``torchrun --nproc-per-node N``,
in the same run, on a synthetic VIST-format fixture.

    python scripts/bench_eval.py                      # tiny-random on CPU, 1 vs 2 processes, 1 thread each
    python scripts/bench_eval.py --model DIR --device cuda --processes 8 --stories 400 --steps 50

Each process gets ``--threads`` CPU threads (OMP_NUM_THREADS), so on CPU the comparison is N cores against
one; on GPUs each process takes its own GPU (cuda:LOCAL_RANK). The time is the whole command's wall time
(model loading included), so use enough stories for the generation to dominate. The outputs of the two
runs are compared too: they must be identical (records byte for byte).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_fixture(root: Path, stories: int) -> tuple[Path, Path]:
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    annotations = []
    for s in range(stories):
        for n in range(5):
            pid = f"{s}-{n}"
            Image.new("RGB", (64, 48), ((37 * s) % 256, (91 * n) % 256, 128)).save(images / f"{pid}.png")
            text = f"story {s} step {n}: the picture is warm and bright ."
            annotations.append([{"story_id": str(s), "photo_flickr_id": pid, "worker_arranged_photo_order": n,
                                 "text": text, "original_text": text}])
    sis = root / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"annotations": annotations}))
    return sis, images


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--stories", type=int, default=48)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sis, images = write_fixture(tmp, args.stories)
        common = ["vist", "--model", args.model, "--annotations", str(sis), "--images", str(images),
                  "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--no-baseline",
                  "--settings", "gill/5-captions-4-images", "--no-score", *(["--device", args.device] if args.device else [])]
        one = timed([sys.executable, "-m", "gill.eval", *common, "--out", str(tmp / "one")], env)
        many = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                      str(args.processes), "-m", "gill.eval", *common, "--out", str(tmp / "many")], env)
        name = "gill/5-captions-4-images/records.jsonl"
        same = (tmp / "one" / name).read_bytes() == (tmp / "many" / name).read_bytes()
    n = args.stories
    print(f"model {args.model}, {n} stories, {args.steps} diffusion steps, batch {args.batch_size}, "
          f"{args.threads} thread(s) per process")
    print(f"1 process:   {one:7.1f} s  {n / one:6.2f} stories/s")
    print(f"{args.processes} processes: {many:7.1f} s  {n / many:6.2f} stories/s")
    print(f"speed-up {one / many:.2f}x; outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
