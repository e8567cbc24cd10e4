"""gill.loading: one loader for presets, model directories and Hub repos; run settings that travel with a
model and are resolved once; the released GILL by name from a Hub cache; no import cycle in gill/."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gill import GILL, LIBRARY_DEFAULTS, RunSettings, resolve_settings
from gill.backbones import build_tokenizer, tiny_clip_vision, tiny_opt
from gill.config import ConfigError, GILLConfig
from gill.presets import toy_dir, toy_metric_dir
from gill.retrieval import IndexMismatchError
from original_reference import original_mapper, original_state_dict
from synthetic import spy_diffusion

ROOT = Path(__file__).resolve().parents[1]


# ---- the resolver --------------------------------------------------------------------------------------


def test_explicit_beats_the_model_which_beats_the_library():
    model = RunSettings(steps=25, guidance_scale=2.0)
    s = resolve_settings({"steps": 7, "seed": None}, model)
    assert (s.steps, s.guidance_scale, s.seed, s.img_scale_factor) == (7, 2.0, LIBRARY_DEFAULTS.seed, 1.0)
    assert resolve_settings(None, None) == LIBRARY_DEFAULTS
    with pytest.raises(ValueError, match="unknown run setting"):
        resolve_settings({"stepz": 3})
    with pytest.raises(ValueError, match="top_p is 0"):
        resolve_settings({"top_p": 0})


def test_run_settings_round_trip_in_config_json_and_old_files_load(tmp_path):
    cfg = GILLConfig(run=RunSettings(steps=12, img_scale_factor=3.0))
    cfg.to_json(tmp_path / "config.json")
    assert GILLConfig.from_json(tmp_path / "config.json").run == cfg.run
    old = json.loads(cfg.to_json())
    del old["run"], old["training_data"]
    old["format_version"] = 1  # a directory written before run settings existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert GILLConfig.from_json(tmp_path / "old.json").run == RunSettings()
    old["run"] = {"steps": "many"}
    (tmp_path / "bad.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"bad.json: field run.steps is 'many' \(str\); expected an integer or null"):
        GILLConfig.from_json(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def toy():
    return GILL.from_pretrained("toy")


def test_the_library_call_uses_the_models_settings_and_answers_a_caption_with_an_image(toy, monkeypatch):
    import gill.pipeline
    from gill.pipeline import GeneratedImage, RetrievedImage

    assert (toy.settings.steps, toy.settings.guidance_scale) == (25, 4.0)  # not the library's 50 and 7.5
    draws, decoded = spy_diffusion(toy, monkeypatch), []
    real_decode = gill.pipeline.decode
    monkeypatch.setattr(gill.pipeline, "decode", lambda **kw: decoded.append(kw["options"]) or real_decode(**kw))
    answer = toy.generate_interleaved(["a large red circle on the left on white."], policy="generate")  # nothing else
    assert any(isinstance(s, (GeneratedImage, RetrievedImage)) for s in answer), answer
    # what reached the decoder and Stable Diffusion: the model's settings (25 steps, guidance 4.0, image factor
    # 1.1, greedy, seed 42 as the library's default), not the library's 50 / 7.5 / 1.0
    assert [(d["steps"], d["guidance"], d["seeds"][0]) for d in draws] == [(25, 4.0, 42)], draws
    assert [(o.img_scale_factor, o.temperature) for o in decoded] == [(1.1, 0.0)], decoded
    # and the explicit argument wins: 4 new tokens leave no room for an [IMG] group, so text only
    text_only = toy.generate_interleaved(["a large red circle on the left on white."], max_new_tokens=4)
    assert not any(isinstance(s, (GeneratedImage, RetrievedImage)) for s in text_only), text_only


def test_the_shipped_toys_context_is_the_positions_its_lm_was_trained_on(toy):
    """The toy LM has 512 positions and was trained on documents of 448, GILL on sequences of GILL_LEN (256):
    its run settings say so, the build writes it (TOY_RUN), and the library's limit is that."""
    from training.toy.plan import GILL_LEN, INSTALLED_SCORER, LM_LEN, LM_POSITIONS, TOY_RUN

    assert toy.context_length == GILL_LEN == 256 < LM_LEN == 448 < toy.max_positions == LM_POSITIONS == 512
    assert TOY_RUN["context_length"] == GILL_LEN
    shipped = json.loads((toy_dir() / "config.json").read_text())["run"]
    assert {k: v for k, v in shipped.items() if v is not None} == {**TOY_RUN, "scorer": INSTALLED_SCORER}


def test_app_cli_and_eval_get_the_same_settings_from_the_same_resolver(toy):
    from app.app import build_parser as app_parser
    from gill.__main__ import build_parser as cli_parser
    from gill.eval.__main__ import build_parser as eval_parser, settings_for as eval_settings
    from gill.settings import settings_for as app_settings, settings_for as cli_settings  # the shared flags'

    eval_args = ["vist", "--annotations", "a.json", "--images", "imgs", "--out", "o"]
    got = {
        "app": app_settings(toy, app_parser().parse_args([])),
        "cli": cli_settings(toy, cli_parser().parse_args(["generate", "a red circle"])),
        "eval": eval_settings(toy, eval_parser().parse_args(eval_args)),
    }
    assert len({(s.steps, s.guidance_scale, s.seed, s.img_scale_factor, s.scheduler) for s in got.values()}) == 1, got
    assert got["cli"] == toy.run_settings()
    assert (got["cli"].steps, got["cli"].guidance_scale, got["cli"].img_scale_factor) == (25, 4.0, 1.1)  # the toy's (TOY_RUN)
    assert got["eval"].scorer == f"hf:{toy_metric_dir()}"  # the toy's own metric model, found beside it
    flagged = {
        "app": app_settings(toy, app_parser().parse_args(["--steps", "7", "--seed", "3"])),
        "cli": cli_settings(toy, cli_parser().parse_args(["generate", "x", "--steps", "7", "--seed", "3"])),
        "eval": eval_settings(toy, eval_parser().parse_args(eval_args + ["--steps", "7", "--seed", "3"])),
    }
    assert {(s.steps, s.seed, s.guidance_scale) for s in flagged.values()} == {(7, 3, 4.0)}


def test_the_apps_controls_admit_the_models_settings(toy):
    from app.app import build_demo

    demo = build_demo(toy)
    sliders = {c.label: c for c in demo.blocks.values() if type(c).__name__ == "Slider"}
    d = toy.run_settings()
    for label, value in (("Image frequency (scale factor)", d.img_scale_factor), ("Diffusion steps", d.steps),
                         ("Guidance scale", d.guidance_scale), ("Max tokens", d.max_new_tokens)):
        s = sliders[label]
        assert s.minimum <= value <= s.maximum and s.value == value, (label, s.minimum, s.value, s.maximum)


# ---- index= ----------------------------------------------------------------------------------------------


def test_index_is_honoured_for_every_preset_and_a_missing_one_is_named(tmp_path):
    own = toy_dir() / "index"
    moved = tmp_path / "corpus"
    shutil.copytree(own, moved)
    toy = GILL.from_pretrained("toy", index=moved, load_diffusion=False)
    assert toy.retriever.path == moved
    assert GILL.from_pretrained("toy", load_diffusion=False).retriever.path == own
    with pytest.raises(FileNotFoundError, match="no-such-index"):
        GILL.from_pretrained("toy", index=tmp_path / "no-such-index", load_diffusion=False)
    with pytest.raises(IndexMismatchError):  # tiny-random reads the directory it is given, and refuses it
        GILL.from_pretrained("tiny-random", index=moved, load_diffusion=False)
    with pytest.raises(FileNotFoundError, match="no-such-index"):
        GILL.from_pretrained("tiny-random", index=tmp_path / "no-such-index", load_diffusion=False)
    # gill-opt-6.7b: see test_the_released_gill_loads_by_name_from_a_hub_cache


# ---- save_pretrained / push_to_hub ------------------------------------------------------------------------


def test_save_pretrained_round_trips_everything(toy, tmp_path):
    toy.settings = RunSettings(**{**toy.settings.to_dict(), "seed": 5})
    try:
        toy.save_pretrained(tmp_path / "m")
    finally:
        toy.settings = RunSettings(**{**toy.settings.to_dict(), "seed": None})
    back = GILL.from_pretrained(tmp_path / "m", load_diffusion=False)
    assert back.settings.seed == 5 and back.settings.guidance_scale == 4.0 and back.settings.scorer == toy.settings.scorer
    for key, value in toy.model.adapter.state_dict().items():
        assert torch.equal(back.model.adapter.state_dict()[key], value), key
    assert torch.equal(back.decision.linear.weight, toy.decision.linear.weight)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "training data | the toy world" in card and "guidance_scale | `4.0`" in card and "library_name: gill" in card

    # copy_backbones: a directory that moves as one (backbones and corpus inside, relative paths)
    toy.save_pretrained(tmp_path / "whole", copy_backbones=True)
    (tmp_path / "whole").rename(tmp_path / "moved")
    cfg = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert cfg["lm"] == "lm" and (tmp_path / "moved" / "index" / "manifest.json").is_file()
    moved = GILL.from_pretrained(tmp_path / "moved", load_diffusion=False)
    assert moved.retriever.path == tmp_path / "moved" / "index"
    caption = ["a small blue triangle on the right on gray."]
    a = toy.image_slot_embeddings([caption]).retrieval
    assert torch.equal(moved.image_slot_embeddings([caption]).retrieval, a)


def test_push_to_hub_uploads_a_model_directory_that_loads_back_by_repo_id(toy, tmp_path):
    cache = tmp_path / "hub"

    class FakeApi:  # stands in for huggingface_hub.HfApi (no network here): "uploads" into a Hub cache
        calls = []

        def create_repo(self, repo_id, private, exist_ok):
            self.calls.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, commit_message):
            files = folder_files(Path(folder_path))
            self.calls.append(("upload", repo_id, sorted(files)))
            put_in_hub_cache(cache, repo_id, files, blobs=True)
            return "https://hub.example/commit/1"

    api = FakeApi()
    assert toy.push_to_hub("me/toy-gill", private=True, api=api) == "https://hub.example/commit/1"
    (_, repo, private), (_, _, files) = api.calls
    assert repo == "me/toy-gill" and private
    assert {"config.json", "gill.safetensors", "decision.safetensors", "README.md", "lm/config.json"} <= set(files)
    back = GILL.from_pretrained("me/toy-gill", cache_dir=cache, local_files_only=True, load_diffusion=False)
    assert back.settings.guidance_scale == 4.0 and len(back.retriever) == len(toy.retriever)
    caption = ["a large green square in the middle on white."]
    assert torch.equal(back.image_slot_embeddings([caption]).retrieval, toy.image_slot_embeddings([caption]).retrieval)


# ---- the converter ------------------------------------------------------------------------------------


def test_converter_resolves_relative_backbones_against_the_model_args_folder(tmp_path, tiny_opt, monkeypatch):
    from test_checkpoint import write_original_release

    from gill.checkpoint import convert_original, read_model_dir

    backbones, config = tiny_opt
    release = tmp_path / "release"
    release.mkdir()
    write_original_release(release, backbones, config)
    backbones.lm.save_pretrained(release / "opt")
    backbones.tokenizer.save_pretrained(release / "opt")
    backbones.vision.save_pretrained(release / "clip")
    args = json.loads((release / "model_args.json").read_text())
    (release / "model_args.json").write_text(json.dumps({**args, "opt_version": "opt", "visual_encoder": "clip"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to model_args.json, not to the working directory
    out = convert_original(release / "model_args.json", release / "pretrained_ckpt.pth.tar", tmp_path / "converted")
    cfg = read_model_dir(out).config
    assert (cfg.lm, cfg.vision) == (str((release / "opt").resolve()), str((release / "clip").resolve()))
    gill = GILL.from_pretrained(out, load_diffusion=False)
    assert gill.model.lm.config.hidden_size == config.lm_hidden_size


# ---- the released GILL by name, from a Hub cache ------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], *, blobs: bool) -> None:
    """``files`` laid out as huggingface_hub's cache holds a repo at ``main``: snapshots/<commit>/..., with
    the file bodies in blobs/ (symlinked, as on Linux) or in the snapshot itself (as without symlinks)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        dst = snap / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if blobs:
            blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, blob)
            dst.symlink_to(os.path.relpath(blob, dst.parent))
        else:
            shutil.copyfile(src, dst)


def folder_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds tiny stand-ins for jykoh/gill (original-format files),
    facebook/opt-6.7b and openai/clip-vit-large-patch14 (OPT's id layout: 50265 tokens, 50272 LM rows)."""
    from gill.tokens import add_image_tokens

    work = tmp_path_factory.mktemp("hub")
    home = work / "hf-home"
    tokenizer = build_tokenizer(50265)
    tokenizer.save_pretrained(work / "opt")
    lm = tiny_opt(50272, hidden_size=32, seed=3)
    lm.save_pretrained(work / "opt")
    vision = tiny_clip_vision(hidden_size=32, image_size=224, patch_size=32, seed=4)
    vision.save_pretrained(work / "clip")
    ids = list(add_image_tokens(build_tokenizer(50265)).ids)
    assert ids == list(range(50266, 50274))

    g = torch.Generator().manual_seed(7)
    state = original_state_dict(lm_dim=32, vision_dim=32, n_visual=4, ret_dim=16, gen_dim=24, gen_len=5,
                                mapper_dim=32, ffn=64, n_enc=2, n_dec=2, generator=g, dtype=torch.bfloat16)
    torch.save({"state_dict": OrderedDict(sorted(state.items()))}, work / "pretrained_ckpt.pth.tar")
    decision = OrderedDict([("1.weight", torch.randn(2, 32, generator=g)), ("1.bias", torch.randn(2, generator=g))])
    torch.save({"state_dict": decision}, work / "decision_model.pth.tar")
    args = {
        "opt_version": "facebook/opt-6.7b", "freeze_lm": True, "visual_encoder": "openai/clip-vit-large-patch14",
        "freeze_vm": True, "n_visual_tokens": 4, "ret_emb_dim": 16, "gen_emb_dim": 24, "text_emb_layers": [-1],
        "text_fc_mode": "gill_mapper", "ret_text_fc_mode": "linear", "num_tokens": 8, "num_clip_tokens": 5,
        "share_ret_gen": True, "norm_image_embed": "none", "retrieval_token_idx": ids, "gen_token_idx": ids,
    }
    (work / "model_args.json").write_text(json.dumps(args, indent=4))
    cache = home / "hub"
    put_in_hub_cache(cache, "jykoh/gill", {n: work / n for n in
                                           ("model_args.json", "pretrained_ckpt.pth.tar", "decision_model.pth.tar")}, blobs=True)
    put_in_hub_cache(cache, "facebook/opt-6.7b", folder_files(work / "opt"), blobs=False)
    put_in_hub_cache(cache, "openai/clip-vit-large-patch14", folder_files(work / "clip"), blobs=False)
    # the original's corpus file: a pickle of URLs and image-side vectors
    with open(work / "cc3m_embeddings_urls.npy", "wb") as f:
        pickle.dump({"paths": ["http://a/1.jpg", "http://a/2.jpg"], "embeddings": [np.ones(16), -np.ones(16)]}, f)
    return {"home": home, "work": work, "state": {k: v.float() for k, v in state.items()},
            "decision": decision, "vision": vision}


LOAD_SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
from safetensors.torch import save_file
from gill import GILL
gill = GILL.from_pretrained("{name}", load_diffusion=False, index={index!r})
text = gill.tokenizer(["a red circle" + gill.img_tokens.text], return_tensors="pt")
pixels = torch.linspace(-1, 1, 3 * 224 * 224).view(1, 3, 224, 224)
with torch.no_grad():
    h = gill.model.img_token_forward(text.input_ids, text.attention_mask).img_hidden
    out = dict(hidden=h, ret=gill.model.text_retrieval_embeddings(h), gen=gill.model.generation_embeddings(h),
               image_ret=gill.model.encode_images(pixels).retrieval, pixels=pixels,
               img_rows=gill.model.embed_tokens(torch.tensor([gill.img_tokens.ids]))[0],
               decision=gill.decision(gill.model.decision_features(h)),
               scale=gill.model.adapter.logit_scale.detach().reshape(1))
save_file({{k: v.contiguous() for k, v in out.items()}}, sys.argv[1])
print("INDEX", len(gill.retriever) if gill.retriever is not None else 0, gill.model_dir)
"""


def run_loader(home: Path, out: Path, name: str = "gill-opt-6.7b", index: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", LOAD_SCRIPT.format(name=name, index=index), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_released_gill_loads_by_name_from_a_hub_cache(hub_home, tmp_path):
    home, state = hub_home["home"], hub_home["state"]
    first = run_loader(home, tmp_path / "a.safetensors")
    assert first.returncode == 0, first.stderr
    assert "converting the original GILL release" in first.stderr
    converted = Path(first.stdout.split()[-1])
    assert converted.parent == home / "gill" / "converted"
    stamp = (converted / "gill.safetensors").stat().st_mtime_ns
    provenance = json.loads((converted / "converted_from.json").read_text())
    assert provenance["commit"] == COMMIT and provenance["repo_id"] == "jykoh/gill"

    # a second load, in another process, by the repo id: no conversion, the same directory
    second = run_loader(home, tmp_path / "b.safetensors", name="jykoh/gill",
                        index=str(hub_home["work"] / "cc3m_embeddings_urls.npy"))
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stderr and Path(second.stdout.split()[-1]) == converted
    assert (converted / "gill.safetensors").stat().st_mtime_ns == stamp
    assert "INDEX 2 " in second.stdout  # index= takes the original's embeddings file

    # the embeddings equal values computed from the original tensors by hand
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    h = a["hidden"]
    W = lambda n: state[f"model.{n}.weight"]  # noqa: E731
    B = lambda n: state[f"model.{n}.bias"]  # noqa: E731
    torch.testing.assert_close(a["ret"], h[:, 0] @ W("ret_text_hidden_fcs.0.model").T + B("ret_text_hidden_fcs.0.model"))
    torch.testing.assert_close(a["gen"], original_mapper(state, h, state["model.input_embeddings.weight"]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        pooled = hub_home["vision"](pixel_values=a["pixels"]).pooler_output
    torch.testing.assert_close(a["image_ret"], pooled @ W("visual_fc").T + B("visual_fc"))
    assert torch.equal(a["img_rows"], state["model.input_embeddings.weight"])
    assert a["scale"].item() == state["model.logit_scale"].item()
    d = hub_home["decision"]
    torch.testing.assert_close(a["decision"], h[:, 0] @ d["1.weight"].T + d["1.bias"])


def test_missing_release_files_are_named_with_what_to_set(hub_home, tmp_path):
    from gill.loading import ModelNotFoundError

    cache = tmp_path / "hub"
    with pytest.raises(ModelNotFoundError, match=r"model_args.json of the original GILL release .*jykoh/gill.*HF_HOME"):
        GILL.from_pretrained("gill-opt-6.7b", cache_dir=cache, local_files_only=True)
    work = hub_home["work"]
    put_in_hub_cache(cache, "jykoh/gill", {"model_args.json": work / "model_args.json"}, blobs=False)
    with pytest.raises(ModelNotFoundError, match=r"cannot get pretrained_ckpt.pth.tar .*\(revision main\)"):
        GILL.from_pretrained("gill-opt-6.7b", cache_dir=cache, local_files_only=True)


# ---- imports -----------------------------------------------------------------------------------------


# DESIGN.md's order inside gill/: a module imports only modules of its own layer or below.
LAYERS = [
    {"gill._io", "gill._quiet", "gill.io", "gill.quiet", "gill.chat", "gill.images", "gill.arguments", "gill.settings", "gill.presets", "gill.layers", "gill.losses", "gill.sampling", "gill.synthetic"},
    {"gill.config"},
    {"gill.tokens", "gill.decision"},
    {"gill.model"},
    {"gill.generate", "gill.opt_static", "gill.retrieval", "gill.index_format", "gill.index_trust",
     "gill.original_embeddings", "gill.diffusion", "gill.run"},
    {"gill.checkpoint", "gill.backbones"},
    {"gill.loading"},
    {"gill.pipeline", "gill.prompts", "gill.slots", "gill.saving", "gill.segments"},
    {"gill", "gill.demo", "gill.__main__", "gill.eval", "gill.eval.__main__", "gill.eval.data", "gill.eval.metrics",
     "gill.eval.report", "gill.eval.runner", "gill.eval.scorer", "gill.eval.protocol", "gill.eval.seeds",
     "gill.eval.shard", "gill.eval.retrieval"},
]


def gill_imports() -> dict[str, set[str]]:
    """Module -> the gill modules it imports anywhere (module level and inside functions)."""
    files = {}
    for p in (ROOT / "gill").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = p
    graph = {}
    for name, p in files.items():
        package = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "gill"}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                if module.split(".")[0] == "gill":
                    out |= {f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names}
        graph[name] = out - {name}
    return graph


def test_no_import_cycle_and_no_import_up_the_layers():
    graph = gill_imports()
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    assert set(graph) <= set(layer), f"modules missing from LAYERS: {sorted(set(graph) - set(layer))}"
    upward = [(a, b) for a, targets in graph.items() for b in targets if layer[b] > layer[a]]
    assert not upward, f"imports pointing up the layers: {upward}"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path + [m, t])}"
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert "gill.pipeline" not in graph["gill.loading"] and "gill.presets" in graph["gill.loading"]


@pytest.mark.parametrize("field", ["lm", "diffusion"])
def test_a_backbone_path_that_does_not_exist_is_named_with_its_field(tmp_path, field):
    """Not the Hub client's "Repo id must be in the form ..." for what is plainly a local path."""
    from gill.loading import ModelNotFoundError, load

    model = tmp_path / "model"
    shutil.copytree(toy_dir(), model)
    config = json.loads((model / "config.json").read_text())
    config[field] = str(tmp_path / "gone" / "backbone")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError) as e:
        load(model, load_index=False)
    message = str(e.value)
    assert str(model / "config.json") in message and f"field {field} is" in message and "does not exist" in message
    assert "Repo id" not in message
