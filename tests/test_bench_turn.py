"""scripts/bench_turn.py on CPU at small sizes: both ways of a turn produce the same text and time every
stage they run (the speed itself is the benchmark's to report, not a test's)."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_a_turn_ours_and_the_originals_way_agree_and_time_their_stages():
    import bench_turn

    args = argparse.Namespace(device="cpu", prompt_len=24, new_tokens=6, steps=2)
    stack = bench_turn.build("small", "cpu", torch.float32, torch.float32, index_size=500)
    clocks = {name: bench_turn.Clock("cpu") for name in ("ours-gen", "ours-ret", "original")}
    ours = bench_turn.turn(stack, 2, args, original=False, generate=True, clock=clocks["ours-gen"])
    bench_turn.turn(stack, 2, args, original=False, generate=False, clock=clocks["ours-ret"])
    original = bench_turn.turn(stack, 2, args, original=True, generate=True, clock=clocks["original"])
    assert ours == original and len(ours) == 6  # cached and uncached decoding give the same greedy tokens
    assert set(clocks["ours-gen"].times) == {"vision", "prefill+decode", "image slot", "heads", "retrieval", "diffusion", "vae"}
    assert "diffusion" not in clocks["ours-ret"].times  # a retrieved image runs no diffusion
    assert {"decode", "diffusion", "clip re-rank"} <= set(clocks["original"].times)
    assert all(t > 0 for c in clocks.values() for t in c.times.values())
