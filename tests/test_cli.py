import subprocess
import sys
from pathlib import Path

import pytest

from gill import demo

from test_checkpoint import write_original_release

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_learns_and_reloads(tmp_path):
    r = demo.run(steps=60, out_dir=tmp_path / "demo", seed=0)
    chance = 1 / len(demo.COLORS)
    assert r.recall_before <= 2 * chance
    assert r.recall_after >= 0.75  # far above chance (0.125)
    assert sum(r.losses[-5:]) / 5 < 0.8 * sum(r.losses[:5]) / 5
    assert r.reload_max_diff < 1e-5
    assert (tmp_path / "demo" / "gill.safetensors").is_file()


def test_convert_script_end_to_end(tmp_path, tiny_opt, shared_data):
    backbones, config = tiny_opt
    write_original_release(tmp_path, backbones, config)
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_original_checkpoint.py"),
           "--model-args", str(tmp_path / "model_args.json"), "--checkpoint", str(tmp_path / "pretrained_ckpt.pth.tar"),
           "--out", str(tmp_path / "out")]
    # The real decision head is 4096-wide, the tiny LM 32: the strict check must name the mismatch.
    bad = subprocess.run(cmd + ["--decision", str(shared_data / "decision_model.pth.tar")], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "mis-shaped:  linear.weight: checkpoint has [2, 4096], model expects [2, 32]" in bad.stderr
    ok = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "tensors" in ok.stdout and (tmp_path / "out" / "config.json").is_file()
    info = subprocess.run([sys.executable, "-m", "gill", "info", str(tmp_path / "out")], capture_output=True, text=True, check=True, cwd=ROOT)
    assert '"num_encoder_layers": 2' in info.stdout
