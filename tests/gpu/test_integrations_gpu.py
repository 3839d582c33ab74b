"""florence_kernels.patch on a CUDA GPU: timm and torchvision models patched (automatic backends: the compiled
Triton window attention, through the arranged grid where the peer's geometry needs it) against the same models
unpatched, fp32 (FlashAttention's rule against float64 on the GPU) and bf16 under autocast; the window conventions
on the compiled kernels. Skipped without a GPU."""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

MODELS = {
    "timm-swin_tiny-192": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=192), (2, 3, 192, 192)),
    "timm-swinv2_tiny-224": (lambda: timm.create_model("swinv2_tiny_window8_256", img_size=224), (2, 3, 224, 224)),
    "tv-swin_t-224": (lambda: torchvision.models.swin_t(), (2, 3, 224, 224)),
    "tv-swin_v2_t-200": (lambda: torchvision.models.swin_v2_t(), (2, 3, 200, 200)),
    "tv-swin3d_t-8x112": (lambda: torchvision.models.video.swin3d_t(), (1, 3, 8, 112, 112)),
}


def _run(model, x, dtype, autocast=False):
    model.zero_grad(set_to_none=True)
    x = x.detach().to(torch.float32 if autocast else dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model.to(torch.float32 if autocast else dtype)(x)
    out.float().backward(torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2)))
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_models_on_gpu(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().cuda().eval()
    x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = _run(model, x, torch.float64)
    plain = _run(model, x, torch.float32)
    plain_bf16 = _run(model, x, torch.float32, autocast=True)
    assert fk.patch(model), name
    got = _run(model, x, torch.float32)
    got_bf16 = _run(model, x, torch.float32, autocast=True)
    for i, (a, r, p) in enumerate(zip(got, ref, plain, strict=True)):
        scale = max(r.abs().max().item(), 1e-30)
        assert_close_to_reference(a, r, p, atol=1e-4 * scale, what=f"{name} fp32 tensor {i}")
    for i, (a, r, p) in enumerate(zip(got_bf16, ref, plain_bf16, strict=True)):
        scale = max(r.abs().max().item(), 1e-30)
        assert_close_to_reference(a, r, p, atol=1e-2 * scale, what=f"{name} bf16 autocast tensor {i}")


@pytest.mark.parametrize("convention", ["timm", "torchvision", "torchvision3d"])
@pytest.mark.parametrize("cosine", [False, True], ids=["v1", "v2"])
def test_conventions_on_compiled_triton(convention, cosine):
    from florence_kernels.ops.window_attention import bias_table_rows

    g = torch.Generator("cuda").manual_seed(0)
    thw, window, shift, nh, hd = (4, 15, 17), (2, 7, 7), (1, 3, 3), 4, 32
    leaves = [torch.randn(2, *thw, nh, hd, device="cuda", generator=g) for _ in range(3)]
    leaves += [torch.randn(bias_table_rows(window), nh, device="cuda", generator=g)]
    leaves += [torch.randn(nh, hd, device="cuda", generator=g) for _ in range(3)]
    leaves += [torch.tensor([1.0, 2.0, 4.0, 5.0], device="cuda")] if cosine else []

    def run(dtype, backend):
        ls = [t.detach().to(dtype).requires_grad_() for t in leaves]
        out = fk.window_attention(*ls[:3], window_size=window, shift_size=shift, rel_pos_bias=ls[3],
                                  convention=convention, pad_token=tuple(ls[4:7]),
                                  logit_scale=ls[7] if cosine else None, backend=backend)  # fmt: skip
        grads = torch.autograd.grad(out, ls, torch.ones_like(out), allow_unused=True, materialize_grads=True)
        return [out, *grads]

    ref, plain, got = run(torch.float64, "reference"), run(torch.float32, "reference"), run(torch.float32, "triton")
    for i, (a, r, p) in enumerate(zip(got, ref, plain, strict=True)):
        assert_close_to_reference(a, r, p, atol=1e-4 * max(1.0, r.abs().max().item()), what=f"{convention} {i}")
