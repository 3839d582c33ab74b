"""window_attention: every backend against the literal reference (FlashAttention's tolerance rule), output and all
four gradients; the torch path equal to the reference bit for bit on CPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.ops.window_attention import (
    attention_masks,
    bias_table_rows,
    relative_position_index,
    window_attention_reference,
)
from florence_kernels.ops.window_partition import resolve_geometry
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import runnable_backends

CPU_BACKENDS = [b for b in runnable_backends("window_attention", "cpu") if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (grid (B, T, H, W), heads, head_dim, window, shift). Small: the Triton interpreter runs these on CPU.
CASES = [
    ((1, 1, 6, 6), 2, 16, (3, 3), (0, 0)),  # 2-D, no shift
    ((2, 1, 6, 6), 2, 16, (3, 3), (1, 1)),  # 2-D, shifted
    ((1, 1, 5, 7), 2, 16, (3, 3), (1, 2)),  # 2-D, padding
    ((1, 2, 6, 6), 2, 16, (2, 3, 3), (1, 1, 1)),  # 3-D, shifted
    ((1, 3, 7, 5), 2, 32, (2, 3, 3), (1, 1, 2)),  # 3-D, padding on every axis
    ((1, 2, 5, 6), 1, 16, (4, 3, 3), (2, 1, 1)),  # time shrinks (T <= Wt): shift drops on T only
    ((1, 1, 3, 4), 2, 16, (7, 7), (3, 3)),  # input smaller than the window
]


def _id(case):
    grid, nh, hd, w, s = case
    return f"{'x'.join(map(str, grid))}-h{nh}-d{hd}-w{''.join(map(str, w))}-s{''.join(map(str, s))}"


def _inputs(case, dtype, bias=True, device="cpu"):
    (B, T, H, W), nh, hd, window, shift = case
    shape = (B, H, W, 3, nh, hd) if len(window) == 2 else (B, T, H, W, 3, nh, hd)
    qkv = torch.randn(shape, device=device, dtype=torch.float32)
    w3 = (1, *window) if len(window) == 2 else window
    table = torch.randn(bias_table_rows(w3), nh, device=device) if bias else None
    grad = torch.randn(qkv.shape[:-3] + (nh, hd), device=device)
    return qkv, table, grad


def _run(qkv, table, grad, case, dtype, backend):
    """Forward + backward from the strided q/k/v views of one qkv tensor, in `dtype`."""
    _, _, _, window, shift = case
    qkv = qkv.to(dtype).requires_grad_()
    tb = table.to(dtype).requires_grad_() if table is not None else None
    q, k, v = qkv.unbind(-3)
    out = fk.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias=tb, backend=backend)
    out.backward(grad.to(dtype))
    return out, qkv.grad, (tb.grad if tb is not None else None)


def test_cpu_backends_are_exercised():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine triton runs compiled (tests/gpu)")
    assert set(CPU_BACKENDS) >= {"torch", "triton"}, CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_output_and_gradients_against_reference(case, dtype, backend):
    qkv, table, grad = _inputs(case, dtype)
    ref = _run(qkv.double(), table.double(), grad.double(), case, torch.float64, "reference")
    low = _run(qkv, table, grad, case, dtype, "reference")  # plain PyTorch in the same precision
    out = _run(qkv, table, grad, case, dtype, backend)
    for name, o, r, t in zip(("output", "grad qkv", "grad bias table"), out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"window_attention[{backend}] {_id(case)} "
                                                                  f"{dtype} {name}")  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_bias_and_custom_scale(backend):
    case = CASES[4]
    qkv, _, grad = _inputs(case, torch.float32, bias=False)
    (B, T, H, W), nh, hd, window, shift = case
    qkv = qkv.requires_grad_()
    q, k, v = qkv.unbind(-3)
    out = fk.window_attention(q, k, v, window_size=window, shift_size=shift, scale=0.3, backend=backend)
    ref = window_attention_reference(q.double(), k.double(), v.double(), window, shift, None, 0.3)
    low = window_attention_reference(q, k, v, window, shift, None, 0.3)
    assert_close_to_reference(out, ref, low, atol=1e-5, what=f"{backend} no bias")


def test_time_only_shrink_matches_video_swin_index_slicing():
    """Video Swin slices relative_position_index[:N, :N] of the nominal window; with only T shrunk that is exactly
    the coordinate-based index used here."""
    nominal, eff = (8, 7, 7), (4, 7, 7)
    full = relative_position_index(nominal, nominal, torch.device("cpu"))
    N = 4 * 7 * 7
    assert torch.equal(relative_position_index(eff, nominal, torch.device("cpu")), full[:N, :N])


def test_masks_follow_video_swin_regions():
    g = resolve_geometry((4, 8, 8), (2, 4, 4), (1, 2, 2))
    mask = attention_masks((4, 8, 8), g, torch.device("cpu"))
    assert mask.shape == (2 * 2 * 2, 32, 32)
    assert (mask[0] == 0).all()  # first window: one region
    assert set(mask[-1].unique().tolist()) == {-100.0, 0.0}  # last window: 8 regions
    assert attention_masks((4, 8, 8), resolve_geometry((4, 8, 8), (2, 4, 4), (0, 0, 0)), torch.device("cpu")) is None


def test_padded_keys_get_no_weight():
    """Keys in padding are excluded, not just zero vectors: changing what padding would hold cannot matter, and
    the output equals attention over the valid tokens of each window computed by hand."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 2, 5, 1, 4, dtype=torch.float64) for _ in range(3))
    out = fk.window_attention(q, k, v, window_size=(1, 2, 4), backend="torch")
    # Window 2 holds W = 4 and the padded W = 5..7: only token 4 (per row) is valid with its row mates.
    qq, kk, vv = q[0, 0, :, 4:, 0], k[0, 0, :, 4:, 0], v[0, 0, :, 4:, 0]
    qf, kf, vf = qq.reshape(-1, 4), kk.reshape(-1, 4), vv.reshape(-1, 4)
    expected = ((qf @ kf.T) * 0.5).softmax(-1) @ vf
    torch.testing.assert_close(out[0, 0, :, 4, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(1, 7, 7, 2)), r"q: expected \(B, T, H, W, num_heads, head_dim\)"),
        (dict(k=torch.randn(1, 7, 7, 2, 4)), r"q, k, v: shapes must match"),
        (dict(rel_pos_bias=torch.randn(10, 2)), r"rel_pos_bias: expected shape \(169, 2\)"),
        (dict(window_size=(7, 7, 7)), r"window_size: expected 2 values"),
        (dict(shift_size=(7, 0)), r"shift_size: expected 0 <= shift < window"),
        (dict(dropout_p=1.5), r"dropout_p"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(q=torch.randn(1, 7, 7, 2, 8), k=torch.randn(1, 7, 7, 2, 8), v=torch.randn(1, 7, 7, 2, 8),
                window_size=(7, 7), shift_size=(3, 3), rel_pos_bias=torch.randn(169, 2))  # fmt: skip
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        fk.window_attention(q, k, v, **args)


def test_dropout_falls_back_from_triton_and_is_applied():
    q = k = v = torch.randn(1, 6, 6, 2, 16)
    with pytest.raises(fk.BackendNotSupportedError, match="attention dropout is not fused"):
        fk.window_attention(q, k, v, window_size=3, dropout_p=0.5, backend="triton")
    a = fk.window_attention(q, k, v, window_size=3, dropout_p=0.5)
    b = fk.window_attention(q, k, v, window_size=3)
    assert not torch.equal(a, b)


def test_triton_custom_op_opcheck():
    """Fake kernels, schema and autograd registration of the Triton forward op (interpreter on CPU)."""
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not runnable on CPU here")
    from florence_kernels.ops.window_attention import _wattn_triton_fwd_op

    qkv, table, _ = _inputs(CASES[3], torch.float32)
    q, k, v = (t.contiguous().requires_grad_() for t in qkv.unbind(-3))
    torch.library.opcheck(_wattn_triton_fwd_op, (q, k, v, table.requires_grad_(), [2, 3, 3], [1, 1, 1], 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip


# --- cpp: the fused CPU kernel at sizes the interpreter cannot afford ------------------------------------------------

CPP_CASES = [
    ((2, 1, 14, 14), 3, 32, (7, 7), (3, 3)),  # Swin: 49 tokens (32 + 16 + 16-wide tiles), 4 windows with the mask
    ((1, 1, 13, 17), 3, 24, (7, 7), (3, 3)),  # head_dim 24 (output tiles spill into the next head's columns), padding
    ((1, 4, 9, 9), 2, 16, (4, 5, 5), (2, 2, 2)),  # 3-D: 100 tokens per window, padding on H and W
    ((2, 3, 8, 8), 1, 64, (8, 7, 7), (4, 3, 3)),  # time shrinks to 3 (shift drops), 147 tokens, head_dim 64
]


def _cpp_available():
    return "cpp" in CPU_BACKENDS


@pytest.mark.skipif(not _cpp_available(), reason="florence_kernels._C is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CPP_CASES, ids=_id)
def test_cpp_larger_windows_against_reference(case, dtype):
    qkv, table, grad = _inputs(case, dtype)
    ref = _run(qkv.double(), table.double(), grad.double(), case, torch.float64, "reference")
    low = _run(qkv, table, grad, case, dtype, "reference")
    out = _run(qkv, table, grad, case, dtype, "cpp")
    for name, o, r, t in zip(("output", "grad qkv", "grad bias table"), out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"cpp {_id(case)} {dtype} {name}")


@pytest.mark.skipif(not _cpp_available(), reason="florence_kernels._C is not built")
def test_cpp_reads_any_strides_and_packed_path_matches():
    """q, k, v with head_dim not innermost (and an expanded, stride-0 output gradient) give the reference's result;
    the packed-qkv op used by the modules gives the same output and gradients as the three-tensor op."""
    from florence_kernels.ops.window_attention import _wattn_cpp_packed_fwd_op

    case = CPP_CASES[0]
    (B, T, H, W), nh, hd, window, shift = case
    base = torch.randn(B, T, H, W, nh, 3, hd, dtype=torch.float64)
    q, k, v = (base[..., i, :].transpose(-1, -2).contiguous().transpose(-1, -2) for i in range(3))
    assert q.stride(-1) != 1
    table = torch.randn(bias_table_rows((1, *window)), nh, dtype=torch.float64)
    args = dict(window_size=(1, *window), shift_size=(0, *shift), rel_pos_bias=table)
    out = fk.window_attention(q.float(), k.float(), v.float(), backend="cpp", **{**args, "rel_pos_bias": table.float()})
    ref = fk.window_attention(q, k, v, backend="reference", **args)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    qkv = torch.randn(B, T, H, W, 3, nh, hd, requires_grad=True)
    tb = table.float().requires_grad_()
    grad = torch.ones(()).expand(B, T, H, W, nh, hd)  # stride-0 incoming gradient
    o1 = fk.window_attention(*qkv.unbind(4), backend="cpp", **{**args, "rel_pos_bias": tb})
    g1 = torch.autograd.grad(o1, (qkv, tb), grad)
    o2 = _wattn_cpp_packed_fwd_op(qkv, tb, [1, *window], [0, *shift], hd**-0.5)[0]
    g2 = torch.autograd.grad(o2, (qkv, tb), grad)
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not _cpp_available(), reason="florence_kernels._C is not built")
@pytest.mark.parametrize("packed", [False, True])
def test_cpp_custom_ops_opcheck(packed):
    from florence_kernels.ops.window_attention import _wattn_cpp_fwd_op, _wattn_cpp_packed_fwd_op

    qkv, table, _ = _inputs(CASES[4], torch.float32)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    if packed:
        args = (qkv.requires_grad_(), table.requires_grad_(), [2, 3, 3], [1, 1, 2], 0.25)
        torch.library.opcheck(_wattn_cpp_packed_fwd_op, args, test_utils=tests)
    else:
        q, k, v = (t.contiguous().requires_grad_() for t in qkv.unbind(-3))
        args = (q, k, v, table.requires_grad_(), [2, 3, 3], [1, 1, 2], 0.25)
        torch.library.opcheck(_wattn_cpp_fwd_op, args, test_utils=tests)


@pytest.mark.skipif(not _cpp_available(), reason="florence_kernels._C is not built")
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=torch.randn(1, 1, 7, 7, 2, 4)), r"k: expected shape \[1, 1, 7, 7, 2, 8\] \(that of q\)"),
        (dict(v=torch.randn(1, 1, 7, 7, 2, 8, dtype=torch.float64)), r"v: expected dtype Float"),
        (dict(q=torch.randn(1, 1, 7, 7, 2, 8, dtype=torch.float64)), r"q: expected float32, float16 or bfloat16"),
        (dict(table=torch.randn(10, 2)), r"rel_pos_bias: expected shape \[169, 2\]"),
        (dict(window=[1, 8, 8]), r"window_size/shift_size: expected 0 < window <= nominal window"),
    ],
)
def test_cpp_extension_checks_name_the_argument(change, match):
    """The C++ entry points check their inputs themselves (they are reachable through torch.ops)."""
    import florence_kernels._C  # noqa: F401

    args = dict(q=torch.randn(1, 1, 7, 7, 2, 8), k=torch.randn(1, 1, 7, 7, 2, 8), v=torch.randn(1, 1, 7, 7, 2, 8),
                table=torch.randn(169, 2), window=[1, 7, 7])  # fmt: skip
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.florence_kernels_C.window_attention_fwd(
            args["q"], args["k"], args["v"], args["table"], args["window"], [0, 3, 3], [1, 7, 7], 0.35
        )
