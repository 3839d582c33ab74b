"""Dynamic Head: the modulated deformable convolution at FPN levels of an 800x1333 image (256 channels) against
torchvision.ops.deform_conv2d; one level's scale- and task-aware steps (three terms: the literal modules on the
reference provider, the one-pass scale_task_attention on the others); and one DyHeadBlock on the P3-P7 pyramid,
forward / backward / full.

    python -m benchmarks.bench_dyhead [--quick] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import functools
import sys

import torch

import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for

NAME = "dyhead"
PER_MODE = {"forward": 1, "backward": 2, "full": 3}  # GEMM passes of each mode
LEVELS = {"P3": (100, 167), "P4": (50, 84), "P5": (25, 42), "P6": (13, 21), "P7": (7, 11)}


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    C = 256
    out = []
    dcn_levels = ["P5"] if quick else (["P4"] if device == "cpu" else ["P3", "P4", "P5"])
    for lvl in dcn_levels:
        H, W = LEVELS[lvl]
        B = 2

        def make_dcn(device, dtype, B=B, H=H, W=W):
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g).requires_grad_()
            off = (2 * torch.randn(B, 18, H, W, device=device, generator=g)).to(dtype).requires_grad_()
            mask = torch.rand(B, 9, H, W, device=device, generator=g).to(dtype).requires_grad_()
            w = (0.02 * torch.randn(C, C, 3, 3, device=device, generator=g)).to(dtype).requires_grad_()
            return "dcn", x, off, mask, w

        flops = 2.0 * B * H * W * C * C * 9
        params = {"what": "deform conv", "level": lvl, "shape": f"{B}x{C}x{H}x{W}"}
        out.append(Case(f"dcn_{lvl}_b{B}", params, make_dcn, flops=lambda mode, f=flops: f * PER_MODE[mode]))
    lvl = "P5" if quick else ("P4" if device == "cpu" else "P3")
    H, W = LEVELS[lvl]

    def make_level(device, dtype, H=H, W=W):
        g = torch.Generator(device=device).manual_seed(1)
        terms = [torch.randn(2, C, H, W, device=device, generator=g).to(dtype).requires_grad_() for _ in range(3)]
        return ("level", *terms)

    out.append(Case(f"scale_task_{lvl}_b2", {"what": "scale+task attention", "level": lvl, "shape": f"2x{C}x{H}x{W}"},
                    make_level))  # fmt: skip
    if not quick:
        pyramid = list(LEVELS.values()) if device == "cuda" else list(LEVELS.values())[1:]

        def make_block(device, dtype, pyramid=tuple(pyramid)):
            g = torch.Generator(device=device).manual_seed(0)
            xs = [torch.randn(1, C, h, w, device=device, generator=g).to(dtype).requires_grad_() for h, w in pyramid]
            return ("block", *xs)

        name = "P3-P7" if len(pyramid) == 5 else "P4-P7"
        out.append(Case(f"dyhead_block_{name}_b1", {"what": "DyHeadBlock", "level": name, "shape": f"1x{C}"},
                        make_block))  # fmt: skip
    return out


@functools.cache
def _block(backend, device, dtype):
    from florence_kernels.nn import DyHeadBlock

    torch.manual_seed(0)
    blk = DyHeadBlock(256, backend=backend)
    with torch.no_grad():
        blk.spatial_conv_offset.weight.normal_(0, 0.01)  # sampling away from the grid, as after training
    return blk.to(device, dtype)


def _ours(backend):
    def fn(kind, *args):
        if kind == "dcn":
            x, off, mask, w = args
            return fk.modulated_deform_conv2d(x, off, mask, w, None, padding=1, backend=backend)
        if kind == "level":
            from florence_kernels.nn import scale_attention_terms

            blk = _block(backend, args[0].device.type, args[0].dtype)
            conv = blk.scale_attn_module[1]
            if backend == "reference":
                return blk.task_attn_module(scale_attention_terms(list(args), conv.weight, conv.bias, backend))
            return blk._fused_level(list(args), conv)
        outs = _block(backend, args[0].device.type, args[0].dtype)(list(args))
        return torch.cat([o.flatten() for o in outs])

    def unavailable(dev):
        return "; ".join(fk.OPS["modulated_deform_conv2d"].backends[backend].environment_reasons(dev)) or None

    return Provider(backend, fn, unavailable)


def _torchvision(kind, x, off, mask, w):
    import torchvision.ops

    return torchvision.ops.deform_conv2d(x, off, w, None, padding=1, mask=mask)


def providers(device: str) -> list[Provider]:
    return [
        _ours("reference"),
        _ours("torch"),
        _ours("cpp"),
        _ours("cuda"),
        _ours("triton"),
        Provider(
            "torchvision",
            _torchvision,
            skip_case=lambda c: None if c.params["what"] == "deform conv" else "torchvision has no DyHead block",
        ),  # fmt: skip
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_dyhead"))
