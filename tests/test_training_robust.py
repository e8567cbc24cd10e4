"""Hostile or broken inputs to the training recipes: sources that reach outside, files that are not files,
numbers out of range, interrupted checkpoint saves, and backbone folders that ask for pickles or remote code."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32  # the bytes are packed as they are; only training decodes them


def make_shards(*args, timeout=60):
    """``python -m training.make_shards`` in a subprocess (a hang is a failure, not a stuck test run)."""
    return subprocess.run([sys.executable, "-m", "training.make_shards", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def packed(out: Path) -> dict[str, bytes]:
    """Member name -> bytes over every shard in ``out``."""
    members = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[f"{shard.name}/{m.name}"] = tar.extractfile(m).read()
    return members


# ---- make_shards: what a source may make it read -------------------------------------------------------


def test_make_shards_refuses_and_counts_table_rows_outside_the_table(tmp_path):
    secret = tmp_path / "outside" / "private.png"
    secret.parent.mkdir()
    secret.write_bytes(PNG + b"SECRET")
    table_dir = tmp_path / "data" / "tables"
    table_dir.mkdir(parents=True)
    (table_dir / "ok.png").write_bytes(PNG)
    (table_dir / "linked.png").symlink_to(secret)
    table = table_dir / "t.tsv"
    table.write_text("path\tcaption\nok.png\ta good one\n../../outside/private.png\ta secret\n"
                     "/etc/passwd\tnot an image\nlinked.png\ta link out\n" + f"{secret}\tabsolute\n", encoding="utf-8")
    out = tmp_path / "shards"
    r = make_shards("--source", table, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    data = packed(out)
    assert not any(b"SECRET" in v for v in data.values())
    assert sum(name.endswith(".png") for name in data) == 1
    assert "1 samples" in r.stdout and "4 skipped" in r.stdout
    assert "'points outside the source': 3" in r.stdout and "not an image file name" in r.stdout
    assert "'../../outside/private.png': points outside the source" in r.stderr


def test_make_shards_counts_fifos_folders_and_links_out_of_a_folder_without_hanging(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.png").write_bytes(PNG)
    (src / "a.txt").write_text("a caption", encoding="utf-8")
    os.mkfifo(src / "f.png")  # reading it would wait forever for a writer
    (src / "d.png").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.png").write_bytes(PNG + b"SECRET")
    (outside / "secret.txt").write_text("SECRET", encoding="utf-8")
    (src / "linked.png").symlink_to(outside / "private.png")
    (src / "linked-folder").symlink_to(outside, target_is_directory=True)
    (src / "b.png").write_bytes(PNG)
    (src / "b.txt").symlink_to(outside / "secret.txt")  # a caption that is a link out: left out
    out = tmp_path / "shards"
    r = make_shards("--source", src, "--out", out, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    data = packed(out)
    assert not any(b"SECRET" in v for v in data.values())
    assert [v for k, v in data.items() if k.endswith(".txt")] == [b"a caption", b""]
    assert "b.txt: caption left out (points outside the source)" in r.stderr
    assert "2 samples" in r.stdout and "3 skipped" in r.stdout
    assert "not a regular file" in r.stdout and "a folder, not a file" in r.stdout
    assert "points outside the source" in r.stdout


def test_make_shards_files_over_the_byte_bound_are_counted_not_read(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    with open(src / "huge.png", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GB claimed, nothing on disk
    (src / "small.png").write_bytes(PNG)
    out = tmp_path / "shards"
    r = make_shards("--source", src, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "1 samples" in r.stdout and "larger than 67108864 bytes" in r.stdout


@pytest.mark.parametrize("flag", ["--per-shard", "--max-bytes"])
def test_make_shards_counts_are_range_checked_when_parsed(flag, tmp_path, capsys):
    from training.make_shards import parse

    with pytest.raises(SystemExit):
        parse(["--source", str(tmp_path), "--out", str(tmp_path / "o"), flag, "0"])
    assert f"argument {flag}: must be an integer >= 1, got '0'" in capsys.readouterr().err


# ---- numbers on the command line ---------------------------------------------------------------------

TRAIN = ["--model", "m", "--data", "d", "--sd-embeddings", "s", "--out", "o"]


@pytest.mark.parametrize("module, base, flag, value, wanted", [
    ("training.train", TRAIN, "--seed", str(2**64), "an integer from 0 to 4294967295"),
    ("training.train", TRAIN, "--seed", "-1", "an integer from 0 to 4294967295"),
    ("training.train", TRAIN, "--grad-accum", "0", "an integer >= 1"),
    ("training.train", TRAIN, "--steps", "-3", "an integer >= 1"),
    ("training.train", TRAIN, "--batch-size", "-8", "an integer >= 1"),
    ("training.train_decision", ["--model", "m", "--annotations", "a"], "--seed", str(2**64), "an integer from 0 to 4294967295"),
    ("training.train_decision", ["--model", "m", "--annotations", "a"], "--steps", "0", "an integer >= 1"),
    ("training.train_decision", ["--model", "m", "--annotations", "a"], "--train-size", "0", "an integer >= 1"),
    ("training.train_decision", ["--model", "m", "--annotations", "a"], "--lr", "0", "a number > 0"),
    ("training.precompute_sd_embeddings", ["--sd", "s", "--data", "d", "--out", "o"], "--batch-size", "0", "an integer >= 1"),
])
def test_seeds_and_counts_are_range_checked_when_parsed(module, base, flag, value, wanted, capsys):
    import importlib

    parse = importlib.import_module(module).parse
    with pytest.raises(SystemExit) as e:
        parse([*base, flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be {wanted}, got '{value}'" in capsys.readouterr().err


def test_the_toy_builds_seed_is_range_checked(tmp_path, capsys):
    from training.toy.__main__ import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "o"), "--seed", str(2**64)])
    assert "argument --seed: must be an integer from 0 to 4294967295" in capsys.readouterr().err


# ---- checkpoints: interrupted saves and another model ----------------------------------------------------


def _args(out, *extra):
    """training.train arguments for the tiny model; the data is not read by setup or save."""
    return ["--model", "tiny-random", "--recipe", "tiny", "--data", "unused-{0..1}.tar", "--sd-embeddings", "unused",
            "--out", str(out), "--no-progress", "--no-tensorboard", *map(str, extra)]


def _saved_at(out, step):
    from training.train import save, setup

    run = setup(_args(out))
    run.state["step"] = step
    return save(run)


def test_a_stale_temporary_checkpoint_is_removed_and_the_good_one_resumed(tmp_path):
    from training.train import setup

    out = tmp_path / "run"
    good = _saved_at(out, 4)
    stale = [out / "checkpoints" / ".step-0000008.4242.0123abcd.tmp", out / ".best.4242.0123abcd.tmp"]
    for path in stale:  # what a kill during a save left: half a checkpoint
        path.mkdir(parents=True)
        (path / "gill.safetensors").write_bytes(b"half")
    (out / ".history.json.x1y2z3.tmp").write_text("[", encoding="utf-8")
    run = setup(_args(out, "--resume"))
    assert run.state["step"] == 4 and good.is_dir()
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


DRIVER = """
import os, signal, sys, time, torch
import training.train as T
real = torch.save
def save_then_killed(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if "step-0000008" in str(f):  # the second checkpoint, half written
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
torch.save = save_then_killed
sys.exit(T.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from synthetic import make_dataset

    root = tmp_path_factory.mktemp("data")
    paths = make_dataset(root / "shards", n_train=16, n_val=4)
    r = subprocess.run([sys.executable, "-m", "training.precompute_sd_embeddings", "--sd", "tiny-random", "--data",
                        paths["train"], "--out", str(root / "sd")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return paths["train"], str(root / "sd")


def test_sigterm_during_a_checkpoint_save_leaves_no_temporary_directory(shards, tmp_path):
    data, sd = shards
    out = tmp_path / "run"
    args = ["--model", "tiny-random", "--recipe", "tiny", "--data", data, "--sd-embeddings", sd, "--out", str(out),
            "--no-progress", "--no-tensorboard", "--steps", "8", "--save-every", "4", "--batch-size", "4"]
    r = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 143, r.stderr[-2000:]
    assert "terminated" in r.stderr and "--resume" in r.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000004"]  # the complete one; nothing half-written beside it


def test_resume_with_another_model_names_both_and_deletes_nothing(tmp_path, caplog):
    from training.train import TrainingError, setup

    out = tmp_path / "run"
    good = _saved_at(out, 4)
    with pytest.raises(TrainingError) as e, caplog.at_level("INFO"):
        setup([*_args(out, "--resume"), "--model", "toy"])
    assert "unusable" not in caplog.text
    text = str(e.value)
    assert f"the checkpoints in {out / 'checkpoints'} were trained from model 'tiny-random' and this run names 'toy'" in text
    assert "pass the same --model" in text and "another --out" in text
    assert "unusable" not in text and "remove" not in text
    assert (good / "gill.safetensors").is_file()


# ---- one key twice in a shard ------------------------------------------------------------------------------


def test_a_key_twice_in_a_shard_trains_on_neither_and_is_counted(tmp_path):
    """Two samples of one key (not adjacent) would share one embedding entry: one of them would learn the
    other's diffusion target. Neither is trained on; both are counted."""
    from collections import Counter

    from gill.backbones import image_processor
    from gill.config import PreprocessConfig
    from synthetic import draw, write_shard
    from training.data import ShardStream, global_batches

    shard = tmp_path / "s.tar"
    write_shard(shard, [("a", draw("red", "circle"), "a red circle"), ("b", draw("blue", "square"), "a blue square"),
                        ("a", draw("green", "triangle"), "a green triangle")])
    r = subprocess.run([sys.executable, "-m", "training.precompute_sd_embeddings", "--sd", "tiny-random", "--data",
                        str(shard), "--out", str(tmp_path / "sd")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 key(s) appear more than once (a)" in r.stderr and "1 repeated key(s)" in r.stdout
    stream = ShardStream([str(shard)], image_processor(PreprocessConfig(image_size=32)), str(tmp_path / "sd"),
                         shuffle_buffer=0)
    counts = Counter()
    kept = [s.caption for batch, _ in global_batches(iter(stream), 1, counts, drop_last=False) for s in batch]
    assert kept == ["a blue square"]
    assert counts == {"missing diffusion embedding": 1, "duplicate key": 1}
