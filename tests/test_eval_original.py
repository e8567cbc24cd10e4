"""``--protocol original`` against the original's last rules, each a known answer that the other protocol
does not give: stories whose context images are missing scored with their last photo's output, per-part
dtypes, the PIL CLIP processor, FROMAGe's ranking and the SD baseline's left cut of long prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill.eval.protocol import CLEAN, ORIGINAL
from test_eval_protocol import step


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from test_eval import tiny_clip_scorer

    return tiny_clip_scorer(tmp_path_factory.mktemp("clip"))


# ---- stories whose context images are missing ----------------------------------------------------------


def missing_context_stories(root: Path) -> tuple[Path, Path]:
    """"a" and "d" complete; "b" lacks a context image and ends on a's last photo (4); "c" lacks one and ends
    on a photo no other story ends on; "e" has its context but not its last photo (97)."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 60, 200 - 20 * i)).save(images / f"{i}.png")
    stories = {"a": [0, 1, 2, 3, 4], "b": [0, 99, 2, 3, 4], "c": [99, 1, 2, 3, 5], "e": [0, 1, 2, 3, 97],
               "d": [3, 2, 1, 0, 6]}
    annotations = [step(s, str(p), n, f"{s} caption {n} .", f"{s} caption {n}.") for s, ps in stories.items()
                   for n, p in enumerate(ps)]
    sis = root / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"annotations": annotations}))
    return sis, images


def test_the_original_scores_a_story_missing_context_images_with_its_last_photos_output(tmp_path, scorer, capsys,
                                                                                      monkeypatch):
    """compute_clip_similarity_vist.py scores every story whose ground truth and ``<last photo id>.png``
    exist: "b" (a context image missing, never generated for) is scored with "a"'s output; "c" has no
    output and "e" no ground truth. Clean scores the generated stories only. Both runs also carry the SD
    baseline, whose long-prompt rule each protocol must pass on (spy)."""
    import gill.eval.runner as runner
    from gill.eval.__main__ import main

    cuts = []
    real = runner.generate_from_text
    monkeypatch.setattr(runner, "generate_from_text",
                        lambda *a, **k: cuts.append(k.get("like_original")) or real(*a, **k))
    sis, images = missing_context_stories(tmp_path)
    scored = {}
    for protocol in ("original", "clean"):
        out = tmp_path / protocol
        assert main(["vist", "--model", "tiny-random", "--annotations", str(sis), "--images", str(images), "--out",
                     str(out), "--steps", "1", "--scorer", scorer, "--protocol", protocol,
                     "--settings", "gill/1-caption", "sd/1-caption"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        records = {json.loads(line)["id"]: json.loads(line)
                   for line in (out / "gill/1-caption/records.jsonl").read_text().splitlines()}
        scored[protocol] = ({name: s["n"] for name, s in summary["settings"].items()}, records, capsys.readouterr().out)
    counts, records, printed = scored["original"]
    assert counts == {"gill/1-caption": 3, "sd/1-caption": 3}
    assert sorted(records) == ["a", "b", "d"] and records["b"]["output_of"] == "a"
    assert records["b"]["image"] == records["a"]["image"] and records["b"]["prompt"] == ["b caption 4 ."]
    assert (records["a"]["draw"], records["d"]["draw"]) == (0, 2)  # "e" drew (its context is there), "b" and "c" not
    assert "3 stories scored per setting, 1 of them not generated for" in printed
    counts, records, printed = scored["clean"]
    assert counts == {"gill/1-caption": 2, "sd/1-caption": 2} and sorted(records) == ["a", "d"]
    assert "not generated for" not in printed
    assert cuts == [True, False]  # sd/1-caption: the original's left cut, then clean's own


def test_limit_keeps_the_score_only_stories_before_the_last_example(tmp_path):
    from gill.eval.data import load_vist

    sis, images = missing_context_stories(tmp_path)
    data = load_vist(sis, images, "text", story_order="file", score_missing_context=True)
    assert [e.id for e in data.examples] == ["a", "d"] and [e.id for e in data.score_only] == ["b", "c"]
    assert [e.id for e in data.in_file_order()] == ["a", "b", "c", "d"]
    data.first(1)
    assert [e.id for e in data.examples] == ["a"] and data.score_only == []
    assert load_vist(sis, images, "text", story_order="file").score_only == []  # clean: none


# ---- dtypes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol, flags, wanted", [
    ("original", [], ("bfloat16", "float16")),  # gill/models.py: model.bfloat16(); SD from_pretrained(fp16)
    ("original", ["--dtype", "float32"], ("float32", "float16")),
    ("original", ["--sd-dtype", "float32"], ("bfloat16", "float32")),
    ("clean", [], (None, None)),
    ("clean", ["--dtype", "float16"], ("float16", "float16")),
    ("clean", ["--dtype", "bfloat16", "--sd-dtype", "float32"], ("bfloat16", "float32")),
])
def test_per_part_dtypes_default_to_the_originals_under_its_protocol(protocol, flags, wanted):
    from gill.eval.__main__ import build_parser, dtypes
    from gill.eval.protocol import PROTOCOLS

    args = build_parser().parse_args(["vist", "--annotations", "a", "--images", "i", "--out", "o",
                                      "--protocol", protocol, *flags])
    assert dtypes(args, PROTOCOLS[protocol]) == wanted


def test_the_models_parts_load_in_their_own_dtypes():
    """The eval's loader: LM, vision encoder and GILL's own layers (the mapper) in bf16, every part of
    Stable Diffusion in fp16 (tiny-random's parts are built, not loaded: cast after)."""
    from gill.eval.__main__ import build_parser, load_model
    from gill.eval.shard import Shard

    args = build_parser().parse_args(["vist", "--model", "tiny-random", "--annotations", "a", "--images", "i",
                                      "--out", "o"])
    gill = load_model(args, ORIGINAL, Shard())
    model = gill.model
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.adapter.mapper.parameters()} == {torch.bfloat16}
    pipe = gill.diffusion.pipe
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float16}
    assert (args.dtype, args.sd_dtype) == ("bfloat16", "float16")


def test_loading_takes_a_separate_dtype_for_the_diffusion_pipeline():
    """A model directory (the shipped toy): the backbones load in ``torch_dtype``, Stable Diffusion in
    ``diffusion_dtype``, each from the stored weights (no bf16 -> fp16 round trip)."""
    from gill.loading import load
    from gill.presets import toy_dir

    parts = load(toy_dir(), torch_dtype=torch.bfloat16, diffusion_dtype=torch.float16, load_index=False)
    assert next(parts.model.lm.parameters()).dtype == torch.bfloat16
    assert next(parts.model.vision.parameters()).dtype == torch.bfloat16
    assert {p.dtype for m in (parts.diffusion.unet, parts.diffusion.vae) for p in m.parameters()} == {torch.float16}


# ---- the scorer's image processor ------------------------------------------------------------------------


def test_the_original_protocols_scorer_uses_the_pil_processor(monkeypatch):
    """Where torchvision is installed, transformers 5's ``CLIPImageProcessor`` is torchvision-backed: a spy
    in its place stands for it (here, without torchvision, it would fall back to PIL by itself)."""
    import importlib

    import transformers

    from gill.eval.__main__ import load_scorers
    from gill.presets import toy_metric_dir

    assert transformers.CLIPModel  # the lazy module puts its final self in sys.modules on first use: patch that one
    transformers = importlib.import_module("transformers")
    asked = []

    class TorchvisionBacked(transformers.CLIPImageProcessorPil):
        @classmethod
        def from_pretrained(cls, *a, **k):
            asked.append(a[0])
            return super().from_pretrained(*a, **k)

    monkeypatch.setattr(transformers, "CLIPImageProcessor", TorchvisionBacked)
    spec = f"hf:{toy_metric_dir()}"
    original, _ = load_scorers(spec, None, ORIGINAL)
    assert type(original.processor) is transformers.CLIPImageProcessorPil and asked == []
    clean, _ = load_scorers(spec, None, CLEAN)
    assert type(clean.processor) is TorchvisionBacked and asked == [str(toy_metric_dir())]


def test_the_pil_processors_pixels_are_the_pil_path_on_a_fixed_image():
    """The pixels the original protocol's scorer sees: the shortest edge to 32 by Pillow's bicubic resize
    (40x50 -> 32x40), the centre 32x32 (4 rows off the top), /255, CLIP's mean and std, computed here by hand."""
    from gill.eval.__main__ import load_scorers
    from gill.presets import toy_metric_dir

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))  # 40 wide, 50 high
    scorer, _ = load_scorers(f"hf:{toy_metric_dir()}", None, ORIGINAL)
    got = scorer.processor(images=[image], return_tensors="pt")["pixel_values"][0]
    resized = np.asarray(image.resize((32, 40), Image.Resampling.BICUBIC), dtype=np.float64)[4:36] / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    wanted = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(got, wanted, atol=1e-5, rtol=0)


# ---- FROMAGe's ranking ----------------------------------------------------------------------------------


def rank_both(scores, pairs, context):
    from gill.eval.retrieval import rank

    index = {f"g{i}": i for i in range(scores.shape[1])}
    return rank(scores, pairs, context, index, True)["context_masked"], rank(scores, pairs, context, index, False)


def test_fromage_pushes_a_repeated_target_down_with_the_context_images():
    """eval_vist_retrieval.py takes 10000 off each context image's score, the target's too when the story
    repeats it: 10 other images then rank above it. Ours never masks the target: it ranks first."""
    scores = torch.linspace(0.0, 0.5, 14)[None].flip(-1).clone()  # g0 best, then g1, g2, ...
    fromage, ours = rank_both(scores, [("q", "g0")], {"q": ["g1", "g0", "g2", "g3"]})
    assert fromage == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}
    assert ours["context_masked"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_fromage_breaks_ties_in_topk_order_where_ours_counts_them_against_the_query():
    """Two queries with the same scores, g5 and g6 tied at the top, one wanting g5 and one g6: topk puts one
    of them first, so exactly one hits at 1; ours counts the tie against both."""
    scores = torch.full((2, 14), 0.1)
    scores[:, 5] = scores[:, 6] = 0.9
    context = {"q5": ["g10", "g11", "g12", "g13"], "q6": ["g10", "g11", "g12", "g13"]}
    fromage, ours = rank_both(scores, [("q5", "g5"), ("q6", "g6")], context)
    assert fromage == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0}
    assert ours["context_masked"] == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}


def test_both_rankings_take_the_other_context_images_out_of_the_way():
    """Where the target is not a context image, the two agree: the 4 context images above it do not count."""
    scores = torch.linspace(0.0, 0.5, 14)[None].flip(-1).clone()  # g0..g3 above g4
    fromage, ours = rank_both(scores, [("q", "g4")], {"q": ["g0", "g1", "g2", "g3"]})
    assert fromage == ours["context_masked"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert ours["full_gallery"] == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}


def test_fromage_pushes_an_image_down_once_per_time_the_story_shows_it():
    from gill.eval.retrieval import context_counts

    index = {f"g{i}": i for i in range(5)}
    counts = context_counts([("q", "g0")], {"q": ["g1", "g1", "g2", "g0"]}, index, (1, 5))
    assert counts.tolist() == [[1, 2, 1, 0, 0]]


# ---- the SD baseline's long prompts ----------------------------------------------------------------------


def word_tokenizer(length: int):
    """A word-level tokenizer like CLIP's in layout: BOS + words + EOS, ``length`` ids at most."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": 4 + i for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=length)


@pytest.mark.parametrize("like_original, truncate_left, wanted", [
    (True, True, ["w5", "w6", "w7"]),  # custom_sd.py: the text of w5..w9, encoded again and cut at 5 from the right
    (False, True, ["w7", "w8", "w9"]),  # clean: the tokenizer's left truncation keeps the last words
    (False, False, ["w0", "w1", "w2"]),  # a plain diffusers call keeps the first
])
def test_the_sd_baseline_cuts_a_long_prompt_as_its_protocol_says(like_original, truncate_left, wanted):
    """The ids that reach tiny-random's SD text encoder (5 positions) for "w0 ... w9" (12 ids with BOS, EOS)."""
    from gill.diffusion import DiffusionOptions
    from gill.eval.runner import generate_from_text
    from gill.pipeline import GILL

    pipe = GILL.from_pretrained("tiny-random").diffusion.pipe
    pipe.tokenizer = tokenizer = word_tokenizer(pipe.tokenizer.model_max_length)
    seen = []
    pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].tolist()))
    generate_from_text(pipe, [" ".join(f"w{i}" for i in range(10))], DiffusionOptions(steps=1, guidance_scale=1.0),
                       [0], truncate_left, like_original=like_original)
    assert tokenizer.convert_ids_to_tokens(seen[0]) == ["<s>", *wanted, "</s>"]
    assert tokenizer.truncation_side == "right"  # put back
