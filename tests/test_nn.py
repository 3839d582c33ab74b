"""florence_kernels.nn: timm parity of the T = 1 block, 3-D blocks on every backend against the reference, padding
modes, and a few training steps with fused and reference ops giving the same losses."""

import pytest
import torch

from florence_kernels.nn import SwinBlock3D, WindowAttention3D
from tests.conftest import runnable_backends

timm_swin = pytest.importorskip("timm.models.swin_transformer")
BACKENDS = [b for b in runnable_backends("window_attention", "cpu") if b != "reference"]


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("backend", BACKENDS + [None])
def test_timm_state_dict_loads_and_matches(shift, backend):
    torch.manual_seed(0)
    B, H, W, C, nh = 2, 14, 14, 32, 2
    ref = timm_swin.SwinTransformerBlock(C, (H, W), nh, window_size=7, shift_size=shift).eval()
    ours = SwinBlock3D(C, nh, window_size=(7, 7), shift_size=(shift, shift), backend=backend).eval()
    missing = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(B, H, W, C, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = ref(x), ours(x2)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
    for (na, pa), (nb, pb) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4, msg=f"grad {na}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad_mode", ["mask", "zeros"])
def test_3d_block_backends_agree_with_reference(backend, pad_mode):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 7, 5, 32)
    blocks = {}
    for name in ("reference", backend):
        torch.manual_seed(1)
        blocks[name] = SwinBlock3D(32, 2, window_size=(2, 3, 3), shift_size=(1, 1, 1), pad_mode=pad_mode,
                                   backend=name)  # fmt: skip
    outs = {}
    for name, blk in blocks.items():
        xi = x.clone().requires_grad_()
        out = blk(xi)
        out.square().sum().backward()
        outs[name] = (out, xi.grad, blk.attn.relative_position_bias_table.grad)
    for a, b in zip(outs[backend], outs["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pad_modes_differ_only_when_padding_exists():
    torch.manual_seed(0)
    blk = SwinBlock3D(16, 2, window_size=(2, 3, 3), shift_size=(1, 1, 1)).eval()
    x = torch.randn(1, 2, 6, 6, 16)
    with torch.no_grad():
        a = blk(x)
        blk.pad_mode = "zeros"
        torch.testing.assert_close(blk(x), a)  # divisible sizes: identical
        y = torch.randn(1, 3, 7, 5, 16)
        b = blk(y)
        blk.pad_mode = "mask"
        assert not torch.allclose(blk(y), b)


def test_zeros_pad_mode_is_video_swin_semantics():
    """pad_mode="zeros" equals padding the normed input and attending over the padded grid, then cropping."""
    torch.manual_seed(0)
    attn = WindowAttention3D(16, 2, (2, 3, 3)).eval()
    blk = SwinBlock3D(16, 2, window_size=(2, 3, 3), shift_size=(1, 1, 1), pad_mode="zeros").eval()
    blk.attn.load_state_dict(attn.state_dict())
    x = torch.randn(1, 3, 7, 5, 16)
    with torch.no_grad():
        xn = blk.norm1(x)
        padded = torch.nn.functional.pad(xn, (0, 0, 0, 1, 0, 2, 0, 1))
        expected = attn(padded, (1, 1, 1))[:, :3, :7, :5]
        torch.testing.assert_close(blk._attention(xn), expected)


def test_training_steps_match_reference_ops():
    """A small stack trained a few steps with fused and with reference ops gives the same losses (Liger)."""

    def train(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            SwinBlock3D(32, 2, (2, 4, 4), (0, 0, 0), backend=backend),
            SwinBlock3D(32, 2, (2, 4, 4), (1, 2, 2), backend=backend),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(2, 4, 8, 8, 32, generator=g)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref = train("reference")
    for backend in BACKENDS:
        assert train(backend) == pytest.approx(ref, rel=1e-5), backend


def test_bad_arguments():
    with pytest.raises(ValueError, match="pad_mode"):
        SwinBlock3D(16, 2, pad_mode="reflect")
    with pytest.raises(ValueError, match="dim: 15 is not divisible by num_heads 2"):
        WindowAttention3D(15, 2, (2, 3, 3))
    with pytest.raises(ValueError, match="shift_size"):
        SwinBlock3D(16, 2, window_size=(2, 3, 3), shift_size=(2, 1, 1))


# --- the chunked CPU MLP ---------------------------------------------------------------------------------------------


def _plain_mlp_grads(mlp, x, g):
    x = x.detach().clone().requires_grad_()
    mlp.chunked = False
    y = mlp(x)
    y.backward(g)
    mlp.chunked = True
    grads = [x.grad] + [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,chunk_bytes", [(37, 3 * 2**20), (1000, 4096 * 4), (1000, 333 * 4 * 16)])
def test_chunked_mlp_equals_plain_autograd(monkeypatch, rows, chunk_bytes, approximate):
    """Any chunking (one chunk, many, uneven) gives fc2(gelu(fc1(x))) and every gradient of plain autograd."""
    from florence_kernels import nn as fnn

    monkeypatch.setattr(fnn, "MLP_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    mlp = fnn.Mlp(16, 64, act_layer=lambda: torch.nn.GELU(approximate=approximate)).double()
    x = torch.randn(rows, 16, dtype=torch.float64)
    g = torch.randn(rows, 16, dtype=torch.float64)
    y_ref, grads_ref = _plain_mlp_grads(mlp, x, g)
    xi = x.clone().requires_grad_()
    assert mlp._use_chunked(xi)
    y = mlp(xi)
    y.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip([xi.grad] + [p.grad for p in mlp.parameters()], grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_chunked_mlp_gradcheck_and_frozen_weights():
    from florence_kernels.nn import _ChunkedMlp

    torch.manual_seed(0)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w2, b2 = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    assert torch.autograd.gradcheck(lambda *a: _ChunkedMlp.apply(*a, "none", 4), (x, *params))
    # Frozen weights: only the input gradient is computed, and it is the same.
    frozen = [t.detach() for t in params]
    (dx_all,) = torch.autograd.grad(_ChunkedMlp.apply(x, *params, "none", 4).sum(), x)
    (dx_frozen,) = torch.autograd.grad(_ChunkedMlp.apply(x, *frozen, "none", 4).sum(), x)
    torch.testing.assert_close(dx_frozen, dx_all)


def test_chunked_mlp_only_where_it_is_exact():
    from florence_kernels.nn import Mlp

    mlp = Mlp(8, 32, drop=0.1)
    x = torch.randn(4, 8)
    assert not mlp._use_chunked(x)  # training with dropout: plain path
    assert mlp.eval()._use_chunked(x)
    assert not mlp._use_chunked(x.half())
    assert not Mlp(8, 32, act_layer=torch.nn.ReLU)._use_chunked(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mlp._use_chunked(x)
    assert not SwinBlock3D(8, 2, (1, 3, 3), backend="reference").mlp._use_chunked(x)  # reference stays literal


def test_drop_path_training_matches_reference_block():
    """Stochastic depth with the in-place residual sums: same output and gradients as the reference block."""
    outs = {}
    for backend in ["reference"] + BACKENDS:
        torch.manual_seed(0)
        blk = SwinBlock3D(16, 2, (2, 3, 3), (1, 1, 1), drop_path=0.5, backend=backend).train()
        x = torch.randn(4, 2, 6, 6, 16, requires_grad=True)
        torch.manual_seed(1)
        y = blk(x)
        y.square().sum().backward()
        outs[backend] = (y, x.grad, blk.mlp.fc1.weight.grad)
    for backend in BACKENDS:
        for a, b in zip(outs[backend], outs["reference"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=backend)


# --- edges from the field (issue 13): empty batches, non-contiguous input, pyramid sizes, fk.nn -----------------------

MODULE_BACKENDS = [None, "reference", "torch", "cpp", "triton"]


def _modules(backend):
    """(name, module, input builder for a batch size): every module of florence_kernels.nn, on one backend."""
    from florence_kernels.nn import ConvEmbed, DyHead, DyHeadBlock, DyReLU, UniCLLoss

    torch.manual_seed(0)
    blk = DyHeadBlock(16, backend=backend)
    with torch.no_grad():
        blk.spatial_conv_offset.weight.normal_(0, 0.05)  # non-zero offsets
    return [
        ("SwinBlock3D-2d", SwinBlock3D(32, 2, (7, 7), (3, 3), backend=backend), lambda B: torch.randn(B, 10, 13, 32)),
        ("SwinBlock3D-3d", SwinBlock3D(32, 2, (2, 3, 3), (1, 1, 1), backend=backend),
         lambda B: torch.randn(B, 3, 5, 7, 32)),
        ("SwinBlock3D-zeros", SwinBlock3D(32, 2, (7, 7), (3, 3), pad_mode="zeros", backend=backend),
         lambda B: torch.randn(B, 10, 13, 32)),
        ("WindowAttention3D", WindowAttention3D(32, 2, (2, 3, 3), backend=backend),
         lambda B: torch.randn(B, 3, 5, 7, 32)),
        ("ConvEmbed", ConvEmbed(3, 16, 7, 4, 2, backend=backend), lambda B: torch.randn(B, 3, 17, 18)),
        ("ConvEmbed-3d", ConvEmbed(16, 32, (3, 3, 3), (1, 2, 2), (1, 1, 1), dims=3, backend=backend),
         lambda B: torch.randn(B, 3, 5, 6, 16)),
        ("DyReLU", DyReLU(16, backend=backend), lambda B: torch.randn(B, 16, 5, 6)),
        ("DyHeadBlock", blk, lambda B: [torch.randn(B, 16, 9, 10), torch.randn(B, 16, 5, 5), torch.randn(B, 16, 3, 3)]),
        ("DyHead", DyHead(16, num_blocks=2, backend=backend),
         lambda B: [torch.randn(B, 16, 6, 7), torch.randn(B, 16, 3, 4)]),
        ("UniCLLoss", UniCLLoss(backend=backend),
         lambda B: [torch.nn.functional.normalize(torch.randn(B, 8), dim=1) for _ in range(2)]),
    ]  # fmt: skip


def _call(module, inputs):
    from florence_kernels.nn import DyHead, DyHeadBlock, UniCLLoss

    if isinstance(module, UniCLLoss):
        return [module(*inputs)]
    if isinstance(module, (DyHead, DyHeadBlock)):
        return module(inputs)
    return [module(inputs)]


def _leaves(inputs):
    return inputs if isinstance(inputs, list) else [inputs]


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_modules_take_an_empty_batch(backend):
    """Every module, every backend: batch 0 gives empty outputs and empty input gradients; parameters get zero
    gradients (UniCLLoss: NaN, the mean over no pairs, as open_clip's ClipLoss)."""
    for name, module, make in _modules(backend):
        inputs = [t.requires_grad_() for t in _leaves(make(0))]
        outs = _call(module, inputs if isinstance(make(0), list) else inputs[0])
        total = 0
        for out in outs:
            if name == "UniCLLoss":
                assert torch.isnan(out), name
                total = total + out.nan_to_num(0.0)
            else:
                assert out.shape[0] == 0, f"{name}[{backend}]: output {tuple(out.shape)}"
                total = total + out.sum()
        total.backward()
        for t in inputs:
            assert t.grad is not None and t.grad.shape == t.shape, name
        for pname, p in module.named_parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{name}[{backend}] {pname}"


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_modules_take_non_contiguous_inputs(backend):
    for name, module, make in _modules(backend):
        if name == "UniCLLoss":
            continue
        module.eval()
        inputs = _leaves(make(2))
        moved = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in inputs]
        assert not moved[0].is_contiguous()
        plain = _call(module, inputs if isinstance(make(0), list) else inputs[0])
        other = _call(module, moved if isinstance(make(0), list) else moved[0])
        for a, b in zip(plain, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name}[{backend}]")


def test_dyhead_pyramid_sizes_are_checked_with_the_callers_shapes():
    """A floored pyramid (17 then 8) is refused naming the level the caller passed and the size it needs, not with
    an error about offsets the caller never gave."""
    from florence_kernels.nn import DyHead, DyHeadBlock

    blk = DyHeadBlock(16)
    with pytest.raises(ValueError, match=r"x\[1\]: level 1 is 8x8, expected 9x9.*x\[0\] is 17x17"):
        blk([torch.randn(1, 16, 17, 17), torch.randn(1, 16, 8, 8)])
    with pytest.raises(ValueError, match=r"x\[2\]: level 2 is 3x4, expected 3x3"):
        DyHead(16, num_blocks=1)([torch.randn(1, 16, 10, 10), torch.randn(1, 16, 5, 5), torch.randn(1, 16, 3, 4)])
    with pytest.raises(ValueError, match=r"x\[1\]: expected a \(B, C=16, H, W\) level, got \(1, 8, 5, 5\)"):
        blk([torch.randn(1, 16, 10, 10), torch.randn(1, 8, 5, 5)])
    with pytest.raises(ValueError, match=r"x\[1\]: expected batch 2"):
        blk([torch.randn(2, 16, 10, 10), torch.randn(1, 16, 5, 5)])
    with pytest.raises(ValueError, match=r"x: expected a non-empty list"):
        blk([])
    blk([torch.randn(1, 16, 17, 17), torch.randn(1, 16, 9, 9), torch.randn(1, 16, 5, 5)])  # ceil sizes: fine


def test_module_inputs_are_checked():
    from florence_kernels.nn import DyReLU

    with pytest.raises(
        ValueError, match=r"x: expected \(B, T, H, W, C\) or \(B, H, W, C\) with C = 32, got \(2, 7, 7, 16\)"
    ):
        SwinBlock3D(32, 2, (7, 7))(torch.randn(2, 7, 7, 16))
    with pytest.raises(ValueError, match=r"x: expected \(B, T, H, W, C=32\)"):
        WindowAttention3D(32, 2, (7, 7))(torch.randn(2, 7, 7, 32))
    with pytest.raises(ValueError, match=r"x: expected \(B, C=16, H, W\)"):
        DyReLU(16)(torch.randn(2, 8, 5, 5))


def test_nn_is_an_attribute_of_the_package():
    """`import florence_kernels as fk; fk.nn.SwinBlock3D` (as torch.nn after `import torch`), and the other
    submodules on first use."""
    import subprocess
    import sys

    code = ("import florence_kernels as fk; assert fk.nn.SwinBlock3D and fk.nn.DyHead; "
            "assert fk.testing.assert_close_to_reference and fk.gradcache")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("convention", ["timm", "torchvision3d"])
def test_block_convention_option_is_the_peers_geometry(convention):
    """SwinBlock3D(convention=...) at a size the window does not divide equals the peer's block with the same
    weights: timm's SwinTransformerBlock (2-D, 10 x 9 map, window 4, shift 2) and torchvision's SwinTransformerBlock3d
    (5 x 10 x 9 clip, window (2, 4, 4), shift (1, 2, 2))."""
    torch.manual_seed(0)
    if convention == "timm":
        peer = timm_swin.SwinTransformerBlock(32, (10, 9), 2, window_size=4, shift_size=2).double().eval()
        ours = SwinBlock3D(32, 2, window_size=(4, 4), shift_size=(2, 2), convention="timm").double().eval()
        ours.load_state_dict(peer.state_dict(), strict=False)
        x = torch.randn(2, 10, 9, 32, dtype=torch.float64)
    else:
        from torchvision.models.swin_transformer import SwinTransformerBlock
        from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

        peer = SwinTransformerBlock(32, 2, [2, 4, 4], [1, 2, 2], attn_layer=ShiftedWindowAttention3d).double().eval()
        ours = SwinBlock3D(32, 2, window_size=(2, 4, 4), shift_size=(1, 2, 2), convention="torchvision3d")
        sd = {k.replace("mlp.0", "mlp.fc1").replace("mlp.3", "mlp.fc2"): v for k, v in peer.state_dict().items()}
        ours.double().eval().load_state_dict(sd, strict=False)
        x = torch.randn(2, 5, 10, 9, 32, dtype=torch.float64)
    missing = [k for k in ours.state_dict() if k not in {**peer.state_dict()} and "mlp" not in k]
    assert not missing, missing
    for backend in ("reference", "torch"):
        ours.attn.backend = backend
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="convention: give convention"):
        SwinBlock3D(32, 2, pad_mode="zeros", convention="timm")
