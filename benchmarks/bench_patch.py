"""``florence_kernels.patch`` on models people already train: a training step (forward, loss, backward) of the
peer's model as it is against the same model patched (same weights; automatic backends: the C++ CPU kernel on CPUs
with AVX-512, the torch path on others, Triton on a GPU; eager both ways) and, on CPU, patched onto the C++ kernel
explicitly (``patched_cpp``). Time (``items_per_s``: samples per second) and peak memory.

    python -m benchmarks.bench_patch [--quick] [--device cpu|cuda] [--dtype fp32|bf16]

CPU: timm swin_tiny_patch4_window7_224 at 224 px, batch 8, and torchvision swin3d_t on a 16 x 112 x 112 clip,
batch 1 (quick: batch 2, and an 8 x 112 x 112 clip). GPU (gpu_check.sh): the training shapes, batch 64 at 224 px and
32 x 224 x 224 clips, batch 1 (--quick: batch 32 and 16-frame clips). Only "full" (a training step) is measured; the
optimizer is the same for both.
"""

from __future__ import annotations

import functools
import sys

import torch

import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for

NAME = "patch"
REQUIRES = ()  # timm and torchvision: test requirements, on the GPU image too


def _shapes(quick: bool, device: str):
    if device == "cuda":  # the training shapes (quick, as gpu_check.sh --quick runs it: half of each)
        if quick:
            return [("timm_swin_tiny", (32, 3, 224, 224)), ("tv_swin3d_t", (1, 3, 16, 224, 224))]
        return [("timm_swin_tiny", (64, 3, 224, 224)), ("tv_swin3d_t", (1, 3, 32, 224, 224))]
    if quick:
        return [("timm_swin_tiny", (2, 3, 224, 224)), ("tv_swin3d_t", (1, 3, 8, 112, 112))]
    return [("timm_swin_tiny", (8, 3, 224, 224)), ("tv_swin3d_t", (1, 3, 16, 112, 112))]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for model, shape in _shapes(quick, device):

        def make_inputs(device, dtype, model=model, shape=shape):
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, device=device, generator=g).to(dtype)
            y = torch.randint(0, 400, (shape[0],), device=device, generator=g)
            return x, y, model

        dims = "x".join(map(str, shape[2:]))
        out.append(Case(f"{model}_{dims}_b{shape[0]}", {"model": model, "input": dims, "batch": shape[0]},
                        make_inputs, items=shape[0]))  # fmt: skip
    return out


@functools.cache
def _model(model: str, patched, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if model == "timm_swin_tiny":
        import timm

        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.0)
    else:
        import torchvision

        m = torchvision.models.video.swin3d_t()
        for sd in m.modules():  # no stochastic depth: both providers run every block (swin3d_t fixes its rate)
            if isinstance(sd, torchvision.ops.StochasticDepth):
                sd.p = 0.0
    m = m.to(device, dtype).train()
    if patched:
        report = fk.patch(m, backend=None if patched is True else patched)
        assert report.patched, str(report)
    return m


def _step(patched):
    def fn(x, y, model):
        logits = _model(model, patched, x.device.type, x.dtype)(x)
        return torch.nn.functional.cross_entropy(logits.float(), y)

    return fn


def _no_peer(device):
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def providers(device: str) -> list[Provider]:
    def no_cpp(dev):
        if dev != "cpu":
            return "the C++ kernel is the CPU backend"
        return _no_peer(dev) or "; ".join(fk.OPS["window_attention"].backends["cpp"].environment_reasons(dev)) or None

    return [
        Provider("unpatched", _step(False), unavailable=_no_peer, modes=("full",)),
        Provider("patched", _step(True), unavailable=_no_peer, modes=("full",)),  # automatic backends
        Provider("patched_cpp", _step("cpp"), unavailable=no_cpp, modes=("full",)),  # the C++ kernel wherever it can
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_patch"))
