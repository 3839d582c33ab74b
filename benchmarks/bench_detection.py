"""Detector training step (ATSS + Dynamic Head on CoSwin: forward, ATSS assignment and losses, backward): images/s
(``items_per_s``) and peak memory, the detector on reference ops (mmdetection's DyHead semantics, literal modules;
CoSwin's reference window attention) against the same detector, same weights, on fused ops: automatic backends
("fused": the C++ CPU kernels where they pay, Triton / CUDA on a GPU) and each deformable-convolution backend forced
module-wide ("cpp" on CPU; "triton" and "cuda" on a GPU; an op without that backend keeps its automatic choice). The
fused DyHead level (scale- and task-aware attention in one pass) runs in every provider but "reference".

    python -m benchmarks.bench_detection [--quick] [--device cpu|cuda] [--dtype fp32|bf16]

GPU: COCO shapes, 800 x 1344 (1333 padded to a multiple of 32, as mmdetection pads), CoSwin-T, FPN 256 channels,
6 DyHead blocks, batch 2 (quick: batch 1), 80 classes. CPU: the demo's detector (CoSwin of florence_cpu_demo, FPN 64,
2 blocks) on 128 x 128 digit-canvas shapes, batch 8 (quick: batch 4), 10 classes. Each image has 8 boxes of 16-200
px (GPU) / 10-60 px (CPU). Only mode "full" (a training step) is measured; the optimizer step is left out.
"""

from __future__ import annotations

import functools
import sys

import torch

from benchmarks.harness import Case, Provider, main_for
from florence.models import get_config
from florence.models.detection import ATSSDetector

NAME = "detection"


def _setups(quick: bool, device: str):
    """(vision config, height, width, batch, fpn channels, blocks, classes, box side range) per case."""
    if device == "cuda":
        return [("florence_tiny", 800, 1344, 1 if quick else 2, 256, 6, 80, (16, 200))]
    return [("florence_cpu_demo", 128, 128, 4 if quick else 8, 64, 2, 10, (10, 60))]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for cfg, H, W, B, C, N, K, (lo, hi) in _setups(quick, device):

        def make_inputs(device, dtype, cfg=cfg, H=H, W=W, B=B, C=C, N=N, K=K, lo=lo, hi=hi):
            g = torch.Generator().manual_seed(0)
            images = torch.randn(B, 3, H, W, generator=g).to(device, dtype)
            boxes, labels = [], []
            for _ in range(B):
                side = lo + (hi - lo) * torch.rand(8, 2, generator=g)
                xy = torch.rand(8, 2, generator=g) * (torch.tensor([W, H]) - side)
                boxes.append(torch.cat([xy, xy + side], 1).to(device))
                labels.append(torch.randint(K, (8,), generator=g).to(device))
            return images, boxes, labels, (cfg, C, N, K)

        params = {"model": cfg, "height": H, "width": W, "batch": B, "fpn_channels": C, "blocks": N, "classes": K}
        out.append(Case(f"atss_dyhead_{cfg}_{H}x{W}_b{B}_c{C}_n{N}", params, make_inputs, items=B))
    return out


@functools.cache
def _model(cfg, C, N, K, backend, device, dtype):
    torch.manual_seed(0)
    vision = get_config(cfg)["vision"] | {"drop_path_rate": 0.0}
    return ATSSDetector(vision, K, fpn_channels=C, num_blocks=N, backend=backend).to(device, dtype).train()


def _step(backend):
    def fn(images, boxes, labels, spec):
        model = _model(*spec, backend, images.device.type, images.dtype)
        outputs = model(images)
        return model.loss(tuple(o.float() for o in outputs), boxes, labels, tuple(images.shape[-2:]))["loss"]

    return fn


def _only(device_kind):
    return lambda device: None if device == device_kind else f"runs on {device_kind} only"


def providers(device: str) -> list[Provider]:
    return [
        Provider("reference", _step("reference"), modes=("full",)),
        Provider("fused", _step(None), modes=("full",)),
        Provider("cpp", _step("cpp"), _only("cpu"), modes=("full",)),
        Provider("triton", _step("triton"), _only("cuda"), modes=("full",)),
        Provider("cuda", _step("cuda"), _only("cuda"), modes=("full",)),
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_detection"))
