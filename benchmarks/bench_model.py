"""Florence training step (both towers forward, UniCL loss, backward): throughput in images/s (``items_per_s``) and
peak memory, the model on reference ops against the same model on fused ops (automatic backends: the C++ CPU
kernels here, Triton / CUDA on a GPU), same weights. On a GPU with the flash-attn package, the text tower's
attention through flash_attn_func is a third provider (against SDPA in the fused one).

    python -m benchmarks.bench_model [--quick] [--device cpu|cuda] [--dtype fp32|bf16]

CPU: florence_tiny (CoSwin-T + 12-layer text tower) at 224, batch 8 (quick: florence_cpu_demo at 64, batch 16).
GPU: florence_tiny at 224, batch 64. Only the "full" mode (a training step) is measured; the optimizer step is
the same for every provider and is left out.
"""

from __future__ import annotations

import functools
import sys

import torch

import florence
import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for
from florence.models.text import flash_attn_unavailable
from florence.optional import missing

NAME = "model"
CAPTIONS = ["a photo of the digit {}", "a handwritten {}", "the number {} written by hand", "a scan of a {}"]


def _setup(quick: bool, device: str):
    if quick:
        return "florence_cpu_demo", 64, 16
    return "florence_tiny", 224, (8 if device == "cpu" else 64)


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    name, size, B = _setup(quick, device)
    ctx = florence.models.get_config(name)["text"]["context_length"]

    def make_inputs(device, dtype, B=B, size=size, ctx=ctx):
        g = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(B, 3, size, size, device=device, generator=g).to(dtype)
        labels = torch.arange(B, device=device) % max(B // 2, 1)  # every text twice: UniCL positives
        tokens = _tokens([CAPTIONS[i % len(CAPTIONS)].format(int(y)) for i, y in enumerate(labels.tolist())], ctx)
        return images, tokens.to(device), labels, name

    return [Case(f"{name}_{size}_b{B}", {"model": name, "image": size, "batch": B}, make_inputs, items=B)]


def _tokens(texts, ctx):
    """CLIP BPE ids; where open_clip (the vocabulary) is not installed, as on a bare GPU machine, ids of the same
    shape (florence.random_token_ids: the step's cost does not depend on which ids)."""
    if missing("open_clip"):
        return florence.random_token_ids(len(texts), ctx, length=8, seed=1)
    return florence.tokenize(texts, ctx)


@functools.cache
def _model(name, backend, attn, device, dtype):
    torch.manual_seed(0)
    m = florence.create_model(name, vision={"drop_path_rate": 0.0}, backend=backend).to(device, dtype).train()
    m.text.set_attn_backend(attn)
    return m


def _step(backend, attn="sdpa"):
    def fn(images, tokens, labels, name):
        model = _model(name, backend, attn, images.device.type, images.dtype)
        u, v, scale = model(images, tokens)
        return fk.contrastive_loss(u, v, scale, labels, backend=backend)

    return fn


def providers(device: str) -> list[Provider]:
    def no_flash(dev):
        if dev != "cuda":
            return "flash-attn runs on CUDA only"
        return flash_attn_unavailable()

    return [
        Provider("reference", _step("reference"), modes=("full",)),
        Provider("fused", _step(None), modes=("full",)),
        Provider("fused+flash_attn", _step(None, "flash_attn"), unavailable=no_flash, modes=("full",)),
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_model"))
