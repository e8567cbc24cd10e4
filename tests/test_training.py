import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gill.checkpoint import load_safetensors
from gill.model import GILLModel
from training.config import RECIPES, TrainConfig, lr_factor
from training.step import caption_inputs, img_token_inputs, tokenize
from training.train_decision import macro_f1, read_annotations

from synthetic import make_dataset, write_shard, draw

ROOT = Path(__file__).resolve().parents[1]


def run(module, *args, env=None, check=True):
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = make_dataset(root / "shards", bad=True)
    run("training.precompute_sd_embeddings", "--sd", "tiny-random", "--data", f"{paths['train']}::{paths['val']}",
        "--out", root / "sd")
    # a third shard whose captions have no precomputed embedding
    write_shard(root / "shards" / "train-2.tar", [("orphan", draw("blue", "square"), "a blue square")])
    paths["train"] = str(root / "shards" / "train-{0..2}.tar")
    paths["sd"] = str(root / "sd")
    return paths


def train_args(data, out, *extra):
    return ["--model", "tiny-random", "--recipe", "tiny", "--data", data["train"], "--sd-embeddings", data["sd"],
            "--out", out, "--no-progress", "--no-tensorboard", *map(str, extra)]


def test_schedule_is_the_originals():
    cfg = TrainConfig()
    assert lr_factor(0, cfg) == 0 and lr_factor(1000, cfg) == 0.5 and lr_factor(2000, cfg) == 1.0
    assert lr_factor(11_999, cfg) == 1.0 and lr_factor(12_000, cfg) == pytest.approx(0.1)
    original = RECIPES["gill-opt-6.7b"]
    assert (original.batch_size, original.steps, original.lr, original.beta2, original.grad_clip) == (200, 20_000, 1e-3, 0.95, 1.0)


def test_concatenated_sequences_are_two_examples_back_to_back(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    text = tokenize(backbones.tokenizer, ["a red circle", "a small blue square on the left"], 32, 8)
    ids, mask, labels = img_token_inputs(model, text, concat=True, device="cpu")
    a, b = text.captions
    img = config.tokens.img_token_ids
    assert ids[0].tolist() == a + img + b[1:] + img  # the second caption loses its BOS
    assert labels[0].tolist() == a + [img[0]] + [-100] * 7 + b[1:] + [img[0]] + [-100] * 7
    single, smask, _ = img_token_inputs(model, text, concat=False, device="cpu")
    with torch.no_grad():
        both = model.img_token_forward(ids, mask).img_hidden
        alone = model.img_token_forward(single, smask).img_hidden
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)  # causal: a's group sees only a
    assert both.shape == alone.shape == (2, 8, config.lm_hidden_size)
    prefix = torch.randn(2, config.n_visual_tokens, config.lm_hidden_size)
    embeds, cmask, clabels = caption_inputs(model, prefix, text, concat=True)
    k = config.n_visual_tokens
    assert clabels[0].tolist() == [-100] * k + a + [-100] * k + b[1:]
    torch.testing.assert_close(embeds[0, k + len(a):2 * k + len(a)], prefix[1])


def test_precomputed_embeddings_are_the_text_encoders_and_resume(data, tmp_path):
    from safetensors.torch import load_file

    from training.precompute_sd_embeddings import encode, encoder_for

    states = load_file(str(Path(data["sd"]) / "train-0.safetensors"))
    tokenizer, encoder = encoder_for("tiny-random", None, None)
    torch.testing.assert_close(states["000000"], encode(tokenizer, encoder, ["a red square"])[0])
    assert states["000000"].dtype == torch.float16 and states["000000"].shape == (5, 24)
    again = run("training.precompute_sd_embeddings", "--sd", "tiny-random", "--data", data["val"], "--out", data["sd"])
    assert "0 shards written, 1 already done" in again.stdout


def test_precompute_can_encode_another_field_than_the_training_text(tmp_path):
    """--text-key: the diffusion target describes the picture even when GILL's text is longer (a story)."""
    import io
    import tarfile

    from safetensors.torch import load_file

    from training.precompute_sd_embeddings import encode, encoder_for

    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        for name, payload in (("k.png", draw("red", "square")), ("k.txt", b"it was blue. it turns red."),
                              ("k.sd.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    run("training.precompute_sd_embeddings", "--sd", "tiny-random", "--data", tmp_path / "s-0.tar", "--out",
        tmp_path / "sd", "--text-key", "sd.txt")
    states = load_file(str(tmp_path / "sd" / "s-0.safetensors"))
    tokenizer, encoder = encoder_for("tiny-random", None, None)
    torch.testing.assert_close(states["k"], encode(tokenizer, encoder, ["a red square"])[0])


@pytest.mark.slow
def test_training_learns_retrieval_and_generation_and_counts_bad_data(data, tmp_path):
    out = tmp_path / "run"
    run("training.train", *train_args(data, out, "--steps", 200, "--batch-size", 12, "--decay-every", 400,
                                      "--val-every", 200, "--val-data", data["val"], "--val-sd-embeddings", data["sd"]))
    history = json.loads((out / "history.json").read_text())
    first = sum(h["mapper"] for h in history[:10]) / 10
    last = sum(h["mapper"] for h in history[-10:]) / 10
    assert last < 0.5 * first
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["val/t2i_recall@1"] >= 4 / 12  # chance is 1/12 on the 12 validation pairs
    skipped = json.loads((out / "skipped.json").read_text())
    assert {"corrupt image", "empty caption", "missing diffusion embedding"} <= set(skipped)
    assert (out / "final" / "gill.safetensors").is_file()


@pytest.mark.slow  # end to end through subprocesses: in the slow step
def test_killed_and_resumed_run_ends_with_the_same_weights(data, tmp_path):
    common = ("--steps", 24, "--save-every", 8)
    run("training.train", *train_args(data, tmp_path / "straight", *common))
    dead = run("training.train", *train_args(data, tmp_path / "killed", *common),
               env={"GILL_TRAIN_TEST_EXIT_AT_STEP": "13"}, check=False)
    assert dead.returncode == 137
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-0000008"]
    run("training.train", *train_args(data, tmp_path / "killed", *common, "--resume"))
    a = load_safetensors(tmp_path / "straight" / "final" / "gill.safetensors")
    b = load_safetensors(tmp_path / "killed" / "final" / "gill.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_follow_one_process(data, tmp_path):
    common = ("--steps", 6, "--batch-size", 8, "--warmup-steps", 2)
    run("training.train", *train_args(data, tmp_path / "one", *common))
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
         "-m", "training.train", *map(str, train_args(data, tmp_path / "two", *common))],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    for a, b in zip(h1, h2):
        for k in ("caption", "img_token_ce", "contrastive", "mapper"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    a = load_safetensors(tmp_path / "one" / "final" / "gill.safetensors")
    b = load_safetensors(tmp_path / "two" / "final" / "gill.safetensors")
    # Adam divides by sqrt(v): gradients that differ in the last bits move near-zero-gradient weights by
    # up to ~1e-4 after 6 steps at lr 3e-3 (each step moves a weight by up to 3e-3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=3e-4)


def test_decision_annotations_and_macro_f1(shared_data):
    ann = read_annotations(shared_data / "PartiPromptsDecisionsConfident.tsv")
    assert len(ann.prompts) == 911  # 592 gen + 319 ret; the 721 'same' are dropped
    assert sum(ann.labels) == 319
    assert macro_f1(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])) == pytest.approx((0.8 + 2 / 3) / 2)


def test_decision_head_learns_a_separable_rule(tmp_path):
    # A prompt-level rule the tiny LM can see ("photo" -> retrieve) must be learnt far above chance.
    rows = ["Prompt\tDecision"]
    for i in range(160):
        word = ["a photo of", "a painting of"][i % 2]
        rows.append(f"{word} thing {i % 7}\t{'ret' if i % 2 == 0 else 'gen'}")
    (tmp_path / "ann.tsv").write_text("\n".join(rows) + "\n")
    out = run("training.train_decision", "--model", "tiny-random", "--annotations", tmp_path / "ann.tsv",
              "--train-size", 100, "--steps", 400, "--lr", 1e-2, "--out", tmp_path / "m")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["test_macro_f1"] >= 0.9 and result["test_examples"] == 60
    assert (tmp_path / "m" / "decision.safetensors").is_file()
