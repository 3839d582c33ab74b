"""UniCL / CLIP contrastive loss without the N x N logits (Florence's pretraining loss, ../shared/SPEC.md section 2).

With s = tau u v^T (u, v: L2-normalised image and text features, tau = logit_scale) and P(i) = {k : y_k = y_i}:

    L_i2t = -1/N sum_i 1/|P(i)| sum_{k in P(i)} log softmax_j(s_i.)_k
    L_t2i = -1/N sum_j 1/|P(j)| sum_{k in P(j)} log softmax_i(s_.j)_k
    loss  = (L_i2t + L_t2i) / 2

Split into the only part that needs all N x N pairs and a part that needs none:

    loss = 1/(2N) (sum_i r_i + sum_j c_j) - tau/N sum_c (U_c . V_c) / n_c

where r_i / c_j are the log-sum-exp of row i / column j of s, and U_c, V_c the sums of the image / text features of
label c (n_c samples): sum_{k in P(i)} s_ik = tau u_i . V_{y_i}, and summed over i with weight 1/|P(i)| both
directions give the same class sum. The positive term is O(N D) plain PyTorch with autograd; the log-sum-exp pair is
the fused op (``lse_pair``): its backward needs only r, c and a recomputation of s, tile by tile, since
d loss / d s_ij = (exp(s_ij - r_i) + exp(s_ij - c_j)) / (2N).

Read top to bottom: the literal reference, the tiled PyTorch path (CPU and any device), the Triton kernels, the
custom ops with autograd, distributed gathering, the registry, the public function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _env
from .._dispatch import Backend, Op, register_op

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# --- reference: the formula as written ------------------------------------------------------------------------------


def contrastive_loss_reference(u, v, logit_scale, labels=None, rows: slice | None = None):
    """N x N logits, positive mask, log-softmax in both directions, mean over each sample's positives. ``rows``
    (distributed): average only this rank's rows (image -> text) and columns (text -> image)."""
    N = u.shape[0]
    logits = logit_scale * (u @ v.t())
    if labels is None:
        labels = torch.arange(N, device=u.device)
    pos = (labels[:, None] == labels[None, :]).to(logits.dtype)
    i2t = -(pos * logits.log_softmax(dim=1)).sum(1) / pos.sum(1)
    t2i = -(pos * logits.log_softmax(dim=0)).sum(0) / pos.sum(0)
    rows = rows if rows is not None else slice(0, N)
    return (i2t[rows].mean() + t2i[rows].mean()) / 2


# --- the O(N D) positive term ---------------------------------------------------------------------------------------


def positive_term(u_rows, v_rows, u_all, v_all, logit_scale, labels_rows, labels_all):
    """1/(2 M) sum over the M given rows of (mean positive logit of row i in s) + (mean positive logit of column i),
    positives taken among all samples (u_all, v_all, labels_all). fp32 (fp64 inputs: fp64); autograd through all."""
    M = u_rows.shape[0]
    u_rows, v_rows, u_all, v_all = (t.to(acc_dtype(u_rows.dtype)) for t in (u_rows, v_rows, u_all, v_all))
    if labels_all is None:  # CLIP: each sample is its own only positive
        return logit_scale * (u_rows * v_rows).sum() / M
    classes, inv_all = torch.unique(labels_all, return_inverse=True)
    counts = torch.bincount(inv_all, minlength=classes.numel()).to(u_all.dtype)
    U = u_all.new_zeros(classes.numel(), u_all.shape[1]).index_add(0, inv_all, u_all)
    V = v_all.new_zeros(classes.numel(), v_all.shape[1]).index_add(0, inv_all, v_all)
    inv = torch.searchsorted(classes, labels_rows)
    w = (1.0 / counts)[inv].unsqueeze(1)
    return logit_scale * ((u_rows * V[inv] * w).sum() + (v_rows * U[inv] * w).sum()) / (2 * M)


# --- torch: tiled, portable (the CPU path) --------------------------------------------------------------------------
# Square tiles of TILE x TILE fp32 scores: memory O(N D + TILE^2) whatever N is. The forward keeps online
# (max, sum-exp) statistics for the rows of the current row block and for every column; the backward recomputes each
# tile of s from the saved r and c.

TORCH_TILE = 1024  # 4 MB fp32 tiles: heap-recycled on CPU (far below glibc's mmap threshold), cache-friendly


def _tiles(n: int, tile: int):
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


def lse_pair_torch_fwd(a, b, scale, need_cols: bool = True, tile: int | None = None):
    """Row and column log-sum-exp of s = scale * a b^T ((M,), (N,) in acc_dtype; columns empty unless need_cols)."""
    M, N = a.shape[0], b.shape[0]
    tile = tile or TORCH_TILE
    t = scale.to(ct := acc_dtype(a.dtype))  # 0-dim tensor: no device sync
    r = a.new_empty(M, dtype=ct)
    col_m = a.new_full((N,), float("-inf"), dtype=ct)
    col_l = a.new_zeros(N, dtype=ct)
    for i0, i1 in _tiles(M, tile):
        a_i = a[i0:i1].to(ct)
        row_m = a.new_full((i1 - i0,), float("-inf"), dtype=ct)
        row_l = a.new_zeros(i1 - i0, dtype=ct)
        for j0, j1 in _tiles(N, tile):
            s = torch.mm(a_i, b[j0:j1].to(ct).t()).mul_(t)
            m_new = torch.maximum(row_m, s.amax(1))
            row_l = row_l * (row_m - m_new).exp() + (s - m_new[:, None]).exp_().sum(1)
            row_m = m_new
            if need_cols:
                cm, cl = col_m[j0:j1], col_l[j0:j1]
                c_new = torch.maximum(cm, s.amax(0))
                cl.mul_((cm - c_new).exp()).add_(s.sub_(c_new[None, :]).exp_().sum(0))
                cm.copy_(c_new)
        r[i0:i1] = row_m + row_l.log()
    c = col_m + col_l.log() if need_cols else a.new_empty(0, dtype=ct)
    return r, c


def lse_pair_torch_bwd(a, b, scale, r, c, grad_r, grad_c, tile: int | None = None):
    """Gradients of sum(grad_r * r) + sum(grad_c * c) with respect to a, b and the scale (in acc_dtype)."""
    M, N = a.shape[0], b.shape[0]
    tile = tile or TORCH_TILE
    t = scale.to(ct := acc_dtype(a.dtype))  # 0-dim tensor: no device sync
    da = torch.zeros(M, a.shape[1], device=a.device, dtype=ct)
    db = torch.zeros(N, b.shape[1], device=a.device, dtype=ct)
    g_s = torch.zeros((), device=a.device, dtype=ct)  # sum_ij G_ij s_ij
    use_cols = grad_c is not None and c.numel() > 0
    for i0, i1 in _tiles(M, tile):
        a_i = a[i0:i1].to(ct)
        for j0, j1 in _tiles(N, tile):
            b_j = b[j0:j1].to(ct)
            s = torch.mm(a_i, b_j.t()).mul_(t)
            g = (s - r[i0:i1, None]).exp_().mul_(grad_r[i0:i1, None])
            if use_cols:
                g.add_((s - c[None, j0:j1]).exp_().mul_(grad_c[None, j0:j1]))
            g_s += (g * s).sum()
            da[i0:i1].addmm_(g, b_j)
            db[j0:j1].addmm_(g.t(), a_i)
    return da.mul_(t), db.mul_(t), g_s / t  # fp32: the caller adds the positive term before rounding


# --- triton: fused tile kernels -------------------------------------------------------------------------------------
# Two kernels, each launched once per direction with the roles of the two feature matrices swapped (column lse of
# s = row lse of s^T): the forward streams column blocks past a resident row block with an online (max, sum-exp);
# the backward streams them again, recomputes s, forms G = g_r exp(s - r) + g_c exp(s - c) and accumulates
# G @ b for the row block in fp32 (FlashAttention-2's dQ pass; the other direction is the same pass on s^T). Both
# keep the whole feature dimension of a row block resident: D <= 512. bf16/fp16 dots accumulate in fp32; fp32 dots
# are IEEE (no TF32). Nothing of size N x N exists.

TRITON_MAX_DIM = 512
TRITON_NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _load_rows(X, idx, n, sx0, sx1, dd, D, UPCAST: tl.constexpr):
        x = tl.load(X + idx[:, None] * sx0 + dd[None, :] * sx1, mask=(idx[:, None] < n) & (dd[None, :] < D), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: compute in fp32 there
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _lse_rows_kernel(
        A, B, SCALE, R, M, N, D, sa0, sa1, sb0, sb1,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """R[i] = logsumexp_j(scale * A[i] . B[j]) for one block of rows."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        t = tl.load(SCALE).to(tl.float32)
        a = _load_rows(A, rows, M, sa0, sa1, dd, D, UPCAST)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            b = _load_rows(B, cols, N, sb0, sb1, dd, D, UPCAST)
            s = _dot(a, tl.trans(b), IEEE) * t
            s = tl.where(cols[None, :] < N, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(R + rows, m_i + tl.log(l_i), mask=rows < M)

    @triton.jit
    def _lse_bwd_rows_kernel(
        A, B, SCALE, R, C, GR, GC, DA, GS, M, N, D, sa0, sa1, sb0, sb1, sd0, sd1, use_row, use_col,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """DA[i] = scale * sum_j G_ij B[j] and GS[i] = sum_j G_ij s_ij for one block of rows, with
        G_ij = GR[i] exp(s_ij - R[i]) (if use_row) + GC[j] exp(s_ij - C[j]) (if use_col). The flags are runtime
        values (one compiled kernel); R/GR/C/GC are not read when their flag is 0."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        t = tl.load(SCALE).to(tl.float32)
        a = _load_rows(A, rows, M, sa0, sa1, dd, D, UPCAST)
        row_ok = rows < M
        r = tl.load(R + rows, mask=row_ok & (use_row != 0), other=0.0)
        gr = tl.load(GR + rows, mask=row_ok & (use_row != 0), other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        gs = tl.zeros((BLOCK_M,), tl.float32)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            b = _load_rows(B, cols, N, sb0, sb1, dd, D, UPCAST)
            s = _dot(a, tl.trans(b), IEEE) * t
            c = tl.load(C + cols, mask=col_ok & (use_col != 0), other=0.0)
            gc = tl.load(GC + cols, mask=col_ok & (use_col != 0), other=0.0)
            # where(), not a product with a zero weight: exp of an unused term may overflow to inf
            g = tl.where(use_row != 0, gr[:, None] * tl.exp(s - r[:, None]), 0.0)
            g += tl.where(use_col != 0, gc[None, :] * tl.exp(s - c[None, :]), 0.0)
            g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
            gs += tl.sum(g * s, 1)
            acc += _dot(g.to(b.dtype), b, IEEE)
        tl.store(DA + rows[:, None] * sd0 + dd[None, :] * sd1, acc * t, mask=row_ok[:, None] & (dd[None, :] < D))
        tl.store(GS + rows, gs, mask=row_ok)


def triton_lse_config(D: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(D))
    # fp32 rows of 512 need 16-row blocks: 32 x 512 fp32 tiles of a and b, double-buffered, exceed sm_80's 163 KB
    block = 64 if block_d <= 128 else 32 if (block_d <= 256 or dtype != torch.float32) else 16
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "IEEE": dtype == torch.float32,
            "UPCAST": _env.TRITON_INTERPRET and dtype == torch.bfloat16, "num_warps": TRITON_NUM_WARPS}  # fmt: skip


def _launch_lse_rows(a, b, scale):
    M, D = a.shape
    r = torch.empty(M, device=a.device, dtype=torch.float32)
    cfg = triton_lse_config(D, a.dtype)
    _lse_rows_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        a, b, scale, r, M, b.shape[0], D, *a.stride(), *b.stride(), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"], IEEE=cfg["IEEE"], UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return r


def lse_pair_triton_fwd(a, b, scale, need_cols: bool = True):
    r = _launch_lse_rows(a, b, scale)
    c = _launch_lse_rows(b, a, scale) if need_cols else a.new_empty(0, dtype=torch.float32)
    return r, c


def _launch_lse_bwd_rows(a, b, scale, r, c, gr, gc, use_row, use_col):
    M, D = a.shape
    da = torch.empty(a.shape, device=a.device, dtype=torch.float32)  # fp32: rounded once, by the caller
    gs = torch.empty(M, device=a.device, dtype=torch.float32)
    cfg = triton_lse_config(D, a.dtype)
    dummy = gs[:1]
    _lse_bwd_rows_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        a, b, scale, r if use_row else dummy, c if use_col else dummy, gr if use_row else dummy,
        gc if use_col else dummy, da, gs, M, b.shape[0], D, *a.stride(), *b.stride(), *da.stride(), int(use_row),
        int(use_col), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], IEEE=cfg["IEEE"],
        UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return da, gs


def lse_pair_triton_bwd(a, b, scale, r, c, grad_r, grad_c):
    use_c = grad_c is not None and c.numel() > 0
    da, gs = _launch_lse_bwd_rows(a, b, scale, r, c, grad_r, grad_c, True, use_c)
    # The same pass on s^T: rows are b's, its "row" term is the column lse, its "column" term the row lse.
    db, _ = _launch_lse_bwd_rows(b, a, scale, c, r, grad_c, grad_r, use_c, True)
    return da, db, gs.sum() / scale.float()


# --- custom ops with autograd ---------------------------------------------------------------------------------------
# (Helpers of the portable path defined here, below the kernels: Triton's cache key holds each kernel's first line.)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the portable path: float64 for float64 features, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_fwd_impl(a, b, scale, need_cols, backend):
    if backend == "triton":
        return lse_pair_triton_fwd(a, b, scale, need_cols)
    return lse_pair_torch_fwd(a, b, scale, need_cols)


def _lse_bwd_impl(a, b, scale, r, c, grad_r, grad_c, backend):
    if backend == "triton":
        return lse_pair_triton_bwd(a, b, scale, r, c, grad_r, grad_c)
    return lse_pair_torch_bwd(a, b, scale, r, c, grad_r, grad_c)


@torch.library.custom_op("florence_kernels::contrastive_lse_pair", mutates_args=())
def _lse_pair_op(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, need_cols: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _lse_fwd_impl(a, b, scale, need_cols, backend)


@_lse_pair_op.register_fake
def _(a, b, scale, need_cols, backend):
    ct = acc_dtype(a.dtype)
    return a.new_empty(a.shape[0], dtype=ct), a.new_empty(b.shape[0] if need_cols else 0, dtype=ct)


@torch.library.custom_op("florence_kernels::contrastive_lse_pair_bwd", mutates_args=())
def _lse_pair_bwd_op(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, r: torch.Tensor, c: torch.Tensor, grad_r: torch.Tensor,
    grad_c: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    da, db, dscale = _lse_bwd_impl(a, b, scale, r, c, grad_r, grad_c if c.numel() else None, backend)
    return da.to(a.dtype), db.to(b.dtype), dscale.reshape(()).to(scale.dtype)


@_lse_pair_bwd_op.register_fake
def _(a, b, scale, r, c, grad_r, grad_c, backend):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _lse_setup_context(ctx, inputs, output):
    a, b, scale, need_cols, backend = inputs
    r, c = output
    ctx.save_for_backward(a, b, scale, r, c)
    ctx.backend = backend


def _lse_backward(ctx, grad_r, grad_c):
    a, b, scale, r, c = ctx.saved_tensors
    # contiguous: the gradient of r.sum() arrives expanded (stride 0), and kernels index it as a vector
    grad_r = torch.zeros_like(r) if grad_r is None else grad_r.to(r.dtype).contiguous()
    grad_c = torch.zeros_like(c) if grad_c is None else grad_c.to(c.dtype).contiguous()
    da, db, dscale = _lse_pair_bwd_op(a, b, scale, r, c, grad_r, grad_c, ctx.backend)
    return da, db, dscale, None, None


_lse_pair_op.register_autograd(_lse_backward, setup_context=_lse_setup_context)


def lse_pair(a, b, scale, need_cols: bool = True, backend: str = "torch"):
    """(row, column) log-sum-exp of scale * a b^T in fp32, never holding more than one tile of it; differentiable
    in a, b and scale (a 0-dim tensor)."""
    return _lse_pair_op(a, b, scale, need_cols, backend)


# The single-process loss as one op: its backward adds the positive term's gradient (-tau/N V_c / n_c for an image
# of class c, likewise for texts) to the tile kernels' fp32 gradient before rounding once to the input dtype. The two
# parts nearly cancel (at N = 1 exactly), so rounding each to bf16 first would leave their rounding errors.


def _class_sums(x, class_ids, n_classes):
    ct = acc_dtype(x.dtype)
    return x.new_zeros(n_classes, x.shape[1], dtype=ct).index_add_(0, class_ids, x.to(ct))


def _positive_parts(u, v, class_ids, n_classes):
    """(U, V, 1 / counts, sum_c U_c . V_c / n_c), fp32 (fp64 for fp64 features), no autograd."""
    U, V = _class_sums(u, class_ids, n_classes), _class_sums(v, class_ids, n_classes)
    inv_counts = 1.0 / torch.bincount(class_ids, minlength=n_classes).to(U.dtype)
    return U, V, inv_counts, ((U * V).sum(1) * inv_counts).sum()


@torch.library.custom_op("florence_kernels::unicl_loss", mutates_args=())
def _unicl_loss_op(
    u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, class_ids: torch.Tensor, n_classes: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = u.shape[0]
    r, c = _lse_fwd_impl(u, v, scale, True, backend)
    pos = _positive_parts(u, v, class_ids, n_classes)[3]
    loss = (r.sum() + c.sum()) / (2 * N) - scale.to(r.dtype) * pos / N
    return loss, r, c


@_unicl_loss_op.register_fake
def _(u, v, scale, class_ids, n_classes, backend):
    acc = dict(device=u.device, dtype=acc_dtype(u.dtype))
    return torch.empty((), **acc), torch.empty(u.shape[0], **acc), torch.empty(v.shape[0], **acc)


@torch.library.custom_op("florence_kernels::unicl_loss_bwd", mutates_args=())
def _unicl_loss_bwd_op(
    grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
    class_ids: torch.Tensor, n_classes: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    N = u.shape[0]
    g = grad.to(r.dtype)
    g_lse = (g / (2 * N)).expand(N).contiguous()
    du, dv, g_s = _lse_bwd_impl(u, v, scale, r, c, g_lse, g_lse, backend)
    U, V, inv_counts, pos = _positive_parts(u, v, class_ids, n_classes)
    w = (g * scale.to(r.dtype) / N) * inv_counts
    du.sub_((V * w[:, None])[class_ids])
    dv.sub_((U * w[:, None])[class_ids])
    dscale = g_s - g * pos / N
    return du.to(u.dtype), dv.to(v.dtype), dscale.reshape(()).to(scale.dtype)


@_unicl_loss_bwd_op.register_fake
def _(grad, u, v, scale, r, c, class_ids, n_classes, backend):
    return torch.empty_like(u), torch.empty_like(v), torch.empty_like(scale)


def _unicl_setup_context(ctx, inputs, output):
    u, v, scale, class_ids, n_classes, backend = inputs
    _, r, c = output
    ctx.save_for_backward(u, v, scale, r, c, class_ids)
    ctx.n_classes, ctx.backend = n_classes, backend


def _unicl_backward(ctx, grad, grad_r, grad_c):
    u, v, scale, r, c, class_ids = ctx.saved_tensors
    du, dv, dscale = _unicl_loss_bwd_op(grad, u, v, scale, r, c, class_ids, ctx.n_classes, ctx.backend)
    return du, dv, dscale, None, None, None


_unicl_loss_op.register_autograd(_unicl_backward, setup_context=_unicl_setup_context)


# --- distributed: gather with gradient ------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; the backward sums every rank's gradient of the gathered tensor and returns this rank's
    slice (each rank's loss uses every rank's features)."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def _gather_labels(labels, group):
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


def _check_equal_batches(n: int, device, group):
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"image_features: every rank must hold the same batch size, got {sizes} across ranks")


# --- registry -------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _triton_limits(u, v, **_) -> list[str]:
    if u.shape[-1] > TRITON_MAX_DIM:
        return [f"feature dim {u.shape[-1]} > {TRITON_MAX_DIM} (a row block keeps all of D resident)"]
    return []


CONTRASTIVE_LOSS = register_op(
    Op(
        "contrastive_loss",
        {
            "reference": Backend("reference", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "torch": Backend("torch", ("cpu", "cuda"), (*_FLOATS, torch.float64)),
            "triton": Backend("triton", ("cuda",), _FLOATS, (8, 0), impl_reasons=_triton_limits),
        },
    )
)


# --- public function ------------------------------------------------------------------------------------------------


def _resolve_group(process_group, gather=None):
    if gather is False:
        if process_group is not None:
            raise ValueError("process_group: given with gather=False (this rank's features only); pass one of them")
        return None, False
    if process_group is not None:
        return process_group, True
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD, True
    return None, False


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, labels: torch.Tensor | None = None, *,
    process_group=None, gather: bool | None = None, backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """UniCL loss (CLIP's when labels is None), without materialising the N x N logits.

    Args:
        image_features, text_features: (N, D), L2-normalised (not checked: the caller's projection normalises).
        logit_scale: the multiplier tau (open_clip's convention: pass ``logit_scale.exp()``), a 0-dim tensor (its
            gradient is computed) or a number.
        labels: int64 (N,); samples with equal labels are positives of each other. None: all distinct (CLIP).
        process_group: gather features and labels from every rank of this group (default: the world group when
            torch.distributed is initialised with more than one rank). Each rank returns the loss of its own rows
            and columns against all samples; the mean over ranks (what DDP's gradient averaging optimises) equals
            the loss of the whole batch in one process, and so do the averaged gradients.
        gather: False computes on the given features only, even where torch.distributed is initialised (callers that
            gather themselves, e.g. open_clip's ClipLoss semantics in florence_kernels.integrations.open_clip);
            None (default) as described under process_group.
        backend: None (automatic), "reference" (N x N logits), "torch" (tiled) or "triton" (fused tiles, CUDA).

    Returns:
        0-dim tensor (L_i2t + L_t2i) / 2: float32 (float64 for float64 features, computed in float64). An empty
        batch (N = 0) gives NaN, the mean over no pairs (as open_clip's ClipLoss), with empty feature gradients and
        a zero logit_scale gradient.
    """
    u, v = image_features, text_features
    for name, t in (("image_features", u), ("text_features", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected an (N, D) tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if u.shape != v.shape:
        raise ValueError(
            f"text_features: expected shape {tuple(u.shape)} (that of image_features), got {tuple(v.shape)}"
        )
    if u.dtype != v.dtype or u.device != v.device:
        raise ValueError(
            f"text_features: expected {u.dtype} on {u.device} like image_features, got {v.dtype} on {v.device}"
        )
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=u.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale: expected a 0-dim tensor (the multiplier), got shape {tuple(logit_scale.shape)}")
    logit_scale = logit_scale.reshape(()).to(device=u.device, dtype=acc_dtype(u.dtype))
    N = u.shape[0]
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (N,) or labels.dtype != torch.int64:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected an int64 tensor of shape ({N},), got {got}")
        labels = labels.to(u.device)
    group, distributed = _resolve_group(process_group, gather)
    name = CONTRASTIVE_LOSS.select([u, v], backend)
    if N == 0 and not distributed:  # the mean over no pairs, as open_clip's ClipLoss (cross_entropy) gives
        return (u.sum() + v.sum()) * logit_scale * 0 + float("nan")

    if distributed:
        _check_equal_batches(N, u.device, group)
        u_all, v_all = _GatherWithGrad.apply(u, group), _GatherWithGrad.apply(v, group)
        labels_all = _gather_labels(labels, group) if labels is not None else None
        rows = slice(dist.get_rank(group) * N, (dist.get_rank(group) + 1) * N)
    else:
        u_all, v_all, labels_all, rows = u, v, labels, slice(0, N)

    if name == "reference":
        return contrastive_loss_reference(u_all, v_all, logit_scale, labels_all, rows=rows)
    if not distributed:
        if labels is None:
            class_ids, n_classes = torch.arange(N, device=u.device), N
        else:
            classes, class_ids = torch.unique(labels, return_inverse=True)
            n_classes = classes.numel()
        return _unicl_loss_op(u, v, logit_scale, class_ids, n_classes, name)[0]
    # Each rank: its rows against all columns, and its columns against all rows (two passes of N/W x N).
    r = lse_pair(u, v_all, logit_scale, need_cols=False, backend=name)[0]
    c = lse_pair(v, u_all, logit_scale, need_cols=False, backend=name)[0]
    pos = positive_term(u, v, u_all, v_all, logit_scale, labels, labels_all)
    return (r.sum() + c.sum()) / (2 * N) - pos


# --- ahead-of-time compile specs ------------------------------------------------------------------------------------


def triton_aot_specs() -> list[dict]:
    """Every configuration the launchers can pick: per dtype, each BLOCK_D from 16 to TRITON_MAX_DIM."""
    if not HAS_TRITON:
        return []
    from ..triton_aot import kernel_spec, torch_dtype

    specs = []
    dims = [16 * 2**k for k in range(6) if 16 * 2**k <= TRITON_MAX_DIM]
    for dtype in ("fp32", "fp16", "bf16"):
        pointers = {"A": dtype, "B": dtype, "DA": "fp32"} | dict.fromkeys(("SCALE", "R", "C", "GR", "GC", "GS"), "fp32")
        for D in dims:
            cfg = triton_lse_config(D, torch_dtype(dtype))
            constexprs = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "IEEE")} | {"UPCAST": False}
            for kernel in (_lse_rows_kernel, _lse_bwd_rows_kernel):
                specs.append(kernel_spec(f"{kernel.__name__}[{dtype},D={D}]", kernel, constexprs, pointers,
                                         cfg["num_warps"]))  # fmt: skip
    return specs
