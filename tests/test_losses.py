import math

import pytest
import torch

from gill import losses


def test_caption_loss_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, 1, 2, -100, -100]])
    assert math.isclose(losses.caption_loss(logits, labels).item(), math.log(11), rel_tol=1e-6)


def test_caption_loss_predicts_the_next_token():
    # Position t predicts label t+1: a confident correct prediction gives ~0 loss, the same logits one
    # position off give a large one.
    labels = torch.tensor([[7, 1, 2, 3]])
    logits = torch.full((1, 4, 8), -20.0)
    for t, nxt in enumerate([1, 2, 3]):
        logits[0, t, nxt] = 20.0
    assert losses.caption_loss(logits, labels).item() < 1e-6
    assert losses.caption_loss(logits.roll(1, dims=1), labels).item() > 10


def test_contrastive_loss_known_answer():
    # Orthonormal pairs with scale exp(0) = 1: each row's logits are [1, 0]; both directions give
    # CE = log(1 + e^-1).
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    expected = math.log(1 + math.exp(-1))
    assert math.isclose(losses.contrastive_loss(t, v, torch.tensor(0.0)).item(), expected, rel_tol=1e-6)
    # Swapped pairs are penalised: logits [0, 1] -> CE = log(1 + e).
    assert math.isclose(losses.contrastive_loss(t, v.flip(0), torch.tensor(0.0)).item(), math.log(1 + math.e), rel_tol=1e-6)


def test_contrastive_loss_is_symmetric_average():
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    logits = torch.exp(scale) * torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T
    target = torch.arange(4)
    i2t = -torch.log_softmax(logits.T, dim=-1)[target, target].mean()
    t2i = -torch.log_softmax(logits, dim=-1)[target, target].mean()
    torch.testing.assert_close(losses.contrastive_loss(t, v, scale), (i2t + t2i) / 2)


def test_mapper_loss_is_mean_euclidean_distance_not_mse():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    assert losses.mapper_loss(pred, target).item() == 3.0  # (5 + 1) / 2; an MSE would be 6.5
    same = torch.ones(1, 2, 2, requires_grad=True)
    losses.mapper_loss(same, torch.ones(1, 2, 2)).backward()
    assert torch.isfinite(same.grad).all()


def test_mapper_weights_scale_each_sample_and_keep_the_batch_mean():
    pred = torch.zeros(2, 2, 2)
    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 2.0]]])  # distances 3 and 2
    assert losses.mapper_loss(pred, target).item() == 2.5
    assert losses.mapper_loss(pred, target, torch.ones(2)).item() == 2.5
    assert losses.mapper_loss(pred, target, torch.tensor([1.0, 0.0])).item() == 1.5  # (3 * 1 + 2 * 0) / 2
    assert losses.mapper_loss(pred, target, torch.tensor([0.5, 2.0])).item() == 2.75
    with pytest.raises(ValueError, match="weights"):
        losses.mapper_loss(pred, target, torch.ones(3))


def test_total_uses_the_original_weights():
    one = torch.tensor(1.0)
    out = losses.gill_losses(one * 2, one * 3, one * 5, one * 7)
    assert out.total.item() == 2 + (0.5 + 0.5) * 3 + 5 + 7


def test_label_masks():
    img = torch.tensor([10, 11, 12])
    ids = torch.tensor([[2, 5, 6, 10, 11, 12, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    assert losses.caption_labels(ids, mask, img).tolist() == [[2, 5, 6, -100, -100, -100, -100]]
    assert losses.img_token_labels(ids, mask, img).tolist() == [[2, 5, 6, 10, -100, -100, -100]]


def test_extra_negatives_enter_text_to_image_only_and_masked_ones_not_at_all():
    g = torch.Generator().manual_seed(0)
    t, v, q = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    scale = torch.tensor(1.0)
    logits = losses.retrieval_logits(t, v, scale)
    extra = losses.retrieval_logits(t, q, scale)
    target = torch.arange(3)
    t2i = torch.nn.functional.cross_entropy(torch.cat([logits, extra], 1), target)
    i2t = torch.nn.functional.cross_entropy(logits.T, target)
    torch.testing.assert_close(losses.contrastive_loss(t, v, scale, q), (t2i + i2t) / 2)
    # more negatives can only make the text -> image part harder
    assert losses.contrastive_loss(t, v, scale, q) > losses.contrastive_loss(t, v, scale)
    # every extra masked: the plain loss
    masked = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(losses.contrastive_loss(t, v, scale, q, masked), losses.contrastive_loss(t, v, scale))
