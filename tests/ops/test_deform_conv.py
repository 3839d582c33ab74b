"""modulated_deform_conv2d: every backend against torchvision.ops.deform_conv2d directly (output and the gradients
of input, offset, mask, weight and bias), offsets that sample outside the image, groups and offset groups; zero
offsets with mask 1 equal a plain convolution."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import runnable_backends

tv_ops = pytest.importorskip("torchvision.ops")
BACKENDS = [b for b in runnable_backends("modulated_deform_conv2d", "cpu")]
FP64_BACKENDS = [b for b in BACKENDS if torch.float64 in fk.OPS["modulated_deform_conv2d"].backends[b].dtypes]
FP32_ONLY = [b for b in BACKENDS if b not in FP64_BACKENDS]  # triton: compared with torchvision in fp32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (B, C_in, H, W), C_out, kernel, stride, padding, dilation, groups, offset groups, offset scale
CASES = [
    ((2, 8, 9, 11), 6, 3, 1, 1, 1, 1, 1, 2.0),
    ((1, 8, 10, 7), 8, 3, 2, 1, 1, 2, 2, 4.0),  # groups and offset groups, strided
    ((1, 4, 6, 6), 4, 3, 1, 2, 2, 1, 4, 6.0),  # dilation; large offsets: many taps land outside the image
    ((2, 6, 5, 8), 3, (1, 3), 1, (0, 1), 1, 3, 3, 1.5),  # non-square kernel
]


def _id(case):
    return "x".join(map(str, case[0])) + f"-o{case[1]}-k{case[2]}-s{case[3]}-g{case[6]}-og{case[7]}".replace(" ", "")


def _inputs(case):
    shape, c_out, k, s, p, d, groups, og, scale = case
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (p, p) if isinstance(p, int) else p
    B, C, H, W = shape
    H_out = (H + 2 * ph - d * (kh - 1) - 1) // s + 1
    W_out = (W + 2 * pw - d * (kw - 1) - 1) // s + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    offset = scale * torch.randn(B, 2 * og * kh * kw, H_out, W_out, generator=g, dtype=torch.float64)
    mask = torch.rand(B, og * kh * kw, H_out, W_out, generator=g, dtype=torch.float64)
    weight = 0.3 * torch.randn(c_out, C // groups, kh, kw, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return (x, offset, mask, weight, bias), dict(stride=s, padding=p, dilation=d)


def _run(case, dtype, backend):
    tensors, kw = _inputs(case)
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    x, offset, mask, weight, bias = leaves
    if backend == "torchvision":
        out = tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    else:
        out = fk.modulated_deform_conv2d(x, offset, mask, weight, bias, backend=backend, **kw)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_equals_torchvision_in_float64(case, backend):
    got, want = _run(case, torch.float64, backend), _run(case, torch.float64, "torchvision")
    names = ("output", "grad input", "grad offset", "grad mask", "grad weight", "grad bias")
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"{backend} {_id(case)} {name}")


@pytest.mark.parametrize("backend", FP32_ONLY)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_backends_equal_torchvision(case, backend):
    """Backends without float64 (triton) against torchvision's float64 result, at fp32's accuracy."""
    got, want = _run(case, torch.float32, backend), _run(case, torch.float64, "torchvision")
    names = ("output", "grad input", "grad offset", "grad mask", "grad weight", "grad bias")
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"{backend} {_id(case)} {name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:2], ids=_id)
def test_low_precision_against_reference(case, dtype, backend):
    ref = _run(case, torch.float64, "reference")
    low = _run(case, dtype, "reference")
    out = _run(case, dtype, backend)
    names = ("output", "grad input", "grad offset", "grad mask", "grad weight", "grad bias")
    for name, o, r, t in zip(names, out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"{backend} {_id(case)} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_offsets_and_unit_mask_equal_a_plain_convolution(backend):
    dt = torch.float64 if backend in FP64_BACKENDS else torch.float32
    x = torch.randn(2, 8, 9, 9, dtype=dt)
    w = torch.randn(4, 4, 3, 3, dtype=dt)
    b = torch.randn(4, dtype=dt)
    offset = torch.zeros(2, 2 * 2 * 9, 5, 5, dtype=dt)
    mask = torch.ones(2, 2 * 9, 5, 5, dtype=dt)
    out = fk.modulated_deform_conv2d(x, offset, mask, w, b, stride=2, padding=1, backend=backend)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, b, stride=2, padding=1, groups=2))


def test_bad_input_names_the_argument():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"offset: expected \(B=1, 2 \* offset_groups \* 9, 6, 6\)"):
        fk.modulated_deform_conv2d(x, torch.zeros(1, 17, 6, 6), None, w, padding=1)
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 9, 6, 6\)"):
        fk.modulated_deform_conv2d(x, torch.zeros(1, 18, 6, 6), torch.ones(1, 8, 6, 6), w, padding=1)
    with pytest.raises(ValueError, match=r"offset: 3 offset groups do not divide the 4 input channels"):
        fk.modulated_deform_conv2d(x, torch.zeros(1, 54, 6, 6), None, w, padding=1)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="florence_kernels._C is not built")
def test_cpp_custom_op_opcheck_and_extension_checks():
    from florence_kernels.ops.deform_conv import _dcn_cpp_op

    tensors, kw = _inputs(CASES[1])
    x, offset, mask, weight, bias = (t.float().requires_grad_() for t in tensors)
    args = (x, offset, mask, weight, bias, [2, 2], [1, 1], [1, 1])
    torch.library.opcheck(_dcn_cpp_op, args, test_utils=("test_schema", "test_faketensor",
                                                         "test_autograd_registration"))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"offset: expected \(B=1, 2 \* offset_groups \* 9"):
        torch.ops.florence_kernels_C.deform_conv2d_fwd(x, offset[:, :5], None, weight, None, [2, 2], [1, 1], [1, 1])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="florence_kernels._C is not built")
def test_dyhead_block_on_cpp_matches_reference():
    from florence_kernels.nn import DyHeadBlock

    torch.manual_seed(0)
    ref = DyHeadBlock(32, backend="reference")
    with torch.no_grad():
        ref.spatial_conv_offset.weight.normal_(0, 0.05)
    blk = DyHeadBlock(32, backend="cpp")  # ops without a cpp backend choose automatically
    blk.load_state_dict(ref.state_dict())
    levels = [torch.randn(1, 32, 12, 10), torch.randn(1, 32, 6, 5)]
    for a, b in zip(blk(levels), ref(levels), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
