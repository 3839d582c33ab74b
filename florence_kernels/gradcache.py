"""Gradient caching (Gao et al. 2021): contrastive training at a batch larger than the encoders' activations fit.

    loss = gradcache_step(image_encoder, text_encoder, images, texts, loss_fn, chunk_size, labels)
    optimizer.step()

1. Both encoders run chunk by chunk without autograd; only the (N, D) embeddings are kept.
2. The loss (e.g. :class:`florence_kernels.nn.UniCLLoss`, whose logit scale gets its gradient here) and its gradient
   with respect to the embeddings are computed on the whole batch.
3. Each chunk runs again with autograd and backpropagates its slice of the cached embedding gradient into the
   encoder's parameters (accumulating into ``.grad``, like ``loss.backward()``).

The random state (CPU and the CUDA devices of the inputs) is recorded before each chunk's first run and restored for
its second, so dropout and drop-path draw the same masks in both runs; after the step the random state is where one
pass over the chunks leaves it. Encoder memory is that of one chunk; the contrastive loss itself is tiled
(:func:`florence_kernels.contrastive_loss`), so nothing of size N x N exists either. Cost: one extra forward.

Parameter gradients equal those of one backward through the same chunked forward passes (tested with dropout on):
chunking changes nothing but which activations are alive at once. (A single un-chunked forward would draw its
dropout masks in one call, so its masks, not its mathematics, differ.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["gradcache_step", "RngState"]


class RngState:
    """The CPU random state and that of the given CUDA devices, to restore later."""

    def __init__(self, cuda_devices: list[int]):
        self.cuda_devices = cuda_devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.cuda_devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, d)


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(x, size, dim=0))


def gradcache_step(
    image_encoder: Callable[[torch.Tensor], torch.Tensor],
    text_encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward/backward of ``loss_fn(image_encoder(images), text_encoder(texts)[, labels])`` with encoder memory
    bounded by ``chunk_size`` samples. Gradients accumulate into the parameters; returns the loss (detached).

    Args:
        image_encoder, text_encoder: modules (or callables) mapping a chunk of inputs to (n, D) embeddings.
        images, texts: batches split along dim 0 (same length N).
        loss_fn: ``loss_fn(image_emb, text_emb)`` or, when labels are given, ``loss_fn(image_emb, text_emb, labels)``.
        chunk_size: samples per encoder run (>= 1).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    for name, x in (("images", images), ("texts", texts)):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"{name}: expected a batched tensor, got {type(x).__name__}")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"texts: expected {images.shape[0]} samples (as images), got {texts.shape[0]}")
    devices = sorted({t.device.index or 0 for t in (images, texts) if t.is_cuda})
    jobs = [(image_encoder, c) for c in _chunks(images, chunk_size)] + [
        (text_encoder, c) for c in _chunks(texts, chunk_size)
    ]

    # 1. Embeddings without autograd, recording the random state before each chunk.
    states, embeddings = [], []
    with torch.no_grad():
        for encoder, chunk in jobs:
            states.append(RngState(devices))
            embeddings.append(encoder(chunk))
    after = RngState(devices)

    # 2. The loss and its gradient with respect to the embeddings.
    n_img = len(_chunks(images, chunk_size))
    u = torch.cat(embeddings[:n_img]).requires_grad_()
    v = torch.cat(embeddings[n_img:]).requires_grad_()
    loss = loss_fn(u, v) if labels is None else loss_fn(u, v, labels)
    loss.backward()
    grads = list(torch.split(u.grad, chunk_size)) + list(torch.split(v.grad, chunk_size))

    # 3. Each chunk again, with autograd and the same random masks, backpropagating its cached gradient.
    for (encoder, chunk), state, grad in zip(jobs, states, grads, strict=True):
        state.restore()
        torch.autograd.backward(encoder(chunk), grad)
    after.restore()
    return loss.detach()
