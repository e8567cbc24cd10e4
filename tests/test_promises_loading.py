"""Loading promises with no test before: ``revision=`` and ``token=`` reach the Hub and the backbones'
loaders, a version-1 model directory is written back as version 2, and the CLI's ``--verbose``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gill import GILL
from gill.checkpoint import load_safetensors
from gill.config import FORMAT_VERSION
from gill.settings import RunSettings

from synthetic import save_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def spy_backbone_loaders(monkeypatch) -> list[tuple[str, dict]]:
    """(loader, keyword arguments) of each transformers from_pretrained call the backbones make."""
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.CLIPVisionModel):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_revision_and_token_reach_the_hub_download_and_the_backbones(tmp_path, tiny_opt, monkeypatch):
    """``GILL.from_pretrained("owner/repo", revision=..., token=...)``: the Hub download gets both, and each
    backbone's from_pretrained gets the token (backbones keep their own default revision)."""
    import huggingface_hub

    model_dir = save_tiny_model_dir(tmp_path, tiny_opt)
    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaders = spy_backbone_loaders(monkeypatch)
    g = GILL.from_pretrained("someone/their-gill", revision="v1.2", token="hf_test_token", load_diffusion=False)
    assert g.model_dir == model_dir
    assert [(r, k["revision"], k["token"]) for r, k in downloads] == [("someone/their-gill", "v1.2", "hf_test_token")]
    assert sorted(name for name, _ in loaders) == ["AutoModelForCausalLM", "AutoTokenizer", "CLIPVisionModel"]
    assert all(k.get("token") == "hf_test_token" and "revision" not in k for _, k in loaders), loaders
    # without them, the Hub's defaults (None) and no token passed on
    downloads.clear(), loaders.clear()
    GILL.from_pretrained("someone/their-gill", load_diffusion=False)
    assert [(k["revision"], k["token"]) for _, k in downloads] == [(None, None)]
    assert all("token" not in k for _, k in loaders), loaders


def test_revision_and_token_reach_every_file_of_the_original_release(tmp_path, monkeypatch):
    """``gill-opt-6.7b`` with revision= and token=: each release file is asked for at that revision with that
    token, and a failure names the revision asked for."""
    import huggingface_hub

    from gill.loading import ModelNotFoundError
    from gill.presets import PRESETS

    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename, kwargs["revision"], kwargs["token"]))
        raise OSError("not here")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(ModelNotFoundError, match=r"\(revision 0123abc\)"):
        GILL.from_pretrained("gill-opt-6.7b", revision="0123abc", token="hf_test_token", cache_dir=tmp_path)
    preset = PRESETS["gill-opt-6.7b"]
    assert asked == [(preset.repo_id, preset.files[0], "0123abc", "hf_test_token")]  # the first file failed


def test_a_version_1_model_directory_is_written_back_in_the_current_version(tmp_path, tiny_opt):
    """A directory written before run settings existed (format_version 1, no ``run`` block, no
    ``training_data``) loads with the library's defaults and is saved in the current version (2 or later) with a ``run`` block,
    its weights unchanged; the saved one loads back the same."""
    model_dir = save_tiny_model_dir(tmp_path, tiny_opt)
    config = json.loads((model_dir / "config.json").read_text())
    del config["run"], config["training_data"]
    config["format_version"] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
    old = GILL.from_pretrained(model_dir, load_diffusion=False)
    assert old.settings == RunSettings()
    out = old.save_pretrained(tmp_path / "v2")
    written = json.loads((out / "config.json").read_text())
    assert written["format_version"] == FORMAT_VERSION >= 2
    assert written["run"] == RunSettings().to_dict() and written["training_data"] == ""
    assert {k: written[k] for k in config if k != "format_version"} == {k: v for k, v in config.items() if k != "format_version"}
    before, after = load_safetensors(model_dir / "gill.safetensors"), load_safetensors(out / "gill.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = GILL.from_pretrained(out, load_diffusion=False)
    assert again.settings == RunSettings() and again.model.config == replace(old.model.config, format_version=FORMAT_VERSION)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gill", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow  # end to end through subprocesses (the quiet settings are process-wide): in the slow step
def test_cli_verbose_shows_the_libraries_messages_and_answers_the_same(tmp_path):
    """``python -m gill --verbose generate ...`` prints the libraries' loading bars and warnings, which the
    default hides (its stderr is empty), and answers exactly what the default answers."""
    args = ["generate", "--model", "toy", "a red circle", "--max-new-tokens", "4", "--out", str(tmp_path)]
    quiet, verbose = cli(*args), cli("--verbose", *args)
    assert quiet.returncode == verbose.returncode == 0, (quiet.stderr, verbose.stderr)
    assert quiet.stderr == "", quiet.stderr
    assert "Loading weights" in verbose.stderr  # transformers' progress bar
    assert verbose.stdout == quiet.stdout and quiet.stdout.strip(), (quiet.stdout, verbose.stdout)
