"""METER VQA training step (CoSwin + Florence's text tower + co-attention fusion, forward, METER's VQA loss,
backward): samples/s (``items_per_s``) and peak memory. The same model, same weights, with CoSwin on reference ops
(literal window attention and convolutional embedding, "reference") against fused ops (automatic backends, "fused":
the C++ CPU kernels where they pay, Triton / CUDA on a GPU); on a GPU also the fusion's attention forced to SDPA's
math kernel ("sdpa_math", the unfused softmax(QK^T)V PyTorch falls back to) against SDPA's automatic choice
(memory-efficient / flash kernels, in "fused"), and, where flash-attn is installed, the fusion through flash-attn's
varlen kernel ("fused+flash_attn": padding packed away rather than masked).

    python -m benchmarks.bench_vqa [--quick] [--device cpu|cuda] [--dtype fp32|bf16]

GPU: METER's VQAv2 shapes: 384 x 384 images (144 image tokens from CoSwin-T's stride 32), questions of 40 tokens,
fusion width 768, 12 heads, 6 co-attention layers, 3,129 answers, batch 16 (quick: 8); the text tower of
florence_tiny. CPU: the demo's shapes: florence_cpu_demo's towers at 128 px (16 image tokens), 32 tokens, width 128,
4 heads, 2 layers, 60 answers, batch 8 (quick: 4). Only mode "full" (a training step) is measured; the optimizer
step is left out.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from benchmarks.harness import Case, Provider, main_for
from florence.models import METER, get_config
from florence.models.meter import vqa_loss

NAME = "vqa"


def _setups(quick: bool, device: str):
    """(tower config, image size, tokens, width, heads, layers, answers, batch) per case."""
    if device == "cuda":
        return [("florence_tiny", 384, 40, 768, 12, 6, 3129, 8 if quick else 16)]
    return [("florence_cpu_demo", 128, 32, 128, 4, 2, 60, 4 if quick else 8)]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for cfg, S, L, W, H, N, A, B in _setups(quick, device):

        def make_inputs(device, dtype, cfg=cfg, S=S, L=L, W=W, H=H, N=N, A=A, B=B):
            g = torch.Generator().manual_seed(0)
            images = torch.randn(B, 3, S, S, generator=g).to(device, dtype)
            tokens = torch.zeros(B, L, dtype=torch.int64)
            lengths = torch.randint(6, L, (B,), generator=g)
            for b, n in enumerate(lengths.tolist()):  # start, words, end-of-text (the largest id), padding
                tokens[b, 0], tokens[b, n] = 49406, 49407
                tokens[b, 1:n] = torch.randint(1, 49406, (n - 1,), generator=g)
            targets = (torch.rand(B, A, generator=g) > 0.999).float() * 0.9
            return images, tokens.to(device), targets.to(device), (cfg, W, H, N, A)

        params = {"model": cfg, "image_size": S, "tokens": L, "width": W, "heads": H, "layers": N, "answers": A,
                  "batch": B}  # fmt: skip
        out.append(Case(f"meter_{cfg}_{S}px_L{L}_w{W}_n{N}_b{B}", params, make_inputs, items=B))
    return out


@functools.cache
def _model(cfg, W, H, N, A, backend, device, dtype, attn_backend="sdpa"):
    torch.manual_seed(0)
    c = get_config(cfg)
    vision = c["vision"] | {"drop_path_rate": 0.0}
    return METER(vision, c["text"], A, width=W, heads=H, layers=N, dropout=0.0, itm=False, backend=backend,
                 attn_backend=attn_backend).to(device, dtype).train()  # fmt: skip


def _step(backend, sdpa=None, attn_backend="sdpa"):
    def fn(images, tokens, targets, spec):
        model = _model(*spec, backend, images.device.type, images.dtype, attn_backend)
        ctx = contextlib.nullcontext()
        if sdpa is not None:
            from torch.nn.attention import sdpa_kernel

            ctx = sdpa_kernel(sdpa)
        with ctx:
            return vqa_loss(model(images, tokens)["vqa_logits"], targets)

    return fn


def _only(device_kind):
    return lambda device: None if device == device_kind else f"runs on {device_kind} only"


def _no_flash(device):
    from florence.models.text import flash_attn_unavailable

    return _only("cuda")(device) or flash_attn_unavailable()


def providers(device: str) -> list[Provider]:
    from torch.nn.attention import SDPBackend

    return [
        Provider("reference", _step("reference"), modes=("full",)),
        Provider("fused", _step(None), modes=("full",)),
        Provider("sdpa_math", _step(None, SDPBackend.MATH), _only("cuda"), modes=("full",)),
        Provider("fused+flash_attn", _step(None, attn_backend="flash_attn"), _no_flash, modes=("full",)),
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_vqa"))
