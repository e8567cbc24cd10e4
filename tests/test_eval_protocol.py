"""The evaluation protocols: the original's prompt strings, image preprocessing, seed stream, shared
outputs and LPIPS averaging as known answers; real-format fixtures (long stories, broken and odd-mode
images, shared photos, both image layouts) run to a summary with their skips; sharded runs equal one
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill.eval.data import load_visdial, load_vist
from gill.eval.protocol import CLEAN, ORIGINAL, squash_like_original

ROOT = Path(__file__).resolve().parents[1]


def step(story, pid, order, text, original):
    return [{"story_id": story, "photo_flickr_id": pid, "worker_arranged_photo_order": order, "text": text,
             "original_text": original}]


def two_stories(root: Path) -> tuple[Path, Path]:
    """Story "a": file order is not annotated order (steps 0-4 written 4,0,1,2,3). Story "b" is skipped by the
    original's loop (a missing context image) but sits between "a" and "c" in the file; "c" takes draw 1."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (60, 40), (20 * i, 100, 200 - 20 * i)).save(images / f"{i}.png")
    a = [step("a", "4", 4, "she left .", "She left."), *[step("a", str(i), i, f"[female] was here {i} .", f"Ann was here {i}.")
                                                           for i in range(4)]]
    b = [step("b", "missing", 0, "x", "X"), *[step("b", str(i), i, "y", "Y") for i in range(1, 5)]]
    c = [step("c", str(i), i - 5, f"c {i} .", f"C {i}.") for i in range(5, 10)]
    sis = root / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"annotations": a + b + c}))
    return sis, images


def test_the_original_reads_text_in_file_order_and_numbers_the_stories_its_loop_drew_for(tmp_path):
    sis, images = two_stories(tmp_path)
    original = load_vist(sis, images, ORIGINAL.caption_field, story_order=ORIGINAL.story_order)
    a, c = original.examples
    # file order: the first written step (order 4) opens the story; the last written (order 3) is the target
    assert a.captions == ["she left .", "[female] was here 0 .", "[female] was here 1 .", "[female] was here 2 .",
                          "[female] was here 3 ."]
    assert a.context_ids == ["4", "0", "1", "2"] and a.target_id == "3"
    assert (a.position, c.position) == (0, 1)  # "b" drew nothing: a missing context image skipped it
    clean = load_vist(sis, images, CLEAN.caption_field, story_order=CLEAN.story_order)
    assert clean.examples[0].captions == ["Ann was here 0.", "Ann was here 1.", "Ann was here 2.", "Ann was here 3.", "She left."]
    assert clean.examples[0].target_id == "4"


def test_the_original_prompts_are_its_segments_and_fromage_puts_bos_before_every_caption(tmp_path):
    from gill.eval.__main__ import vist_settings
    from gill.pipeline import GILL

    sis, images = two_stories(tmp_path)
    a = load_vist(sis, images, "text", story_order="file").examples[0]
    table = vist_settings(ORIGINAL)
    assert table["gill/5-captions-4-images"][1](a) == [
        "she left .", images / "4.png", "[female] was here 0 .", images / "0.png", "[female] was here 1 .",
        images / "1.png", "[female] was here 2 .", images / "2.png", "[female] was here 3 ."]
    assert table["gill/5-captions"][1](a) == a.captions  # five segments, each tokenised on its own
    assert vist_settings(CLEAN)["gill/5-captions"][1](a) == [" ".join(a.captions)]
    assert table["sd/5-captions"][1](a) == " ".join(a.captions)

    gill = GILL.from_pretrained("tiny-random")
    tok = gill.tokenizer
    counts = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in a.captions]
    k = gill.model.config.n_visual_tokens
    prompt = table["gill/5-captions-4-images"][1](a)
    assert gill.prompt_length(prompt) == sum(counts) + 4 * k + 1  # one BOS, before the first caption
    assert gill.prompt_length(prompt, bos_every_text=True) == sum(counts) + 4 * k + 5  # FROMAGe: one per caption
    embeds = gill.build_prompts([["she left .", "we ran ."]], bos_every_text=True)[0].embeds
    ids = [tok.bos_token_id, *tok("she left .", add_special_tokens=False)["input_ids"],
           tok.bos_token_id, *tok("we ran .", add_special_tokens=False)["input_ids"]]
    assert torch.equal(embeds, gill.model.embed_tokens(torch.tensor([ids]))[0])


def test_visdial_lines_raw_as_the_original_or_tidied(tmp_path):
    dialogs = tmp_path / "visdial_1.0_val.json"
    dialogs.write_text(json.dumps({"data": {"questions": ["is it red", "any people? "], "answers": ["yes", " no one "],
                                            "dialogs": [{"image_id": 7, "caption": "unused",
                                                         "dialog": [{"question": 0, "answer": 0}, {"question": 1, "answer": 1}]}]}}))
    Image.new("RGB", (50, 40), "red").save(tmp_path / "VisualDialog_val2018_000000000007.jpg")
    raw = load_visdial(dialogs, tmp_path, lines=ORIGINAL.visdial_lines).examples[0]
    assert "\n".join(raw.captions) == "Q: is it red?\nA: yes\nQ: any people? ?\nA:  no one "
    tidy = load_visdial(dialogs, tmp_path, lines=CLEAN.visdial_lines).examples[0]
    assert tidy.captions == ["Q: is it red?", "A: yes", "Q: any people?", "A: no one"]


def test_the_original_squash_ignores_the_aspect_ratio_and_resizes_palettes_by_nearest():
    wide = Image.new("RGB", (448, 100), "blue")
    wide.paste((255, 0, 0), (0, 0, 224, 100))  # left half red
    out = squash_like_original(wide)
    assert out.size == (224, 224) and out.mode == "RGB"
    px = np.asarray(out)
    assert tuple(px[112, 10]) == (255, 0, 0) and tuple(px[112, 200]) == (0, 0, 255)  # halves kept, not cropped
    palette = Image.new("P", (300, 300))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 150, 300))
    colours = {tuple(c) for c in np.asarray(squash_like_original(palette)).reshape(-1, 3)}
    assert colours == {(10, 200, 30), (0, 0, 0)}  # nearest: no blended colour appears
    grey = Image.new("L", (224, 224), 77)
    assert np.asarray(squash_like_original(grey)).tolist() == np.full((224, 224, 3), 77).tolist()



def test_the_runner_gives_gill_the_squashed_context_images_under_the_original_protocol(tmp_path):
    from gill.eval.__main__ import vist_settings
    from gill.eval.runner import _load_inputs

    sis, images = two_stories(tmp_path)
    a = load_vist(sis, images, "text", story_order="file").examples[0]
    prompt = vist_settings(ORIGINAL)["gill/5-captions-4-images"][1](a)
    squashed = [x for x in _load_inputs(prompt, ORIGINAL.prepare_vist_image()) if not isinstance(x, str)]
    assert [im.size for im in squashed] == [(224, 224)] * 4
    assert tuple(np.asarray(squashed[0])[100, 100]) == (80, 100, 120)  # photo "4": (20*4, 100, 200-20*4)
    kept = [x for x in _load_inputs(prompt, CLEAN.prepare_vist_image()) if not isinstance(x, str)]
    assert [im.size for im in kept] == [(60, 40)] * 4

def test_lpips_input_is_minus_one_to_one_squashed_to_256():
    from gill.eval.scorer import lpips_tensor

    x = lpips_tensor(Image.new("RGB", (224, 100), (255, 0, 127)))
    assert x.shape == (1, 3, 256, 256)
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]), atol=1e-6)


def test_the_seed_stream_is_one_generator_consumed_in_order_by_the_pipelines_own_draws(tmp_path):
    """Each story's image equals what the original's loop makes: one generator seeded 42, handed to one
    pipeline call per story in order."""
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import Setting, merge_setting, read_records, run_setting
    from gill.eval.seeds import SeedStream, pipeline_latent_shape
    from gill.pipeline import GILL

    sis, images = two_stories(tmp_path)
    data = load_vist(sis, images, "text", story_order="file")
    gill = GILL.from_pretrained("tiny-random")
    pipe = gill.diffusion.pipe
    shape = pipeline_latent_shape(pipe)
    g = torch.Generator().manual_seed(42)
    expected = [torch.randn(shape, generator=g) for _ in range(2)]
    stream = SeedStream(42, shape)
    assert torch.equal(stream.draw(1), expected[1]) and torch.equal(stream.draw(0), expected[0])

    opts = DiffusionOptions(steps=2, guidance_scale=7.5)
    setting = Setting("gill/1-caption", "gill", lambda e: [e.captions[-1]])
    run_setting(gill, data, setting, tmp_path / "out", diffusion=opts, noise=SeedStream(42, shape), batch_size=2)
    merge_setting(data, setting, tmp_path / "out")
    records = read_records(tmp_path / "out" / setting.name / "records.jsonl")
    assert [(r["id"], r["draw"]) for r in records.values()] == [("a", 0), ("c", 1)]
    g = torch.Generator().manual_seed(42)  # the original's loop, one story at a time
    for e in data.examples:
        cond = gill.image_slot_embeddings([[e.captions[-1]]]).generation
        image = pipe(prompt_embeds=cond, generator=g, num_inference_steps=2, guidance_scale=7.5, output_type="np").images[0]
        ours = np.asarray(Image.open(tmp_path / "out" / setting.name / records[e.id]["image"]), dtype=np.float64)
        assert np.abs(ours - np.round(image * 255)).max() <= 1, e.id


def shared_last_image(root: Path) -> tuple[Path, Path]:
    """Three stories over one photo sequence: "s1" and "s2" end on the same photo, "s3" shares its first ones."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 50, 90)).save(images / f"{i}.png")
    stories = {"s1": [0, 1, 2, 3, 4], "s2": [0, 1, 2, 3, 4], "s3": [0, 1, 5, 6, 7]}
    annotations = [step(s, str(p), n, f"{s} step {n} .", f"{s} step {n}.") for s, ps in stories.items() for n, p in enumerate(ps)]
    sis = root / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"annotations": annotations}))
    return sis, images


class FakeLpips(torch.nn.Module):
    """The mean absolute difference of the two LPIPS inputs: enough to see what is averaged over."""

    def forward(self, a, b):
        return (a - b).abs().mean()


def test_stories_sharing_a_last_image_share_the_last_ones_output_and_lpips_counts_it_once(tmp_path):
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import Setting, merge_setting, read_records, run_setting, score
    from gill.eval.scorer import ClipScorer, LpipsScorer
    from gill.pipeline import GILL
    from test_eval import tiny_clip_scorer

    sis, images = shared_last_image(tmp_path)
    data = load_vist(sis, images, "text", story_order="file")
    gill = GILL.from_pretrained("tiny-random")
    setting = Setting("gill/1-caption", "gill", lambda e: [e.captions[-1]])
    opts = DiffusionOptions(steps=1)
    for protocol, out in ((ORIGINAL, tmp_path / "original"), (CLEAN, tmp_path / "clean")):
        shared = protocol.outputs == "per-target"
        counts = run_setting(gill, data, setting, out, diffusion=opts, one_output_per_target=shared)
        merge_setting(data, setting, out, one_output_per_target=shared)
        records = read_records(out / setting.name / "records.jsonl")
        assert counts["computed"] == (2 if shared else 3)
        summary = score(out, ClipScorer(tiny_clip_scorer(tmp_path / "clip")), lpips=LpipsScorer(model=FakeLpips()),
                        protocol=protocol)["settings"][setting.name]
        assert summary["n"] == 3  # CLIP similarity: every story, as the original's per-story loop
        if shared:  # s1's output was overwritten by s2's (the later one) and is scored as s2's
            assert records["s1"]["image"] == records["s2"]["image"] and records["s1"]["output_of"] == "s2"
            assert records["s1"]["prompt"] == ["s1 step 4 ."]
            assert summary["lpips_n"] == 2 and summary["lpips_per"] == "output file"  # LPIPS: each file once
        else:
            assert len({r["image"] for r in records.values()}) == 3 and summary["lpips_n"] == 3


# ---- real-format fixtures run to a summary --------------------------------------------------------


def awkward_vist(root: Path, layout: str) -> tuple[Path, Path, str]:
    """VIST stories with what real files hold: a very long story, a truncated image, CMYK and greyscale
    photos, photos shared between stories, a shared last image. ``layout``: GILL's ``<id>.png`` folder, or
    VIST's official ``images/val/<id>.jpg``."""
    folder = root / "images" / ("val" if layout == "official" else "")
    folder.mkdir(parents=True)
    suffix = ".jpg" if layout == "official" else ".png"
    for i in range(12):
        Image.new("RGB", (64, 48), (20 * i, 120, 250 - 20 * i)).save(folder / f"{i}{suffix}")
    Image.new("CMYK", (50, 70), (0, 200, 200, 0)).save(folder / f"20{suffix}" if suffix == ".jpg" else folder / "20.jpg")
    Image.new("L", (64, 64), 128).save(folder / f"21{suffix}")
    (folder / f"22{suffix}").write_bytes((folder / f"1{suffix}").read_bytes()[:60])  # truncated
    long = " ".join(["and then we walked further along the long beach"] * 40)
    stories = {
        "plain": [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")],
        "odd-modes": [(20, "a cmyk photo"), (21, "a grey photo"), (5, "c"), (6, "d"), (7, "e")],
        "shares-photos": [(0, "a"), (1, "b"), (8, "c"), (9, "d"), (10, "e")],
        "shares-last": [(5, "a"), (6, "b"), (7, "c"), (8, "d"), (4, "same last photo as plain")],
        "broken-image": [(22, "a"), (1, "b"), (2, "c"), (3, "d"), (11, "e")],
        "long": [(0, long), (1, long), (2, long), (3, long), (11, "the end")],
    }
    annotations = [step(s, str(p), n, t, t) for s, steps in stories.items() for n, (p, t) in enumerate(steps)]
    sis = root / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"annotations": annotations}))
    return sis, root / "images", suffix


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from test_eval import tiny_clip_scorer

    return tiny_clip_scorer(tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("layout", ["gill", "official"])
def test_a_real_format_vist_fixture_runs_to_a_summary_with_its_skips(tmp_path, scorer, layout):
    from gill.eval.__main__ import main

    sis, images, _ = awkward_vist(tmp_path, layout)
    out = tmp_path / "out"
    args = ["vist", "--model", "tiny-random", "--annotations", str(sis), "--images", str(images), "--out", str(out),
            "--steps", "1", "--scorer", scorer, "--settings", "gill/5-captions-4-images", "sd/1-caption"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {s["id"]: s["kind"] for s in summary["skipped"]} == {"broken-image": "unreadable image"}
    gill = summary["settings"]["gill/5-captions-4-images"]
    assert {s["id"]: s["kind"] for s in gill["skipped"]} == {"long": "too long"}  # > the tiny LM's 256 positions
    assert "--truncate" in gill["skipped"][0]["reason"]
    assert gill["n"] == 4 and summary["settings"]["sd/1-caption"]["n"] == 5  # the SD baseline reads the last caption only
    records = [json.loads(line) for line in (out / "gill/5-captions-4-images" / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["plain", "odd-modes", "shares-photos", "shares-last"]
    assert records[0]["output_of"] == "shares-last"  # the same last photo: the later story's output (original)
    page = (out / "report.html").read_text()
    assert "too long" in page and "unreadable image" in page

    # --truncate keeps the long story's end, and says how much it dropped (another folder: the first run's
    # outputs are not resumed with other settings)
    truncated = tmp_path / "truncated"
    assert main([*args[:args.index("--out") + 1], str(truncated), *args[args.index("--out") + 2:], "--truncate",
                 "--settings", "gill/5-captions-4-images"]) == 0
    records = {json.loads(line)["id"]: json.loads(line)
               for line in (truncated / "gill/5-captions-4-images" / "records.jsonl").read_text().splitlines()}
    assert records["long"]["truncated"] > 0 and "plain" in records


def test_a_visdial_dialogue_longer_than_the_lm_is_skipped_not_fatal(tmp_path, scorer):
    from gill.eval.__main__ import main

    long = "what is the colour of the thing near the window " * 2
    dialogs = tmp_path / "visdial_1.0_val.json"
    dialogs.write_text(json.dumps({"data": {"questions": ["is it red", long], "answers": ["yes", "no"], "dialogs": [
        {"image_id": 1, "caption": "", "dialog": [{"question": 0, "answer": 0}] * 10},
        {"image_id": 2, "caption": "", "dialog": [{"question": 1, "answer": 1}] * 10}]}}))
    for i in (1, 2):
        Image.new("RGB", (80, 60), "red").save(tmp_path / f"VisualDialog_val2018_{i:012d}.jpg")
    out = tmp_path / "out"
    assert main(["visdial", "--model", "tiny-random", "--dialogs", str(dialogs), "--images", str(tmp_path), "--out", str(out),
                 "--steps", "1", "--scorer", scorer, "--no-baseline", "--rounds", "1", "10"]) == 0
    s = json.loads((out / "summary.json").read_text())["settings"]
    assert s["gill/1-round"]["n"] == 2 and s["gill/10-rounds"]["n"] == 1
    assert [x["id"] for x in s["gill/10-rounds"]["skipped"]] == ["2"] and s["gill/10-rounds"]["skipped"][0]["kind"] == "too long"


# ---- sharded runs -------------------------------------------------------------------------------


def test_shards_merge_to_the_one_process_run_and_a_shard_resumes_in_another_run(tmp_path):
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import Setting, merge_setting, run_setting
    from gill.eval.seeds import SeedStream, pipeline_latent_shape
    from gill.eval.shard import Shard
    from gill.pipeline import GILL
    from test_eval import write_vist

    sis, images = write_vist(tmp_path)
    data = load_vist(sis, images)
    gill = GILL.from_pretrained("tiny-random")
    setting = Setting("gill/5-captions-4-images", "gill",
                      lambda e: [x for c, i in zip(e.captions, e.context_images + [None]) for x in (c, i) if x is not None])
    opts = DiffusionOptions(steps=1)
    shape = pipeline_latent_shape(gill.diffusion.pipe)

    def go(out, shard):
        return run_setting(gill, data, setting, out, diffusion=opts, batch_size=1, noise=SeedStream(42, shape), shard=shard)

    go(tmp_path / "one", Shard())
    merge_setting(data, setting, tmp_path / "one")
    assert go(tmp_path / "two", Shard(0, 2))["computed"] == 2 and go(tmp_path / "two", Shard(1, 2))["computed"] == 1
    assert sorted(p.name for p in (tmp_path / "two" / setting.name).glob("*rank*")) == [
        "records.rank-00000.jsonl", "records.rank-00001.jsonl", "skipped.rank-00000.json", "skipped.rank-00001.json"]
    merge_setting(data, setting, tmp_path / "two")
    assert not list((tmp_path / "two" / setting.name).glob("*rank*"))

    def files(out):
        folder = out / setting.name
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    assert files(tmp_path / "one") == files(tmp_path / "two")
    # rank 0 of a 2-process run was killed after its share; a 1-process rerun computes only the rest
    go(tmp_path / "resumed", Shard(0, 2))
    assert go(tmp_path / "resumed", Shard())["computed"] == 1
    merge_setting(data, setting, tmp_path / "resumed")
    assert files(tmp_path / "resumed") == files(tmp_path / "one")


@pytest.mark.slow  # two torchrun processes and one plain one, each loading a model
def test_a_two_process_torchrun_eval_equals_the_one_process_run(tmp_path, scorer):
    from test_eval import write_vist

    sis, images = write_vist(tmp_path)
    common = ["vist", "--model", "tiny-random", "--annotations", str(sis), "--images", str(images), "--steps", "1",
              "--scorer", scorer, "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "gill.eval", *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "gill.eval", *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    for records in sorted((tmp_path / "one").glob("*/*/records.jsonl")):
        other = tmp_path / "two" / records.relative_to(tmp_path / "one")
        assert records.read_bytes() == other.read_bytes(), records
        for line in records.read_text().splitlines():
            image = json.loads(line)["image"]
            assert (records.parent / image).read_bytes() == (other.parent / image).read_bytes()
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert b["run"]["processes"] == 2
    for key in ("settings", "retrieval", "skipped", "protocol"):
        assert a[key] == b[key], key


def test_an_output_folder_is_resumed_only_with_the_settings_it_was_made_with(tmp_path, scorer, capsys):
    from gill.eval.__main__ import main
    from test_eval import write_vist

    sis, images = write_vist(tmp_path)
    args = ["vist", "--model", "tiny-random", "--annotations", str(sis), "--images", str(images), "--out",
            str(tmp_path / "out"), "--steps", "1", "--scorer", scorer, "--settings", "sd/1-caption"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--protocol", "clean"]) == 1
    assert "protocol: 'original' -> 'clean'" in capsys.readouterr().err
    assert main([*args[:-4], "--steps", "2", "--scorer", scorer, "--settings", "sd/1-caption"]) == 1
    assert "steps: 1 -> 2" in capsys.readouterr().err
    assert main(args + ["--batch-size", "3"]) == 0  # how it is batched does not change the outputs
    assert "0 generated, 3 already done" in capsys.readouterr().out
    # a folder whose run.json records the same protocol's rules otherwise (an earlier gill.eval's): each rule
    # that differs is named, not the protocol's unchanged name
    import json

    run = tmp_path / "out" / "run.json"
    recorded = json.loads(run.read_text())
    recorded["protocol"] = {k: v for k, v in recorded["protocol"].items() if k != "retrieval"} | {"seeds": "older"}
    run.write_text(json.dumps(recorded))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "protocol 'original''s rules as recorded then (" in err and "seeds: 'older' -> " in err, err
    assert "retrieval: '(none)' -> " in err and "protocol: 'original' -> 'original'" not in err, err
