"""Shifted-window attention with relative position bias (q, k, v grids -> output grid), forward / backward / full,
against the literal reference and torch.compile of it, at Swin, Video Swin and CoSwin stage shapes.

    python -m benchmarks.bench_window_attention [--quick] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import functools
import sys

import torch

import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for
from florence_kernels.ops.window_attention import bias_table_rows, window_attention_reference

NAME = "window_attention"

# (name, grid (B, T, H, W), heads, head_dim, window, shift)
FULL = [
    ("swin_t_224_s1_b32", (32, 1, 56, 56), 3, 32, (1, 7, 7), (0, 3, 3)),
    ("swin_t_224_s3_b32", (32, 1, 14, 14), 12, 32, (1, 7, 7), (0, 3, 3)),
    ("swin_b_384_s1_b8", (8, 1, 96, 96), 4, 32, (1, 12, 12), (0, 6, 6)),
    ("video_swin_b_s1_b2", (2, 16, 56, 56), 4, 32, (8, 7, 7), (4, 3, 3)),
    ("coswin_h_384_s1_b4", (4, 1, 96, 96), 11, 32, (1, 12, 12), (0, 6, 6)),
]
QUICK = [
    ("swin_t_224_s1_b2", (2, 1, 56, 56), 3, 32, (1, 7, 7), (0, 3, 3)),
    ("video_swin_s1_t4_b1", (1, 4, 28, 28), 4, 32, (4, 7, 7), (2, 3, 3)),
]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    es = torch.tensor([], dtype=dtype).element_size()
    for name, (B, T, H, W), nh, hd, window, shift in QUICK if quick else FULL:
        tokens = B * T * H * W
        N = window[0] * window[1] * window[2]
        fwd_flops = 4.0 * tokens * N * nh * hd  # q k^T and p v over every window (padding ignored)
        fwd_bytes = 4.0 * tokens * nh * hd * es  # read q, k, v, write o

        def make_inputs(device, dtype, B=B, T=T, H=H, W=W, nh=nh, hd=hd, window=window, shift=shift):
            qkv = torch.randn(B, T, H, W, 3, nh, hd, device=device, dtype=dtype, requires_grad=True)
            table = (0.02 * torch.randn(bias_table_rows(window), nh, device=device, dtype=dtype)).requires_grad_()
            q, k, v = qkv.unbind(4)
            return q, k, v, table, window, shift, qkv

        out.append(
            Case(
                name,
                {"grid": f"{B}x{T}x{H}x{W}", "heads": nh, "head_dim": hd, "window": "x".join(map(str, window))},
                make_inputs,
                bytes_moved=lambda mode, b=fwd_bytes: b * {"forward": 1, "backward": 2, "full": 3}[mode],
                flops=lambda mode, f=fwd_flops: f * {"forward": 1, "backward": 2.5, "full": 3.5}[mode],
            )
        )
    return out


def _backend_provider(backend: str) -> Provider:
    def fn(q, k, v, table, window, shift, qkv):
        return fk.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias=table, backend=backend)

    def unavailable(dev):
        if backend == "triton" and dev == "cpu":
            return "triton on CPU runs only under the interpreter: no timing meaning"
        return "; ".join(fk.OPS["window_attention"].backends[backend].environment_reasons(dev)) or None

    return Provider(backend, fn, unavailable)


@functools.cache
def _compiled_reference(window, shift):
    def ref(q, k, v, table):
        return window_attention_reference(q, k, v, window, shift, table, q.shape[-1] ** -0.5)

    return torch.compile(ref, dynamic=False)


@functools.cache
def _timm_block(H, W, nh, hd, window, shift, device, dtype):
    """timm's SwinTransformerBlock with identity qkv/proj: its attention core (SDPA or matmul path, its bias and
    shift mask) on already-projected q, k, v."""
    from timm.models.swin_transformer import SwinTransformerBlock

    blk = SwinTransformerBlock(nh * hd, (H, W), nh, window_size=window[1:], shift_size=shift[1:])
    blk.attn.qkv = torch.nn.Identity()
    blk.attn.proj = torch.nn.Identity()
    return blk.to(device, dtype)


def _timm_attention(q, k, v, table, window, shift, qkv):
    """timm's 2-D code path around its WindowAttention: roll, window_partition, attention, window_reverse, roll."""
    from timm.models.swin_transformer import window_partition, window_reverse

    B, T, H, W, _, nh, hd = qkv.shape
    blk = _timm_block(H, W, nh, hd, window, shift, qkv.device, qkv.dtype)
    wh, ww = window[1:]
    x = qkv.view(B, H, W, 3 * nh * hd)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[1], -shift[2]), dims=(1, 2))
    o = blk.attn(window_partition(x, (wh, ww)).view(-1, wh * ww, 3 * nh * hd), mask=blk.attn_mask)
    o = window_reverse(o.view(-1, wh, ww, nh * hd), (wh, ww), H, W)
    if any(shift):
        o = torch.roll(o, shifts=shift[1:], dims=(1, 2))
    return o


def _timm_unavailable(dev):
    try:
        import timm  # noqa: F401
    except ImportError:
        return "timm is not installed"
    return None


def providers(device: str) -> list[Provider]:
    def compiled(q, k, v, table, window, shift, qkv):
        return _compiled_reference(window, shift)(q, k, v, table)

    def timm_2d_only(case):
        return None if case.params["window"].startswith("1x") else "timm's Swin attention is 2-D only"

    return [_backend_provider(b) for b in ("reference", "torch", "cpp", "triton")] + [
        Provider("torch.compile", compiled),
        Provider("timm", _timm_attention, _timm_unavailable, skip_case=timm_2d_only),
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_window_attention"))
