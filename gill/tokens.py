"""The one place the [IMG0..IMGn] tokens are defined and added to a tokenizer.

For OPT's tokenizer (50265 entries) this reproduces the original release exactly: ``<|image|>`` becomes
50265 (added as the cls token, never used), ``[IMG0..7]`` become 50266..50273, and the tokenizer length is
50274.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gill.config import TokenConfig


@dataclass(frozen=True)
class ImageTokens:
    """The [IMG] tokens as they sit in one tokenizer."""

    strings: tuple[str, ...]
    ids: tuple[int, ...]
    vocab_size: int  # len(tokenizer) after the tokens were added
    placeholder_id: int | None = None

    @property
    def text(self) -> str:
        """The [IMG] tokens as one string, e.g. appended to a caption: "[IMG0][IMG1]..."."""
        return "".join(self.strings)

    def to_config(self, tokens: TokenConfig) -> TokenConfig:
        return replace(tokens, img_token_ids=list(self.ids), vocab_size=self.vocab_size)


def add_image_tokens(tokenizer: Any, tokens: TokenConfig | None = None) -> ImageTokens:
    """Add the image placeholder and the [IMG] tokens to a Hugging Face tokenizer, in place.

    Idempotent: a tokenizer that already has them (e.g. one saved after this call) is left as it is.
    Returns their ids; raises if the tokenizer splits an [IMG] string into more than one id.
    """
    tokens = tokens or TokenConfig()
    if tokens.image_placeholder is not None:
        if tokens.image_placeholder not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"cls_token": tokens.image_placeholder})
    strings = tokens.strings
    vocab = tokenizer.get_vocab()
    new = [s for s in strings if s not in vocab]
    if new:
        tokenizer.add_tokens(new)
    ids = tuple(tokenizer.convert_tokens_to_ids(s) for s in strings)
    for s, i in zip(strings, ids):
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
        if encoded != [i]:
            raise ValueError(f"tokenizer encodes {s!r} as {encoded}, expected the single id {i}")
    placeholder_id = (
        tokenizer.convert_tokens_to_ids(tokens.image_placeholder) if tokens.image_placeholder else None
    )
    return ImageTokens(strings=tuple(strings), ids=ids, vocab_size=len(tokenizer), placeholder_id=placeholder_id)


def check_image_tokens(tokenizer: Any, tokens: TokenConfig, *, source: str = "config") -> ImageTokens:
    """Add the tokens and check they got the ids a config (e.g. of a converted checkpoint) expects."""
    found = add_image_tokens(tokenizer, tokens)
    if tokens.img_token_ids and list(found.ids) != list(tokens.img_token_ids):
        raise ValueError(
            f"{source}: tokenizer gives the [IMG] tokens ids {list(found.ids)}, but the model was trained "
            f"with {list(tokens.img_token_ids)}; use the tokenizer the model was trained with"
        )
    if tokens.vocab_size is not None and found.vocab_size != tokens.vocab_size:
        raise ValueError(
            f"{source}: tokenizer length is {found.vocab_size} after adding the [IMG] tokens, "
            f"but the model expects {tokens.vocab_size}"
        )
    return found
