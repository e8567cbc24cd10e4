"""The one place a preset name, a model directory or a Hub repo id becomes typed parts.

    parts = load("toy")                      # a preset shipped in the package
    parts = load("gill-opt-6.7b")            # the original release: fetched from the Hub, converted once
    parts = load("runs/gill/best")           # a model directory
    parts = load("me/my-gill")               # a Hub repo holding a model directory

``load`` returns a ``ModelParts`` (model, decision head, tokenizer, image processor, [IMG] tokens,
diffusion pipeline, retrieval index, run settings) and never builds the pipeline: ``GILL.from_pretrained``
does that from the parts. ``load_image_embedder`` (index building), ``load_sd_text_encoder`` (the
mapper's targets) and ``load_for_training`` read the same names. Everything lands on the CPU in the
stored dtype unless the caller passes ``torch_dtype``; moving to a device is the caller's choice.

The original release (``gill-opt-6.7b``, repo ``jykoh/gill``): its ``model_args.json``,
``pretrained_ckpt.pth.tar`` and ``decision_model.pth.tar`` are fetched with ``huggingface_hub`` (which
honours ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``; ``revision``, ``cache_dir``,
``local_files_only`` and ``token`` are passed through, as transformers does) and converted once into
``<HF_HOME>/gill/converted/<key>`` (or ``<cache_dir>/gill-converted/<key>``), keyed by the files' content
hashes and written atomically; later loads reuse it. The backbones load by their Hub ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gill.backbones import image_processor, load_backbones, load_vision, tiny_backbones
from gill.backbones import load_diffusion as load_diffusion_pipeline
from gill.checkpoint import CheckpointError, convert_original, model_from_files, read_model_dir, resolve_paths
from gill.config import ConfigError, GILLConfig
from gill.decision import DecisionHead
from gill.model import GILLModel
from gill.presets import PRESETS, Preset, find_preset
from gill.retrieval import (
    EmbeddingIndex, ImageEmbedder, ImageRecord, file_sha256, open_index, projection_fingerprint,
    read_original_embeddings,
)
from gill.settings import RunSettings, context_limit, resolve_scorer_path
from gill.tokens import ImageTokens, add_image_tokens

LOG = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # part of the converted directory's key: bump when conversion output changes
RELEASE_TRAINING_DATA = "CC3M (Conceptual Captions, 3.3M image-caption pairs), as in the GILL paper"


class ModelNotFoundError(FileNotFoundError):
    """A name that is no preset, model directory or reachable Hub repo, or release files that cannot be had."""


@dataclass
class HubOptions:
    """Passed to ``huggingface_hub`` and transformers/diffusers ``from_pretrained`` (None: their defaults)."""

    revision: str | None = None  # of the GILL repo itself (backbones keep their own default revision)
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    token: str | bool | None = None

    def backbone_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.cache_dir is not None:
            out["cache_dir"] = str(self.cache_dir)
        if self.local_files_only:
            out["local_files_only"] = True
        if self.token is not None:
            out["token"] = self.token
        return out


@dataclass
class ModelParts:
    """A loaded model, in pieces."""

    name: str
    model: GILLModel
    tokenizer: Any
    image_processor: Any
    img_tokens: ImageTokens
    decision: DecisionHead | None = None
    diffusion: Any | None = None  # a diffusers pipeline
    index: Any | None = None  # an EmbeddingIndex or FaissIndex
    index_dir: Path | None = None
    settings: RunSettings = field(default_factory=RunSettings)  # the model's own; unset fields: library defaults
    model_dir: Path | None = None  # where it was read from (None for models built in memory)


# ---- names -> model directories -----------------------------------------------------------------------


def expand_home(path: str | os.PathLike, what: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; ``ModelNotFoundError`` naming ``what`` and the
    path when that user has no home directory (pathlib says only "Could not determine home directory")."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise ModelNotFoundError(f"{what} {str(path)!r}: cannot expand {user!r}: no such user or home "
                                 "directory") from None


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and " " not in name


def resolve_model_dir(name_or_dir: str | os.PathLike, hub: HubOptions | None = None) -> Path | None:
    """The model directory a name stands for (fetched and converted where needed); None for models
    built in memory (``tiny-random``). Raises ``ModelNotFoundError`` naming what is missing."""
    hub = hub or HubOptions()
    name = str(name_or_dir)
    preset = find_preset(name)
    if preset is not None and preset.kind == "package":
        if not (preset.path / "config.json").is_file():
            raise ModelNotFoundError(f"the {preset.name} model is missing from {preset.path}; rebuild it with "
                                     "python -m training.toy --out toy-build --install")
        return preset.path
    if preset is not None and preset.kind == "random":
        return None
    if preset is not None and preset.kind == "release":
        return fetch_release(preset, hub)
    path = expand_home(name, "model")
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{name}: not a model directory (a model directory holds config.json and gill.safetensors)")
    if _looks_like_repo_id(name) and not path.parent.is_dir():  # "runs/bestt" is a typo, not a repo
        return _fetch_repo(name, hub)
    raise ModelNotFoundError(f"{name!r} is neither a model directory, a preset ({', '.join(PRESETS)}) nor a Hub repo id")


def _hub_error(what: str, repo: str, revision: str | None, error: Exception, hint: str) -> ModelNotFoundError:
    from huggingface_hub import constants

    offline = " (offline: HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    return ModelNotFoundError(
        f"cannot get {what} from the Hugging Face Hub repo {repo} (revision {revision or 'main'}){offline}: {reason}. "
        f"{hint}"
    )


def _fetch_repo(repo_id: str, hub: HubOptions) -> Path:
    """A Hub repo holding a model directory (as ``GILL.push_to_hub`` writes), downloaded or from the cache."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=hub.revision, cache_dir=hub.cache_dir,
                                      local_files_only=hub.local_files_only, token=hub.token))
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, validation)
        raise _hub_error("the model", repo_id, hub.revision, e,
                         "Check the repo id, connect once (or unset HF_HUB_OFFLINE), or set HF_HOME / cache_dir "
                         "to a cache that holds it.") from None
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"Hub repo {repo_id} holds no config.json: it is not a GILL model directory")
    return path


def _content_key(path: Path) -> str:
    """A content hash of a file: the Hub cache's blob name where the file is one (sha256 for LFS files,
    the git blob hash otherwise), else the file's sha256."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs":
        return real.name
    return file_sha256(real)


def _converted_root(hub: HubOptions) -> Path:
    from huggingface_hub import constants

    if hub.cache_dir is not None:
        return Path(hub.cache_dir) / "gill-converted"
    return Path(constants.HF_HOME) / "gill" / "converted"


def fetch_release(preset: Preset | None = None, hub: HubOptions | None = None) -> Path:
    """The original release as a model directory: its files fetched with ``huggingface_hub`` (or found in
    the cache), converted once, keyed by their content hashes."""
    from huggingface_hub import hf_hub_download

    preset = preset or PRESETS["gill-opt-6.7b"]
    hub = hub or HubOptions()
    revision = hub.revision or preset.revision
    files: dict[str, Path] = {}
    for name in preset.files:
        try:
            files[name] = Path(hf_hub_download(preset.repo_id, name, revision=revision, cache_dir=hub.cache_dir,
                                               local_files_only=hub.local_files_only, token=hub.token))
        except Exception as e:  # noqa: BLE001 - reported with the file and what to do
            raise _hub_error(
                f"{name} of the original GILL release", preset.repo_id, revision, e,
                "Connect to the Hub once (or unset HF_HUB_OFFLINE / local_files_only), or point HF_HOME or "
                f"cache_dir= at a cache that holds it; or download {', '.join(preset.files)} yourself and run "
                "python -m gill convert --model-args model_args.json --checkpoint pretrained_ckpt.pth.tar "
                "--decision decision_model.pth.tar --out DIR, then load DIR.",
            ) from None
    hashes = {name: _content_key(p) for name, p in files.items()}
    key = hashlib.sha256(json.dumps([CONVERTER_VERSION, sorted(hashes.items())]).encode()).hexdigest()[:24]
    out = _converted_root(hub) / key
    if (out / "config.json").is_file():
        return out
    LOG.info("converting the original GILL release (%s) once into %s", preset.repo_id, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        convert_original(files["model_args.json"], files["pretrained_ckpt.pth.tar"], tmp,
                         decision=files.get("decision_model.pth.tar"), training_data=RELEASE_TRAINING_DATA)
        snapshot = files["model_args.json"].parent
        provenance = {"repo_id": preset.repo_id, "revision": revision,
                      "commit": snapshot.name if snapshot.parent.name == "snapshots" else None,
                      "files": hashes, "converter_version": CONVERTER_VERSION}
        (tmp / "converted_from.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- parts ---------------------------------------------------------------------------------------------


def load(
    name_or_dir: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    index: Any = None,
    load_diffusion: bool = True,
    load_index: bool = True,
    allow_index_mismatch: bool = False,
    hub: HubOptions | None = None,
    diffusion_dtype: torch.dtype | None = None,
) -> ModelParts:
    """A preset name, model directory or Hub repo id -> ``ModelParts``.

    ``torch_dtype``: the backbones' dtype (default: as stored); ``diffusion_dtype``: the diffusion
    pipeline's where it differs (default: ``torch_dtype``), e.g. the original's bf16 LM and fp16 Stable
    Diffusion.

    ``index``: an index directory (refused if built with another image-retrieval projection, unless
    ``allow_index_mismatch``), the original release's ``cc3m_embeddings_urls.npy``, or an index object;
    None uses the model's own corpus (a model directory's ``index/``) where it has one.
    """
    hub = hub or HubOptions()
    name = str(name_or_dir)
    model_dir = resolve_model_dir(name, hub)
    if model_dir is None:
        parts = _tiny_random(load_diffusion)
    else:
        parts = _from_model_dir(name, model_dir, torch_dtype=torch_dtype, load_diffusion=load_diffusion, hub=hub,
                                diffusion_dtype=diffusion_dtype or torch_dtype)
    if load_index:
        _attach_index(parts, index, allow_index_mismatch)
    return parts


def _from_model_dir(name: str, path: Path, *, torch_dtype: torch.dtype | None, load_diffusion: bool,
                    hub: HubOptions, diffusion_dtype: torch.dtype | None = None) -> ModelParts:
    files = read_model_dir(path)
    config = resolve_paths(files.config, path)
    check_backbone_paths(config, path / "config.json", load_diffusion)
    with _naming_backbone(path / "config.json", "lm, vision or tokenizer", f"{config.lm}, {config.vision}"):
        backbones = load_backbones(config, torch_dtype=torch_dtype, hub=hub.backbone_kwargs())
    model, decision = model_from_files(files, backbones.lm, backbones.vision)
    try:  # the context the model was trained on, against what its LM reads
        context_limit(files.config.run, getattr(backbones.lm.config, "max_position_embeddings", None),
                      f"{path / 'config.json'}.run")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pipe = None
    if load_diffusion and config.diffusion:
        with _naming_backbone(path / "config.json", "diffusion", config.diffusion):
            pipe = load_diffusion_pipeline(config.diffusion, torch_dtype=diffusion_dtype, **hub.backbone_kwargs())
        pipe.set_progress_bar_config(disable=True)
    return ModelParts(name, model, backbones.tokenizer, backbones.image_processor, backbones.img_tokens, decision,
                      pipe, settings=resolve_scorer_path(files.config.run, path), model_dir=path)


def _looks_like_path(value: str) -> bool:
    """A value that can only be a local path (a Hub id is ``name`` or ``namespace/name``)."""
    return os.path.isabs(value) or value.startswith(("./", "../", "~", ".\\")) or value.count("/") > 1


def check_backbone_paths(config: Any, source: Path, with_diffusion: bool = True) -> None:
    """Refuse, naming the file and field, a backbone given as a local path that does not exist (before any
    loader mistakes it for a Hub id: "Repo id must be in the form ...")."""
    for name in ("lm", "vision", "tokenizer") + (("diffusion",) if with_diffusion else ()):
        value = getattr(config, name)
        if value and _looks_like_path(value) and not expand_home(value, f"{source}: field {name}").exists():
            raise ModelNotFoundError(f"{source}: field {name} is {value!r}, a path that does not exist; give an "
                                     "existing folder (absolute, or relative to the model directory) or a Hub repo id")


@contextlib.contextmanager
def _naming_backbone(source: Path, field: str, value: str):
    """Backbone loading errors (Hub, network, missing files) said with the config field that named them."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, (ModelNotFoundError, CheckpointError)):
            raise
        raise ModelNotFoundError(f"{source}: cannot load the backbone {value!r} named by field {field}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _tiny_random(with_diffusion: bool, seed: int = 0) -> ModelParts:

    from gill.backbones import tiny_stable_diffusion

    backbones, config = tiny_backbones(seed=seed)
    torch.manual_seed(seed)
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    decision = DecisionHead.from_config(config).eval()
    pipe = None
    if with_diffusion:
        pipe = tiny_stable_diffusion(config.gen_emb_dim, config.gen_seq_len, image_size=32, seed=seed)
        pipe.set_progress_bar_config(disable=True)
    return ModelParts("tiny-random", model, backbones.tokenizer, backbones.image_processor, backbones.img_tokens,
                      decision, pipe)


def _tiny_corpus(parts: ModelParts) -> EmbeddingIndex:
    """tiny-random's corpus: four solid-colour squares, embedded by its own model."""
    from PIL import Image

    from gill.synthetic import COLORS, TINY_COLORS

    colors = {name: COLORS[name] for name in TINY_COLORS}
    images = {name: Image.new("RGB", (32, 32), rgb) for name, rgb in colors.items()}
    records = [ImageRecord(i, f"tiny-random://{name}", f"a {name} square", sha256=f"tiny-{name}")
               for i, name in enumerate(colors)]
    pixels = parts.image_processor(images=list(images.values()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings = parts.model.encode_images(pixels).retrieval
    return EmbeddingIndex(embeddings, records, image_loader=lambda r: images[r.source.split("://")[1]])


def _attach_index(parts: ModelParts, index: Any, allow_mismatch: bool) -> None:
    if index is not None and not isinstance(index, (str, os.PathLike)):
        parts.index = index  # an index object, used as given
        return
    path = expand_home(index, "index") if index is not None else None
    if path is None:
        own = parts.model_dir / "index" if parts.model_dir is not None else None
        if own is not None and (own / "manifest.json").is_file():
            path = own  # a model directory that carries its own corpus
        elif parts.model_dir is None:
            parts.index = _tiny_corpus(parts)
            return
        else:
            return
    elif not path.exists():
        raise FileNotFoundError(f"index {path}: no such index directory or embeddings file")
    if path.is_file():
        parts.index = original_embeddings_index(path)
        parts.index_dir = None
        return
    fingerprint = projection_fingerprint(parts.model.adapter.image_retrieval)
    parts.index = open_index(path, fingerprint, allow_mismatch=allow_mismatch)
    parts.index_dir = path


def original_embeddings_index(path: str | os.PathLike) -> EmbeddingIndex:
    """The original release's ``cc3m_embeddings_urls.npy`` as an in-memory index (URLs as sources; their
    images are not fetched). Reading the 3 GB pickle takes a while: ``python -m index.import_original``
    turns it into an index directory once."""
    urls, vectors = read_original_embeddings(path)
    records = [ImageRecord(i, url, sha256=f"url:{url}") for i, url in enumerate(urls)]
    return EmbeddingIndex(torch.from_numpy(vectors), records)


# ---- parts for other jobs -----------------------------------------------------------------------------


def load_image_embedder(name_or_dir: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        hub: HubOptions | None = None) -> ImageEmbedder:
    """The image side of a model (vision encoder + retrieval projection) for index building: a model
    directory's vision encoder only, without its LM."""
    hub = hub or HubOptions()
    path = resolve_model_dir(name_or_dir, hub)
    if path is None:
        parts = load(name_or_dir, torch_dtype=torch_dtype, load_diffusion=False, load_index=False, hub=hub)
        return ImageEmbedder(parts.model.vision, parts.model.adapter.image_retrieval, parts.image_processor,
                             str(name_or_dir))
    files = read_model_dir(path)
    cfg = files.config
    projection = torch.nn.Linear(cfg.vision_hidden_size, cfg.ret_emb_dim)
    projection.load_state_dict({k.split(".", 1)[1]: v for k, v in files.adapter.items() if k.startswith("image_retrieval.")})
    vision = load_vision(resolve_paths(cfg, path).vision, torch_dtype, **hub.backbone_kwargs())
    return ImageEmbedder(vision, projection, image_processor(cfg.preprocess), str(name_or_dir))


def load_sd_text_encoder(spec: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                         hub: HubOptions | None = None) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, text encoder) of a diffusion model: ``tiny-random``'s, a Stable Diffusion repo id or
    folder, or the one a GILL model (preset or model directory) generates with."""
    from gill.backbones import load_sd_text_encoder as load_encoder, tiny_stable_diffusion

    hub = hub or HubOptions()
    spec = str(spec)
    if spec == "tiny-random":
        _, config = tiny_backbones()
        pipe = tiny_stable_diffusion(config.gen_emb_dim, config.gen_seq_len)
        return pipe.tokenizer, pipe.text_encoder.eval()
    path = Path(spec)
    is_gill_dir = path.is_dir() and (path / "config.json").is_file() and (path / "gill.safetensors").is_file()
    preset = find_preset(spec)
    if is_gill_dir or (preset is not None and preset.kind == "package"):
        gill_dir = resolve_model_dir(spec, hub)
        config = resolve_paths(read_model_dir(gill_dir).config, gill_dir)
        if not config.diffusion:
            raise ValueError(f"{spec}: the model names no diffusion pipeline (config.json: diffusion)")
        spec = config.diffusion
    elif preset is not None and preset.kind == "release":
        spec = GILLConfig().diffusion
    return load_encoder(spec, torch_dtype, **hub.backbone_kwargs())


FRESH_PRESETS = ("gill-opt-6.7b", "tiny-random")


def load_for_training(spec: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                      hub: HubOptions | None = None) -> ModelParts:
    """What ``training.train --model`` names: ``gill-opt-6.7b`` or ``tiny-random`` (fresh trained layers on
    that architecture's backbones), a GILLConfig JSON naming other backbones (fresh), or a model
    directory / package preset / Hub repo (continue from its trained weights)."""
    hub = hub or HubOptions()
    spec = str(spec)
    if spec == "tiny-random":
        b, config = tiny_backbones()
        b.lm.to(torch_dtype)
        b.vision.to(torch_dtype)
        return ModelParts(spec, GILLModel(b.lm, b.vision, config), b.tokenizer, b.image_processor, b.img_tokens)
    if spec == "gill-opt-6.7b":
        return build_fresh(GILLConfig(), None, torch_dtype=torch_dtype, hub=hub)
    if spec.endswith(".json") and Path(spec).is_file():
        return build_fresh(GILLConfig.from_json(spec), Path(spec).parent, torch_dtype=torch_dtype, hub=hub)
    return load(spec, torch_dtype=torch_dtype, load_diffusion=False, load_index=False, hub=hub)


def build_fresh(config: GILLConfig, base: str | os.PathLike | None, *, torch_dtype: torch.dtype | None = None,
                hub: HubOptions | None = None) -> ModelParts:
    """Freshly initialised trained layers on the backbones a config names (paths relative to ``base``);
    the [IMG] tokens are added to the tokenizer and their ids recorded in the config."""
    from gill.backbones import load_tokenizer

    hub = hub or HubOptions()
    resolved = resolve_paths(config, base) if base is not None else config
    tokenizer = load_tokenizer(resolved.tokenizer_path, **hub.backbone_kwargs())
    config.tokens = add_image_tokens(tokenizer, config.tokens).to_config(config.tokens)
    b = load_backbones(replace(resolved, tokens=config.tokens), torch_dtype=torch_dtype, hub=hub.backbone_kwargs())
    # the model keeps the config as written: relative backbone paths stay relative when it is saved
    return ModelParts(str(base or "fresh"), GILLModel(b.lm, b.vision, config), b.tokenizer,
                      image_processor(config.preprocess), b.img_tokens)
