"""Drop-in modules on the fused ops: Video Swin's window attention and block, in (B, T, H, W, C) layout.

Parameter names follow Video Swin's ``SwinTransformerBlock3D`` (norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2), so a state dict of timm's 2-D
``SwinTransformerBlock`` loads into the T = 1 case and gives the same output on (B, H, W, C) input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops.contrastive_loss import contrastive_loss
from .ops.conv_embed import conv_embed
from .ops.deform_conv import modulated_deform_conv2d
from .ops.dyhead import dyrelu, hard_sigmoid, scale_aware_attention, scale_task_attention
from .ops.window_attention import (
    WINDOW_ATTENTION,
    _wattn_cpp_packed_fwd_op,
    attention_bias,
    attention_core_torch,
    bias_table_rows,
    window_attention,
)
from .ops.window_conventions import get_convention
from .ops.window_partition import _as_triple, _check_window_args, resolve_geometry, window_partition, window_reverse

PAD_MODES = ("mask", "zeros")


def _triple(name, value, time_value):
    """(Wh, Ww) or an int -> (time_value, Wh, Ww); (Wt, Wh, Ww) as is."""
    spatial = 3 if not isinstance(value, int) and len(value) == 3 else 2
    return _as_triple(name, value, spatial, time_value)


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch of whole samples)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


# The MLP's hidden activations are 4x the block's width: at Swin-T stage 1 (batch 8) fc1's output and GELU's are
# 38.5 MB each, above glibc's 32 MB mmap ceiling, so on CPU every one of them is fresh memory: page faults cost as
# much as the arithmetic (PyTorch has no caching allocator for CPU tensors). The CPU path below runs fc1 -> GELU ->
# fc2 over token chunks: it keeps fc1's output for backward (as autograd does) but not GELU's, which it recomputes
# chunk by chunk into a small reused buffer; the backward applies GELU's derivative in place. One large allocation
# instead of four per step, and 38.5 MB less activation memory.
MLP_CHUNK_BYTES = 3 * 2**20  # per chunk of hidden activations: L2-sized, far below the mmap threshold


class _ChunkedMlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))) on a (M, C) matrix, in token chunks; saves x and fc1's output only."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate: str, chunk: int):
        M, hidden = x.shape[0], w1.shape[0]
        h = x.new_empty(M, hidden)
        y = x.new_empty(M, w2.shape[0])
        buf = x.new_empty(min(chunk, M), hidden)
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            a = buf[: e - s]
            torch.addmm(b1, x[s:e], w1.t(), out=h[s:e])
            torch.ops.aten.gelu.out(h[s:e], approximate=approximate, out=a)
            torch.addmm(b2, a, w2.t(), out=y[s:e])
        ctx.save_for_backward(x, w1, w2, h)
        ctx.approximate, ctx.chunk = approximate, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        M, hidden = h.shape
        dx = torch.empty_like(x) if need_x else None
        dw1 = torch.zeros_like(w1) if need_w1 else None
        db1 = h.new_zeros(hidden) if need_b1 else None
        dw2 = torch.zeros_like(w2) if need_w2 else None
        db2 = dy.sum(0) if need_b2 else None
        buf = h.new_empty(min(ctx.chunk, M), hidden)
        for s in range(0, M, ctx.chunk):
            e = min(s + ctx.chunk, M)
            b, hc, dyc = buf[: e - s], h[s:e], dy[s:e]
            if need_w2:
                dw2.addmm_(dyc.t(), torch.ops.aten.gelu.out(hc, approximate=ctx.approximate, out=b))
            torch.mm(dyc, w2, out=b)  # d gelu(h)
            torch.ops.aten.gelu_backward.grad_input(b, hc, approximate=ctx.approximate, grad_input=b)  # d h
            if need_w1:
                dw1.addmm_(b.t(), x[s:e])
            if need_b1:
                db1.add_(b.sum(0))
            if need_x:
                torch.mm(b, w1, out=dx[s:e])
        return dx, dw1, db1, dw2, db2, None, None


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout. ``chunked=True`` allows the chunked CPU path (GELU, fp32/fp64, no
    active dropout, no autocast); it gives the same result as the plain path with less memory traffic."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0, chunked: bool = True):
        super().__init__()
        self.chunked = chunked
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def _use_chunked(self, x) -> bool:
        """The chunked CPU path applies: GELU, no active dropout, fp32/fp64 CPU input, no autocast."""
        return (
            self.chunked
            and x.numel() > 0  # nothing to chunk in an empty batch
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and type(self.act) is nn.GELU
            and not (self.training and self.drop1.p > 0)
            and not (self.training and self.drop2.p > 0)
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x):
        if self._use_chunked(x):
            rows, hidden = x.numel() // x.shape[-1], self.fc1.out_features
            chunk = max(256, MLP_CHUNK_BYTES // (hidden * x.element_size()))
            chunk = -(-rows // -(-rows // chunk))  # equal chunks: no small tail GEMM
            y = _ChunkedMlp.apply(x.reshape(-1, x.shape[-1]), self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                  self.fc2.bias, self.act.approximate, chunk)  # fmt: skip
            return y.view(*x.shape[:-1], y.shape[-1])
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class WindowAttention3D(nn.Module):
    """W-MSA / SW-MSA with relative position bias on (B, T, H, W, C) grids, through ``window_attention``.

    window_size: (Wt, Wh, Ww), or (Wh, Ww) for 2-D Swin (Wt = 1). The bias table has
    (2Wt-1)(2Wh-1)(2Ww-1) rows, Video Swin's layout (Swin's 2-D table when Wt = 1). convention: the geometry where
    the window does not divide the grid (:func:`florence_kernels.window_attention`'s option: "florence", "timm",
    "torchvision", "torchvision3d" or a WindowConvention); under "zeros" padding the padding tokens' q, k, v are the
    projection's bias (the projection of a zero input), as in the peers.
    """

    def __init__(self, dim: int, num_heads: int, window_size, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str | None = None, convention="florence"):  # fmt: skip
        super().__init__()
        self.convention = get_convention(convention)
        if dim % num_heads:
            raise ValueError(f"dim: {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.window_size = _triple("window_size", window_size, 1)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.relative_position_bias_table = nn.Parameter(torch.zeros(bias_table_rows(self.window_size), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _backend(self, x) -> str:
        dummy = x[..., :1].unsqueeze(-1)  # device/dtype/strides probe for the backend choice; no copy
        backend = _op_backend("window_attention", self.backend)
        return WINDOW_ATTENTION.select([dummy, dummy, dummy], backend, dropout_p=self._dropout())

    def _dropout(self) -> float:
        return self.attn_drop if self.training else 0.0

    def forward(self, x: torch.Tensor, shift_size=(0, 0, 0)) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (B, T, H, W, C={self.dim}), got {got}")
        B, T, H, W, C = x.shape
        shift = tuple(shift_size)
        _check_window_args(self.window_size, shift, 3)
        nh, hd = self.num_heads, self.head_dim
        if self.convention.name != "florence":
            qkv = self.qkv(x).view(B, T, H, W, 3, nh, hd)
            bias = self.qkv.bias
            pad = bias.view(3, nh, hd).unbind(0) if bias is not None and self.convention.padding == "zeros" else None
            out = window_attention(*qkv.unbind(4), window_size=self.window_size, shift_size=shift,
                                   rel_pos_bias=self.relative_position_bias_table, scale=self.scale,
                                   dropout_p=self._dropout(), convention=self.convention, pad_token=pad,
                                   backend=_op_backend("window_attention", self.backend))  # fmt: skip
            return self.proj_drop(self.proj(out.reshape(B, T, H, W, C)))
        backend = self._backend(x)
        if backend == "torch":
            # Partition x once (C channels) before the projection instead of q, k and v after it (3C), and reverse
            # once after proj: 2 gathers instead of 4.
            g = resolve_geometry((T, H, W), self.window_size, shift)
            N, n_win = g.tokens_per_window, g.num_windows
            windows = window_partition(x, g.window, g.shift)  # (B*nW, N, C)
            qkv = self.qkv(windows).view(B, n_win, N, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, nh, N, hd)
            bias = attention_bias(self.relative_position_bias_table, (T, H, W), g, self.window_size, x.dtype, x.device)
            q, k, v = qkv.unbind(0)  # backward stacks once; indexing would zero-fill and copy three times
            out = attention_core_torch(q, k, v, bias, self.scale, self._dropout())
            out = self.proj(out.transpose(2, 3).reshape(B * n_win, N, C))
            return self.proj_drop(window_reverse(out, g.window, (B, T, H, W, C), g.shift))
        qkv = self.qkv(x).view(B, T, H, W, 3, nh, hd)
        if backend == "cpp":
            # The fused CPU kernel reads q, k, v from the projection's output in place and writes their gradient
            # into one buffer of the same layout.
            table = self.relative_position_bias_table
            out = _wattn_cpp_packed_fwd_op(qkv, table, list(self.window_size), list(shift), self.scale)[0]
        else:
            q, k, v = qkv.unbind(4)
            out = window_attention(q, k, v, window_size=self.window_size, shift_size=shift,
                                   rel_pos_bias=self.relative_position_bias_table, scale=self.scale,
                                   dropout_p=self._dropout(), backend=backend)  # fmt: skip
        return self.proj_drop(self.proj(out.reshape(B, T, H, W, C)))


class SwinBlock3D(nn.Module):
    """Pre-norm Swin / Video Swin block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))).

    Takes (B, T, H, W, C), or (B, H, W, C) with 2-value window/shift sizes. pad_mode "mask" (default) excludes
    tokens in padding from attention; "zeros" zero-pads the normed input before the projection, so padded tokens take
    part as keys (torchvision's 2-D geometry). ``convention`` (instead of pad_mode) names any peer's geometry exactly
    (see :func:`florence_kernels.window_attention`): "timm" for timm's blocks, "torchvision" (= pad_mode "zeros"),
    "torchvision3d" for torchvision's and Video Swin's 3-D blocks.
    """

    def __init__(self, dim: int, num_heads: int, window_size=(2, 7, 7), shift_size=(0, 0, 0), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pad_mode: str = "mask",
                 backend: str | None = None, convention=None):  # fmt: skip
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode: expected one of {PAD_MODES}, got {pad_mode!r}")
        if convention is not None and pad_mode != "mask":
            raise ValueError(f"convention: give convention ({convention!r}) or pad_mode ({pad_mode!r}), not both")
        self.window_size = _triple("window_size", window_size, 1)
        self.shift_size = _triple("shift_size", shift_size, 0)
        _check_window_args(self.window_size, self.shift_size, 3)
        self.dim, self.pad_mode = dim, pad_mode
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention3D(dim, num_heads, self.window_size, qkv_bias, attn_drop, drop, backend,
                                      convention if convention is not None else "florence")  # fmt: skip
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop, chunked=backend != "reference")

    def _attention(self, x):
        if self.pad_mode == "mask":  # and any named convention: the op takes the geometry
            return self.attn(x, self.shift_size)
        B, T, H, W, C = x.shape
        g = resolve_geometry((T, H, W), self.window_size, self.shift_size)
        Tp, Hp, Wp = g.padded
        xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))
        return self.attn(xp, self.shift_size)[:, :T, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (B, T, H, W, C) or (B, H, W, C) with C = {self.dim}, got {got}")
        squeeze = x.dim() == 4
        if squeeze:
            x = x.unsqueeze(1)
        # Residual sums in place into the branch outputs (fresh tensors that no backward needs): two fewer
        # activation-sized allocations per block.
        x = self.drop_path(self._attention(self.norm1(x))).add_(x)
        x = self.drop_path(self.mlp(self.norm2(x))).add_(x)
        return x.squeeze(1) if squeeze else x


class UniCLLoss(nn.Module):
    """UniCL / CLIP loss with the learnable temperature: ``loss = contrastive_loss(u, v, exp(logit_scale), labels)``.

    logit_scale is stored as a log (CLIP's init log(1/0.07)) and clamped at log(100) before use, Florence's choice
    (../shared/SPEC.md section 2); the clamp passes no gradient above the cap, as in CLIP.
    """

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = math.log(100.0),
                 backend: str | None = None, process_group=None):  # fmt: skip
        super().__init__()
        if init_logit_scale > max_logit_scale:
            raise ValueError(f"init_logit_scale: {init_logit_scale} exceeds max_logit_scale {max_logit_scale}")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale
        self.backend = backend
        self.process_group = process_group

    def scale(self) -> torch.Tensor:
        """The multiplier tau = exp(min(logit_scale, max))."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp()

    def forward(self, image_features, text_features, labels=None):
        return contrastive_loss(image_features, text_features, self.scale(), labels, process_group=self.process_group,
                                backend=_op_backend("contrastive_loss", self.backend))  # fmt: skip


class ConvEmbed(nn.Module):
    """Convolution + LayerNorm to channels-last tokens (CoSwin's stem and patch merging; dims=3: Video CoSwin).

    Takes channels-first images/clips or a previous stage's channels-last tokens (see :func:`conv_embed`); returns
    (B, [T,] H', W', embed_dim). Parameters: proj (the convolution), norm (the LayerNorm).
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel_size, stride, padding, dims: int = 2, eps: float = 1e-5,
                 backend: str | None = None):  # fmt: skip
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims: expected 2 or 3, got {dims!r}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.proj = conv(in_chans, embed_dim, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.dims, self.backend = dims, backend

    def forward(self, x: torch.Tensor, input_layout: str = "auto") -> torch.Tensor:
        return conv_embed(x, self.proj.weight, self.proj.bias, self.norm.weight, self.norm.bias,
                          stride=self.proj.stride, padding=self.proj.padding, eps=self.norm.eps,
                          input_layout=input_layout, backend=_op_backend("conv_embed", self.backend))  # fmt: skip

    def load_inflated(self, state_dict_2d: dict) -> None:
        """Load a 2-D ConvEmbed's state dict into this 3-D one (Florence's inflation, see :func:`inflate_from_2d`)."""
        if self.dims != 3:
            raise ValueError("load_inflated: this ConvEmbed is 2-D; inflation makes a 3-D one")
        self.load_state_dict(inflate_from_2d(state_dict_2d, self.proj.kernel_size[0]))


def inflate_from_2d(state_dict_2d: dict, temporal_kernel: int) -> dict:
    """Florence's inflation of 2-D convolutions to 3-D: every 4-D kernel (C_out, C_in, kh, kw) is repeated over
    ``temporal_kernel`` frames and divided by it, so a clip of one repeated frame gives the 2-D result; every other
    entry (biases, norms) is copied. Keys are kept."""
    if not isinstance(temporal_kernel, int) or temporal_kernel < 1:
        raise ValueError(f"temporal_kernel: expected a positive int, got {temporal_kernel!r}")
    out = {}
    for key, value in state_dict_2d.items():
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            value = value.unsqueeze(2).repeat(1, 1, temporal_kernel, 1, 1) / temporal_kernel
        out[key] = value
    return out


# --- Dynamic Head (mmdetection's DyHeadBlock semantics and parameter names) -----------------------------------------


def _op_backend(op: str, backend: str | None) -> str | None:
    """``backend`` where the op has it, else automatic: one module-wide choice (e.g. "cpp") over ops that differ."""
    from ._dispatch import OPS

    return backend if backend is None or backend in OPS[op].backends else None


class _ConvAct(nn.Module):
    """A 1x1 convolution (mmcv ConvModule's ``conv``) followed by an activation."""

    def __init__(self, c_in: int, c_out: int, act):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


class DyReLU(nn.Module):
    """Task-aware attention: GAP -> 1x1 conv C -> C/4 -> ReLU -> 1x1 conv C/4 -> 4C -> hard sigmoid, then
    :func:`florence_kernels.dyrelu` (mmdetection's DyReLU: split order a1, b1, a2, b2)."""

    def __init__(self, channels: int, ratio: int = 4, backend: str | None = None):
        super().__init__()
        self.channels, self.backend = channels, backend
        self.conv1 = _ConvAct(channels, channels // ratio, nn.ReLU())
        self.conv2 = _ConvAct(channels // ratio, channels * 4, hard_sigmoid)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (B, C={self.channels}, H, W), got {got}")
        coefficients = self.conv2(self.conv1(F.adaptive_avg_pool2d(x, 1)))
        return dyrelu(x, coefficients, backend=_op_backend("dyrelu", self.backend))


class DyDCNv2(nn.Module):
    """Modulated deformable 3x3 convolution (bias-free) followed by GroupNorm(16): the spatial-aware term."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, backend: str | None = None):
        super().__init__()
        self.stride, self.backend = stride, backend
        self.conv = nn.Module()
        self.conv.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.norm = nn.GroupNorm(16, out_channels)

    def forward(self, x, offset, mask):
        H = (x.shape[-2] - 1) // self.stride + 1
        W = (x.shape[-1] - 1) // self.stride + 1
        # offsets (and masks) come from the middle level: sliced to this convolution's output size
        out = modulated_deform_conv2d(x, offset[..., :H, :W], mask[..., :H, :W], self.conv.weight, None,
                                      stride=self.stride, padding=1,
                                      backend=_op_backend("modulated_deform_conv2d", self.backend))  # fmt: skip
        return self.norm(out)


class DyHeadBlock(nn.Module):
    """One Dynamic Head block on a list of pyramid levels (same channels), as mmdetection's DyHeadBlock.

    For level l: offsets (18) and masks (9, sigmoid) from a 3x3 conv of F_l; spatial-aware DCNv2 + GroupNorm on F_l
    (stride 1), F_{l-1} (stride 2) and F_{l+1} (then bilinearly upsampled, align_corners=True); scale-aware weighting
    averaged over the terms; task-aware DyReLU. Offsets are sliced to each convolution's output size. Parameter names
    follow mmdetection (spatial_conv_high/mid/low.conv.weight, .norm, spatial_conv_offset,
    scale_attn_module.1, task_attn_module.conv1/conv2.conv).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, zero_init_offset: bool = True,
                 backend: str | None = None):  # fmt: skip
        super().__init__()
        out_channels = out_channels or in_channels
        self.spatial_conv_high = DyDCNv2(in_channels, out_channels, backend=backend)
        self.spatial_conv_mid = DyDCNv2(in_channels, out_channels, backend=backend)
        self.spatial_conv_low = DyDCNv2(in_channels, out_channels, stride=2, backend=backend)
        self.spatial_conv_offset = nn.Conv2d(in_channels, 27, 3, padding=1)
        self.scale_attn_module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, 1, 1))
        self.task_attn_module = DyReLU(out_channels, backend=backend)
        self.in_channels, self.backend = in_channels, backend
        for m in self.modules():  # mmdetection's init: normal(0, 0.01) convolutions, zero biases, zero offsets
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
            if isinstance(m, DyDCNv2):
                nn.init.normal_(m.conv.weight, 0, 0.01)
        if zero_init_offset:
            nn.init.zeros_(self.spatial_conv_offset.weight)
            nn.init.zeros_(self.spatial_conv_offset.bias)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        check_pyramid(x, self.in_channels)
        conv = self.scale_attn_module[1]
        outs = []
        for level in range(len(x)):
            offset_and_mask = self.spatial_conv_offset(x[level])
            offset, mask = offset_and_mask[:, :18], offset_and_mask[:, 18:].sigmoid()
            terms = [self.spatial_conv_mid(x[level], offset, mask)]
            if level > 0:
                terms.append(self.spatial_conv_low(x[level - 1], offset, mask))
            if level < len(x) - 1:
                high = self.spatial_conv_high(x[level + 1], offset, mask)
                terms.append(F.interpolate(high, size=x[level].shape[-2:], mode="bilinear", align_corners=True))
            if self.backend == "reference":  # the literal modules, as mmdetection runs them
                fused = scale_attention_terms(terms, conv.weight, conv.bias, self.backend)
                outs.append(self.task_attn_module(fused))
            else:
                outs.append(self._fused_level(terms, conv))
        return outs

    def _fused_level(self, terms, conv):
        """Scale- and task-aware steps in one pass over the terms: pi and DyReLU's coefficients need only the terms'
        pooled means (the mean of the weighted sum is the weighted sum of the means)."""
        H, W = terms[0].shape[-2:]
        terms = [t[..., :H, :W] for t in terms]
        dt = terms[0].dtype
        acc = torch.promote_types(dt, torch.float32)  # the small reductions in fp32 at least
        pooled = torch.stack([t.to(acc).mean(dim=(2, 3)) for t in terms], 1)  # (B, n, C)
        pi = hard_sigmoid(F.relu(pooled @ conv.weight.reshape(-1, 1).to(acc) + conv.bias.to(acc))).squeeze(-1)
        pooled_fused = (pi.unsqueeze(-1) * pooled).mean(1)  # (B, C): GAP of the scale-aware combination
        task = self.task_attn_module
        coefficients = task.conv2(task.conv1(pooled_fused.to(dt)[..., None, None]))
        backend = _op_backend("scale_task_attention", self.backend)
        return scale_task_attention(terms, pi.to(dt), coefficients, backend=backend)


def check_pyramid(x, channels: int) -> None:
    """The levels a DyHeadBlock can take, or a ValueError naming the level, its shape and what was expected.

    Level l's offsets drive the stride-2 3x3 deformable convolution of level l - 1 (mmdetection's spatial_conv_low),
    whose output is ceil(H / 2) x ceil(W / 2) of that level: so each level must be exactly that size of the one before
    it, as FPN levels made by stride-2 convolutions (padding 1) are. Floored sizes (17 -> 8, from pooling without
    padding or from cropping) are refused here rather than failing inside the convolution on offsets the caller never
    passed.
    """
    if not isinstance(x, (list, tuple)) or not x:
        raise ValueError(f"x: expected a non-empty list of (B, C, H, W) pyramid levels, got {type(x).__name__}")
    for i, t in enumerate(x):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != channels:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"x[{i}]: expected a (B, C={channels}, H, W) level, got {got}")
        if t.shape[0] != x[0].shape[0] or t.dtype != x[0].dtype or t.device != x[0].device:
            raise ValueError(
                f"x[{i}]: expected batch {x[0].shape[0]}, {x[0].dtype} on {x[0].device} like x[0], got batch "
                f"{t.shape[0]}, {t.dtype} on {t.device}"
            )
        if i > 0:
            (hp, wp), (h, w) = x[i - 1].shape[-2:], t.shape[-2:]
            want = ((hp + 1) // 2, (wp + 1) // 2)
            if (h, w) != want:
                raise ValueError(
                    f"x[{i}]: level {i} is {h}x{w}, expected {want[0]}x{want[1]}: each level must be the stride-2 size "
                    f"(ceil(H/2) x ceil(W/2)) of the one before it (x[{i - 1}] is {hp}x{wp}), as FPN levels from "
                    "stride-2 convolutions are; floored sizes (e.g. 17 -> 8) are not supported"
                )


def scale_attention_terms(terms, weight, bias, backend):
    """The level's terms, each of the level's size (the stride-2 term can be one row/column larger: cropped)."""
    H, W = terms[0].shape[-2:]
    backend = _op_backend("scale_aware_attention", backend)
    return scale_aware_attention([t[..., :H, :W] for t in terms], weight, bias, backend=backend)


class DyHead(nn.Module):
    """``num_blocks`` DyHeadBlocks in sequence on a list of pyramid levels (Florence: 6 blocks, 256 channels).

    mmdetection's constructor, ``DyHead(in_channels, out_channels, num_blocks=6, zero_init_offset=True,
    init_cfg=None)`` (mmdet/models/necks/dyhead.py): the first block maps in_channels to out_channels, the others
    keep out_channels; its blocks are ``dyhead_blocks`` (an nn.Sequential, mmdetection's name, so its state dicts
    load). ``init_cfg`` is accepted for compatibility; the initialisation is always mmdetection's (normal(0, 0.01)
    convolutions, zero biases, zero offsets when zero_init_offset). forward takes a list or tuple of (B, C, H, W)
    levels and returns a tuple, as mmdetection's.
    """

    def __init__(self, in_channels: int = 256, out_channels: int | None = None, num_blocks: int = 6,
                 zero_init_offset: bool = True, init_cfg=None, *, backend: str | None = None):  # fmt: skip
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("num_blocks", num_blocks)):
            if not isinstance(value, int) or value < (0 if name == "num_blocks" else 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if out_channels % 16:
            raise ValueError(f"out_channels: {out_channels} is not a multiple of 16 (the spatial terms' GroupNorm(16))")
        self.in_channels, self.out_channels, self.num_blocks = in_channels, out_channels, num_blocks
        self.zero_init_offset, self.init_cfg = zero_init_offset, init_cfg
        self.dyhead_blocks = nn.Sequential(
            *(
                DyHeadBlock(in_channels if i == 0 else out_channels, out_channels, zero_init_offset, backend=backend)
                for i in range(num_blocks)
            )  # fmt: skip
        )

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        if not isinstance(x, (list, tuple)):
            raise ValueError(f"x: expected a list or tuple of (B, C, H, W) pyramid levels, got {type(x).__name__}")
        return tuple(self.dyhead_blocks(list(x)))
