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


# --- edges from the field (issue 13): integer positions, non-finite offsets, 16-bit reference ----------------------

# Offsets that put every tap exactly on a pixel (DyHead starts with a zero-initialised offset conv), including taps on
# row/column -1 and on the last row/column: torchvision's offset gradient is the one-sided derivative towards the
# increasing coordinate there. (B, C_in, H, W), C_out, kernel, stride, padding, dilation, groups, offset groups, fill
INTEGER_CASES = [
    ((1, 1, 5, 5), 1, 3, 1, 1, 1, 1, 1, "zeros"),  # the input from the field report
    ((1, 1, 5, 5), 1, 3, 1, 1, 1, 1, 1, "ones"),
    ((1, 1, 5, 5), 1, 3, 1, 1, 1, 1, 1, "minus_ones"),
    ((2, 4, 7, 6), 4, 3, 2, 1, 1, 2, 2, "integers"),  # strided, groups, offset groups
    ((1, 4, 8, 8), 2, 3, 1, 2, 2, 1, 4, "integers"),  # dilation, 4 offset groups
    ((1, 3, 6, 9), 3, (1, 3), 1, (0, 2), 1, 1, 3, "half_integers"),  # non-square kernel, x on half pixels
]


def _integer_inputs(case, dtype=torch.float64):
    shape, c_out, k, s, p, d, groups, og, fill = case
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (p, p) if isinstance(p, int) else p
    B, C, H, W = shape
    H_out = (H + 2 * ph - d * (kh - 1) - 1) // s + 1
    W_out = (W + 2 * pw - d * (kw - 1) - 1) // s + 1
    g = torch.Generator().manual_seed(1)
    oshape = (B, 2 * og * kh * kw, H_out, W_out)
    offset = {
        "zeros": torch.zeros(oshape),
        "ones": torch.ones(oshape),
        "minus_ones": -torch.ones(oshape),
        "integers": torch.randint(-3, 4, oshape, generator=g).double(),
        "half_integers": torch.randint(-6, 7, oshape, generator=g).double() / 2,
    }[fill]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(B, og * kh * kw, H_out, W_out, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, C // groups, kh, kw, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, offset, mask, weight, bias)], dict(stride=s, padding=p, dilation=d)


def _run_tensors(tensors, kw, backend, dtype, grad_seed=3):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    x, offset, mask, weight, bias = leaves
    if backend == "torchvision":
        out = tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    else:
        out = fk.modulated_deform_conv2d(x, offset, mask, weight, bias, backend=backend, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.device, dtype))
    return [out] + [t.grad for t in leaves]


NAMES = ("output", "grad input", "grad offset", "grad mask", "grad weight", "grad bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", INTEGER_CASES, ids=lambda c: _id(c) + "-" + c[-1])
def test_integer_positions_follow_torchvision(case, backend):
    tensors, kw = _integer_inputs(case)
    want = _run_tensors(tensors, kw, "torchvision", torch.float64)
    dt = torch.float64 if backend in FP64_BACKENDS else torch.float32
    got = _run_tensors(tensors, kw, backend, dt)
    tol = 1e-9 if dt == torch.float64 else 1e-4
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=f"{backend} {_id(case)} {name}")


def test_integer_position_gradient_value_from_the_field_report():
    """x (1, 1, 5, 5), 3x3, padding 1, zero offsets, unit mask: at a tap on row -1 the offset gradient is the slope
    towards row 0 (torchvision), not 0 (mmcv's convention)."""
    tensors, kw = _integer_inputs(INTEGER_CASES[0])
    tensors[2] = torch.ones_like(tensors[2])
    want = _run_tensors(tensors, kw, "torchvision", torch.float64)[2]
    # output row 0, tap i = 0 samples row -1: its y gradient is nonzero in torchvision's convention
    assert want[0, 0, 0].abs().max() > 0.1
    for backend in BACKENDS:
        dt = torch.float64 if backend in FP64_BACKENDS else torch.float32
        got = _run_tensors(tensors, kw, backend, dt)[2]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=backend)


def _nonfinite_inputs(value, channel):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    offset = torch.randn(1, 18, 6, 6, generator=g, dtype=torch.float64)
    offset[0, 8 + channel, 2, 3] = value  # tap 4 (the centre) at output (2, 3): its y (channel 0) or x offset
    mask = torch.rand(1, 9, 6, 6, generator=g, dtype=torch.float64)
    return [x, offset, mask, weight, bias], dict(padding=1)


# torchvision itself reads out of bounds for a NaN x offset (it crashed here): that case is checked against the
# documented rule below instead.
NONFINITE = [(float("inf"), 0), (float("inf"), 1), (float("-inf"), 0), (float("-inf"), 1), (float("nan"), 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value,channel", NONFINITE, ids=lambda v: str(v))
def test_non_finite_offsets_follow_torchvision(value, channel, backend):
    tensors, kw = _nonfinite_inputs(value, channel)
    want = _run_tensors(tensors, kw, "torchvision", torch.float64)
    dt = torch.float64 if backend in FP64_BACKENDS else torch.float32
    got = _run_tensors(tensors, kw, backend, dt)
    tol = 1e-9 if dt == torch.float64 else 1e-4
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, equal_nan=True, msg=f"{backend} {name}")
    if value == float("inf") or value == float("-inf"):
        assert torch.isfinite(got[0]).all(), "an infinite offset puts the tap outside: it reads 0"
    else:
        assert torch.isnan(got[0][0, :, 2, 3]).all() and torch.isfinite(got[0]).sum() == got[0].numel() - 3
    assert torch.isfinite(got[1]).all(), "the input gradient ignores non-finite taps"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_x_offset_is_the_transpose_of_nan_y(backend):
    """The rule for a NaN coordinate, on the axis torchvision cannot run: the tap reads NaN, the input gradient
    ignores it, its offset gradient is 0 for the NaN coordinate and NaN for the other one."""
    tensors, kw = _nonfinite_inputs(float("nan"), 1)
    dt = torch.float64 if backend in FP64_BACKENDS else torch.float32
    out, gx, goff, gmask, gw, _ = _run_tensors(tensors, kw, backend, dt)
    assert torch.isnan(out[0, :, 2, 3]).all() and torch.isfinite(out).sum() == out.numel() - 3
    assert torch.isfinite(gx).all()
    assert goff[0, 9, 2, 3] == 0 and torch.isnan(goff[0, 8, 2, 3])
    assert torch.isnan(gmask[0, 4, 2, 3]) and torch.isfinite(gmask).sum() == gmask.numel() - 1
    assert torch.isnan(gw[:, :, 1, 1]).all() and torch.isfinite(gw).sum() == gw.numel() - 6  # the centre tap's column
    finite = torch.ones_like(goff, dtype=torch.bool)
    finite[0, 8:10, 2, 3] = False
    assert torch.isfinite(goff[finite]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_computes_coordinates_in_fp32(dtype):
    """The yardstick itself: its 16-bit result (inputs representable in 16 bits) is the fp64 one rounded, not one
    computed with 16-bit coordinates (a bf16 coordinate near 40 has a step of 0.25)."""
    g = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(1, 4, 40, 40, generator=g),
        3 * torch.randn(1, 18, 40, 40, generator=g),
        torch.rand(1, 9, 40, 40, generator=g),
        torch.randn(4, 4, 3, 3, generator=g),
        torch.randn(4, generator=g),
    ]
    tensors = [t.to(dtype).double() for t in tensors]  # exactly representable in the 16-bit dtype
    want = _run_tensors(tensors, dict(padding=1), "torchvision", torch.float64)
    got = _run_tensors(tensors, dict(padding=1), "reference", dtype)
    for name, a, b in zip(NAMES, got, want, strict=True):
        err = (a.double() - b).abs().max().item()
        bound = 0.02 * b.abs().max().item() + 0.05  # 16-bit rounding of inputs, outputs and the output gradient
        assert err <= bound, f"reference {dtype} {name}: max error {err:.3g} > {bound:.3g}"
