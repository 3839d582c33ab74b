"""conv_embed on a CUDA GPU: the compiled Triton implicit GEMM (LayerNorm epilogue) and the channels-last torch
path against a float64 reference, CoSwin and Video CoSwin shapes, both input layouts. Skipped without a GPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [  # (channels-first input shape, C_out, kernel, stride, padding)
    ((4, 3, 224, 224), 96, 7, 4, 2),
    ((2, 96, 56, 56), 192, 3, 2, 1),
    ((2, 3, 97, 101), 352, 7, 4, 2),
    ((1, 3, 8, 64, 64), 96, (2, 7, 7), (2, 4, 4), (0, 2, 2)),
    ((1, 96, 4, 28, 28), 192, 3, (1, 2, 2), 1),
]


def _run(x, params, s, p, layout, dtype, backend):
    leaves = [t.to(dtype).requires_grad_() for t in (x, *params)]
    out = fk.conv_embed(*leaves, stride=s, padding=p, input_layout=layout, backend=backend)
    out.backward(torch.ones_like(out) * 0.01 + out.detach() * 0.1)
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_gpu_against_reference(case, dtype, backend, layout):
    shape, c_out, k, s, p = case
    spatial = len(shape) - 2
    ks = (k,) * spatial if isinstance(k, int) else k
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.float64)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    params = (torch.randn(c_out, shape[1], *ks, device="cuda", dtype=torch.float64) * 0.05,
              torch.randn(c_out, device="cuda", dtype=torch.float64), 1 + 0.1 * torch.randn(c_out, device="cuda",
              dtype=torch.float64), 0.1 * torch.randn(c_out, device="cuda", dtype=torch.float64))  # fmt: skip
    ref = _run(x, params, s, p, layout, torch.float64, "reference")
    low = _run(x, params, s, p, layout, dtype, "reference")
    out = _run(x, params, s, p, layout, dtype, backend)
    for i, (o, r, t) in enumerate(zip(out, ref, low, strict=True)):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"{backend} {shape} {layout} {dtype} tensor {i}")
