"""window_attention on a CUDA GPU: the compiled Triton kernels (and the SDPA torch path) against a float64
reference, at stage shapes of Swin / Video Swin; memory without O(window^2) tensors. Skipped without a GPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.ops.window_attention import bias_table_rows
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [
    ((2, 1, 56, 56), 3, 32, (1, 7, 7), (0, 3, 3)),  # Swin-T stage 1
    ((2, 1, 14, 14), 12, 32, (1, 7, 7), (0, 3, 3)),  # Swin-T stage 3
    ((1, 1, 48, 48), 4, 32, (1, 12, 12), (0, 6, 6)),  # 384-style window 12
    ((1, 8, 28, 28), 4, 32, (8, 7, 7), (4, 3, 3)),  # Video Swin, N = 392
    ((1, 3, 15, 17), 2, 64, (2, 7, 7), (1, 3, 3)),  # padding on every axis
    ((2, 1, 20, 20), 2, 128, (1, 7, 7), (0, 3, 3)),  # head_dim 128
    ((1, 1, 9, 9), 2, 16, (1, 7, 7), (0, 3, 3)),  # head_dim 16, padding
]


def _run(qkv, table, grad, window, shift, dtype, backend):
    qkv = qkv.to(dtype).requires_grad_()
    tb = table.to(dtype).requires_grad_()
    q, k, v = qkv.unbind(-3)
    out = fk.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias=tb, backend=backend)
    out.backward(grad.to(dtype))
    return out, qkv.grad, tb.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-d{c[2]}")
def test_gpu_against_reference(case, dtype, backend):
    (B, T, H, W), nh, hd, window, shift = case
    torch.manual_seed(0)
    qkv = torch.randn(B, T, H, W, 3, nh, hd, device="cuda")
    table = 0.5 * torch.randn(bias_table_rows(window), nh, device="cuda")
    grad = torch.randn(B, T, H, W, nh, hd, device="cuda")
    ref = _run(qkv.double(), table.double(), grad.double(), window, shift, torch.float64, "reference")
    low = _run(qkv, table, grad, window, shift, dtype, "reference")
    out = _run(qkv, table, grad, window, shift, dtype, backend)
    for name, o, r, t in zip(("output", "grad qkv", "grad bias"), out, ref, low, strict=True):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"{backend} {case} {dtype} {name}")


def test_gpu_triton_keeps_no_window_squared_tensor():
    """Peak memory of Triton fwd+bwd stays near the size of q, k, v, o and their gradients; the reference's scores
    alone are B * nW * heads * N^2."""
    torch.manual_seed(0)
    B, T, H, W, nh, hd, window = 2, 16, 56, 56, 4, 32, (8, 7, 7)
    qkv = torch.randn(B, T, H, W, 3, nh, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    table = torch.randn(bias_table_rows(window), nh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fk.window_attention(q, k, v, window_size=window, shift_size=(4, 3, 3), rel_pos_bias=table, backend="triton")
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grid_bytes = q.numel() * 2
    scores_bytes = B * (T // 8) * (H // 7) * (W // 7) * nh * 392 * 392 * 2
    assert extra < 12 * grid_bytes + 32 * 2**20, (extra, grid_bytes)
    assert extra < scores_bytes, (extra, scores_bytes)


def test_gpu_automatic_choice_is_triton():
    q = torch.zeros(1, 7, 7, 2, 16, device="cuda")
    assert fk.OPS["window_attention"].select([q, q, q]) == "triton"
