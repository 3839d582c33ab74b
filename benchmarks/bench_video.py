"""Video CoSwin training step (forward, cross-entropy over an I3D head, backward): clips/s (``items_per_s``) and peak
memory, the model on reference ops against the same model on fused ops (automatic backends: the C++ CPU kernels
where they pay, Triton / CUDA on a GPU), same weights; and the paper's dynamic window sizes (small windows early,
large late: (2, 7, 7), (4, 7, 7), (8, 7, 7), (8, 7, 7)) against one large window, (8, 7, 7), at every stage: the
memory the dynamic choice saves (case parameter ``windows``).

    python -m benchmarks.bench_video [--quick] [--device cpu|cuda] [--dtype fp32|bf16]

GPU: Kinetics-400 shapes, 32 x 224 x 224 clips; Video CoSwin-T batch 8 and Video CoSwin-B batch 4 (quick: CoSwin-T,
batch 2). CPU: Video CoSwin-T on 8 x 112 x 112, batch 2 (quick: the demo's config on 16 x 64 x 64, batch 4, windows
(2, 4, 4), (4, 4, 4), (8, 4, 4), (8, 4, 4) against (8, 4, 4) everywhere). Only mode "full" (a training step) is
measured; the optimizer step is the same for every provider and is left out.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, Provider, main_for
from florence.models import VideoClassifier, create_video_coswin

NAME = "video"
NUM_CLASSES = 400  # Kinetics-400


def _setups(quick: bool, device: str):
    """(config, frames, size, batch) per case."""
    if device == "cuda":
        return [("tiny", 32, 224, 2)] if quick else [("tiny", 32, 224, 8), ("base", 32, 224, 4)]
    return [("cpu_demo", 16, 64, 4)] if quick else [("tiny", 8, 112, 2)]


def _windows(size: str, kind: str):
    w = 4 if size.startswith("cpu") else 7
    if kind == "dynamic":
        return [(2, w, w), (4, w, w), (8, w, w), (8, w, w)]
    return [(8, w, w)] * 4


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for size, T, S, B in _setups(quick, device):
        for kind in ("dynamic", "uniform_large"):

            def make_inputs(device, dtype, T=T, S=S, B=B, size=size, kind=kind):
                g = torch.Generator(device=device).manual_seed(0)
                video = torch.randn(B, 3, T, S, S, device=device, generator=g).to(dtype)
                labels = torch.randint(NUM_CLASSES, (B,), device=device, generator=g)
                return video, labels, size, kind

            params = {"model": f"video_coswin_{size}", "frames": T, "size": S, "batch": B, "windows": kind}
            out.append(Case(f"video_coswin_{size}_{T}x{S}_b{B}_{kind}", params, make_inputs, items=B))
    return out


@functools.cache
def _model(size, kind, backend, device, dtype):
    torch.manual_seed(0)
    backbone = create_video_coswin(f"video_coswin_{size}", window_size=_windows(size, kind), drop_path_rate=0.0,
                                   backend=backend)  # fmt: skip
    return VideoClassifier(backbone, NUM_CLASSES, dropout=0.0).to(device, dtype).train()


def _step(backend):
    def fn(video, labels, size, kind):
        model = _model(size, kind, backend, video.device.type, video.dtype)
        return F.cross_entropy(model(video).float(), labels)

    return fn


def providers(device: str) -> list[Provider]:
    return [Provider("reference", _step("reference"), modes=("full",)), Provider("fused", _step(None), modes=("full",))]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_video"))
