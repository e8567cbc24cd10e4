"""Interleaved training: samples with a context of (text, image) pairs before the caption (stories,
documents), laid out exactly as inference lays out a conversation, with the [IMG] losses on the last image."""

import dataclasses
import io
import json
import tarfile
from collections import Counter

import pytest
import torch

from gill import GILL
from training.config import RECIPES
from training.data import Sample, ShardStream, global_batches
from training.step import TrainStep, img_token_forward, img_token_inputs, interleaved_inputs, tokenize
from training.train import batch_text

from synthetic import draw


@pytest.fixture(scope="module")
def gill():
    g = GILL.from_pretrained("tiny-random", load_diffusion=False)
    g.model.eval()
    return g


def _pixels(gill, images):
    from gill.images import open_image

    return gill.image_processor(images=[open_image(b) for b in images], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("first", ["text", "image"])
def test_an_interleaved_sequence_is_the_conversation_inference_builds(gill, first):
    """The training sequence of a story equals, position by position, what GILL.build_prompts makes of the
    same story followed by the [IMG] tokens: BOS only before the first text, each image as its prefix."""
    from PIL import Image

    red, blue = draw("red", "circle"), draw("blue", "square")
    texts = ["a red circle.", "it turns blue."] if first == "text" else ["", "it turns blue."]
    caption = "it grows."
    cfg = dataclasses.replace(RECIPES["tiny"], max_len=64)
    px = _pixels(gill, [red, blue])
    sample = Sample("s", px[1], caption, context=list(zip(texts, px)))
    text, context = batch_text(gill.tokenizer, [sample], cfg, gill.model.config)
    assert text.interleaved and context.shape == (2, *px.shape[1:])
    with torch.no_grad():
        prefix = gill.model.encode_images(context).prefix
        embeds, mask, labels, (rows, cols) = interleaved_inputs(gill.model, text, prefix, "cpu")
        conversation = [x for t, im in zip(texts, (red, blue)) for x in (t, Image.open(io.BytesIO(im))) if x != ""]
        expected = gill.build_prompts([conversation + [caption + gill.img_tokens.text]])[0].embeds
    assert embeds.shape[1] == len(expected)
    torch.testing.assert_close(embeds[0], expected, rtol=1e-6, atol=1e-6)
    k = gill.model.config.n_visual_tokens
    n = len(gill.img_tokens.ids)
    assert cols[0].tolist() == list(range(len(expected) - n, len(expected)))
    # targets: the text (also right after an image), [IMG0]; never a visual position or [IMG1..]
    first_image = len(gill.tokenizer(texts[0])["input_ids"]) if texts[0] else 0
    assert (labels[0, first_image:first_image + k] == -100).all()
    assert labels[0, -n] == gill.img_tokens.ids[0] and (labels[0, -n + 1:] == -100).all()
    assert labels[0, first_image + k] != -100


def test_a_batch_without_context_trains_exactly_as_before(gill):
    """Plain samples through the interleaved layout (a mixed batch) give the plain path's [IMG] states."""
    captions = ["a red circle", "a small blue square on the left"]
    text = tokenize(gill.tokenizer, captions, 32, len(gill.img_tokens.ids))
    with torch.no_grad():
        ids, mask, _, _ = img_token_inputs(gill.model, text, concat=False, device="cpu")
        plain = gill.model.img_token_forward(ids, mask).img_hidden
        mixed = tokenize(gill.tokenizer, captions, 32, len(gill.img_tokens.ids), contexts=[[], ["x"]], n_visual=2)
        mixed.context[1] = []  # as if its context were empty: the interleaved path on plain rows
        mixed.context.append([[5]])  # a third, interleaved row keeps the batch interleaved
        mixed.captions.append(text.captions[0])
        prefix = torch.zeros(1, gill.model.config.n_visual_tokens, gill.model.config.lm_hidden_size)
        _, _, hidden = img_token_forward(gill.model, mixed, False, "cpu", prefix)
    torch.testing.assert_close(hidden[:2], plain, rtol=1e-5, atol=1e-5)


def test_the_oldest_context_pairs_are_dropped_to_fit(gill):
    texts = [f"step {i}." for i in range(6)]
    n, k = len(gill.img_tokens.ids), gill.model.config.n_visual_tokens
    per_pair = len(gill.tokenizer(texts[0], add_special_tokens=False)["input_ids"]) + k
    max_len = len(gill.tokenizer("the end.")["input_ids"]) + n + 2 * per_pair + per_pair // 2  # room for two pairs
    text = tokenize(gill.tokenizer, ["the end."], max_len, n, contexts=[texts], n_visual=k)
    kept = text.context[0]
    assert len(kept) == 2
    assert kept == [gill.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[-2:]]
    sample = Sample("s", torch.zeros(3, 32, 32), "the end.", context=[(t, torch.full((3, 32, 32), float(i)))
                                                                     for i, t in enumerate(texts)])
    cfg = dataclasses.replace(RECIPES["tiny"], max_len=max_len)
    _, pixels = batch_text(gill.tokenizer, [sample], cfg, gill.model.config)
    assert pixels[:, 0, 0, 0].tolist() == [4.0, 5.0]  # the images kept are those of the texts kept


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_story_samples_are_read_from_shards_and_bad_contexts_are_counted(gill, tmp_path):
    red, blue = draw("red", "circle"), draw("blue", "circle")
    good = [("story.context.json", json.dumps(["a red circle.", "it turns blue."]).encode()),
            ("story.context0.png", red), ("story.context1.png", blue),
            ("story.txt", b"it grows."), ("story.png", blue)]
    missing = [("gap.context.json", json.dumps(["a red circle.", "it turns blue."]).encode()),
               ("gap.context0.png", red), ("gap.txt", b"it grows."), ("gap.png", blue)]
    not_a_list = [("odd.context.json", b'{"texts": 1}'), ("odd.txt", b"x"), ("odd.png", blue)]
    plain = [("plain.txt", b"a blue circle"), ("plain.png", blue)]
    _tar(tmp_path / "s.tar", good + missing + not_a_list + plain)
    stream = ShardStream([str(tmp_path / "s.tar")], gill.image_processor, None, shuffle_buffer=0, need_sd=False)
    counts = Counter()
    (batch, _), = global_batches(iter(stream), 2, counts, drop_last=False)
    by_key = {s.key.split("/")[-1]: s for s in batch}
    story = by_key["story"]
    assert [t for t, _ in story.context] == ["a red circle.", "it turns blue."]
    torch.testing.assert_close(story.context[0][1], _pixels(gill, [red])[0])
    assert by_key["plain"].context == []
    assert counts == Counter({"bad context": 2})


def test_a_training_step_on_stories_sends_gradient_into_the_visual_prefix_through_the_img_losses(gill):
    """The [IMG] losses of an interleaved sample reach the visual prefix (via its context images) even with
    the captioning loss off: the prefix learns to carry meaning in the middle of text."""
    from gill.losses import LossWeights

    model = gill.model
    px = _pixels(gill, [draw("red", "circle"), draw("blue", "circle")])
    samples = [Sample(f"s{i}", px[1], "it grows.", sd_embedding=torch.randn(model.config.gen_seq_len, model.config.gen_emb_dim),
                      context=[("a red circle.", px[0]), ("it turns blue.", px[1])]) for i in range(2)]
    text, context = batch_text(gill.tokenizer, samples, dataclasses.replace(RECIPES["tiny"], max_len=64), model.config)
    assert len(context) == 4
    step = TrainStep(model, LossWeights(caption=0.0))
    model.train()
    for p in model.adapter.parameters():
        p.grad = None
    out = step(torch.stack([s.pixel_values for s in samples]), text,
               torch.stack([s.sd_embedding for s in samples]), False, False, context)
    out.total.backward()
    model.eval()
    grads = [p.grad for p in model.adapter.visual_prefix.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0


def test_a_sample_sets_its_loss_weights_in_loss_json_and_a_bad_one_is_counted(gill, tmp_path):
    blue = draw("blue", "circle")
    _tar(tmp_path / "w.tar", [
        ("story.txt", b"it turns blue."), ("story.png", blue), ("story.loss.json", b'{"caption": 0, "mapper": 0.25}'),
        ("plain.txt", b"a blue circle"), ("plain.png", blue),
        ("typo.txt", b"x"), ("typo.png", blue), ("typo.loss.json", b'{"maper": 0.5}'),
        ("neg.txt", b"x"), ("neg.png", blue), ("neg.loss.json", b'{"mapper": -1}'),
        ("junk.txt", b"x"), ("junk.png", blue), ("junk.loss.json", b"0.5,"),
    ])
    stream = ShardStream([str(tmp_path / "w.tar")], gill.image_processor, None, shuffle_buffer=0, need_sd=False)
    samples = list(stream)
    by_key = {s.key.split("/")[-1]: s for s in samples}
    assert (by_key["story"].caption_weight, by_key["story"].mapper_weight) == (0.0, 0.25)
    assert (by_key["plain"].caption_weight, by_key["plain"].mapper_weight) == (1.0, 1.0)
    assert "maper" in by_key["typo"].error and "-1" in by_key["neg"].error and "not JSON" in by_key["junk"].error
    counts = Counter()
    list(global_batches(iter(samples), 8, counts, drop_last=False))
    assert counts == Counter({"bad loss.json": 3})


def test_a_mapper_weight_of_zero_leaves_the_mapper_to_the_other_samples(gill):
    """Per-sample mapper weights: a weight-0 sample adds nothing to the mapper loss, nor gradient to the
    mapper (its [IMG] states still train through retrieval); all weights 1 is the unweighted loss."""
    from gill.losses import LossWeights

    model = gill.model
    px = _pixels(gill, [draw("red", "circle"), draw("blue", "square")])
    target = torch.randn(2, model.config.gen_seq_len, model.config.gen_emb_dim, generator=torch.Generator().manual_seed(0))
    text, _ = batch_text(gill.tokenizer, [Sample(f"s{i}", px[i], c) for i, c in enumerate(["a red circle.", "a blue square."])],
                         RECIPES["tiny"], model.config)
    step = TrainStep(model, LossWeights())

    def run(weights):
        for p in model.adapter.parameters():
            p.grad = None
        out = step(px, text, target, False, False, None, weights)
        out.total.backward()
        return out

    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = run(None)
        both = run(torch.ones(2))
        first = run(torch.tensor([1.0, 0.0]))
        none = run(torch.zeros(2))
    assert both.mapper.item() == pytest.approx(plain.mapper.item(), rel=1e-6)
    with torch.no_grad():
        gen = model.generation_embeddings(img_token_forward(model, text, False, "cpu")[2])
        d0 = torch.linalg.vector_norm(gen[0] - target[0], dim=-1).mean().item()
    assert first.mapper.item() == pytest.approx(d0 / 2, rel=1e-5)
    assert none.mapper.item() == 0.0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.adapter.mapper.parameters())
    assert model.adapter.image_retrieval.weight.grad.abs().sum() > 0  # retrieval still trains


@pytest.mark.parametrize("concat", [False, True])
def test_a_caption_weight_of_zero_takes_the_sample_out_of_captioning(gill, concat):
    """Per-sample caption weights: the captioning loss of a batch whose second (and fourth) sample has weight
    0 equals that of the batch without them (its tokens are not targets, the mean is over the others);
    weights of 1 are the unweighted loss, and a weight of 2 counts a sample's tokens twice."""
    from gill import losses
    from training.step import caption_inputs, caption_token_weights

    model = gill.model
    caps = ["a red circle.", "it turns blue and then it grows a lot.", "a blue square.", "it moves."]
    px = _pixels(gill, [draw("red", "circle"), draw("blue", "circle"), draw("blue", "square"), draw("red", "square")])
    text, _ = batch_text(gill.tokenizer, [Sample(f"s{i}", px[i], c) for i, c in enumerate(caps)], RECIPES["tiny"], model.config)
    k = model.config.n_visual_tokens

    def loss(weights, rows=None):
        with torch.no_grad():
            prefix = model.encode_images(px).prefix
            embeds, mask, labels = caption_inputs(model, prefix, text, concat)
            logits = model.lm_forward(embeds, mask).logits
        w = caption_token_weights(labels, text, concat, torch.tensor(weights), k) if weights else None
        if w is not None:
            labels = labels.masked_fill(w == 0, losses.IGNORE_INDEX)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none",
                                               ignore_index=losses.IGNORE_INDEX)
        return losses.caption_loss(logits, labels, losses.num_targets(labels).float(), w).item(), ce, labels, w

    plain, ce, labels, _ = loss(None)
    ones, *_ = loss([1.0, 1.0, 1.0, 1.0])
    assert ones == pytest.approx(plain, rel=1e-6)
    without, _, kept, w = loss([1.0, 0.0, 1.0, 0.0])
    # the expected value: the mean over the tokens of samples 0 and 2 alone, read from the unweighted losses
    mine = (w[:, 1:] > 0) & (labels[:, 1:] != losses.IGNORE_INDEX)
    assert without == pytest.approx((ce[mine].sum() / mine.sum()).item(), rel=1e-5)
    assert (kept != losses.IGNORE_INDEX).sum() < (labels != losses.IGNORE_INDEX).sum()
    double, *_ = loss([2.0, 1.0, 1.0, 1.0])
    assert double > plain
