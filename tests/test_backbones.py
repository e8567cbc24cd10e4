import numpy as np
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
