"""gill.images: the one image opener, and the library's and the app's paths through it."""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib

import pytest
from memory import peak_growth
from PIL import Image

from gill.images import ImageError, ImageLimits, check_image, open_image

GB = 2**30


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def tiny_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of any size whose pixel data compresses to almost nothing (a bomb's
    shape: a few hundred bytes on disk, ``width * height`` pixels decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


BAD = {
    "wide.png": (tiny_png(60000, 1), "aspect ratio of 60000:1"),
    "bomb.png": (tiny_png(20000, 20000), "too large"),
    "empty.png": (b"", "not an image"),
    "notes.png": (b"hello, I am text", "not an image"),
    "truncated.png": (png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))[:300], "broken"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_one_error_naming_the_file_and_the_reason(tmp_path, name):
    data, reason = BAD[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageError) as err:
        open_image(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and reason in err.value.reason
    with pytest.raises(ImageError, match=name):  # bytes with a name, as the dataset readers pass them
        open_image(data, name=name)


def test_the_bomb_file_is_small_on_disk():
    assert len(BAD["bomb.png"][0]) < 100_000 and len(BAD["wide.png"][0]) < 1000


def test_every_mode_becomes_rgb_and_transparency_goes_over_white():
    cases = {
        "RGBA": (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),
        "LA": (Image.new("LA", (4, 4), (0, 255)), (0, 0, 0)),
        "I;16": (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        "L": (Image.new("L", (4, 4), 128), (128, 128, 128)),
        "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
        "P": (Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), (0, 0, 255)),
    }
    for mode, (image, pixel) in cases.items():
        out = open_image(png_bytes(image), name=mode)
        assert out.mode == "RGB" and out.size == (4, 4) and out.getpixel((0, 0)) == pixel, mode
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG")
    assert open_image(buf.getvalue()).getpixel((0, 0))[0] > 200


def test_in_memory_images_are_bounded_too():
    with pytest.raises(ImageError, match="0x0"):
        check_image(Image.new("RGB", (0, 0)), name="upload")
    with pytest.raises(ImageError, match="aspect ratio"):
        check_image(Image.new("L", (5000, 10)), name="upload")
    with pytest.raises(TypeError, match="upload: expected a PIL.Image"):
        check_image("photo.png", name="upload")
    assert check_image(Image.new("RGB", (30, 20))).size == (30, 20)
    # a caller may admit more (panoramas) or less
    assert open_image(png_bytes(Image.new("L", (300, 10))), limits=ImageLimits(max_aspect=40)).size == (300, 10)
    with pytest.raises(ImageError, match="MB"):
        open_image(png_bytes(Image.effect_noise((64, 64), 40)), limits=ImageLimits(max_bytes=1000))


def test_a_missing_file_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        open_image("nowhere.png")


# ---- the paths that reach the CLIP preprocessing ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from gill import GILL

    return GILL.from_pretrained("tiny-random")


def test_the_60000x1_image_stays_under_1gb_through_the_library(tiny, tmp_path):
    from pathlib import Path

    (tmp_path / "wide.png").write_bytes(BAD["wide.png"][0])
    grown, result = peak_growth(lambda: tiny.generate_interleaved([Path(tmp_path / "wide.png"), "a"], max_new_tokens=2))
    assert isinstance(result, ImageError) and "conversation 0, item 0" in str(result) and "wide.png" in str(result)
    assert grown < GB, f"peak memory grew by {grown / GB:.2f} GB"
    wide = Image.new("L", (60000, 1))  # already decoded: the resize is what would blow up
    grown, result = peak_growth(lambda: tiny.generate_interleaved([wide, "a"], max_new_tokens=2))
    assert isinstance(result, ImageError) and "aspect ratio" in str(result) and grown < GB
    # and the next call works
    assert tiny.generate_interleaved([Image.new("RGB", (40, 30), "red"), "a"], max_new_tokens=2)


def test_the_60000x1_image_stays_under_1gb_through_the_app(tmp_path):
    from app.app import BadInput, load_user_image

    (tmp_path / "wide.png").write_bytes(BAD["wide.png"][0])
    grown, result = peak_growth(lambda: load_user_image(str(tmp_path / "wide.png")))
    assert isinstance(result, BadInput) and "wide.png" in str(result) and "aspect ratio" in str(result)
    assert grown < GB
    (tmp_path / "bomb.png").write_bytes(BAD["bomb.png"][0])
    grown, result = peak_growth(lambda: load_user_image(str(tmp_path / "bomb.png")))
    assert isinstance(result, BadInput) and "bomb.png" in str(result) and grown < GB


def test_atomic_writes_keep_the_umask_and_use_unique_names(tmp_path):
    from gill._io import atomic_dir, atomic_path, atomic_write_text, unique_temp_name

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600
    finally:
        os.umask(old)
    assert unique_temp_name(tmp_path / "x") != unique_temp_name(tmp_path / "x")
    # two writers of one file: both temporary files coexist, the last rename wins, nothing is left over
    with atomic_path(tmp_path / "c.txt") as t1, atomic_path(tmp_path / "c.txt") as t2:
        t1.write_text("one")
        t2.write_text("two")
    assert (tmp_path / "c.txt").read_text() == "one"  # the outer one finished last
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as new:
            (new / "new.txt").write_text("new")
            raise RuntimeError("killed while writing")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["old.txt"]  # the old directory, whole
    with atomic_dir(tmp_path / "d") as new:
        (new / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.txt", "d"]


def test_paths_from_data_files_stay_inside_their_root(tmp_path):
    from gill._io import inside

    (tmp_path / "root").mkdir()
    assert inside(tmp_path / "root", "a/b.png") == (tmp_path / "root" / "a" / "b.png").resolve()
    for bad in ("../secret", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="points outside"):
            inside(tmp_path / "root", bad, what="photo id")
    os.symlink("/etc", tmp_path / "root" / "link")
    with pytest.raises(ValueError, match="link/passwd"):
        inside(tmp_path / "root", "link/passwd")
