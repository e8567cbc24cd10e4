import copy

import pytest
import torch

from gill import losses
from gill.model import GILLModel


def batch(backbones, texts):
    enc = backbones.tokenizer(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def with_img(backbones, *captions):
    return [c + backbones.img_tokens.text for c in captions]


def resized_reference(lm, model):
    """The original's way: resize the LM's vocabulary and write the [IMG] rows into its (tied or untied)
    embedding tables. Our spliced model must compute exactly what this one computes."""
    ref = copy.deepcopy(lm)
    ref.resize_token_embeddings(model.vocab_size, mean_resizing=False)
    ids = model.img_token_ids
    with torch.no_grad():
        ref.get_input_embeddings().weight[ids] = model.adapter.img_embeddings
        if not model.config.tie_img_embeddings:
            ref.get_output_embeddings().weight[ids] = model.adapter.img_output_embeddings
    return ref


def test_spliced_img_tokens_equal_a_resized_lm(tiny):
    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config)
    torch.nn.init.normal_(model.adapter.img_embeddings, std=0.5)
    if not config.tie_img_embeddings:
        torch.nn.init.normal_(model.adapter.img_output_embeddings, std=0.5)
    ids, mask = batch(backbones, with_img(backbones, "a red circle", "a small blue square on the left"))
    ref = resized_reference(backbones.lm, model).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = model.lm_forward(model.embed_tokens(ids), mask)
    assert got.logits.shape == (2, ids.shape[1], config.tokens.vocab_size)
    vocab = config.tokens.vocab_size
    real = mask.bool()  # padded positions are never read (and Llama numbers them differently)
    torch.testing.assert_close(got.hidden[real], expected.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits[real], expected.logits[..., :vocab][real], rtol=1e-5, atol=1e-5)


def test_tiny_backbones_put_img_ids_past_the_lm_table(tiny):
    # As with OPT-6.7B (50272 rows, [IMG] ids up to 50273), the last [IMG] ids have no LM row.
    backbones, config = tiny
    rows = backbones.lm.get_input_embeddings().num_embeddings
    assert config.tokens.img_token_ids[0] < rows <= config.tokens.img_token_ids[-1]
    assert config.tie_img_embeddings == (backbones.lm.config.model_type == "opt")


def test_left_padding_gives_the_unpadded_result(tiny):
    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    texts = with_img(backbones, "a red circle", "a large green triangle moves to the right")
    backbones.tokenizer.padding_side = "left"
    ids, mask = batch(backbones, texts)
    with torch.no_grad():
        padded = model.img_token_forward(ids, mask)
        for row, text in enumerate(texts):
            one_ids, one_mask = batch(backbones, [text])
            single = model.img_token_forward(one_ids, one_mask)
            torch.testing.assert_close(padded.img_hidden[row], single.img_hidden[0], rtol=1e-5, atol=1e-5)
            n = one_ids.shape[1]
            torch.testing.assert_close(padded.logits[row, -n:], single.logits[0], rtol=1e-4, atol=1e-4)


def test_one_backward_through_all_losses_changes_only_trainable_weights(tiny):
    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config)
    frozen_before = {k: v.clone() for k, v in {**{f"lm.{k}": v for k, v in backbones.lm.state_dict().items()},
                                               **{f"vision.{k}": v for k, v in backbones.vision.state_dict().items()}}.items()}
    adapter_before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    lm_rows_before = backbones.lm.get_input_embeddings().weight.clone()

    model.train()
    assert not backbones.lm.training and not backbones.vision.training and model.adapter.training
    captions = ["a red circle", "a blue square on the left", "a small green triangle"]
    cap_ids, cap_mask = batch(backbones, captions)
    ids, mask = batch(backbones, with_img(backbones, *captions))
    pixels = torch.randn(3, 3, config.preprocess.image_size, config.preprocess.image_size)

    image = model.encode_images(pixels)
    caption = model.caption(image.prefix, cap_ids, cap_mask)
    out = model.img_token_forward(ids, mask)
    text_emb = model.text_retrieval_embeddings(out.img_hidden)
    gen = model.generation_embeddings(out.img_hidden)
    total = losses.gill_losses(
        caption.loss, out.loss, losses.contrastive_loss(text_emb, image.retrieval, model.adapter.logit_scale),
        losses.mapper_loss(gen, torch.randn_like(gen)),
    ).total
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    total.backward()
    assert all(p.grad is None for p in backbones.lm.parameters())
    assert all(p.grad is None for p in backbones.vision.parameters())
    opt.step()

    frozen_after = {**{f"lm.{k}": v for k, v in backbones.lm.state_dict().items()},
                    **{f"vision.{k}": v for k, v in backbones.vision.state_dict().items()}}
    for k, v in frozen_before.items():
        assert torch.equal(v, frozen_after[k]), f"frozen weight {k} changed"
    assert torch.equal(lm_rows_before, backbones.lm.get_input_embeddings().weight)
    after = model.adapter.state_dict()
    changed = {k for k in adapter_before if not torch.equal(adapter_before[k], after[k])}
    assert changed == set(adapter_before), f"unchanged trainable weights: {set(adapter_before) - changed}"
    assert not torch.equal(adapter_before["img_embeddings"], after["img_embeddings"])


def test_img_rows_get_gradient_as_inputs_only_where_used_and_as_outputs_through_logits(tiny):
    backbones, config = tiny
    model = GILLModel(backbones.lm, backbones.vision, config)
    ids, _ = batch(backbones, ["a red circle"])
    ids = torch.cat([ids, torch.tensor([[config.tokens.img_token_ids[2]]])], 1)
    out = model.lm_forward(model.embed_tokens(ids), torch.ones_like(ids))
    (out.hidden * torch.randn_like(out.hidden)).sum().backward(retain_graph=True)
    used = model.adapter.img_embeddings.grad.abs().sum(-1)
    assert used[2] > 0 and torch.count_nonzero(used) == 1
    model.adapter.img_embeddings.grad = None
    img_cols = out.logits[..., model.img_token_ids]
    (img_cols * torch.randn_like(img_cols)).sum().backward()
    out_rows = model.adapter.img_output.grad.abs().sum(-1)
    assert torch.count_nonzero(out_rows) == config.tokens.num_img_tokens  # every [IMG] logit column


def test_heads_compute_the_documented_functions(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    a = model.adapter
    h = torch.randn(2, config.tokens.num_img_tokens, config.lm_hidden_size)
    torch.testing.assert_close(model.text_retrieval_embeddings(h), h[:, 0] @ a.text_retrieval.weight.T + a.text_retrieval.bias)
    with torch.no_grad():
        torch.testing.assert_close(model.generation_embeddings(h), a.mapper(h + a.img_embeddings))
    assert torch.equal(model.decision_features(h), h[:, 0])
    config.decision.use_ret_score = True
    with pytest.raises(ValueError, match="max_ret_score"):
        model.decision_features(h)
    f = model.decision_features(h, torch.tensor([0.5, 0.25]))
    assert f.shape == (2, config.lm_hidden_size + 1) and f[:, -1].tolist() == [0.5, 0.25]


def test_image_encoding_uses_the_pooled_pre_projection_feature(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    pixels = torch.randn(2, 3, config.preprocess.image_size, config.preprocess.image_size)
    enc = model.encode_images(pixels)
    with torch.no_grad():
        vision_out = backbones.vision(pixel_values=pixels)
        cls = vision_out.last_hidden_state[:, 0]
        pooled = getattr(backbones.vision, "vision_model", backbones.vision).post_layernorm(cls)
        torch.testing.assert_close(enc.pooled, pooled)
        a = model.adapter
        torch.testing.assert_close(enc.retrieval, pooled @ a.image_retrieval.weight.T + a.image_retrieval.bias)
        torch.testing.assert_close(enc.prefix, (pooled @ a.visual_prefix.proj.weight.T + a.visual_prefix.proj.bias).view(2, config.n_visual_tokens, -1))


def test_incomplete_img_group_is_an_error(tiny_opt):
    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config)
    ids, mask = batch(backbones, ["a red circle" + "".join(backbones.img_tokens.strings[:5])])
    with pytest.raises(ValueError, match=r"every \[IMG0\] must be followed by \[IMG1..7\]"):
        model.img_token_forward(ids, mask)


def test_width_mismatch_is_named(tiny_opt):
    backbones, config = tiny_opt
    config.lm_hidden_size = 64
    with pytest.raises(ValueError, match="lm_hidden_size is 64 but the LM's embeddings are 32-d"):
        GILLModel(backbones.lm, backbones.vision, config)


def test_bf16_backbones_with_fp32_adapter_train(tiny_opt):
    # Frozen backbones in bf16, trainable adapter in fp32 (fp32 master weights): gradients reach the
    # adapter and the heads compute in the adapter's dtype.
    backbones, config = tiny_opt
    backbones.lm.to(torch.bfloat16)
    backbones.vision.to(torch.bfloat16)
    model = GILLModel(backbones.lm, backbones.vision, config)
    ids, mask = batch(backbones, with_img(backbones, "a red circle"))
    image = model.encode_images(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    caption = model.caption(image.prefix, *batch(backbones, ["a red circle"]))
    out = model.img_token_forward(ids, mask)
    gen = model.generation_embeddings(out.img_hidden)
    ret = model.text_retrieval_embeddings(out.img_hidden)
    assert out.logits.dtype == torch.bfloat16 and gen.dtype == ret.dtype == torch.float32
    (caption.loss + out.loss + losses.mapper_loss(gen, torch.zeros_like(gen)) + ret.square().sum()).backward()
    for name in ["img_embeddings", "visual_prefix.proj.weight", "text_retrieval.weight", "mapper.queries"]:
        grad = model.adapter.get_parameter(name).grad
        assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0, name
