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
    return [str(a) for a in ("--model", "tiny-random", "--recipe", "tiny", "--data", data["train"], "--sd-embeddings",
                             data["sd"], "--out", out, "--no-progress", "--no-tensorboard", *extra)]


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
    ids, mask, labels, _ = img_token_inputs(model, text, concat=True, device="cpu")
    a, b = text.captions
    img = config.tokens.img_token_ids
    assert ids[0].tolist() == a + img + b[1:] + img  # the second caption loses its BOS
    assert labels[0].tolist() == a + [img[0]] + [-100] * 7 + b[1:] + [img[0]] + [-100] * 7
    single, smask, _, _ = img_token_inputs(model, text, concat=False, device="cpu")
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
@pytest.mark.parametrize("queue", [0, 24])
def test_training_learns_retrieval_and_generation_and_counts_bad_data(data, tmp_path, queue):
    out = tmp_path / "run"
    run("training.train", *train_args(data, out, "--steps", 200, "--batch-size", 12, "--decay-every", 400,
                                      "--val-every", 200, "--val-data", data["val"], "--val-sd-embeddings", data["sd"],
                                      "--contrastive-queue", queue))
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
    """A real kill -9 once the first checkpoint is on disk, wherever the run then is; the rerun resumes."""
    import signal
    import time

    common = ("--steps", 40, "--save-every", 8)
    run("training.train", *train_args(data, tmp_path / "straight", *common))
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *train_args(data, tmp_path / "killed", *common)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-0000008").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    run("training.train", *train_args(data, tmp_path / "killed", *common, "--resume"))
    a = load_safetensors(tmp_path / "straight" / "final" / "gill.safetensors")
    b = load_safetensors(tmp_path / "killed" / "final" / "gill.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "killed" / "history.json").read_text()) == \
        json.loads((tmp_path / "straight" / "history.json").read_text())


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
    # the same command gives the same head (its initial weights are seeded too)
    run("training.train_decision", "--model", "tiny-random", "--annotations", tmp_path / "ann.tsv",
        "--train-size", 100, "--steps", 400, "--lr", 1e-2, "--out", tmp_path / "again")
    saved = [(tmp_path / d / "decision.safetensors").read_bytes() for d in ("m", "again")]
    assert saved[0] == saved[1]


def test_a_standardized_decision_head_is_folded_into_the_same_linear_head():
    """Trained on standardized features, the saved head reads raw features and gives the logits of a head
    trained on the standardized ones; and a weak signal beside a large shared offset (a small LM's state
    beside a retrieval score) is learnt that way, where raw features leave it near chance."""
    from gill.decision import DecisionHead
    from training.train_decision import balanced_accuracy, train_head

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = 50.0 + torch.randn(200, 16, generator=g)  # a large shared offset, noise
    x[:, 0] = 50.0 + 0.01 * (y * 2 - 1) + 0.002 * torch.randn(200, generator=g)  # the signal, on a tiny scale
    def head():
        torch.manual_seed(7)  # the same initial weights for every head
        return DecisionHead(16)

    # folding is exact up to rounding: on features of moderate offset the logits agree to 1e-5
    z = 3.0 + torch.randn(200, 16, generator=g)
    folded = train_head(head(), z[:150], y[:150], steps=300, lr=1e-2, seed=1, standardize=True)
    mean, std = z[:150].mean(0), z[:150].std(0)
    plain = train_head(head(), (z[:150] - mean) / std, y[:150], steps=300, lr=1e-2, seed=1)
    learnt = train_head(head(), x[:150], y[:150], steps=300, lr=1e-2, seed=1, standardize=True)
    raw = train_head(head(), x[:150], y[:150], steps=300, lr=1e-2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(folded(z), plain((z - mean) / std), rtol=1e-5, atol=1e-5)
        assert balanced_accuracy(learnt(x[150:]).argmax(-1), y[150:]) >= 0.95
        assert balanced_accuracy(raw(x[150:]).argmax(-1), y[150:]) <= 0.75


# ---- bad targets, bad steps, bad checkpoints ---------------------------------------------------------


def _copy_sd(data, tmp_path, name, change):
    """A copy of the precomputed embeddings with ``change(tensors)`` applied to train-0's file."""
    import shutil

    from safetensors.torch import load_file, save_file

    sd = tmp_path / name
    shutil.copytree(data["sd"], sd)
    tensors = load_file(str(sd / "train-0.safetensors"))
    change(tensors)
    save_file(tensors, str(sd / "train-0.safetensors"))
    return sd


def _weights(out):
    return load_safetensors(out / "final" / "gill.safetensors")


def _first_batch(run, data) -> list:
    """The run's first global batch of the test shards, unshuffled."""
    from collections import Counter

    from training.data import ShardStream, expand_shards, global_batches

    stream = ShardStream(expand_shards(data["train"]), run.processor, data["sd"], shuffle_buffer=0)
    return next(global_batches(iter(stream), run.cfg.batch_size, Counter()))[0]


def test_a_nan_target_is_skipped_and_the_weights_equal_a_run_without_it(data, tmp_path):
    from training.train import main

    first = sorted(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(Path(data["sd"]) / "train-0.safetensors")))[0]

    def poison(t):
        t[first][3, 5] = float("nan")

    def drop(t):
        del t[first]

    args = ("--steps", 8, "--shuffle-buffer", 0, "--save-every", 100)
    assert main(train_args({**data, "sd": _copy_sd(data, tmp_path, "nan", poison)}, tmp_path / "nan", *args)) == 0
    assert main(train_args({**data, "sd": _copy_sd(data, tmp_path, "without", drop)}, tmp_path / "without", *args)) == 0
    a, b = _weights(tmp_path / "nan"), _weights(tmp_path / "without")
    assert all(torch.isfinite(v).all() for v in a.values())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    skipped = json.loads((tmp_path / "nan" / "skipped.json").read_text())
    assert skipped.get("non-finite diffusion embedding") >= 1


def test_mis_shaped_and_unreadable_embeddings_are_counted_not_fatal(data, tmp_path):
    from training.train import main

    def reshape(t):
        k = sorted(t)[0]
        t[k] = t[k][:3]

    sd = _copy_sd(data, tmp_path, "shape", reshape)
    (sd / "train-1.safetensors").write_bytes((sd / "train-1.safetensors").read_bytes()[:100])  # truncated
    out = tmp_path / "run"
    assert main(train_args({**data, "sd": sd}, out, "--steps", 3, "--save-every", 100)) == 0
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped.get("mis-shaped diffusion embedding", 0) >= 1
    assert skipped.get("unreadable diffusion embeddings file", 0) >= 1


def test_a_non_finite_step_changes_nothing_and_too_many_in_a_row_stop_the_run(data, tmp_path):
    from training.train import TrainingError, train_step, setup

    run = setup(train_args(data, tmp_path / "run", "--max-bad-steps", 2, "--contrastive-queue", 64))
    samples = _first_batch(run, data)
    before = {k: v.clone() for k, v in run.model.adapter.state_dict().items()}
    samples[0].sd_embedding = samples[0].sd_embedding.clone().fill_(float("inf"))
    assert train_step(run, samples) is None
    assert run.state["step"] == 0 and run.state["bad_steps"] == 1
    for k, v in run.model.adapter.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(run.step_module.queue) == 0  # nor are the skipped step's images kept as later negatives
    with pytest.raises(TrainingError, match="2 steps in a row had a non-finite loss or gradient"):
        train_step(run, samples)
    assert len(run.step_module.queue) == 0
    assert train_step(run, _first_batch(run, data)) is not None  # a good step queues its images
    assert len(run.step_module.queue) == min(64, run.cfg.batch_size)


def test_resume_falls_back_to_the_newest_valid_checkpoint_and_keeps_history(data, tmp_path, caplog):
    from training.train import main

    common = ("--steps", 12, "--save-every", 4, "--keep-last", 3)
    assert main(train_args(data, tmp_path / "straight", *common)) == 0
    out = tmp_path / "resumed"
    assert main(train_args(data, out, "--steps", 8, "--save-every", 4, "--keep-last", 3)) == 0
    state = out / "checkpoints" / "step-0000008" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])  # torn by a crash, say
    with caplog.at_level("INFO"):
        assert main(train_args(data, out, *common, "--resume", "--log-every", 7)) == 0
    text = caplog.text
    assert "step-0000008 is unusable" in text and "trainer_state.pt" in text
    assert "resumed from" in text and "step-0000004" in text and "newest usable" in text
    assert "resuming with changed settings" in text and "log_every: 5 -> 7" in text
    a, b = _weights(tmp_path / "straight"), _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = json.loads((out / "history.json").read_text())
    straight = json.loads((tmp_path / "straight" / "history.json").read_text())
    assert len(history) == 12 and history == straight


def test_resume_with_no_usable_checkpoint_says_why(data, tmp_path, capsys):
    from training.train import main

    out = tmp_path / "run"
    assert main(train_args(data, out, "--steps", 4, "--save-every", 4)) == 0
    (out / "checkpoints" / "step-0000004" / "gill.safetensors").write_bytes(b"")
    assert main(train_args(data, out, "--steps", 8, "--resume")) == 1
    err = capsys.readouterr().err
    assert "none of the 1 checkpoint(s)" in err and "gill.safetensors: not a readable safetensors file" in err


def test_training_flags_are_range_checked_when_parsed(capsys):
    from training.train import parse

    for flag, value, message in (("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got '0'"),
                                 ("--lr", "-1", "argument --lr: must be a number > 0, got '-1'"),
                                 ("--concat-prob", "1.5", "argument --concat-prob: must be a number from 0 to 1, got '1.5'"),
                                 ("--steps", "many", "argument --steps: must be an integer >= 1, got 'many'")):
        with pytest.raises(SystemExit):
            parse(["--model", "m", "--data", "d", "--sd-embeddings", "s", "--out", "o", flag, value])
        assert message in capsys.readouterr().err


def test_loss_weight_flags_override_the_recipe_one_weight_each():
    from gill.losses import LossWeights
    from training.config import from_args
    from training.train import parse

    base = ["--model", "m", "--data", "d", "--sd-embeddings", "s", "--out", "o"]
    assert from_args("tiny", parse(base)).weights == LossWeights()
    cfg = from_args("tiny", parse([*base, "--weight-contrastive", "4", "--weight-mapper", "0"]))
    assert cfg.weights == LossWeights(contrastive=4.0, mapper=0.0)
    assert cfg.weights.caption == 1.0 and cfg.weights.retrieval_ce == 0.5  # the others keep the original's


def test_a_loss_weight_flag_scales_its_loss_in_the_step_total(data, tmp_path):
    """--weight-contrastive reaches the optimised total: on the same batch from the same start, the total
    rises by exactly the extra weight times the contrastive loss."""
    from training.train import setup, train_step

    totals = {}
    for w in ("1", "4"):
        run = setup(train_args(data, tmp_path / w, "--weight-contrastive", w))
        totals[w] = train_step(run, _first_batch(run, data))
    one, four = totals["1"], totals["4"]
    assert four["contrastive"] == pytest.approx(one["contrastive"], rel=1e-6)
    assert four["total"] == pytest.approx(one["total"] + 3 * one["contrastive"], rel=1e-5)


def test_a_60000x1_image_in_a_shard_is_counted_and_costs_no_memory(tmp_path):
    """The training reader bounds the image before CLIP's shortest-edge resize (unchecked, a 256-byte
    60000x1 PNG becomes 13 M pixels wide at 224 px): the sample is skipped with its reason, the rest kept."""
    import io
    from collections import Counter

    from PIL import Image
    from transformers import CLIPImageProcessor

    from memory import peak_growth
    from training.data import ShardStream, global_batches

    buf = io.BytesIO()
    Image.new("RGB", (60000, 1), "red").save(buf, format="PNG")
    write_shard(tmp_path / "s-0.tar", [("a", draw("red", "square"), "a red square"), ("wide", buf.getvalue(), "a red line"),
                                       ("b", draw("blue", "circle"), "a blue circle")])
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    stream = ShardStream([str(tmp_path / "s-0.tar")], processor, None, shuffle_buffer=0, need_sd=False)
    counts: Counter = Counter()
    grown, batches = peak_growth(lambda: list(global_batches(iter(stream), 1, counts)))
    assert grown < 2**30, f"peak memory grew by {grown / 2**30:.2f} GB"
    assert [b[0][0].key for b in batches] == ["s-0/a", "s-0/b"]
    assert counts == Counter({"corrupt image": 1})
    why = next(s for s in stream if s.key == "s-0/wide").error
    assert why.startswith("corrupt image: ") and "60000x1" in why and "aspect ratio" in why, why


@pytest.mark.parametrize("renorm_output", [True, False])
def test_untied_img_output_rows_are_rescaled_only_when_asked(data, tmp_path, renorm_output):
    """--renorm-img-output false: the [IMG] input rows keep the LM rows' mean norm after a step, while
    untied output rows move freely (so [IMG0] can become as sure as the LM's own next tokens)."""
    import dataclasses

    from training.config import lr_factor
    from training.step import mean_row_norm
    from training.train import setup, train_step
    from gill.model import GILLAdapter

    run = setup(train_args(data, tmp_path / "run", "--renorm-img-output", str(renorm_output).lower(), "--lr", "0.05"))
    assert run.cfg.renorm_img_output is renorm_output
    run.model.config = dataclasses.replace(run.model.config, tie_img_embeddings=False)
    run.model.adapter = GILLAdapter(run.model.config)  # untied: [IMG] output rows of their own
    run.trainable = run.model.trainable_parameters()
    run.optimizer = torch.optim.AdamW(run.trainable, lr=run.cfg.lr)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: lr_factor(s, run.cfg))
    before = run.model.adapter.img_output_embeddings.detach().clone()
    samples = _first_batch(run, data)
    for _ in range(3):
        assert train_step(run, samples) is not None
    a = run.model.adapter
    assert torch.allclose(a.img_embeddings.norm(dim=-1), torch.full((len(a.img_embeddings),), run.emb_norm), rtol=1e-4)
    out_norms = a.img_output_embeddings.norm(dim=-1)
    lm_out_norm = mean_row_norm(run.model.lm.get_output_embeddings().weight)
    assert not torch.equal(a.img_output_embeddings, before)
    if renorm_output:
        assert run.out_norm == pytest.approx(lm_out_norm)
        assert torch.allclose(out_norms, torch.full_like(out_norms, lm_out_norm), rtol=1e-4)
    else:
        assert run.out_norm is None
        assert not torch.allclose(out_norms, torch.full_like(out_norms, lm_out_norm), rtol=1e-2)
        assert mean_row_norm(a.img_output_embeddings) != pytest.approx(lm_out_norm, rel=1e-2)


def test_the_negatives_queue_keeps_the_newest_images_and_leaves_out_duplicates(tiny_opt):
    """TrainStep's queue: the last N images' vision features, newest first, projected by the current image
    head; a queued copy of a text's own image is masked for that text only."""
    from training.step import TrainStep

    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config)
    step = TrainStep(model, queue_size=4)
    width = model.config.vision_hidden_size
    first = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    extra, mask = step.queued_negatives(first)
    assert extra is None and mask is None and torch.equal(step.queue, first)
    second = torch.cat([first[1:2] * 2.0, torch.randn(1, width)])  # a copy of image 1 (same direction), a new one
    extra, mask = step.queued_negatives(second)
    head = model.adapter.image_retrieval
    with torch.no_grad():
        torch.testing.assert_close(extra, head(first))  # the previous batch, through the current head
    assert mask.tolist() == [[False, True, False], [False, False, False]]
    assert torch.equal(step.queue, torch.cat([second, first[:2]]))  # newest first, at most 4
    assert TrainStep(model).queued_negatives(first) == (None, None)  # no queue: in-batch negatives only


def test_img_init_starts_img0_from_a_words_embedding_and_leaves_the_other_rows(data, tmp_path):
    """--img-init ".": [IMG0]'s input row starts in the direction of the LM's "." row (then rescaled to the
    LM rows' mean norm, as every [IMG] row); [IMG1..] keep the random start a run without the flag has."""
    import torch.nn.functional as F

    from training.train import setup

    plain = setup(train_args(data, tmp_path / "plain"))
    run = setup(train_args(data, tmp_path / "init", "--img-init", "."))
    dot = run.tokenizer(".", add_special_tokens=False)["input_ids"]
    assert len(dot) == 1
    rows, word = run.model.adapter.img_embeddings, run.model.lm.get_input_embeddings().weight[dot[0]]
    assert F.cosine_similarity(rows[0], word, dim=0).item() == pytest.approx(1.0, abs=1e-5)
    assert F.cosine_similarity(plain.model.adapter.img_embeddings[0], word, dim=0).abs().item() < 0.5
    assert torch.equal(rows[1:], plain.model.adapter.img_embeddings[1:])
    with pytest.raises(SystemExit, match="--img-init"):
        setup(train_args(data, tmp_path / "long", "--img-init", " ".join(["word"] * 20)))


def _trained_model_dir(data, path):
    """A tiny GILL trained 3 steps, saved at ``path`` as a model directory with its backbones beside it;
    returns the batch it trained on and its saved weights."""
    from gill.checkpoint import save_model
    from training.train import setup, train_step

    first = setup(train_args(data, path.parent / "first"))
    batch = _first_batch(first, data)
    for _ in range(3):
        train_step(first, batch)
    model_dir = save_model(path, first.model)
    # the tiny backbones beside the weights, as a built model directory holds its own
    first.model.lm.save_pretrained(model_dir / "lm")
    first.tokenizer.save_pretrained(model_dir / "lm")
    first.model.vision.save_pretrained(model_dir / "vision")
    first.processor.save_pretrained(model_dir / "vision")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "lm": "lm", "vision": "vision"}))
    return batch, load_safetensors(path / "gill.safetensors")


def test_train_only_the_mapper_afresh_on_a_trained_models_states(data, tmp_path):
    """--train-only mapper --reinit mapper on a trained model directory: the mapper starts afresh and learns
    (its loss on a batch falls), every other trained weight stays bit for bit the directory's, and the
    captioning pass, which only trains the frozen visual prefix, is not run."""
    from training.train import setup, train_step

    batch, trained = _trained_model_dir(data, tmp_path / "trained")

    run = setup(train_args(data, tmp_path / "refit", "--lr", "1e-2", "--warmup-steps", "0", "--train-only", "mapper",
                           "--reinit", "mapper") + ["--model", str(tmp_path / "trained")])
    start = {k: v.detach().clone() for k, v in run.model.adapter.state_dict().items()}
    assert all(not torch.equal(start[k], trained[k]) for k in trained if k.startswith("mapper."))
    assert all(torch.equal(start[k], trained[k]) for k in trained if not k.startswith("mapper."))
    assert {n for n, p in run.model.adapter.named_parameters() if p.requires_grad} == \
        {n for n in start if n.startswith("mapper.")}
    losses = [train_step(run, batch) for _ in range(6)]
    assert losses[-1]["mapper"] < 0.7 * losses[0]["mapper"], [x["mapper"] for x in losses]
    assert all(x["caption"] == 0.0 for x in losses) and losses[0]["img_token_ce"] > 0
    end = run.model.adapter.state_dict()
    assert all(torch.equal(end[k], trained[k]) for k in trained if not k.startswith("mapper."))
    assert not torch.equal(end["mapper.out_proj.weight"], start["mapper.out_proj.weight"])
    for flag in ("--train-only", "--reinit"):
        with pytest.raises(SystemExit, match=f"{flag}: no adapter part named mappr"):
            setup(train_args(data, tmp_path / "bad", flag, "mappr"))


def test_mapper_input_noise_noises_what_the_mapper_reads_in_training_only(tiny_opt):
    """--mapper-input-noise s: in training, the mapper reads its input (the [IMG] states plus the [IMG] rows)
    plus Gaussian noise of s times that input's standard deviation; in eval mode, or with s = 0, exactly
    what the model's generation path computes, and no random numbers are drawn."""
    from training.step import TrainStep

    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).train()
    hidden = torch.randn(3, config.tokens.num_img_tokens, config.lm_hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model.generation_embeddings(hidden)
        torch.manual_seed(0)
        out, after = TrainStep(model).generation_embeddings(hidden), torch.randn(4)
        torch.manual_seed(0)
        assert torch.equal(out, clean) and torch.equal(after, torch.randn(4))  # and nothing was drawn

        noisy = TrainStep(model, mapper_input_noise=0.5)
        x = model.mapper_inputs(hidden)
        torch.manual_seed(0)
        expected = model.adapter.mapper(x + 0.5 * x.std() * torch.randn_like(x))
        torch.manual_seed(0)
        first = noisy.generation_embeddings(hidden)
        torch.testing.assert_close(first, expected)
        assert (first - clean).abs().mean() > 0.05 * clean.abs().mean()
        assert not torch.equal(noisy.generation_embeddings(hidden), first)  # a new draw each call
        model.eval()
        assert torch.equal(noisy.generation_embeddings(hidden), model.generation_embeddings(hidden))


def test_cache_states_fits_the_mapper_alone_on_each_samples_own_states(data, tmp_path):
    """--cache-states: one pass computes every good sample's [IMG] states, each the same as the training
    step's forward gives that sample alone; the mapper alone is then fitted on them (its loss falls, every
    other weight stays the model directory's, bit for bit, in the saved result); refused without
    --train-only mapper, naming the flag."""
    from collections import Counter

    from training.data import ShardStream, expand_shards, global_batches
    from training.mapper_cache import collect_states, fit
    from training.step import img_token_forward
    from training.train import batch_text, main, setup

    _, trained = _trained_model_dir(data, tmp_path / "trained")
    args = train_args(data, tmp_path / "refit", "--lr", "1e-2", "--warmup-steps", "0", "--train-only", "mapper",
                      "--reinit", "mapper", "--cache-states", "--steps", "40", "--mapper-input-noise", "0.1")
    args += ["--model", str(tmp_path / "trained")]
    run = setup(args)
    sd_shape = (run.model.config.gen_seq_len, run.model.config.gen_emb_dim)
    stream = ShardStream(expand_shards(data["train"]), run.processor, data["sd"], shuffle_buffer=0, sd_shape=sd_shape)
    good = [s for s in stream if s.error is None]
    skipped = Counter()
    stream = ShardStream(expand_shards(data["train"]), run.processor, data["sd"], shuffle_buffer=0, sd_shape=sd_shape)
    states = collect_states(run, global_batches(iter(stream), 8, skipped, drop_last=False))
    assert len(states.hidden) == len(good) and sum(skipped.values()) > 0  # the bad samples are left out
    with torch.no_grad():
        for i in (0, len(good) // 2, len(good) - 1):
            text, _ = batch_text(run.tokenizer, [good[i]], run.cfg, run.model.config)
            _, _, alone = img_token_forward(run.model, text, False, "cpu")
            torch.testing.assert_close(states.hidden[i], alone[0].float(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states.target[i], good[i].sd_embedding.float())
    history = [h["mapper"] for h in fit(run, states)]
    assert len(history) == 40 and sum(history[-5:]) < 0.7 * sum(history[:5]), history

    assert main(args[:args.index("--out") + 1] + [str(tmp_path / "cli")] + args[args.index("--out") + 2:]) == 0
    saved = load_safetensors(tmp_path / "cli" / "final" / "gill.safetensors")
    assert all(torch.equal(saved[k], trained[k]) for k in trained if not k.startswith("mapper."))
    assert not torch.equal(saved["mapper.out_proj.weight"], trained["mapper.out_proj.weight"])
    with pytest.raises(SystemExit, match="--cache-states .* needs --train-only mapper"):
        setup(train_args(data, tmp_path / "bad", "--cache-states"))
