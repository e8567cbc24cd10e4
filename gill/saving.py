"""Part of ``GILL``: writing it as a model directory that ``GILL.from_pretrained`` loads back, and
uploading one to the Hugging Face Hub."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from gill.model import GILLModel
from gill.settings import RunSettings


class Saving:
    """``GILL``'s saving (a part of the class: ``GILL`` sets these attributes)."""

    model: GILLModel
    settings: RunSettings
    model_dir: Path | None
    decision: Any

    def save_pretrained(self, out_dir: str | os.PathLike, *, copy_backbones: bool = False,
                        training_data: str | None = None) -> Path:
        """Write a model directory that ``GILL.from_pretrained`` loads back: config (with run settings),
        trained weights, decision head, model card (README.md). Backbones given as paths relative to the
        directory this model came from are written as absolute paths, or, with ``copy_backbones``, copied
        in (with the model's own corpus ``index/``) so the directory moves as one."""
        from gill.checkpoint import save_model_dir

        out = Path(out_dir)
        config = copy.deepcopy(self.model.config)
        config.run = self.settings
        if training_data is not None:
            config.training_data = training_data
        source = self.model_dir
        for name in ("lm", "vision", "tokenizer", "diffusion"):
            value = getattr(config, name)
            if not value or os.path.isabs(value) or source is None or not (source / value).exists():
                continue
            if copy_backbones and (source / value).resolve() != (out / value).resolve():
                if not (out / value).exists():
                    shutil.copytree(source / value, out / value)
            elif not copy_backbones:
                setattr(config, name, str((source / value).resolve()))
        if copy_backbones and source is not None and (source / "index" / "manifest.json").is_file():
            if (source / "index").resolve() != (out / "index").resolve() and not (out / "index").exists():
                shutil.copytree(source / "index", out / "index", ignore=shutil.ignore_patterns("work"))
        decision = self.decision.state_dict() if self.decision is not None else None
        return save_model_dir(out, config, self.model.adapter.state_dict(), decision)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                    commit_message: str = "Upload GILL model", api: Any = None) -> str:
        """Upload this model as a model directory (backbones that are local folders copied in) to a Hub
        repo of yours, created if needed. Returns the commit URL. ``api``: a ``huggingface_hub.HfApi``."""
        import tempfile

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="gill-push-") as tmp:
            self.save_pretrained(tmp, copy_backbones=True)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))
