"""window_attention's geometry conventions and Swin V2's cosine attention.

The peers' own modules (torchvision's ShiftedWindowAttention, -V2 and -3d, timm's Swin and Swin V2 blocks) built
small, at many grid sizes, against the same modules patched onto each backend: output and every gradient. Then every
backend against the reference for the op itself in fp32/fp16/bf16 (FlashAttention's rule), and the argument errors.
"""

import pytest
import torch

import florence_kernels as fk
from florence_kernels.ops import window_conventions as wc
from florence_kernels.ops.window_attention import bias_table_rows
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import runnable_backends

tv_swin = pytest.importorskip("torchvision.models.swin_transformer")
tv_swin3d = pytest.importorskip("torchvision.models.video.swin_transformer")
timm_swin = pytest.importorskip("timm.models.swin_transformer")
timm_swin2 = pytest.importorskip("timm.models.swin_transformer_v2")

BACKENDS = [b for b in runnable_backends("window_attention", "cpu") if b != "reference"]
INTERPRETED = {"triton"}  # Triton under its interpreter on CPU: a few small grids only

# (H, W), window, shift: divisible, padding on one or both axes, maps smaller than the window, no shift
GRIDS_2D = [((6, 6), 3, 1), ((5, 7), 3, 1), ((7, 4), 3, 1), ((3, 4), 4, 2), ((9, 5), 4, 2), ((5, 5), 3, 0),
            ((11, 10), 7, 3)]  # fmt: skip
# (T, H, W), window, shift: padding on every axis, time shrinking, every axis shrinking (the truncated index)
GRIDS_3D = [((2, 6, 6), (2, 3, 3), (1, 1, 1)), ((3, 7, 5), (2, 3, 3), (1, 1, 2)), ((2, 5, 6), (4, 3, 3), (2, 1, 1)),
            ((4, 2, 5), (2, 3, 3), (1, 1, 1)), ((1, 3, 4), (2, 7, 7), (1, 3, 3))]  # fmt: skip


def _peer(kind, dim, nh, window, shift, hw):
    """A small peer module whose forward takes (B, [T,] H, W, C) and returns the attention output."""
    if kind == "tv":
        return tv_swin.ShiftedWindowAttention(dim, [window] * 2, [shift] * 2, nh)
    if kind == "tv_v2":
        m = tv_swin.ShiftedWindowAttentionV2(dim, [window] * 2, [shift] * 2, nh)
        with torch.no_grad():  # torchvision zeroes the k bias: give the other parts values
            m.qkv.bias.normal_()
            m.logit_scale[0] = 5.0  # one head above the log(100) cap
        return m
    if kind == "tv3d":
        return tv_swin3d.ShiftedWindowAttention3d(dim, list(window), list(shift), nh)
    block_cls = timm_swin.SwinTransformerBlock if kind == "timm" else timm_swin2.SwinTransformerV2Block
    block = block_cls(dim, hw, nh, window_size=window, shift_size=shift)
    if kind == "timm_v2":
        with torch.no_grad():
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
    return _BlockAttn(block)


class _BlockAttn(torch.nn.Module):
    """A timm block's attention path alone (timm's _attn, which the patch replaces)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block._attn(x)


def _grads(module, x, dtype):
    module = module.to(dtype)
    x = x.to(dtype).requires_grad_()
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [x, *params], g, allow_unused=True, materialize_grads=True)
    return [out, *grads]


def _check_peer(kind, grid, backend, dtype):
    size, window, shift = grid
    dim, nh = 8, 2
    hw = size if len(size) == 2 else size[1:]
    torch.manual_seed(0)
    module = _peer(kind, dim, nh, window, shift, hw).double().eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2 and p.shape[-1] == nh:  # relative position tables: not the default small init
                p.normal_()
    x = torch.randn(2, *size, dim, dtype=torch.float64)
    ref = _grads(module, x, torch.float64)
    plain = _grads(module, x, dtype) if dtype != torch.float64 else ref
    report = fk.patch(module, backend=backend)
    assert sum(report.patched.values()) == 1, str(report)
    try:
        got = _grads(module, x, dtype)
    except fk.BackendNotSupportedError as e:  # an explicit fused backend: only the named geometric refusals
        assert backend not in ("reference", "torch") and "convention" in str(e), str(e)
        return
    finally:
        fk.unpatch(module.double())
    names = ["output", "input grad", *[n for n, _ in module.named_parameters()]]
    for name, a, r, p in zip(names, got, ref, plain, strict=True):
        scale = r.abs().max().item() if r.numel() else 0.0
        if dtype == torch.float64:
            atol = 1e-12 * max(scale, 1.0)
            torch.testing.assert_close(a, r, rtol=1e-10, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            # logit_scale's gradient is one sum over every score of the module (B nW nh N^2 terms), computed by the
            # peer over the scores and here over q's elements (d(q m)/dm): fp32 summation error, so 10x the floor
            atol = (1e-4 if name.endswith("logit_scale") else 1e-5) * max(scale, 1.0)
            assert_close_to_reference(a, r, p, atol=atol, what=f"{kind} {backend} {name}")


@pytest.mark.parametrize("grid", GRIDS_2D, ids=lambda g: f"{g[0][0]}x{g[0][1]}-w{g[1]}-s{g[2]}")
@pytest.mark.parametrize("kind", ["tv", "tv_v2", "timm", "timm_v2"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_2d_peers_fp64(kind, grid, backend):
    _check_peer(kind, grid, backend, torch.float64)


@pytest.mark.parametrize("grid", GRIDS_3D, ids=lambda g: "x".join(map(str, g[0])) + "-w" + "".join(map(str, g[1])))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_video_swin_peer_fp64(grid, backend):
    _check_peer("tv3d", grid, backend, torch.float64)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("torch",)])
@pytest.mark.parametrize("kind", ["tv", "tv_v2", "timm", "timm_v2", "tv3d"])
def test_peers_on_fused_backends_fp32(kind, backend):
    grids = GRIDS_3D if kind == "tv3d" else GRIDS_2D
    if backend in INTERPRETED:
        grids = grids[1:3]
    for grid in grids:
        _check_peer(kind, grid, backend, torch.float32)


# --- the op: every backend against the reference ---------------------------------------------------------------------

CASES = [("timm", (1, 5, 7), (1, 3, 3), (0, 1, 1)), ("torchvision", (1, 3, 4), (1, 4, 4), (0, 2, 2)),
         ("torchvision3d", (3, 7, 5), (2, 3, 3), (1, 1, 2)), ("torchvision3d", (4, 2, 5), (2, 3, 3), (1, 1, 1)),
         ("florence", (2, 5, 6), (2, 3, 3), (1, 1, 1))]  # fmt: skip


def _op_leaves(conv, thw, window, cosine, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    nh, hd = 2, 16
    leaves = {n: torch.randn(2, *thw, nh, hd, generator=g) for n in "qkv"}
    leaves["table"] = torch.randn(bias_table_rows(window), nh, generator=g)
    if wc.CONVENTIONS[conv].padding == "zeros":
        leaves |= {f"pad_{n}": torch.randn(nh, hd, generator=g) for n in "qkv"}
    if cosine:
        leaves["logit_scale"] = torch.tensor([1.5, 5.0])
    return {n: t.to(dtype).requires_grad_() for n, t in leaves.items()}


def _op_run(leaves, conv, window, shift, backend):
    pad = tuple(leaves[f"pad_{n}"] for n in "qkv") if "pad_q" in leaves else None
    out = fk.window_attention(leaves["q"], leaves["k"], leaves["v"], window_size=window, shift_size=shift,
                              rel_pos_bias=leaves["table"], convention=conv, pad_token=pad,
                              logit_scale=leaves.get("logit_scale"), backend=backend)  # fmt: skip
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), g, allow_unused=True, materialize_grads=True)
    return [out, *grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cosine", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_backends_match_reference(case, cosine, dtype, backend):
    """FlashAttention's rule on the largest error over three seeds (16-bit: these grids have 35-150 tokens, and the
    largest error of one draw is noisy; V2's scores reach 100, where bf16 keeps 2-3 digits)."""
    conv, thw, window, shift = case
    if backend in INTERPRETED and dtype != torch.float32 and case != CASES[2]:
        pytest.skip("the interpreter is slow: 16-bit on one case")
    seeds = (1,) if dtype == torch.float32 or backend in INTERPRETED else (1, 2, 3)
    errors = {}
    for seed in seeds:
        leaves = _op_leaves(conv, thw, window, cosine, torch.float32, seed)
        ref = _op_run({n: t.detach().double().requires_grad_() for n, t in leaves.items()}, conv, window, shift,
                      "reference")  # fmt: skip
        plain = _op_run(_op_leaves(conv, thw, window, cosine, dtype, seed), conv, window, shift, "reference")
        try:
            got = _op_run(_op_leaves(conv, thw, window, cosine, dtype, seed), conv, window, shift, backend)
        except fk.BackendNotSupportedError as e:  # only the named geometric refusal (tested below) may skip
            assert backend != "torch" and "convention" in str(e), str(e)
            pytest.skip(f"{backend} does not take this geometry: {e}")
        for name, a, r, p in zip(["output", *leaves], got, ref, plain, strict=True):
            e = errors.setdefault(name, [0.0, 0.0, 0.0])
            e[0] = max(e[0], (a.double() - r).abs().max().item())
            e[1] = max(e[1], (p.double() - r).abs().max().item())
            e[2] = max(e[2], r.abs().max().item())
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for name, (err, err_plain, scale) in errors.items():
        allowed = 2 * err_plain + atol * max(1.0, scale)
        assert err <= allowed, f"{backend} {dtype} {name}: max |out - ref| = {err:.3e} > allowed {allowed:.3e}"


def test_fused_backends_refuse_by_name_and_automatic_choice_falls_back():
    """Where no arranged grid exists (a truncated index that differs from the coordinates), cpp names the reason and
    the automatic choice runs torch, exactly."""
    if "cpp" not in BACKENDS:
        pytest.skip("the extension is not built")
    L = _op_leaves("torchvision3d", (1, 3, 4), (2, 7, 7), False, torch.float32)
    with pytest.raises(fk.BackendNotSupportedError, match="truncated bias index"):
        _op_run(L, "torchvision3d", (2, 7, 7), (1, 3, 3), "cpp")
    auto = _op_run(L, "torchvision3d", (2, 7, 7), (1, 3, 3), None)
    torch_ = _op_run(L, "torchvision3d", (2, 7, 7), (1, 3, 3), "torch")
    for a, b in zip(auto, torch_, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_convention_is_unchanged_and_presets_agree_where_the_window_divides():
    """Without padding or shrinking (every axis larger than the window) every preset is the same attention."""
    L = _op_leaves("florence", (4, 6, 6), (2, 3, 3), False, torch.float64)
    base = _op_run(L, "florence", (2, 3, 3), (1, 1, 1), "torch")
    for conv in ("timm", "torchvision", "torchvision3d"):
        other = _op_run(L, conv, (2, 3, 3), (1, 1, 1), "torch")
        torch.testing.assert_close(other[0], base[0], rtol=1e-13, atol=1e-13)


def test_cosine_attention_literal_formula():
    """Swin V2: softmax(normalize(q) normalize(k)^T exp(min(s, log 100)) + table[index]) v in one window."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2, 2, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(bias_table_rows((1, 2, 2)), 2, generator=g, dtype=torch.float64)
    ls = torch.tensor([0.5, 9.0], dtype=torch.float64)
    out = fk.window_attention(q, k, v, window_size=(1, 2, 2), rel_pos_bias=table, logit_scale=ls, backend="torch")
    qn, kn = (torch.nn.functional.normalize(t.reshape(4, 2, 4).transpose(0, 1), dim=-1) for t in (q, k))
    index = wc.bias_index((1, 2, 2), (1, 2, 2), "coords", q.device)
    mult = torch.tensor([0.5, 4.605170185988092], dtype=torch.float64).exp().view(2, 1, 1)  # 9 clamped to log 100
    attn = (qn @ kn.transpose(-1, -2) * mult + table[index].permute(2, 0, 1)).softmax(-1)
    expected = (attn @ v.reshape(4, 2, 4).transpose(0, 1)).transpose(0, 1).reshape(out.shape)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_themselves():
    q = torch.randn(1, 5, 5, 2, 4)
    with pytest.raises(ValueError, match="convention"):
        fk.window_attention(q, q, q, window_size=3, convention="swin2")
    with pytest.raises(ValueError, match="pad_token.*masks padded tokens"):
        fk.window_attention(q, q, q, window_size=3, pad_token=(None, None, None))
    with pytest.raises(ValueError, match=r"pad_token\[k\]"):
        fk.window_attention(q, q, q, window_size=3, convention="timm", pad_token=(None, torch.zeros(3), None))
    with pytest.raises(ValueError, match="logit_scale: expected a tensor of num_heads=2"):
        fk.window_attention(q, q, q, window_size=3, logit_scale=torch.zeros(3))
    with pytest.raises(ValueError, match="convention.order"):
        bad = wc.WindowConvention("x", "roll", "mask", "swin", "coords")
        fk.window_attention(q, q, q, window_size=3, convention=bad)


def test_empty_batch_under_every_convention():
    q = torch.randn(0, 5, 7, 2, 4, requires_grad=True)
    for conv in wc.CONVENTIONS:
        out = fk.window_attention(q, q, q, window_size=3, shift_size=1, convention=conv, backend="torch")
        assert out.shape == q.shape
        out.sum().backward()
