"""A whole Swin block (LN, W-MSA with bias and shift mask, MLP), forward / backward / full: florence_kernels.nn
SwinBlock3D on each backend against timm's SwinTransformerBlock with the same weights (2-D, T = 1).

    python -m benchmarks.bench_swin_block [--quick] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import functools
import sys

import torch

from benchmarks.harness import Case, Provider, main_for
from florence_kernels import OPS
from florence_kernels.nn import SwinBlock3D

NAME = "swin_block"

# (name, (B, H, W, C), heads, window, shift)
FULL = [("swin_t_s1_b8", (8, 56, 56, 96), 3, 7, 3), ("swin_t_s3_b8", (8, 14, 14, 384), 12, 7, 3)]
QUICK = [("swin_t_s1_b2", (2, 56, 56, 96), 3, 7, 3)]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for name, shape, nh, window, shift in QUICK if quick else FULL:

        def make_inputs(device, dtype, shape=shape, nh=nh, window=window, shift=shift):
            return torch.randn(shape, device=device, dtype=dtype, requires_grad=True), nh, window, shift

        out.append(Case(name, {"shape": "x".join(map(str, shape)), "heads": nh, "window": window}, make_inputs))
    return out


@functools.cache
def _blocks(shape, nh, window, shift, device, dtype):
    """timm's block and ours with the same weights (one copy per shape, reused across modes)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(0)
    B, H, W, C = shape
    timm_block = SwinTransformerBlock(C, (H, W), nh, window_size=window, shift_size=shift).to(device, dtype)
    ours = {}
    for backend in ("reference", "torch", "cpp", "triton"):
        blk = SwinBlock3D(C, nh, (window, window), (shift, shift), backend=backend).to(device, dtype)
        blk.load_state_dict(timm_block.state_dict())
        ours[backend] = blk
    return timm_block, ours


def providers(device: str) -> list[Provider]:
    def ours(backend):
        def fn(x, nh, window, shift):
            return _blocks(tuple(x.shape), nh, window, shift, x.device.type, x.dtype)[1][backend](x)

        def unavailable(dev):
            if backend == "triton" and dev == "cpu":
                return "triton on CPU runs only under the interpreter: no timing meaning"
            return "; ".join(OPS["window_attention"].backends[backend].environment_reasons(dev)) or None

        return Provider(backend, fn, unavailable)

    def timm_fn(x, nh, window, shift):
        return _blocks(tuple(x.shape), nh, window, shift, x.device.type, x.dtype)[0](x)

    def timm_unavailable(dev):
        try:
            import timm  # noqa: F401
        except ImportError:
            return "timm is not installed"
        return None

    return [ours("reference"), Provider("timm", timm_fn, timm_unavailable), ours("torch"), ours("cpp"), ours("triton")]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_swin_block"))
