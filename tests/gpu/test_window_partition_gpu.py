"""window_partition on a CUDA GPU: the cuda and triton backends (compiled, not interpreted) bit-exact against the
reference, at the benchmark shapes too. Skipped with a reason where no GPU is present."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.ops.window_partition import window_partition_reference, window_reverse_reference
from florence_kernels.testing import assert_bit_exact

pytestmark = pytest.mark.gpu

CASES = [
    ((2, 14, 14, 8), (7, 7), (3, 3)),
    ((2, 9, 11, 5), (4, 4), (2, 1)),
    ((1, 5, 6, 3), (7, 7), (3, 3)),
    ((2, 4, 14, 14, 8), (2, 7, 7), (1, 3, 3)),
    ((1, 3, 9, 10, 6), (2, 4, 4), (1, 2, 3)),
    ((2, 5, 6, 7, 4), (8, 7, 7), (4, 3, 3)),
    ((4, 56, 56, 96), (7, 7), (3, 3)),  # Swin-T stage 1
    ((1, 16, 56, 56, 96), (8, 7, 7), (4, 3, 3)),  # Video Swin stage 1
    ((2, 8, 8, 300), (4, 4), (2, 2)),  # C > 256: several channel blocks
]


def _to5(shape, window, shift):
    if len(shape) == 4:
        return (shape[0], 1, *shape[1:]), (1, *window), (0, *shift)
    return shape, window, shift


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_gpu_backends_bit_exact(case, dtype, backend):
    shape, window, shift = case
    x = torch.randn(shape, device="cuda", dtype=dtype)
    x5_shape, w3, s3 = _to5(shape, window, shift)
    xr = x.reshape(x5_shape).clone().requires_grad_()
    xk = x.clone().requires_grad_()
    ref = window_partition_reference(xr, w3, s3)
    out = fk.window_partition(xk, window, shift, backend=backend)
    assert_bit_exact(out, ref, what=f"{backend} {shape} {dtype} forward")
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert_bit_exact(xk.grad.reshape(x5_shape), xr.grad, what=f"{backend} {shape} {dtype} grad")
    back = fk.window_reverse(ref.detach(), window, shape, shift, backend=backend)
    assert_bit_exact(back.reshape(x5_shape), window_reverse_reference(ref.detach(), w3, x5_shape[:4], s3))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_noncontiguous(backend):
    qkv = torch.randn(2, 4, 14, 14, 3, 4, 16, device="cuda", dtype=torch.bfloat16)
    for x in (qkv[:, :, :, :, 0, 1], qkv.flatten(-3)[..., 64:128], qkv.flatten(-3).permute(0, 1, 3, 2, 4)):
        assert_bit_exact(
            fk.window_partition(x, (2, 7, 7), (1, 3, 3), backend=backend),
            window_partition_reference(x, (2, 7, 7), (1, 3, 3)),
        )


def test_gpu_automatic_choice_is_cuda():
    assert fk.OPS["window_partition"].select([torch.zeros(1, 7, 7, 4, device="cuda")]) == "cuda"
