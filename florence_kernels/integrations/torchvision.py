"""torchvision's Swin, Swin V2 and Video Swin on the fused window attention, and its deformable convolution.

- ``ShiftedWindowAttention`` (swin_t/s/b) and ``ShiftedWindowAttentionV2`` (swin_v2_t/s/b): the ``"torchvision"``
  convention: pad, then roll the padded grid; padded tokens are zero inputs (q, k, v = the projection's bias, with
  the k bias zeroed under V2, as torchvision does) and take part as keys; the window never shrinks and the shift is
  dropped on an axis where the window covers the padded size. V2: cosine attention with ``logit_scale`` and the
  table ``16 sigmoid(cpb_mlp(relative_coords_table))``.
- ``ShiftedWindowAttention3d`` (swin3d_t/s/b): the ``"torchvision3d"`` convention: Swin's shrink rule per axis and
  the nominal index truncated to the shrunken window's first N tokens (``relative_position_index[:N, :N]``).
- ``torchvision.ops.DeformConv2d``: :func:`florence_kernels.deform_conv2d`, torchvision's signature and semantics.

    import torchvision, florence_kernels as fk
    model = torchvision.models.swin_t()
    print(fk.patch(model))   # ShiftedWindowAttention: 12
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models import swin_transformer as _swin
from torchvision.models.video import swin_transformer as _swin3d
from torchvision.ops import DeformConv2d

from ..ops.deform_conv import deform_conv2d
from ..ops.window_attention import window_attention
from . import Patcher


def _project(self, x, qkv_bias, spatial):
    """q, k, v (B, *spatial, nh, hd) views of one projection, and the padding token (the bias) or None."""
    nh = self.num_heads
    qkv = F.linear(x, self.qkv.weight, qkv_bias).view(*x.shape[:-1], 3, nh, -1)
    pad = qkv_bias.view(3, nh, -1).unbind(0) if qkv_bias is not None else None
    return (*qkv.unbind(-3), pad)


def _finish(self, out, x):
    out = F.linear(out.reshape(*x.shape[:-1], -1), self.proj.weight, self.proj.bias)
    return F.dropout(out, p=self.dropout, training=self.training)


def _make_2d(backend):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, W, C)
        q, k, v, pad = _project(self, x, self.qkv.bias, 2)
        table = self.relative_position_bias_table
        out = window_attention(q, k, v, window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                               rel_pos_bias=table, dropout_p=self.attention_dropout if self.training else 0.0,
                               convention="torchvision", pad_token=pad, backend=backend)  # fmt: skip
        return _finish(self, out, x)

    return forward


def v2_bias_table(self) -> torch.Tensor:
    """Swin V2's table, ((2Wh-1)(2Ww-1), num_heads): 16 sigmoid of the continuous position bias MLP (torchvision)."""
    return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))


def _make_v2(backend):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, W, C)
        bias = self.qkv.bias
        if bias is not None:  # torchvision zeroes the k bias in the forward (no gradient reaches it)
            n = bias.numel() // 3
            keep = torch.ones_like(bias)
            keep[n : 2 * n] = 0
            bias = bias * keep
        q, k, v, pad = _project(self, x, bias, 2)
        out = window_attention(q, k, v, window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                               rel_pos_bias=v2_bias_table(self), logit_scale=self.logit_scale,
                               dropout_p=self.attention_dropout if self.training else 0.0,
                               convention="torchvision", pad_token=pad, backend=backend)  # fmt: skip
        return _finish(self, out, x)

    return forward


def _make_3d(backend):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, H, W, C)
        q, k, v, pad = _project(self, x, self.qkv.bias, 3)
        out = window_attention(q, k, v, window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                               rel_pos_bias=self.relative_position_bias_table,
                               dropout_p=self.attention_dropout if self.training else 0.0,
                               convention="torchvision3d", pad_token=pad, backend=backend)  # fmt: skip
        return _finish(self, out, x)

    return forward


def _make_deform(backend):
    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask, backend=backend)  # fmt: skip

    return forward


def patchers() -> list[Patcher]:
    return [
        Patcher(_swin.ShiftedWindowAttention, "forward", _make_2d),
        Patcher(_swin.ShiftedWindowAttentionV2, "forward", _make_v2),
        Patcher(_swin3d.ShiftedWindowAttention3d, "forward", _make_3d),
        Patcher(DeformConv2d, "forward", _make_deform),
    ]


def unsupported() -> dict[type, str]:
    return {}


def patch(model, *, backend=None):
    """``florence_kernels.patch(model, libraries=("torchvision",))``."""
    from .. import integrations

    return integrations.patch(model, backend=backend, libraries=("torchvision",))
