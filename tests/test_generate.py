import dataclasses

import pytest
import torch

from gill.generate import DecodeOptions, decode, decode_uncached, iter_decode, ImageEvent, TokenEvent
from gill.model import GILLModel


def prompt(model, backbones, text, with_image=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = backbones.tokenizer(text, return_tensors="pt").input_ids
    parts = []
    if with_image:
        size = model.config.preprocess.image_size
        parts.append(model.encode_images(torch.randn(1, 3, size, size, generator=g)).prefix)
    parts.append(model.embed_tokens(ids))
    return torch.cat(parts, dim=1)


def left_pad(embeds):
    width = max(e.shape[1] for e in embeds)
    out = torch.zeros(len(embeds), width, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), width, dtype=torch.long)
    for i, e in enumerate(embeds):
        out[i, width - e.shape[1]:] = e[0]
        mask[i, width - e.shape[1]:] = 1
    return out, mask


@pytest.fixture
def model_with_images(tiny):
    """A tiny model whose [IMG0] logit is raised so images appear mid-text."""
    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # large [IMG] rows: with these prompts images appear at varied positions
        model.adapter.img_embeddings.normal_(0, 1.0)
        model.adapter.img_output.normal_(0, 1.0)
    return model, backbones


PROMPTS = [("a red circle", True), ("a small blue square on the left moves to the right", True), ("next to it", False)]
OPTIONS = DecodeOptions(max_new_tokens=24, stop_on_eos=False)


def test_cached_greedy_equals_uncached_recompute(model_with_images):
    model, backbones = model_with_images
    counts = []
    with torch.no_grad():
        for i, (text, img) in enumerate(PROMPTS):
            embeds = prompt(model, backbones, text, img, seed=i)
            cached = decode(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long), OPTIONS)[0]
            reference = decode_uncached(model, embeds, OPTIONS)
            assert cached.token_ids == reference.token_ids
            assert cached.stop_reason == reference.stop_reason == "max_new_tokens"
            assert [s.position for s in cached.images] == [s.position for s in reference.images]
            for a, b in zip(cached.images, reference.images):
                torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
            counts.append(len(cached.images))
    assert sum(counts) >= 2  # [IMG] groups appear, so the chunked [IMG] feed is covered


def test_batched_equals_unbatched_row_by_row(model_with_images):
    model, backbones = model_with_images
    with torch.no_grad():
        embeds = [prompt(model, backbones, t, im, seed=i) for i, (t, im) in enumerate(PROMPTS)]
        batch, mask = left_pad(embeds)
        batched = decode(model, batch, mask, OPTIONS)
        # rows place their images differently, so chunks of one row are padded while another feeds [IMG]
        assert len({tuple(s.position for s in r.images) for r in batched}) == len(PROMPTS)
        for e, row in zip(embeds, batched):
            single = decode(model, e, torch.ones(e.shape[:2], dtype=torch.long), OPTIONS)[0]
            assert row.token_ids == single.token_ids
            assert [s.position for s in row.images] == [s.position for s in single.images]
            for a, b in zip(row.images, single.images):
                torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-4)


def test_img_tokens_come_as_a_group_and_one_to_seven_are_never_sampled(model_with_images):
    model, backbones = model_with_images
    ids = model.config.tokens.img_token_ids
    embeds = prompt(model, backbones, "a red circle")
    out = decode(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long),
                 DecodeOptions(max_new_tokens=40, img_scale_factor=1e5, stop_on_eos=False))[0]
    assert out.token_ids[:8] == ids  # a huge factor forces [IMG0] at once, as the original's evals do
    for s in out.images:
        assert out.token_ids[s.position:s.position + 8] == ids
    starts = [i for i, t in enumerate(out.token_ids) if t == ids[1]]
    assert all(out.token_ids[i - 1] == ids[0] for i in starts)


def test_min_tokens_max_images_and_no_images(model_with_images):
    model, backbones = model_with_images
    embeds = prompt(model, backbones, "a red circle")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    base = dict(max_new_tokens=40, img_scale_factor=1e5, stop_on_eos=False)
    late = decode(model, embeds, mask, DecodeOptions(**base, min_tokens_before_image=3))[0]
    assert late.images and late.images[0].position == 3
    one = decode(model, embeds, mask, DecodeOptions(**base, max_images=1))[0]
    assert len(one.images) == 1
    none = decode(model, embeds, mask, DecodeOptions(**base, allow_images=False))[0]
    assert none.images == [] and model.config.tokens.img_token_ids[0] not in none.token_ids


def test_end_at_image_stops_a_row_right_after_its_img_group_in_every_decoder(model_with_images):
    model, backbones = model_with_images
    ids = model.config.tokens.img_token_ids
    with torch.no_grad():
        embeds = [prompt(model, backbones, t, im, seed=i) for i, (t, im) in enumerate(PROMPTS)]
        free = [decode_uncached(model, e, OPTIONS) for e in embeds]
        ended = DecodeOptions(max_new_tokens=24, stop_on_eos=False, end_at_image=True)
        batch, mask = left_pad(embeds)
        batched = decode(model, batch, mask, ended)
        for e, full, row in zip(embeds, free, batched):
            reference = decode_uncached(model, e, ended)
            if not full.images:  # a row that never shows a picture runs on as before
                assert row.token_ids == full.token_ids and row.stop_reason == "max_new_tokens"
                continue
            end = full.images[0].position + len(ids)
            # the same tokens up to and with the first [IMG] group, then nothing more
            assert row.token_ids == reference.token_ids == full.token_ids[:end]
            assert row.stop_reason == reference.stop_reason == "image" and len(row.images) == 1
            torch.testing.assert_close(row.images[0].hidden, full.images[0].hidden, rtol=1e-4, atol=1e-4)
    assert sum(bool(f.images) for f in free) >= 2
    with pytest.raises(TypeError, match="end_at_image"):
        DecodeOptions(end_at_image="yes").validated()


def test_stops_on_eos_and_stop_strings(model_with_images):
    model, backbones = model_with_images
    tok = backbones.tokenizer
    embeds = prompt(model, backbones, "a red circle")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    free = decode(model, embeds, mask, DecodeOptions(max_new_tokens=12, allow_images=False, stop_on_eos=False))[0]
    # Make the third generated token the EOS: stop right there.
    third = free.token_ids[2]
    stopped = decode(model, embeds, mask, DecodeOptions(max_new_tokens=12, allow_images=False), eos_token_id=third)[0]
    assert stopped.stop_reason == "eos" and stopped.token_ids == free.token_ids[: free.token_ids.index(third) + 1]
    text = tok.decode(free.token_ids[:4])
    target = text[-2:]
    by_string = decode(model, embeds, mask, DecodeOptions(max_new_tokens=12, allow_images=False, stop_on_eos=False, stop_strings=(target,)),
                       decode_text=tok.decode)[0]
    assert by_string.stop_reason == "stop_string" and target in tok.decode(by_string.token_ids)
    assert len(by_string.token_ids) <= 4


def test_events_stream_in_order(model_with_images):
    model, backbones = model_with_images
    embeds = prompt(model, backbones, "a red circle")
    opts = DecodeOptions(max_new_tokens=20, stop_on_eos=False)
    events = list(iter_decode(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long), opts))
    assert type(events[-1]).__name__ == "DoneEvent"
    streamed = []
    for e in events[:-1]:
        streamed.extend(model.config.tokens.img_token_ids if isinstance(e, ImageEvent) else [e.token_id])
        assert isinstance(e, (TokenEvent, ImageEvent))
    assert streamed == decode(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long), opts)[0].token_ids


def test_sampling_is_seeded(model_with_images):
    model, backbones = model_with_images
    embeds = prompt(model, backbones, "a red circle")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    opts = DecodeOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, allow_images=False)
    a = decode(model, embeds, mask, opts, generator=torch.Generator().manual_seed(3))[0]
    b = decode(model, embeds, mask, opts, generator=torch.Generator().manual_seed(3))[0]
    assert a.token_ids == b.token_ids
    # the seed and the temperature are used: other seeds draw other tokens at temperature 1, and a temperature
    # near 0 draws the greedy tokens whatever the seed (a sampler that ignored either would fail here)
    others = {tuple(decode(model, embeds, mask, opts, generator=torch.Generator().manual_seed(s))[0].token_ids)
              for s in range(4, 10)}
    assert len(others | {tuple(a.token_ids)}) > 1
    greedy = decode(model, embeds, mask, dataclasses.replace(opts, temperature=0.0, top_p=1.0, top_k=0))[0].token_ids
    cold = dataclasses.replace(opts, temperature=1e-4, top_p=1.0, top_k=0)
    assert all(decode(model, embeds, mask, cold, generator=torch.Generator().manual_seed(s))[0].token_ids == greedy
               for s in range(4, 10))


@pytest.fixture
def opt_model(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.adapter.img_embeddings.normal_(0, 1.0)
    return model, backbones


def test_static_opt_decoder_equals_the_hf_cache(opt_model):
    model, backbones = opt_model
    with torch.no_grad():
        embeds = [prompt(model, backbones, t, im, seed=i) for i, (t, im) in enumerate(PROMPTS)]
        batch, mask = left_pad(embeds)
        opts = dict(max_new_tokens=24, stop_on_eos=False)
        hf = decode(model, batch, mask, DecodeOptions(**opts, backend="hf"))
        static = decode(model, batch, mask, DecodeOptions(**opts, backend="static"))
    assert sum(len(r.images) for r in hf) >= 2
    for a, b in zip(hf, static):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.images, b.images):
            torch.testing.assert_close(x.hidden, y.hidden, rtol=1e-4, atol=1e-4)


def test_static_decoder_refuses_other_lms(tiny):
    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    embeds = prompt(model, backbones, "a red circle")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if config.tie_img_embeddings:  # OPT
        assert decode(model, embeds, mask, DecodeOptions(max_new_tokens=4, backend="static"))[0].token_ids
    else:
        with pytest.raises(ValueError, match="needs a pre-LN OPT"):
            decode(model, embeds, mask, DecodeOptions(max_new_tokens=4, backend="static"))


@pytest.mark.gpu
def test_cuda_graph_steps_equal_the_hf_cache(opt_model):
    model, backbones = opt_model
    with torch.no_grad():
        batch, mask = left_pad([prompt(model, backbones, t, im, seed=i) for i, (t, im) in enumerate(PROMPTS)])
        model.to("cuda")
        batch, mask = batch.cuda(), mask.cuda()
        opts = dict(max_new_tokens=24, stop_on_eos=False)
        hf = decode(model, batch, mask, DecodeOptions(**opts, backend="hf"))
        for _ in range(2):  # the second call replays the captured graph of the first
            graph = decode(model, batch, mask, DecodeOptions(**opts, backend="static"))
            assert [r.token_ids for r in graph] == [r.token_ids for r in hf]


def test_the_kv_cache_goes_by_the_lms_own_keyword_and_matches_a_full_forward(tiny):
    """GILLModel.lm_forward hands the KV cache over under the LM's own keyword (``cache`` in transformers 5.x,
    where ``past_key_values`` is deprecated and warns on every call), and a cached step gives the logits of a
    full forward over the same positions."""
    import warnings

    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    embeds, mask = model.embed_tokens(ids), torch.ones_like(ids)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = model.lm_forward(embeds[:, :4], mask[:, :4], use_cache=True)
        step = model.lm_forward(embeds[:, 4:], mask, past_key_values=first.past_key_values, use_cache=True)
        full = model.lm_forward(embeds, mask)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    assert first.past_key_values is not None and step.past_key_values is not None
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
