"""Convolutional embedding (conv + LayerNorm -> channels-last tokens), forward / backward / full: CoSwin's stem and
patch merges at 224 and 384, and Video CoSwin's 3-D stem and merge; the literal reference, torch.compile of it, the
channels-last torch path (cuDNN/oneDNN conv + LayerNorm on its memory as is) and the Triton implicit GEMM with the
LayerNorm in its epilogue.

    python -m benchmarks.bench_conv_embed [--quick] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import functools
import sys

import torch

import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for
from florence_kernels.ops.conv_embed import conv_embed_reference

NAME = "conv_embed"

# (name, input shape, layout, C_out, kernel, stride, padding); batch (CPU, GPU)
SHAPES = [
    ("coswin_t_stem_224", (3, 224, 224), "channels_first", 96, 7, 4, 2, (8, 128)),
    ("coswin_t_merge1_224", (56, 56, 96), "channels_last", 192, 3, 2, 1, (8, 128)),
    ("coswin_t_merge3_224", (14, 14, 384), "channels_last", 768, 3, 2, 1, (8, 128)),
    ("coswin_h_stem_384", (3, 384, 384), "channels_first", 352, 7, 4, 2, (2, 32)),
    ("video_stem_16x224", (3, 16, 224, 224), "channels_first", 96, (2, 7, 7), (2, 4, 4), (0, 2, 2), (1, 8)),
    ("video_merge1_8x56", (8, 56, 56, 96), "channels_last", 192, 3, (1, 2, 2), 1, (1, 8)),
]
QUICK = [
    ("coswin_t_stem_224", (3, 224, 224), "channels_first", 96, 7, 4, 2, (1, 8)),
    ("video_merge1_4x28", (4, 28, 28, 96), "channels_last", 192, 3, (1, 2, 2), 1, (1, 4)),
]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for name, shape, layout, c_out, k, s, p, batches in QUICK if quick else SHAPES:
        B = batches[0 if device == "cpu" else 1]
        c_in = shape[0] if layout == "channels_first" else shape[-1]
        spatial = len(shape) - 1
        ks = (k,) * spatial if isinstance(k, int) else k

        def make_inputs(device, dtype, B=B, shape=shape, c_in=c_in, c_out=c_out, ks=ks, s=s, p=p, layout=layout):
            x = torch.randn(B, *shape, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(c_out, c_in, *ks, device=device, dtype=dtype) * 0.05).requires_grad_()
            b, nw, nb = (torch.randn(c_out, device=device, dtype=dtype).requires_grad_() for _ in range(3))
            return x, w, b, nw, nb, s, p, layout

        out.append(Case(f"{name}_b{B}", {"input": "x".join(map(str, (B, *shape))), "c_out": c_out, "layout": layout},
                        make_inputs))  # fmt: skip
    return out


def _backend(name):
    def fn(x, w, b, nw, nb, s, p, layout):
        return fk.conv_embed(x, w, b, nw, nb, stride=s, padding=p, input_layout=layout, backend=name)

    def unavailable(dev):
        if name == "triton" and dev == "cpu":
            return "triton on CPU runs only under the interpreter: no timing meaning"
        return "; ".join(fk.OPS["conv_embed"].backends[name].environment_reasons(dev)) or None

    def skip_case(case):
        if name == "triton" and case.params["c_out"] > 512:
            return "triton: C_out > 512 does not fit the LayerNorm epilogue's block (falls back to torch)"
        return None

    return Provider(name, fn, unavailable, skip_case=skip_case)


@functools.cache
def _compiled(spatial: int):
    def ref(x, w, b, nw, nb, s, p, layout):
        sp = (s,) * spatial if isinstance(s, int) else tuple(s)
        pp = (p,) * spatial if isinstance(p, int) else tuple(p)
        return conv_embed_reference(x, w, b, nw, nb, sp, pp, 1e-5, layout)

    return torch.compile(ref, dynamic=False)


def providers(device: str) -> list[Provider]:
    def compiled(x, w, b, nw, nb, s, p, layout):
        return _compiled(w.dim() - 2)(x, w, b, nw, nb, s, p, layout)

    return [_backend("reference"), _backend("torch"), _backend("triton"), Provider("torch.compile", compiled)]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_conv_embed"))
