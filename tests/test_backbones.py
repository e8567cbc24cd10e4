import json

import numpy as np
import pytest
import torch
from PIL import Image

from gill.backbones import build_tokenizer, image_processor, load_backbones
from gill.config import CLIP_MEAN, CLIP_STD, PreprocessConfig
from gill.model import GILLModel


def test_image_processor_follows_the_config():
    proc = image_processor(PreprocessConfig(image_size=16))
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 16, 32))  # a blue left quarter, cut away by the center crop
    pixels = proc(images=[wide], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 8, 8], expected, atol=1e-4, rtol=0)
    squash = image_processor(PreprocessConfig(image_size=16, resize="squash"))(images=[wide], return_tensors="pt")["pixel_values"]
    assert squash[0, 2, 8, 0] > 1.0  # the blue quarter survives a squash


def test_tokenizer_is_exactly_the_requested_size_and_decodes():
    tok = build_tokenizer(400)
    assert len(tok) == 400
    ids = tok("a red circle on the left")["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and tok.pad_token_id == 1
    assert tok.decode(ids[1:]) == "a red circle on the left"


def test_backbones_load_from_local_paths(tmp_path, tiny_opt):
    # The real loading path (from_pretrained on a directory), offline.
    backbones, config = tiny_opt
    backbones.lm.save_pretrained(tmp_path / "lm")
    backbones.tokenizer.save_pretrained(tmp_path / "lm")
    backbones.vision.save_pretrained(tmp_path / "vision")
    config.lm, config.vision = str(tmp_path / "lm"), str(tmp_path / "vision")
    loaded = load_backbones(config, torch_dtype=torch.float32)
    assert loaded.img_tokens.ids == tuple(config.tokens.img_token_ids)
    ids = torch.tensor([[2, 70, 80] + config.tokens.img_token_ids])
    a, b = GILLModel(backbones.lm, backbones.vision, config).eval(), GILLModel(loaded.lm, loaded.vision, config).eval()
    b.adapter.load_state_dict(a.adapter.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a.img_token_forward(ids, torch.ones_like(ids)).img_hidden,
                                   b.img_token_forward(ids, torch.ones_like(ids)).img_hidden)
    pixels = loaded.image_processor(images=[Image.fromarray(np.zeros((40, 40, 3), np.uint8))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, config.preprocess.image_size, config.preprocess.image_size)


class _RunsCode:
    """A pickle that would call a function when loaded (the reason pickled weights are refused)."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_weights_in_a_backbone_folder_are_refused_in_one_line(tmp_path, tiny_opt, capsys):
    from gill.backbones import load_lm, load_vision

    backbones, _ = tiny_opt
    for name, module, load in (("lm", backbones.lm, load_lm), ("vision", backbones.vision, load_vision)):
        folder = tmp_path / name
        module.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        torch.save({**module.state_dict(), "extra": _RunsCode()}, folder / "pytorch_model.bin")
        with pytest.raises(Exception) as e:
            load(str(folder))
        text = str(e.value)
        assert isinstance(e.value, ValueError), text  # what the front ends report as one line
        assert "\n" not in text and str(folder / "pytorch_model.bin") in text
        assert "refused for safety" in text and "convert them to safetensors" in text
        assert "weights_only" not in text
    assert "pickle code ran" not in capsys.readouterr().out


def test_a_model_folder_with_code_of_its_own_is_refused_without_asking(tmp_path, tiny_opt, capsys):
    """transformers asks "run the custom code? [y/N]" on a folder whose config.json has auto_map; gill
    passes trust_remote_code=False everywhere, so it is refused at once, with or without a terminal."""
    from gill.backbones import load_lm, load_tokenizer

    backbones, _ = tiny_opt
    folder = tmp_path / "lm"
    backbones.lm.save_pretrained(folder)
    backbones.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="their-own", auto_map={"AutoConfig": "their.Config", "AutoModelForCausalLM": "their.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "their.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(Exception) as e:
        load_lm(str(folder))
    text = str(e.value)
    assert isinstance(e.value, ValueError), text
    assert "\n" not in text and str(folder) in text and "auto_map" in text and "never runs code" in text
    load_tokenizer(str(folder))  # its tokenizer is a plain one: read without a question
    captured = capsys.readouterr()
    assert "[y/N]" not in captured.out + captured.err
    assert not marker.exists()
