import pytest

from gill.backbones import build_tokenizer
from gill.config import TokenConfig
from gill.tokens import add_image_tokens, check_image_tokens


@pytest.fixture(scope="module")
def opt_sized_tokenizer():
    # Same length and special-token layout as OPT's tokenizer (50265 entries, </s> = 2 as BOS).
    return build_tokenizer(50265)


def test_reproduces_the_original_opt_ids(opt_sized_tokenizer):
    tok = opt_sized_tokenizer
    assert len(tok) == 50265
    found = add_image_tokens(tok)
    assert found.placeholder_id == 50265
    assert found.ids == tuple(range(50266, 50274))
    assert found.vocab_size == len(tok) == 50274
    # Idempotent: a second call (e.g. on a saved tokenizer) adds nothing and gives the same ids.
    assert add_image_tokens(tok) == found and len(tok) == 50274


def test_caption_with_img_tokens_encodes_to_the_ids(opt_sized_tokenizer):
    tok = opt_sized_tokenizer
    found = add_image_tokens(tok)
    ids = tok("a red circle" + found.text)["input_ids"]
    assert ids[0] == 2  # BOS </s>, as OPT
    assert ids[-8:] == list(found.ids)
    assert 50265 not in ids


def test_other_template_and_count():
    tok = build_tokenizer(300)
    found = add_image_tokens(tok, TokenConfig(num_img_tokens=4, template="<img_{}>", image_placeholder=None))
    assert found.strings == ("<img_0>", "<img_1>", "<img_2>", "<img_3>")
    assert found.ids == (300, 301, 302, 303) and found.placeholder_id is None


def test_check_refuses_a_tokenizer_with_other_ids():
    tok = build_tokenizer(300)
    tok.add_tokens(["extra"])  # shifts every later id by one
    expected = TokenConfig(img_token_ids=list(range(301, 309)), vocab_size=309)
    with pytest.raises(ValueError, match=r"ids \[302, .*trained with \[301"):
        check_image_tokens(tok, expected, source="converted")
