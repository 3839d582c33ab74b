"""Modulated deformable convolution (DCNv2), the spatial-aware attention of Dynamic Head.

``modulated_deform_conv2d(input, offset, mask, weight, bias, stride=, padding=, dilation=)`` has the semantics and
layouts of ``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)``:

- input (B, C_in, H, W); weight (C_out, C_in / groups, kh, kw) (groups = C_in / weight.shape[1]);
- offset (B, 2 G kh kw, H_out, W_out) with G offset groups: channel 2 (g K + k) is the row (y) offset and
  2 (g K + k) + 1 the column (x) offset of kernel tap k = i kw + j for the input channels of group g;
- mask (B, G kh kw, H_out, W_out), multiplying each sampled value;
- a tap samples input at (ho s_h - p_h + i d_h + dy, wo s_w - p_w + j d_w + dx) bilinearly; a point with
  y <= -1, y >= H, x <= -1 or x >= W reads 0, and corners outside the image count as 0.

Read top to bottom: argument checks, the literal reference, the grid_sample path, the registry, the public
function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import Backend, Op, register_op


def _pair(name, v):
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int) for a in t):
        raise ValueError(f"{name}: expected an int or 2 ints, got {v!r}")
    return t


def _sampling_positions(offset, kh, kw, G, stride, padding, dilation, H_out, W_out):
    """(y, x) of every tap: each (B, G, K, H_out, W_out), in input pixel coordinates."""
    B = offset.shape[0]
    K = kh * kw
    off = offset.view(B, G, K, 2, H_out, W_out)
    dev, dt = offset.device, offset.dtype
    ki = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw) * dilation[0]  # (K,)
    kj = torch.arange(kw, device=dev, dtype=dt).repeat(kh) * dilation[1]
    ho = torch.arange(H_out, device=dev, dtype=dt) * stride[0] - padding[0]
    wo = torch.arange(W_out, device=dev, dtype=dt) * stride[1] - padding[1]
    y = ho.view(1, 1, 1, H_out, 1) + ki.view(1, 1, K, 1, 1) + off[:, :, :, 0]
    x = wo.view(1, 1, 1, 1, W_out) + kj.view(1, 1, K, 1, 1) + off[:, :, :, 1]
    return y, x


# --- reference: bilinear sampling written out -----------------------------------------------------------------------


def deform_conv_reference(inp, offset, mask, weight, bias, stride, padding, dilation, G):
    """Four corners per tap, zero outside the image, times the mask, then the grouped convolution sum."""
    B, C_in, H, W = inp.shape
    C_out, cpg, kh, kw = weight.shape
    K = kh * kw
    H_out, W_out = offset.shape[-2:]
    y, x = _sampling_positions(offset, kh, kw, G, stride, padding, dilation, H_out, W_out)
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    src = inp.view(B, G, C_in // G, H * W)
    sampled = 0
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long().view(B, G, 1, -1)
        vals = torch.gather(src, 3, idx.expand(B, G, C_in // G, idx.shape[-1]))
        vals = vals.view(B, G, C_in // G, K, H_out, W_out)
        sampled = sampled + vals * (wgt * ok).unsqueeze(2)
    if mask is not None:
        sampled = sampled * mask.view(B, G, 1, K, H_out, W_out)
    cols = sampled.reshape(B, C_in, K, H_out * W_out)
    groups = C_in // cpg
    cols = cols.view(B, groups, cpg * K, H_out * W_out)
    w = weight.view(groups, C_out // groups, cpg * K)
    out = torch.einsum("gok,bgkn->bgon", w, cols).reshape(B, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


# --- torch: grid_sample per offset group, one GEMM per convolution group ---------------------------------------------
# F.grid_sample (bilinear, zero padding, align_corners=False with coordinates mapped so that pixel centres sit at
# integers) is exactly torchvision's sampling rule, including the partial corners of points within one pixel of the
# border, and has fused backward kernels for the input and the grid (the offsets). Columns (B, C_in K, H_out W_out)
# are materialised per call: the portable path trades that memory for two library calls.


def deform_conv_torch(inp, offset, mask, weight, bias, stride, padding, dilation, G):
    if inp.dtype in (torch.float16, torch.bfloat16):  # sample and accumulate (also the gradients) in fp32
        args = [t.float() if t is not None else None for t in (inp, offset, mask, weight, bias)]
        return deform_conv_torch(*args, stride, padding, dilation, G).to(inp.dtype)
    B, C_in, H, W = inp.shape
    C_out, cpg, kh, kw = weight.shape
    K = kh * kw
    H_out, W_out = offset.shape[-2:]
    y, x = _sampling_positions(offset, kh, kw, G, stride, padding, dilation, H_out, W_out)
    # grid_sample's normalised coordinates for align_corners=False: u = (2 x + 1) / W - 1
    grid = torch.stack(((2 * x + 1) / W - 1, (2 * y + 1) / H - 1), dim=-1)  # (B, G, K, H_out, W_out, 2)
    grid = grid.view(B * G, K * H_out, W_out, 2).to(inp.dtype)
    src = inp.reshape(B * G, C_in // G, H, W)
    sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(B, G, C_in // G, K, H_out * W_out)
    if mask is not None:
        sampled = sampled * mask.reshape(B, G, 1, K, H_out * W_out)
    groups = C_in // cpg
    cols = sampled.reshape(B, groups, cpg * K, H_out * W_out)
    w = weight.reshape(groups, C_out // groups, cpg * K)
    out = torch.matmul(w.unsqueeze(0), cols).reshape(B, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


# --- cpp: florence_kernels._C (csrc/deform_conv/), tiled columns, shared bilinear code ----------------------------


@torch.library.custom_op("florence_kernels::deform_conv2d_cpp", mutates_args=())
def _dcn_cpp_op(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
) -> torch.Tensor:  # fmt: skip
    return torch.ops.florence_kernels_C.deform_conv2d_fwd(input, offset, mask, weight, bias, stride, padding, dilation)


@_dcn_cpp_op.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation):
    return input.new_empty((input.shape[0], weight.shape[0], *offset.shape[2:]))


@torch.library.custom_op("florence_kernels::deform_conv2d_cpp_bwd", mutates_args=())
def _dcn_cpp_bwd_op(
    grad: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return torch.ops.florence_kernels_C.deform_conv2d_bwd(grad, input, offset, mask, weight, stride, padding, dilation)


@_dcn_cpp_bwd_op.register_fake
def _(grad, input, offset, mask, weight, stride, padding, dilation):
    gm = torch.empty_like(mask) if mask is not None else input.new_empty(0)
    return torch.empty_like(input), torch.empty_like(offset), gm, torch.empty_like(weight)


def _dcn_setup(ctx, inputs, output):
    input, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.args = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _dcn_backward(ctx, grad):
    input, offset, mask, weight = ctx.saved_tensors
    gi, go, gm, gw = _dcn_cpp_bwd_op(grad.contiguous(), input, offset, mask, weight, *ctx.args)
    gb = grad.sum((0, 2, 3)) if ctx.has_bias else None
    return gi, go, (gm if mask is not None else None), gw, gb, None, None, None


_dcn_cpp_op.register_autograd(_dcn_backward, setup_context=_dcn_setup)


# --- registry -------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

MODULATED_DEFORM_CONV2D = register_op(
    Op(
        "modulated_deform_conv2d",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "cpp": Backend("cpp", ("cpu",), (*_FLOATS, torch.float64)),
        },
    )
)


# --- public function ------------------------------------------------------------------------------------------------


def modulated_deform_conv2d(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1, backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """DCNv2 with torchvision.ops.deform_conv2d's semantics and layouts (see the module docstring).

    Returns (B, C_out, H_out, W_out); gradients for input, offset, mask, weight and bias.
    """
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    for name, t, dim in (("input", input, 4), ("offset", offset, 4), ("weight", weight, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a {dim}-D tensor, got {got}")
    B, C_in, H, W = input.shape
    C_out, cpg, kh, kw = weight.shape
    if C_in % cpg or C_out % (C_in // cpg):
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not divide input channels {C_in} into groups")
    H_out = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_out = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    K = kh * kw
    if offset.shape[0] != B or offset.shape[1] % (2 * K) or tuple(offset.shape[2:]) != (H_out, W_out):
        raise ValueError(
            f"offset: expected (B={B}, 2 * offset_groups * {K}, {H_out}, {W_out}), got {tuple(offset.shape)}"
        )
    G = offset.shape[1] // (2 * K)
    if C_in % G:
        raise ValueError(f"offset: {G} offset groups do not divide the {C_in} input channels")
    if mask is not None and tuple(mask.shape) != (B, G * K, H_out, W_out):
        raise ValueError(f"mask: expected shape {(B, G * K, H_out, W_out)}, got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"bias: expected shape ({C_out},), got {tuple(bias.shape)}")
    name = MODULATED_DEFORM_CONV2D.select([input, offset, weight], backend)
    if name == "cpp":
        args = [input, offset, mask, weight, bias]
        if input.dtype in (torch.float16, torch.bfloat16):  # the C++ kernel computes fp16/bf16 in fp32
            args = [t.float() if t is not None else None for t in args]
        out = _dcn_cpp_op(*args, list(stride), list(padding), list(dilation))
        return out.to(input.dtype)
    impl = deform_conv_reference if name == "reference" else deform_conv_torch
    return impl(input, offset, mask, weight, bias, stride, padding, dilation, G)
