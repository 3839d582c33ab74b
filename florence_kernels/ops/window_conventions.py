"""Window geometry conventions of the Swin implementations people use, and Swin V2's cosine attention, for
:func:`florence_kernels.window_attention`.

Swin implementations agree on windows of a grid that the window divides, and disagree everywhere else. A
:class:`WindowConvention` names the four choices, per axis of (T, H, W):

- ``order``: ``"pad_roll"`` zero-pads the grid to a multiple of the window and then rolls the padded grid by minus
  the shift (torchvision's ``shifted_window_attention`` and ``_3d``, Video Swin); ``"roll_pad"`` rolls the real grid
  and pads after it (timm 1.0's ``SwinTransformerBlock._attn`` and ``SwinTransformerV2Block._attn``). Either way the
  shift mask's regions are Swin's slices ``[0, P - w)``, ``[P - w, P - s)``, ``[P - s, P)`` of the padded size P.
- ``padding``: ``"mask"`` excludes padded tokens from every softmax (this library's choice, exact for any size);
  ``"zeros"`` makes them tokens of a zero input, as every peer does: their q, k, v are the projection of zero (its
  bias), given as ``pad_token``, and they take part as keys.
- ``shrink``: ``"swin"`` shrinks the window to the input and drops the shift on axes where the input is <= the window
  (Swin's ``get_window_size``, torchvision's ``_get_window_and_shift_size``); ``"pad_to_window"`` keeps the window and
  drops the shift where the window is >= the padded size (torchvision's 2-D ``shifted_window_attention``); ``"none"``
  uses window and shift as given (timm, whose blocks resolve both from ``input_resolution`` when built).
- ``bias_index``: ``"coords"`` indexes the nominal table by the relative coordinates of the effective window;
  ``"truncated"`` takes the first N x N entries of the nominal window's index (Video Swin's and torchvision's
  ``relative_position_index[:N, :N]``), which differs from ``"coords"`` when a non-leading axis shrinks.

Swin V2 (``logit_scale`` given): scaled cosine attention, ``normalize(q) normalize(k)^T * exp(min(logit_scale,
log 100))`` per head (Liu et al. 2022, eq. 2; timm's and torchvision's clamp), plus the table, which the caller's
continuous position bias MLP produced (already through ``16 sigmoid``): the kernels take the table.

The fused kernels run the ``"florence"`` geometry natively. Other conventions reach them by arranging q, k, v on a
grid that the window divides, where the native roll lands every token where the convention puts it (one gather in,
one gather out, padding tokens materialised): exact, since attention sees the same tokens in the same windows with
the same bias and mask. Where no such grid exists (``"mask"`` padding with ``"roll_pad"``, a shift on an axis with one
window, a truncated index that differs from the coordinates) only reference and torch run it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .window_partition import Geometry


class WindowConvention(NamedTuple):
    """Where padding goes and how it enters attention, when the window shrinks, how the bias is indexed (module doc)."""

    name: str
    order: str  # "pad_roll" | "roll_pad"
    padding: str  # "mask" | "zeros"
    shrink: str  # "swin" | "pad_to_window" | "none"
    bias_index: str  # "coords" | "truncated"


CONVENTIONS = {
    c.name: c
    for c in (
        WindowConvention("florence", "pad_roll", "mask", "swin", "coords"),
        WindowConvention("timm", "roll_pad", "zeros", "none", "coords"),
        WindowConvention("torchvision", "pad_roll", "zeros", "pad_to_window", "coords"),
        WindowConvention("torchvision3d", "pad_roll", "zeros", "swin", "truncated"),
    )
}
_FIELDS = {
    "order": ("pad_roll", "roll_pad"),
    "padding": ("mask", "zeros"),
    "shrink": ("swin", "pad_to_window", "none"),
    "bias_index": ("coords", "truncated"),
}
MAX_LOGIT_SCALE = math.log(100.0)  # Swin V2's clamp of the learnt log scale (timm, torchvision)


def get_convention(convention) -> WindowConvention:
    """A preset name ("florence", "timm", "torchvision", "torchvision3d") or a WindowConvention; ValueError else."""
    if isinstance(convention, WindowConvention):
        for field, allowed in _FIELDS.items():
            if getattr(convention, field) not in allowed:
                raise ValueError(f"convention.{field}: expected one of {allowed}, got {getattr(convention, field)!r}")
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {tuple(CONVENTIONS)} or a WindowConvention, got {convention!r}")
    return CONVENTIONS[convention]


def resolve(thw, window, shift, conv: WindowConvention) -> Geometry:
    """Effective window and shift, padded size and window counts of a (T, H, W) grid under ``conv``."""
    ws, ss = [], []
    for size, w, s in zip(thw, window, shift, strict=True):
        size, w, s = int(size), int(w), int(s)
        if conv.shrink == "swin" and size <= w:
            w, s = max(size, 1), 0
        elif conv.shrink == "pad_to_window" and w >= -(-size // w) * w:
            s = 0
        ws.append(w)
        ss.append(s)
    counts = tuple(-(-int(size) // w) for size, w in zip(thw, ws, strict=True))
    padded = tuple(n * w for n, w in zip(counts, ws, strict=True))
    return Geometry(tuple(ws), tuple(ss), padded, counts)


def _axis_source(length: int, padded: int, shift: int, order: str):
    """Per shifted position j of one axis: the real index it holds, and whether it holds one (else padding)."""
    j = torch.arange(padded)
    if order == "pad_roll":
        src = (j + shift) % padded
        return src, src < length
    real = j < length
    return torch.where(real, (j + shift) % max(length, 1), j), real


def _regions(padded: int, window: int, shift: int) -> torch.Tensor:
    """Swin's shift-mask region of each shifted position on one axis (window_attention's rule, on CPU)."""
    from .window_attention import _axis_regions

    return _axis_regions(padded, window, shift, torch.device("cpu"))


def _windows(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(Tp, Hp, Wp) -> (nW, N) in Video Swin's window order."""
    (wt, wh, ww), counts = g.window, g.counts
    x = x.view(counts[0], wt, counts[1], wh, counts[2], ww).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, wt * wh * ww)


@functools.lru_cache(maxsize=128)
def window_plan(thw: tuple, g: Geometry, conv: WindowConvention, device: torch.device):
    """(gather, inverse, real, mask): ``gather`` (nW * N,) rows of the (T*H*W + 1)-row token table (the last row is
    the padding token) in window order; ``inverse`` (T*H*W,) the window-order position of every real token;
    ``real`` (nW, N) bool; ``mask`` additive (nW, N, N) float32 (-100 between shift regions, -inf on padded keys
    under "mask" padding), or None when neither applies."""
    T, H, W = thw
    L = T * H * W
    (st, sh, sw), (Tp, Hp, Wp) = g.shift, g.padded
    (t, rt), (h, rh), (w, rw) = (
        _axis_source(n, p, s, conv.order) for n, p, s in zip(thw, g.padded, g.shift, strict=True)
    )
    real = rt.view(-1, 1, 1) & rh.view(1, -1, 1) & rw.view(1, 1, -1)
    flat = t.view(-1, 1, 1) * (H * W) + h.view(1, -1, 1) * W + w.view(1, 1, -1)
    flat = torch.where(real, flat, torch.full_like(flat, L))
    gather, real_w = _windows(flat, g).reshape(-1), _windows(real, g)
    inverse = _inverse(gather, L)
    mask = None
    if any(g.shift) or (conv.padding == "mask" and L != Tp * Hp * Wp):
        regions = _windows(
            _regions(Tp, g.window[0], st).view(-1, 1, 1) * 9
            + _regions(Hp, g.window[1], sh).view(1, -1, 1) * 3
            + _regions(Wp, g.window[2], sw).view(1, 1, -1),
            g,
        )
        mask = torch.zeros(regions.shape[0], regions.shape[1], regions.shape[1])
        mask.masked_fill_(regions[:, :, None] != regions[:, None, :], -100.0)
        if conv.padding == "mask":
            mask.masked_fill_(~real_w[:, None, :], float("-inf"))
    to = functools.partial(torch.Tensor.to, device=device)
    return to(gather), to(inverse), to(real_w), (to(mask) if mask is not None else None)


@functools.lru_cache(maxsize=64)
def bias_index(window: tuple, nominal: tuple, how: str, device: torch.device) -> torch.Tensor:
    """(N, N) rows of the nominal table for the effective window: by relative coordinates, or the nominal window's
    index truncated to its first N tokens."""
    from .window_attention import relative_position_index

    if how == "coords":
        return relative_position_index(tuple(window), tuple(nominal), device)
    N = window[0] * window[1] * window[2]
    return relative_position_index(tuple(nominal), tuple(nominal), device)[:N, :N]


def cosine_logit_scale(logit_scale: torch.Tensor, num_heads: int, dtype) -> torch.Tensor:
    """(num_heads,) multipliers exp(min(logit_scale, log 100)) of Swin V2's cosine attention."""
    return logit_scale.reshape(num_heads).clamp(max=MAX_LOGIT_SCALE).exp().to(dtype)


def _acc(dtype):
    """fp32 for 16-bit inputs: F.normalize's eps (1e-12) is 0 in fp16, where a zero token (padding, V2's zero k bias)
    would give 0 / 0; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _normalize(x, mult=None):
    y = F.normalize(x.to(_acc(x.dtype)), dim=-1)
    return (y if mult is None else y * mult).to(x.dtype)


def cosine_prologue(q, k, logit_scale, pad_token):
    """Swin V2 on kernels that compute ``scale q k^T``: normalised q times the head's multiplier, normalised k, and
    the same for the padding token (normalised in fp32 at least, rounded once); the caller passes scale = 1."""
    mult = cosine_logit_scale(logit_scale, q.shape[-2], _acc(q.dtype)).unsqueeze(-1)  # (nh, 1)
    q, k = _normalize(q, mult), _normalize(k)
    if pad_token is not None:
        pq, pk, pv = pad_token
        pad_token = (_normalize(pq, mult) if pq is not None else None, _normalize(pk) if pk is not None else None, pv)
    return q, k, pad_token


def _pad_rows(pad_token, i, x):
    """(1, 1, nh, hd) padding token i (0 q, 1 k, 2 v) in x's dtype; zeros when None."""
    if pad_token is None or pad_token[i] is None:
        return x.new_zeros(1, 1, *x.shape[-2:])
    return pad_token[i].to(x.dtype).reshape(1, 1, *x.shape[-2:])


def _token_table(x, i, pad_token):
    """(B, T*H*W + 1, nh, hd): the grid's tokens and, last, padding token i (the row a gather index L points to)."""
    B, T, H, W, nh, hd = x.shape
    return torch.cat([x.reshape(B, T * H * W, nh, hd), _pad_rows(pad_token, i, x).expand(B, 1, nh, hd)], 1)


def _inverse(gather: torch.Tensor, L: int) -> torch.Tensor:
    """(L,) the position in ``gather`` of each real token 0..L-1 (each appears exactly once)."""
    inverse = torch.empty(L, dtype=torch.long)
    real = gather < L
    inverse[gather[real]] = torch.arange(gather.numel())[real]
    return inverse


# --- reference: the literal code path of each convention ------------------------------------------------------------


def window_attention_reference(q, k, v, window_size, shift_size, rel_pos_bias, scale, conv, pad_token=None,
                               logit_scale=None, dropout_p=0.0):  # fmt: skip
    """q, k, v (B, T, H, W, nh, hd). Pad (with the padding token) and roll in the convention's order, partition, q k^T
    (scaled, or cosine with the logit scale) + bias[index] + shift mask (and -inf on padded keys under "mask"),
    softmax, @ v, reverse, roll back, crop."""
    B, T, H, W, nh, hd = q.shape
    g = resolve((T, H, W), window_size, shift_size, conv)
    (wt, wh, ww), (st, sh, sw), (Tp, Hp, Wp), (nT, nH, nW) = g
    N, shifted = wt * wh * ww, st or sh or sw

    def arrange(x, fill):  # (B, T, H, W, ...) -> the shifted padded grid (B, Tp, Hp, Wp, ...)
        if conv.order == "roll_pad" and shifted:
            x = torch.roll(x, shifts=(-st, -sh, -sw), dims=(1, 2, 3))
        full = fill.expand(B, Tp, Hp, Wp, *x.shape[4:]).clone()
        full[:, :T, :H, :W] = x
        if conv.order == "pad_roll" and shifted:
            full = torch.roll(full, shifts=(-st, -sh, -sw), dims=(1, 2, 3))
        return full

    def to_windows(x):
        x = x.view(B, nT, wt, nH, wh, nW, ww, nh, hd).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
        return x.reshape(B * nT * nH * nW, nh, N, hd)

    qw, kw, vw = (to_windows(arrange(x, _pad_rows(pad_token, i, x)[None])) for i, x in enumerate((q, k, v)))
    if logit_scale is not None:
        # as the peers write it, in q's dtype; F.normalize's eps raised to the smallest normal number of fp16,
        # where 1e-12 is 0 and a zero token (padding, V2's zero k bias) would give 0 / 0
        eps = max(1e-12, torch.finfo(q.dtype).tiny)
        mult = cosine_logit_scale(logit_scale, nh, q.dtype).view(1, nh, 1, 1)
        attn = (F.normalize(qw, dim=-1, eps=eps) @ F.normalize(kw, dim=-1, eps=eps).transpose(-2, -1)) * mult
    else:
        attn = (qw * scale) @ kw.transpose(-2, -1)
    if rel_pos_bias is not None:
        index = bias_index((wt, wh, ww), tuple(window_size), conv.bias_index, q.device)
        attn = attn + rel_pos_bias[index.reshape(-1)].view(N, N, nh).permute(2, 0, 1).unsqueeze(0)
    n_win = nT * nH * nW
    if shifted:  # Swin's image mask: one label per (d, h, w) slice triple of the padded grid, later slices win
        img = torch.zeros(Tp, Hp, Wp, device=q.device)
        cuts = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(g.window, g.shift, strict=True)]
        count = 0
        for d in cuts[0]:
            for h in cuts[1]:
                for w in cuts[2]:
                    img[d, h, w] = count
                    count += 1
        labels = img.view(nT, wt, nH, wh, nW, ww).permute(0, 2, 4, 1, 3, 5).reshape(n_win, N)
        shift_mask = (labels[:, :, None] != labels[:, None, :]).to(attn.dtype) * -100.0
        attn = (attn.view(B, n_win, nh, N, N) + shift_mask[None, :, None]).view(B * n_win, nh, N, N)
    if conv.padding == "mask" and (Tp, Hp, Wp) != (T, H, W):
        real = arrange(torch.ones(B, T, H, W, 1, dtype=torch.bool, device=q.device),
                       torch.zeros(1, 1, 1, 1, 1, dtype=torch.bool, device=q.device))  # fmt: skip
        real_w = real[0, ..., 0].reshape(nT, wt, nH, wh, nW, ww).permute(0, 2, 4, 1, 3, 5).reshape(n_win, N)
        attn = attn.view(B, n_win, nh, N, N).masked_fill(~real_w[None, :, None, None, :], float("-inf"))
        attn = attn.view(B * n_win, nh, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    out = (attn @ vw).view(B, nT, nH, nW, nh, wt, wh, ww, hd)
    out = out.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(B, Tp, Hp, Wp, nh, hd)
    if conv.order == "pad_roll" and shifted:
        out = torch.roll(out, shifts=(st, sh, sw), dims=(1, 2, 3))
    out = out[:, :T, :H, :W]
    if conv.order == "roll_pad" and shifted:
        out = torch.roll(out, shifts=(st, sh, sw), dims=(1, 2, 3))
    return out.contiguous()


# --- torch: any convention, one gather in and one out ---------------------------------------------------------------


def window_attention_torch(q, k, v, window_size, shift_size, rel_pos_bias, scale, conv, pad_token=None,
                           dropout_p=0.0):  # fmt: skip
    """q, k, v (B, T, H, W, nh, hd) (cosine already applied: see :func:`cosine_prologue`). Each tensor is gathered
    into windows from its rows plus the padding token's row, the bias and mask are merged into one additive term
    broadcast over the batch, and the output is gathered back to the grid (autograd scatters the gradients)."""
    from .window_attention import attention_core_torch

    B, T, H, W, nh, hd = q.shape
    g = resolve((T, H, W), window_size, shift_size, conv)
    gather, inverse, _, mask = window_plan((T, H, W), g, conv, q.device)
    N, n_win = g.tokens_per_window, g.num_windows

    def to_windows(x, i):  # (B, nW, nh, N, hd)
        return _token_table(x, i, pad_token)[:, gather].view(B, n_win, N, nh, hd).transpose(2, 3)

    term = None
    if rel_pos_bias is not None:
        index = bias_index(g.window, tuple(window_size), conv.bias_index, q.device)
        term = rel_pos_bias[index.reshape(-1)].view(N, N, nh).permute(2, 0, 1).to(q.dtype).unsqueeze(0)
    if mask is not None:
        m = mask.to(q.dtype).unsqueeze(1)  # (nW, 1, N, N)
        term = m if term is None else m + term
    out = attention_core_torch(to_windows(q, 0), to_windows(k, 1), to_windows(v, 2), term, scale, dropout_p)
    return out.transpose(2, 3).reshape(B, n_win * N, nh, hd)[:, inverse].view(B, T, H, W, nh, hd)


# --- the fused kernels: arrange a grid their native roll puts in place ----------------------------------------------


@functools.lru_cache(maxsize=128)
def native_plan(thw: tuple, g: Geometry, conv: WindowConvention, nominal: tuple, nominal_shift: tuple,
                device: torch.device):  # fmt: skip
    """How the native ("florence") kernels run ``conv`` on this grid: ("direct", None, None) when the geometry is
    already native; ("arrange", gather, inverse) to run them on a (Tp, Hp, Wp) grid whose row p is token
    ``gather[p]`` of the (T*H*W + 1)-row table (last row: the padding token), real token l's output at ``inverse[l]``;
    ("none", reason, None) where no such grid exists. The kernels get the nominal window and shift and resolve
    them (Swin's rule) on the grid they see: that must land on ``g``."""
    from .window_partition import resolve_geometry

    if (
        bias_index(g.window, nominal, conv.bias_index, device).tolist()
        != bias_index(g.window, nominal, "coords", device).tolist()
    ):
        return "none", f"the {conv.bias_index} bias index of window {g.window} is not the coordinates' index", None
    if resolve_geometry(thw, nominal, nominal_shift) == g and (conv.order == "pad_roll" or tuple(thw) == g.padded):
        if conv.padding == "mask" or tuple(thw) == g.padded:
            return "direct", None, None
    if conv.padding == "mask":
        return "none", f"{conv.order} order with masked padding on grid {tuple(thw)}, window {g.window}", None
    if resolve_geometry(g.padded, nominal, nominal_shift) != g:
        return "none", f"a shift {g.shift} on an axis with one window {g.window} (padded grid {g.padded})", None
    axes = []
    for size, P, s in zip(thw, g.padded, g.shift, strict=True):
        src, real = _axis_source(size, P, s, conv.order)  # shifted position j holds src[j]
        p = torch.arange(P)
        j = (p - s) % P  # the native roll reads grid row p at shifted position j
        axes.append((src[j], real[j]))
    T, H, W = thw
    (t, rt), (h, rh), (w, rw) = axes
    real = rt.view(-1, 1, 1) & rh.view(1, -1, 1) & rw.view(1, 1, -1)
    flat = t.view(-1, 1, 1) * (H * W) + h.view(1, -1, 1) * W + w.view(1, 1, -1)
    gather = torch.where(real, flat, torch.full_like(flat, T * H * W)).reshape(-1)
    inverse = _inverse(gather, T * H * W)
    return "arrange", gather.to(device), inverse.to(device)


def arrange(x, i, pad_token, gather, padded):
    """(B, T, H, W, nh, hd) -> (B, Tp, Hp, Wp, nh, hd): rows of x and the padding token i, by ``gather``."""
    B, nh, hd = x.shape[0], x.shape[-2], x.shape[-1]
    return _token_table(x, i, pad_token)[:, gather].view(B, *padded, nh, hd)


def unarrange(out, inverse, thw):
    """(B, Tp, Hp, Wp, nh, hd) -> (B, T, H, W, nh, hd): each real token's output."""
    B, Tp, Hp, Wp, nh, hd = out.shape
    return out.reshape(B, Tp * Hp * Wp, nh, hd)[:, inverse].view(B, *thw, nh, hd)
