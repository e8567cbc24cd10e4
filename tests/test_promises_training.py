"""Training promises checked against values computed apart from the code under test: per-sample caption
weights on known label positions, ``make_shards``' exact members, ``--grad-accum``, ``--precision bf16`` and
best-checkpoint selection."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from gill import GILL
from training.config import RECIPES
from training.data import Sample
from training.train import batch_text

from synthetic import draw, png_bytes
from test_training import _first_batch, train_args
from test_training import data  # noqa: F401 - a fixture: test_training's shards and their diffusion targets

ROOT = Path(__file__).resolve().parents[1]


# ---- per-sample caption weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gill():
    g = GILL.from_pretrained("tiny-random", load_diffusion=False)
    g.model.eval()
    return g


def hand_caption_losses(gill, prefix: torch.Tensor, captions: list[str], concat: bool) -> list[torch.Tensor]:
    """Per sample, the cross-entropy of each of its caption tokens, from sequences laid out here by hand:
    [its k visual tokens][BOS caption] (concatenated pairs: the second as [k visual tokens][caption] without
    its BOS, after the first), each token read at its known position. A caption keeps its first
    ``max_len - n_img`` tokens (the original's truncation, leaving room for the [IMG] tokens)."""
    model, k = gill.model, prefix.shape[1]
    ids = [gill.tokenizer(c)["input_ids"][:keep_tokens(gill)] for c in captions]
    out: list[torch.Tensor] = []
    step = 2 if concat else 1
    for i in range(0, len(captions), step):
        parts, targets, at = [], [], 0
        for j, own in ((i, ids[i]), (i + 1, ids[i + 1][1:])) if concat else ((i, ids[i]),):
            parts += [prefix[j], model.embed_tokens(torch.tensor([own]))[0]]
            targets.append((at + k, own))  # the caption's first token sits right after its k visual tokens
            at += k + len(own)
        with torch.no_grad():
            logits = model.lm_forward(torch.cat(parts)[None]).logits[0].float()
        for start, own in targets:  # position p is predicted by the logits at p - 1
            out.append(torch.nn.functional.cross_entropy(logits[start - 1:start - 1 + len(own)], torch.tensor(own),
                                                         reduction="none"))
    return out


def keep_tokens(gill) -> int:
    return RECIPES["tiny"].max_len - len(gill.img_tokens.ids)


@pytest.mark.parametrize("concat", [False, True])
def test_caption_weights_on_known_label_positions(gill, concat):
    """TrainStep's captioning loss with per-sample weights equals the weighted mean, over the tokens of the
    samples whose weight is not 0, of each token's cross-entropy read at its known place in a hand-built
    sequence: weight 0 takes a sample's tokens out of the mean, weight 2 counts them twice."""
    from training.step import TrainStep

    model = gill.model
    captions = ["a red circle.", "it turns blue and then it grows a lot.", "a blue square.", "it moves."]
    pixels = gill.image_processor(images=[__import__("PIL.Image", fromlist=["Image"]).open(__import__("io").BytesIO(
        draw(c, s))) for c, s in [("red", "circle"), ("blue", "circle"), ("blue", "square"), ("red", "square")]],
        return_tensors="pt")["pixel_values"]
    text, _ = batch_text(gill.tokenizer, [Sample(f"s{i}", pixels[i], c) for i, c in enumerate(captions)],
                         RECIPES["tiny"], model.config)
    with torch.no_grad():
        prefix = model.encode_images(pixels).prefix
    per_token = hand_caption_losses(gill, prefix, captions, concat)
    # the second sample of a concatenated pair loses its BOS: one target fewer
    counts = [min(len(gill.tokenizer(c)["input_ids"]), keep_tokens(gill)) - (concat and i % 2)
              for i, c in enumerate(captions)]
    assert [len(t) for t in per_token] == counts and counts[1] == 24 - concat  # the long one is cut at 24
    step = TrainStep(model)
    for weights in ([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]):
        with torch.no_grad():
            got = step.caption_loss(prefix, text, concat, torch.tensor(weights)).item()
        kept = [i for i, w in enumerate(weights) if w > 0]
        expected = sum(weights[i] * per_token[i].sum() for i in kept) / sum(counts[i] for i in kept)
        assert got == pytest.approx(expected.item(), rel=1e-5), weights


# ---- make_shards -----------------------------------------------------------------------------------------


def members(out: Path) -> dict[str, dict[str, bytes]]:
    """Shard file name -> {member name: bytes}."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found[shard.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return found


def test_make_shards_writes_each_image_with_its_caption(tmp_path):
    """A folder of three images (one in a subfolder, one without a caption) and a note, two samples a shard:
    two shards holding exactly each image's bytes under its sorted position and its caption."""
    src = tmp_path / "src"
    (src / "more").mkdir(parents=True)
    red, blue, green = png_bytes("red"), png_bytes("blue", (20, 24)), png_bytes("green", (8, 8))
    (src / "a.png").write_bytes(red)
    (src / "a.txt").write_text("a red square\n")
    (src / "b.jpg").write_bytes(blue)  # the bytes are packed as they are
    (src / "more" / "c.png").write_bytes(green)
    (src / "more" / "c.txt").write_text("a green square")
    (src / "notes.md").write_text("not an image")
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "training.make_shards", "--source", str(src), "--out", str(out),
                        "--per-shard", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"3 samples in {out}; none skipped"
    assert members(out) == {
        "00000.tar": {"000000000.png": red, "000000000.txt": b"a red square",
                      "000000001.jpg": blue, "000000001.txt": b""},
        "00001.tar": {"000000002.png": green, "000000002.txt": b"a green square"},
    }


# ---- the training loop -----------------------------------------------------------------------------------


def _grads_at_step(run) -> dict[str, torch.Tensor]:
    """The gradients the optimizer steps with (recorded by a hook as its step starts)."""
    seen = {}
    names = {id(p): n for n, p in run.model.adapter.named_parameters()}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen[names[id(p)]] = p.grad.clone()

    run.optimizer.register_step_pre_hook(record)
    return seen


def test_grad_accum_gives_the_update_of_the_whole_batch(data, tmp_path):  # noqa: F811
    """--grad-accum 2 over a batch of 8 (two micro-batches of 4) steps with the gradient and gives the weights
    of one step on all 8 at once. In-batch contrastive negatives differ by construction (each micro-batch is
    its own set of negatives, as the original's): that loss is weighted 0 here, and the captions all have the
    same number of tokens, so every other loss's mean over 8 is the mean of the two means over 4 (no clipping:
    a clipped gradient would hide a scale error)."""
    from training.step import tokenize
    from training.train import setup, train_step

    common = ("--batch-size", 8, "--concat-prob", 0, "--warmup-steps", 0, "--weight-contrastive", 0, "--grad-clip", 1e9,
              "--shuffle-buffer", 0, "--save-every", 100)
    runs, grads = {}, {}
    for accum in (1, 2):
        run = setup(train_args(data, tmp_path / f"accum{accum}", *common, "--grad-accum", accum))
        samples = _first_batch(run, data)
        lengths = {len(c) for c in tokenize(run.tokenizer, [s.caption for s in samples], 32, 8).captions}
        assert len(lengths) == 1, lengths  # (the test's premise)
        grads[accum] = _grads_at_step(run)
        assert train_step(run, samples) is not None
        runs[accum] = run
    assert runs[2].per_rank == 4 and runs[1].per_rank == 8
    assert grads[1].keys() == grads[2].keys() and grads[1]
    for name in grads[1]:
        torch.testing.assert_close(grads[2][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)
    # and the weights after the step, where the gradient is more than float noise (AdamW's first step moves
    # every weight by about lr * sign(gradient), so a gradient that is 0 up to rounding, such as an attention
    # key bias's, moves by +-lr either way)
    one, two = dict(runs[1].model.adapter.named_parameters()), dict(runs[2].model.adapter.named_parameters())
    compared = 0
    for name, g in grads[1].items():
        sure = g.abs() > 1e-6
        compared += int(sure.sum())
        torch.testing.assert_close(two[name][sure], one[name][sure], rtol=1e-5, atol=1e-6, msg=name)
    assert compared > 0.5 * sum(g.numel() for g in grads[1].values())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_bf16_runs_the_step_under_bf16_autocast(data, tmp_path, precision):  # noqa: F811
    """--precision bf16: the step's forward runs under CPU bf16 autocast (the LM's logits come out in bf16)
    and the trained weights stay float32 (fp32 master weights); fp32: no autocast, float32 logits."""
    from training.train import setup, train_step

    run = setup(train_args(data, tmp_path / "run", "--precision", precision, "--backbone-dtype", "fp32",
                           "--save-every", 100))
    seen = []
    real_forward, real_lm = run.step_module.forward, run.model.lm_forward

    def forward(*a, **k):
        seen.append(("step", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_forward(*a, **k)

    def lm_forward(*a, **k):
        out = real_lm(*a, **k)
        seen.append(("logits", out.logits.dtype))
        return out

    run.step_module.forward = forward
    run.model.lm_forward = lm_forward
    assert train_step(run, _first_batch(run, data)) is not None
    steps = [s for s in seen if s[0] == "step"]
    logits = {s[1] for s in seen if s[0] == "logits"}
    if precision == "bf16":
        assert steps == [("step", True, torch.bfloat16)] and logits == {torch.bfloat16}
    else:
        assert [s[1] for s in steps] == [False] and logits == {torch.float32}
    assert {p.dtype for p in run.model.trainable_parameters()} == {torch.float32}


def test_the_best_checkpoint_is_the_step_with_the_best_validation_recall(data, tmp_path, monkeypatch):  # noqa: F811
    """Validations of recall 0.25, 0.5, 0.375, 0.5 after steps 1-4: best/ holds the weights of step 2 (the
    first best: a tie does not replace it, as the original's ``>``) and its metrics, not the last step's."""
    import training.train as train
    import training.validation
    from gill.checkpoint import load_safetensors

    recalls = iter([0.25, 0.5, 0.375, 0.5])
    monkeypatch.setattr(training.validation, "validate", lambda *a, **k: {"val/t2i_recall@1": next(recalls), "val/caption_loss": 1.0})
    run = train.setup(train_args(data, tmp_path / "run", "--warmup-steps", 0, "--save-every", 100,
                                 "--val-data", data["val"], "--val-sd-embeddings", data["sd"]))
    samples = _first_batch(run, data)
    weights = {}
    for step in range(1, 5):
        assert train.train_step(run, samples) is not None
        train.validate_and_keep_best(run)
        weights[step] = {k: v.clone() for k, v in run.model.adapter.state_dict().items()}
    best = load_safetensors(run.out / "best" / "gill.safetensors")
    metrics = json.loads((run.out / "best" / "metrics.json").read_text())
    assert (metrics["step"], metrics["val/t2i_recall@1"]) == (2, 0.5)
    assert run.state["best"] == 0.5
    for name, value in best.items():
        assert torch.equal(value, weights[2][name]), name
    assert any(not torch.equal(best[n], weights[4][n]) for n in best)  # the steps did change the weights
