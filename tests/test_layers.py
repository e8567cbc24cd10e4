import torch

from gill.checkpoint import adapter_shapes, check_state_dict, convert_original_state_dict
from gill.config import GILLConfig, MapperConfig, TokenConfig
from gill.layers import GILLMapper, VisualPrefix
from gill.model import GILLAdapter

from original_reference import original_mapper, original_state_dict

FULL = GILLConfig(tokens=TokenConfig(img_token_ids=list(range(50266, 50274)), vocab_size=50274))


def test_full_size_adapter_has_the_originals_parameter_count():
    with torch.device("meta"):
        adapter = GILLAdapter(FULL)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in adapter.named_children()}
    assert counts["mapper"] == 31_958_784  # ~31.96M, transformer ~29.4M
    assert sum(p.numel() for p in adapter.mapper.transformer.parameters()) == 29_427_712
    assert counts["visual_prefix"] == 16_793_600
    # 16.79M prefix + 0.26M visual_fc + 1.05M ret head + 31.96M mapper + 32.8K [IMG] rows + logit scale
    assert sum(p.numel() for p in adapter.parameters()) == 50_096_385


def test_release_key_names_and_shapes_map_onto_the_full_size_adapter():
    # Every key of the released checkpoint, at full size (meta tensors: no memory), converts with no
    # missing, unexpected or mis-shaped key.
    original = original_state_dict(device="meta")
    assert len(original) == 13 + 4 * 12 + 2 + 4 * 18 + 2
    converted = convert_original_state_dict(original, FULL)
    check_state_dict(converted, adapter_shapes(FULL), "full-size")


def test_mapper_matches_a_hand_computed_transformer():
    g = torch.Generator().manual_seed(0)
    sd = original_state_dict(lm_dim=24, vision_dim=8, ret_dim=8, gen_dim=12, gen_len=5, mapper_dim=16, ffn=32,
                             n_enc=2, n_dec=3, generator=g)
    mapper = GILLMapper(24, 12, 5, hidden_dim=16, num_heads=4, num_encoder_layers=2, num_decoder_layers=3, ffn_dim=32)
    cfg = GILLConfig(lm_hidden_size=24, vision_hidden_size=8, ret_emb_dim=8, gen_emb_dim=12, gen_seq_len=5,
                     mapper=MapperConfig(hidden_dim=16, ffn_dim=32, num_encoder_layers=2, num_decoder_layers=3),
                     tokens=TokenConfig(img_token_ids=list(range(8)), vocab_size=8))
    converted = convert_original_state_dict(sd, cfg)
    mapper.load_state_dict({k.removeprefix("mapper."): v for k, v in converted.items() if k.startswith("mapper.")})
    mapper.eval()
    hidden = torch.randn(3, 8, 24, generator=g)
    embs = sd["model.input_embeddings.weight"]
    expected = original_mapper(sd, hidden, embs)
    with torch.no_grad():
        got = mapper(hidden + embs)
    assert got.shape == (3, 5, 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Also in training mode (the encoder takes its slow path then).
    mapper.train()
    torch.testing.assert_close(mapper(hidden + embs), expected, rtol=1e-5, atol=1e-5)


def test_visual_prefix_reshapes_row_major():
    prefix = VisualPrefix(in_dim=3, out_dim=2, num_tokens=4)
    with torch.no_grad():
        prefix.proj.weight.zero_()
        prefix.proj.bias.copy_(torch.arange(8.0))
    out = prefix(torch.zeros(1, 3))
    assert out.tolist() == [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]]
