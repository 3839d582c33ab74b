"""Modulated deformable convolution (DCNv2), the spatial-aware attention of Dynamic Head.

``modulated_deform_conv2d(input, offset, mask, weight, bias, stride=, padding=, dilation=)`` has the semantics and
layouts of ``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)``:

- input (B, C_in, H, W); weight (C_out, C_in / groups, kh, kw) (groups = C_in / weight.shape[1]);
- offset (B, 2 G kh kw, H_out, W_out) with G offset groups: channel 2 (g K + k) is the row (y) offset and
  2 (g K + k) + 1 the column (x) offset of kernel tap k = i kw + j for the input channels of group g;
- mask (B, G kh kw, H_out, W_out), multiplying each sampled value;
- a tap samples input at (ho s_h - p_h + i d_h + dy, wo s_w - p_w + j d_w + dx) bilinearly; a point with
  y <= -1, y >= H, x <= -1 or x >= W reads 0, and corners outside the image count as 0.

Backends: reference (the four corners written out), torch (grid_sample, any device), cpp and cuda (the extension
florence_kernels._C: csrc/deform_conv/, one shared ``__host__ __device__`` sampling code), triton (implicit GEMM
with the bilinear sampling in the operand loader; its backward is the torch path's, recomputed).

Read top to bottom: argument checks, the literal reference, the grid_sample path, the extension op, the Triton
kernel, the registry, the public function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _env
from .._dispatch import Backend, Op, register_op

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


# --- cpp and cuda: florence_kernels._C (csrc/deform_conv/), tiled columns, shared bilinear code -------------------
# One custom op for both: the dispatcher picks deform_conv_cpu.cpp or deform_conv_cuda.cu by the input's device.


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
                y0 = y0f.to(tl.int32)
                x0 = x0f.to(tl.int32)
                plane = X + (b[:, None] * C_in + c[None, :]) * H * W
                in_y0 = inside & (y0 >= 0)
                in_y1 = inside & (y0 + 1 <= H - 1)
                in_x0 = x0 >= 0
                in_x1 = x0 + 1 <= W - 1
                v = tl.load(plane + y0 * W + x0, mask=in_y0 & in_x0, other=0.0).to(tl.float32) * (1 - ly) * (1 - lx)
                v += tl.load(plane + y0 * W + x0 + 1, mask=in_y0 & in_x1, other=0.0).to(tl.float32) * (1 - ly) * lx
                v += tl.load(plane + (y0 + 1) * W + x0, mask=in_y1 & in_x0, other=0.0).to(tl.float32) * ly * (1 - lx)
                v += tl.load(plane + (y0 + 1) * W + x0 + 1, mask=in_y1 & in_x1, other=0.0).to(tl.float32) * ly * lx
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
    inp, offset, weight = inp.contiguous(), offset.contiguous(), weight.contiguous()
    mask = mask.contiguous() if mask is not None else None
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
    """Forward: the Triton kernel. Backward: the torch path recomputed under autograd (grid_sample's fused kernels
    for the input and offset gradients, GEMMs for the weight and column gradients)."""

    @staticmethod
    def forward(ctx, inp, offset, mask, weight, bias, stride, padding, dilation, G):
        ctx.save_for_backward(inp, offset, mask, weight, bias)
        ctx.args = (stride, padding, dilation, G)
        return deform_conv_triton_fwd(inp, offset, mask, weight, bias, stride, padding, dilation, G)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(n) if t is not None else None for t, n in zip(saved, needs, strict=True)
            ]
            out = deform_conv_torch(*leaves, *ctx.args)
            wanted = [t for t, n in zip(leaves, needs, strict=True) if t is not None and n]
            got = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
        grads = [next(got) if t is not None and n else None for t, n in zip(leaves, needs, strict=True)]
        return (*grads, None, None, None, None)


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
    if name == "triton":
        return _DcnTriton.apply(input, offset, mask, weight, bias, stride, padding, dilation, G)
    if name in ("cpp", "cuda"):
        args = [input, offset, mask, weight, bias]
        if input.dtype in (torch.float16, torch.bfloat16):  # the extension computes fp16/bf16 in fp32
            args = [t.float() if t is not None else None for t in args]
        out = _dcn_cpp_op(*args, list(stride), list(padding), list(dilation))
        return out.to(input.dtype)
    impl = deform_conv_reference if name == "reference" else deform_conv_torch
    return impl(input, offset, mask, weight, bias, stride, padding, dilation, G)


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
