"""contrastive_loss on a CUDA GPU: the compiled Triton kernels and the tiled torch path against a float64 reference
(loss and every gradient), and the memory claim at a batch where the naive loss cannot fit. Skipped without a GPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _run(u, v, labels, dtype, backend):
    u = u.to(dtype).requires_grad_()
    v = v.to(dtype).requires_grad_()
    t = torch.tensor(1 / 0.07, device=u.device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=True)  # fmt: skip
    loss = fk.contrastive_loss(u, v, t, labels, backend=backend)
    loss.backward()
    return loss, u.grad, v.grad, t.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,D,unicl", [(4099, 512, True), (1000, 256, False), (1, 64, True), (333, 40, True)])
def test_gpu_against_reference(N, D, unicl, dtype, backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g, dtype=torch.float64), dim=1)
    v = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, max(1, N // 4), (N,), device="cuda", generator=g) if unicl else None
    ref = _run(u, v, labels, torch.float64, "reference")
    low = _run(u, v, labels, dtype, "reference")
    out = _run(u, v, labels, dtype, backend)
    for name, o, r, t in zip(("loss", "grad image", "grad text", "grad scale"), out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"{backend} N={N} D={D} {dtype} {name}")


def test_gpu_batch_262144_fits_in_linear_memory():
    """N = 262,144 at D = 512 in bf16: the logits alone would take 137 GB in fp16; the tiled loss needs O(N D)."""
    N, D = 262_144, 512
    u = torch.nn.functional.normalize(torch.randn(N, D, device="cuda"), dim=1).bfloat16().requires_grad_()
    v = torch.nn.functional.normalize(torch.randn(N, D, device="cuda"), dim=1).bfloat16().requires_grad_()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fk.contrastive_loss(u, v, torch.tensor(1 / 0.07, device="cuda"), backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and extra < 8 * N * D * 4, extra  # a few (N, D) fp32 buffers, nothing N x N
