"""timm's Swin and Swin V2 on the fused window attention (timm 1.0: ``timm.models.swin_transformer`` and
``swin_transformer_v2``).

The patch replaces a block's ``_attn(x)`` (cyclic shift, pad, partition, window attention, reverse, crop, roll back)
with one :func:`florence_kernels.window_attention` call under the ``"timm"`` convention: roll the real grid, then pad;
padded tokens are zero inputs whose q, k, v are the projection's bias and take part as keys; the shift mask's regions
are Swin's slices of the padded grid; window and shift are the block's own (timm resolves them from
``input_resolution`` when the block is built). The block's norms, MLP, residuals and stochastic depth stay timm's.

Swin V2 (``SwinTransformerV2Block``): scaled cosine attention with the block's ``logit_scale`` (clamped at log 100,
as timm does) and the continuous position bias table ``16 sigmoid(cpb_mlp(relative_coords_table))``, which the op
takes as its table; q, k, v biases are timm's ``q_bias``, ``k_bias`` (zeros), ``v_bias``.

    import timm, florence_kernels as fk
    model = timm.create_model("swin_tiny_patch4_window7_224")
    print(fk.patch(model))   # SwinTransformerBlock: 12
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as _v1
from timm.models import swin_transformer_v2 as _v2

from ..ops.window_attention import window_attention
from . import Patcher


def _dropout(p: float, training: bool) -> float:
    return p if training else 0.0


def _make_v1(backend):
    def _attn(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, W, C), normed
        B, H, W, C = x.shape
        attn = self.attn
        nh = attn.num_heads
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, H, W, 3, nh, -1)  # (B, H, W, 3, nh, hd)
        pad = attn.qkv.bias.view(3, nh, -1).unbind(0) if attn.qkv.bias is not None else None
        q, k, v = qkv.unbind(3)
        out = window_attention(q, k, v, window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                               rel_pos_bias=attn.relative_position_bias_table, scale=attn.scale,
                               dropout_p=_dropout(attn.attn_drop.p, attn.training), convention="timm",
                               pad_token=pad, backend=backend)  # fmt: skip
        return attn.proj_drop(attn.proj(out.reshape(B, H, W, -1)))

    return _attn


def v2_bias_table(attn) -> torch.Tensor:
    """Swin V2's table, ((2Wh-1)(2Ww-1), num_heads): 16 sigmoid of the continuous position bias MLP (timm)."""
    return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))


def _make_v2(backend):
    def _attn(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, W, C), not normed (V2 is post-norm)
        B, H, W, C = x.shape
        attn = self.attn
        nh = attn.num_heads
        # timm's qkv has no bias of its own; q_bias, k_bias (a zero buffer) and v_bias make the projection's bias
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
        qkv = F.linear(x, attn.qkv.weight, bias).view(B, H, W, 3, nh, -1)
        pad = bias.view(3, nh, -1).unbind(0) if bias is not None else None
        q, k, v = qkv.unbind(3)
        out = window_attention(q, k, v, window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                               rel_pos_bias=v2_bias_table(attn), logit_scale=attn.logit_scale,
                               dropout_p=_dropout(attn.attn_drop.p, attn.training), convention="timm",
                               pad_token=pad, backend=backend)  # fmt: skip
        return attn.proj_drop(attn.proj(out.reshape(B, H, W, -1)))

    return _attn


def _check_v1(block) -> str | None:
    if type(block.attn) is not _v1.WindowAttention:
        return f"attn is {type(block.attn).__name__}, not timm's WindowAttention"
    return None


def _check_v2(block) -> str | None:
    if type(block.attn) is not _v2.WindowAttention:
        return f"attn is {type(block.attn).__name__}, not timm's Swin V2 WindowAttention"
    return None


def patchers() -> list[Patcher]:
    return [
        Patcher(_v1.SwinTransformerBlock, "_attn", _make_v1, _check_v1),
        Patcher(_v2.SwinTransformerV2Block, "_attn", _make_v2, _check_v2),
    ]


def unsupported() -> dict[type, str]:
    """timm modules recognised but not patched, with the reason."""
    out = {}
    try:
        from timm.models import swin_transformer_v2_cr as cr

        out[cr.SwinTransformerV2CrBlock] = (
            "Swin V2 CR (timm's own V2 variant: post-norm scaled cosine attention with a different position-bias MLP "
            "and masking): not supported yet"
        )
    except ImportError:  # pragma: no cover
        pass
    return out


def patch(model, *, backend=None):
    """``florence_kernels.patch(model, libraries=("timm",))``."""
    from .. import integrations

    return integrations.patch(model, backend=backend, libraries=("timm",))
