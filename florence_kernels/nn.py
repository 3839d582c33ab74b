"""Drop-in modules on the fused ops: Video Swin's window attention and block, in (B, T, H, W, C) layout.

Parameter names follow Video Swin's ``SwinTransformerBlock3D`` (norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2), so a state dict of timm's 2-D
``SwinTransformerBlock`` loads into the T = 1 case and gives the same output on (B, H, W, C) input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.window_attention import (
    WINDOW_ATTENTION,
    attention_bias,
    attention_core_torch,
    bias_table_rows,
    window_attention,
)
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


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class WindowAttention3D(nn.Module):
    """W-MSA / SW-MSA with relative position bias on (B, T, H, W, C) grids, through ``window_attention``.

    window_size: (Wt, Wh, Ww), or (Wh, Ww) for 2-D Swin (Wt = 1). The bias table has
    (2Wt-1)(2Wh-1)(2Ww-1) rows, Video Swin's layout (Swin's 2-D table when Wt = 1).
    """

    def __init__(self, dim: int, num_heads: int, window_size, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str | None = None):  # fmt: skip
        super().__init__()
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

    def _use_window_first(self, x) -> bool:
        # The torch backend partitions x once (C channels) before the projection instead of q, k and v after it
        # (3C), and reverses once after proj: 2 gathers instead of 4.
        dummy = x[..., :1].unsqueeze(-1)  # device/dtype/strides probe for backend choice; no copy
        return WINDOW_ATTENTION.select([dummy, dummy, dummy], self.backend, dropout_p=self._dropout()) == "torch"

    def _dropout(self) -> float:
        return self.attn_drop if self.training else 0.0

    def forward(self, x: torch.Tensor, shift_size=(0, 0, 0)) -> torch.Tensor:
        B, T, H, W, C = x.shape
        shift = tuple(shift_size)
        _check_window_args(self.window_size, shift, 3)
        nh, hd = self.num_heads, self.head_dim
        if self._use_window_first(x):
            g = resolve_geometry((T, H, W), self.window_size, shift)
            N, n_win = g.tokens_per_window, g.num_windows
            windows = window_partition(x, g.window, g.shift)  # (B*nW, N, C)
            qkv = self.qkv(windows).view(B, n_win, N, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, nh, N, hd)
            bias = attention_bias(self.relative_position_bias_table, (T, H, W), g, self.window_size, x.dtype, x.device)
            q, k, v = qkv.unbind(0)  # backward stacks once; indexing would zero-fill and copy three times
            out = attention_core_torch(q, k, v, bias, self.scale, self._dropout())
            out = self.proj(out.transpose(2, 3).reshape(B * n_win, N, C))
            return self.proj_drop(window_reverse(out, g.window, (B, T, H, W, C), g.shift))
        q, k, v = self.qkv(x).view(B, T, H, W, 3, nh, hd).unbind(4)
        out = window_attention(q, k, v, window_size=self.window_size, shift_size=shift,
                               rel_pos_bias=self.relative_position_bias_table, scale=self.scale,
                               dropout_p=self._dropout(), backend=self.backend)  # fmt: skip
        return self.proj_drop(self.proj(out.reshape(B, T, H, W, C)))


class SwinBlock3D(nn.Module):
    """Pre-norm Swin / Video Swin block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))).

    Takes (B, T, H, W, C), or (B, H, W, C) with 2-value window/shift sizes. pad_mode "mask" (default) excludes
    tokens in padding from attention; "zeros" is Swin's own behaviour (the normed input is zero-padded before the
    projection, so padded tokens take part as keys), for parity with published checkpoints at sizes that do not
    divide the window.
    """

    def __init__(self, dim: int, num_heads: int, window_size=(2, 7, 7), shift_size=(0, 0, 0), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pad_mode: str = "mask",
                 backend: str | None = None):  # fmt: skip
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode: expected one of {PAD_MODES}, got {pad_mode!r}")
        self.window_size = _triple("window_size", window_size, 1)
        self.shift_size = _triple("shift_size", shift_size, 0)
        _check_window_args(self.window_size, self.shift_size, 3)
        self.pad_mode = pad_mode
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention3D(dim, num_heads, self.window_size, qkv_bias, attn_drop, drop, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)

    def _attention(self, x):
        if self.pad_mode == "mask":
            return self.attn(x, self.shift_size)
        B, T, H, W, C = x.shape
        g = resolve_geometry((T, H, W), self.window_size, self.shift_size)
        Tp, Hp, Wp = g.padded
        xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))
        return self.attn(xp, self.shift_size)[:, :T, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 4
        if squeeze:
            x = x.unsqueeze(1)
        if x.dim() != 5:
            raise ValueError(f"x: expected (B, T, H, W, C) or (B, H, W, C), got shape {tuple(x.shape)}")
        x = x + self.drop_path(self._attention(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.squeeze(1) if squeeze else x
