"""Small synthetic captioned-image shards for training tests: coloured shapes on a grey background."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def draw(color: str, shape: str, size: int = 32, jitter: int = 0) -> bytes:
    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    a, b = 6 + jitter, size - 6 + jitter
    if shape == "square":
        d.rectangle([a, a, b, b], fill=COLORS[color])
    elif shape == "circle":
        d.ellipse([a, a, b, b], fill=COLORS[color])
    else:
        d.polygon([(a, b), (b, b), ((a + b) // 2, a)], fill=COLORS[color])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pairs(n: int, offset: int = 0):
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(n):
        c, s = combos[(i + offset) % len(combos)]
        yield f"{i:06d}", draw(c, s, jitter=(i // len(combos)) % 3 - 1), f"a {c} {s}"


def write_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_dataset(root: Path, n_train: int = 48, n_val: int = 12, bad: bool = False) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    samples = list(pairs(n_train))
    half = len(samples) // 2
    extra = []
    if bad:
        extra = [("bad_image", b"\x89PNG broken", "a red square"), ("no_caption", draw("red", "circle"), "")]
    write_shard(root / "train-0.tar", samples[:half] + extra)
    write_shard(root / "train-1.tar", samples[half:])
    write_shard(root / "val-0.tar", list(pairs(n_val, offset=5)))
    return {"train": str(root / "train-{0..1}.tar"), "val": str(root / "val-0.tar")}


def png_bytes(color, size=(32, 32)) -> bytes:
    """A plain PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model_dir(tmp_path: Path, tiny_opt) -> Path:
    """A model directory at ``tmp_path / "model"`` whose backbones are the tiny ones saved beside it (no
    diffusion), as a user's own directory would be."""
    from gill.checkpoint import save_model
    from gill.model import GILLModel

    backbones, config = tiny_opt
    backbones.lm.save_pretrained(tmp_path / "lm")
    backbones.tokenizer.save_pretrained(tmp_path / "lm")
    backbones.vision.save_pretrained(tmp_path / "vision")
    config.lm, config.vision, config.diffusion = str(tmp_path / "lm"), str(tmp_path / "vision"), None
    save_model(tmp_path / "model", GILLModel(backbones.lm, backbones.vision, config))
    return tmp_path / "model"


def spy_diffusion(gill, monkeypatch) -> list[dict]:
    """Each diffusion call's scheduler class and arguments, as the pipeline saw them."""
    calls = []
    pipe = gill.diffusion.pipe
    real_call = type(pipe).__call__

    def spy(self, **kwargs):
        neg = kwargs.get("negative_prompt_embeds")
        calls.append({"scheduler": type(self.scheduler).__name__, "steps": kwargs["num_inference_steps"],
                      "guidance": kwargs["guidance_scale"], "height": kwargs.get("height"),
                      "width": kwargs.get("width"), "negative": None if neg is None else float(neg.abs().sum()),
                      "seeds": [g.initial_seed() for g in kwargs["generator"] or []]})
        return real_call(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    return calls
