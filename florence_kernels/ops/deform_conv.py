"""Modulated deformable convolution (DCNv2), the spatial-aware attention of Dynamic Head.

``modulated_deform_conv2d(input, offset, mask, weight, bias, stride=, padding=, dilation=)`` has the semantics and
layouts of ``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)``:

- input (B, C_in, H, W); weight (C_out, C_in / groups, kh, kw) (groups = C_in / weight.shape[1]);
- offset (B, 2 G kh kw, H_out, W_out) with G offset groups: channel 2 (g K + k) is the row (y) offset and
  2 (g K + k) + 1 the column (x) offset of kernel tap k = i kw + j for the input channels of group g;
- mask (B, G kh kw, H_out, W_out), multiplying each sampled value;
- a tap samples input at (ho s_h - p_h + i d_h + dy, wo s_w - p_w + j d_w + dx) bilinearly (the integer base plus
  the offset, in that order); a point with y <= -1, y >= H, x <= -1 or x >= W reads 0, and corners outside the
  image count as 0.

Edges, the same on every backend and equal to torchvision's (tested against it in float64):
- gradients at integer positions (every tap when offsets are zero, as DyHead starts training): the offset
  gradient is the derivative on the cell [floor(y), floor(y) + 1] x [floor(x), floor(x) + 1], i.e. one-sided
  towards the increasing coordinate, also at y = -1 or x = -1 (where the value is 0 but the cell reaches the
  image); for every stride, padding, dilation and offset group;
- non-finite offsets: a tap with an infinite coordinate reads 0 (it lies outside), adds nothing to the input
  gradient, has mask gradient 0 and offset gradient 0 for the infinite coordinate and NaN for the other one (0 x inf,
  torchvision's formula); a NaN coordinate reads NaN (so does every output it feeds, and the weight and mask
  gradients that use it) and adds nothing to the input gradient;
- fp16/bf16: coordinates, bilinear weights and accumulation in fp32 on every backend (the reference too);
- an empty batch gives an empty output and empty (or zero) gradients; inputs may have any strides.

Backends: reference (the four corners written out, autograd), torch (gathers from a zero-bordered input with an
explicit backward, any device), cpp and cuda (the extension florence_kernels._C: csrc/deform_conv/, one shared
``__host__ __device__`` sampling code), triton (implicit GEMM with the bilinear sampling in the operand loader; its
backward is the torch path's).

Read top to bottom: argument checks, the literal reference, the torch path, the extension op, the Triton kernel, the
registry, the public function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _env
from .._dispatch import Backend, Op, autocast_cast, fresh_output, register_op

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON = False


def _pair(name, v):
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int) for a in t):
        raise ValueError(f"{name}: expected an int or 2 ints, got {v!r}")
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sampling coordinates, bilinear weights and accumulation run in fp32 for fp16/bf16 inputs (a bf16 coordinate
    near 50 has a step of 0.25), in the input's dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sampling_positions(offset, kh, kw, G, stride, padding, dilation, H_out, W_out, dtype):
    """(y, x) of every tap, each (B, G, K, H_out, W_out) in ``dtype``: the integer base ``ho s - p + i d`` plus the
    offset, summed in that order as torchvision does (so an integer offset lands exactly on a pixel)."""
    B = offset.shape[0]
    K = kh * kw
    off = offset.to(dtype).reshape(B, G, K, 2, H_out, W_out)
    dev = offset.device
    ki = torch.arange(kh, device=dev).repeat_interleave(kw) * dilation[0]  # (K,)
    kj = torch.arange(kw, device=dev).repeat(kh) * dilation[1]
    ho = torch.arange(H_out, device=dev) * stride[0] - padding[0]
    wo = torch.arange(W_out, device=dev) * stride[1] - padding[1]
    y_base = (ho.view(1, H_out, 1) + ki.view(K, 1, 1)).to(dtype)  # (K, H_out, 1): exact integers
    x_base = (wo.view(1, 1, W_out) + kj.view(K, 1, 1)).to(dtype)
    return y_base + off[:, :, :, 0], x_base + off[:, :, :, 1]


# --- reference: bilinear sampling written out -----------------------------------------------------------------------
# torchvision's rules (csrc/ops/cpu/deform_conv2d_kernel.cpp), corner by corner: corners outside the image read 0; a
# point with y <= -1, y >= H, x <= -1 or x >= W reads 0 (infinite coordinates included); a NaN coordinate reads NaN.
# Autograd of this expression is torchvision's backward convention: the derivative in y is taken on the cell
# [floor(y), floor(y) + 1], i.e. one-sided towards the increasing coordinate at integer positions, y = -1 included
# (the value is 0 there but the slope reaches row 0: torchvision's coordinate weight has no outside test, so neither
# has this gradient); masks are torch.where, so the NaN weights of a non-finite tap never reach the input gradient,
# while its offset gradient is torchvision's (0 for the infinite coordinate, NaN = 0 x inf for the other one).


class _ZeroOutside(torch.autograd.Function):
    """where(outside, 0, value) forward; the gradient passes to ``value`` unchanged (see above)."""

    @staticmethod
    def forward(ctx, value, outside):
        return value.masked_fill(outside, 0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _outside(y, x, H, W):
    """torchvision's test for a point that reads 0 (False for NaN coordinates)."""
    return (y <= -1) | (y >= H) | (x <= -1) | (x >= W)


def deform_conv_reference(inp, offset, mask, weight, bias, stride, padding, dilation, G):
    """Four corners per tap, times the mask, then the grouped convolution sum (einsum); coordinates in fp32 at least."""
    B, C_in, H, W = inp.shape
    C_out, cpg, kh, kw = weight.shape
    K = kh * kw
    H_out, W_out = offset.shape[-2:]
    ct = compute_dtype(inp.dtype)
    y, x = sampling_positions(offset, kh, kw, G, stride, padding, dilation, H_out, W_out, ct)
    finite = torch.isfinite(y) & torch.isfinite(x)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    src = inp.to(ct).reshape(B, G, C_in // G, H * W)
    sampled = 0
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        ok = finite & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = torch.where(ok, yy * W + xx, 0).long().reshape(B, G, 1, K * H_out * W_out)
        vals = torch.gather(src, 3, idx.expand(B, G, C_in // G, idx.shape[-1]))
        vals = torch.where(ok.reshape(B, G, 1, K * H_out * W_out), vals, 0).reshape(B, G, C_in // G, K, H_out, W_out)
        sampled = sampled + vals * wgt.unsqueeze(2)
    sampled = _ZeroOutside.apply(sampled, _outside(y, x, H, W).unsqueeze(2))
    if mask is not None:
        sampled = sampled * mask.to(ct).reshape(B, G, 1, K, H_out, W_out)
    groups = C_in // cpg
    cols = sampled.reshape(B, groups, cpg * K, H_out * W_out)
    w = weight.to(ct).reshape(groups, C_out // groups, cpg * K)
    out = torch.einsum("gok,bgkn->bgon", w, cols).reshape(B, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias.to(ct).view(1, -1, 1, 1)
    return out.to(inp.dtype)


# --- torch: gathers from a zero-bordered input, explicit backward ----------------------------------------------------
# The input is padded by one zero pixel on each side, and every corner index is clamped into [-1, H] x [-1, W]: a
# corner outside the image then reads a zero of the border, with no validity masks. The forward blends the four
# gathered corners (one at a time: at most two column-sized buffers live) and runs one GEMM per convolution group;
# only the inputs are saved. The backward gathers the corners again and forms, per offset group and tap, the channel
# sums S_i = sum_c dcols_c v_i,c of each corner: the offset gradient is torchvision's coordinate weight
# (1 - lx)(S10 - S00) + lx (S11 - S01) in y, the mask gradient sum_i w_i S_i, and the input gradient one scatter-add
# per corner. The same formulas as csrc/deform_conv/bilinear.h, so every backend shares one convention.


class _Bilinear:
    """Corners of every tap in the zero-bordered, flattened input: gather indices (B, G, 1, K P) and weights
    (B, G, 1, K P) per corner (00, 01, 10, 11), fractional parts, which taps read 0 (torchvision's outside test) and
    which are finite."""

    def __init__(self, y, x, H, W):
        B, G, KP = y.shape  # explicit sizes: a -1 is ambiguous for an empty batch
        self.outside = _outside(y, x, H, W).reshape(B, G, 1, KP)
        self.finite = (torch.isfinite(y) & torch.isfinite(x)).reshape(B, G, 1, KP)
        y0, x0 = y.floor(), x.floor()
        self.ly, self.lx = (y - y0).reshape(B, G, 1, KP), (x - x0).reshape(B, G, 1, KP)
        y0, x0 = torch.nan_to_num(y0, nan=-2.0), torch.nan_to_num(x0, nan=-2.0)  # NaN: both corners in the border
        rows = [(y0 + d).clamp(-1, H).add_(1).to(torch.int64) for d in (0, 1)]
        cols = [(x0 + d).clamp(-1, W).add_(1).to(torch.int64) for d in (0, 1)]
        self.index = [(rows[a] * (W + 2) + cols[b]).reshape(B, G, 1, KP) for a in (0, 1) for b in (0, 1)]
        hy, hx = 1 - self.ly, 1 - self.lx
        self.weight = [hy * hx, hy * self.lx, self.ly * hx, self.ly * self.lx]

    def corner(self, src, i):
        """Corner i of every tap: (B, G, C_in / G, K P) from src (B, G, C_in / G, (H + 2) (W + 2))."""
        idx = self.index[i]
        return torch.gather(src, 3, idx.expand(*src.shape[:3], idx.shape[-1]))

    def sample(self, src):
        out = self.corner(src, 0).mul_(self.weight[0])
        for i in range(1, 4):
            out.addcmul_(self.corner(src, i), self.weight[i])
        return out.masked_fill_(self.outside, 0)

    def scatters(self, i):
        """Taps whose corner i receives input gradient: finite, and the corner less than one pixel away on both axes
        (weight > 0), torchvision's col2im test; corners outside the image land in the border."""
        return self.finite & (self.weight[i] > 0)


def _bordered(inp, G, ct):
    """(B, G, C_in / G, (H + 2) (W + 2)) in ct: the input with a one-pixel zero border, flattened per plane."""
    B, C_in, H, W = inp.shape
    return F.pad(inp.to(ct), (1, 1, 1, 1)).reshape(B, G, C_in // G, (H + 2) * (W + 2))


def _torch_plan(inp, offset, weight, stride, padding, dilation, G, ct):
    B, C_in, H, W = inp.shape
    kh, kw = weight.shape[2:]
    H_out, W_out = offset.shape[-2:]
    y, x = sampling_positions(offset, kh, kw, G, stride, padding, dilation, H_out, W_out, ct)
    KP = kh * kw * H_out * W_out
    return _Bilinear(y.reshape(B, G, KP), x.reshape(B, G, KP), H, W)


def deform_conv_torch_fwd(inp, offset, mask, weight, bias, stride, padding, dilation, G):
    B, C_in = inp.shape[:2]
    C_out, cpg, kh, kw = weight.shape
    H_out, W_out = offset.shape[-2:]
    K, P, groups = kh * kw, H_out * W_out, C_in // cpg
    ct = compute_dtype(inp.dtype)
    plan = _torch_plan(inp, offset, weight, stride, padding, dilation, G, ct)
    cols = plan.sample(_bordered(inp, G, ct))  # (B, G, C_in / G, K P), masked in place: one column-sized buffer
    if mask is not None:
        cols.mul_(mask.to(ct).reshape(B, G, 1, K * P))
    cols = cols.reshape(B, groups, cpg * K, P)
    w = weight.to(ct).reshape(1, groups, C_out // groups, cpg * K)
    out = torch.matmul(w, cols).reshape(B, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias.to(ct).view(1, -1, 1, 1)
    return out.to(inp.dtype)


def deform_conv_torch_bwd(grad, inp, offset, mask, weight, stride, padding, dilation, G, needs):
    """Gradients of (input, offset, mask, weight, bias), None where ``needs`` (five flags) is False. Each corner is
    gathered once: it feeds the recomputed columns (weight gradient) and its channel sums S_i (offset and mask)."""
    B, C_in, H, W = inp.shape
    C_out, cpg, kh, kw = weight.shape
    K = kh * kw
    H_out, W_out = offset.shape[-2:]
    P = H_out * W_out
    ct = compute_dtype(inp.dtype)
    groups = C_in // cpg
    plan = _torch_plan(inp, offset, weight, stride, padding, dilation, G, ct)
    src = _bordered(inp, G, ct)
    g = grad.to(ct).reshape(B, groups, C_out // groups, P)
    w = weight.to(ct).reshape(1, groups, C_out // groups, cpg * K)
    m = mask.to(ct).reshape(B, G, 1, K * P) if mask is not None else None
    d_input = d_offset = d_mask = d_weight = d_bias = None
    need_sums = needs[1] or (needs[2] and mask is not None)
    dvals = None  # d loss / d (masked value): (B, G, C_in / G, K P)
    if any(needs[:3]):
        dvals = torch.matmul(w.transpose(-1, -2), g).reshape(B, G, C_in // G, K * P)
    values, S = None, []
    if needs[3] or need_sums:
        for i in range(4):
            v = plan.corner(src, i)
            if need_sums:
                S.append((dvals * v).sum(2, keepdim=True))  # (B, G, 1, K P)
            if needs[3]:
                values = v.mul_(plan.weight[i]) if values is None else values.addcmul_(v, plan.weight[i])
    if needs[3]:
        cols = values.masked_fill_(plan.outside, 0)
        cols = (cols if m is None else cols.mul_(m)).reshape(B, groups, cpg * K, P)
        d_weight = torch.matmul(g, cols.transpose(-1, -2)).sum(0).reshape(weight.shape).to(weight.dtype)
    if needs[4]:
        d_bias = g.sum((0, 3)).reshape(C_out)
    if needs[0]:
        dv = dvals * m if m is not None else dvals
        d_src = torch.zeros_like(src)
        for i in range(4):
            # zero weights where corner i takes no gradient: one pass over dv (a non-finite dv would make 0 x inf
            # there; dv = W^T dOut is finite for finite weights and output gradients)
            wgt = torch.where(plan.scatters(i), plan.weight[i], 0)
            d_src.scatter_add_(3, plan.index[i].expand_as(dv), dv * wgt)
        d_input = d_src.reshape(B, C_in, H + 2, W + 2)[:, :, 1:-1, 1:-1].to(inp.dtype)
    if needs[1]:
        ly, lx = plan.ly, plan.lx
        gy = lx * (S[3] - S[1]) + (1 - lx) * (S[2] - S[0])  # torchvision's get_coordinate_weight, in y
        gx = ly * (S[3] - S[2]) + (1 - ly) * (S[1] - S[0])
        if m is not None:
            gy, gx = gy * m, gx * m
        d_offset = torch.stack((gy.reshape(B, G, K, P), gx.reshape(B, G, K, P)), 3)
        d_offset = d_offset.reshape(offset.shape).to(offset.dtype)
    if needs[2] and mask is not None:
        gm = sum(plan.weight[i] * S[i] for i in range(4)).masked_fill_(plan.outside, 0)
        d_mask = gm.reshape(mask.shape).to(mask.dtype)
    return d_input, d_offset, d_mask, d_weight, d_bias


class _DcnTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, offset, mask, weight, bias, stride, padding, dilation, G):
        ctx.save_for_backward(inp, offset, mask, weight)
        ctx.args = (stride, padding, dilation, G)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return deform_conv_torch_fwd(inp, offset, mask, weight, bias, stride, padding, dilation, G)

    @staticmethod
    def backward(ctx, grad):
        inp, offset, mask, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        grads = deform_conv_torch_bwd(grad, inp, offset, mask, weight, *ctx.args, needs)
        d_bias = grads[4].to(ctx.bias_dtype) if grads[4] is not None else None
        return (*grads[:4], d_bias, None, None, None, None)


# --- cpp and cuda: florence_kernels._C (csrc/deform_conv/), tiled columns, shared bilinear code -------------------
# One custom op for both: the dispatcher picks deform_conv_cpu.cpp or deform_conv_cuda.cu by the input's device.


@torch.library.custom_op("florence_kernels::deform_conv2d_cpp", mutates_args=())
def _dcn_cpp_op(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
) -> torch.Tensor:  # fmt: skip
    out = torch.ops.florence_kernels_C.deform_conv2d_fwd(input, offset, mask, weight, bias, stride, padding, dilation)
    return fresh_output(out)


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


# --- triton: implicit GEMM, bilinear sampling in the operand loader -------------------------------------------------
# One program = BLOCK_P output positions (flattened over the batch) x BLOCK_O output channels of one convolution
# group. The reduction walks taps k and BLOCK_C-channel slices of the group: the A operand (BLOCK_P, BLOCK_C) is
# sampled on the fly (offsets and mask read per position and the channel's offset group, four corner gathers, zero
# outside the image, mask applied in fp32) and never written to memory; the B operand is the weight reordered to
# (K, C_in / groups, C_out). Accumulation in fp32. The backward recomputes through the torch path (grid_sample),
# whose autograd gives all five gradients.

TRITON_BLOCK_P = 64
TRITON_BLOCK_C = 32
TRITON_NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _dcn_fwd_kernel(
        X, OFF, MASK, Wt, BIAS, OUT,
        B, C_in, H, W, Ho, Wo, C_out, cpg, copg, cpog, G, kw, sh, sw, ph, pw, dh, dw,
        KK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """OUT[b, gr copg + o, p] = sum_{k, c} Wt[k, c, gr copg + o] * mask * bilinear(X[b, gr cpg + c], tap k at p)."""
        P = Ho * Wo
        n_ob = tl.cdiv(copg, BLOCK_O)
        gr = tl.program_id(1) // n_ob
        o = (tl.program_id(1) % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < copg
        co = gr * copg + o
        r = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        r_ok = r < B * P
        b = (r // P).to(tl.int64)
        p = r % P
        ho = p // Wo
        wo = p % Wo
        acc = tl.zeros((BLOCK_P, BLOCK_O), tl.float32)
        for k in range(KK):
            y_base = (ho * sh - ph + (k // kw) * dh).to(tl.float32)
            x_base = (wo * sw - pw + (k % kw) * dw).to(tl.float32)
            for c0 in range(0, cpg, BLOCK_C):
                cl = c0 + tl.arange(0, BLOCK_C)
                c_ok = cl < cpg
                c = gr * cpg + cl
                og = c // cpog
                ok = r_ok[:, None] & c_ok[None, :]
                off_y = (b[:, None] * 2 * G * KK + 2 * (og[None, :] * KK + k)) * P + p[:, None]
                y = y_base[:, None] + tl.load(OFF + off_y, mask=ok, other=0.0).to(tl.float32)
                x = x_base[:, None] + tl.load(OFF + off_y + P, mask=ok, other=0.0).to(tl.float32)
                inside = ok & (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
                y0f = tl.floor(y)
                x0f = tl.floor(x)
                ly = y - y0f
                lx = x - x0f
                y0 = tl.where(inside, y0f, 0.0).to(tl.int32)  # no int conversion of huge or non-finite values
                x0 = tl.where(inside, x0f, 0.0).to(tl.int32)
                plane = X + (b[:, None] * C_in + c[None, :]) * H * W
                in_y0 = inside & (y0 >= 0)
                in_y1 = inside & (y0 + 1 <= H - 1)
                in_x0 = x0 >= 0
                in_x1 = x0 + 1 <= W - 1
                v = tl.load(plane + y0 * W + x0, mask=in_y0 & in_x0, other=0.0).to(tl.float32) * (1 - ly) * (1 - lx)
                v += tl.load(plane + y0 * W + x0 + 1, mask=in_y0 & in_x1, other=0.0).to(tl.float32) * (1 - ly) * lx
                v += tl.load(plane + (y0 + 1) * W + x0, mask=in_y1 & in_x0, other=0.0).to(tl.float32) * ly * (1 - lx)
                v += tl.load(plane + (y0 + 1) * W + x0 + 1, mask=in_y1 & in_x1, other=0.0).to(tl.float32) * ly * lx
                # torchvision's outside test: 0 there (an infinite coordinate's NaN weights too); NaN stays NaN
                v = tl.where((y <= -1.0) | (y >= H) | (x <= -1.0) | (x >= W), 0.0, v)
                if HAS_MASK:
                    m_idx = (b[:, None] * G * KK + og[None, :] * KK + k) * P + p[:, None]
                    v = v * tl.load(MASK + m_idx, mask=ok, other=0.0).to(tl.float32)
                wt = tl.load(Wt + (k * cpg + cl[:, None]) * C_out + co[None, :], mask=c_ok[:, None] & o_ok[None, :],
                             other=0.0)  # fmt: skip
                if UPCAST:  # the interpreter's bf16 dot is wrong: compute in fp32 there
                    a = v
                    wt = wt.to(tl.float32)
                else:
                    a = v.to(Wt.dtype.element_ty)
                if IEEE:
                    acc += tl.dot(a, wt, input_precision="ieee")
                else:
                    acc += tl.dot(a, wt)
        if HAS_BIAS:
            acc += tl.load(BIAS + co, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        out_idx = (b[:, None] * C_out + co[None, :]) * P + p[:, None]
        tl.store(OUT + out_idx, acc, mask=r_ok[:, None] & o_ok[None, :])


def triton_dcn_config(copg: int, dtype: torch.dtype) -> dict:
    return {"BLOCK_P": TRITON_BLOCK_P, "BLOCK_O": min(128, max(16, triton.next_power_of_2(copg))),
            "BLOCK_C": TRITON_BLOCK_C, "IEEE": dtype == torch.float32,
            "UPCAST": _env.TRITON_INTERPRET and dtype == torch.bfloat16, "num_warps": TRITON_NUM_WARPS}  # fmt: skip


def deform_conv_triton_fwd(inp, offset, mask, weight, bias, stride, padding, dilation, G):
    if inp.shape[0] == 0:  # nothing to launch (a grid of 0 programs is an error)
        return inp.new_empty((0, weight.shape[0], *offset.shape[-2:]))
    inp, offset, weight = inp.contiguous(), offset.contiguous(), weight.contiguous()
    mask = mask.contiguous() if mask is not None else None
    bias = bias.contiguous() if bias is not None else None  # read with unit stride
    B, C_in, H, W = inp.shape
    C_out, cpg, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    groups = C_in // cpg
    copg = C_out // groups
    wt = weight.permute(2, 3, 1, 0).reshape(K, cpg, C_out).contiguous()
    out = torch.empty((B, C_out, Ho, Wo), device=inp.device, dtype=inp.dtype)
    cfg = triton_dcn_config(copg, inp.dtype)
    grid = (triton.cdiv(B * Ho * Wo, cfg["BLOCK_P"]), groups * triton.cdiv(copg, cfg["BLOCK_O"]))
    _dcn_fwd_kernel[grid](
        inp, offset, mask if mask is not None else offset, wt, bias if bias is not None else wt, out,
        B, C_in, H, W, Ho, Wo, C_out, cpg, copg, C_in // G, G, kw, *stride, *padding, *dilation,
        KK=K, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, BLOCK_P=cfg["BLOCK_P"], BLOCK_O=cfg["BLOCK_O"],
        BLOCK_C=cfg["BLOCK_C"], IEEE=cfg["IEEE"], UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


class _DcnTriton(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the torch path's (same formulas as the other backends)."""

    @staticmethod
    def forward(ctx, inp, offset, mask, weight, bias, stride, padding, dilation, G):
        ctx.save_for_backward(inp, offset, mask, weight)
        ctx.args = (stride, padding, dilation, G)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return deform_conv_triton_fwd(inp, offset, mask, weight, bias, stride, padding, dilation, G)

    backward = _DcnTorch.backward


# --- registry -------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

MODULATED_DEFORM_CONV2D = register_op(
    Op(
        "modulated_deform_conv2d",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "cpp": Backend("cpp", ("cpu",), (*_FLOATS, torch.float64)),
            "cuda": Backend("cuda", ("cuda",), (*_FLOATS, torch.float64)),
            "triton": Backend("triton", ("cuda",), _FLOATS, (8, 0)),
        },
    )
)


# --- public function ------------------------------------------------------------------------------------------------


def modulated_deform_conv2d(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1, backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """DCNv2 with torchvision.ops.deform_conv2d's semantics and layouts (see the module docstring for the edges:
    integer positions, non-finite offsets, low precision, empty batches).

    Args:
        input: (B, C_in, H, W) float (fp32, fp16, bf16; fp64 on reference/torch/cpp/cuda).
        offset: (B, 2 G kh kw, H_out, W_out), (dy, dx) pairs per offset group and tap, in pixels.
        mask: (B, G kh kw, H_out, W_out) or None (all ones).
        weight: (C_out, C_in / groups, kh, kw); bias: (C_out,) or None. All tensors of input's dtype and device.
        stride, padding, dilation: ints or pairs (stride, dilation >= 1, padding >= 0).
        backend: None (automatic), "reference", "torch", "cpp" (CPU), "cuda" or "triton" (GPU).

    Returns:
        (B, C_out, H_out, W_out) in input's dtype; gradients for input, offset, mask, weight and bias.

    Raises:
        ValueError naming the argument, its shape and what was expected; BackendNotSupportedError for a backend
        that cannot run the input.

    Equivalent PyTorch code: :func:`deform_conv_reference`; semantics of torchvision.ops.deform_conv2d
    (csrc/ops/cpu/deform_conv2d_kernel.cpp).
    """
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride, dilation: expected >= 1 and padding >= 0, got {stride}, {dilation}, {padding}")
    for name, t, dim in (("input", input, 4), ("offset", offset, 4), ("weight", weight, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a {dim}-D tensor, got {got}")
    B, C_in, H, W = input.shape
    C_out, cpg, kh, kw = weight.shape
    if cpg < 1 or kh < 1 or kw < 1:
        raise ValueError(f"weight: expected (C_out, C_in / groups >= 1, kh >= 1, kw >= 1), got {tuple(weight.shape)}")
    if C_in % cpg or C_in == 0 or C_out % (C_in // cpg):
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not divide input channels {C_in} into groups")
    H_out = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_out = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if H_out < 1 or W_out < 1:
        raise ValueError(
            f"input: spatial size {(H, W)} with padding {padding} is smaller than the dilated kernel "
            f"{(dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)}"
        )
    K = kh * kw
    if offset.shape[0] != B or offset.shape[1] < 2 * K or offset.shape[1] % (2 * K) or tuple(offset.shape[2:]) != (
        H_out, W_out):  # fmt: skip
        raise ValueError(
            f"offset: expected (B={B}, 2 * offset_groups * {K}, {H_out}, {W_out}), got {tuple(offset.shape)}"
        )
    G = offset.shape[1] // (2 * K)
    if C_in % G:
        raise ValueError(f"offset: {G} offset groups do not divide the {C_in} input channels")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, G * K, H_out, W_out)):
        raise ValueError(f"mask: expected shape {(B, G * K, H_out, W_out)}, got {tuple(getattr(mask, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C_out,)):
        raise ValueError(f"bias: expected shape ({C_out},), got {tuple(getattr(bias, 'shape', ()))}")
    # Under autocast every tensor goes to the autocast dtype (as conv_embed; the backends compute 16-bit in fp32).
    input, offset, mask, weight, bias = autocast_cast(input.device.type, input, offset, mask, weight, bias)
    for name, t in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise ValueError(
                f"{name}: expected {input.dtype} on {input.device} like input, got {t.dtype} on {t.device}"
            )
    name = MODULATED_DEFORM_CONV2D.select([input, offset, weight], backend)
    if name == "triton":
        return _DcnTriton.apply(input, offset, mask, weight, bias, stride, padding, dilation, G)
    if name in ("cpp", "cuda"):
        args = [input, offset, mask, weight, bias]
        if input.dtype in (torch.float16, torch.bfloat16):  # the extension computes fp16/bf16 in fp32
            args = [t.float() if t is not None else None for t in args]
        out = _dcn_cpp_op(*args, list(stride), list(padding), list(dilation))
        return out.to(input.dtype)
    if name == "reference":
        return deform_conv_reference(input, offset, mask, weight, bias, stride, padding, dilation, G)
    return _DcnTorch.apply(input, offset, mask, weight, bias, stride, padding, dilation, G)


def deform_conv2d(
    input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask: torch.Tensor | None = None, *, backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """``torchvision.ops.deform_conv2d`` exactly: its signature (positional order input, offset, weight, bias,
    stride, padding, dilation, mask), defaults and semantics (DCNv1 when mask is None, DCNv2 with it), on the fused
    backends of :func:`modulated_deform_conv2d` (same shapes, dtypes, errors; ``backend`` keyword-only).

    Equivalent PyTorch code: ``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
    mask)``.
    """
    return modulated_deform_conv2d(input, offset, mask, weight, bias, stride=stride, padding=padding,
                                   dilation=dilation, backend=backend)  # fmt: skip


# --- ahead-of-time compile specs ------------------------------------------------------------------------------------


def triton_aot_specs() -> list[dict]:
    """The forward kernel at every BLOCK_O the launcher picks, 3x3 taps (DyHead), with mask and bias."""
    if not HAS_TRITON:
        return []
    from ..triton_aot import kernel_spec, torch_dtype

    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        pointers = dict.fromkeys(("X", "OFF", "MASK", "Wt", "BIAS", "OUT"), dtype)
        for block_o in (16, 32, 64, 128):
            cfg = triton_dcn_config(block_o, torch_dtype(dtype))
            constexprs = {k: cfg[k] for k in ("BLOCK_P", "BLOCK_O", "BLOCK_C", "IEEE")}
            constexprs |= {"UPCAST": False, "KK": 9, "HAS_MASK": True, "HAS_BIAS": True}
            specs.append(kernel_spec(f"_dcn_fwd_kernel[{dtype},BLOCK_O={block_o}]", _dcn_fwd_kernel, constexprs,
                                     pointers, cfg["num_warps"]))  # fmt: skip
    return specs
