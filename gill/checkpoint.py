"""Model directories and conversion of the original release's files.

A model directory holds:
- ``config.json``: a ``GILLConfig`` (backbones, widths, token ids, mapper shape, preprocessing);
- ``gill.safetensors``: the ``GILLAdapter`` state dict (trainable weights only);
- ``decision.safetensors`` (optional): the ``DecisionHead`` state dict.

Both our files and the original ``pretrained_ckpt.pth.tar`` / ``decision_model.pth.tar`` load strictly:
every missing, unexpected or mis-shaped key is listed in one error. Torch files are only read with
``torch.load(weights_only=True, map_location="cpu")``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gill.io import atomic_dir, atomic_path, atomic_write_text
from gill.config import GILLConfig, config_from_model_args
from gill.decision import DecisionHead
from gill.model import GILLAdapter, GILLModel

LOG = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "gill.safetensors"
DECISION_NAME = "decision.safetensors"
CARD_NAME = "README.md"

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


# ---- strict key checking ---------------------------------------------------------------------------


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def adapter_shapes(config: GILLConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the adapter a config describes (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return expected_shapes(GILLAdapter(config))


def decision_shapes(config: GILLConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return expected_shapes(DecisionHead.from_config(config))


def check_state_dict(state: StateDict, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key with both shapes."""
    problems = []
    for key in sorted(expected.keys() - state.keys()):
        problems.append(f"  missing:     {key} (model expects {list(expected[key])})")
    for key in sorted(state.keys() - expected.keys()):
        problems.append(f"  unexpected:  {key} (checkpoint has {list(state[key].shape)})")
    for key in sorted(expected.keys() & state.keys()):
        if tuple(state[key].shape) != expected[key]:
            problems.append(
                f"  mis-shaped:  {key}: checkpoint has {list(state[key].shape)}, model expects {list(expected[key])}"
            )
    if problems:
        raise CheckpointError(f"{source} does not match the model ({len(problems)} problem(s)):\n" + "\n".join(problems))


def load_strict(module: torch.nn.Module, state: StateDict, source: str) -> None:
    """Check every key and shape, then copy the values in (cast to the module's dtypes)."""
    check_state_dict(state, expected_shapes(module), source)
    module.load_state_dict(state, strict=True)


# ---- file I/O --------------------------------------------------------------------------------------


def torch_load(path: str | os.PathLike) -> Any:
    """Load a torch pickle safely: tensors and plain containers only, onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; say which file failed and why, in one line
        detail = load_problem(e)
        unsafe = "pickled objects other than tensors and plain containers are refused for safety (loading them " \
                 "can run code): convert the file to safetensors where you trust it; " if "global" in detail else ""
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint: {unsafe}{detail}") from None


def load_problem(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line and without torch's advice to turn
    ``weights_only`` off (the one thing a file from elsewhere must never get)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split(". Please")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines and isinstance(error, EOFError):
        lines = ["the file ends early (empty or truncated)"]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def save_safetensors(state: StateDict, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_safetensors(path: str | os.PathLike) -> StateDict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    size = path.stat().st_size
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError); name the file and the cause
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes: empty, truncated or not "
                              f"safetensors? {e})") from None


@dataclass
class ModelFiles:
    """The contents of a model directory, read but not yet put into modules."""

    config: GILLConfig
    adapter: StateDict
    decision: StateDict | None
    path: Path


def save_model_dir(
    out_dir: str | os.PathLike,
    config: GILLConfig,
    adapter: StateDict,
    decision: StateDict | None = None,
) -> Path:
    """Write a model directory after checking both state dicts against the config.

    A directory that holds only a model's files (or does not exist) is replaced as a whole: readers and an
    interrupted write see the old model or the new one, never a mix, and files of the old one that the new
    one lacks (a decision head) are gone. A directory that holds more (backbones, an index) keeps the rest;
    its model files are then replaced one by one, each atomically, the config last."""
    out_dir = Path(out_dir)
    check_state_dict(adapter, adapter_shapes(config), f"adapter weights for {out_dir}")
    if decision is not None:
        check_state_dict(decision, decision_shapes(config), f"decision weights for {out_dir}")
    if not out_dir.exists() or {p.name for p in out_dir.iterdir()} <= MODEL_FILES:
        with atomic_dir(out_dir) as tmp:
            _write_model_files(tmp, config, adapter, decision)
        return out_dir
    _write_model_files(out_dir, config, adapter, decision)
    return out_dir


MODEL_FILES = {CONFIG_NAME, WEIGHTS_NAME, DECISION_NAME, CARD_NAME}


def _write_model_files(out_dir: Path, config: GILLConfig, adapter: StateDict, decision: StateDict | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(adapter, out_dir / WEIGHTS_NAME)
    if decision is not None:
        save_safetensors(decision, out_dir / DECISION_NAME)
    else:
        (out_dir / DECISION_NAME).unlink(missing_ok=True)  # a directory written again without a head has none
    atomic_write_text(out_dir / CARD_NAME, model_card(config, has_decision=decision is not None))
    config.to_json(out_dir / CONFIG_NAME)


def model_card(config: GILLConfig, has_decision: bool) -> str:
    """The model directory's README.md: backbones, training data and run settings (Hub model-card format)."""
    base = [b for b in (config.lm, config.vision) if b and not os.path.isabs(b) and "/" in b]
    front = ["---", "library_name: gill", "tags:", "- gill", "- image-to-text", "- text-to-image"]
    if base:
        front += ["base_model:"] + [f"- {b}" for b in base]
    front.append("---")
    run = config.run.to_dict(set_only=True)
    lines = [
        *front, "", "# GILL model", "",
        "A [GILL](https://arxiv.org/abs/2305.17216) model: a frozen causal LM and a frozen vision encoder joined "
        f"by trained layers and {config.tokens.num_img_tokens} `[IMG]` tokens. Load it with "
        "`gill.GILL.from_pretrained(\"<this directory or repo>\")`.", "",
        "| part | value |", "|---|---|",
        f"| language model (frozen) | `{config.lm}` |",
        f"| vision encoder (frozen) | `{config.vision}` |",
        f"| image generator | `{config.diffusion or 'none'}` |",
        f"| visual prefix | {config.n_visual_tokens} tokens |",
        f"| retrieval space | {config.ret_emb_dim}-d |",
        f"| decision head | {'yes: ' + ', '.join(config.decision.labels) if has_decision else 'no'} |",
        f"| training data | {config.training_data or 'not recorded'} |",
        "", "## Run settings", "",
        "Used when a caller passes none (explicit argument > these > the library's defaults):", "",
    ]
    if run:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in run.items()]
    else:
        lines.append("none recorded: the library's defaults apply.")
    return "\n".join(lines) + "\n"


def save_model(out_dir: str | os.PathLike, model: GILLModel, decision: DecisionHead | None = None) -> Path:
    return save_model_dir(out_dir, model.config, model.adapter.state_dict(),
                          decision.state_dict() if decision is not None else None)


def resolve_paths(config: GILLConfig, base: str | os.PathLike) -> GILLConfig:
    """Backbone paths given relative to a model directory (e.g. ``"lm"`` for ``DIR/lm``) made absolute,
    so a directory that carries its own backbones can be moved anywhere. Hub ids are left alone."""
    base = Path(base)
    changes = {}
    for name in ("lm", "vision", "tokenizer", "diffusion"):
        value = getattr(config, name)
        if value and not os.path.isabs(value) and (base / value).exists():
            changes[name] = str((base / value).resolve())
    return replace(config, **changes) if changes else config


def read_model_dir(path: str | os.PathLike) -> ModelFiles:
    """Read and strictly check a model directory's config and weights."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory")
    config = GILLConfig.from_json(path / CONFIG_NAME)
    adapter = load_safetensors(path / WEIGHTS_NAME)
    check_state_dict(adapter, adapter_shapes(config), str(path / WEIGHTS_NAME))
    decision = None
    if (path / DECISION_NAME).is_file():
        decision = load_safetensors(path / DECISION_NAME)
        check_state_dict(decision, decision_shapes(config), str(path / DECISION_NAME))
    return ModelFiles(config, adapter, decision, path)


def load_model(
    path: str | os.PathLike,
    lm: torch.nn.Module,
    vision: torch.nn.Module,
) -> tuple[GILLModel, DecisionHead | None]:
    """Build a GILLModel around the given backbones from a model directory (strict)."""
    return model_from_files(read_model_dir(path), lm, vision)


def model_from_files(files: ModelFiles, lm: torch.nn.Module, vision: torch.nn.Module) -> tuple[GILLModel, DecisionHead | None]:
    """A GILLModel (and decision head) from a model directory already read by ``read_model_dir``."""
    model = GILLModel(lm, vision, files.config)
    load_strict(model.adapter, files.adapter, str(files.path / WEIGHTS_NAME))
    decision = None
    if files.decision is not None:
        decision = DecisionHead.from_config(files.config)
        load_strict(decision, files.decision, str(files.path / DECISION_NAME))
        decision.eval()
    return model, decision


# ---- the original release ----------------------------------------------------------------------------

# Original key (after "module." and "model." are stripped) -> ours, as (regex, replacement), first match.
_ORIGINAL_KEYS = [
    (r"^logit_scale$", "logit_scale"),
    (r"^visual_embeddings\.(weight|bias)$", r"visual_prefix.proj.\1"),
    (r"^visual_fc\.(weight|bias)$", r"image_retrieval.\1"),
    (r"^ret_text_hidden_fcs\.0\.model\.(weight|bias)$", r"text_retrieval.\1"),
    (r"^gen_text_hidden_fcs\.0\.fc\.(weight|bias)$", r"mapper.in_proj.\1"),
    (r"^gen_text_hidden_fcs\.0\.tfm\.(.+)$", r"mapper.transformer.\1"),
    (r"^gen_text_hidden_fcs\.0\.query_embs$", "mapper.queries"),
    (r"^gen_text_hidden_fcs\.0\.model\.(weight|bias)$", r"mapper.out_proj.\1"),
]
_ORIGINAL_EMBEDDINGS = "input_embeddings.weight"
_ORIGINAL_BACKBONE_KEYS = re.compile(r"^(lm|visual_model)\.")


def original_key(key: str) -> str | None:
    """Our adapter key for an original checkpoint key, or None if it is not one of GILL's layers."""
    for pattern, repl in _ORIGINAL_KEYS:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_original_state_dict(state: StateDict, config: GILLConfig, source: str = "checkpoint") -> StateDict:
    """The original ``state_dict`` -> our adapter state dict (pure key mapping, values untouched).

    Accepts the released, pruned file (``input_embeddings.weight`` holds the [IMG] rows only) and the
    training file ``ckpt_best.pth.tar`` (the whole resized table: the [IMG] rows are taken by id).
    Frozen backbone weights, if present, are dropped. Keys that map to nothing are kept under their own
    name so the strict check reports them.
    """
    out: StateDict = {}
    n = config.tokens.num_img_tokens
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")
        if _ORIGINAL_BACKBONE_KEYS.match(key):
            continue
        if key == _ORIGINAL_EMBEDDINGS:
            if value.shape[0] != n:  # the full table: pick the [IMG] rows
                ids = config.tokens.img_token_ids
                if max(ids) >= value.shape[0]:
                    raise CheckpointError(
                        f"{source}: {_ORIGINAL_EMBEDDINGS} has {value.shape[0]} rows; expected {n} [IMG] rows "
                        f"or a full table containing ids {ids}"
                    )
                value = value[torch.tensor(ids)]
            out["img_embeddings"] = value
            continue
        out[original_key(key) or key] = value
    check_state_dict(out, adapter_shapes(config), source)
    return out


def convert_original_decision(state: StateDict, config: GILLConfig, source: str = "decision checkpoint") -> StateDict:
    """The original decision model (``nn.Sequential(Dropout, Linear)``: keys ``1.weight``, ``1.bias``) -> ours."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        out[{"1.weight": "linear.weight", "1.bias": "linear.bias"}.get(key, key)] = value
    check_state_dict(out, decision_shapes(config), source)
    return out


def _state_dict_of(obj: Any, path: Path) -> StateDict:
    if not isinstance(obj, dict) or "state_dict" not in obj:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry, found {keys}")
    return dict(obj["state_dict"])


def read_original_decision(path: str | os.PathLike, config: GILLConfig) -> tuple[GILLConfig, StateDict]:
    """Read ``decision_model.pth.tar`` (its tensors are tagged cuda:0; they load on the CPU) and convert it.

    The config is adjusted to the head's input width: 4096 for the release, 4097 for the paper-time head
    that also reads the max retrieval score.
    """
    path = Path(path)
    raw = _state_dict_of(torch_load(path), path)
    weight = raw.get("1.weight", raw.get("module.1.weight"))
    if weight is not None and weight.ndim == 2 and weight.shape[-1] == config.lm_hidden_size + 1:
        config = replace(config, decision=replace(config.decision, use_ret_score=True))
    return config, convert_original_decision(raw, config, str(path))


def config_from_original(model_args: str | os.PathLike | dict[str, Any], state: StateDict) -> GILLConfig:
    """The config of an original checkpoint: ``model_args.json`` plus the widths read off the tensors
    (LM and vision widths, mapper width, depth and feed-forward size), so checkpoints trained with other
    backbones or mapper sizes convert too. The number of mapper heads is not stored; the original's 4 is
    assumed."""
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"original checkpoint has no {key!r}; found {sorted(state)[:8]}...")
        return tuple(state[key].shape)

    mapper_prefix = "gen_text_hidden_fcs.0.tfm."
    layers = {m.group(1, 2) for k in state if (m := re.match(re.escape(mapper_prefix) + r"(encoder|decoder)\.layers\.(\d+)\.", k))}
    config = config_from_model_args(
        model_args,
        lm_hidden_size=shape("ret_text_hidden_fcs.0.model.weight")[1],
        vision_hidden_size=shape("visual_fc.weight")[1],
    )
    config.mapper = replace(
        config.mapper,
        hidden_dim=shape("gen_text_hidden_fcs.0.fc.weight")[0],
        ffn_dim=shape(mapper_prefix + "encoder.layers.0.linear1.weight")[0],
        num_encoder_layers=sum(1 for kind, _ in layers if kind == "encoder"),
        num_decoder_layers=sum(1 for kind, _ in layers if kind == "decoder"),
    )
    return config


def convert_original(
    model_args: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    decision: str | os.PathLike | None = None,
    training_data: str = "",
) -> Path:
    """Convert ``model_args.json`` + ``pretrained_ckpt.pth.tar`` [+ ``decision_model.pth.tar``] into a
    model directory. Backbones that ``model_args.json`` names by a relative path (a local copy) are
    resolved against the folder it was read from."""
    path = Path(checkpoint)
    raw = _state_dict_of(torch_load(path), path)
    config = config_from_original(model_args, raw)
    config = resolve_paths(config, Path(model_args).parent)
    config.training_data = training_data
    adapter = convert_original_state_dict(raw, config, str(path))
    decision_state = None
    if decision is not None:
        config, decision_state = read_original_decision(decision, config)
    return save_model_dir(out_dir, config, adapter, decision_state)
