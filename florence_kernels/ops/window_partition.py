"""Fused cyclic shift + window partition of Swin / Video Swin, and its exact inverse.

``window_partition(x, window_size, shift_size)`` equals: zero-pad T, H, W at their ends up to multiples of the
window, ``torch.roll`` by minus the shift, and cut into windows in Video Swin's order. Where an input dimension
is <= the window, the window shrinks to it and the shift on that axis is 0 (Video Swin's ``get_window_size``).
``window_reverse`` is its inverse. Both are pure gathers, so every backend is bit-exact, and the backward of
each is the other.

Read top to bottom: geometry, the literal reference, the portable PyTorch path, the Triton kernel and its
launcher, the C++/CUDA entry points, the custom ops with autograd, the public functions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._dispatch import Backend, Op, fresh_output, register_op

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON = False


# --- geometry --------------------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    """Resolved window geometry of one (T, H, W) grid."""

    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    padded: tuple[int, int, int]
    counts: tuple[int, int, int]  # windows along T, H, W

    @property
    def num_windows(self) -> int:
        return self.counts[0] * self.counts[1] * self.counts[2]

    @property
    def tokens_per_window(self) -> int:
        return self.window[0] * self.window[1] * self.window[2]


def resolve_geometry(size_thw: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]) -> Geometry:
    """Shrink the window and drop the shift on axes where the input is <= the window (Swin's rule, per axis)."""
    window, shift = [], []
    for s, w, sh in zip(size_thw, window_size, shift_size, strict=True):
        if s <= w:
            window.append(max(int(s), 1))
            shift.append(0)
        else:
            window.append(int(w))
            shift.append(int(sh))
    counts = tuple(-(-int(s) // w) for s, w in zip(size_thw, window, strict=True))
    padded = tuple(n * w for n, w in zip(counts, window, strict=True))
    return Geometry(tuple(window), tuple(shift), padded, counts)


def _as_triple(name: str, value, ndim_spatial: int, time_value: int) -> tuple[int, int, int]:
    """(Wh, Ww) -> (time_value, Wh, Ww) for 2-D grids; ints broadcast to every axis."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim_spatial
    try:
        value = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a sequence of {ndim_spatial} ints, got {value!r}") from None
    if len(value) != ndim_spatial:
        raise ValueError(
            f"{name}: expected {ndim_spatial} values for a {'(B, H, W, C)' if ndim_spatial == 2 else '(B, T, H, W, C)'}"
            f" input, got {value}"
        )
    return (time_value, *value) if ndim_spatial == 2 else value


def _check_window_args(window: tuple[int, int, int], shift: tuple[int, int, int], ndim_spatial: int):
    shown = lambda v: v[1:] if ndim_spatial == 2 else v  # noqa: E731
    if any(w <= 0 for w in window):
        raise ValueError(f"window_size: every value must be positive, got {shown(window)}")
    if any(s < 0 or s >= w for s, w in zip(shift, window, strict=True)):
        raise ValueError(
            f"shift_size: expected 0 <= shift < window on every axis, got {shown(shift)} for window {shown(window)}"
        )


# --- reference: the literal Video Swin code path ---------------------------------------------------------------


def window_partition_reference(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    """x (B, T, H, W, C) -> (B * nW, Wt * Wh * Ww, C): pad, roll, view/permute, as Video Swin writes it."""
    B, T, H, W, C = x.shape
    (wt, wh, ww), (st, sh, sw), (Tp, Hp, Wp), _ = resolve_geometry((T, H, W), window_size, shift_size)
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))
    if st or sh or sw:
        x = torch.roll(x, shifts=(-st, -sh, -sw), dims=(1, 2, 3))
    x = x.view(B, Tp // wt, wt, Hp // wh, wh, Wp // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B * (Tp // wt) * (Hp // wh) * (Wp // ww), wt * wh * ww, C)


def window_reverse_reference(windows: torch.Tensor, window_size, shape, shift_size) -> torch.Tensor:
    """windows (B * nW, Wt * Wh * Ww, C) -> (B, T, H, W, C): view/permute, roll back, crop the padding."""
    B, T, H, W = shape
    C = windows.shape[-1]
    (wt, wh, ww), (st, sh, sw), (Tp, Hp, Wp), _ = resolve_geometry((T, H, W), window_size, shift_size)
    x = windows.view(B, Tp // wt, Hp // wh, Wp // ww, wt, wh, ww, C)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, Tp, Hp, Wp, C)
    if st or sh or sw:
        x = torch.roll(x, shifts=(st, sh, sw), dims=(1, 2, 3))
    return x[:, :T, :H, :W].contiguous()


# --- torch: portable and fast, one gather pass -------------------------------------------------------------------
# The reference makes up to five passes over the data (pad, one roll per shifted axis, the permuting copy). Here
# the source row of every output token is computed once per geometry and cached, and one index_select over
# (tokens, C) rows moves the data (it copies whole rows; advanced indexing x[:, t, h, w] was 4x slower on CPU).


@functools.lru_cache(maxsize=64)
def _partition_rows(B: int, thw: tuple[int, int, int], geometry: Geometry, device: torch.device):
    """Flat source row in x.reshape(B*T*H*W, C) of each output token, and the padding mask (None if no padding)."""
    (wt, wh, ww), (st, sh, sw), (Tp, Hp, Wp), (nT, nH, nW) = geometry
    T, H, W = thw
    t = (torch.arange(Tp, device=device) + st) % Tp
    h = (torch.arange(Hp, device=device) + sh) % Hp
    w = (torch.arange(Wp, device=device) + sw) % Wp
    # (nT, wt) x (nH, wh) x (nW, ww) -> (nT, nH, nW, wt, wh, ww): Video Swin's window order
    t = t.view(nT, 1, 1, wt, 1, 1)
    h = h.view(1, nH, 1, 1, wh, 1)
    w = w.view(1, 1, nW, 1, 1, ww)
    valid = ((t < T) & (h < H) & (w < W)).reshape(-1)
    rows = ((t.clamp(max=T - 1) * H + h.clamp(max=H - 1)) * W + w.clamp(max=W - 1)).reshape(-1)
    rows = (torch.arange(B, device=device).view(B, 1) * (T * H * W) + rows).reshape(-1)
    mask = None if bool(valid.all()) else ~valid.repeat(B).view(-1, 1)
    return rows, mask


@functools.lru_cache(maxsize=64)
def _reverse_rows(B: int, thw: tuple[int, int, int], geometry: Geometry, device: torch.device):
    """Flat row in windows.reshape(B*nWin*N, C) of each unpadded token (b, t, h, w)."""
    (wt, wh, ww), (st, sh, sw), (Tp, Hp, Wp), (nT, nH, nW) = geometry
    T, H, W = thw
    ts = ((torch.arange(T, device=device) - st) % Tp).view(T, 1, 1)
    hs = ((torch.arange(H, device=device) - sh) % Hp).view(1, H, 1)
    ws = ((torch.arange(W, device=device) - sw) % Wp).view(1, 1, W)
    win = ((ts // wt) * nH + hs // wh) * nW + ws // ww
    pos = ((ts % wt) * wh + hs % wh) * ww + ws % ww
    rows = (win * (wt * wh * ww) + pos).reshape(-1)
    per_sample = nT * nH * nW * wt * wh * ww
    return (torch.arange(B, device=device).view(B, 1) * per_sample + rows).reshape(-1)


def window_partition_torch(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    B, T, H, W, C = x.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    rows, mask = _partition_rows(B, (T, H, W), g, x.device)
    out = torch.index_select(x.reshape(B * T * H * W, C), 0, rows)
    if mask is not None:
        out.masked_fill_(mask, 0)
    return out.view(B * g.num_windows, g.tokens_per_window, C)


def window_reverse_torch(windows: torch.Tensor, window_size, shape, shift_size) -> torch.Tensor:
    B, T, H, W = shape
    C = windows.shape[-1]
    g = resolve_geometry((T, H, W), window_size, shift_size)
    rows = _reverse_rows(B, (T, H, W), g, windows.device)
    return torch.index_select(windows.reshape(windows.shape[0] * windows.shape[1], C), 0, rows).view(B, T, H, W, C)


# --- triton: one kernel for both directions -----------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _window_gather_kernel(
        src_ptr, dst_ptr,
        T, H, W, C,
        wt, wh, ww, st, sh, sw, nT, nH, nW,
        stride_a, stride_b, stride_c, stride_d, stride_ch,
        total_tokens,
        REVERSE: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Each program copies BLOCK_TOKENS output tokens x BLOCK_C channels.

        Partition: output token = (row, n) of the windows; the source (b, t, h, w) is computed from coordinates
        (shift and padding included; padding loads 0). Reverse: output token = (b, t, h, w) of the grid; the
        source (row, n) is the inverse map. Strides a..d address the source's token axes, stride_ch its channels.
        """
        tok = (tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)).to(tl.int64)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        tok_mask = tok < total_tokens
        Tp = nT * wt
        Hp = nH * wh
        Wp = nW * ww
        if REVERSE:
            w = tok % W
            h = (tok // W) % H
            t = (tok // (W * H)) % T
            b = tok // (W * H * T)
            ts = (t - st + Tp) % Tp
            hs = (h - sh + Hp) % Hp
            ws = (w - sw + Wp) % Wp
            row = b * (nT * nH * nW) + ((ts // wt) * nH + hs // wh) * nW + ws // ww
            n = ((ts % wt) * wh + hs % wh) * ww + ws % ww
            src_off = row * stride_a + n * stride_b
            load_mask = tok_mask
        else:
            N = wt * wh * ww
            n_win = nT * nH * nW
            row = tok // N
            n = tok % N
            win = row % n_win
            b = row // n_win
            t = ((win // (nW * nH)) * wt + n // (ww * wh) + st) % Tp
            h = (((win // nW) % nH) * wh + (n // ww) % wh + sh) % Hp
            w = ((win % nW) * ww + n % ww + sw) % Wp
            src_off = b * stride_a + t * stride_b + h * stride_c + w * stride_d
            load_mask = tok_mask & (t < T) & (h < H) & (w < W)
        ch_mask = ch < C
        vals = tl.load(
            src_ptr + src_off[:, None] + ch[None, :] * stride_ch, mask=load_mask[:, None] & ch_mask[None, :], other=0
        )
        tl.store(dst_ptr + tok[:, None] * C + ch[None, :], vals, mask=tok_mask[:, None] & ch_mask[None, :])


# Elements per program: 4096 (16 KB of fp32) keeps 4 warps busy with 128-bit accesses at every BLOCK_C.
TRITON_ELEMENTS_PER_PROGRAM = 4096
TRITON_BLOCK_C_CHOICES = (16, 32, 64, 128, 256)
TRITON_NUM_WARPS = 4


def triton_launch_config(C: int) -> dict:
    """The launch configuration the triton backend picks for C channels (one of a finite set, all AOT-tested)."""
    block_c = min(max(triton.next_power_of_2(C), TRITON_BLOCK_C_CHOICES[0]), TRITON_BLOCK_C_CHOICES[-1])
    return {"BLOCK_C": block_c, "BLOCK_TOKENS": TRITON_ELEMENTS_PER_PROGRAM // block_c, "num_warps": TRITON_NUM_WARPS}


def triton_launch_configs() -> list[dict]:
    """Every configuration the launcher can choose, for ahead-of-time compile checks."""
    return [
        {
            "REVERSE": rev,
            "BLOCK_C": bc,
            "BLOCK_TOKENS": TRITON_ELEMENTS_PER_PROGRAM // bc,
            "num_warps": TRITON_NUM_WARPS,
        }
        for rev in (False, True)
        for bc in TRITON_BLOCK_C_CHOICES
    ]


def _triton_gather(src: torch.Tensor, out: torch.Tensor, thw, g: Geometry, token_strides, channel_stride, reverse):
    T, H, W = thw
    C = out.shape[-1]
    total = out.numel() // C if C else 0
    if total == 0:
        return out
    cfg = triton_launch_config(C)
    grid = (triton.cdiv(total, cfg["BLOCK_TOKENS"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _window_gather_kernel[grid](
        src, out, T, H, W, C, *g.window, *g.shift, *g.counts, *token_strides, channel_stride, total,
        REVERSE=reverse, BLOCK_TOKENS=cfg["BLOCK_TOKENS"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def window_partition_triton(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    B, T, H, W, C = x.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    out = x.new_empty((B * g.num_windows, g.tokens_per_window, C))
    return _triton_gather(x, out, (T, H, W), g, x.stride()[:4], x.stride(4), reverse=False)


def window_reverse_triton(windows: torch.Tensor, window_size, shape, shift_size) -> torch.Tensor:
    B, T, H, W = shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    out = windows.new_empty((B, T, H, W, windows.shape[-1]))
    s = windows.stride()
    return _triton_gather(windows, out, (T, H, W), g, (s[0], s[1], 0, 0), s[2], reverse=True)


# --- cpp / cuda: florence_kernels._C (csrc/window_partition/) ------------------------------------------------------


def window_partition_extension(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    g = resolve_geometry(x.shape[1:4], window_size, shift_size)
    return torch.ops.florence_kernels_C.window_partition(x, list(g.window), list(g.shift))


def window_reverse_extension(windows: torch.Tensor, window_size, shape, shift_size) -> torch.Tensor:
    g = resolve_geometry(shape[1:4], window_size, shift_size)
    return torch.ops.florence_kernels_C.window_reverse(windows, list(g.window), list(g.shift), list(shape))


_PARTITION_IMPLS = {
    "torch": window_partition_torch,
    "cpp": window_partition_extension,
    "cuda": window_partition_extension,
    "triton": window_partition_triton,
}
_REVERSE_IMPLS = {
    "torch": window_reverse_torch,
    "cpp": window_reverse_extension,
    "cuda": window_reverse_extension,
    "triton": window_reverse_triton,
}

# --- custom ops and autograd: the backward of each gather is the other ---------------------------------------------


@torch.library.custom_op("florence_kernels::window_partition", mutates_args=())
def _window_partition_op(x: torch.Tensor, window_size: list[int], shift_size: list[int], backend: str) -> torch.Tensor:
    return fresh_output(_PARTITION_IMPLS[backend](x, window_size, shift_size))


@_window_partition_op.register_fake
def _(x, window_size, shift_size, backend):
    B, T, H, W, C = x.shape
    g = resolve_geometry((T, H, W), window_size, shift_size)
    return x.new_empty((B * g.num_windows, g.tokens_per_window, C))


@torch.library.custom_op("florence_kernels::window_reverse", mutates_args=())
def _window_reverse_op(
    windows: torch.Tensor, window_size: list[int], shape: list[int], shift_size: list[int], backend: str
) -> torch.Tensor:
    return fresh_output(_REVERSE_IMPLS[backend](windows, window_size, shape, shift_size))


@_window_reverse_op.register_fake
def _(windows, window_size, shape, shift_size, backend):
    return windows.new_empty((*shape, windows.shape[-1]))


def _partition_setup_context(ctx, inputs, output):
    x, window_size, shift_size, backend = inputs
    ctx.args = (window_size, list(x.shape[:4]), shift_size, backend)


def _partition_backward(ctx, grad):
    window_size, shape, shift_size, backend = ctx.args
    return _window_reverse_op(grad, window_size, shape, shift_size, backend), None, None, None


def _reverse_setup_context(ctx, inputs, output):
    _, window_size, _, shift_size, backend = inputs
    ctx.args = (window_size, shift_size, backend)


def _reverse_backward(ctx, grad):
    window_size, shift_size, backend = ctx.args
    return _window_partition_op(grad, window_size, shift_size, backend), None, None, None, None


_window_partition_op.register_autograd(_partition_backward, setup_context=_partition_setup_context)
_window_reverse_op.register_autograd(_reverse_backward, setup_context=_reverse_setup_context)


# --- registry ---------------------------------------------------------------------------------------------------

_ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _cuda_limits(t: torch.Tensor, **_) -> list[str]:
    # One launch covers 8 tokens per block with a 31-bit grid.
    if t.numel() // max(t.shape[-1], 1) >= 8 * (2**31 - 1):
        return [f"more than {8 * (2**31 - 1)} tokens in one launch"]
    return []


WINDOW_PARTITION = register_op(
    Op(
        "window_partition",
        {
            "reference": Backend("reference", ("cpu", "cuda"), _ALL_DTYPES),
            "torch": Backend("torch", ("cpu", "cuda"), _ALL_DTYPES),
            "cpp": Backend("cpp", ("cpu",), _ALL_DTYPES),
            "triton": Backend("triton", ("cuda",), (torch.float32, torch.float16, torch.bfloat16), (8, 0)),
            "cuda": Backend("cuda", ("cuda",), _ALL_DTYPES, (8, 0), impl_reasons=_cuda_limits),
        },
    )
)
# window_reverse shares the backends of window_partition: the two are one op and its inverse.
WINDOW_REVERSE = register_op(Op("window_reverse", WINDOW_PARTITION.backends))


# --- public functions ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, expected_dims: tuple[int, ...], layout: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in expected_dims:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")


def window_partition(x: torch.Tensor, window_size, shift_size=0, backend: str | None = None) -> torch.Tensor:
    """Cyclic shift + window partition, fused.

    Args:
        x: (B, T, H, W, C), or (B, H, W, C) for plain Swin (T = 1); any float dtype, any strides.
        window_size: (Wt, Wh, Ww), or (Wh, Ww) for a 4-D x; an int means the same on every axis.
        shift_size: same layout as window_size, 0 <= shift < window; default no shift.
        backend: None (automatic), or one of "reference", "torch", "cpp", "triton", "cuda".

    Returns:
        (B * nT * nH * nW, Wt * Wh * Ww, C), with windows shrunk to the input on axes where it is <= the window.

    Equivalent PyTorch code (see :func:`window_partition_reference`)::

        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))
        x = torch.roll(x, shifts=(-St, -Sh, -Sw), dims=(1, 2, 3))
        x = x.view(B, Tp // Wt, Wt, Hp // Wh, Wh, Wp // Ww, Ww, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(-1, Wt * Wh * Ww, C)
    """
    _check_tensor("x", x, (4, 5), "a (B, T, H, W, C) or (B, H, W, C) tensor")
    nsp = x.dim() - 2
    window = _as_triple("window_size", window_size, nsp, 1)
    shift = _as_triple("shift_size", shift_size, nsp, 0)
    _check_window_args(window, shift, nsp)
    x5 = x.unsqueeze(1) if nsp == 2 else x
    name = WINDOW_PARTITION.select([x5], backend)
    if name == "reference":
        return window_partition_reference(x5, window, shift)
    return _window_partition_op(x5, list(window), list(shift), name)


def window_reverse(windows: torch.Tensor, window_size, shape, shift_size=0, backend: str | None = None) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows back to the (unpadded) grid, shift undone.

    Args:
        windows: (B * nT * nH * nW, Wt * Wh * Ww, C) as returned by window_partition.
        window_size, shift_size: as given to window_partition (2 values for a 4-D shape, 3 for a 5-D one).
        shape: the unpadded (B, T, H, W, C) or (B, H, W, C) of the grid.
        backend: as for window_partition.

    Returns:
        (B, T, H, W, C) or (B, H, W, C), contiguous.

    Equivalent PyTorch code: see :func:`window_reverse_reference` (view/permute, roll back, crop).
    """
    _check_tensor("windows", windows, (3,), "a (B * nWin, Wt * Wh * Ww, C) tensor")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5):
        raise ValueError(f"shape: expected (B, T, H, W, C) or (B, H, W, C), got {shape}")
    nsp = len(shape) - 2
    window = _as_triple("window_size", window_size, nsp, 1)
    shift = _as_triple("shift_size", shift_size, nsp, 0)
    _check_window_args(window, shift, nsp)
    shape5 = (shape[0], 1, *shape[1:]) if nsp == 2 else shape
    if shape5[-1] != windows.shape[-1]:
        raise ValueError(f"windows: channel count {windows.shape[-1]} does not match shape {shape}")
    g = resolve_geometry(shape5[1:4], window, shift)
    expected = (shape5[0] * g.num_windows, g.tokens_per_window, shape5[-1])
    if tuple(windows.shape) != expected:
        raise ValueError(
            f"windows: expected shape {expected} for grid {shape} with window {window[3 - nsp :]}, "
            f"got {tuple(windows.shape)}"
        )
    name = WINDOW_REVERSE.select([windows], backend)
    if name == "reference":
        out = window_reverse_reference(windows, window, shape5[:4], shift)
    else:
        out = _window_reverse_op(windows, list(window), list(shape5[:4]), list(shift), name)
    return out.squeeze(1) if nsp == 2 else out


# --- ahead-of-time compile specs (florence_kernels.triton_aot) ------------------------------------------------------


def triton_aot_specs() -> list[dict]:
    """Every (dtype, integer width, launch configuration) the triton backend can launch, for triton.compile.

    Triton types an int argument as i32 when it fits and i64 otherwise; sizes of video batches stay in i32 but
    a big enough tensor makes its strides and token count i64, so both are compiled.
    """
    if not HAS_TRITON:
        return []
    int_args = ["T", "H", "W", "C", "wt", "wh", "ww", "st", "sh", "sw", "nT", "nH", "nW"]
    wide_args = ["stride_a", "stride_b", "stride_c", "stride_d", "stride_ch", "total_tokens"]
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for wide in ("i32", "i64"):
            for cfg in triton_launch_configs():
                constexprs = {k: cfg[k] for k in ("REVERSE", "BLOCK_TOKENS", "BLOCK_C")}
                signature = {"src_ptr": f"*{dtype}", "dst_ptr": f"*{dtype}"}
                signature.update({a: "i32" for a in int_args})
                signature.update({a: wide for a in wide_args})
                signature.update({k: "constexpr" for k in constexprs})
                specs.append(
                    {
                        "name": f"window_gather[{dtype},{wide},reverse={cfg['REVERSE']},BLOCK_C={cfg['BLOCK_C']}]",
                        "fn": _window_gather_kernel,
                        "signature": signature,
                        "constexprs": constexprs,
                        "num_warps": cfg["num_warps"],
                    }
                )
    return specs
