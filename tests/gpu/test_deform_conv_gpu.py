"""modulated_deform_conv2d on a CUDA GPU: the CUDA kernel (shared bilinear code), the Triton implicit GEMM and the
grid_sample path against torchvision in float64 and against the float64 reference in low precision, DyHead shapes
and offsets that leave the image. Skipped without a GPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

tv_ops = pytest.importorskip("torchvision.ops")
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [  # (B, C_in, H, W), C_out, stride, groups, offset groups, offset scale
    ((2, 64, 25, 42), 64, 1, 1, 1, 2.0),  # P5-sized DyHead level, 64 channels
    ((1, 32, 13, 21), 48, 2, 2, 4, 6.0),  # strided, groups, offset groups, many taps outside the image
    ((2, 256, 7, 11), 256, 1, 1, 1, 1.0),  # P7 at DyHead's width
]


def _inputs(case, device="cuda"):
    shape, c_out, s, groups, og, scale = case
    B, C, H, W = shape
    Ho, Wo = (H + 2 - 3) // s + 1, (W + 2 - 3) // s + 1
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float64)
    off = scale * torch.randn(B, 2 * og * 9, Ho, Wo, generator=g, device=device, dtype=torch.float64)
    mask = torch.rand(B, og * 9, Ho, Wo, generator=g, device=device, dtype=torch.float64)
    w = 0.1 * torch.randn(c_out, C // groups, 3, 3, generator=g, device=device, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, device=device, dtype=torch.float64)
    return (x, off, mask, w, b), dict(stride=s, padding=1)


def _run(tensors, kw, dtype, backend):
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    x, off, mask, w, b = leaves
    if backend == "torchvision":
        out = tv_ops.deform_conv2d(x, off, w, b, mask=mask, **kw)
    else:
        out = fk.modulated_deform_conv2d(x, off, mask, w, b, backend=backend, **kw)
    g = torch.Generator(device=x.device).manual_seed(3)
    out.backward(torch.randn(out.shape, generator=g, device=x.device, dtype=torch.float64).to(dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_gpu_equals_torchvision_in_float64(case, backend):
    tensors, kw = _inputs(case)
    got, want = _run(tensors, kw, torch.float64, backend), _run(tensors, kw, torch.float64, "torchvision")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=f"{backend} {case[0]} tensor {i}")


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_gpu_low_precision_against_reference(case, dtype, backend):
    tensors, kw = _inputs(case)
    ref = _run(tensors, kw, torch.float64, "reference")
    low = _run(tensors, kw, dtype, "reference")
    out = _run(tensors, kw, dtype, backend)
    for i, (o, r, t) in enumerate(zip(out, ref, low, strict=True)):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"{backend} {case[0]} {dtype} tensor {i}")


def test_gpu_cuda_backend_is_chosen_automatically():
    tensors, kw = _inputs(CASES[0])
    x, off, mask, w, b = (t.float() for t in tensors)
    assert fk.OPS["modulated_deform_conv2d"].select([x, off, w]) == "cuda"


# Issue 13's edges on the GPU: the same inputs as tests/ops/test_deform_conv.py, every GPU backend against
# torchvision's CPU result in float64 (the convention is defined there; the NaN x offset crashes torchvision itself).
from tests.ops.test_deform_conv import (  # noqa: E402
    INTEGER_CASES,
    NAMES,
    NONFINITE,
    _id,
    _integer_inputs,
    _nonfinite_inputs,
    _run_tensors,
)

GPU_BACKENDS = ["cuda", "triton", "torch", "reference"]


def _compare_on_gpu(tensors, kw, backend, what):
    want = _run_tensors(tensors, kw, "torchvision", torch.float64)
    dt = torch.float32 if backend == "triton" else torch.float64
    got = _run_tensors([t.cuda() for t in tensors], kw, backend, dt)
    tol = 1e-4 if dt == torch.float32 else 1e-8
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol, equal_nan=True, msg=f"{what} {name}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", INTEGER_CASES, ids=lambda c: _id(c) + "-" + c[-1])
def test_gpu_integer_positions_follow_torchvision(case, backend):
    tensors, kw = _integer_inputs(case)
    _compare_on_gpu(tensors, kw, backend, f"{backend} {_id(case)}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("value,channel", NONFINITE, ids=lambda v: str(v))
def test_gpu_non_finite_offsets_follow_torchvision(value, channel, backend):
    tensors, kw = _nonfinite_inputs(value, channel)
    _compare_on_gpu(tensors, kw, backend, f"{backend} offset {value} on channel {channel}")
