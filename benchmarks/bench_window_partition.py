"""Fused shift + window partition (forward: partition; backward: its reverse scatter) against the literal reference
and torch.compile of it, at Swin-T stage-1 and Video Swin stage-1 shapes.

    python -m benchmarks.bench_window_partition [--quick] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import functools
import sys

import torch

import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for
from florence_kernels.ops.window_partition import window_partition_reference

NAME = "window_partition"

# (name, shape, window, shift): Swin-T stage 1 and Video Swin stage 1 (KERNELS.md).
FULL = [
    ("swin_t_s1_b64", (64, 56, 56, 96), (7, 7), (3, 3)),
    ("video_swin_s1_b4", (4, 16, 56, 56, 96), (8, 7, 7), (4, 3, 3)),
]
QUICK = [
    ("swin_t_s1_b8", (8, 56, 56, 96), (7, 7), (3, 3)),
    ("video_swin_s1_t8_b1", (1, 8, 56, 56, 96), (8, 7, 7), (4, 3, 3)),
]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for name, shape, window, shift in QUICK if quick else FULL:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = 2 * numel * torch.tensor([], dtype=dtype).element_size()  # read + write of one gather

        def make_inputs(device, dtype, shape=shape, window=window, shift=shift):
            return torch.randn(shape, device=device, dtype=dtype, requires_grad=True), window, shift

        out.append(
            Case(
                name,
                {
                    "shape": "x".join(map(str, shape)),
                    "window": "x".join(map(str, window)),
                    "shift": "x".join(map(str, shift)),
                },
                make_inputs,
                bytes_moved=lambda mode, nbytes=nbytes: nbytes * (2 if mode == "full" else 1),
            )
        )
    return out


def _backend_provider(backend: str, device: str) -> Provider:
    def fn(x, window, shift):
        return fk.window_partition(x, window, shift, backend=backend)

    def unavailable(dev):
        if backend == "triton" and dev == "cpu":
            return "triton on CPU runs only under the interpreter: no timing meaning"
        reasons = fk.OPS["window_partition"].backends[backend].environment_reasons(dev)
        return "; ".join(reasons) or None

    return Provider(backend, fn, unavailable)


@functools.cache
def _compiled_reference(window, shift):
    def ref(x):
        x5 = x.unsqueeze(1) if x.dim() == 4 else x
        w = (1, *window) if len(window) == 2 else window
        s = (0, *shift) if len(shift) == 2 else shift
        return window_partition_reference(x5, w, s)

    return torch.compile(ref, dynamic=False)


def providers(device: str) -> list[Provider]:
    def compiled(x, window, shift):
        return _compiled_reference(window, shift)(x)

    def copy_floor(x, window, shift):
        # Not a partition: one read + one write into a fresh tensor (forward and backward), the floor for any
        # gather that returns a new tensor. On the 2-core CPU VMs most of it is page-faulting the new pages in.
        return x * 1

    return [_backend_provider(b, device) for b in ("reference", "torch", "cpp", "triton", "cuda")] + [
        Provider("torch.compile", compiled),
        Provider("copy-floor", copy_floor),
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_window_partition"))
