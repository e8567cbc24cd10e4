"""The only code that loads backbones (hub id or local path) or builds tiny random ones.

Everything else receives modules. No device or dtype is chosen here: callers pass ``torch_dtype`` and
move the modules themselves. transformers is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gill import synthetic
from gill.config import GILLConfig, PreprocessConfig
from gill.tokens import ImageTokens, add_image_tokens, check_image_tokens

# OPT's special-token layout: <s>=0, <pad>=1, </s>=2 (also its BOS), <unk>=3.
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


@dataclass
class Backbones:
    lm: nn.Module
    vision: nn.Module
    tokenizer: Any
    image_processor: Any
    img_tokens: ImageTokens


# ---- loading real backbones ------------------------------------------------------------------------


class BackboneError(ValueError):
    """A backbone folder or repo that is refused (pickled weights, code of its own); one line naming it."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_files(name_or_path: str, subfolder: str = "") -> str:
    """The pickled weight files in a local backbone folder (for the message), else the folder or repo."""
    folder = Path(os.path.expanduser(name_or_path)) / subfolder
    found = sorted(p for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    return ", ".join(str(p) for p in found) or f"{name_or_path} ({subfolder or 'its'} .bin weights)"


@contextlib.contextmanager
def _refusing_unsafe(name_or_path: str, subfolder: str = "") -> Iterator[None]:
    """Loading a backbone: weights are only read as tensors (transformers' torch.load is weights-only) and
    no code of the model's own runs (``trust_remote_code=False``: refused at once, never an interactive
    "run custom code? [y/N]" question). Either refusal becomes one ``BackboneError`` line naming the files
    and what to do, instead of torch's or transformers' advice to turn the protection off."""
    try:
        yield
    except pickle.UnpicklingError:
        raise BackboneError(f"{_pickle_files(name_or_path, subfolder)}: pickled weights that hold more than tensors "
                            "are refused for safety (unpickling them can run code); convert them to safetensors "
                            "(model.safetensors) where you trust the file, then load the folder again") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        where = Path(os.path.expanduser(name_or_path)) / subfolder
        raise BackboneError(f"{where}: the model needs code of its own (auto_map in its config.json), and gill never "
                            "runs code from a model folder or repo; use a model that transformers itself supports "
                            "(a config.json without auto_map)") from None


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    with _refusing_unsafe(name_or_path, kwargs.get("subfolder", "")):
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs, trust_remote_code=False)


def load_lm(name_or_path: str, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _refusing_unsafe(name_or_path, kwargs.get("subfolder", "")):
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs, trust_remote_code=False)


def load_vision(name_or_path: str, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    from transformers import CLIPVisionModel

    with _refusing_unsafe(name_or_path, kwargs.get("subfolder", "")):
        return CLIPVisionModel.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs, trust_remote_code=False)


def image_processor(preprocess: PreprocessConfig) -> Any:
    """A CLIPImageProcessor built from the config (no file needed)."""
    from PIL import Image

    try:  # transformers >= 5: the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    if preprocess.interpolation not in resample:
        raise ValueError(f"preprocess.interpolation {preprocess.interpolation!r} not one of {sorted(resample)}")
    if preprocess.resize == "shortest_edge":
        size = {"shortest_edge": preprocess.image_size}
    elif preprocess.resize == "squash":
        size = {"height": preprocess.image_size, "width": preprocess.image_size}
    else:
        raise ValueError(f"preprocess.resize {preprocess.resize!r} not one of ['shortest_edge', 'squash']")
    return CLIPImageProcessor(
        do_resize=True, size=size, resample=resample[preprocess.interpolation], do_center_crop=True,
        crop_size={"height": preprocess.image_size, "width": preprocess.image_size}, do_rescale=True,
        do_normalize=True, image_mean=list(preprocess.mean), image_std=list(preprocess.std), do_convert_rgb=True,
    )


def load_backbones(config: GILLConfig, torch_dtype: torch.dtype | None = None, *, hub: dict[str, Any] | None = None,
                   **lm_kwargs: Any) -> Backbones:
    """Load the frozen LM, vision encoder and tokenizer a config names, and add the [IMG] tokens.

    ``hub``: keyword arguments for every ``from_pretrained`` (``cache_dir``, ``local_files_only``, ``token``).
    Raises if the tokenizer gives the [IMG] tokens other ids than the config records.
    """
    hub = hub or {}
    tokenizer = load_tokenizer(config.tokenizer_path, **hub)
    img_tokens = check_image_tokens(tokenizer, config.tokens, source=f"tokenizer {config.tokenizer_path}")
    lm = load_lm(config.lm, torch_dtype, **hub, **lm_kwargs)
    vision = load_vision(config.vision, torch_dtype, **hub)
    return Backbones(lm, vision, tokenizer, image_processor(config.preprocess), img_tokens)


def config_for_backbones(lm: nn.Module, vision: nn.Module, img_tokens: ImageTokens, /, **overrides: Any) -> GILLConfig:
    """A GILLConfig whose widths, tying and token ids are read off the given backbones."""
    base = GILLConfig(
        lm=getattr(lm, "name_or_path", "") or "",
        vision=getattr(vision, "name_or_path", "") or "",
        diffusion=None,
        lm_hidden_size=lm.get_input_embeddings().embedding_dim,
        vision_hidden_size=vision.config.hidden_size,
        tie_img_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    base = replace(base, **overrides)
    return replace(base, tokens=img_tokens.to_config(base.tokens))


# ---- tiny random backbones for tests and demos -----------------------------------------------------

DEFAULT_CORPUS = tuple(
    f"a {size} {color} {shape} {where}"
    for size in synthetic.SIZES
    for color in synthetic.TINY_COLORS
    for shape in synthetic.SHAPES
    for where in synthetic.PLACES
)


def build_tokenizer(vocab_size: int, corpus: Iterable[str] = DEFAULT_CORPUS) -> Any:
    """A byte-level BPE tokenizer with OPT's special-token layout, trained offline on ``corpus`` and
    padded with unused entries to exactly ``vocab_size`` (so id layouts like OPT's 50265 can be rebuilt).

    Like OPT's, it prepends ``</s>`` (its BOS) and appends nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = 256 + len(OPT_SPECIALS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(OPT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges)
    tok.decoder = decoders.ByteLevel()
    bos = OPT_SPECIALS[2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token="<pad>", unk_token="<unk>",
    )


def tiny_opt(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> nn.Module:
    """A tiny random OPTForCausalLM (tied embeddings, OPT's ids: pad 1, bos/eos 2)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, word_embed_proj_dim=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, ffn_dim=4 * hidden_size,
        max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_llama(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> nn.Module:
    """A tiny random Llama-style LM (untied embeddings, rotary positions, RMSNorm, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_clip_vision(hidden_size: int = 32, image_size: int = 32, patch_size: int = 8, num_layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny random CLIPVisionModel."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size,
    )
    return CLIPVisionModel(cfg).eval()


def tiny_backbones(
    lm_kind: str = "opt",
    vocab_size: int = 320,
    hidden_size: int = 32,
    vision_hidden_size: int = 32,
    image_size: int = 32,
    seed: int = 0,
) -> tuple[Backbones, GILLConfig]:
    """Tiny random backbones and a matching small GILLConfig, built offline.

    As with OPT-6.7B (50272 rows for a 50265-entry tokenizer), the LM has 7 more rows than the tokenizer,
    so the [IMG] ids straddle the end of the LM's embedding table.
    """
    tokenizer = build_tokenizer(vocab_size)
    img_tokens = add_image_tokens(tokenizer)
    builders = {"opt": tiny_opt, "llama": tiny_llama}
    if lm_kind not in builders:
        raise ValueError(f"lm_kind {lm_kind!r} not one of {sorted(builders)}")
    lm = builders[lm_kind](vocab_size + 7, hidden_size=hidden_size, seed=seed)
    vision = tiny_clip_vision(hidden_size=vision_hidden_size, image_size=image_size, seed=seed + 1)
    preprocess = PreprocessConfig(image_size=image_size)
    config = config_for_backbones(
        lm, vision, img_tokens, lm=f"tiny-random-{lm_kind}", vision="tiny-random-clip", ret_emb_dim=16,
        gen_seq_len=5, gen_emb_dim=24, preprocess=preprocess,
    )
    config.mapper = replace(config.mapper, hidden_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64)
    return Backbones(lm, vision, tokenizer, image_processor(preprocess), img_tokens), config


# ---- diffusion -------------------------------------------------------------------------------------


def load_diffusion(name_or_path: str, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
    """A diffusers pipeline (Stable Diffusion or another that takes ``prompt_embeds``)."""
    from diffusers import DiffusionPipeline

    with _refusing_unsafe(name_or_path):
        return DiffusionPipeline.from_pretrained(name_or_path, **{_diffusers_dtype_keyword(): torch_dtype}, **kwargs,
                                                 trust_remote_code=False)


def _diffusers_dtype_keyword() -> str:
    """``dtype`` where diffusers takes it (it deprecated ``torch_dtype`` with a FutureWarning), else ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 (present where ``dtype`` is)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def tiny_stable_diffusion(cross_attention_dim: int, seq_len: int, image_size: int = 32, seed: int = 0) -> Any:
    """A tiny random StableDiffusionPipeline (UNet + VAE + CLIP text encoder) whose conditioning is
    (seq_len, cross_attention_dim), built offline. No safety checker."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        norm_num_groups=8, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=image_size,
    )
    tokenizer = build_tokenizer(300)
    tokenizer.model_max_length = seq_len
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=seq_len, pad_token_id=1,
        bos_token_id=2, eos_token_id=2,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_sd_text_encoder(name_or_path: str, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> tuple[Any, nn.Module]:
    """The tokenizer and text encoder of a Stable Diffusion repository (its ``tokenizer/`` and
    ``text_encoder/`` subfolders): what GILL's mapper learns to imitate."""
    from transformers import AutoTokenizer, CLIPTextModel

    with _refusing_unsafe(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kwargs, trust_remote_code=False)
    with _refusing_unsafe(name_or_path, "text_encoder"):
        encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", dtype=torch_dtype, **kwargs,
                                                trust_remote_code=False)
    return tokenizer, encoder.eval()
