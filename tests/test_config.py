import json

import pytest

from gill.config import ChatCard, ConfigError, GILLConfig, MapperConfig, TokenConfig, config_from_model_args


def test_json_round_trip_preserves_every_field(tmp_path):
    cfg = GILLConfig(
        lm="some/lm", lm_hidden_size=64, mapper=MapperConfig(hidden_dim=32, num_encoder_layers=2),
        tokens=TokenConfig(img_token_ids=[10, 11, 12, 13, 14, 15, 16, 17], vocab_size=18),
    )
    cfg.decision.use_ret_score = True
    cfg.chat = ChatCard(hint="**knows** shapes", examples=["a red circle.", "it turns blue."])
    path = tmp_path / "config.json"
    cfg.to_json(path)
    back = GILLConfig.from_json(path)
    assert back == cfg
    assert isinstance(back.preprocess.mean, tuple) and isinstance(back.decision.labels, tuple)


def test_unknown_field_is_named_with_the_file(tmp_path):
    data = GILLConfig().to_dict()
    data["mapper"]["hiden_dim"] = 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json: unknown field\(s\) \['mapper.hiden_dim'\]"):
        GILLConfig.from_json(path)


def test_a_chat_card_is_read_from_the_config_and_an_older_config_has_none(tmp_path):
    """The model directory tells a chat what it knows (config.json's ``chat``: hint and examples), which the
    app shows; a version-2 config (before the block) reads as none, and a bad block is named."""
    from app.conversation import model_hint

    old = GILLConfig().to_dict()
    del old["chat"]
    old["format_version"] = 2
    assert GILLConfig.from_dict(old).chat == ChatCard()
    data = {**GILLConfig().to_dict(), "chat": {"hint": "shapes only", "examples": ["a red circle."]}}
    cfg = GILLConfig.from_dict(data)
    pipeline = type("P", (), {"model": type("M", (), {"config": cfg})()})()
    assert model_hint(pipeline) == ("shapes only", ["a red circle."])
    pipeline.model.config = GILLConfig.from_dict(old)
    assert model_hint(pipeline) is None
    with pytest.raises(ConfigError, match=r"m/config.json: field chat.examples is 'a' \(str\)"):
        GILLConfig.from_dict({**data, "chat": {"examples": "a"}}, source="m/config.json")


def test_newer_format_is_refused():
    data = GILLConfig().to_dict()
    data["format_version"] = 99
    with pytest.raises(ConfigError, match="format_version 99"):
        GILLConfig.from_dict(data)


def test_reads_the_original_model_args(shared_data):
    cfg = config_from_model_args(shared_data / "model_args.json")
    assert cfg.lm == "facebook/opt-6.7b" and cfg.vision == "openai/clip-vit-large-patch14"
    assert (cfg.lm_hidden_size, cfg.vision_hidden_size) == (4096, 1024)
    assert (cfg.n_visual_tokens, cfg.ret_emb_dim, cfg.gen_emb_dim, cfg.gen_seq_len) == (4, 256, 768, 77)
    assert cfg.tokens.img_token_ids == list(range(50266, 50274))
    assert cfg.tokens.vocab_size == 50274
    assert cfg.tie_img_embeddings


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("text_fc_mode", "linear", "'text_fc_mode' is 'linear'"),
        ("text_emb_layers", [-2], "'text_emb_layers'"),
        ("share_ret_gen", False, "share_ret_gen"),
        ("opt_version", "mystery/lm", "unknown LM 'mystery/lm'; pass lm_hidden_size"),
    ],
)
def test_unsupported_model_args_are_named(shared_data, field, value, message):
    args = json.loads((shared_data / "model_args.json").read_text())
    args[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_model_args(args)


def test_missing_model_args_fields_are_listed():
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['opt_version'"):
        config_from_model_args({"visual_encoder": "x"})
