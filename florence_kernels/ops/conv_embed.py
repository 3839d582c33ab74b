"""Convolutional embedding: convolution then LayerNorm over the output channels, returning channels-last tokens
(CoSwin's stem and patch merging, CvT-style; Video CoSwin's Conv3d tokeniser; ../shared/SPEC.md sections 3, 6).

``conv_embed(x, weight, bias, norm_weight, norm_bias, stride=..., padding=...)`` accepts

- channels-first images or clips, (B, C_in, H, W) / (B, C_in, T, H, W): what a data loader gives the stem;
- channels-last token grids, (B, H, W, C_in) / (B, T, H, W, C_in): what a previous stage gives a patch merge,

and returns (B, [T',] H', W', C_out) tokens, contiguous, ready for window attention without a permute copy. The
layout is told apart by which axis holds weight's C_in; ``input_layout`` settles grids where both could.

Read top to bottom: layout resolution, the literal reference, the channels-last PyTorch path, the registry, the
public function.
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
except ImportError:  # pragma: no cover
    HAS_TRITON = False

LAYOUTS = ("auto", "channels_first", "channels_last")


def resolve_layout(x: torch.Tensor, c_in: int, spatial: int, layout: str) -> str:
    """'channels_first' or 'channels_last' for x, given the weight's input channels."""
    if layout not in LAYOUTS:
        raise ValueError(f"input_layout: expected one of {LAYOUTS}, got {layout!r}")
    if x.dim() != spatial + 2:
        raise ValueError(
            f"x: expected a {spatial + 2}-D tensor for a {spatial}-D convolution ((B, C_in, "
            f"{'T, ' if spatial == 3 else ''}H, W) or (B, {'T, ' if spatial == 3 else ''}H, W, C_in)), "
            f"got shape {tuple(x.shape)}"
        )
    first, last = x.shape[1] == c_in, x.shape[-1] == c_in
    if layout != "auto":
        ok = first if layout == "channels_first" else last
        if not ok:
            axis = 1 if layout == "channels_first" else -1
            raise ValueError(
                f"x: input_layout={layout!r} needs C_in = {c_in} on axis {axis}, got shape {tuple(x.shape)}"
            )
        return layout
    if first and last:
        raise ValueError(
            f"x: shape {tuple(x.shape)} has C_in = {c_in} on both axis 1 and the last axis; pass "
            "input_layout='channels_first' or 'channels_last'"
        )
    if not (first or last):
        raise ValueError(
            f"x: expected C_in = {c_in} (weight.shape[1]) on axis 1 or the last axis, got {tuple(x.shape)}"
        )
    return "channels_first" if first else "channels_last"


def _conv(spatial: int):
    return F.conv2d if spatial == 2 else F.conv3d


def _to_channels_first_view(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) -> (B, C, ...) as a view (channels-last strides)."""
    return x.movedim(-1, 1)


# --- reference: convolution, permute, layer_norm ---------------------------------------------------------------------


def conv_embed_reference(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    spatial = weight.dim() - 2
    if layout == "channels_last":
        x = x.permute(0, spatial + 1, *range(1, spatial + 1)).contiguous()
    y = _conv(spatial)(x, weight, bias, stride=stride, padding=padding)
    y = y.permute(0, *range(2, spatial + 2), 1)
    return F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps).contiguous()


# --- torch: channels-last convolution, LayerNorm on its memory as is -------------------------------------------------
# The convolution runs in channels-last memory format, so its output (B, C_out, ...) is already laid out as
# (B, ..., C_out): moving the channel axis last is a free view and LayerNorm reads it in place. A channels-last input
# grid is handed over as a view; a channels-first image is converted once (C_in = 3 at the stem: the smallest tensor
# of the op).


# On the CPU, oneDNN's channels-last convolution loses to the plain one on small problems (the last CoSwin merges at
# small batch: 0.81x at 8 x 7 x 7 outputs, 768 channels, in benchmarks/results/cpu-2026-11-27-cpp/conv_embed.jsonl).
# Below CPU_CHANNELS_LAST_MIN_ROWS output positions in all (measured: even at 8 x 14 x 14 = 1568, ahead at 6272) the
# torch path convolves channels-first and LayerNorm reads the permuted result.
CPU_CHANNELS_LAST_MIN_ROWS = 1024


def _out_rows(x, weight, stride, padding, layout):
    spatial = weight.dim() - 2
    sizes = x.shape[1 : spatial + 1] if layout == "channels_last" else x.shape[2:]
    rows = x.shape[0]
    for n, k, s, p in zip(sizes, weight.shape[2:], stride, padding, strict=True):
        rows *= (n + 2 * p - k) // s + 1
    return rows


def conv_embed_torch(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    spatial = weight.dim() - 2
    if x.device.type == "cpu" and _out_rows(x, weight, stride, padding, layout) < CPU_CHANNELS_LAST_MIN_ROWS:
        xc = (_to_channels_first_view(x) if layout == "channels_last" else x).contiguous()
        y = _conv(spatial)(xc, weight, bias, stride=stride, padding=padding).movedim(1, -1)
        return F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)
    fmt = torch.channels_last if spatial == 2 else torch.channels_last_3d
    xc = _to_channels_first_view(x) if layout == "channels_last" else x.contiguous(memory_format=fmt)
    y = _conv(spatial)(xc, weight.contiguous(memory_format=fmt), bias, stride=stride, padding=padding)
    y = y.contiguous(memory_format=fmt).movedim(1, -1)  # a view when the conv kept channels-last (it does)
    return F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)


# --- triton: implicit-GEMM convolution with the LayerNorm in the epilogue --------------------------------------------
# One program = BLOCK_M output positions x all C_out channels (C_out <= 512 fits one block). The K loop walks
# (C_in, kt, kh, kw) in BLOCK_K steps, gathering input patches straight from x through its strides (either layout,
# zero padding by masks); the epilogue adds the bias, normalises each row over C_out in fp32 and applies the affine
# LayerNorm, so the convolution's output never reaches memory un-normalised. It also writes x_hat (the normalised
# row before the affine) and rstd for the backward, which runs in PyTorch: the LayerNorm backward from x_hat, then
# one aten.convolution_backward for x, weight and bias.

TRITON_MAX_COUT = 512
TRITON_BLOCK_K = 32
TRITON_NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _conv_embed_kernel(
        X, Wt, BIAS, NW, NB, OUT, XHAT, RSTD,
        B, C_in, T, H, W, To, Ho, Wo, C_out, K,
        sxb, sxc, sxt, sxh, sxw,
        kt, kh, kw, st, sh, sw, pt, ph, pw, eps,
        HAS_BIAS: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """OUT[m, :] = LayerNorm(conv(x)[m, :]) for BLOCK_M flattened output positions m = ((b To + t) Ho + h) Wo + w;
        Wt is the weight as (K, C_out) with k = ((ci kt + dt) kh + dh) kw + dw."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        co = tl.arange(0, BLOCK_N)
        m_ok, co_ok = m < B * To * Ho * Wo, co < C_out
        wo = m % Wo
        ho = (m // Wo) % Ho
        to = (m // (Wo * Ho)) % To
        b = m // (Wo * Ho * To)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            dw = k % kw
            dh = (k // kw) % kh
            dt = (k // (kw * kh)) % kt
            ci = k // (kw * kh * kt)
            ti = to[:, None] * st - pt + dt[None, :]
            hi = ho[:, None] * sh - ph + dh[None, :]
            wi = wo[:, None] * sw - pw + dw[None, :]
            ok = m_ok[:, None] & (k[None, :] < K) & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load(X + b[:, None] * sxb + ci[None, :] * sxc + ti * sxt + hi * sxh + wi * sxw, mask=ok, other=0.0)
            w = tl.load(Wt + k[:, None] * C_out + co[None, :], mask=(k[:, None] < K) & co_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong: compute in fp32 there
                a, w = a.to(tl.float32), w.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if HAS_BIAS:
            acc += tl.load(BIAS + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(co_ok[None, :], acc, 0.0)
        mean = tl.sum(acc, 1) / C_out
        diff = tl.where(co_ok[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / C_out + eps)
        xhat = diff * rstd[:, None]
        y = xhat
        if HAS_NW:
            y = y * tl.load(NW + co, mask=co_ok, other=1.0).to(tl.float32)[None, :]
        if HAS_NB:
            y = y + tl.load(NB + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        out_ok = m_ok[:, None] & co_ok[None, :]
        tl.store(OUT + m[:, None] * C_out + co[None, :], y, mask=out_ok)
        tl.store(XHAT + m[:, None] * C_out + co[None, :], xhat, mask=out_ok)
        tl.store(RSTD + m, rstd, mask=m_ok)


def triton_conv_embed_config(c_out: int, dtype: torch.dtype) -> dict:
    block_n = max(16, triton.next_power_of_2(c_out))
    block_m = 64 if block_n <= 128 else 32 if block_n <= 256 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": TRITON_BLOCK_K, "IEEE": dtype == torch.float32,
            "UPCAST": _env.TRITON_INTERPRET and dtype == torch.bfloat16, "num_warps": TRITON_NUM_WARPS}  # fmt: skip


def _as_3d(x, weight, stride, padding, layout):
    """Channels-first 5-D views of x and weight, and 3-value stride/padding (2-D: a time axis of 1)."""
    xc = _to_channels_first_view(x) if layout == "channels_last" else x
    if weight.dim() == 4:
        return xc.unsqueeze(2), weight.unsqueeze(2), (1, *stride), (0, *padding)
    return xc, weight, tuple(stride), tuple(padding)


def conv_embed_triton_fwd(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    """(out, xhat, rstd): out and xhat (B, To, Ho, Wo, C_out) in x's dtype, rstd fp32 per position."""
    x5, w5, (st, sh, sw), (pt, ph, pw) = _as_3d(x, weight, stride, padding, layout)
    B, C_in, T, H, W = x5.shape
    C_out, _, kt, kh, kw = w5.shape
    To, Ho, Wo = (T + 2 * pt - kt) // st + 1, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    K = C_in * kt * kh * kw
    wt = w5.reshape(C_out, K).t().contiguous()  # (K, C_out)
    out = torch.empty((B, To, Ho, Wo, C_out), device=x.device, dtype=x.dtype)
    xhat = torch.empty_like(out)
    rstd = torch.empty((B, To, Ho, Wo), device=x.device, dtype=torch.float32)
    cfg = triton_conv_embed_config(C_out, x.dtype)
    # the kernel reads the (C_out,) vectors with unit stride
    bias, norm_weight, norm_bias = (t.contiguous() if t is not None else None for t in (bias, norm_weight, norm_bias))
    dummy = rstd
    grid = (triton.cdiv(B * To * Ho * Wo, cfg["BLOCK_M"]),)
    _conv_embed_kernel[grid](
        x5, wt, bias if bias is not None else dummy, norm_weight if norm_weight is not None else dummy,
        norm_bias if norm_bias is not None else dummy, out, xhat, rstd,
        B, C_in, T, H, W, To, Ho, Wo, C_out, K, *x5.stride(), kt, kh, kw, st, sh, sw, pt, ph, pw, float(eps),
        HAS_BIAS=bias is not None, HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], IEEE=cfg["IEEE"],
        UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    spatial = weight.dim() - 2
    if spatial == 2:
        out, xhat, rstd = out.squeeze(1), xhat.squeeze(1), rstd.squeeze(1)
    return out, xhat, rstd


def conv_embed_triton_bwd(grad, x, weight, norm_weight, xhat, rstd, stride, padding, layout, has_bias):
    """LayerNorm backward from x_hat (PyTorch), then one aten.convolution_backward."""
    g = grad.float()
    xh = xhat.float()
    red = tuple(range(g.dim() - 1))
    d_nw = (g * xh).sum(red)
    d_nb = g.sum(red)
    dxh = g * norm_weight.float() if norm_weight is not None else g
    dy = rstd.unsqueeze(-1) * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))
    spatial = weight.dim() - 2
    xc = _to_channels_first_view(x) if layout == "channels_last" else x
    dy_cf = dy.to(x.dtype).movedim(-1, 1)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy_cf, xc, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding), [1] * spatial,
        False, [0] * spatial, 1, [True, True, has_bias],
    )  # fmt: skip
    if layout == "channels_last":
        dx = dx.movedim(1, -1)
    return dx, dw, db, d_nw, d_nb


# --- torch path, fp16/bf16 on the CPU (below the kernels: Triton's cache key holds each kernel's first line) ---------
# Convolution and LayerNorm in fp32, one rounding at the end. The convolution's output is an intermediate that
# LayerNorm brings back to O(1): in fp16 it can overflow (> 65,504) where the op's output fits, as the Triton kernel's
# fp32 accumulator never does; and oneDNN's 16-bit convolution is the slower one here (5x at CoSwin-T's first merge,
# 8 x 96 x 56 x 56, on the 2-core development VM). On CUDA the convolution stays in the input's dtype (cuDNN
# accumulates in fp32 but writes fp16: an output beyond fp16's range still overflows there; Triton does not).


def conv_embed_torch_cpu_16bit(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    with torch.autocast("cpu", enabled=False):
        args = [t.float() if t is not None else None for t in (x, weight, bias, norm_weight, norm_bias)]
        return conv_embed_torch(*args, stride, padding, eps, layout).to(x.dtype)


# --- custom op with autograd (triton) -------------------------------------------------------------------------------


@torch.library.custom_op("florence_kernels::conv_embed_triton", mutates_args=())
def _conv_embed_triton_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None, stride: list[int], padding: list[int], eps: float, layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    out, xhat, rstd = conv_embed_triton_fwd(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout)
    return fresh_output(out), xhat, rstd


def _out_spatial(x, weight, stride, padding, layout):
    sizes = x.shape[2:] if layout == "channels_first" else x.shape[1:-1]
    return [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(sizes, weight.shape[2:], stride, padding, strict=True)]


@_conv_embed_triton_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout):
    shape = (x.shape[0], *_out_spatial(x, weight, stride, padding, layout), weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape[:-1], dtype=torch.float32)


@torch.library.custom_op("florence_kernels::conv_embed_triton_bwd", mutates_args=())
def _conv_embed_triton_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, xhat: torch.Tensor,
    rstd: torch.Tensor, stride: list[int], padding: list[int], layout: str, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dx, dw, db, d_nw, d_nb = conv_embed_triton_bwd(grad, x, weight, norm_weight, xhat, rstd, stride, padding, layout,
                                                   has_bias)  # fmt: skip
    db = db if db is not None else weight.new_empty(0)
    return dx.contiguous(), dw, db, d_nw, d_nb


@_conv_embed_triton_bwd_op.register_fake
def _(grad, x, weight, norm_weight, xhat, rstd, stride, padding, layout, has_bias):
    c_out = weight.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    db = weight.new_empty(c_out) if has_bias else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), db, torch.empty(c_out, **f32), torch.empty(c_out, **f32)


def _ce_setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout = inputs
    _, xhat, rstd = output
    ctx.save_for_backward(x, weight, norm_weight, xhat, rstd)
    ctx.args = (stride, padding, layout, bias is not None)
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (bias, norm_weight, norm_bias))


def _ce_backward(ctx, grad, grad_xhat, grad_rstd):
    x, weight, norm_weight, xhat, rstd = ctx.saved_tensors
    stride, padding, layout, has_bias = ctx.args
    dx, dw, db, d_nw, d_nb = _conv_embed_triton_bwd_op(grad, x, weight, norm_weight, xhat, rstd, stride, padding,
                                                       layout, has_bias)  # fmt: skip
    b_dt, nw_dt, nb_dt = ctx.dtypes
    return (dx, dw, db.to(b_dt) if b_dt else None, d_nw.to(nw_dt) if nw_dt else None, d_nb.to(nb_dt) if nb_dt else None,
            None, None, None, None)  # fmt: skip


_conv_embed_triton_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# --- registry -------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _triton_limits(x, weight, **_) -> list[str]:
    if weight.shape[0] > TRITON_MAX_COUT:
        return [f"C_out {weight.shape[0]} > {TRITON_MAX_COUT}: the LayerNorm epilogue needs all channels in one block"]
    return []


CONV_EMBED = register_op(
    Op(
        "conv_embed",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "triton": Backend("triton", ("cuda",), _FLOATS, (8, 0), impl_reasons=_triton_limits),
        },
    )
)


# --- public function ------------------------------------------------------------------------------------------------


def _tuple(name, value, n):
    t = (value,) * n if isinstance(value, int) else tuple(value)
    if len(t) != n or not all(isinstance(v, int) for v in t):
        raise ValueError(f"{name}: expected an int or {n} ints, got {value!r}")
    return t


def conv_embed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None, *, stride, padding, eps: float = 1e-5, input_layout: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """LayerNorm(conv(x)) over the output channels, as channels-last tokens.

    Args:
        x: (B, C_in, H, W) / (B, C_in, T, H, W) channels-first, or (B, H, W, C_in) / (B, T, H, W, C_in)
            channels-last (a previous stage's tokens: read in place, never permuted into a copy).
        weight: (C_out, C_in, kh, kw) or (C_out, C_in, kt, kh, kw); bias: (C_out,) or None.
        norm_weight, norm_bias: LayerNorm affine parameters (C_out,), or None.
        stride, padding: ints or per-axis tuples.
        input_layout: "auto" (by which axis holds C_in), "channels_first" or "channels_last".
        backend: None (automatic), "reference", "torch" or "triton" (CUDA; C_out <= 512).

    Returns:
        (B, H', W', C_out) or (B, T', H', W', C_out), contiguous.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (4, 5):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected (C_out, C_in, kh, kw) or (C_out, C_in, kt, kh, kw), got {got}")
    spatial = weight.dim() - 2
    c_out, c_in = weight.shape[:2]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    layout = resolve_layout(x, c_in, spatial, input_layout)
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and tuple(t.shape) != (c_out,):
            raise ValueError(f"{name}: expected shape ({c_out},) (C_out of weight), got {tuple(t.shape)}")
    stride, padding = _tuple("stride", stride, spatial), _tuple("padding", padding, spatial)
    # Under autocast the convolution runs in the autocast dtype (as F.conv2d would); LayerNorm stays fp32 inside.
    x, weight, bias = autocast_cast(x.device.type, x, weight, bias)
    if x.dtype != weight.dtype:
        raise ValueError(f"weight: expected dtype {x.dtype} (that of x), got {weight.dtype}")
    name = CONV_EMBED.select([x, weight], backend)
    if name == "triton":
        args = (x, weight, bias, norm_weight, norm_bias, list(stride), list(padding), float(eps), layout)
        return _conv_embed_triton_op(*args)[0]
    impl = conv_embed_reference if name == "reference" else conv_embed_torch
    if name == "torch" and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        impl = conv_embed_torch_cpu_16bit
    return impl(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, layout)


# --- ahead-of-time compile specs ------------------------------------------------------------------------------------


def triton_aot_specs() -> list[dict]:
    """Every block the launcher can pick (C_out up to TRITON_MAX_COUT), with bias and LayerNorm affine."""
    if not HAS_TRITON:
        return []
    from ..triton_aot import kernel_spec, torch_dtype

    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        pointers = dict.fromkeys(("X", "Wt", "BIAS", "NW", "NB", "OUT", "XHAT"), dtype) | {"RSTD": "fp32"}
        for c_out in [16 * 2**k for k in range(6) if 16 * 2**k <= TRITON_MAX_COUT]:
            cfg = triton_conv_embed_config(c_out, torch_dtype(dtype))
            constexprs = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "IEEE")}
            constexprs |= {"UPCAST": False, "HAS_BIAS": True, "HAS_NW": True, "HAS_NB": True}
            specs.append(kernel_spec(f"_conv_embed_kernel[{dtype},C_out={c_out}]", _conv_embed_kernel, constexprs,
                                     pointers, cfg["num_warps"], scalars={"eps": "fp32"}))  # fmt: skip
    return specs
