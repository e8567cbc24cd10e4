import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from gill.checkpoint import (
    CheckpointError, adapter_shapes, check_state_dict, convert_original, load_model, load_safetensors,
    load_strict, read_model_dir, read_original_decision, save_model, save_safetensors, torch_load,
)
from gill.config import GILLConfig, config_from_model_args
from gill.decision import DecisionHead
from gill.model import GILLModel

from original_reference import original_mapper, original_state_dict


def write_original_release(tmp_path, backbones, config, dtype=torch.float32, prefix="model."):
    """Files in the original release's format, with the tiny backbones' dims: model_args.json and
    pretrained_ckpt.pth.tar ({'state_dict': OrderedDict} with the release's key names)."""
    g = torch.Generator().manual_seed(1)
    sd = original_state_dict(
        lm_dim=config.lm_hidden_size, vision_dim=config.vision_hidden_size, n_visual=4, ret_dim=16, gen_dim=24,
        gen_len=5, mapper_dim=32, ffn=64, n_enc=2, n_dec=2, generator=g, dtype=dtype,
    )
    sd = OrderedDict((k.replace("model.", prefix, 1), v) for k, v in sorted(sd.items()))
    torch.save({"state_dict": sd}, tmp_path / "pretrained_ckpt.pth.tar")
    ids = list(config.tokens.img_token_ids)
    args = {
        "opt_version": "facebook/opt-6.7b", "freeze_lm": True, "visual_encoder": "openai/clip-vit-large-patch14",
        "freeze_vm": True, "n_visual_tokens": 4, "ret_emb_dim": 16, "gen_emb_dim": 24, "text_emb_layers": [-1],
        "text_fc_mode": "gill_mapper", "ret_text_fc_mode": "linear", "num_tokens": 8, "num_clip_tokens": 5,
        "share_ret_gen": True, "norm_image_embed": "none", "retrieval_token_idx": ids, "gen_token_idx": ids,
    }
    (tmp_path / "model_args.json").write_text(json.dumps(args))
    return {k.replace(prefix, "model.", 1): v for k, v in sd.items()}


def test_original_checkpoint_converts_and_gives_hand_computed_embeddings(tmp_path, tiny_opt):
    backbones, config = tiny_opt
    original = write_original_release(tmp_path, backbones, config)
    out = convert_original(tmp_path / "model_args.json", tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "converted")
    model, decision = load_model(out, backbones.lm, backbones.vision)
    assert decision is None
    model.eval()
    cfg = model.config
    assert (cfg.mapper.hidden_dim, cfg.mapper.ffn_dim, cfg.mapper.num_encoder_layers) == (32, 64, 2)
    assert cfg.tokens.img_token_ids == config.tokens.img_token_ids

    # Text side: the [IMG] hidden states of a real forward, then the original's heads by hand.
    enc = backbones.tokenizer(["a red circle" + backbones.img_tokens.text], return_tensors="pt")
    pixels = torch.randn(2, 3, config.preprocess.image_size, config.preprocess.image_size)
    with torch.no_grad():
        h = model.img_token_forward(enc.input_ids, enc.attention_mask).img_hidden
        text_ret = model.text_retrieval_embeddings(h)
        gen = model.generation_embeddings(h)
        image = model.encode_images(pixels)
        pooled = backbones.vision(pixel_values=pixels).pooler_output
    W = lambda name: original[f"model.{name}.weight"]  # noqa: E731
    B = lambda name: original[f"model.{name}.bias"]  # noqa: E731
    torch.testing.assert_close(text_ret, h[:, 0] @ W("ret_text_hidden_fcs.0.model").T + B("ret_text_hidden_fcs.0.model"))
    torch.testing.assert_close(gen, original_mapper(original, h, original["model.input_embeddings.weight"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image.retrieval, pooled @ W("visual_fc").T + B("visual_fc"))
    prefix = (pooled @ W("visual_embeddings").T + B("visual_embeddings")).view(2, 4, config.lm_hidden_size)
    torch.testing.assert_close(image.prefix, prefix)
    # The [IMG] rows are used as input embeddings and (tied) as output rows.
    assert torch.equal(model.embed_tokens(torch.tensor([config.tokens.img_token_ids]))[0], original["model.input_embeddings.weight"])
    assert model.adapter.logit_scale.item() == original["model.logit_scale"].item()


def test_bf16_module_prefixed_checkpoint_converts_bit_exactly(tmp_path, tiny_opt):
    backbones, config = tiny_opt
    original = write_original_release(tmp_path, backbones, config, dtype=torch.bfloat16, prefix="module.model.")
    out = convert_original(tmp_path / "model_args.json", tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "converted")
    files = read_model_dir(out)
    assert files.adapter["img_embeddings"].dtype == torch.bfloat16
    assert torch.equal(files.adapter["img_embeddings"], original["model.input_embeddings.weight"])
    assert torch.equal(files.adapter["mapper.transformer.decoder.layers.1.multihead_attn.in_proj_weight"],
                       original["model.gen_text_hidden_fcs.0.tfm.decoder.layers.1.multihead_attn.in_proj_weight"])


def test_full_embedding_table_checkpoint_takes_the_img_rows(tmp_path, tiny_opt):
    backbones, config = tiny_opt
    write_original_release(tmp_path, backbones, config)
    pruned = read_model_dir(convert_original(tmp_path / "model_args.json", tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "p"))
    rows = torch.randn(config.tokens.vocab_size, config.lm_hidden_size)
    sd = torch.load(tmp_path / "pretrained_ckpt.pth.tar", weights_only=True)["state_dict"]
    sd["model.input_embeddings.weight"] = rows  # as in ckpt_best.pth.tar, before pruning
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "pretrained_ckpt.pth.tar")
    files = read_model_dir(convert_original(tmp_path / "model_args.json", tmp_path / "pretrained_ckpt.pth.tar", tmp_path / "c"))
    assert torch.equal(files.adapter["img_embeddings"], rows[config.tokens.img_token_ids])
    # every other tensor is the one the pruned checkpoint converts to
    assert files.adapter.keys() == pruned.adapter.keys()
    assert all(torch.equal(files.adapter[k], pruned.adapter[k]) for k in files.adapter if k != "img_embeddings")


def test_real_decision_model_loads_on_cpu_and_round_trips_exactly(tmp_path, shared_data):
    path = shared_data / "decision_model.pth.tar"
    raw = torch_load(path)["state_dict"]
    assert set(raw) == {"1.weight", "1.bias"}
    assert raw["1.weight"].shape == (2, 4096) and raw["1.weight"].device.type == "cpu"
    torch.testing.assert_close(raw["1.bias"], torch.tensor([-0.01004, -0.00290]), atol=1e-5, rtol=0)

    config, state = read_original_decision(path, config_from_model_args(shared_data / "model_args.json"))
    assert not config.decision.use_ret_score
    save_safetensors(state, tmp_path / "decision.safetensors")
    head = DecisionHead.from_config(config).eval()
    load_strict(head, load_safetensors(tmp_path / "decision.safetensors"), "decision.safetensors")
    assert torch.equal(head.linear.weight, raw["1.weight"]) and torch.equal(head.linear.bias, raw["1.bias"])
    x = torch.randn(3, 4096)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ raw["1.weight"].T + raw["1.bias"])


def test_paper_time_4097_decision_head_is_recognised(tmp_path):
    torch.save({"state_dict": OrderedDict({"1.weight": torch.randn(2, 4097), "1.bias": torch.zeros(2)})}, tmp_path / "d.pth.tar")
    base = GILLConfig()
    config, state = read_original_decision(tmp_path / "d.pth.tar", base)
    assert config.decision.use_ret_score and config.decision_features == 4097
    assert not base.decision.use_ret_score  # the input config is not modified
    assert state["linear.weight"].shape == (2, 4097)


def test_every_bad_key_is_listed_in_one_error(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config)
    state = dict(model.adapter.state_dict())
    del state["text_retrieval.bias"]
    del state["mapper.queries"]
    state["mapper.extra.weight"] = torch.zeros(3, 2)
    state["image_retrieval.weight"] = torch.zeros(7, 32)
    with pytest.raises(CheckpointError) as err:
        load_strict(model.adapter, state, "gill.safetensors")
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "missing:     mapper.queries (model expects [1, 5, 32])" in msg
    assert "missing:     text_retrieval.bias (model expects [16])" in msg
    assert "unexpected:  mapper.extra.weight (checkpoint has [3, 2])" in msg
    assert "mis-shaped:  image_retrieval.weight: checkpoint has [7, 32], model expects [16, 32]" in msg


def test_model_dir_round_trip(tmp_path, tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config)
    head = DecisionHead.from_config(config)
    save_model(tmp_path / "m", model, head)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "decision.safetensors", "gill.safetensors"]
    loaded, loaded_head = load_model(tmp_path / "m", backbones.lm, backbones.vision)
    assert loaded.config == model.config
    for k, v in model.adapter.state_dict().items():
        assert torch.equal(v, loaded.adapter.state_dict()[k]), k
    assert torch.equal(head.linear.weight, loaded_head.linear.weight)


def test_model_dir_with_other_config_is_refused(tmp_path, tiny_opt):
    backbones, config = tiny_opt
    save_model(tmp_path / "m", GILLModel(backbones.lm, backbones.vision, config))
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data["ret_emb_dim"] = 8
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"(?s)gill.safetensors does not match.*image_retrieval.weight: checkpoint has \[16, 32\], model expects \[8, 32\]"):
        read_model_dir(tmp_path / "m")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_that_call_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pth.tar: cannot be read as a weights-only") as e:
        torch_load(path)
    # one line, saying why and what to do; never torch's advice to load it with weights_only=False
    text = str(e.value)
    assert "\n" not in text and "refused for safety" in text and "convert the file to safetensors" in text
    assert "weights_only" not in text and "GLOBAL" in text


def test_missing_state_dict_entry_is_named(tmp_path):
    torch.save({"weights": {}}, tmp_path / "x.pth.tar")
    with pytest.raises(CheckpointError, match=r"x.pth.tar: expected a dict with a 'state_dict' entry, found \['weights'\]"):
        read_original_decision(tmp_path / "x.pth.tar", GILLConfig())


def test_adapter_shapes_need_no_memory():
    shapes = adapter_shapes(GILLConfig())
    assert shapes["visual_prefix.proj.weight"] == (16384, 1024)
    assert shapes["mapper.queries"] == (1, 77, 512)
    check_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}, shapes, "meta")


# ---- bad files name the file and the field -----------------------------------------------------------


def _saved(tmp_path, tiny_opt, name="m"):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config)
    return save_model(tmp_path / name, model, DecisionHead.from_config(config)), model


@pytest.mark.parametrize("cut", ["empty", "half", "garbage"])
def test_a_broken_weights_file_is_named(tmp_path, tiny_opt, cut):
    out, _ = _saved(tmp_path, tiny_opt)
    weights = out / "gill.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "half": data[: len(data) // 2], "garbage": b"\x10" + b"\x00" * 7 + b"{x"}[cut])
    with pytest.raises(CheckpointError, match=r"gill\.safetensors: not a readable safetensors file"):
        read_model_dir(out)


@pytest.mark.parametrize("field,value,message", [
    ("lm_hidden_size", "96", r"field lm_hidden_size is '96' \(str\); expected an integer"),
    ("n_visual_tokens", 4.0, r"field n_visual_tokens is 4.0 \(float\); expected an integer"),
    ("ret_emb_dim", -1, r"field ret_emb_dim is -1; expected an integer from 1 to 16384"),
    ("mapper.num_heads", "4", r"field mapper.num_heads is '4' \(str\)"),
    ("mapper.dropout", 1.5, r"field mapper.dropout is 1.5; expected a number in \[0, 1\)"),
    ("tie_img_embeddings", "yes", r"field tie_img_embeddings is 'yes' \(str\); expected true or false"),
    ("tokens.img_token_ids", "1,2", r"field tokens.img_token_ids is '1,2'"),
    ("preprocess.mean", [0.5, 0.5], r"field preprocess.mean is \[0.5, 0.5\]"),
    ("run.guidance_scale", "high", r"field run.guidance_scale is 'high'"),
])
def test_config_fields_of_the_wrong_type_name_the_file_and_the_field(tmp_path, tiny_opt, field, value, message):
    out, _ = _saved(tmp_path, tiny_opt)
    data = json.loads((out / "config.json").read_text())
    *parents, leaf = field.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = value
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"m/config\.json: " + message):
        read_model_dir(out)


def test_model_args_that_is_not_json_or_has_bad_fields_is_named(tmp_path, shared_data):
    (tmp_path / "model_args.json").write_text("{'opt_version': ")
    with pytest.raises(ValueError, match=r"model_args\.json: not valid JSON"):
        config_from_model_args(tmp_path / "model_args.json")
    args = json.loads((shared_data / "model_args.json").read_text())
    for key, bad in (("n_visual_tokens", "4"), ("retrieval_token_idx", 5), ("ret_emb_dim", 0)):
        (tmp_path / "model_args.json").write_text(json.dumps({**args, key: bad}))
        with pytest.raises(ValueError, match=rf"model_args\.json: field '{key}' is"):
            config_from_model_args(tmp_path / "model_args.json")


def test_a_backbone_path_that_does_not_exist_is_named_before_any_hub_lookup(tmp_path, tiny_opt):
    from gill.loading import ModelNotFoundError, load

    out, _ = _saved(tmp_path, tiny_opt)
    data = json.loads((out / "config.json").read_text())
    data["lm"] = str(tmp_path / "no" / "such" / "lm")
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelNotFoundError, match=r"config\.json: field lm is '.*no/such/lm', a path that does not exist"):
        load(out, load_index=False)


def test_a_model_directory_is_replaced_as_a_whole(tmp_path, tiny_opt, monkeypatch):
    import gill.checkpoint as ckpt

    out, model = _saved(tmp_path, tiny_opt)  # with a decision head
    # written again without a head: the old head does not survive, and the card says so
    save_model(out, model)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "gill.safetensors"]
    assert "| decision head | no |" in (out / "README.md").read_text()
    save_model(out, model, DecisionHead.from_config(model.config))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a write that dies half way leaves the previous directory, whole
    calls = []
    real = ckpt.save_safetensors

    def dies_on_the_second_file(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(state, path)

    monkeypatch.setattr(ckpt, "save_safetensors", dies_on_the_second_file)
    with torch.no_grad():
        model.adapter.logit_scale.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_model(out, model, DecisionHead.from_config(model.config))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_a_model_whose_backbone_folder_holds_a_pickle_is_refused_in_one_line_by_the_cli(tmp_path, tiny_opt):
    """``python -m gill generate`` on a model directory whose LM folder holds a pickled pytorch_model.bin:
    one line naming the file and the config field, no traceback, no advice to load it unsafely."""
    import subprocess
    import sys

    backbones, _ = tiny_opt
    out, _ = _saved(tmp_path, tiny_opt)
    lm = tmp_path / "lm"
    backbones.lm.save_pretrained(lm)
    backbones.tokenizer.save_pretrained(lm)
    (lm / "model.safetensors").unlink()
    torch.save({**backbones.lm.state_dict(), "extra": _Evil()}, lm / "pytorch_model.bin")
    backbones.vision.save_pretrained(tmp_path / "vision")
    data = json.loads((out / "config.json").read_text())
    data.update(lm=str(lm), vision=str(tmp_path / "vision"), tokenizer=str(lm), diffusion=None)
    (out / "config.json").write_text(json.dumps(data))
    r = subprocess.run([sys.executable, "-m", "gill", "generate", "--model", str(out), "a red square"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and "weights_only" not in r.stderr
    assert str(lm / "pytorch_model.bin") in errors[0] and "refused for safety" in errors[0]
    assert "pwned" not in r.stdout
