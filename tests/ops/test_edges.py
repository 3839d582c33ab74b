"""Every op, every backend that runs here, at the edges users of its peers hit (issue 13 of the tracker):

- an empty batch gives an empty output and empty (or zero) gradients, as torchvision's ops do;
- non-contiguous inputs (transposed or permuted memory) give the contiguous result, forward and backward;
- float64, where a backend declares it, is computed in float64 (output and gradients in float64, backends agreeing
  to 1e-10, where a float32 computation would be off by ~1e-7);
- fp16 where an intermediate of the naive order overflows (> 65,504) although the result fits: every backend
  matches float64.

One table of op specs drives the sweeps: each spec builds the op's inputs for a batch size and dtype and calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

import florence_kernels as fk
from tests.conftest import runnable_backends


@dataclasses.dataclass
class Spec:
    op: str
    make: Callable  # (batch, generator) -> list of float64 tensors (the leaves)
    call: Callable  # (leaves, backend) -> output
    batched: tuple  # per leaf: whether its first axis is the batch (its gradient is then empty for batch 0)


def _randn(g, *shape, scale=1.0):
    g = g if g is not None else torch.Generator().manual_seed(0)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _rand(g, *shape):
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _wa_table(g):
    return _randn(g, (2 * 2 - 1) * (2 * 3 - 1) * (2 * 3 - 1), 2, scale=0.5)


SPECS = [
    Spec(
        "window_partition",
        lambda B, g: [_randn(g, B, 3, 5, 7, 4)],
        lambda t, be: fk.window_partition(t[0], (2, 3, 3), (1, 1, 2), backend=be),
        (True,),
    ),
    Spec(
        "window_reverse",
        lambda B, g: [_randn(g, B * 2 * 2 * 3, 18, 4)],
        lambda t, be: fk.window_reverse(t[0], (2, 3, 3), (t[0].shape[0] // 12, 3, 5, 7, 4), (1, 1, 2), backend=be),
        (True,),
    ),
    Spec(
        "window_attention",
        lambda B, g: [
            _randn(g, B, 3, 5, 7, 2, 16),
            _randn(g, B, 3, 5, 7, 2, 16),
            _randn(g, B, 3, 5, 7, 2, 16),
            _wa_table(g),
        ],  # fmt: skip
        lambda t, be: fk.window_attention(
            t[0], t[1], t[2], window_size=(2, 3, 3), shift_size=(1, 1, 1), rel_pos_bias=t[3], backend=be
        ),  # fmt: skip
        (True, True, True, False),
    ),
    Spec(
        "conv_embed",
        lambda B, g: [
            _randn(g, B, 3, 9, 11),
            _randn(g, 16, 3, 3, 3, scale=0.3),
            _randn(g, 16),
            1 + _randn(g, 16),
            _randn(g, 16),
        ],  # fmt: skip
        lambda t, be: fk.conv_embed(
            t[0], t[1], t[2], t[3], t[4], stride=2, padding=1, input_layout="channels_first", backend=be
        ),  # fmt: skip
        (True, False, False, False, False),
    ),
    Spec(
        "modulated_deform_conv2d",
        lambda B, g: [
            _randn(g, B, 4, 7, 6),
            _randn(g, B, 18, 7, 6, scale=2.0),
            _rand(g, B, 9, 7, 6),
            _randn(g, 4, 4, 3, 3, scale=0.3),
            _randn(g, 4),
        ],  # fmt: skip
        lambda t, be: fk.modulated_deform_conv2d(t[0], t[1], t[2], t[3], t[4], padding=1, backend=be),
        (True, True, True, False, False),
    ),
    Spec(
        "dyrelu",
        lambda B, g: [_randn(g, B, 8, 5, 6), _rand(g, B, 32)],
        lambda t, be: fk.dyrelu(t[0], t[1], backend=be),
        (True, True),
    ),
    Spec(
        "scale_aware_attention",
        lambda B, g: [_randn(g, B, 8, 5, 6), _randn(g, B, 8, 5, 6), _randn(g, 8, scale=0.5), _randn(g, 1)],
        lambda t, be: fk.scale_aware_attention([t[0], t[1]], t[2], t[3], backend=be),
        (True, True, False, False),
    ),
    Spec(
        "scale_task_attention",
        lambda B, g: [
            _randn(g, B, 8, 5, 6),
            _randn(g, B, 8, 5, 6),
            _randn(g, B, 8, 5, 6),
            _rand(g, B, 3),
            _rand(g, B, 32),
        ],  # fmt: skip
        lambda t, be: fk.scale_task_attention([t[0], t[1], t[2]], t[3], t[4], backend=be),
        (True, True, True, True, True),
    ),
    Spec(
        "contrastive_loss",
        lambda B, g: [
            torch.nn.functional.normalize(_randn(g, B, 16), dim=1),
            torch.nn.functional.normalize(_randn(g, B, 16), dim=1),
            10 + _rand(g),
        ],  # fmt: skip
        lambda t, be: fk.contrastive_loss(t[0], t[1], t[2], torch.arange(t[0].shape[0]) % 3, backend=be),
        (True, True, False),
    ),
]
OPS_COVERED = {s.op for s in SPECS}


def _cases():
    out = []
    for spec in SPECS:
        for be in runnable_backends(spec.op, "cpu"):
            out.append(pytest.param(spec, be, id=f"{spec.op}-{be}"))
    return out


def _dtype_for(op, backend, wanted=torch.float32):
    dtypes = fk.OPS[op].backends[backend].dtypes
    return wanted if wanted in dtypes else dtypes[0]


def _run(spec, leaves, backend, dtype, grad_seed=7):
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = spec.call(leaves, backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return out, [t.grad for t in leaves]


def test_every_registered_op_is_swept():
    assert OPS_COVERED == set(fk.OPS), set(fk.OPS) ^ OPS_COVERED


@pytest.mark.parametrize("spec,backend", _cases())
def test_empty_batch(spec, backend):
    dt = _dtype_for(spec.op, backend)
    leaves = spec.make(0, torch.Generator().manual_seed(0))
    out, grads = _run(spec, leaves, backend, dt)
    if spec.op == "contrastive_loss":  # a mean over no pairs: NaN, as open_clip's ClipLoss
        assert out.shape == () and torch.isnan(out)
    else:
        assert out.shape[0] == 0 and out.dtype == dt, (tuple(out.shape), out.dtype)
    for i, (leaf, grad) in enumerate(zip(leaves, grads, strict=True)):
        if grad is None:
            continue
        assert grad.shape == leaf.shape, f"leaf {i}: gradient {tuple(grad.shape)} for {tuple(leaf.shape)}"
        if not spec.batched[i]:
            assert torch.count_nonzero(grad) == 0, f"leaf {i}: parameters of an empty batch get a zero gradient"


def _layouts(t: torch.Tensor) -> dict:
    """The same values in other memory layouts: the last two axes stored transposed, every axis reversed in memory
    (channels-last for images), and a stride-2 view into a larger buffer. 0-dim tensors have none."""
    if t.dim() == 0:
        return {}
    out = {}
    if t.dim() >= 2:
        out["transposed"] = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        rev = tuple(range(t.dim() - 1, -1, -1))
        out["reversed"] = t.permute(rev).contiguous().permute(rev)
    out["strided"] = torch.stack((t, torch.full_like(t, float("nan"))), -1)[..., 0]
    for name, v in out.items():
        assert torch.equal(v, t) and (not v.is_contiguous() or t.numel() <= 1), name
    return out


@pytest.mark.parametrize("spec,backend", _cases())
def test_non_contiguous_inputs(spec, backend):
    dt = _dtype_for(spec.op, backend)
    leaves = [t.to(dt) for t in spec.make(2, torch.Generator().manual_seed(1))]
    want_out, want_grads = _run(spec, leaves, backend, dt)
    for i in range(len(leaves)):
        for layout, value in _layouts(leaves[i]).items():
            moved = list(leaves)
            moved[i] = value
            moved = [t.detach().requires_grad_() for t in moved]
            out = spec.call(moved, backend)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dt)
            out.backward(g)
            what = f"{spec.op}[{backend}] leaf {i} {layout}"
            torch.testing.assert_close(out, want_out, msg=f"{what}: output")
            for j, (a, b) in enumerate(zip([t.grad for t in moved], want_grads, strict=True)):
                if b is not None:
                    torch.testing.assert_close(a, b, msg=f"{what}: grad {j}")


@pytest.mark.parametrize("spec,backend", _cases())
def test_outputs_take_in_place_updates(spec, backend):
    """An op's output takes in-place updates (SwinBlock3D sums its residual into the attention branch with add_): no
    backend hands back a view out of its custom op, which autograd refuses to modify in place (field report
    2026-12-02: the torch path of window_reverse, chosen where florence_kernels._C is not built, broke every training
    forward of CoSwin; conv_embed's Triton and deform_conv's C++ outputs were views too). The gradient after the update
    is the update's, or, for an op that saves its output for its backward, autograd's own version-counter error."""
    dt = _dtype_for(spec.op, backend)
    leaves = [t.to(dt).requires_grad_() for t in spec.make(2, torch.Generator().manual_seed(3))]
    out = spec.call(leaves, backend)
    plain = spec.call([t.detach().requires_grad_() for t in leaves], backend)
    out.mul_(2.0)  # raised "a view ... created inside a custom Function" for a view out of a custom op
    try:
        (out * 1.0).sum().backward()
    except RuntimeError as e:  # an op that saves its output for its backward (attention) says so, never a wrong grad
        assert "modified by an inplace operation" in str(e), e
        return
    plain_leaves = [t.detach().requires_grad_() for t in leaves]
    (2.0 * spec.call(plain_leaves, backend)).sum().backward()
    torch.testing.assert_close(out, 2.0 * plain.detach())
    for i, (a, b) in enumerate(zip([t.grad for t in leaves], [t.grad for t in plain_leaves], strict=True)):
        if b is not None:
            torch.testing.assert_close(a, b, msg=f"{spec.op}[{backend}] grad {i}")


def _fp64_cases():
    out = []
    for spec in SPECS:
        backends = [b for b in runnable_backends(spec.op, "cpu") if torch.float64 in fk.OPS[spec.op].backends[b].dtypes]
        out.append(pytest.param(spec, backends, id=spec.op))
    return out


@pytest.mark.parametrize("spec,backends", _fp64_cases())
def test_float64_is_computed_in_float64(spec, backends):
    """Every backend declaring float64 returns float64 output and gradients, and all agree to 1e-10; the same op
    in float32 differs from them by far more (so an fp32 computation cannot pass)."""
    assert "reference" in backends and len(backends) >= 2, backends
    leaves = spec.make(3, torch.Generator().manual_seed(2))
    results = {be: _run(spec, leaves, be, torch.float64) for be in backends}
    ref_out, ref_grads = results["reference"]
    out32, _ = _run(spec, leaves, "reference", torch.float32)
    gap32 = (out32.double() - ref_out).abs().max().item()
    for be, (out, grads) in results.items():
        assert out.dtype == torch.float64, f"{spec.op}[{be}] output dtype {out.dtype}"
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=f"{spec.op}[{be}] output in float64")
        for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
            if b is None:
                continue
            assert a.dtype == torch.float64, f"{spec.op}[{be}] grad {i} dtype {a.dtype}"
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{spec.op}[{be}] grad {i} in float64")
    if spec.op not in ("window_partition", "window_reverse"):  # gathers: float32 is exact too
        assert gap32 > 1e-9, f"{spec.op}: float32 agrees with float64 to {gap32:.1e}: the check cannot tell them apart"


def test_contrastive_loss_float64_from_the_field_report():
    """contrastive_loss on the torch backend (the CPU default) in float64: a float64 loss at float64 accuracy,
    logit scale included (it used to be computed in float32: errors of 1e-7)."""
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    v = torch.nn.functional.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(14.285714285714286, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(64) % 5
    loss = fk.contrastive_loss(u, v, scale, labels, backend="torch")
    ref = fk.contrastive_loss(u, v, scale, labels, backend="reference")
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) < 1e-13
    (gs,) = torch.autograd.grad(loss, scale)
    (gr,) = torch.autograd.grad(ref, scale)
    assert gs.dtype == torch.float64 and abs(gs.item() - gr.item()) < 1e-13


# --- fp16: order of operations --------------------------------------------------------------------------------------


def _fp16_backends(op):
    return [b for b in runnable_backends(op, "cpu") if torch.float16 in fk.OPS[op].backends[b].dtypes]


def _assert_fp16_matches_float64(what, out, ref, grads, ref_grads):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-3 * scale + 1e-3, f"{what}: output off by {err:.3g} (max |ref| {scale:.3g})"
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        if b is None:
            continue
        assert torch.isfinite(a).all(), f"{what}: non-finite gradient {i}"
        err = (a.double() - b).abs().max().item()
        assert err <= 1e-2 * b.abs().max().item() + 1e-3, f"{what}: gradient {i} off by {err:.3g}"


@pytest.mark.parametrize("backend", _fp16_backends("window_attention"))
def test_window_attention_fp16_large_scores(backend):
    """The field report: a 7x7 map, one head, head_dim 32, q and k of magnitude ~48: q . k ~ 75,000 overflows fp16,
    scale q . k ~ 13,000 does not. Every backend matches float64."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 7, 7, 1, 32, generator=g, dtype=torch.float64)
    q = 48 * (base + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64))
    k = 48 * (base + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64))
    v = torch.randn(base.shape, generator=g, dtype=torch.float64)
    q, k, v = (t.half().double() for t in (q, k, v))  # representable in fp16
    assert (q * k).sum(-1).abs().max() > 65504

    def run(dt, be):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = fk.window_attention(*leaves, window_size=(7, 7), backend=be)
        out.backward(torch.ones_like(out))
        return out, [t.grad for t in leaves]

    ref, ref_grads = run(torch.float64, "reference")
    out, grads = run(torch.float16, backend)
    _assert_fp16_matches_float64(f"window_attention[{backend}] fp16", out, ref, grads, ref_grads)


@pytest.mark.parametrize("op", ["scale_aware_attention", "scale_task_attention"])
def test_dyhead_mean_of_large_terms_fp16(op):
    """Three terms near 30,000 with pi = 1: their sum overflows fp16, their mean fits."""
    g = torch.Generator().manual_seed(5)
    terms = [
        (30000 + 500 * torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)).half().double() for _ in range(3)
    ]
    for be in _fp16_backends(op):
        if op == "scale_aware_attention":  # weight and bias that saturate the hard sigmoid: pi = 1
            extra = [torch.full((4,), 0.01, dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64)]
        else:
            extra = [torch.ones(1, 3, dtype=torch.float64), torch.full((1, 16), 0.5, dtype=torch.float64)]

        def run(dt, be=be, extra=extra):
            leaves = [t.detach().to(dt).requires_grad_() for t in (*terms, *extra)]
            fn = fk.scale_aware_attention if op == "scale_aware_attention" else fk.scale_task_attention
            out = fn(leaves[:3], *leaves[3:], backend=be)
            out.backward(torch.full_like(out, 1e-3))
            return out, [t.grad for t in leaves]

        ref, ref_grads = run(torch.float64, "reference")
        out, grads = run(torch.float16, be)
        _assert_fp16_matches_float64(f"{op}[{be}] fp16", out, ref, grads[:3], ref_grads[:3])


@pytest.mark.parametrize("backend", [b for b in _fp16_backends("conv_embed") if b != "reference"])
def test_conv_embed_fp16_convolution_beyond_fp16_range(backend):
    """The convolution's output exceeds 65,504 while LayerNorm's fits: the fused op keeps it in fp32 (the literal
    reference, conv then layer_norm in fp16, overflows: not tested here)."""
    g = torch.Generator().manual_seed(6)
    x = (300 * torch.rand(1, 8, 6, 6, generator=g, dtype=torch.float64)).half().double()
    w = (30 * torch.rand(16, 8, 3, 3, generator=g, dtype=torch.float64)).half().double()

    def run(dt, be):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, w)]
        out = fk.conv_embed(leaves[0], leaves[1], None, None, None, stride=1, padding=1, backend=be)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dt))
        return out, [t.grad for t in leaves]

    ref, ref_grads = run(torch.float64, "reference")
    assert torch.nn.functional.conv2d(x, w, padding=1).abs().max() > 65504
    out, grads = run(torch.float16, backend)
    _assert_fp16_matches_float64(f"conv_embed[{backend}] fp16", out, ref, grads[:1], ref_grads[:1])


# Zero-size axes other than the batch: an empty output of the right shape and empty gradients, every backend.
ZERO_SIZE = [
    ("window_partition", "no channels", lambda: [_randn(None, 2, 3, 5, 7, 0)],
     lambda t, be: fk.window_partition(t[0], (2, 3, 3), (1, 1, 1), backend=be)),
    ("window_partition", "no rows", lambda: [_randn(None, 2, 3, 0, 7, 4)],
     lambda t, be: fk.window_partition(t[0], (2, 3, 3), (1, 1, 1), backend=be)),
    ("window_attention", "no heads", lambda: [_randn(None, 2, 3, 5, 7, 0, 16) for _ in range(3)],
     lambda t, be: fk.window_attention(t[0], t[1], t[2], window_size=(2, 3, 3), shift_size=(1, 1, 1), backend=be)),
    ("window_attention", "no rows", lambda: [_randn(None, 2, 3, 0, 7, 2, 16) for _ in range(3)],
     lambda t, be: fk.window_attention(t[0], t[1], t[2], window_size=(2, 3, 3), backend=be)),
    ("modulated_deform_conv2d", "no output channels",
     lambda: [_randn(None, 1, 4, 5, 5), _randn(None, 1, 18, 5, 5), _randn(None, 0, 4, 3, 3)],
     lambda t, be: fk.modulated_deform_conv2d(t[0], t[1], None, t[2], padding=1, backend=be)),
    ("dyrelu", "no channels", lambda: [_randn(None, 2, 0, 5, 5), _randn(None, 2, 0)],
     lambda t, be: fk.dyrelu(t[0], t[1], backend=be)),
    ("dyrelu", "no pixels", lambda: [_randn(None, 2, 3, 0, 5), _randn(None, 2, 12)],
     lambda t, be: fk.dyrelu(t[0], t[1], backend=be)),
]  # fmt: skip


@pytest.mark.parametrize(
    "op,what,make,call",
    [pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in ZERO_SIZE],
)
def test_zero_size_axes(op, what, make, call):
    for be in runnable_backends(op, "cpu"):
        leaves = [t.float().requires_grad_() for t in make()]
        out = call(leaves, be)
        assert out.numel() == 0, f"{op}[{be}] {what}: output {tuple(out.shape)}"
        out.sum().backward()
        for i, t in enumerate(leaves):
            assert t.grad is None or (t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0), (op, be, i)
