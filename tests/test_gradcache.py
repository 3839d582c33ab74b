"""Gradient caching: parameter gradients (encoders and logit scale) equal one backward through the same chunked
forward passes, with dropout on; the random state replays and ends where one pass leaves it."""

import pytest
import torch
from torch import nn

from florence_kernels.gradcache import gradcache_step
from florence_kernels.nn import UniCLLoss


class Encoder(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, d_out))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


def _models():
    torch.manual_seed(0)
    return Encoder(10, 8), Encoder(6, 8), UniCLLoss()


def _params(*mods):
    return [p for m in mods for p in m.parameters()]


@pytest.mark.parametrize("chunk", [1, 5, 12, 50])
def test_gradients_equal_one_backward_through_the_same_chunks(chunk):
    images, texts = torch.randn(12, 10), torch.randn(12, 6)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0, 2, 5, 3, 1])

    img, txt, loss_fn = _models()
    torch.manual_seed(123)
    # Reference: the same chunked forward passes (same dropout draws, in the same order), kept in one graph.
    u = torch.cat([img(c) for c in torch.split(images, chunk)])
    v = torch.cat([txt(c) for c in torch.split(texts, chunk)])
    ref_loss = loss_fn(u, v, labels)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in _params(img, txt, loss_fn)]
    ref_rng = torch.get_rng_state()

    img2, txt2, loss_fn2 = _models()
    torch.manual_seed(123)
    loss = gradcache_step(img2, txt2, images, texts, loss_fn2, chunk, labels)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # one pass's worth of random numbers consumed
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for a, b in zip(_params(img2, txt2, loss_fn2), ref_grads, strict=True):
        torch.testing.assert_close(a.grad, b, rtol=1e-5, atol=1e-7)


def test_dropout_masks_are_replayed():
    """Without the replay the second pass would draw new masks and the gradients would not match."""
    images, texts = torch.randn(8, 10), torch.randn(8, 6)
    img, txt, loss_fn = _models()
    torch.manual_seed(7)
    gradcache_step(img, txt, images, texts, loss_fn, 3)
    with_replay = [p.grad.clone() for p in img.parameters()]
    img.eval()  # no dropout at all: differs, so the masks mattered
    for p in _params(img, txt, loss_fn):
        p.grad = None
    torch.manual_seed(7)
    gradcache_step(img, txt, images, texts, loss_fn, 3)
    assert not all(torch.allclose(a, p.grad) for a, p in zip(with_replay, img.parameters(), strict=True))


def test_bad_arguments():
    img, txt, loss_fn = _models()
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        gradcache_step(img, txt, torch.randn(4, 10), torch.randn(4, 6), loss_fn, 0)
    with pytest.raises(ValueError, match="texts: expected 4 samples"):
        gradcache_step(img, txt, torch.randn(4, 10), torch.randn(3, 6), loss_fn, 2)
