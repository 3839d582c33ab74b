"""window_partition / window_reverse: every backend bit-exact against the literal reference, forward and backward."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.ops.window_partition import (
    resolve_geometry,
    window_partition_reference,
    window_reverse_reference,
)
from florence_kernels.testing import assert_bit_exact
from tests.conftest import runnable_backends

CPU_BACKENDS = [b for b in runnable_backends("window_partition", "cpu") if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, window, shift): plain, shifted, padded, shrunken windows, batch 1, T = 1.
CASES_2D = [
    ((1, 7, 7, 8), (7, 7), (0, 0)),
    ((2, 14, 14, 8), (7, 7), (3, 3)),
    ((2, 9, 11, 5), (4, 4), (2, 1)),  # pads H and W
    ((1, 5, 6, 3), (7, 7), (3, 3)),  # input smaller than the window: window = input, shift 0
    ((3, 8, 3, 4), (4, 4), (2, 2)),  # shrinks along W only
]
CASES_3D = [
    ((2, 4, 14, 14, 8), (2, 7, 7), (1, 3, 3)),
    ((1, 3, 9, 10, 6), (2, 4, 4), (1, 2, 3)),  # pads every axis
    ((2, 5, 6, 7, 4), (8, 7, 7), (4, 3, 3)),  # T and H shrink, W equals the window
    ((1, 1, 8, 8, 16), (2, 4, 4), (1, 2, 2)),  # T = 1 shrinks
    ((1, 6, 5, 5, 3), (4, 3, 3), (2, 1, 1)),
]
CASES = CASES_2D + CASES_3D


def _id(case):
    shape, w, s = case
    return f"{'x'.join(map(str, shape))}-w{''.join(map(str, w))}-s{''.join(map(str, s))}"


def _reference_partition(x, window, shift):
    x5 = x.unsqueeze(1) if x.dim() == 4 else x
    w3 = (1, *window) if len(window) == 2 else window
    s3 = (0, *shift) if len(shift) == 2 else shift
    return window_partition_reference(x5, w3, s3)


def _reference_reverse(windows, window, shape, shift):
    shape5 = (shape[0], 1, *shape[1:]) if len(shape) == 4 else tuple(shape)
    w3 = (1, *window) if len(window) == 2 else window
    s3 = (0, *shift) if len(shift) == 2 else shift
    out = window_reverse_reference(windows, w3, shape5[:4], s3)
    return out.squeeze(1) if len(shape) == 4 else out


def test_cpu_backends_are_exercised():
    """The CPU run of this suite must test cpp and triton (interpreter), not skip them quietly."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine triton runs compiled on CUDA tensors (tests/gpu)")
    assert set(CPU_BACKENDS) >= {"torch", "cpp", "triton"}, CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_partition_forward_backward_bit_exact(case, dtype, backend):
    shape, window, shift = case
    x = torch.randn(shape, dtype=dtype)
    x_ref = x.clone().requires_grad_()
    x_k = x.clone().requires_grad_()
    ref = _reference_partition(x_ref, window, shift)
    out = fk.window_partition(x_k, window, shift, backend=backend)
    what = f"window_partition[{backend}] {shape} {dtype} w{window} s{shift}"
    assert_bit_exact(out, ref, what=what + " forward")
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    assert_bit_exact(x_k.grad, x_ref.grad, what=what + " grad x")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reverse_forward_backward_bit_exact(case, dtype, backend):
    shape, window, shift = case
    windows_shape = _reference_partition(torch.empty(shape), window, shift).shape
    w = torch.randn(windows_shape, dtype=dtype)
    w_ref = w.clone().requires_grad_()
    w_k = w.clone().requires_grad_()
    ref = _reference_reverse(w_ref, window, shape[:-1] + (shape[-1],), shift)
    out = fk.window_reverse(w_k, window, shape, shift, backend=backend)
    what = f"window_reverse[{backend}] {shape} {dtype} w{window} s{shift}"
    assert_bit_exact(out, ref, what=what + " forward")
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    assert_bit_exact(w_k.grad, w_ref.grad, what=what + " grad windows")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_round_trip_is_identity(case, backend):
    shape, window, shift = case
    x = torch.randn(shape)
    back = fk.window_reverse(
        fk.window_partition(x, window, shift, backend=backend), window, shape, shift, backend=backend
    )
    assert_bit_exact(back, x, what=f"reverse(partition(x))[{backend}]")


def _noncontiguous_inputs():
    base = torch.randn(2, 4, 9, 10, 3, 2, 8)  # (B, T, H, W, 3, heads, head_dim): a qkv projection
    yield "qkv-slice", base[:, :, :, :, 1].flatten(-2)  # copy: flatten of a strided slice
    yield "channel-slice", torch.randn(2, 4, 9, 10, 24)[..., 4:20]  # channel stride 1, token strides 24
    yield "permuted", torch.randn(2, 16, 4, 9, 10).permute(0, 2, 3, 4, 1)  # channel stride != 1
    yield "spatial-step", torch.randn(2, 4, 18, 10, 16)[:, :, ::2]  # H stride doubled


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,x", list(_noncontiguous_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_noncontiguous_input(name, x, backend):
    window, shift = (2, 4, 4), (1, 2, 3)
    ref = _reference_partition(x, window, shift)
    out = fk.window_partition(x, window, shift, backend=backend)
    assert_bit_exact(out, ref, what=f"window_partition[{backend}] {name}")
    windows = torch.randn(ref.shape[0], ref.shape[2], ref.shape[1]).transpose(1, 2)  # strided windows
    assert_bit_exact(
        fk.window_reverse(windows, window, x.shape, shift, backend=backend),
        _reference_reverse(windows, window, tuple(x.shape), shift),
        what=f"window_reverse[{backend}] strided windows",
    )


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("torch", "cpp")])
def test_float64_and_empty_batch(backend):
    x = torch.randn(2, 3, 9, 10, 6, dtype=torch.float64)
    assert_bit_exact(
        fk.window_partition(x, (2, 4, 4), (1, 2, 3), backend=backend), _reference_partition(x, (2, 4, 4), (1, 2, 3))
    )
    empty = torch.randn(0, 3, 9, 10, 6)
    assert fk.window_partition(empty, (2, 4, 4), (1, 2, 3), backend=backend).shape == (0, 32, 6)


def test_geometry_follows_swin_rules():
    g = resolve_geometry((16, 56, 56), (8, 7, 7), (4, 3, 3))
    assert g.window == (8, 7, 7) and g.shift == (4, 3, 3) and g.counts == (2, 8, 8)
    g = resolve_geometry((4, 7, 9), (8, 7, 7), (4, 3, 3))
    assert g.window == (4, 7, 7) and g.shift == (0, 0, 3) and g.padded == (4, 7, 14)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: fk.window_partition(torch.randn(2, 7, 7), (7, 7)),
            r"x: expected a \(B, T, H, W, C\).*got shape \(2, 7, 7\)",
        ),
        (lambda: fk.window_partition(torch.randn(1, 7, 7, 4), (7, 7, 7)), r"window_size: expected 2 values"),
        (lambda: fk.window_partition(torch.randn(1, 7, 7, 4), (0, 7)), r"window_size: every value must be positive"),
        (lambda: fk.window_partition(torch.randn(1, 14, 14, 4), 7, 7), r"shift_size: expected 0 <= shift < window"),
        (lambda: fk.window_partition(torch.randn(1, 14, 14, 4), 7, -1), r"shift_size"),
        (lambda: fk.window_partition([1, 2], 7), r"x: expected a torch.Tensor"),
        (lambda: fk.window_reverse(torch.randn(4, 49, 3), 7, (1, 14, 14, 4)), r"windows: channel count 3"),
        (lambda: fk.window_reverse(torch.randn(3, 49, 4), 7, (1, 14, 14, 4)), r"windows: expected shape \(4, 49, 4\)"),
        (lambda: fk.window_reverse(torch.randn(4, 49, 4), 7, (14, 14, 4)), r"shape: expected"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_extension_checks_its_inputs():
    """The C++ entry points validate on their own (they are public through torch.ops)."""
    ops = torch.ops.florence_kernels_C
    with pytest.raises(RuntimeError, match=r"x: expected a \(B, T, H, W, C\) tensor, got shape \[2, 3\]"):
        ops.window_partition(torch.randn(2, 3), [1, 1, 1], [0, 0, 0])
    with pytest.raises(RuntimeError, match=r"shift_size: expected 0 <= shift < window"):
        ops.window_partition(torch.randn(1, 2, 4, 4, 3), [2, 2, 2], [0, 2, 0])
    with pytest.raises(RuntimeError, match=r"windows: expected shape \[4, 4, 3\]"):
        ops.window_reverse(torch.randn(5, 4, 3), [1, 2, 2], [0, 0, 0], [1, 1, 4, 4])


def test_opcheck_custom_ops():
    """Fake (meta) kernels, autograd registration and schema of the registered custom ops."""
    from florence_kernels.ops.window_partition import _window_partition_op, _window_reverse_op

    x = torch.randn(2, 3, 9, 10, 6, requires_grad=True)
    for backend in ("torch", "cpp"):
        torch.library.opcheck(_window_partition_op, (x, [2, 4, 4], [1, 2, 3], backend))
        w = torch.randn(2 * 2 * 3 * 3, 32, 6, requires_grad=True)
        torch.library.opcheck(_window_reverse_op, (w, [2, 4, 4], [2, 3, 9, 10], [1, 2, 3], backend))


def test_torch_compile_traces_the_op():
    """torch.compile sees one custom op (fake impl for shapes) and its registered backward, without graph breaks."""

    def f(x):
        w = fk.window_partition(x * 2, (2, 4, 4), (1, 2, 3), backend="cpp")
        return fk.window_reverse(w + 1, (2, 4, 4), x.shape, (1, 2, 3), backend="cpp")

    x = torch.randn(2, 3, 9, 10, 6, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert_bit_exact(out, f(x), what="compiled forward")
    out.sum().backward()
    assert_bit_exact(x.grad, torch.full_like(x, 2.0), what="compiled backward")


def test_explicit_backend_that_cannot_run_lists_reasons():
    with pytest.raises(
        fk.BackendNotSupportedError, match=r"backend 'cuda' cannot run.*\n  - cuda runs on cuda tensors"
    ):
        fk.window_partition(torch.randn(1, 7, 7, 4), 7, backend="cuda")
