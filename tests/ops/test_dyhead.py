"""Dynamic Head: dyrelu, scale_aware_attention and the fused scale_task_attention on every backend against the
literal references (output and gradients), DyReLU with neutral coefficients is ReLU, and DyHeadBlock / DyHead keep
every level's shape and differentiate (gradcheck of the whole block in float64)."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.nn import DyHead, DyHeadBlock, DyReLU
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import runnable_backends

DYRELU_BACKENDS = [b for b in runnable_backends("dyrelu", "cpu") if b != "reference"]
SCALE_BACKENDS = [b for b in runnable_backends("scale_aware_attention", "cpu") if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _dyrelu_run(x, y, dtype, backend):
    x, y = x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_()
    out = fk.dyrelu(x, y, backend=backend)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(dtype))
    return out, x.grad, y.grad


@pytest.mark.parametrize("backend", DYRELU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 7, 9), (1, 4, 33, 40)])
def test_dyrelu_against_reference(shape, dtype, backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.rand(shape[0], 4 * shape[1], 1, 1, generator=g, dtype=torch.float64)
    ref, low, out = (_dyrelu_run(x, y, dt, be) for dt, be in ((torch.float64, "reference"), (dtype, "reference"),
                                                              (dtype, backend)))  # fmt: skip
    for name, o, r, t in zip(("output", "grad x", "grad coefficients"), out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"dyrelu[{backend}] {shape} {dtype} {name}")


@pytest.mark.parametrize("backend", ["reference"] + DYRELU_BACKENDS)
def test_dyrelu_neutral_coefficients_is_relu(backend):
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(fk.dyrelu(x, torch.full((2, 24), 0.5), backend=backend), torch.relu(x))


@pytest.mark.parametrize("backend", SCALE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_scale_aware_against_reference(n_terms, dtype, backend):
    g = torch.Generator().manual_seed(n_terms)
    terms = [torch.randn(2, 16, 6, 7, generator=g, dtype=torch.float64) for _ in range(n_terms)]
    w, b = torch.randn(1, 16, 1, 1, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)

    def run(dt, be):
        leaves = [t.detach().to(dt).requires_grad_() for t in (*terms, w, b)]
        out = fk.scale_aware_attention(leaves[:n_terms], leaves[-2], leaves[-1], backend=be)
        out.backward(torch.ones_like(out))
        return [out] + [t.grad for t in leaves]

    ref, low, out = run(torch.float64, "reference"), run(dtype, "reference"), run(dtype, backend)
    for i, (o, r, t) in enumerate(zip(out, ref, low, strict=True)):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"scale_aware[{backend}] {dtype} tensor {i}")


def _pyramid(B=1, C=32, sizes=((20, 24), (10, 12), (5, 6), (3, 3)), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, C, h, w, generator=g, dtype=dtype) for h, w in sizes]


def test_dyhead_block_keeps_every_level_and_matches_reference_ops():
    torch.manual_seed(0)
    ref_blk = DyHeadBlock(32, backend="reference")
    with torch.no_grad():  # non-zero offsets, so the deformable sampling matters
        ref_blk.spatial_conv_offset.weight.normal_(0, 0.05)
    blk = DyHeadBlock(32)
    blk.load_state_dict(ref_blk.state_dict())
    levels = _pyramid()
    outs_ref, outs = ref_blk(levels), blk(levels)
    assert [o.shape for o in outs] == [x.shape for x in levels]
    for a, b in zip(outs, outs_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sum(o.square().sum() for o in outs).backward()
    assert all(p.grad is not None for p in blk.parameters() if p.requires_grad)


def test_dyhead_block_gradcheck_float64():
    torch.manual_seed(0)
    blk = DyHeadBlock(16).double()
    with torch.no_grad():
        blk.spatial_conv_offset.weight.normal_(0, 0.05)
    levels = [x.requires_grad_() for x in _pyramid(C=16, sizes=((6, 6), (3, 3)), dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: sum(o.sum() for o in blk([a, b])), tuple(levels), atol=1e-6)


def test_dyhead_six_blocks_and_state_dict_names():
    head = DyHead(32, num_blocks=6)
    levels = _pyramid(sizes=((8, 8), (4, 4), (2, 2)))
    assert [o.shape for o in head(levels)] == [x.shape for x in levels]
    keys = set(DyHeadBlock(32).state_dict())
    expected = {
        "spatial_conv_mid.conv.weight",
        "spatial_conv_low.norm.weight",
        "spatial_conv_offset.weight",
        "scale_attn_module.1.weight",
        "task_attn_module.conv1.conv.weight",
        "task_attn_module.conv2.conv.bias",
    }
    assert expected <= keys, expected - keys


def test_dyrelu_module_neutral_is_relu():
    mod = DyReLU(8)
    for p in mod.parameters():
        torch.nn.init.zeros_(p)  # conv2 outputs 0 -> hard_sigmoid(0) = 0.5 everywhere
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(mod(x), torch.relu(x))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"coefficients: expected \(B, 4C\) = \(2, 32\)"):
        fk.dyrelu(torch.randn(2, 8, 3, 3), torch.rand(2, 8))
    with pytest.raises(ValueError, match=r"terms\[1\]: expected shape \(1, 4, 3, 3\)"):
        fk.scale_aware_attention([torch.randn(1, 4, 3, 3), torch.randn(1, 4, 2, 3)], torch.randn(4), torch.zeros(1))


SCALE_TASK_BACKENDS = [b for b in runnable_backends("scale_task_attention", "cpu") if b != "reference"]


@pytest.mark.parametrize("backend", SCALE_TASK_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_scale_task_against_reference(n_terms, dtype, backend):
    """Fused level: every term (one of them a cropped, strided view), pi and the coefficients get gradients."""
    g = torch.Generator().manual_seed(10 + n_terms)
    terms = [torch.randn(2, 16, 6, 7, generator=g, dtype=torch.float64) for _ in range(n_terms - 1)]
    big = torch.randn(2, 16, 7, 9, generator=g, dtype=torch.float64)  # cropped to 6x7 below: not contiguous
    pi = torch.rand(2, n_terms, generator=g, dtype=torch.float64)
    coeffs = torch.rand(2, 64, generator=g, dtype=torch.float64)
    coeffs[0, :8] = 0.5  # neutral a1 / b1 entries: ties between the two affine maps in some planes
    coeffs[0, 32:40] = 0.5

    def run(dt, be):
        leaves = [t.detach().to(dt).requires_grad_() for t in (*terms, big, pi, coeffs)]
        ts = leaves[: n_terms - 1] + [leaves[n_terms - 1][..., :6, :7]]
        out = fk.scale_task_attention(ts, leaves[-2], leaves[-1], backend=be)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dt))
        return [out] + [t.grad for t in leaves]

    ref, low, out = run(torch.float64, "reference"), run(dtype, "reference"), run(dtype, backend)
    for i, (o, r, t) in enumerate(zip(out, ref, low, strict=True)):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"scale_task[{backend}] {dtype} tensor {i}")


def test_scale_task_equals_scale_aware_then_dyrelu():
    """With pi computed from the terms, the fused op is scale_aware_attention followed by dyrelu."""
    g = torch.Generator().manual_seed(0)
    terms = [torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    w, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)
    coeffs = torch.rand(2, 32, generator=g, dtype=torch.float64)
    pi = torch.stack([fk.ops.dyhead.hard_sigmoid(torch.relu(t.mean((2, 3)) @ w + b)) for t in terms], 1)
    want = fk.dyrelu(fk.scale_aware_attention(terms, w, b), coeffs)
    torch.testing.assert_close(fk.scale_task_attention(terms, pi, coeffs), want)


def test_scale_task_bad_input_names_the_argument():
    t = torch.randn(2, 8, 5, 5)
    with pytest.raises(ValueError, match=r"pi: expected shape \(2, 2\)"):
        fk.scale_task_attention([t, t], torch.rand(2, 3), torch.rand(2, 32))
    with pytest.raises(ValueError, match=r"coefficients: expected \(B, 4C\) = \(2, 32\)"):
        fk.scale_task_attention([t], torch.rand(2, 1), torch.rand(2, 16))
    with pytest.raises(ValueError, match=r"terms: expected a list of 1 to 3"):
        fk.scale_task_attention([t] * 4, torch.rand(2, 4), torch.rand(2, 32))


BLOCK_BACKENDS = [
    b
    for b in ("triton", "cpp")
    if b in runnable_backends("scale_task_attention", "cpu") or b in runnable_backends("modulated_deform_conv2d", "cpu")
]


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_dyhead_block_with_a_module_wide_backend_matches_reference(backend):
    """A module-wide backend reaches every op that has it (deform conv, the fused level), forward and backward."""
    torch.manual_seed(0)
    ref_blk = DyHeadBlock(32, backend="reference")
    with torch.no_grad():
        ref_blk.spatial_conv_offset.weight.normal_(0, 0.05)
    blk = DyHeadBlock(32, backend=backend)
    blk.load_state_dict(ref_blk.state_dict())
    levels = _pyramid(sizes=((10, 12), (5, 6), (3, 3)))
    grads = []
    for m in (blk, ref_blk):
        xs = [x.clone().requires_grad_() for x in levels]
        outs = m(xs)
        sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
        grads.append([outs, [x.grad for x in xs], [p.grad for p in m.parameters()]])
    for a, b in zip(sum(grads[0], []), sum(grads[1], []), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
