"""conv_embed: every backend against the literal reference (output and gradients of x, conv and norm parameters,
tolerance rule of ../shared/KERNELS.md), 2-D and 3-D, both input layouts, odd sizes; the module and Florence's
inflation (a clip of one repeated frame gives the 2-D result on every time slice)."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.nn import ConvEmbed, inflate_from_2d
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import runnable_backends

CPU_BACKENDS = [b for b in runnable_backends("conv_embed", "cpu") if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (input shape channels-first, C_out, kernel, stride, padding)
CASES = [
    ((2, 3, 29, 31), 16, 7, 4, 2),  # CoSwin stem, odd sizes
    ((1, 8, 13, 14), 16, 3, 2, 1),  # patch merge
    ((1, 3, 5, 18, 17), 8, (2, 7, 7), (2, 4, 4), (0, 2, 2)),  # Video CoSwin stem
    ((2, 4, 4, 9, 10), 8, 3, (1, 2, 2), 1),  # Video CoSwin merge
]


def _id(case):
    shape, c_out, k, s, p = case
    return f"{'x'.join(map(str, shape))}-o{c_out}-k{k}-s{s}-p{p}".replace(" ", "")


def _params(case):
    shape, c_out, k, s, p = case
    spatial = len(shape) - 2
    k = (k,) * spatial if isinstance(k, int) else k
    g = torch.Generator().manual_seed(0)
    w = torch.randn(c_out, shape[1], *k, generator=g, dtype=torch.float64) * 0.2
    return w, torch.randn(c_out, generator=g, dtype=torch.float64), 1 + 0.1 * torch.randn(c_out, generator=g,
                                                                                          dtype=torch.float64), \
        0.1 * torch.randn(c_out, generator=g, dtype=torch.float64)  # fmt: skip


def _run(case, dtype, backend, layout):
    shape, c_out, k, s, p = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    leaves = [t.to(dtype).requires_grad_() for t in (x, *_params(case))]
    out = fk.conv_embed(*leaves, stride=s, padding=p, input_layout=layout, backend=backend)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backends_against_reference(case, dtype, backend, layout):
    ref = _run(case, torch.float64, "reference", layout)
    low = _run(case, dtype, "reference", layout)
    out = _run(case, dtype, backend, layout)
    names = ("output", "grad x", "grad weight", "grad bias", "grad norm weight", "grad norm bias")
    for name, o, r, t in zip(names, out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"conv_embed[{backend}] {_id(case)} {layout} "
                                                                  f"{dtype} {name}")  # fmt: skip


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_torch_channels_last_cpu_path_against_reference(case, dtype, layout, monkeypatch):
    """The test shapes are small, so the torch backend convolves channels-first on the CPU; force the channels-last
    convolution (taken from CPU_CHANNELS_LAST_MIN_ROWS output positions on) and check it as well."""
    from florence_kernels.ops import conv_embed as ce

    monkeypatch.setattr(ce, "CPU_CHANNELS_LAST_MIN_ROWS", 0)
    ref = _run(case, torch.float64, "reference", layout)
    low = _run(case, dtype, "reference", layout)
    out = _run(case, dtype, "torch", layout)
    names = ("output", "grad x", "grad weight", "grad bias", "grad norm weight", "grad norm bias")
    for name, o, r, t in zip(names, out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"conv_embed[torch channels-last conv] "
                                                                  f"{_id(case)} {layout} {dtype} {name}")  # fmt: skip


def test_output_is_contiguous_tokens_and_channels_last_input_is_not_copied():
    w, b, nw, nb = (t.float() for t in _params(CASES[1]))
    x = torch.randn(1, 13, 14, 8)
    out = fk.conv_embed(x, w, b, nw, nb, stride=2, padding=1, backend="torch")
    assert out.shape == (1, 7, 7, 16) and out.is_contiguous()
    assert fk.conv_embed(x.movedim(-1, 1), w, b, nw, nb, stride=2, padding=1).equal(out)  # same either way in


def test_layout_errors_name_the_argument():
    w, b, nw, nb = (t.float() for t in _params(CASES[1]))  # C_in = 8
    with pytest.raises(ValueError, match=r"x: shape \(1, 8, 5, 8\) has C_in = 8 on both axis 1 and the last axis"):
        fk.conv_embed(torch.randn(1, 8, 5, 8), w, b, nw, nb, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"x: expected C_in = 8"):
        fk.conv_embed(torch.randn(1, 5, 6, 7), w, b, nw, nb, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"norm_bias: expected shape \(16,\)"):
        fk.conv_embed(torch.randn(1, 8, 6, 7), w, b, nw, nb[:3], stride=2, padding=1)
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor for a 2-D convolution"):
        fk.conv_embed(torch.randn(8, 6, 7), w, b, nw, nb, stride=2, padding=1)


def test_inflation_of_one_repeated_frame_gives_the_2d_result():
    torch.manual_seed(0)
    emb2 = ConvEmbed(3, 16, 7, 4, 2, dims=2)
    emb3 = ConvEmbed(3, 16, (2, 7, 7), (2, 4, 4), (0, 2, 2), dims=3)
    emb3.load_inflated(emb2.state_dict())
    frame = torch.randn(2, 3, 32, 32)
    clip = frame.unsqueeze(2).repeat(1, 1, 6, 1, 1)  # (B, C, T, H, W)
    with torch.no_grad():
        y2, y3 = emb2(frame), emb3(clip)
    assert y3.shape == (2, 3, 8, 8, 16)
    for t in range(3):
        torch.testing.assert_close(y3[:, t], y2, rtol=1e-5, atol=1e-5)
    sd = inflate_from_2d(emb2.state_dict(), 2)
    assert sd["proj.weight"].shape == (16, 3, 2, 7, 7) and torch.equal(sd["norm.weight"], emb2.norm.weight)
    with pytest.raises(ValueError, match="temporal_kernel"):
        inflate_from_2d(emb2.state_dict(), 0)


def test_triton_custom_op_opcheck():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not runnable on CPU here")
    from florence_kernels.ops.conv_embed import _conv_embed_triton_op

    w, b, nw, nb = (t.float().requires_grad_() for t in _params(CASES[1]))
    x = torch.randn(1, 13, 14, 8, requires_grad=True)
    args = (x, w, b, nw, nb, [2, 2], [1, 1], 1e-5, "channels_last")
    torch.library.opcheck(_conv_embed_triton_op, args, test_utils=("test_schema", "test_faketensor",
                                                                   "test_autograd_registration"))  # fmt: skip


def test_triton_refuses_more_than_512_channels_and_says_why():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not runnable on CPU here")
    x, w = torch.randn(1, 8, 6, 6), torch.randn(600, 8, 3, 3)
    with pytest.raises(fk.BackendNotSupportedError, match="C_out 600 > 512: the LayerNorm epilogue needs all channels"):
        fk.conv_embed(x, w, None, None, None, stride=2, padding=1, backend="triton")
