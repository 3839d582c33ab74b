"""The Florence model on a CUDA GPU: fused backends (automatic: cuda / triton) against reference backends on the
whole model, embeddings and gradients, fp32 and bf16. Token ids are drawn directly (the GPU machine may lack
open_clip's vocabulary). Skipped without a GPU."""

import pytest
import torch

import florence
from florence_kernels.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu


def _tokens(B, ctx):
    g = torch.Generator().manual_seed(1)
    tok = torch.zeros(B, ctx, dtype=torch.long)
    tok[:, 0], tok[:, 9] = 49406, 49407
    tok[:, 1:9] = torch.randint(256, 49000, (B, 8), generator=g)
    return tok.cuda()


def _run(model, images, tokens):
    u, v, s = model(images, tokens)
    (u @ v.T * s).logsumexp(1).sum().backward()
    return [u, v] + [p.grad for n, p in model.named_parameters() if "pyramid_norms" not in n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_model_matches_reference(dtype):
    torch.manual_seed(0)
    kw = dict(vision={"drop_path_rate": 0.0})
    ref64 = florence.create_model("florence_cpu_demo", backend="reference", **kw).cuda().double()
    state = ref64.state_dict()
    images = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float64)
    tokens = _tokens(4, 32)
    ref = _run(ref64, images, tokens)
    outs = []
    for backend in ("reference", None):
        m = florence.create_model("florence_cpu_demo", backend=backend, **kw).cuda()
        m.load_state_dict(state)
        outs.append(_run(m.to(dtype), images.to(dtype), tokens))
    low, fused = outs
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (o, r, t) in enumerate(zip(fused, ref, low, strict=True)):
        assert_close_to_reference(o, r, t, atol=atol, what=f"florence fused {dtype} tensor {i}")


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_gpu_meter_flash_attn_varlen_matches_sdpa():
    """METER's fusion through flash-attn's varlen kernel against SDPA with its key mask, bf16, padded questions."""
    from florence.models import METER, get_config

    cfg = get_config("florence_cpu_demo")
    torch.manual_seed(0)
    kw = {"width": 128, "heads": 4, "layers": 2, "dropout": 0.0, "itm": False}
    sdpa = METER(cfg["vision"], cfg["text"], 11, **kw).cuda()
    flash = METER(cfg["vision"], cfg["text"], 11, attn_backend="flash_attn", **kw).cuda()
    flash.load_state_dict(sdpa.state_dict())
    tokens = _tokens(4, 32)
    tokens[1, 5], tokens[1, 6:] = 49407, 0  # a shorter question
    images = torch.randn(4, 3, 128, 128, device="cuda")
    outs = []
    for model in (sdpa, flash):
        with torch.autocast("cuda", torch.bfloat16):
            out = model(images, tokens)
        out["vqa_logits"].float().square().sum().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if n.startswith(("text_layers", "image_"))}))
    (want, want_grads), (got, got_grads) = outs
    real = torch.arange(want["text"].shape[1], device="cuda")[None] <= tokens.argmax(-1)[:, None]
    for a, b in ((got["vqa_logits"], want["vqa_logits"]), (got["text"][real], want["text"][real]),
                 (got["image"], want["image"])):  # fmt: skip
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name].float(), grad.float(), rtol=1e-1, atol=1e-1, msg=name)
