"""Every user-facing run setting, given to a front end, reaches Stable Diffusion and the decoder with the value
given: one table of settings drives the test for every front end (``python -m gill generate``, the app's
command line, the app's controls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from gill.settings import LIBRARY_DEFAULTS, SCHEDULERS


@dataclass(frozen=True)
class Setting:
    field: str  # the RunSettings field; its flag is --FIELD-NAME in every front end (gill.settings.add_run_arguments)
    value: Any  # a value that is neither the library's default nor the tiny model's
    arrives: tuple[tuple[str, str], ...]  # ("sd", the Stable Diffusion call's kwarg) / ("decoder", its parameter)
    control: str | None  # the app's control (its respond's argument); None: the app takes it from its flags only
    # HOOK(eval): add `eval: bool` here (True for steps, guidance_scale, scheduler, seed, which `python -m gill.eval`
    # hands Stable Diffusion) once gill.eval takes the shared flags; its front end goes in FRONT_ENDS below.

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS = [
    Setting("steps", 3, (("sd", "num_inference_steps"),), "steps"),
    Setting("guidance_scale", 2.5, (("sd", "guidance_scale"),), "guidance"),
    Setting("scheduler", "ddim", (("sd", "scheduler"),), None),
    Setting("seed", 5, (("sd", "generator"), ("decoder", "generator")), "seed"),
    Setting("max_new_tokens", 12, (("decoder", "max_new_tokens"),), "max_tokens"),
    Setting("temperature", 0.5, (("decoder", "temperature"),), "temperature"),
    Setting("top_p", 0.8, (("decoder", "top_p"),), "top_p"),
    Setting("img_scale_factor", 60.0, (("decoder", "img_scale_factor"),), "frequency"),  # large: an image at once
]
CONTROLS = ["temperature", "top_p", "max_tokens", "frequency", "policy", "steps", "guidance", "seed"]  # respond's order
LABELS = ["Temperature (0: greedy)", "Top-p", "Max tokens", "Image frequency (scale factor)", "Decision policy",
          "Diffusion steps", "Guidance scale", "Seed"]


def flags(settings) -> list[str]:
    return [x for s in settings for x in (s.flag, str(s.value))]


def expected(setting: Setting, key: str) -> Any:
    """What the spy records for the setting's value."""
    return SCHEDULERS[setting.value] if key == "scheduler" else setting.value


def test_the_table_covers_every_flag_and_its_values_are_not_defaults(tiny_gill):
    import argparse

    from gill.settings import add_run_arguments, run_flags

    assert {s.field for s in SETTINGS} == set(run_flags())  # every run-setting flag a front end has
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    for s in SETTINGS:
        assert getattr(parser.parse_args([s.flag, str(s.value)]), s.field) == s.value
        assert s.value not in (getattr(LIBRARY_DEFAULTS, s.field), getattr(tiny_gill.run_settings(), s.field))


# ---- what reaches Stable Diffusion and the decoder ---------------------------------------------------------


@dataclass
class Seen:
    sd: list[dict]
    decoder: list[dict]


def spy(model, monkeypatch) -> Seen:
    """Record each Stable Diffusion call's kwargs (its scheduler's class, the first generator's seed) and each
    decoder call's options and generator seed."""
    import gill.pipeline

    seen = Seen([], [])
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


def run_cli(tiny_gill, monkeypatch, tmp_path) -> None:
    """``python -m gill generate`` with every setting's flag."""
    from gill.__main__ import main

    assert main(["generate", "a red circle", "--policy", "generate", "--out", str(tmp_path), *flags(SETTINGS)]) == 0


def run_app_flags(tiny_gill, monkeypatch, tmp_path) -> None:
    """``python -m app`` with every setting's flag; a message sent with the page's initial controls."""
    import gradio as gr

    from app.app import main
    from synthetic import free_port

    served = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, *a, **k: served.append(self))
    monkeypatch.setattr(gr.Blocks, "queue", lambda self, *a, **k: self)
    assert main([*flags(SETTINGS), "--port", str(free_port())]) == 0
    ask(served[0], {**initial_controls(served[0]), "policy": "generate"})
    served[0].sessions.close_all()


def run_app_controls(tiny_gill, monkeypatch, tmp_path) -> None:
    """The app started with only the flags of settings it has no control for; a message sent with every
    control set."""
    from app.app import build_demo, build_parser
    from gill.settings import settings_from_args

    args = build_parser().parse_args(flags([s for s in SETTINGS if s.control is None]))
    demo = build_demo(tiny_gill, settings_from_args(args))
    ask(demo, {**initial_controls(demo), "policy": "generate", **{s.control: s.value for s in SETTINGS if s.control}})
    demo.sessions.close_all()


FRONT_ENDS = {
    "python -m gill generate": run_cli,
    "python -m app (flags)": run_app_flags,
    "python -m app (controls)": run_app_controls,
    # HOOK(eval): "python -m gill.eval": run_eval, a function running `python -m gill.eval vist` in this process
    # on tiny_gill with flags(the settings whose `eval` is True), for the rows it takes (see Setting).
}


@pytest.fixture(scope="module")
def seen(tiny_gill, tmp_path_factory) -> dict[str, Seen]:
    """What each front end handed Stable Diffusion and the decoder, run once each on the tiny model."""
    from gill.pipeline import GILL

    out = {}
    for name, run in FRONT_ENDS.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GILL, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_gill))
            out[name] = spy(tiny_gill, mp)
            run(tiny_gill, mp, tmp_path_factory.mktemp("out"))
    return out


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.field)
@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_each_setting_reaches_stable_diffusion_and_the_decoder_with_its_value(seen, front_end, setting):
    got = seen[front_end]
    assert got.sd and got.decoder, f"{front_end}: no image was drawn or nothing decoded"
    for where, key in setting.arrives:
        first = (got.sd if where == "sd" else got.decoder)[0]  # the first image of the answer: seed + 0
        assert first[key] == expected(setting, key), (front_end, setting.flag, where, key, first[key])
