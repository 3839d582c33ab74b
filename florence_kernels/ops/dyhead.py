"""Dynamic Head's scale-aware and task-aware attentions (../shared/SPEC.md section 7, mmdetection's DyHeadBlock).

- ``dyrelu(x, coefficients)``: the task-aware DyReLU, out = max(a1 x + b1, a2 x + b2) per (sample, channel), with
  (a1, b1, a2, b2) mapped from the hyper-function's output y in [0, 1] (B, 4C) in mmdetection's split order:
  a1 = 2 (y_a1 - 0.5) + 1, b1 = y_b1 - 0.5, a2 = 2 (y_a2 - 0.5), b2 = y_b2 - 0.5. All-0.5 coefficients give ReLU.
- ``scale_aware_attention(terms, weight, bias)``: mean over the terms of term * hard_sigmoid(relu(w . GAP(term) + b)),
  the pooled hard-sigmoid weighting that combines a level's three spatial-aware terms.
- ``scale_task_attention(terms, pi, coefficients)``: the scale- and task-aware steps of one level in one pass,
  dyrelu(mean_k pi[:, k] terms[k], coefficients). DyHeadBlock computes pi and the DyReLU coefficients from the terms'
  pooled means alone (GAP of the weighted mean is the weighted mean of the GAPs), so the level's combined features
  are never written: the terms are read once and the output written once (the unfused path reads the terms, writes
  and rereads the combination, writes the output). The backward recomputes the combination in the same pass that
  forms every term's gradient and reduces the pi and coefficient gradients.

Read top to bottom: the literal references, the PyTorch paths, the Triton DyReLU kernels (one pass forward, one
backward pass that also reduces the coefficient gradients), the fused level kernels, the custom ops, the registry,
the public functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import Backend, Op, register_op

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6 (mmcv's HSigmoid(bias=3, divisor=6))."""
    return F.relu6(x + 3.0) / 6.0


# --- references -----------------------------------------------------------------------------------------------------


def dyrelu_reference(x, coefficients):
    C = x.shape[1]
    y = coefficients.reshape(x.shape[0], 4, C, *([1] * (x.dim() - 2))) - 0.5
    a1, b1, a2, b2 = y.unbind(1)
    return torch.max(x * (a1 * 2.0 + 1.0) + b1, x * (a2 * 2.0) + b2)


def scale_aware_reference(terms, weight, bias):
    out = 0
    for t in terms:
        pooled = F.adaptive_avg_pool2d(t, 1)
        pi = hard_sigmoid(F.relu(F.conv2d(pooled, weight.view(1, -1, 1, 1), bias)))
        out = out + t * (pi / len(terms))
    return out


def scale_task_reference(terms, pi, coefficients):
    fused = sum(t * (pi[:, k].view(-1, 1, 1, 1) / len(terms)) for k, t in enumerate(terms))
    return dyrelu_reference(fused, coefficients)


# --- torch: fewer passes --------------------------------------------------------------------------------------------


def dyrelu_torch(x, coefficients):
    B, C = x.shape[:2]
    y = coefficients.reshape(B, 4, C).to(x.dtype)
    a1, b1, a2, b2 = 2.0 * y[:, 0], y[:, 1] - 0.5, 2.0 * y[:, 2] - 1.0, y[:, 3] - 0.5
    shape = (B, C) + (1,) * (x.dim() - 2)
    return torch.maximum(
        torch.addcmul(b1.view(shape), x, a1.view(shape)), torch.addcmul(b2.view(shape), x, a2.view(shape))
    )


def scale_aware_torch(terms, weight, bias):
    """One reduction per term for the weights (in fp32 at least), then one fused multiply-accumulate pass per term."""
    acc, out = torch.promote_types(terms[0].dtype, torch.float32), None
    for t in terms:
        pi = hard_sigmoid(F.relu(t.mean(dim=(2, 3), dtype=acc) @ weight.reshape(-1, 1).to(acc) + bias.to(acc)))
        pi = (pi / len(terms)).view(-1, 1, 1, 1).to(t.dtype)
        out = t * pi if out is None else torch.addcmul(out, t, pi)
    return out


def scale_task_torch(terms, pi, coefficients):
    """In fp32 for fp16/bf16 inputs (as the Triton kernel): near-ties of DyReLU's two maps then break the same way."""
    if terms[0].dtype in (torch.float16, torch.bfloat16):
        out = scale_task_torch([t.float() for t in terms], pi.float(), coefficients.float())
        return out.to(terms[0].dtype)
    pi = pi.to(terms[0].dtype) / len(terms)
    fused = terms[0] * pi[:, 0].view(-1, 1, 1, 1)
    for k in range(1, len(terms)):
        fused = torch.addcmul(fused, terms[k], pi[:, k].view(-1, 1, 1, 1))
    return dyrelu_torch(fused, coefficients)


# --- triton: DyReLU in one pass, backward with the coefficient reductions -------------------------------------------
# One program = one (sample, channel) plane of H W elements (streamed in BLOCK steps): the forward reads x once and
# writes out once; the backward reads x and the gradient once, writes dx, and reduces the four coefficient gradients
# of its plane in registers (no atomics: each plane has its own coefficients).

TRITON_BLOCK = 1024
TRITON_NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _coeffs(Y, pid, C):
        b = pid // C
        c = pid % C
        base = Y + b * 4 * C + c
        a1 = 2.0 * tl.load(base).to(tl.float32)
        b1 = tl.load(base + C).to(tl.float32) - 0.5
        a2 = 2.0 * tl.load(base + 2 * C).to(tl.float32) - 1.0
        b2 = tl.load(base + 3 * C).to(tl.float32) - 0.5
        return a1, b1, a2, b2

    @triton.jit
    def _max_grad_split(x, g, a1, b1, a2, b2):
        """The incoming gradient's shares of max(a1 x + b1, a2 x + b2): torch.maximum's rule (to the larger map,
        halves on ties)."""
        v1 = a1 * x + b1
        v2 = a2 * x + b2
        g1 = tl.where(v1 > v2, g, tl.where(v1 == v2, 0.5 * g, 0.0))
        return g1, g - g1

    @triton.jit
    def _store_coeff_grads(DY, pid, C, s_a1, s_b1, s_a2, s_b2):
        """A plane's gradients of its four hyper-function outputs (d a / d y = 2 for both slopes)."""
        base = DY + (pid // C) * 4 * C + pid % C
        tl.store(base, 2.0 * tl.sum(s_a1, 0))
        tl.store(base + C, tl.sum(s_b1, 0))
        tl.store(base + 2 * C, 2.0 * tl.sum(s_a2, 0))
        tl.store(base + 3 * C, tl.sum(s_b2, 0))

    @triton.jit
    def _dyrelu_fwd_kernel(X, Y, OUT, C, HW, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        a1, b1, a2, b2 = _coeffs(Y, pid, C)
        for s in range(0, HW, BLOCK):
            i = s + tl.arange(0, BLOCK)
            ok = i < HW
            x = tl.load(X + pid * HW + i, mask=ok, other=0.0).to(tl.float32)
            tl.store(OUT + pid * HW + i, tl.maximum(a1 * x + b1, a2 * x + b2), mask=ok)

    @triton.jit
    def _dyrelu_bwd_kernel(X, Y, G, DX, DY, C, HW, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        a1, b1, a2, b2 = _coeffs(Y, pid, C)
        s_a1 = tl.zeros((BLOCK,), tl.float32)
        s_b1 = tl.zeros((BLOCK,), tl.float32)
        s_a2 = tl.zeros((BLOCK,), tl.float32)
        s_b2 = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, HW, BLOCK):
            i = s + tl.arange(0, BLOCK)
            ok = i < HW
            x = tl.load(X + pid * HW + i, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(G + pid * HW + i, mask=ok, other=0.0).to(tl.float32)
            g1, g2 = _max_grad_split(x, g, a1, b1, a2, b2)
            tl.store(DX + pid * HW + i, g1 * a1 + g2 * a2, mask=ok)
            s_a1 += g1 * x
            s_b1 += g1
            s_a2 += g2 * x
            s_b2 += g2
        _store_coeff_grads(DY, pid, C, s_a1, s_b1, s_a2, s_b2)


def dyrelu_triton_fwd(x, coefficients):
    B, C = x.shape[:2]
    xc, y = x.contiguous(), coefficients.reshape(B, 4 * C).contiguous()
    out = torch.empty_like(xc)
    _dyrelu_fwd_kernel[(B * C,)](xc, y, out, C, x.shape[2:].numel(), BLOCK=TRITON_BLOCK, num_warps=TRITON_NUM_WARPS)
    return out


def dyrelu_triton_bwd(grad, x, coefficients):
    B, C = x.shape[:2]
    xc, y, g = x.contiguous(), coefficients.reshape(B, 4 * C).contiguous(), grad.contiguous()
    dx = torch.empty_like(xc)
    dy = torch.empty((B, 4 * C), device=x.device, dtype=torch.float32)
    _dyrelu_bwd_kernel[(B * C,)](xc, y, g, dx, dy, C, x.shape[2:].numel(), BLOCK=TRITON_BLOCK,
                                 num_warps=TRITON_NUM_WARPS)  # fmt: skip
    return dx, dy.to(coefficients.dtype).reshape(coefficients.shape)


@torch.library.custom_op("florence_kernels::dyrelu_triton", mutates_args=())
def _dyrelu_triton_op(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    return dyrelu_triton_fwd(x, coefficients)


@_dyrelu_triton_op.register_fake
def _(x, coefficients):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("florence_kernels::dyrelu_triton_bwd", mutates_args=())
def _dyrelu_triton_bwd_op(grad: torch.Tensor, x: torch.Tensor, coefficients: torch.Tensor) -> tuple[
    torch.Tensor, torch.Tensor]:  # fmt: skip
    return dyrelu_triton_bwd(grad, x, coefficients)


@_dyrelu_triton_bwd_op.register_fake
def _(grad, x, coefficients):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(coefficients)


def _dyrelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dyrelu_backward(ctx, grad):
    x, coefficients = ctx.saved_tensors
    return _dyrelu_triton_bwd_op(grad, x, coefficients)


_dyrelu_triton_op.register_autograd(_dyrelu_backward, setup_context=_dyrelu_setup)


# --- triton: the fused level (scale- and task-aware) ---------------------------------------------------------------
# One program = one (sample, channel) plane, streamed in BLOCK steps; up to three terms, each read through its own
# strides (the stride-2 term arrives cropped, not copied). Forward: x = sum_k pi_k t_k / n, out = DyReLU(x): terms
# read once, out written once. Backward: x recomputed, dx from DyReLU's backward, dt_k = pi_k / n dx written, and the
# plane's partial sums for d pi_k (sum t_k dx / n) and the four coefficient gradients reduced in registers; the pi
# partials (B, C, n) are summed over C in PyTorch.

MAX_TERMS = 3

if HAS_TRITON:

    @triton.jit
    def _load_term(T, b, c, i, W, ok, sb, sc, sh, sw):
        return tl.load(T + b * sb + c * sc + (i // W) * sh + (i % W) * sw, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _term_weights(PI, b, N_TERMS: tl.constexpr):
        """pi[b, k] / n for the sample's terms (0 for the absent ones)."""
        p0 = tl.load(PI + b * N_TERMS).to(tl.float32) / N_TERMS
        p1 = 0.0
        p2 = 0.0
        if N_TERMS > 1:
            p1 = tl.load(PI + b * N_TERMS + 1).to(tl.float32) / N_TERMS
        if N_TERMS > 2:
            p2 = tl.load(PI + b * N_TERMS + 2).to(tl.float32) / N_TERMS
        return p0, p1, p2

    @triton.jit
    def _scale_task_fwd_kernel(
        T0, T1, T2, PI, Y, OUT, C, HW, W,
        s0b, s0c, s0h, s0w, s1b, s1c, s1h, s1w, s2b, s2c, s2h, s2w,
        N_TERMS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // C
        c = pid % C
        a1, b1, a2, b2 = _coeffs(Y, pid, C)
        p0, p1, p2 = _term_weights(PI, b, N_TERMS)
        for s in range(0, HW, BLOCK):
            i = s + tl.arange(0, BLOCK)
            ok = i < HW
            x = p0 * _load_term(T0, b, c, i, W, ok, s0b, s0c, s0h, s0w)
            if N_TERMS > 1:
                x += p1 * _load_term(T1, b, c, i, W, ok, s1b, s1c, s1h, s1w)
            if N_TERMS > 2:
                x += p2 * _load_term(T2, b, c, i, W, ok, s2b, s2c, s2h, s2w)
            tl.store(OUT + pid * HW + i, tl.maximum(a1 * x + b1, a2 * x + b2), mask=ok)

    @triton.jit
    def _scale_task_bwd_kernel(
        T0, T1, T2, PI, Y, G, D0, D1, D2, DPI, DY, C, HW, W,
        s0b, s0c, s0h, s0w, s1b, s1c, s1h, s1w, s2b, s2c, s2h, s2w,
        N_TERMS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """D_k (contiguous, like OUT) = pi_k / n dx; DPI[b, c, k] = sum t_k dx / n; DY[b, :] the coefficient
        gradients of the plane (fp32)."""
        pid = tl.program_id(0)
        b = pid // C
        c = pid % C
        a1, b1, a2, b2 = _coeffs(Y, pid, C)
        p0, p1, p2 = _term_weights(PI, b, N_TERMS)
        s_a1 = tl.zeros((BLOCK,), tl.float32)
        s_b1 = tl.zeros((BLOCK,), tl.float32)
        s_a2 = tl.zeros((BLOCK,), tl.float32)
        s_b2 = tl.zeros((BLOCK,), tl.float32)
        s_p0 = tl.zeros((BLOCK,), tl.float32)
        s_p1 = tl.zeros((BLOCK,), tl.float32)
        s_p2 = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, HW, BLOCK):
            i = s + tl.arange(0, BLOCK)
            ok = i < HW
            t0 = _load_term(T0, b, c, i, W, ok, s0b, s0c, s0h, s0w)
            x = p0 * t0
            if N_TERMS > 1:
                t1 = _load_term(T1, b, c, i, W, ok, s1b, s1c, s1h, s1w)
                x += p1 * t1
            if N_TERMS > 2:
                t2 = _load_term(T2, b, c, i, W, ok, s2b, s2c, s2h, s2w)
                x += p2 * t2
            g = tl.load(G + pid * HW + i, mask=ok, other=0.0).to(tl.float32)
            g1, g2 = _max_grad_split(x, g, a1, b1, a2, b2)
            dx = g1 * a1 + g2 * a2
            s_a1 += g1 * x
            s_b1 += g1
            s_a2 += g2 * x
            s_b2 += g2
            tl.store(D0 + pid * HW + i, p0 * dx, mask=ok)
            s_p0 += t0 * dx
            if N_TERMS > 1:
                tl.store(D1 + pid * HW + i, p1 * dx, mask=ok)
                s_p1 += t1 * dx
            if N_TERMS > 2:
                tl.store(D2 + pid * HW + i, p2 * dx, mask=ok)
                s_p2 += t2 * dx
        _store_coeff_grads(DY, pid, C, s_a1, s_b1, s_a2, s_b2)
        tl.store(DPI + pid * N_TERMS, tl.sum(s_p0, 0) / N_TERMS)
        if N_TERMS > 1:
            tl.store(DPI + pid * N_TERMS + 1, tl.sum(s_p1, 0) / N_TERMS)
        if N_TERMS > 2:
            tl.store(DPI + pid * N_TERMS + 2, tl.sum(s_p2, 0) / N_TERMS)


def _term_args(terms):
    """Three term pointers (unused ones repeat the first) and their 12 strides."""
    ts = list(terms) + [terms[0]] * (MAX_TERMS - len(terms))
    return ts, [s for t in ts for s in t.stride()]


def scale_task_triton_fwd(terms, pi, coefficients):
    B, C, H, W = terms[0].shape
    ts, strides = _term_args(terms)
    pi = pi.contiguous()
    y = coefficients.reshape(B, 4 * C).contiguous()
    out = torch.empty((B, C, H, W), device=pi.device, dtype=terms[0].dtype)
    _scale_task_fwd_kernel[(B * C,)](*ts, pi, y, out, C, H * W, W, *strides, N_TERMS=len(terms), BLOCK=TRITON_BLOCK,
                                     num_warps=TRITON_NUM_WARPS)  # fmt: skip
    return out


def scale_task_triton_bwd(grad, terms, pi, coefficients):
    B, C, H, W = terms[0].shape
    n = len(terms)
    ts, strides = _term_args(terms)
    pi_c = pi.contiguous()
    y = coefficients.reshape(B, 4 * C).contiguous()
    g = grad.contiguous()
    d_terms = [torch.empty((B, C, H, W), device=g.device, dtype=terms[0].dtype) for _ in range(n)]
    d_ts = d_terms + [d_terms[0]] * (MAX_TERMS - n)
    dpi = torch.empty((B, C, n), device=g.device, dtype=torch.float32)
    dy = torch.empty((B, 4 * C), device=g.device, dtype=torch.float32)
    _scale_task_bwd_kernel[(B * C,)](*ts, pi_c, y, g, *d_ts, dpi, dy, C, H * W, W, *strides, N_TERMS=n,
                                     BLOCK=TRITON_BLOCK, num_warps=TRITON_NUM_WARPS)  # fmt: skip
    return d_terms, dpi.sum(1).to(pi.dtype), dy.to(coefficients.dtype).reshape(coefficients.shape)


class _ScaleTaskTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pi, coefficients, *terms):
        ctx.save_for_backward(pi, coefficients, *terms)
        return scale_task_triton_fwd(terms, pi, coefficients)

    @staticmethod
    def backward(ctx, grad):
        pi, coefficients, *terms = ctx.saved_tensors
        d_terms, dpi, dy = scale_task_triton_bwd(grad, terms, pi, coefficients)
        return (dpi, dy, *d_terms)


# --- registry -------------------------------------------------------------------------------------------------------
# (Notes on the paths above, kept below the kernels: Triton's cache key holds each kernel's first line.) The mean over
# a level's terms is taken as a sum of terms weighted by pi / n, not the sum divided by n as mmdetection writes it: in
# fp16 three terms near 30,000 overflow in the sum while their mean fits. Every path does the same.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

DYRELU = register_op(
    Op(
        "dyrelu",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "triton": Backend("triton", ("cuda",), _FLOATS, (8, 0)),
        },
    )
)
SCALE_AWARE_ATTENTION = register_op(
    Op(
        "scale_aware_attention",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
        },
    )
)
SCALE_TASK_ATTENTION = register_op(
    Op(
        "scale_task_attention",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "triton": Backend("triton", ("cuda",), _FLOATS, (8, 0)),
        },
    )
)


# --- public functions -----------------------------------------------------------------------------------------------


def dyrelu(x: torch.Tensor, coefficients: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """DyReLU: max(a1 x + b1, a2 x + b2) per (sample, channel).

    Args:
        x: (B, C, ...) features.
        coefficients: (B, 4C) or (B, 4C, 1, 1), the hyper-function's hard-sigmoid outputs in [0, 1], in
            mmdetection's order (a1, b1, a2, b2); 0.5 everywhere is ReLU.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x: expected a (B, C, ...) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, C = x.shape[:2]
    if not isinstance(coefficients, torch.Tensor) or coefficients.numel() != B * 4 * C or coefficients.shape[:2] != (
        B, 4 * C):  # fmt: skip
        got = tuple(coefficients.shape) if isinstance(coefficients, torch.Tensor) else type(coefficients).__name__
        raise ValueError(f"coefficients: expected (B, 4C) = ({B}, {4 * C}) (or with trailing 1, 1), got {got}")
    name = DYRELU.select([x, coefficients], backend)
    if name == "reference":
        return dyrelu_reference(x, coefficients)
    if name == "triton":
        return _dyrelu_triton_op(x, coefficients)
    return dyrelu_torch(x, coefficients)


def scale_aware_attention(terms, weight: torch.Tensor, bias: torch.Tensor, *, backend: str | None = None):
    """mean_k terms[k] * hard_sigmoid(relu(weight . GAP(terms[k]) + bias)).

    Args:
        terms: non-empty list of (B, C, H, W) tensors of one shape (a level's spatial-aware terms).
        weight: (1, C, 1, 1) or (C,), the 1x1 convolution C -> 1; bias: (1,).
    """
    if not isinstance(terms, (list, tuple)) or not terms:
        raise ValueError("terms: expected a non-empty list of (B, C, H, W) tensors")
    shape = terms[0].shape
    for i, t in enumerate(terms):
        if t.dim() != 4 or t.shape != shape:
            raise ValueError(f"terms[{i}]: expected shape {tuple(shape)} (that of terms[0]), got {tuple(t.shape)}")
    if weight.numel() != shape[1]:
        raise ValueError(f"weight: expected {shape[1]} values (C -> 1), got shape {tuple(weight.shape)}")
    name = SCALE_AWARE_ATTENTION.select(list(terms), backend)
    impl = scale_aware_reference if name == "reference" else scale_aware_torch
    return impl(list(terms), weight.reshape(-1), bias.reshape(1))


def scale_task_attention(terms, pi: torch.Tensor, coefficients: torch.Tensor, *, backend: str | None = None):
    """dyrelu(mean_k pi[:, k] * terms[k], coefficients): one level's scale- and task-aware steps in one pass.

    Args:
        terms: 1 to 3 (B, C, H, W) tensors of one shape (any strides: a cropped view is read in place).
        pi: (B, n_terms), the scale-aware weights hard_sigmoid(relu(w . GAP(term) + b)).
        coefficients: (B, 4C) or (B, 4C, 1, 1), DyReLU's hard-sigmoid outputs (see :func:`dyrelu`).

    Returns:
        (B, C, H, W), contiguous; gradients for every term, pi and the coefficients.
    """
    if not isinstance(terms, (list, tuple)) or not 1 <= len(terms) <= MAX_TERMS:
        raise ValueError(f"terms: expected a list of 1 to {MAX_TERMS} (B, C, H, W) tensors, got {type(terms).__name__}"
                         f" of {len(terms) if isinstance(terms, (list, tuple)) else '?'}")  # fmt: skip
    shape = terms[0].shape
    for i, t in enumerate(terms):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"terms[{i}]: expected shape {tuple(shape)} (that of terms[0]), got {got}")
    B, C = shape[:2]
    if not isinstance(pi, torch.Tensor) or tuple(pi.shape) != (B, len(terms)):
        raise ValueError(
            f"pi: expected shape ({B}, {len(terms)}) (batch, terms), got {tuple(getattr(pi, 'shape', ()))}"
        )
    if not isinstance(coefficients, torch.Tensor) or coefficients.numel() != B * 4 * C or coefficients.shape[:2] != (
        B, 4 * C):  # fmt: skip
        raise ValueError(f"coefficients: expected (B, 4C) = ({B}, {4 * C}), got {tuple(coefficients.shape)}")
    name = SCALE_TASK_ATTENTION.select([*terms, pi, coefficients], backend)
    if name == "triton":
        return _ScaleTaskTriton.apply(pi, coefficients, *terms)
    impl = scale_task_reference if name == "reference" else scale_task_torch
    return impl(list(terms), pi, coefficients)


# --- ahead-of-time compile specs ------------------------------------------------------------------------------------


def triton_aot_specs() -> list[dict]:
    if not HAS_TRITON:
        return []
    from ..triton_aot import kernel_spec

    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        fwd = {"X": dtype, "Y": dtype, "OUT": dtype}
        bwd = {"X": dtype, "Y": dtype, "G": dtype, "DX": dtype, "DY": "fp32"}
        for kernel, pointers in ((_dyrelu_fwd_kernel, fwd), (_dyrelu_bwd_kernel, bwd)):
            specs.append(kernel_spec(f"{kernel.__name__}[{dtype}]", kernel, {"BLOCK": TRITON_BLOCK}, pointers,
                                     TRITON_NUM_WARPS))  # fmt: skip
        terms = dict.fromkeys(("T0", "T1", "T2"), dtype)
        fwd = terms | {"PI": dtype, "Y": dtype, "OUT": dtype}
        bwd = terms | {"PI": dtype, "Y": dtype, "G": dtype, "D0": dtype, "D1": dtype, "D2": dtype, "DPI": "fp32",
                       "DY": "fp32"}  # fmt: skip
        for n in range(1, MAX_TERMS + 1):
            for kernel, pointers in ((_scale_task_fwd_kernel, fwd), (_scale_task_bwd_kernel, bwd)):
                constexprs = {"BLOCK": TRITON_BLOCK, "N_TERMS": n}
                name = f"{kernel.__name__}[{dtype},n={n}]"
                specs.append(kernel_spec(name, kernel, constexprs, pointers, TRITON_NUM_WARPS))
    return specs
