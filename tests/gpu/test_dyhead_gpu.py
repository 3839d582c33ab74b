"""Dynamic Head's Triton kernels on a CUDA GPU (compiled, not interpreted): dyrelu and the fused scale_task_attention
against float64 references, and a DyHeadBlock with every fused backend against the literal modules. Skipped
without a GPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.nn import DyHeadBlock
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_gpu_scale_task_against_reference(n_terms, dtype):
    g = torch.Generator(device="cuda").manual_seed(n_terms)
    terms = [torch.randn(2, 256, 50, 84, generator=g, device="cuda", dtype=torch.float64) for _ in range(n_terms)]
    pi = torch.rand(2, n_terms, generator=g, device="cuda", dtype=torch.float64)
    coeffs = torch.rand(2, 1024, generator=g, device="cuda", dtype=torch.float64)

    def run(dt, be):
        leaves = [t.to(dt).requires_grad_() for t in (*terms, pi, coeffs)]
        out = fk.scale_task_attention(leaves[:n_terms], leaves[-2], leaves[-1], backend=be)
        out.backward(torch.ones_like(out) * 0.01 + out.detach() * 0.1)
        return [out] + [t.grad for t in leaves]

    ref, low, out = run(torch.float64, "reference"), run(dtype, "reference"), run(dtype, "triton")
    for i, (o, r, t) in enumerate(zip(out, ref, low, strict=True)):
        assert_close_to_reference(o, r, t, atol=ATOL[dtype], what=f"scale_task triton {dtype} tensor {i}")


@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_gpu_dyhead_block_matches_reference_modules(backend):
    torch.manual_seed(0)
    ref = DyHeadBlock(64, backend="reference").cuda()
    with torch.no_grad():
        ref.spatial_conv_offset.weight.normal_(0, 0.05)
    blk = DyHeadBlock(64, backend=backend).cuda()
    blk.load_state_dict(ref.state_dict())
    levels = [torch.randn(2, 64, h, w, device="cuda") for h, w in ((40, 64), (20, 32), (10, 16))]
    for a, b in zip(blk(levels), ref(levels), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
