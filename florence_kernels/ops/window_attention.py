"""Shifted-window multi-head attention with relative position bias (Swin / Video Swin), fused.

``window_attention(q, k, v, window_size=..., shift_size=..., rel_pos_bias=table)`` equals: cyclic shift by minus
the shift, partition into windows, per window ``softmax(scale * q k^T + bias[index] + shift_mask) v``, reverse
partition, roll back. Tokens in padding (sizes not divisible by the window) are excluded from every softmax and
from the output. Windows shrink and shifts drop to 0 on axes where the input is <= the window; the bias table keeps
the layout of the nominal window (relative offsets of the effective window index the nominal table).

Read top to bottom: geometry (index, masks), the literal reference, the portable PyTorch path, the Triton forward
and backward kernels with their launchers, the custom op with autograd, the registry, the public function.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _env
from .._dispatch import Backend, Op, register_op
from .window_partition import (
    Geometry,
    _as_triple,
    _check_window_args,
    resolve_geometry,
    window_partition,
    window_reverse,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

SHIFT_MASK_VALUE = -100.0  # Swin's additive mask between regions of a shifted window


# --- geometry: bias index, shift mask, padding mask -----------------------------------------------------------------


def bias_table_rows(window_size) -> int:
    wt, wh, ww = window_size
    return (2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1)


@functools.lru_cache(maxsize=64)
def relative_position_index(window: tuple, nominal: tuple, device: torch.device) -> torch.Tensor:
    """(N, N) rows of the nominal table for each (query, key) pair of the effective window (Video Swin's index
    built from coordinates, so that shrunken windows keep the nominal layout)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N)
    Wt, Wh, Ww = nominal
    return (rel[0] + Wt - 1) * ((2 * Wh - 1) * (2 * Ww - 1)) + (rel[1] + Wh - 1) * (2 * Ww - 1) + (rel[2] + Ww - 1)


def _axis_regions(padded: int, window: int, shift: int, device) -> torch.Tensor:
    """Video Swin's slices (0, P-w), (P-w, P-s), (P-s, P) on shifted positions; one region when shift is 0."""
    j = torch.arange(padded, device=device)
    if shift == 0:
        return torch.zeros_like(j)
    return (j >= padded - window).long() + (j >= padded - shift).long()


@functools.lru_cache(maxsize=64)
def attention_masks(thw: tuple, g: Geometry, device: torch.device):
    """Additive (nW, N, N) mask of one sample: -100 between shift regions, -inf on keys that fall in padding.
    None when neither applies."""
    (wt, wh, ww), shift, padded, counts = g
    T, H, W = thw
    if not any(shift) and tuple(padded) == (T, H, W):
        return None
    regions = (
        _axis_regions(padded[0], wt, shift[0], device).view(-1, 1, 1) * 9
        + _axis_regions(padded[1], wh, shift[1], device).view(1, -1, 1) * 3
        + _axis_regions(padded[2], ww, shift[2], device).view(1, 1, -1)
    )
    valid = (
        (((torch.arange(padded[0], device=device) + shift[0]) % padded[0]) < T).view(-1, 1, 1)
        & (((torch.arange(padded[1], device=device) + shift[1]) % padded[1]) < H).view(1, -1, 1)
        & (((torch.arange(padded[2], device=device) + shift[2]) % padded[2]) < W).view(1, 1, -1)
    )

    def windows(x):  # (Tp, Hp, Wp) -> (nW, N) in Video Swin's order
        x = x.view(counts[0], wt, counts[1], wh, counts[2], ww).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, wt * wh * ww)

    rw, vw = windows(regions), windows(valid)
    mask = torch.zeros(rw.shape[0], rw.shape[1], rw.shape[1], device=device)
    mask.masked_fill_(rw[:, :, None] != rw[:, None, :], SHIFT_MASK_VALUE)
    mask.masked_fill_(~vw[:, None, :], float("-inf"))
    return mask


# --- reference: the literal Video Swin code path --------------------------------------------------------------------


def window_attention_reference(q, k, v, window_size, shift_size, rel_pos_bias, scale, dropout_p=0.0):
    """q, k, v (B, T, H, W, nh, hd): explicit pad, roll, partition, bias gather, -100 mask, softmax, reverse."""
    B, T, H, W, nh, hd = q.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    (wt, wh, ww), (st, sh, sw), (Tp, Hp, Wp), (nT, nH, nW) = g
    N = wt * wh * ww

    def to_windows(x):
        x = F.pad(x.reshape(B, T, H, W, nh * hd), (0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))
        if st or sh or sw:
            x = torch.roll(x, shifts=(-st, -sh, -sw), dims=(1, 2, 3))
        x = x.view(B, nT, wt, nH, wh, nW, ww, nh, hd).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
        return x.reshape(B * nT * nH * nW, nh, N, hd)

    qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
    attn = (qw * scale) @ kw.transpose(-2, -1)  # (B*nW, nh, N, N)
    if rel_pos_bias is not None:
        index = relative_position_index((wt, wh, ww), tuple(window_size), q.device)
        bias = rel_pos_bias[index.reshape(-1)].view(N, N, nh).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
    mask = attention_masks((T, H, W), g, q.device)
    if mask is not None:
        n_win = nT * nH * nW
        attn = (attn.view(B, n_win, nh, N, N) + mask.to(attn.dtype)[None, :, None]).view(B * n_win, nh, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    out = (attn @ vw).view(B, nT, nH, nW, nh, wt, wh, ww, hd)
    out = out.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(B, Tp, Hp, Wp, nh, hd)
    if st or sh or sw:
        out = torch.roll(out, shifts=(st, sh, sw), dims=(1, 2, 3))
    return out[:, :T, :H, :W].contiguous()


# --- torch: portable and fast ---------------------------------------------------------------------------------------
# One fused gather per tensor (window_partition on the auto-chosen backend reads strided q/k/v views in place), the
# bias gathered once and merged with the shift/padding mask into one (nW, nh, N, N) additive term broadcast over the
# batch, one scatter back. On CPU eager matmul + softmax beat SDPA at these window sizes (N = 49, hd = 32: 45 ms vs
# 55 ms fwd+bwd for 512 windows x 3 heads, 2 EPYC cores); on GPU SDPA with the additive mask is used.


def attention_bias(rel_pos_bias, thw, g: Geometry, nominal, dtype, device):
    """(nW or 1, nh or 1, N, N) additive term: gathered bias plus shift/padding mask, or None."""
    N = g.tokens_per_window
    mask = attention_masks(thw, g, device)
    bias = None
    if rel_pos_bias is not None:
        index = relative_position_index(g.window, tuple(nominal), device)
        bias = rel_pos_bias[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1).to(dtype)  # (nh, N, N)
    if mask is None:
        return None if bias is None else bias.unsqueeze(0)
    mask = mask.to(dtype).unsqueeze(1)  # (nW, 1, N, N)
    return mask if bias is None else mask + bias.unsqueeze(0)


def attention_core_torch(qw, kw, vw, attn_bias, scale, dropout_p=0.0):
    """qw, kw, vw (B, nW, nh, N, hd); attn_bias broadcastable to (B, nW, nh, N, N). Returns (B, nW, nh, N, hd)."""
    if qw.is_cuda:
        return F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    attn = torch.matmul(qw * scale, kw.transpose(-2, -1))  # q scaled first: in fp16 q k^T may overflow (notes below)
    if attn_bias is not None:
        attn.add_(attn_bias)  # in place: matmul's backward needs its inputs, not this output
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return torch.matmul(attn, vw)


def window_attention_torch(q, k, v, window_size, shift_size, rel_pos_bias, scale, dropout_p=0.0):
    B, T, H, W, nh, hd = q.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    N, n_win = g.tokens_per_window, g.num_windows

    def to_windows(x):  # (B, T, H, W, nh, hd) -> (B, nW, nh, N, hd), one gather
        w = window_partition(x.flatten(-2), g.window, g.shift)
        return w.view(B, n_win, N, nh, hd).transpose(2, 3)

    attn_bias = attention_bias(rel_pos_bias, (T, H, W), g, window_size, q.dtype, q.device)
    out = attention_core_torch(to_windows(q), to_windows(k), to_windows(v), attn_bias, scale, dropout_p)
    out = out.transpose(2, 3).reshape(B * n_win, N, nh * hd)
    return window_reverse(out, g.window, (B, T, H, W, nh * hd), g.shift).view(B, T, H, W, nh, hd)


# --- triton: fused forward and backward -----------------------------------------------------------------------------
# One program = one (window, head, block of queries) [forward, dq] or (window, head, block of keys) [dk, dv]. Tokens are
# addressed in the (B, T, H, W, nh, hd) grids directly: shift, partition and padding are coordinates computed in the
# kernel, the bias index and shift region come from the same coordinates, and nothing of size window^2 is written;
# the backward recomputes scores from the saved log-sum-exp (FlashAttention-2). The bias gradient is reduced as
# sum over windows of dS, accumulated with atomics into G (< 64) per-group (nh, N, N) fp32 buffers, then summed
# and scattered into the table in PyTorch.

if HAS_TRITON:

    @triton.jit
    def _token_coords(offs, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp):
        """In-window coords (a, p, q), shifted coords (ts, hs, ws) and source grid coords (t, h, w) of tokens."""
        a = offs // (wh * ww)
        p = (offs // ww) % wh
        q = offs % ww
        ts = (win // (nW * nH)) * wt + a
        hs = ((win // nW) % nH) * wh + p
        ws = (win % nW) * ww + q
        return a, p, q, ts, hs, ws, (ts + st) % Tp, (hs + sh) % Hp, (ws + sw) % Wp

    @triton.jit
    def _tokens(offs, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N):
        """_token_coords plus whether each token is real (inside the window count and not in padding)."""
        a, p, q, ts, hs, ws, t, h, w = _token_coords(offs, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp)
        return a, p, q, ts, hs, ws, t, h, w, (offs < N) & (t < T) & (h < H) & (w < W)

    @triton.jit
    def _grid_offsets(b, t, h, w, head, stride_b, stride_t, stride_h, stride_w, stride_head):
        """Element offsets of tokens (t, h, w) of sample b, head `head`, in a (B, T, H, W, heads, hd) grid."""
        return b * stride_b + t[:, None] * stride_t + h[:, None] * stride_h + w[:, None] * stride_w + head * stride_head

    @triton.jit
    def _load_pair(X, Y, b, t, h, w, head, valid, offs_d, d_mask, sxb, sxt, sxh, sxw, sxn, syb, syt, syh, syw, syn):
        """Rows of two grids (K and V, or Q and dO) for tokens (t, h, w); zeros where not valid."""
        mask = valid[:, None] & d_mask[None, :]
        x = tl.load(
            X + _grid_offsets(b, t, h, w, head, sxb, sxt, sxh, sxw, sxn) + offs_d[None, :], mask=mask, other=0.0
        )
        y = tl.load(
            Y + _grid_offsets(b, t, h, w, head, syb, syt, syh, syw, syn) + offs_d[None, :], mask=mask, other=0.0
        )
        return x, y, mask

    @triton.jit
    def _mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """tl.dot with fp32 accumulation; IEEE for fp32 inputs (no TF32). UPCAST only under Triton's interpreter,
        whose tl.dot reads bf16 operands wrongly (3.8): the operands go to fp32 there, every other step unchanged."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _region(j, P, w, s):
        """Video Swin's shift region of shifted position j on one axis: 0, 1, 2; always 0 when s == 0."""
        return ((j >= P - w).to(tl.int32) + (j >= P - s).to(tl.int32)) * (s > 0).to(tl.int32)

    @triton.jit
    def _scores(
        q, k, offs_m, offs_n, m_valid, n_valid,
        qa, qp, qq, qts, qhs, qws, ka, kp, kq, kts, khs, kws,
        BIAS, stride_bias_r, stride_bias_h, head, has_bias,
        Wh_nom, Ww_nom, Wt_nom, Tp, Hp, Wp, wt, wh, ww, st, sh, sw, scale, N,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """scale * q k^T + bias[index] + shift mask, -inf on keys in padding or past the window."""
        s = _mma(q, tl.trans(k), IEEE, UPCAST) * scale
        in_window = (offs_m < N)[:, None] & (offs_n < N)[None, :]
        if has_bias:
            rel = (
                (qa[:, None] - ka[None, :] + Wt_nom - 1) * ((2 * Wh_nom - 1) * (2 * Ww_nom - 1))
                + (qp[:, None] - kp[None, :] + Wh_nom - 1) * (2 * Ww_nom - 1)
                + (qq[:, None] - kq[None, :] + Ww_nom - 1)
            )
            bias = tl.load(BIAS + rel * stride_bias_r + head * stride_bias_h, mask=in_window, other=0.0)
            s += bias.to(tl.float32)
        q_region = _region(qts, Tp, wt, st) * 9 + _region(qhs, Hp, wh, sh) * 3 + _region(qws, Wp, ww, sw)
        k_region = _region(kts, Tp, wt, st) * 9 + _region(khs, Hp, wh, sh) * 3 + _region(kws, Wp, ww, sw)
        s = tl.where(q_region[:, None] != k_region[None, :], s - 100.0, s)
        return tl.where(n_valid[None, :] & in_window, s, float("-inf"))

    @triton.jit
    def _wattn_fwd_kernel(
        Q, K, V, Out, LSE, BIAS,
        sqb, sqt, sqh, sqw, sqn, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn,
        sob, sot, soh, sow, son, slb, slt, slh, slw, sln, stride_bias_r, stride_bias_h,
        NH, T, H, W, nT, nH, nW, wt, wh, ww, st, sh, sw, Wt_nom, Wh_nom, Ww_nom, has_bias, scale, N, HEAD_DIM,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_wh = tl.program_id(1)
        head = pid_wh % NH
        win_all = pid_wh // NH
        n_win = nT * nH * nW
        b = (win_all // n_win).to(tl.int64)
        win = win_all % n_win
        Tp, Hp, Wp = nT * wt, nH * wh, nW * ww
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        qa, qp, qq, qts, qhs, qws, qt, qh, qw, m_valid = _tokens(
            offs_m, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N
        )
        q_ptrs = Q + _grid_offsets(b, qt, qh, qw, head, sqb, sqt, sqh, sqw, sqn) + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            ka, kp, kq, kts, khs, kws, kt, kh, kw, n_valid = _tokens(
                offs_n, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N
            )
            k, v, kv_mask = _load_pair(
                K, V, b, kt, kh, kw, head, n_valid, offs_d, d_mask, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn
            )
            s = _scores(
                q, k, offs_m, offs_n, m_valid, n_valid, qa, qp, qq, qts, qhs, qws, ka, kp, kq, kts, khs, kws,
                BIAS, stride_bias_r, stride_bias_h, head, has_bias, Wh_nom, Ww_nom, Wt_nom, Tp, Hp, Wp,
                wt, wh, ww, st, sh, sw, scale, N, IEEE, UPCAST,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows past the window see only -inf; keep their arithmetic finite (they are never stored).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, IEEE, UPCAST)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = Out + _grid_offsets(b, qt, qh, qw, head, sob, sot, soh, sow, son) + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])
        lse_ptrs = LSE + b * slb + qt * slt + qh * slh + qw * slw + head * sln
        tl.store(lse_ptrs, m_i + tl.log(l_i), mask=m_valid)

    @triton.jit
    def _wattn_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, BIAS, DQ, DK, DV, DBIAS,
        sqb, sqt, sqh, sqw, sqn, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn,
        sgb, sgt, sgh, sgw, sgn, slb, slt, slh, slw, sln, stride_bias_r, stride_bias_h,
        NH, T, H, W, nT, nH, nW, wt, wh, ww, st, sh, sw, Wt_nom, Wh_nom, Ww_nom, has_bias, scale, N, HEAD_DIM,
        n_groups,
        KV_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """KV_PASS: program = (window, head, key block): dK, dV over all query blocks. Else program = (window, head,
        query block): dQ over all key blocks, and dS summed into DBIAS[window % n_groups, head]. DO, DQ, DK, DV,
        LSE, DELTA share the contiguous grid strides sg*/sl*."""
        pid = tl.program_id(0)
        pid_wh = tl.program_id(1)
        head = pid_wh % NH
        win_all = pid_wh // NH
        n_win = nT * nH * nW
        b = (win_all // n_win).to(tl.int64)
        win = win_all % n_win
        Tp, Hp, Wp = nT * wt, nH * wh, nW * ww
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        # The fixed block (queries for the dQ pass, keys for the dK/dV pass) and the loop over the other.
        if KV_PASS:
            offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            ka, kp, kq, kts, khs, kws, kt, kh, kw, n_valid = _tokens(
                offs_n, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N
            )
            k, v, kv_mask = _load_pair(
                K, V, b, kt, kh, kw, head, n_valid, offs_d, d_mask, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn
            )
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for start_m in range(0, N, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                qa, qp, qq, qts, qhs, qws, qt, qh, qw, m_valid = _tokens(
                    offs_m, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N
                )
                q, do, q_mask = _load_pair(
                    Q, DO, b, qt, qh, qw, head, m_valid, offs_d, d_mask,
                    sqb, sqt, sqh, sqw, sqn, sgb, sgt, sgh, sgw, sgn,
                )  # fmt: skip
                l_off = b * slb + qt * slt + qh * slh + qw * slw + head * sln
                lse = tl.load(LSE + l_off, mask=m_valid, other=0.0)
                delta = tl.load(DELTA + l_off, mask=m_valid, other=0.0)
                s = _scores(
                    q, k, offs_m, offs_n, m_valid, n_valid, qa, qp, qq, qts, qhs, qws, ka, kp, kq, kts, khs, kws,
                    BIAS, stride_bias_r, stride_bias_h, head, has_bias, Wh_nom, Ww_nom, Wt_nom, Tp, Hp, Wp,
                    wt, wh, ww, st, sh, sw, scale, N, IEEE, UPCAST,
                )  # fmt: skip
                p = tl.where(m_valid[:, None], tl.exp(s - lse[:, None]), 0.0)
                dv += _mma(tl.trans(p).to(do.dtype), do, IEEE, UPCAST)
                dp = _mma(do, tl.trans(v), IEEE, UPCAST)
                ds = p * (dp - delta[:, None])
                dk += _mma(tl.trans(ds).to(q.dtype), q, IEEE, UPCAST)
            gk_off = _grid_offsets(b, kt, kh, kw, head, sgb, sgt, sgh, sgw, sgn)
            tl.store(DK + gk_off + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + gk_off + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)
        else:
            offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            qa, qp, qq, qts, qhs, qws, qt, qh, qw, m_valid = _tokens(
                offs_m, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N
            )
            q, do, q_mask = _load_pair(
                Q, DO, b, qt, qh, qw, head, m_valid, offs_d, d_mask, sqb, sqt, sqh, sqw, sqn, sgb, sgt, sgh, sgw, sgn
            )
            l_off = b * slb + qt * slt + qh * slh + qw * slw + head * sln
            lse = tl.load(LSE + l_off, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + l_off, mask=m_valid, other=0.0)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            group = (win_all % n_groups).to(tl.int64)
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                ka, kp, kq, kts, khs, kws, kt, kh, kw, n_valid = _tokens(
                    offs_n, win, nH, nW, wt, wh, ww, st, sh, sw, Tp, Hp, Wp, T, H, W, N
                )
                k, v, kv_mask = _load_pair(
                    K, V, b, kt, kh, kw, head, n_valid, offs_d, d_mask, skb, skt, skh, skw, skn, svb, svt, svh, svw, svn
                )
                s = _scores(
                    q, k, offs_m, offs_n, m_valid, n_valid, qa, qp, qq, qts, qhs, qws, ka, kp, kq, kts, khs, kws,
                    BIAS, stride_bias_r, stride_bias_h, head, has_bias, Wh_nom, Ww_nom, Wt_nom, Tp, Hp, Wp,
                    wt, wh, ww, st, sh, sw, scale, N, IEEE, UPCAST,
                )  # fmt: skip
                p = tl.where(m_valid[:, None], tl.exp(s - lse[:, None]), 0.0)
                dp = _mma(do, tl.trans(v), IEEE, UPCAST)
                ds = p * (dp - delta[:, None])
                dq += _mma(ds.to(k.dtype), k, IEEE, UPCAST)
                if has_bias:
                    db_ptrs = DBIAS + ((group * NH + head) * N + offs_m[:, None]) * N + offs_n[None, :]
                    tl.atomic_add(db_ptrs, ds, mask=(offs_m < N)[:, None] & (offs_n < N)[None, :])
            dq_off = _grid_offsets(b, qt, qh, qw, head, sgb, sgt, sgh, sgw, sgn) + offs_d[None, :]
            tl.store(DQ + dq_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


TRITON_BLOCKS = (32, 64)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_NUM_WARPS = 4
DBIAS_BUFFER_BYTES = 16 * 2**20  # per-group dS buffers for the bias gradient: at most this much, at most 64 groups


def _triton_block(N: int, block_d: int, dtype: torch.dtype) -> int:
    # fp32 at head_dim 128 with 64-token blocks needs 176-210 KB of shared memory: over sm_80's 163 KB (AOT check).
    if N <= 32 or (dtype == torch.float32 and block_d >= 128):
        return 32
    return 64


def triton_attention_config(N: int, head_dim: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    block = _triton_block(N, block_d, dtype)
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "IEEE": dtype == torch.float32,
            "UPCAST": _env.TRITON_INTERPRET and dtype == torch.bfloat16, "num_warps": TRITON_NUM_WARPS}  # fmt: skip


def _grid_args(g: Geometry, thw, nominal, nh, has_bias, scale, head_dim):
    T, H, W = thw
    return (nh, T, H, W, *g.counts, *g.window, *g.shift, *nominal, int(has_bias), float(scale),
            g.tokens_per_window, head_dim)  # fmt: skip


def _strides5(x):
    return x.stride()[:5]


def window_attention_triton_fwd(q, k, v, window_size, shift_size, rel_pos_bias, scale):
    B, T, H, W, nh, hd = q.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    N = g.tokens_per_window
    o = torch.empty((B, T, H, W, nh, hd), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, H, W, nh), device=q.device, dtype=torch.float32)
    bias = rel_pos_bias if rel_pos_bias is not None else q.new_zeros((1, nh))
    cfg = triton_attention_config(N, hd, q.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * g.num_windows * nh)
    _wattn_fwd_kernel[grid](
        q, k, v, o, lse, bias, *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(o), *lse.stride(),
        bias.stride(0), bias.stride(1),
        *_grid_args(g, (T, H, W), window_size, nh, rel_pos_bias is not None, scale, hd),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], IEEE=cfg["IEEE"],
        UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return o, lse


def window_attention_triton_bwd(do, q, k, v, o, lse, window_size, shift_size, rel_pos_bias, scale):
    B, T, H, W, nh, hd = q.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    N = g.tokens_per_window
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # (B, T, H, W, nh)
    dq, dk, dv = (torch.empty((B, T, H, W, nh, hd), device=q.device, dtype=q.dtype) for _ in range(3))
    has_bias = rel_pos_bias is not None
    bias = rel_pos_bias if has_bias else q.new_zeros((1, nh))
    n_windows = B * g.num_windows
    n_groups = max(1, min(64, n_windows, DBIAS_BUFFER_BYTES // max(1, nh * N * N * 4))) if has_bias else 1
    dbias_shape = (n_groups, nh, N, N) if has_bias else (1,)
    dbias_groups = torch.zeros(dbias_shape, device=q.device, dtype=torch.float32)
    cfg = triton_attention_config(N, hd, q.dtype)
    common = (
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(dq), *delta.stride(), bias.stride(0), bias.stride(1),
        *_grid_args(g, (T, H, W), window_size, nh, has_bias, scale, hd), n_groups,
    )  # fmt: skip
    for kv_pass in (True, False):
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), n_windows * nh)
        _wattn_bwd_kernel[grid](
            q, k, v, do, lse, delta, bias, dq, dk, dv, dbias_groups, *common,
            KV_PASS=kv_pass, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            IEEE=cfg["IEEE"], UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    dbias = None
    if has_bias:
        index = relative_position_index(g.window, tuple(window_size), q.device).reshape(-1)
        ds_sum = dbias_groups.sum(0).permute(1, 2, 0).reshape(N * N, nh)
        dbias = torch.zeros(rel_pos_bias.shape, device=q.device, dtype=torch.float32).index_add_(0, index, ds_sum)
        dbias = dbias.to(rel_pos_bias.dtype)
    return dq, dk, dv, dbias


# --- custom op with autograd (triton) -------------------------------------------------------------------------------
# (A note on attention_core_torch, kept below the kernels: Triton's cache key holds each kernel's first line, and
# the window-attention kernels take the longest to compile. q is scaled before the product, as Swin does: in fp16,
# q k^T can exceed 65,504 where scale q k^T fits (q, k ~ 48, head_dim 32: 75,000 vs 13,000); it is also the smaller
# pass, N hd elements instead of N^2.)


@torch.library.custom_op("florence_kernels::window_attention_triton_fwd", mutates_args=())
def _wattn_triton_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, window_size: list[int],
    shift_size: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return window_attention_triton_fwd(q, k, v, window_size, shift_size, bias, scale)


@_wattn_triton_fwd_op.register_fake
def _(q, k, v, bias, window_size, shift_size, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=torch.float32)


@torch.library.custom_op("florence_kernels::window_attention_triton_bwd", mutates_args=())
def _wattn_triton_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    bias: torch.Tensor | None, window_size: list[int], shift_size: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dq, dk, dv, dbias = window_attention_triton_bwd(do, q, k, v, o, lse, window_size, shift_size, bias, scale)
    return dq, dk, dv, dbias if dbias is not None else q.new_zeros(0)


@_wattn_triton_bwd_op.register_fake
def _(do, q, k, v, o, lse, bias, window_size, shift_size, scale):
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        (bias.new_empty(bias.shape) if bias is not None else q.new_empty(0)),
    )


def _wattn_setup_context(ctx, inputs, output):
    q, k, v, bias, window_size, shift_size, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias)
    ctx.args = (window_size, shift_size, scale)


def _wattn_backward_with(bwd_op):
    def backward(ctx, do, dlse):
        q, k, v, o, lse, bias = ctx.saved_tensors
        window_size, shift_size, scale = ctx.args
        dq, dk, dv, dbias = bwd_op(do, q, k, v, o, lse, bias, window_size, shift_size, scale)
        return dq, dk, dv, (dbias if bias is not None else None), None, None, None

    return backward


_wattn_triton_fwd_op.register_autograd(_wattn_backward_with(_wattn_triton_bwd_op), setup_context=_wattn_setup_context)


# --- cpp: fused CPU kernel (csrc/window_attention/window_attention_cpu.cpp) -----------------------------------------
# One task per window: its valid tokens are gathered from the strided grids into fp32 scratch (padding is dropped,
# not masked), and scores, bias, shift mask, softmax and both products run there per head with a register-tiled
# micro-kernel; results are scattered straight back to the grid. The backward recomputes the scores from the saved
# log-sum-exp. Nothing of size window^2 and no partition copy reaches memory: on CPUs where a fresh 10 MB tensor
# costs ~3 ms of page faults, the outputs are the only allocations.


def window_attention_cpp_fwd(q, k, v, window_size, shift_size, rel_pos_bias, scale):
    g = resolve_geometry(q.shape[1:4], window_size, shift_size)
    return torch.ops.florence_kernels_C.window_attention_fwd(
        q, k, v, rel_pos_bias, list(g.window), list(g.shift), list(window_size), scale
    )


def window_attention_cpp_bwd(do, q, k, v, o, lse, window_size, shift_size, rel_pos_bias, scale, dq, dk, dv):
    """Writes dq, dk, dv (any strides: views of one packed buffer are fine); returns the table's gradient."""
    g = resolve_geometry(q.shape[1:4], window_size, shift_size)
    return torch.ops.florence_kernels_C.window_attention_bwd(
        do, q, k, v, o, lse, rel_pos_bias, list(g.window), list(g.shift), list(window_size), scale, dq, dk, dv
    )


def _cpp_lse_shape(shape, window_size, shift_size):
    B, T, H, W, nh, _ = shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    return (B * g.num_windows, nh, g.tokens_per_window)


@torch.library.custom_op("florence_kernels::window_attention_cpp_fwd", mutates_args=())
def _wattn_cpp_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, window_size: list[int],
    shift_size: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return window_attention_cpp_fwd(q, k, v, window_size, shift_size, bias, scale)


@_wattn_cpp_fwd_op.register_fake
def _(q, k, v, bias, window_size, shift_size, scale):
    return q.new_empty(q.shape), q.new_empty(_cpp_lse_shape(q.shape, window_size, shift_size), dtype=torch.float32)


@torch.library.custom_op("florence_kernels::window_attention_cpp_bwd", mutates_args=())
def _wattn_cpp_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    bias: torch.Tensor | None, window_size: list[int], shift_size: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype) for _ in range(3))
    dbias = window_attention_cpp_bwd(do, q, k, v, o, lse, window_size, shift_size, bias, scale, dq, dk, dv)
    return dq, dk, dv, dbias


@_wattn_cpp_bwd_op.register_fake
def _(do, q, k, v, o, lse, bias, window_size, shift_size, scale):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


_wattn_cpp_fwd_op.register_autograd(_wattn_backward_with(_wattn_cpp_bwd_op), setup_context=_wattn_setup_context)


# Packed variant for modules: q, k, v are the (B, T, H, W, 3, heads, head_dim) output of one qkv projection, and the
# backward writes their gradients into one buffer of that layout (unbind's backward would stack three copies).


@torch.library.custom_op("florence_kernels::window_attention_cpp_packed_fwd", mutates_args=())
def _wattn_cpp_packed_fwd_op(
    qkv: torch.Tensor, bias: torch.Tensor | None, window_size: list[int], shift_size: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return window_attention_cpp_fwd(*qkv.unbind(4), window_size, shift_size, bias, scale)


@_wattn_cpp_packed_fwd_op.register_fake
def _(qkv, bias, window_size, shift_size, scale):
    shape = qkv.shape[:4] + qkv.shape[5:]
    return qkv.new_empty(shape), qkv.new_empty(_cpp_lse_shape(shape, window_size, shift_size), dtype=torch.float32)


@torch.library.custom_op("florence_kernels::window_attention_cpp_packed_bwd", mutates_args=())
def _wattn_cpp_packed_bwd_op(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None,
    window_size: list[int], shift_size: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype)
    dbias = window_attention_cpp_bwd(do, *qkv.unbind(4), o, lse, window_size, shift_size, bias, scale, *dqkv.unbind(4))
    return dqkv, dbias


@_wattn_cpp_packed_bwd_op.register_fake
def _(do, qkv, o, lse, bias, window_size, shift_size, scale):
    return qkv.new_empty(qkv.shape), (bias.new_empty(bias.shape) if bias is not None else qkv.new_empty(0))


def _wattn_packed_setup_context(ctx, inputs, output):
    qkv, bias, window_size, shift_size, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, bias)
    ctx.args = (window_size, shift_size, scale)


def _wattn_packed_backward(ctx, do, dlse):
    qkv, o, lse, bias = ctx.saved_tensors
    dqkv, dbias = _wattn_cpp_packed_bwd_op(do, qkv, o, lse, bias, *ctx.args)
    return dqkv, (dbias if bias is not None else None), None, None, None


_wattn_cpp_packed_fwd_op.register_autograd(_wattn_packed_backward, setup_context=_wattn_packed_setup_context)


# --- registry -------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _triton_limits(q, k, v, *, dropout_p=0.0, native_reason=None, **_) -> list[str]:
    reasons = []
    if q.shape[-1] > TRITON_HEAD_DIMS[-1]:
        reasons.append(f"head_dim {q.shape[-1]} > {TRITON_HEAD_DIMS[-1]}")
    if dropout_p > 0:
        reasons.append("attention dropout is not fused (dropout_p > 0)")
    if native_reason:
        reasons.append(native_reason)
    return reasons


def _cpp_auto_reasons(q, k, v, **_) -> list[str]:
    """The kernel's micro-GEMM is tuned for AVX-512 (4 x 32 tiles in 8 zmm). With AVX2 only it runs 4 x 16 tiles and
    loses to the torch path: Swin-T stage 1, B = 8, fwd+bwd, 2026-11-30 on an AMD EPYC with AVX2, 219-229 ms against
    104-114 ms (a patched timm swin_tiny training step: 3.33 s against 2.96 s). The automatic choice takes torch
    there; backend="cpp" still runs the kernel."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return []
    return [f"this CPU has no AVX-512 ({capability}): the torch path is faster than the fused CPU kernel here"]


def _cpp_limits(q, k, v, *, dropout_p=0.0, native_reason=None, **_) -> list[str]:
    reasons = ["attention dropout is not fused (dropout_p > 0)"] if dropout_p > 0 else []
    return reasons + ([native_reason] if native_reason else [])


WINDOW_ATTENTION = register_op(
    Op(
        "window_attention",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "cpp": Backend("cpp", ("cpu",), _FLOATS, impl_reasons=_cpp_limits, auto_reasons=_cpp_auto_reasons),
            "triton": Backend("triton", ("cuda",), _FLOATS, (8, 0), impl_reasons=_triton_limits),
        },
    )
)


# --- public function ------------------------------------------------------------------------------------------------


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size, shift_size=0, rel_pos_bias=None,
    scale: float | None = None, dropout_p: float = 0.0, convention="florence", pad_token=None, logit_scale=None,
    backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Shifted-window attention with relative position bias, on token grids.

    Args:
        q, k, v: (B, T, H, W, num_heads, head_dim), or (B, H, W, num_heads, head_dim) for plain Swin (T = 1);
            may be strided views of one (B, T, H, W, 3, num_heads, head_dim) qkv tensor (not copied).
        window_size: (Wt, Wh, Ww), or (Wh, Ww) for 5-D inputs; an int means the same on every axis.
        shift_size: same layout, 0 <= shift < window.
        rel_pos_bias: ((2Wt-1)(2Wh-1)(2Ww-1), num_heads) table for the nominal window_size, or None.
        scale: default head_dim ** -0.5.
        dropout_p: attention dropout (reference and torch backends only).
        convention: the geometry where the window does not divide the grid: "florence" (default: pad then roll,
            padded tokens masked out, Swin's shrink rule), "timm", "torchvision", "torchvision3d" (each peer's order
            of pad and roll, zero-input padding tokens as keys, shrink rule and bias index), or a
            :class:`~florence_kernels.ops.window_conventions.WindowConvention`. Identical where the window divides
            the grid and no axis shrinks.
        pad_token: under a convention with "zeros" padding, the (q, k, v) of a padding token, each (num_heads,
            head_dim) (the projection of a zero input: its bias) or None for zeros; gradients flow into them.
        logit_scale: Swin V2's scaled cosine attention: (num_heads,) (any shape of num_heads elements) learnt log
            scale; scores are normalize(q) normalize(k)^T * exp(min(logit_scale, log 100)) and ``scale`` is unused.
            rel_pos_bias is then the table of V2's continuous position bias (16 sigmoid(MLP(coords))).
        backend: None (automatic), "reference", "torch", "cpp" (CPU) or "triton" (CUDA).

    Returns:
        (B, T, H, W, num_heads, head_dim) (or the 5-D layout of the input); gradients for q, k, v and the table.

    Raises:
        TypeError/ValueError naming the argument, its shape and what was expected; BackendNotSupportedError for a
        backend that cannot run the input (e.g. cpp/triton for a convention whose geometry they cannot take here).

    Equivalent PyTorch code: see :func:`window_attention_reference` (pad, roll, partition, q k^T + bias + mask,
    softmax, @ v, reverse, roll back, crop) and, for the conventions and cosine attention,
    :func:`florence_kernels.ops.window_conventions.window_attention_reference`.
    """
    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (5, 6):
            raise ValueError(
                f"{name}: expected (B, T, H, W, num_heads, head_dim) or (B, H, W, num_heads, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v: shapes must match, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    nsp = q.dim() - 3
    window = _as_triple("window_size", window_size, nsp, 1)
    shift = _as_triple("shift_size", shift_size, nsp, 0)
    _check_window_args(window, shift, nsp)
    nh, hd = q.shape[-2:]
    if rel_pos_bias is not None:
        expected = (bias_table_rows(window), nh)
        if not isinstance(rel_pos_bias, torch.Tensor) or tuple(rel_pos_bias.shape) != expected:
            got = tuple(rel_pos_bias.shape) if isinstance(rel_pos_bias, torch.Tensor) else type(rel_pos_bias).__name__
            raise ValueError(
                f"rel_pos_bias: expected shape {expected} ((2Wt-1)(2Wh-1)(2Ww-1), num_heads) for window "
                f"{window[3 - nsp :]}, got {got}"
            )
        if rel_pos_bias.device != q.device:
            raise ValueError(f"rel_pos_bias: on {rel_pos_bias.device}, q on {q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {dropout_p}")
    scale = float(hd**-0.5 if scale is None else scale)
    if nsp == 2:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    from . import window_conventions as wc

    conv = wc.get_convention(convention)
    pad_token = _check_pad_token(pad_token, conv, q)
    if logit_scale is not None:
        if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != nh or logit_scale.device != q.device:
            got = (f"shape {tuple(logit_scale.shape)} on {logit_scale.device}" if isinstance(logit_scale, torch.Tensor)
                   else type(logit_scale).__name__)  # fmt: skip
            raise ValueError(f"logit_scale: expected a tensor of num_heads={nh} elements on {q.device}, got {got}")
    if conv.name != "florence" or logit_scale is not None:
        out = _window_attention_convention(q, k, v, window, shift, rel_pos_bias, scale, dropout_p, conv, pad_token,
                                           logit_scale, backend)  # fmt: skip
        return out.squeeze(1) if nsp == 2 else out
    name = WINDOW_ATTENTION.select([q, k, v], backend, dropout_p=dropout_p)
    if name == "triton" and any(t.stride(-1) != 1 for t in (q, k, v)):  # the kernels read head_dim with unit stride
        q, k, v = (t.contiguous() if t.stride(-1) != 1 else t for t in (q, k, v))
    if name == "reference":
        out = window_attention_reference(q, k, v, window, shift, rel_pos_bias, scale, dropout_p)
    elif name == "torch":
        out = window_attention_torch(q, k, v, window, shift, rel_pos_bias, scale, dropout_p)
    elif name == "cpp":
        out = _wattn_cpp_fwd_op(q, k, v, rel_pos_bias, list(window), list(shift), scale)[0]
    else:
        out = _wattn_triton_fwd_op(q, k, v, rel_pos_bias, list(window), list(shift), scale)[0]
    return out.squeeze(1) if nsp == 2 else out


def _check_pad_token(pad_token, conv, q):
    """(q, k, v) padding-token rows, each (num_heads, head_dim) or None; only under "zeros" padding."""
    if pad_token is None:
        return None
    if conv.padding != "zeros":
        raise ValueError(f"pad_token: convention {conv.name!r} masks padded tokens out; pad_token needs 'zeros'")
    if not isinstance(pad_token, (tuple, list)) or len(pad_token) != 3:
        raise ValueError(f"pad_token: expected (q, k, v) rows, got {type(pad_token).__name__}")
    nh, hd = q.shape[-2:]
    for name, t in zip("qkv", pad_token, strict=True):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != nh * hd or t.device != q.device):
            got = f"shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"pad_token[{name}]: expected (num_heads={nh}, head_dim={hd}) on {q.device}, got {got}")
    return tuple(t.reshape(nh, hd) if t is not None else None for t in pad_token)


def _window_attention_convention(q, k, v, window, shift, rel_pos_bias, scale, dropout_p, conv, pad_token,
                                 logit_scale, backend):  # fmt: skip
    """A non-default convention or Swin V2's cosine attention on 6-D q, k, v (see window_conventions)."""
    from . import window_conventions as wc

    thw = tuple(q.shape[1:4])
    g = wc.resolve(thw, window, shift, conv)
    kind, gather, inverse = wc.native_plan(thw, g, conv, tuple(window), tuple(shift), q.device)
    reason = f"convention {conv.name!r}: {gather}" if kind == "none" else None
    name = WINDOW_ATTENTION.select([q, k, v], backend, dropout_p=dropout_p, native_reason=reason)
    if name == "reference":
        return wc.window_attention_reference(q, k, v, window, shift, rel_pos_bias, scale, conv, pad_token,
                                             logit_scale, dropout_p)  # fmt: skip
    if logit_scale is not None:  # cosine: normalised q times the head's multiplier, normalised k, scale 1
        q, k, pad_token = wc.cosine_prologue(q, k, logit_scale, pad_token)
        scale = 1.0
    if name == "torch" and kind == "none":  # the general gather path: any geometry
        return wc.window_attention_torch(q, k, v, window, shift, rel_pos_bias, scale, conv, pad_token, dropout_p)
    if kind == "arrange":
        q, k, v = (wc.arrange(x, i, pad_token, gather, g.padded) for i, x in enumerate((q, k, v)))
    if name == "triton" and any(t.stride(-1) != 1 for t in (q, k, v)):
        q, k, v = (t.contiguous() if t.stride(-1) != 1 else t for t in (q, k, v))
    if name == "torch":  # the native torch path (one fused partition per tensor) on the arranged grid
        out = window_attention_torch(q, k, v, window, shift, rel_pos_bias, scale, dropout_p)
    else:
        op = _wattn_cpp_fwd_op if name == "cpp" else _wattn_triton_fwd_op
        out = op(q, k, v, rel_pos_bias, list(window), list(shift), scale)[0]
    return wc.unarrange(out, inverse, thw) if kind == "arrange" else out


# --- ahead-of-time compile specs ------------------------------------------------------------------------------------


def triton_aot_specs() -> list[dict]:
    if not HAS_TRITON:
        return []
    from ..triton_aot import kernel_spec, torch_dtype

    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        pointers = dict.fromkeys(("Q", "K", "V", "Out", "BIAS", "DO", "DQ", "DK", "DV"), dtype)
        pointers |= dict.fromkeys(("LSE", "DELTA", "DBIAS"), "fp32")
        for hd in TRITON_HEAD_DIMS:
            # exactly the blocks the launcher can pick for this dtype and head dim (one small N, one large)
            for block in sorted({_triton_block(n, hd, torch_dtype(dtype)) for n in (16, 1024)}):
                cfg = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": hd, "IEEE": dtype == "fp32", "UPCAST": False}
                for kernel, extra in ((_wattn_fwd_kernel, {}), (_wattn_bwd_kernel, {"KV_PASS": True}),
                                      (_wattn_bwd_kernel, {"KV_PASS": False})):  # fmt: skip
                    tag = kernel.__name__ + (f"[kv={extra['KV_PASS']}]" if extra else "")
                    specs.append(kernel_spec(f"{tag}[{dtype},B={block},D={hd}]", kernel, {**extra, **cfg}, pointers,
                                             TRITON_NUM_WARPS, scalars={"scale": "fp32"}))  # fmt: skip
    return specs
