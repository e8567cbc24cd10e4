import torch

from gill import sampling


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(sampling.top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(sampling.top_p_filter(logits, 0.5))
    assert kept.tolist() == [[True, False, False, False]]
    # rows are independent and order is by probability, not position
    two = torch.log(torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(sampling.top_p_filter(two, 0.7)).tolist() == [[False, False, True, True], [True, True, False, False]]


def test_top_k_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(sampling.top_k_filter(logits, 2)).tolist() == [[False, True, True, False]]
    assert sampling.sample(logits).tolist() == [1]


def test_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    picks = sampling.sample(logits, temperature=1.0, generator=g)
    freq = torch.bincount(picks, minlength=3).float() / len(picks)
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    # top_k=1 is greedy whatever the temperature
    assert (sampling.sample(logits, temperature=5.0, top_k=1, generator=g) == 0).all()


def test_img_logit_scaling_is_the_originals():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(sampling.scale_img_logit(logits, 1, 1.3), torch.tensor([[1.0, 2.0 * 1.3, 0.5]]))
    assert sampling.scale_img_logit(logits, 1, 1.0) is logits


def test_mask_ids_per_row():
    logits = torch.zeros(2, 4)
    out = sampling.mask_ids(logits, torch.tensor([1, 3]), torch.tensor([True, False]))
    assert torch.isinf(out[0, [1, 3]]).all() and (out[1] == 0).all()
