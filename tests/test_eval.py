import json
import math

import pytest
import torch
from PIL import Image

from gill.eval.data import load_visdial, load_vist
from gill.eval.metrics import mean_and_ci, paired_cosine, recall_at_k


# ---- metrics: known answers ----------------------------------------------------------------------

def test_paired_cosine_known_answers():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    assert paired_cosine(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0])


def test_recall_at_k_known_answers():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target 0 ranks 1st
                           [0.9, 0.8, 0.7, 0.1],    # target 2 ranks 3rd
                           [0.5, 0.5, 0.1, 0.2]])   # target 1 ties with item 0: counted as 2nd
    targets = torch.tensor([0, 2, 1])
    r = recall_at_k(scores, targets, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[1, [0, 1]] = True  # masking the two items above query 1's target makes it rank 1st
    exclude[2, 0] = True
    assert recall_at_k(scores, targets, ks=(1,), exclude=exclude) == {1: 1.0}
    with pytest.raises(ValueError, match="target is excluded"):
        recall_at_k(scores, targets, exclude=torch.ones_like(exclude))


def test_mean_and_ci():
    mean, ci = mean_and_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)


# ---- a VIST fixture with edge cases --------------------------------------------------------------

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "navy", "pink", "teal"]


def write_vist(root):
    images = root / "images"
    images.mkdir(parents=True)
    for i, c in enumerate(COLORS):
        Image.new("RGB", (40, 40), c).save(images / f"{100 + i}.png")
    stories = {
        "s1": [(100, "Мы пошли на пляж ☀️"), (101, "the café was open"), (102, "日本語のキャプション"), (103, "we swam"), (104, "sunset.")],
        "s2": [(105, "a party"), (106, "cake"), (107, "friends"), (108, "music"), (109, "goodbye")],
        "s3": [(100, "a"), (101, "b"), (999, "missing image"), (103, "d"), (104, "e")],
        "s4": [(105, "only"), (106, "four"), (107, "steps"), (108, "here")],
        "s5": [(110, "duplicate"), (111, "ids"), (110, "again"), (100, "shared with s1"), (111, "last")],
    }
    annotations = [[{"story_id": sid, "photo_flickr_id": str(pid), "worker_arranged_photo_order": order,
                     "original_text": text, "text": text.lower()}]
                   for sid, steps in stories.items() for order, (pid, text) in reversed(list(enumerate(steps)))]
    (root / "sis.json").write_text(json.dumps({"annotations": annotations}, ensure_ascii=False), encoding="utf-8")
    return root / "sis.json", images


def tiny_clip_scorer(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=8)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return f"hf:{path}"


def test_vist_reader_skips_and_keeps_what_it_should(tmp_path):
    sis, images = write_vist(tmp_path)
    data = load_vist(sis, images)
    assert [e.id for e in data.examples] == ["s1", "s2", "s5"]
    reasons = {s["id"]: s["reason"] for s in data.skipped}
    assert "missing image file(s) ['999']" in reasons["s3"] and "4 steps, needs 5" in reasons["s4"]
    s1 = data.examples[0]
    assert s1.captions[0] == "Мы пошли на пляж ☀️" and s1.target.name == "104.png"  # story order restored
    assert data.examples[2].target_id == "111" and len(data.gallery) == 12  # duplicate ids share an entry


@pytest.mark.slow
def test_vist_end_to_end_on_the_fixture(tmp_path):
    from gill.eval.__main__ import main

    sis, images = write_vist(tmp_path)
    scorer = tiny_clip_scorer(tmp_path / "clip")
    out = tmp_path / "out"
    args = ["vist", "--model", "tiny-random", "--annotations", str(sis), "--images", str(images), "--out", str(out),
            "--steps", "2", "--scorer", scorer, "--batch-size", "2"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["settings"]) == {"gill/1-caption", "gill/5-captions", "gill/5-captions-4-images", "sd/1-caption", "sd/5-captions"}
    # s3 misses a context image but ends (file order) on s1's last photo: scored with s1's output, as the
    # original's scoring script looks outputs up by that photo
    assert all(s["n"] == 4 and -1 <= s["clip_similarity"] <= 1 for s in summary["settings"].values())
    records = [json.loads(line) for line in (out / "sd/5-captions/records.jsonl").read_text().splitlines()]
    assert [(r["id"], r.get("output_of")) for r in records] == [("s1", None), ("s2", None), ("s3", "s1"), ("s5", None)]
    assert {s["id"] for s in summary["skipped"]} == {"s3", "s4"}  # neither generated for
    assert summary["protocol"]["name"] == "original" and summary["run"]["steps"] == 2
    r = summary["retrieval"]
    # FROMAGe's gallery: every image the annotations name that can be read (s3's and s5's too), context masked
    assert r["protocol"] == "fromage" and r["gallery_size"] == 12
    assert r["gill/5-captions-4-images"]["n"] == 3 and set(r["gill/5-captions-4-images"]) == {"context_masked", "chance", "n"}
    page = (out / "report.html").read_text(encoding="utf-8")
    # a random model is set beside chance and its own baselines, not beside the paper's real-VIST numbers
    assert "0.641" not in page and "chance" in page and "context_masked" in page
    assert "мы пошли на пляж ☀️" in page  # the original protocol reads the lower-cased "text" field
    # a finished run resumed computes nothing, and can be re-scored
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["runs"]["gill/1-caption"] == {"computed": 0, "reused": 3, "skipped": []}
    assert main(["score", str(out), "--task", "vist"]) == 0


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import Setting, read_records, run_setting
    from gill.pipeline import GILL

    sis, images = write_vist(tmp_path)
    data = load_vist(sis, images)
    gill = GILL.from_pretrained("tiny-random")
    setting = Setting("gill/1-caption", "gill", lambda e: [e.captions[-1]])
    calls = []
    real = gill.diffusion.generate

    def flaky(embeds, *a, **k):
        calls.append(len(embeds))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is interrupted during its second batch
        return real(embeds, *a, **k)

    monkeypatch.setattr(gill.diffusion, "generate", flaky)
    opts = DiffusionOptions(steps=2)
    with pytest.raises(KeyboardInterrupt):
        run_setting(gill, data, setting, tmp_path / "out", diffusion=opts, batch_size=2)
    assert list(read_records(tmp_path / "out" / setting.name / "records.jsonl")) == ["s1", "s2"]
    calls.clear()
    monkeypatch.setattr(gill.diffusion, "generate", lambda e, *a, **k: calls.append(len(e)) or real(e, *a, **k))
    assert run_setting(gill, data, setting, tmp_path / "out", diffusion=opts, batch_size=2) == {"computed": 1, "reused": 2, "skipped": []}
    assert calls == [1]  # only s5 was generated
    calls.clear()
    assert run_setting(gill, data, setting, tmp_path / "out", diffusion=opts, batch_size=2) == {"computed": 0, "reused": 3, "skipped": []}
    assert calls == []


def test_visdial_reader(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "VisualDialog_val2018_000000000007.jpg")
    data = {"data": {"questions": ["is it red", "how many"], "answers": ["yes", "two"],
                     "dialogs": [{"image_id": 7, "caption": "unused", "dialog": [{"question": 0, "answer": 0}, {"question": 1, "answer": 1}]},
                                 {"image_id": 8, "caption": "x", "dialog": [{"question": 0, "answer": 0}]}]}}
    (tmp_path / "v.json").write_text(json.dumps(data))
    ds = load_visdial(tmp_path / "v.json", images)
    assert [e.id for e in ds.examples] == ["7"] and ds.examples[0].captions == ["Q: is it red?", "A: yes", "Q: how many?", "A: two"]
    assert ds.skipped[0]["id"] == "8"


def test_the_clip_scorer_gives_known_similarities_on_fixed_images():
    """Known answers of the scorer (the shipped toy metric CLIP through ``hf:``, transformers' CLIPModel
    image features, cosine): a picture scores 1 with itself, 0.990 with itself moved one pixel, 0.730 with
    the same scene as a square, -0.366 with a small blue triangle on gray (values recorded on transformers 5.25
    with the PIL image processor; a change of preprocessing or pooling moves them)."""
    from gill.eval.metrics import paired_cosine
    from gill.eval.scorer import ClipScorer
    from gill.presets import toy_metric_dir
    from training.toy import world

    by_caption = {s.caption(): s for s in world.all_scenes()}
    red_circle = by_caption["a large red circle on the left on white"]
    images = [world.render(red_circle), world.render(red_circle, jitter=(1, 0)),
              world.render(by_caption["a large red square on the left on white"]),
              world.render(by_caption["a small blue triangle on the right on gray"])]
    features = ClipScorer(f"hf:{toy_metric_dir()}", processor="pil").embed(images)  # the same with torchvision
    similarity = paired_cosine(features[[0, 0, 0, 0]], features)
    torch.testing.assert_close(similarity, torch.tensor([1.0, 0.99047, 0.73006, -0.36634]), atol=1e-4, rtol=0)
