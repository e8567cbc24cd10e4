"""The opt-in speed-ups of the static OPT decoder (fused q/k/v, torch.compile of the step, int8 weights)
decode what the eager Hugging Face forward decodes, on a tiny random OPT in float32."""

import sys
import time

import pytest
import torch

from gill.generate import DecodeOptions, decode
from gill.model import GILLModel
from gill.opt_static import DecoderOptions, StaticOPTDecoder, quantize_lm_int8, set_decoder_options

STEPS = 16


@pytest.fixture
def model(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # large [IMG] rows, so [IMG] groups (the chunked feed) appear in decode()
        model.adapter.img_embeddings.normal_(0, 1.0)
    return model, backbones


def prompts(model, backbones):
    """Three prompts of different lengths (one with an image prefix), left-padded into one batch."""
    texts = ["a red circle", "a small blue square on the left moves to the right", "next to it"]
    rows = []
    for i, text in enumerate(texts):
        parts = [model.embed_tokens(backbones.tokenizer(text, return_tensors="pt").input_ids)]
        if i == 0:
            size = model.config.preprocess.image_size
            image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(i))
            parts.insert(0, model.encode_images(image).prefix)
        rows.append(torch.cat(parts, dim=1))
    width = max(r.shape[1] for r in rows)
    batch = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1]:] = r[0]
        mask[i, width - r.shape[1]:] = 1
    return rows, batch, mask


@torch.no_grad()
def eager_greedy(model, embeds, steps=STEPS):
    """The reference: greedy decoding of one unpadded row by the Hugging Face forward over the whole
    sequence at every step (no cache). Returns the tokens and the logits each was chosen from."""
    tokens, logits = [], []
    for _ in range(steps):
        ids = torch.tensor([tokens], dtype=torch.long)
        seq = torch.cat([embeds, model.embed_tokens(ids)], dim=1) if tokens else embeds
        last = model.lm_forward(seq, torch.ones(seq.shape[:2], dtype=torch.long)).logits[0, -1]
        logits.append(last)
        tokens.append(int(last.argmax()))
    return tokens, torch.stack(logits)


@torch.no_grad()
def static_greedy(decoder, batch, mask, steps=STEPS):
    """Greedy decoding of a left-padded batch by the decoder alone, one token per step."""
    logits = [decoder.prefill(batch, mask)]
    tokens = [logits[-1].argmax(-1)]
    valid = torch.ones(batch.shape[0], 1, dtype=torch.bool)
    for _ in range(steps - 1):
        step_logits, _ = decoder.feed(tokens[-1][:, None], valid)
        logits.append(step_logits[:, -1])
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1).tolist(), torch.stack(logits, 1)


def assert_equals_eager(model, backbones, decoder):
    rows, batch, mask = prompts(model, backbones)
    tokens, logits = static_greedy(decoder, batch, mask)
    for r, row in enumerate(rows):
        ref_tokens, ref_logits = eager_greedy(model, row)
        assert tokens[r] == ref_tokens
        torch.testing.assert_close(logits[r], ref_logits, rtol=1e-5, atol=1e-5)
    return tokens


def test_fused_qkv_decodes_the_eager_tokens_and_logits(model):
    model, backbones = model
    decoder = StaticOPTDecoder(model, batch=3, max_len=64, fused_qkv=True)
    tokens = assert_equals_eager(model, backbones, decoder)
    assert len({tuple(t) for t in tokens}) == 3  # the rows decode different texts


def test_fused_qkv_costs_one_copy_of_the_qkv_weights_shared_by_decoders(model):
    model, _ = model
    cfg = model.lm.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    assert StaticOPTDecoder(model, batch=1, max_len=32).extra_bytes == 0
    a = StaticOPTDecoder(model, batch=1, max_len=32, fused_qkv=True)
    b = StaticOPTDecoder(model, batch=2, max_len=64, fused_qkv=True)
    assert a.extra_bytes == layers * (3 * d * d + 3 * d) * 4  # float32
    assert all(x[0].data_ptr() == y[0].data_ptr() for x, y in zip(a._qkv, b._qkv))  # one copy for both
    attn = model.lm.get_decoder().layers[0].self_attn
    torch.testing.assert_close(a._qkv[0][0], torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                               rtol=0, atol=0)


def test_fused_decoder_through_decode_equals_the_hf_cache(model):
    """The whole decoding loop (prefill, steps, [IMG] chunks, padding) with fused decoders equals the HF
    backend; decoders go back to the defaults when the options are cleared."""
    model, backbones = model
    _, batch, mask = prompts(model, backbones)
    opts = dict(max_new_tokens=24, stop_on_eos=False)
    with torch.no_grad():
        hf = decode(model, batch, mask, DecodeOptions(**opts, backend="hf"))
        set_decoder_options(model, DecoderOptions(fused_qkv=True))
        try:
            fused = decode(model, batch, mask, DecodeOptions(**opts, backend="static"))
        finally:
            set_decoder_options(model, None)
    assert sum(len(r.images) for r in hf) >= 2
    for a, b in zip(hf, fused):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.images, b.images):
            torch.testing.assert_close(x.hidden, y.hidden, rtol=1e-5, atol=1e-5)


def test_a_compiled_step_traces_once_across_a_decode(model):
    """Dynamo-level check with a cheap backend: one graph for all steps of a decode (no graph break, no
    recompile); the tokens and logits are the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, backbones = model
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    decoder = StaticOPTDecoder(model, batch=3, max_len=64, fused_qkv=True, compile=True, compile_mode=None,
                               compile_backend=counter)
    assert_equals_eager(model, backbones, decoder)
    assert counter.frame_count == 1
    decoder.reset()  # a second decode on the same decoder compiles nothing
    assert_equals_eager(model, backbones, decoder)
    assert counter.frame_count == 1


@pytest.mark.slow  # inductor compiles C++ on the CPU
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_an_inductor_compiled_step_compiles_once_and_decodes_the_eager_tokens(model, fused_qkv):
    from torch._dynamo.utils import counters

    model, backbones = model
    torch._dynamo.reset()
    counters.clear()
    decoder = StaticOPTDecoder(model, batch=3, max_len=64, fused_qkv=fused_qkv, compile=True, compile_mode=None)
    start = time.perf_counter()
    assert_equals_eager(model, backbones, decoder)
    print(f"first decode with compile: {time.perf_counter() - start:.1f} s")
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    decoder.reset()
    assert_equals_eager(model, backbones, decoder)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_mode_with_its_own_cuda_graphs_is_not_captured_twice(model):
    model, _ = model
    decoder = StaticOPTDecoder(model, batch=1, max_len=32, compile=True, compile_mode="reduce-overhead")
    assert decoder.use_cuda_graph is False
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        StaticOPTDecoder(model, batch=1, max_len=32, use_cuda_graph=True, compile=True, compile_mode="reduce-overhead")


def test_int8_without_torchao_says_how_to_install_it(model, monkeypatch):
    model, _ = model
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao...` fail as if absent
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match="needs torchao.*pip install torchao"):
        quantize_lm_int8(model.lm)
    assert type(model.lm.get_decoder().layers[0].fc1.weight) is torch.nn.Parameter  # left as it was


def test_int8_lm_decodes_through_the_static_decoder_as_through_hf(model):
    pytest.importorskip("torchao")
    model, backbones = model
    head = model.lm.get_output_embeddings().weight
    quantize_lm_int8(model.lm)
    layer = model.lm.get_decoder().layers[0]
    assert type(layer.fc1.weight) is not torch.nn.Parameter  # quantized
    assert model.lm.get_output_embeddings().weight is head  # the tied head is left alone
    _, batch, mask = prompts(model, backbones)
    opts = dict(max_new_tokens=STEPS, stop_on_eos=False)
    with torch.no_grad():
        hf = decode(model, batch, mask, DecodeOptions(**opts, backend="hf"))
        static = decode(model, batch, mask, DecodeOptions(**opts, backend="static"))
    assert [r.token_ids for r in static] == [r.token_ids for r in hf]
    with pytest.raises(ValueError, match="fused_qkv needs plain q/k/v weights"):
        StaticOPTDecoder(model, batch=1, max_len=32, fused_qkv=True)
