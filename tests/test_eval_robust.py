"""The eval harness on bad data, bad files and bad arguments: bad items are skipped and counted with their
reason, the good ones come out exactly as from a run without the bad ones, and nothing is lost on resume."""

import dataclasses
import json
import logging

import pytest
import torch
from memory import peak_growth
from PIL import Image

from gill.eval.data import load_visdial, load_vist

GB = 2**30
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "navy", "pink", "teal",
          "brown", "olive", "maroon"]
GOOD = {"g1": list(range(100, 105)), "g2": list(range(105, 110)), "g3": list(range(110, 115))}


def noise(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def sis(path, stories):
    """Stories -> a SIS file; each story a (story id, [photo ids]); an id may occur twice (a duplicate)."""
    annotations = [[{"story_id": sid, "photo_flickr_id": str(pid), "worker_arranged_photo_order": order,
                     "original_text": f"{sid} step {order}: a {COLORS[order]} picture", "text": "lower"}]
                   for sid, pids in stories for order, pid in reversed(list(enumerate(pids)))]
    path.write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vist(tmp_path_factory):
    """A VIST-format fixture: three good stories, and the same plus every kind of bad item."""
    root = tmp_path_factory.mktemp("vist")
    images = root / "images"
    images.mkdir()
    for i, c in enumerate(COLORS):
        Image.new("RGB", (40, 40), c).save(images / f"{100 + i}.png")
    noise((64, 64)).save(images / "200.png")
    data = (images / "200.png").read_bytes()
    (images / "200.png").write_bytes(data[: len(data) // 2])  # truncated: the header reads, the pixels do not
    (images / "201.png").write_text("not an image at all")
    (images / "202.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG start, then garbage
    Image.new("RGB", (60000, 1), "red").save(images / "203.png")  # CLIP's resize would make it 13 M pixels wide
    (root / "outside").mkdir()
    Image.new("RGB", (40, 40), "red").save(root / "outside" / "300.png")  # readable: only the guard keeps it out
    good = list(GOOD.items())
    bad = [
        ("dup", GOOD["g1"]), ("dup", GOOD["g2"]),  # two stories with one id
        ("trunc", [100, 200, 102, 103, 104]),  # a truncated context image
        ("notimg", [105, 106, 201, 108, 109]),  # a context "image" that is text
        ("badtarget", [110, 111, 112, 113, 202]),  # an unreadable ground-truth image
        ("escape", [100, 101, "../outside/300", 103, 104]),  # a photo id leading out of the images folder
        ("absolute", [100, 101, 102, str(root / "outside" / "300"), 104]),  # an absolute photo id
        ("wide", [105, 203, 107, 108, 109]),  # a 60000x1 context image
    ]
    mixed = good[:1] + bad[:3] + good[1:2] + bad[3:] + good[2:]  # bad items before, between and after good ones
    return {"root": root, "images": images, "clean": sis(root / "clean.json", good),
            "mixed": sis(root / "mixed.json", mixed)}


EXPECTED_KINDS = {"dup": "duplicate id", "trunc": "unreadable image", "notimg": "unreadable image",
                  "badtarget": "unreadable image", "escape": "outside root", "absolute": "outside root",
                  "wide": "unreadable image"}


def test_the_vist_reader_skips_and_counts_each_bad_story_with_its_reason(vist):
    data = load_vist(vist["mixed"], vist["images"])
    assert [e.id for e in data.examples] == ["g1", "g2", "g3"]
    assert {s["id"]: s["kind"] for s in data.skipped} == EXPECTED_KINDS
    why = {s["id"]: s["reason"] for s in data.skipped}
    assert "duplicate story id 'dup'" in why["dup"] and "mixed.json" in why["dup"] and "all copies" in why["dup"]
    assert "200" in why["trunc"] and "broken" in why["trunc"]
    assert "201" in why["notimg"] and "not an image" in why["notimg"]
    assert "202" in why["badtarget"]
    assert "aspect ratio" in why["wide"] and "60000x1" in why["wide"]
    assert "--allow-outside-root" in why["escape"] and "../outside/300" in why["escape"]
    assert "--allow-outside-root" in why["absolute"]
    assert set(data.gallery) == {str(i) for ids in GOOD.values() for i in ids}  # no bad story's image in it
    # the same stories as from a file without the bad ones; only their place in the original's seed stream moves
    unplaced = lambda d: [dataclasses.replace(e, position=-1) for e in d.examples]  # noqa: E731
    assert unplaced(load_vist(vist["clean"], vist["images"])) == unplaced(data)


def test_outside_root_is_read_only_when_allowed(vist, tmp_path):
    data = load_vist(vist["mixed"], vist["images"], allow_outside_root=True)
    assert {"escape", "absolute"} <= {e.id for e in data.examples}
    escape = next(e for e in data.examples if e.id == "escape")
    assert escape.context_images[2].resolve() == (vist["root"] / "outside" / "300.png").resolve()
    # a symlink inside the folder that points out of it is refused too
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), "blue").save(images / f"{i}.png")
    (images / "2.png").unlink()
    (images / "2.png").symlink_to(vist["root"] / "outside" / "300.png")
    data = load_vist(sis(tmp_path / "s.json", [("link", list(range(5)))]), images)
    assert data.examples == [] and data.skipped[0]["kind"] == "outside root"


def _processor_spy(monkeypatch, seen):
    """Record the size of every image the eval resizes or hands to GILL's image processor."""
    from gill.pipeline import GILL

    real_resize = Image.Image.resize

    def resize(self, *a, **k):
        seen.append(self.size)
        return real_resize(self, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", resize)
    real_from_pretrained = GILL.from_pretrained.__func__

    def from_pretrained(cls, *a, **k):
        gill = real_from_pretrained(cls, *a, **k)
        processor = gill.image_processor

        def spy(images=None, **kw):
            seen.extend(im.size for im in images)
            return processor(images=images, **kw)

        gill.image_processor = spy
        return gill

    monkeypatch.setattr(GILL, "from_pretrained", classmethod(from_pretrained))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from test_eval import tiny_clip_scorer

    return tiny_clip_scorer(tmp_path_factory.mktemp("clip"))


SETTINGS = ["gill/5-captions-4-images", "sd/1-caption"]


def _run_vist(vist, annotations, out, scorer, *extra):
    from gill.eval.__main__ import main

    return main(["vist", "--model", "tiny-random", "--annotations", str(annotations), "--images", str(vist["images"]),
                 "--out", str(out), "--steps", "1", "--scorer", scorer, "--batch-size", "2", "--settings", *SETTINGS,
                 "--protocol", "clean", *extra])


def test_vist_eval_over_bad_items_completes_counts_them_and_loses_nothing_good(vist, scorer, tmp_path, monkeypatch):
    from gill.eval.runner import read_records

    seen = []
    _processor_spy(monkeypatch, seen)
    grown, rc = peak_growth(lambda: _run_vist(vist, vist["mixed"], tmp_path / "mixed", scorer))
    assert rc == 0
    assert grown < GB, f"peak memory grew by {grown / GB:.2f} GB"
    assert seen and max(max(w, h) / min(w, h) for w, h in seen) <= 20, "an out-of-bounds image reached a resize"
    assert _run_vist(vist, vist["clean"], tmp_path / "clean", scorer) == 0

    mixed = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert {s["id"]: s["kind"] for s in mixed["skipped"]} == EXPECTED_KINDS
    assert mixed["skipped_counts"] == {"duplicate id": 1, "unreadable image": 4, "outside root": 2}
    assert clean["skipped"] == [] and clean["skipped_counts"] == {}
    # the good stories come out exactly as without the bad ones: records, image bytes, scores, retrieval
    assert mixed["settings"] == clean["settings"] and set(mixed["settings"]) == set(SETTINGS)
    assert all(s["n"] == 3 and s["skipped"] == [] for s in mixed["settings"].values())
    assert mixed["retrieval"] == clean["retrieval"]
    for name in SETTINGS:
        a, b = (read_records(tmp_path / run / name / "records.jsonl") for run in ("mixed", "clean"))
        assert a == b and list(a) == ["g1", "g2", "g3"]
        for r in a.values():
            assert (tmp_path / "mixed" / name / r["image"]).read_bytes() == (tmp_path / "clean" / name / r["image"]).read_bytes()
    page = (tmp_path / "mixed" / "report.html").read_text(encoding="utf-8")
    assert "duplicate story id" in page and "outside root: 2" in page and "aspect ratio" in page


def test_an_unreadable_target_or_output_is_skipped_and_counted_when_scoring(vist, scorer, tmp_path):
    import shutil

    from gill.eval.__main__ import main

    images = tmp_path / "images"
    shutil.copytree(vist["images"], images)
    out = tmp_path / "out"
    assert main(["vist", "--model", "tiny-random", "--annotations", str(vist["clean"]), "--images", str(images),
                 "--out", str(out), "--steps", "1", "--scorer", scorer, "--settings", "sd/1-caption",
                 "--protocol", "clean"]) == 0
    (images / "109.png").write_bytes((images / "109.png").read_bytes()[:30])  # g2's ground truth breaks
    (out / "sd/1-caption" / "images" / "g3.png").write_text("gone bad")  # and g3's output
    assert main(["score", str(out), "--task", "vist"]) == 0
    s = json.loads((out / "summary.json").read_text())["settings"]["sd/1-caption"]
    assert s["n"] == 1 and -1 <= s["clip_similarity"] <= 1
    why = {x["id"]: (x["kind"], x["reason"]) for x in s["skipped"]}
    assert why["g2"][0] == "unreadable image" and "109.png" in why["g2"][1] and "ground-truth" in why["g2"][1]
    assert why["g3"][0] == "unreadable output" and "g3.png" in why["g3"][1]
    assert "gone bad" not in (out / "report.html").read_text() and "unreadable output" in (out / "report.html").read_text()


def test_a_torn_last_record_is_dropped_and_only_its_item_recomputed(vist, tmp_path, monkeypatch, caplog):
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import Setting, read_records, run_setting
    from gill.pipeline import GILL

    data = load_vist(vist["clean"], vist["images"])
    gill = GILL.from_pretrained("tiny-random")
    setting = Setting("gill/5-captions", "gill", lambda e: [" ".join(e.captions)])
    opts, out = DiffusionOptions(steps=1), tmp_path / "out"
    assert run_setting(gill, data, setting, out, diffusion=opts, batch_size=2)["computed"] == 3
    path = out / setting.name / "records.jsonl"
    whole = read_records(path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) - 40], encoding="utf-8")  # killed while writing g3's line
    calls = []
    real = gill.image_slot_embeddings
    monkeypatch.setattr(gill, "image_slot_embeddings", lambda convs, **k: calls.append(len(convs)) or real(convs, **k))
    with caplog.at_level(logging.WARNING, logger="gill.eval"):
        assert run_setting(gill, data, setting, out, diffusion=opts, batch_size=2) == {
            "computed": 1, "reused": 2, "skipped": []}
    assert calls == [1] and "line 3 is not JSON" in caplog.text and str(path) in caplog.text
    after = read_records(path)
    assert after == whole  # the recomputed record is the same as the one torn
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())  # every line whole again
    calls.clear()
    assert run_setting(gill, data, setting, out, diffusion=opts, batch_size=2)["computed"] == 0 and calls == []


def test_an_image_that_breaks_after_reading_skips_its_example_in_that_run(vist, tmp_path):
    from gill.diffusion import DiffusionOptions
    from gill.eval.__main__ import vist_settings
    from gill.eval.protocol import CLEAN
    from gill.eval.runner import Setting, read_records, run_setting
    from gill.pipeline import GILL

    import shutil

    images = tmp_path / "images"
    shutil.copytree(vist["images"], images)
    data = load_vist(vist["clean"], images)
    Image.new("RGB", (20000, 100), "red").save(images / "106.png")  # g2's second context image, now 200:1
    mode, build = vist_settings(CLEAN)["gill/5-captions-4-images"]
    counts = run_setting(GILL.from_pretrained("tiny-random"), data, Setting("gill/5-captions-4-images", mode, build),
                         tmp_path / "out", diffusion=DiffusionOptions(steps=1), batch_size=2)
    assert counts["computed"] == 2 and [s["id"] for s in counts["skipped"]] == ["g2"]
    assert "aspect ratio" in counts["skipped"][0]["reason"] and "106.png" in counts["skipped"][0]["reason"]
    assert list(read_records(tmp_path / "out" / "gill/5-captions-4-images" / "records.jsonl")) == ["g1", "g3"]


def test_output_names_never_collide():
    from gill.eval.runner import output_name

    ids = ["a/b", "a_b", "a b", "..", ".", "x" * 10, "Ünïcode"]
    names = [output_name(i) for i in ids]
    assert len(set(names)) == len(ids) and output_name("s1") == "s1"
    assert all("/" not in n and not n.startswith(".") for n in names)


# ---- VisDial -------------------------------------------------------------------------------------------

def write_visdial(root):
    images = root / "img"
    images.mkdir()
    for i, c in [(1, "red"), (2, "green"), (3, "blue"), (4, "navy")]:
        Image.new("RGB", (32, 32), c).save(images / f"VisualDialog_val2018_{i:012d}.jpg")
    (images / "VisualDialog_val2018_000000000005.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    Image.new("RGB", (60000, 1)).save(images / "VisualDialog_val2018_000000000006.png")
    (images / "VisualDialog_val2018_000000000006.png").rename(images / "VisualDialog_val2018_000000000006.jpg")
    turn = [{"question": 0, "answer": 0}, {"question": 1, "answer": 1}]
    dialogs = [{"image_id": 1, "dialog": turn}, {"image_id": 2, "dialog": turn}, {"image_id": 2, "dialog": turn[:1]},
               {"image_id": 3, "dialog": [{"question": 7, "answer": 0}]}, {"image_id": 4, "dialog": turn},
               {"image_id": 5, "dialog": turn}, {"image_id": 6, "dialog": turn}, {"dialog": turn}]
    (root / "v.json").write_text(json.dumps({"data": {"questions": ["is it red", "how many"], "answers": ["yes", "two"],
                                                      "dialogs": dialogs}}))
    return root / "v.json", images


def test_the_visdial_reader_skips_duplicates_bad_entries_and_unreadable_images(tmp_path):
    dialogs, images = write_visdial(tmp_path)
    data = load_visdial(dialogs, images)
    assert [e.id for e in data.examples] == ["1", "4"]
    kinds = {s["id"]: s["kind"] for s in data.skipped}
    assert kinds == {"2": "duplicate id", "dialogs[3]": "bad entry", "5": "unreadable image", "6": "unreadable image",
                     "dialogs[7]": "bad entry"}
    why = {s["id"]: s["reason"] for s in data.skipped}
    assert "duplicate dialog image_id 2" in why["2"] and "v.json" in why["2"] and "2 dialogs" in why["2"]
    assert "aspect ratio" in why["6"] and "image_id" in why["dialogs[7]"]
    with pytest.raises(ValueError, match="not a VisDial file"):
        (tmp_path / "bad.json").write_text('{"data": []}')
        load_visdial(tmp_path / "bad.json", images)
    (tmp_path / "torn.json").write_text('{"data": {"questions": [')
    with pytest.raises(ValueError, match="torn.json: not a JSON"):
        load_visdial(tmp_path / "torn.json", images)


def test_visdial_eval_with_bad_items_completes(tmp_path, scorer):
    from gill.eval.__main__ import main

    dialogs, images = write_visdial(tmp_path)
    out = tmp_path / "out"
    assert main(["visdial", "--model", "tiny-random", "--dialogs", str(dialogs), "--images", str(images), "--out",
                 str(out), "--steps", "1", "--scorer", scorer, "--rounds", "1", "--settings", "gill/1-round"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["gill/1-round"]["n"] == 2
    assert summary["skipped_counts"] == {"duplicate id": 1, "bad entry": 2, "unreadable image": 2}


# ---- arguments -----------------------------------------------------------------------------------------

BASE = ["vist", "--annotations", "a.json", "--images", "imgs", "--out", "o"]


@pytest.mark.parametrize("flag,value,wanted", [
    ("--batch-size", "0", "an integer >= 1"), ("--batch-size", "-3", "an integer >= 1"),
    ("--batch-size", "two", "an integer >= 1"), ("--limit", "0", "an integer >= 1"),
    ("--steps", "0", "an integer from 1 to 1000"), ("--steps", "1001", "an integer from 1 to 1000"),
    ("--steps", "2.5", "an integer from 1 to 1000"), ("--guidance", "-1", "a number >= 0"),
    ("--guidance-scale", "-1", "a number >= 0"),
    ("--guidance", "nan", "a number >= 0"), ("--guidance", "inf", "a number >= 0"),
    ("--seed", "-1", "an integer from 0 to 4294967295"), ("--seed", str(2**32), "an integer from 0 to 4294967295"),
    ("--scorer", "clip-vit", "'hf:NAME_OR_PATH' or 'open_clip:MODEL/PRETRAINED'"),
])
def test_out_of_range_arguments_are_refused_at_parse_time_naming_the_flag(flag, value, wanted, capsys):
    from gill.eval.__main__ import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(BASE + [flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be {wanted}, got '{value}'" in err


@pytest.mark.parametrize("value", ["0", "11"])
def test_visdial_rounds_are_range_checked(value, capsys):
    from gill.eval.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["visdial", "--dialogs", "d.json", "--images", "i", "--out", "o", "--rounds", "1", value])
    assert "argument --rounds: must be an integer from 1 to 10" in capsys.readouterr().err


def test_in_range_arguments_parse():
    from gill.eval.__main__ import build_parser

    args = build_parser().parse_args(BASE + ["--batch-size", "1", "--limit", "5", "--steps", "1000", "--guidance", "0",
                                             "--seed", "0", "--scorer", "hf:openai/clip-vit-large-patch14"])
    assert (args.batch_size, args.limit, args.steps, args.guidance_scale, args.seed) == (1, 5, 1000, 0.0, 0)
    assert build_parser().parse_args(BASE).batch_size == 8 and not build_parser().parse_args(BASE).allow_outside_root


def test_guidance_is_read_under_its_fields_name_and_its_earlier_spelling():
    """The shared flag ``--guidance-scale``; ``--guidance`` (scripts written before) still sets the same field."""
    from gill.eval.__main__ import build_parser

    assert build_parser().parse_args(BASE + ["--guidance-scale", "2.5"]).guidance_scale == 2.5
    assert build_parser().parse_args(BASE + ["--guidance", "3.5"]).guidance_scale == 3.5
    assert build_parser().parse_args(BASE).guidance_scale is None  # unset: the model's, else the library's


@pytest.mark.parametrize("flag", ["--temperature", "--top-p", "--max-new-tokens", "--img-scale-factor", "--index"])
def test_flags_the_eval_would_ignore_are_refused(flag, capsys):
    """The evaluation draws from the [IMG] slot without decoding and searches its own gallery: a decoder
    setting or an index given to it would be dropped silently, so it is no flag of it."""
    from gill.eval.__main__ import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(BASE + [flag, "1"])
    assert e.value.code == 2 and f"unrecognized arguments: {flag} 1" in capsys.readouterr().err
