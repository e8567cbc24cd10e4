"""Every user-facing run setting, given to a front end, reaches Stable Diffusion and the decoder with the value
given: one table of settings drives the test for every front end (``python -m gill generate``, the app's
command line, the app's controls, ``python -m gill.eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from gill.settings import LIBRARY_DEFAULTS, SCHEDULERS


@dataclass(frozen=True)
class Setting:
    field: str  # the RunSettings field; its flag is --FIELD-NAME in every front end (gill.settings.add_run_arguments)
    value: Any  # a value that is neither the library's default nor the tiny model's
    # ("sd", the Stable Diffusion call's kwarg) / ("decoder", its parameter) / ("record", the eval's run.json key,
    # which `python -m gill.eval score` reads)
    arrives: tuple[tuple[str, str], ...]
    control: str | None  # the app's control (its respond's argument); None: the app takes it from its flags only
    eval: bool = False  # a flag of `python -m gill.eval` (which draws from the [IMG] slot: it decodes nothing)
    chat: bool = True  # a flag of the app and of `python -m gill generate`

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS = [
    Setting("steps", 3, (("sd", "num_inference_steps"),), "steps", eval=True),
    Setting("guidance_scale", 2.5, (("sd", "guidance_scale"),), "guidance", eval=True),
    Setting("scheduler", "ddim", (("sd", "scheduler"),), None, eval=True),
    Setting("seed", 5, (("sd", "generator"), ("decoder", "generator")), "seed", eval=True),
    Setting("max_new_tokens", 12, (("decoder", "max_new_tokens"),), "max_tokens"),
    Setting("temperature", 0.5, (("decoder", "temperature"),), "temperature"),
    Setting("top_p", 0.8, (("decoder", "top_p"),), "top_p"),
    Setting("img_scale_factor", 60.0, (("decoder", "img_scale_factor"),), "frequency"),  # large: an image at once
    # the evaluation's CLIP scorer, named (not loaded: the eval runs with --no-score) in the run.json it scores by
    Setting("scorer", "hf:openai/clip-vit-base-patch32", (("record", "scorer"),), None, eval=True, chat=False),
]
CHAT = [s for s in SETTINGS if s.chat]
EVAL = [s for s in SETTINGS if s.eval]
CONTROLS = ["temperature", "top_p", "max_tokens", "frequency", "policy", "steps", "guidance", "seed"]  # respond's order
LABELS = ["Temperature (0: greedy)", "Top-p", "Max tokens", "Image frequency (scale factor)", "Decision policy",
          "Diffusion steps", "Guidance scale", "Seed"]


def flags(settings) -> list[str]:
    return [x for s in settings for x in (s.flag, str(s.value))]


EVAL_STORY = "s1"  # the one story of the eval's fixture (vist_story)


def expected(setting: Setting, key: str, front_end: str) -> Any:
    """What the spy records for the setting's value. The eval seeds each example's image from the base seed
    and its id (the clean protocol's ``stable_seed``, so that an image depends on nothing else)."""
    if key == "scheduler":
        return SCHEDULERS[setting.value]
    if front_end == EVAL_FRONT_END and key == "generator":
        from gill.eval.seeds import stable_seed

        return stable_seed(setting.value, EVAL_STORY)
    return setting.value


def eval_base(root) -> list[str]:
    """``python -m gill.eval vist`` on a one-story fixture, the clean protocol, nothing scored."""
    sis, images = vist_story(root)
    return ["vist", "--model", "tiny-random", "--annotations", str(sis), "--images", str(images), "--out",
            str(root / "out"), "--protocol", "clean", "--no-score", "--settings", "gill/1-caption", "sd/1-caption"]


def test_the_table_covers_every_flag_and_its_values_are_not_defaults(tiny_gill, tmp_path):
    import argparse

    from gill.eval.__main__ import build_parser as eval_parser
    from gill.settings import add_run_arguments, run_flags

    assert {s.field for s in CHAT} == set(run_flags())  # every run-setting flag the app and the CLI have
    assert {s.field for s in EVAL} == set(run_flags(scorer=True, decoding=False))  # and the eval
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    for s in CHAT:
        assert getattr(parser.parse_args([s.flag, str(s.value)]), s.field) == s.value
    base = eval_base(tmp_path)
    for s in EVAL:
        assert getattr(eval_parser().parse_args([*base, s.flag, str(s.value)]), s.field) == s.value
    for s in SETTINGS:
        assert s.value not in (getattr(LIBRARY_DEFAULTS, s.field), getattr(tiny_gill.run_settings(), s.field))


# ---- what reaches Stable Diffusion and the decoder ---------------------------------------------------------


@dataclass
class Seen:
    sd: list[dict]
    decoder: list[dict]
    record: dict  # the eval's run.json


def spy(model, monkeypatch) -> Seen:
    """Record each Stable Diffusion call's kwargs (its scheduler's class, the first generator's seed) and each
    decoder call's options and generator seed."""
    import gill.pipeline

    seen = Seen([], [], {})
    pipe_type = type(model.diffusion.pipe)
    real_call = pipe_type.__call__

    def sd(self, **kwargs):
        seen.sd.append({**kwargs, "scheduler": type(self.scheduler).__name__,
                        "generator": kwargs["generator"][0].initial_seed()})
        return real_call(self, **kwargs)

    def decoder(real):
        def call(**kwargs):
            o = kwargs["options"]
            seen.decoder.append({"max_new_tokens": o.max_new_tokens, "temperature": o.temperature, "top_p": o.top_p,
                                 "img_scale_factor": o.img_scale_factor, "generator": kwargs["generator"].initial_seed()})
            return real(**kwargs)
        return call

    monkeypatch.setattr(pipe_type, "__call__", sd)
    monkeypatch.setattr(gill.pipeline, "decode", decoder(gill.pipeline.decode))
    monkeypatch.setattr(gill.pipeline, "iter_decode", decoder(gill.pipeline.iter_decode))
    return seen


def respond_of(demo):
    return next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "respond")


def initial_controls(demo) -> dict[str, Any]:
    by_label = {getattr(c, "label", None): c for c in demo.blocks.values()}
    return {name: by_label[label].value for name, label in zip(CONTROLS, LABELS)}


def ask(demo, controls: dict[str, Any]) -> None:
    messages = list(respond_of(demo)({"text": "a red circle", "files": []}, [], [], *[controls[c] for c in CONTROLS]))
    assert messages, "the app did not answer"


def run_cli(tiny_gill, monkeypatch, tmp_path, seen) -> None:
    """``python -m gill generate`` with every setting's flag."""
    from gill.__main__ import main

    assert main(["generate", "a red circle", "--policy", "generate", "--out", str(tmp_path), *flags(CHAT)]) == 0


def vist_story(root):
    """A VIST-format fixture of one story (EVAL_STORY): five photos and their captions."""
    import json

    from PIL import Image

    images = root / "images"
    images.mkdir()
    for i, color in enumerate(["red", "green", "blue", "yellow", "white"]):
        Image.new("RGB", (32, 32), color).save(images / f"{100 + i}.png")
    steps = [{"story_id": EVAL_STORY, "photo_flickr_id": str(100 + i), "worker_arranged_photo_order": i,
              "original_text": f"a {color} square.", "text": f"a {color} square."}
             for i, color in enumerate(["red", "green", "blue", "yellow", "white"])]
    (root / "sis.json").write_text(json.dumps({"annotations": [[s] for s in steps]}), encoding="utf-8")
    return root / "sis.json", images


def run_eval(tiny_gill, monkeypatch, tmp_path, seen) -> None:
    """``python -m gill.eval vist`` with every flag of its settings: one GILL image (gill/1-caption) and one
    plain Stable Diffusion image (sd/1-caption) of the one story."""
    import json

    from gill.eval.__main__ import main

    assert main([*eval_base(tmp_path), *flags(EVAL)]) == 0
    assert sorted("prompt" in call for call in seen.sd) == [False, True]  # GILL's conditioning, then SD's own text
    seen.record.update(json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8")))


def run_app_flags(tiny_gill, monkeypatch, tmp_path, seen) -> None:
    """``python -m app`` with every setting's flag; a message sent with the page's initial controls."""
    import gradio as gr

    from app.app import main
    from synthetic import free_port

    served = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, *a, **k: served.append(self))
    monkeypatch.setattr(gr.Blocks, "queue", lambda self, *a, **k: self)
    assert main([*flags(CHAT), "--port", str(free_port())]) == 0
    ask(served[0], {**initial_controls(served[0]), "policy": "generate"})
    served[0].sessions.close_all()


def run_app_controls(tiny_gill, monkeypatch, tmp_path, seen) -> None:
    """The app started with only the flags of settings it has no control for; a message sent with every
    control set."""
    from app.app import build_demo, build_parser
    from gill.settings import settings_from_args

    args = build_parser().parse_args(flags([s for s in CHAT if s.control is None]))
    demo = build_demo(tiny_gill, settings_from_args(args))
    ask(demo, {**initial_controls(demo), "policy": "generate", **{s.control: s.value for s in CHAT if s.control}})
    demo.sessions.close_all()


EVAL_FRONT_END = "python -m gill.eval"


@dataclass(frozen=True)
class FrontEnd:
    run: Any  # (tiny_gill, monkeypatch, tmp_path, seen) -> None, every setting it takes given
    takes: list[Setting]  # the rows it has a flag or control for
    reaches: frozenset[str]  # where its settings go: "sd", "decoder", "record"
    sd_calls: int | None  # the Stable Diffusion calls it makes (None: at least one); each checked where it is
    # one example's own image (the eval), else the first image of the answer only (seed + 0)


FRONT_ENDS = {
    "python -m gill generate": FrontEnd(run_cli, CHAT, frozenset({"sd", "decoder"}), None),
    "python -m app (flags)": FrontEnd(run_app_flags, CHAT, frozenset({"sd", "decoder"}), None),
    "python -m app (controls)": FrontEnd(run_app_controls, CHAT, frozenset({"sd", "decoder"}), None),
    EVAL_FRONT_END: FrontEnd(run_eval, EVAL, frozenset({"sd", "record"}), 2),  # GILL's image, plain SD's
}


@pytest.fixture(scope="module")
def seen(tiny_gill, tmp_path_factory) -> dict[str, Seen]:
    """What each front end handed Stable Diffusion and the decoder, run once each on the tiny model."""
    from gill.pipeline import GILL

    out = {}
    for name, front in FRONT_ENDS.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GILL, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_gill))
            out[name] = spy(tiny_gill, mp)
            front.run(tiny_gill, mp, tmp_path_factory.mktemp("out"), out[name])
    return out


CASES = [(name, s) for name, front in FRONT_ENDS.items() for s in front.takes]


@pytest.mark.parametrize("front_end, setting", CASES, ids=[f"{n}-{s.field}" for n, s in CASES])
def test_each_setting_reaches_stable_diffusion_and_the_decoder_with_its_value(seen, front_end, setting):
    got, front = seen[front_end], FRONT_ENDS[front_end]
    assert got.sd, f"{front_end}: no image was drawn"
    assert front.sd_calls in (None, len(got.sd)), f"{front_end}: {len(got.sd)} Stable Diffusion calls"
    assert ("decoder" not in front.reaches or got.decoder), f"{front_end}: nothing decoded"
    arrivals = [(where, key) for where, key in setting.arrives if where in front.reaches]
    assert arrivals, f"{front_end} takes {setting.flag}, which reaches nothing it runs"
    for where, key in arrivals:
        calls = {"sd": got.sd if front.sd_calls else got.sd[:1], "decoder": got.decoder[:1], "record": [got.record]}[where]
        for call in calls:
            assert call[key] == expected(setting, key, front_end), (front_end, setting.flag, where, key, call[key])
