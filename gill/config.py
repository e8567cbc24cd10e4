"""Configuration dataclasses for GILL, their JSON round trip, and the reader of the original
``model_args.json``.

This module imports no torch, so a config can be read and edited anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gill.io import atomic_write_text
from gill.settings import RunSettings

# 2: the ``run`` block (run settings) and ``training_data``; version-1 files read as before (no run settings).
# 3: the ``chat`` block (what a chat should tell a user of the model); earlier files read as before (none).
FORMAT_VERSION = 3

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config file or dict that does not describe a valid GILL model."""


@dataclass
class MapperConfig:
    """The GILLMapper: Linear -> encoder-decoder transformer with learned queries -> Linear.

    Defaults are the original's (``nn.Transformer`` with pre-LN, final norms, ReLU).
    """

    hidden_dim: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5


@dataclass
class TokenConfig:
    """The [IMG] tokens added to the LM's tokenizer (see ``gill.tokens``)."""

    num_img_tokens: int = 8
    template: str = "[IMG{}]"  # formatted with 0..num_img_tokens-1
    # Added as the tokenizer's cls_token before the [IMG] tokens, never placed in a sequence; the original
    # adds it, which is why [IMG0] is 50266 and not 50265 for OPT. None adds nothing.
    image_placeholder: str | None = "<|image|>"
    # Filled in from the tokenizer after the tokens are added: ids of [IMG0..n-1] and the tokenizer length.
    img_token_ids: list[int] = field(default_factory=list)
    vocab_size: int | None = None

    @property
    def strings(self) -> list[str]:
        return [self.template.format(i) for i in range(self.num_img_tokens)]


@dataclass
class PreprocessConfig:
    """Image preprocessing for the vision encoder (CLIP's by default)."""

    image_size: int = 224
    resize: str = "shortest_edge"  # "shortest_edge" then center crop (CLIP), or "squash" to a square
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


DECISION_LABELS = (("gen", "ret"), ("gen", "ret", "edit"))  # the decision heads' outputs, in order


@dataclass
class DecisionConfig:
    """The image-slot classifier: Dropout -> Linear(features, len(labels)). Its outputs are ``labels``:
    ("gen", "ret"), the release's, or ("gen", "ret", "edit"), a head trained to edit too."""

    labels: tuple[str, ...] = ("gen", "ret")
    dropout: float = 0.5
    # The paper-time classifier also read the max retrieval score (Linear(4097, 2)); the release's reads
    # the [IMG0] hidden state only (Linear(4096, 2)).
    use_ret_score: bool = False


@dataclass
class ChatCard:
    """What the model tells a chat about itself (the app shows it above the chat): a hint of what it knows
    and understands (Markdown), and example messages a user may start with. Empty: the app shows none."""

    hint: str = ""
    examples: list[str] = field(default_factory=list)


@dataclass
class GILLConfig:
    """Everything needed to rebuild a GILL model around its frozen backbones."""

    # Backbones: hub ids or local paths. `tokenizer` defaults to `lm`.
    lm: str = "facebook/opt-6.7b"
    vision: str = "openai/clip-vit-large-patch14"
    tokenizer: str | None = None
    diffusion: str | None = "stable-diffusion-v1-5/stable-diffusion-v1-5"

    lm_hidden_size: int = 4096  # width of the LM's input embeddings and last hidden states
    vision_hidden_size: int = 1024  # width of the vision encoder's pooled output (pre-projection)
    n_visual_tokens: int = 4  # soft tokens per image in the captioning prefix
    ret_emb_dim: int = 256  # shared retrieval space
    gen_seq_len: int = 77  # length of the diffusion model's text conditioning
    gen_emb_dim: int = 768  # width of the diffusion model's text conditioning
    # Whether the [IMG] output embeddings are the input ones (as in OPT, whose lm_head is tied).
    tie_img_embeddings: bool = True
    logit_scale_init: float = math.log(1 / 0.07)

    mapper: MapperConfig = field(default_factory=MapperConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    # How the model is best run (gill.settings); unset fields fall back to the library's defaults.
    run: RunSettings = field(default_factory=RunSettings)
    training_data: str = ""  # what the trained layers were trained on, for the model card
    chat: ChatCard = field(default_factory=ChatCard)
    format_version: int = FORMAT_VERSION

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.lm

    @property
    def decision_features(self) -> int:
        return self.lm_hidden_size + int(self.decision.use_ret_score)

    # ---- JSON round trip -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION  # written in the current format, whatever it was read from
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GILLConfig:
        cfg = _from_dict(cls, data, source, "")
        try:
            cfg.run.validated(f"{source}.run")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if tuple(cfg.decision.labels) not in DECISION_LABELS:
            raise ConfigError(f"{source}: field decision.labels is {list(cfg.decision.labels)}; expected one of "
                              f"{[list(x) for x in DECISION_LABELS]}")
        if cfg.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"{source}: format_version {cfg.format_version} is newer than this library reads "
                f"({FORMAT_VERSION}); upgrade gill"
            )
        return cfg

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GILLConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))


def _from_dict(cls: type, data: dict[str, Any], source: str, path: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming each of them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {'field ' + path if path else 'the config'} is {type(data).__name__}; "
                          f"expected an object for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {[path + u for u in unknown]} for {cls.__name__}; "
                          f"known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, source, f"{path}{name}.")
        else:
            _check_value(value, hint, f"{source}: field {path}{name}")
            if typing.get_origin(hint) is tuple and isinstance(value, list):
                value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# Fields that are sizes or counts (>= 1); every other integer field is >= 0.
_POSITIVE = {"lm_hidden_size", "vision_hidden_size", "n_visual_tokens", "ret_emb_dim", "gen_seq_len", "gen_emb_dim",
             "hidden_dim", "num_heads", "ffn_dim", "num_img_tokens", "image_size", "vocab_size", "format_version"}

# The largest value of each field that sizes an allocation, with what real models use: a config beyond it is
# refused when it is read, before any tensor or image buffer is made (image_size 30000 would make each image
# a 10 GB float buffer).
LIMITS = {
    "image_size": (1024, "CLIP 224 / 336, SigLIP 256 / 384 / 512, EVA 448"),
    "n_visual_tokens": (256, "GILL 4, FROMAGe 1"),
    "num_img_tokens": (256, "GILL 8"),
    "gen_seq_len": (1024, "Stable Diffusion 77"),
    "gen_emb_dim": (16384, "SD v1 768, SD v2 1024, SDXL 2048, T5-XXL 4096"),
    "ret_emb_dim": (16384, "GILL 256"),
    "lm_hidden_size": (65536, "OPT-6.7B 4096, the largest LMs 16384"),
    "vision_hidden_size": (16384, "CLIP ViT-L 1024, ViT-bigG 1664"),
    "hidden_dim": (16384, "GILL's mapper 512"),
    "ffn_dim": (65536, "GILL's mapper 2048"),
    "num_heads": (256, "GILL's mapper 4"),
    "num_encoder_layers": (64, "GILL's mapper 4"),
    "num_decoder_layers": (64, "GILL's mapper 4"),
    "vocab_size": (2**24, "OPT 50274 with GILL's tokens, the largest vocabularies about 260000"),
}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list (each item {_describe(args[0])})" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            return False
        return all(_matches(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True  # types this reader does not know are checked by their own code


def _check_value(value: Any, hint: Any, where: str) -> None:
    """Raise ConfigError naming the field (file and path) for a value of the wrong type or range."""
    if not _matches(value, hint):
        raise ConfigError(f"{where} is {value!r} ({type(value).__name__}); expected {_describe(hint)}")
    name = where.rsplit(" ", 1)[-1].rsplit(".", 1)[-1]
    if isinstance(value, int) and not isinstance(value, bool):
        lowest = 1 if name in _POSITIVE else 0
        highest, usual = LIMITS.get(name, (None, ""))
        if value < lowest or (highest is not None and value > highest):
            wanted = f"from {lowest} to {highest} ({usual})" if highest is not None else f">= {lowest}"
            raise ConfigError(f"{where} is {value}; expected an integer {wanted}")
    if name == "dropout" and not 0 <= value < 1:
        raise ConfigError(f"{where} is {value}; expected a number in [0, 1)")
    if name == "img_token_ids" and any(v < 0 for v in value):
        raise ConfigError(f"{where} is {value}; token ids are >= 0")


# ---- the original release's model_args.json --------------------------------------------------------

# Widths of the backbones the original release names; other backbones need them passed explicitly.
KNOWN_LM_HIDDEN = {
    "facebook/opt-125m": 768,
    "facebook/opt-350m": 512,
    "facebook/opt-1.3b": 2048,
    "facebook/opt-2.7b": 2560,
    "facebook/opt-6.7b": 4096,
    "facebook/opt-13b": 5120,
}
KNOWN_VISION_HIDDEN = {
    "openai/clip-vit-base-patch32": 768,
    "openai/clip-vit-base-patch16": 768,
    "openai/clip-vit-large-patch14": 1024,
}


def config_from_model_args(
    args: dict[str, Any] | str | os.PathLike,
    *,
    lm_hidden_size: int | None = None,
    vision_hidden_size: int | None = None,
    vocab_size: int | None = None,
) -> GILLConfig:
    """Read the original release's ``model_args.json`` (a path or its parsed dict) into a GILLConfig.

    Only the settings the released model uses are accepted (``text_fc_mode="gill_mapper"``,
    ``ret_text_fc_mode="linear"``, ``text_emb_layers=[-1]``, shared retrieval/generation tokens); anything
    else is an error naming the field. Backbone widths come from the known ids or must be passed.
    """
    args, source = _read_model_args(args)
    ret_ids = _check_model_args(args, source)
    lm, vision = args["opt_version"], args["visual_encoder"]
    lm_hidden_size = lm_hidden_size or KNOWN_LM_HIDDEN.get(lm)
    vision_hidden_size = vision_hidden_size or KNOWN_VISION_HIDDEN.get(vision)
    if lm_hidden_size is None:
        raise ConfigError(f"{source}: unknown LM {lm!r}; pass lm_hidden_size")
    if vision_hidden_size is None:
        raise ConfigError(f"{source}: unknown visual encoder {vision!r}; pass vision_hidden_size")
    if not isinstance(lm, str) or not isinstance(vision, str):
        raise ConfigError(f"{source}: opt_version and visual_encoder must be strings, got {lm!r} and {vision!r}")
    config = GILLConfig(
        lm=lm,
        vision=vision,
        lm_hidden_size=lm_hidden_size,
        vision_hidden_size=vision_hidden_size,
        n_visual_tokens=args["n_visual_tokens"],
        ret_emb_dim=args["ret_emb_dim"],
        gen_seq_len=args["num_clip_tokens"],
        gen_emb_dim=args["gen_emb_dim"],
        tie_img_embeddings=True,
        tokens=TokenConfig(
            num_img_tokens=args["num_tokens"],
            img_token_ids=ret_ids,
            # The original tokenizer ends with the [IMG] tokens (OPT: 50274).
            vocab_size=vocab_size if vocab_size is not None else max(ret_ids) + 1,
        ),
    )
    return GILLConfig.from_dict(config.to_dict(), source=source)  # every field type-checked, naming the file


def _read_model_args(args: dict[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the parsed ``model_args``, the name errors give it): a dict as given, or a JSON file's object."""
    if isinstance(args, dict):
        return args, "model_args"
    source = str(args)
    try:
        args = json.loads(Path(args).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(args).__name__}")
    return args, source


def _check_model_args(args: dict[str, Any], source: str) -> list[int]:
    """Refuse (``ConfigError`` naming the field) what the released model does not use; the [IMG] token ids."""
    required = ["opt_version", "visual_encoder", "n_visual_tokens", "ret_emb_dim", "gen_emb_dim",
                "num_tokens", "num_clip_tokens", "retrieval_token_idx"]
    missing = [k for k in required if k not in args]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}")

    def expect(key: str, value: Any, default: Any) -> None:
        got = args.get(key, default)
        if got != value:
            raise ConfigError(f"{source}: field {key!r} is {got!r}; only {value!r} is supported")

    expect("text_fc_mode", "gill_mapper", "gill_mapper")
    expect("ret_text_fc_mode", "linear", "linear")
    expect("text_emb_layers", [-1], [-1])
    expect("norm_image_embed", "none", "none")
    for key in ("retrieval_token_idx", "gen_token_idx"):
        ids = args.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"{source}: field {key!r} is {ids!r}; expected a list of token ids (integers >= 0)")
    for key in ("n_visual_tokens", "ret_emb_dim", "gen_emb_dim", "num_tokens", "num_clip_tokens"):
        if not isinstance(args[key], int) or isinstance(args[key], bool) or args[key] < 1:
            raise ConfigError(f"{source}: field {key!r} is {args[key]!r}; expected an integer >= 1")
    ret_ids = list(args["retrieval_token_idx"])
    gen_ids = list(args.get("gen_token_idx", ret_ids))
    if not args.get("share_ret_gen", True) or gen_ids != ret_ids:
        raise ConfigError(f"{source}: separate retrieval and generation tokens (share_ret_gen=false) "
                          "are not supported; gen_token_idx must equal retrieval_token_idx")
    if len(ret_ids) != args["num_tokens"]:
        raise ConfigError(f"{source}: retrieval_token_idx has {len(ret_ids)} ids but num_tokens is "
                          f"{args['num_tokens']}")
    return ret_ids
