"""The library call path and its front ends (``python -m gill generate``, ``python -m gill.eval``) on hostile
and careless input: one call's options never change another's, config numbers that size allocations are
bounded when the config is read, every number and path is checked before the model runs, and each refusal
is one line naming the thing, with the next run working."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from memory import peak_growth
from synthetic import save_tiny_model_dir, spy_diffusion
from PIL import Image

from gill.config import ConfigError, GILLConfig
from gill.diffusion import DiffusionOptions
from gill.pipeline import GILL, GeneratedImage

GB = 2**30


@pytest.fixture(scope="module")
def gill(tiny_gill):
    """The tiny GILL that answers with images (conftest), drawing with 2 steps by default: fast."""
    tiny_gill.settings = dataclasses.replace(tiny_gill.settings, steps=2)
    return tiny_gill


# ---- 1. one call's options never change another's --------------------------------------------------------


_spy_pipeline = spy_diffusion


def _draw(gill, diffusion=None):
    out = gill.generate_interleaved(["a red circle"], max_new_tokens=10, policy="generate", img_scale_factor=1e5,
                                    diffusion=diffusion)
    assert any(isinstance(s, GeneratedImage) for s in out)


@pytest.mark.parametrize("field,value", [
    ("scheduler", "euler"), ("scheduler", "ddim"), ("steps", 3), ("guidance_scale", 1.5), ("seed", 7),
    ("height", 48), ("width", 48), ("negative_prompt_embeds", "ones"),
])
def test_one_calls_diffusion_options_never_change_a_later_default_call(gill, monkeypatch, field, value):
    calls = _spy_pipeline(gill, monkeypatch)
    own_scheduler = gill.diffusion.pipe.scheduler
    if value == "ones":
        value = torch.ones(1, gill.model.config.gen_seq_len, gill.model.config.gen_emb_dim)
    shared = DiffusionOptions()
    _draw(gill, shared)  # the default, as every caller sharing ``shared`` gets it
    _draw(gill, DiffusionOptions(**{field: value}))  # one caller's own choice
    _draw(gill, shared)
    _draw(gill)  # and a call without options
    default, chosen, after, bare = calls[0], calls[1], calls[-2], calls[-1]
    assert chosen != default, f"the option {field}={value!r} did not reach the pipeline"
    assert after == default and bare == default, f"{field}={value!r} stuck to later calls"
    assert default["scheduler"] == "PNDMScheduler" and gill.diffusion.pipe.scheduler is own_scheduler
    assert shared == DiffusionOptions()


def test_a_scheduler_set_on_the_pipeline_by_its_owner_is_the_default(gill):
    from diffusers import DDIMScheduler

    pipe = gill.diffusion.pipe
    own = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(own.config)
        assert type(gill.diffusion.scheduler_for(None)).__name__ == "DDIMScheduler"
        assert type(gill.diffusion.scheduler_for("euler")).__name__ == "EulerDiscreteScheduler"
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    finally:
        pipe.scheduler = own


# ---- 2. config numbers that size allocations --------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, tiny_opt):
    return save_tiny_model_dir(tmp_path, tiny_opt)


def _edit_config(model_dir, path, value):
    cfg = json.loads((model_dir / "config.json").read_text())
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_a_huge_image_size_is_refused_at_load_naming_the_field_and_the_range(model_dir, capsys):
    from gill.__main__ import main

    _edit_config(model_dir, "preprocess.image_size", 30000)
    grown, result = peak_growth(lambda: GILL.from_pretrained(model_dir))
    assert isinstance(result, ConfigError), f"loaded: {result!r}"
    assert "preprocess.image_size is 30000" in str(result) and "from 1 to 1024" in str(result)
    assert str(model_dir / "config.json") in str(result)
    assert grown < GB
    assert main(["generate", "--model", str(model_dir), "--out", str(model_dir.parent / "o"), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preprocess.image_size is 30000" in err and "Traceback" not in err
    _edit_config(model_dir, "preprocess.image_size", 32)
    assert GILL.from_pretrained(model_dir).model.config.preprocess.image_size == 32  # the next run works


@pytest.mark.parametrize("value,wanted", [
    (0, "run: context_length is 0; expected an integer >= 1"),
    ("long", r"field run.context_length is 'long' \(str\); expected an integer or null"),
    (300, "run: context_length is 300, more than its LM's 256 positions"),  # the tiny LM reads 256
])
def test_a_context_length_the_lm_cannot_read_is_refused_at_load_in_one_line(model_dir, capsys, value, wanted):
    from gill.__main__ import main

    _edit_config(model_dir, "run.context_length", value)
    with pytest.raises(ConfigError, match=wanted) as e:
        GILL.from_pretrained(model_dir, load_diffusion=False)
    assert str(model_dir / "config.json") in str(e.value)
    assert main(["generate", "--model", str(model_dir), "--out", str(model_dir.parent / "o"), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "context_length is" in err and "Traceback" not in err
    _edit_config(model_dir, "run.context_length", 100)
    assert GILL.from_pretrained(model_dir, load_diffusion=False).context_length == 100  # the next run works


@pytest.mark.parametrize("field,value,limit", [
    ("preprocess.image_size", 1025, 1024), ("n_visual_tokens", 10**6, 256), ("tokens.num_img_tokens", 10**5, 256),
    ("gen_seq_len", 10**7, 1024), ("mapper.hidden_dim", 10**6, 16384), ("mapper.num_decoder_layers", 1000, 64),
    ("tokens.vocab_size", 10**12, 2**24),
])
def test_every_config_number_that_sizes_an_allocation_is_bounded(field, value, limit):
    data = GILLConfig().to_dict()
    *parents, last = field.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(ConfigError, match=rf"field {field} is {value}; expected an integer from \d+ to {limit} \("):
        GILLConfig.from_dict(data, source="m/config.json")


@pytest.mark.parametrize("size", [224, 256, 336, 384, 448, 512, 1024])
def test_every_real_encoder_image_size_is_admitted(size):
    data = GILLConfig().to_dict()
    data["preprocess"]["image_size"] = size
    assert GILLConfig.from_dict(data).preprocess.image_size == size


# ---- 3. numbers checked before the model runs ------------------------------------------------------------


def test_a_seed_out_of_range_is_named_before_the_model_runs(gill, monkeypatch):
    ran = []
    monkeypatch.setattr(type(gill.model), "lm_forward", lambda *a, **k: ran.append(1))
    for call in (lambda s: gill.generate_interleaved(["hi"], seed=s),
                 lambda s: list(gill.stream(["hi"], seed=s)),
                 lambda s: gill.generate_interleaved(["hi"], diffusion=DiffusionOptions(seed=s))):
        for seed in (2**64, 2**32, -1):
            with pytest.raises(ValueError, match=rf"seed is {seed}; expected an integer from 0 to 4294967295"):
                call(seed)
    assert not ran


def test_max_new_tokens_beyond_the_context_is_named_with_the_limit(gill):
    limit = gill.max_positions
    most = limit - len(gill.img_tokens.ids)
    for call in (lambda: gill.generate_interleaved(["hi"], max_new_tokens=10**7),
                 lambda: list(gill.stream(["hi"], max_new_tokens=10**7, truncate=True))):
        with pytest.raises(ValueError) as e:
            call()
        text = str(e.value)
        assert f"max_new_tokens is {10**7}" in text and f"reads {limit} positions" in text
        assert f"max_new_tokens <= {most}" in text and "shorten" not in text and "truncate" not in text
    gill.generate_interleaved(["hi"], max_new_tokens=3)  # the next call works


def test_diffusion_sizes_and_steps_are_bounded(gill):
    for options, wanted in [(DiffusionOptions(height=100_000), "height is 100000; expected a multiple of 8 from 8 to 2048"),
                            (DiffusionOptions(steps=10**6), "steps is 1000000; expected an integer from 1 to 1000")]:
        with pytest.raises(ValueError, match=wanted):
            gill.generate_interleaved(["hi"], diffusion=options)


# ---- 4 and 5. the front ends: one line naming the thing, before the model runs ---------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusals under test come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(GILL, "from_pretrained", refuse)


def _one_line(capsys, *wanted):
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and all(w in last for w in wanted), err
    return last


@pytest.mark.parametrize("flag,value,wanted", [
    ("--seed", str(2**64), "argument --seed: must be an integer from 0 to 4294967295"),
    ("--seed", "-1", "argument --seed: must be an integer from 0 to 4294967295"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be an integer >= 1"),
    ("--steps", "0", "argument --steps: must be an integer from 1 to 1000"),
    ("--steps", "5000", "argument --steps: must be an integer from 1 to 1000"),
    ("--guidance", "nan", "argument --guidance: must be a number >= 0"),
    ("--temperature", "-1", "argument --temperature: must be a number >= 0"),
    ("--top-p", "0", "argument --top-p: must be a number > 0 and <= 1"),
    ("--top-k", "-2", "argument --top-k: must be an integer >= 0"),
    ("--scheduler", "fastest", "argument --scheduler: invalid choice: 'fastest'"),
])
def test_generate_command_range_checks_at_parse_time(flag, value, wanted, no_model, capsys):
    from gill.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["generate", flag, value, "hi"])
    assert e.value.code == 2
    _one_line(capsys, wanted)


def test_generate_command_refuses_an_existing_file_as_out_before_the_model_runs(tmp_path, no_model, capsys):
    from gill.__main__ import main

    (tmp_path / "taken.png").write_text("mine")
    for out in (tmp_path / "taken.png", tmp_path / "taken.png" / "sub"):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--out", str(out), "hi"])
        assert e.value.code == 2
        _one_line(capsys, "argument --out: must be a folder", str(tmp_path / "taken.png"))
    assert (tmp_path / "taken.png").read_text() == "mine"


def test_generate_command_names_a_home_that_does_not_exist_and_a_missing_image(tmp_path, capsys):
    from gill.__main__ import main

    assert main(["generate", "--model", "~nouser-gill-test/m", "--out", str(tmp_path / "o"), "hi"]) == 1
    _one_line(capsys, "~nouser-gill-test/m", "no such user")
    assert main(["generate", "--model", "tiny-random", "--image", str(tmp_path / "gone.png"), "--out",
                 str(tmp_path / "o"), "hi"]) == 1
    _one_line(capsys, "gone.png", "no such image file")


def test_the_next_generate_run_works(tmp_path, capsys):
    from gill.__main__ import main

    assert main(["generate", "--model", "tiny-random", "--out", str(tmp_path / "o"), "--max-new-tokens", "4",
                 "--steps", "1", "--seed", str(2**32 - 1), "--scheduler", "euler", "hi"]) == 0


# ---- gill.eval ---------------------------------------------------------------------------------------------


def _visdial(root, question_index):
    images = root / "img"
    images.mkdir()
    for i in (1, 2):
        Image.new("RGB", (32, 32), "red").save(images / f"VisualDialog_val2018_{i:012d}.jpg")
    dialogs = [{"image_id": 1, "dialog": [{"question": 0, "answer": 0}]},
               {"image_id": 2, "dialog": [{"question": question_index, "answer": 0}]}]
    (root / "v.json").write_text(json.dumps({"data": {"questions": ["is it red", "SECRET last question"],
                                                      "answers": ["yes"], "dialogs": dialogs}}))
    return root / "v.json", images


@pytest.mark.parametrize("index", [-1, -2, 2, True, "0"])
def test_a_visdial_index_out_of_range_is_named_never_read_from_the_end(tmp_path, index):
    from gill.eval.data import load_visdial

    dialogs, images = _visdial(tmp_path, index)
    data = load_visdial(dialogs, images)
    assert [e.id for e in data.examples] == ["1"]
    assert all("SECRET" not in c for e in data.examples for c in e.captions)
    [skip] = data.skipped
    assert skip["id"] == "dialogs[1]" and skip["kind"] == "bad entry"
    assert f"question index {index!r}" in skip["reason"] and "v.json" in skip["reason"]


def _eval_args(tmp_path, task="vist", images=None, out=None):
    (tmp_path / "a.json").write_text('{"annotations": []}')
    first = ["--annotations", str(tmp_path / "a.json")] if task == "vist" else ["--dialogs", str(tmp_path / "a.json")]
    return [task, *first, "--images", str(images or tmp_path), "--out", str(out or tmp_path / "out"),
            "--model", "tiny-random", "--no-score"]


@pytest.mark.parametrize("task", ["vist", "visdial"])
def test_eval_images_that_is_a_file_is_an_error_naming_the_flag(tmp_path, task, no_model, capsys):
    from gill.eval.__main__ import main

    (tmp_path / "pic.png").write_text("x")
    assert main(_eval_args(tmp_path, task, images=tmp_path / "pic.png")) == 1
    _one_line(capsys, "--images", "pic.png", "not a folder")
    with pytest.raises(NotADirectoryError, match="pic.png: a file, not a folder"):
        from gill.eval.data import load_visdial, load_vist

        (load_vist if task == "vist" else load_visdial)(tmp_path / "a.json", tmp_path / "pic.png")


def test_eval_out_that_is_a_file_is_refused_at_parse_time(tmp_path, no_model, capsys):
    from gill.eval.__main__ import main

    (tmp_path / "results").write_text("keep me")
    for argv in (_eval_args(tmp_path, out=tmp_path / "results"), ["score", str(tmp_path / "results"), "--task", "vist"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        _one_line(capsys, "must be a folder", "results")
    assert (tmp_path / "results").read_text() == "keep me"


def test_eval_score_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    from gill.eval.__main__ import main

    (tmp_path / "done").mkdir()
    assert main(["score", str(tmp_path / "done"), "--task", "vist"]) == 1
    _one_line(capsys, "run.json", "no such file")
    (tmp_path / "done" / "run.json").write_text("[1, 2")
    assert main(["score", str(tmp_path / "done"), "--task", "vist"]) == 1
    _one_line(capsys, "run.json", "cannot read it")


def test_eval_seed_and_scheduler_are_checked_at_parse_time(tmp_path, no_model, capsys):
    from gill.eval.__main__ import main

    for flag, value, wanted in [("--seed", str(2**64), "must be an integer from 0 to 4294967295"),
                                ("--scheduler", "fastest", "invalid choice: 'fastest'")]:
        with pytest.raises(SystemExit) as e:
            main(_eval_args(tmp_path) + [flag, value])
        assert e.value.code == 2
        _one_line(capsys, f"argument {flag}", wanted)


def test_eval_draws_gill_and_the_plain_sd_baseline_with_the_asked_scheduler_and_leaves_none_behind(tmp_path, monkeypatch):
    from gill.eval.__main__ import main

    seen = []
    real_from_pretrained = GILL.from_pretrained.__func__

    def load(cls, *a, **k):
        g = real_from_pretrained(cls, *a, **k)
        pipe = g.diffusion.pipe
        real_call = type(pipe).__call__

        def spy(self, **kwargs):
            seen.append(("gill" if "prompt_embeds" in kwargs else "sd", type(self.scheduler).__name__))
            return real_call(self, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy)
        seen.append(("loaded", g))
        return g

    monkeypatch.setattr(GILL, "from_pretrained", classmethod(load))
    dialogs, images = _visdial(tmp_path, 0)
    assert main(["visdial", "--model", "tiny-random", "--dialogs", str(dialogs), "--images", str(images), "--out",
                 str(tmp_path / "out"), "--steps", "1", "--rounds", "1", "--no-score", "--scheduler", "euler",
                 "--settings", "sd/1-round", "gill/1-round"]) == 0
    (_, g), *draws = seen
    assert {mode for mode, _ in draws} == {"sd", "gill"}
    assert all(name == "EulerDiscreteScheduler" for _, name in draws), draws
    assert type(g.diffusion.pipe.scheduler).__name__ == "PNDMScheduler"


def test_shared_run_settings_cannot_be_edited_in_place(gill):
    from gill.settings import LIBRARY_DEFAULTS

    for settings in (LIBRARY_DEFAULTS, gill.settings):
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.scheduler = "euler"
    assert LIBRARY_DEFAULTS.scheduler is None and gill.run_settings().scheduler is None
