"""florence_kernels.patch on the models people use: whole-model parity, patched against unpatched (logits, the input
gradient and every parameter gradient; fp64 on reference and torch, fp32 on the fused CPU kernel and the automatic
choice), at sizes the window divides and sizes it does not; unpatch; what is left alone; the drop-in signatures
(torchvision's deform_conv2d, mmdetection's DyHead) and open_clip's ClipLoss, in one process and on two gloo ranks."""

import functools
import warnings

import pytest
import torch
from torch import nn

import florence_kernels as fk
from florence_kernels.testing import assert_close_to_reference
from tests.conftest import requires, runnable_backends

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CPP = "cpp" in runnable_backends("window_attention", "cpu")


def _timm(name, size, **kw):
    return lambda: timm.create_model(name, pretrained=False, img_size=size, **kw), (1, 3, size, size)


# name -> (constructor, input shape). timm's Swin at 224 (the window divides every stage), 192 and 256 (it does
# not: padding, shifted), and window 6 at 224 (7 is not a multiple of 6); Swin V2 window 8 at 224 (stages 56, 28,
# 14, 7: padding and a shrunken last window); torchvision's swin_t at 224 and 192, swin_v2_t at 224 and 200, and
# swin3d_t on a short small clip (8 x 112 x 112: stage 4 is 4 x 4 with window 7, where torchvision truncates the index).
MODELS = {
    "timm-swin_tiny-224": _timm("swin_tiny_patch4_window7_224", 224),
    "timm-swin_tiny-192": _timm("swin_tiny_patch4_window7_224", 192),
    "timm-swin_tiny-256": _timm("swin_tiny_patch4_window7_224", 256),
    "timm-swin_tiny-224-window6": _timm("swin_tiny_patch4_window7_224", 224, window_size=6),
    "timm-swinv2_tiny-224-window8": _timm("swinv2_tiny_window8_256", 224),
    "tv-swin_t-224": (lambda: torchvision.models.swin_t(), (1, 3, 224, 224)),
    "tv-swin_t-192": (lambda: torchvision.models.swin_t(), (1, 3, 192, 192)),
    "tv-swin_v2_t-224": (lambda: torchvision.models.swin_v2_t(), (1, 3, 224, 224)),
    "tv-swin_v2_t-200": (lambda: torchvision.models.swin_v2_t(), (1, 3, 200, 200)),
    "tv-swin3d_t-8x112": (lambda: torchvision.models.video.swin3d_t(), (1, 3, 8, 112, 112)),
}
PATCHED_TYPES = {"timm-swin_tiny": "SwinTransformerBlock", "timm-swinv2": "SwinTransformerV2Block",
                 "tv-swin_t": "ShiftedWindowAttention", "tv-swin_v2_t": "ShiftedWindowAttentionV2",
                 "tv-swin3d_t": "ShiftedWindowAttention3d"}  # fmt: skip


@functools.lru_cache(maxsize=2)
def _model(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()  # eval: no stochastic depth or dropout, so both runs see the same function
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def _run(model, x, dtype):
    model = model.to(dtype)
    x = x.detach().to(dtype).requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"logits": out.detach(), "input grad": x.grad, **grads}


@functools.lru_cache(maxsize=4)
def _baseline(name, dtype):
    model, x = _model(name)
    return _run(model, x, dtype)


def _compare(name, backend, dtype):
    model, x = _model(name)
    ref = _baseline(name, torch.float64)
    plain = _baseline(name, dtype) if dtype != torch.float64 else ref
    report = fk.patch(model, backend=backend)
    kind = next(v for k, v in PATCHED_TYPES.items() if name.startswith(k))
    assert report.patched[kind] == 12 and not report.skipped, str(report)
    try:
        got = _run(model, x, dtype)
    finally:
        assert fk.unpatch(model) == 12
        model.double()
    assert got.keys() == ref.keys()
    for what in ref:
        r, a, p = ref[what], got[what], plain[what]
        scale = max(r.abs().max().item(), 1e-30)
        if dtype == torch.float64:
            err = (a - r).abs().max().item()
            assert err <= 1e-9 * scale, f"{name} {backend} {what}: max |patched - plain| {err:.3e}, scale {scale:.2e}"
        else:
            atol = (1e-4 if "logit_scale" in what else 1e-5) * scale  # logit_scale: one sum over every score
            assert_close_to_reference(a, r, p, atol=atol, what=f"{name} {backend} {what}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_parity_fp64(name, backend):
    _compare(name, backend, torch.float64)


@pytest.mark.parametrize("backend", (["cpp"] if CPP else []) + [None])
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_parity_fp32(name, backend):
    """cpp where its kernel takes the geometry; the automatic choice everywhere (cpp, else torch, per call)."""
    try:
        _compare(name, backend, torch.float32)
    except fk.BackendNotSupportedError as e:  # an explicit cpp on a stage whose geometry it cannot take
        assert backend == "cpp" and "convention" in str(e), str(e)
        pytest.skip(f"cpp refuses a stage of {name} by name: {str(e).splitlines()[-1].strip()}")


def test_unpatch_restores_bit_identical_outputs_and_state_dicts_never_change():
    model, x = _model("timm-swin_tiny-192")
    model.double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
        fk.patch(model)
        fk.patch(model)  # twice: harmless
        assert set(model.state_dict()) == set(before)
        y1 = model(x)
        blocks = [m for m in model.modules() if type(m).__name__ == "SwinTransformerBlock"]
        assert len(blocks) == 12 and all(fk.integrations.is_patched(b) and "_attn" in b.__dict__ for b in blocks)
        assert fk.unpatch(model) == 12
        assert not any(fk.integrations.is_patched(b) or "_attn" in b.__dict__ for b in blocks)
        y2 = model(x)
    assert torch.equal(y0, y2)
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_with_nothing_supported_is_returned_unchanged_with_a_message():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing to patch in Sequential"):
        report = fk.patch(model)
    assert not report and not report.patched
    assert "forward" not in model[0].__dict__
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fk.patch(lambda x: x)
    with pytest.raises(ValueError, match="libraries"):
        fk.patch(model, libraries=("mmdet",))


def test_subclasses_and_unsupported_variants_are_left_alone_by_name():
    class MyAttention(torchvision.models.swin_transformer.ShiftedWindowAttention):
        pass

    from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock

    model = nn.ModuleDict({"mine": MyAttention(8, [3, 3], [1, 1], 2),
                           "cr": SwinTransformerV2CrBlock(16, 2, feat_size=(6, 6), window_size=(3, 3))})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fk.patch(model)
    reasons = {path: why for path, _, why in report.skipped}
    assert "subclass of ShiftedWindowAttention" in reasons["mine"]
    assert "Swin V2 CR" in reasons["cr"]
    assert "left alone: mine (MyAttention)" in str(report)


def test_patch_per_library_entry_points_and_train_mode_dropout():
    from florence_kernels.integrations import timm as fk_timm
    from florence_kernels.integrations import torchvision as fk_tv

    m = torchvision.models.swin_t(dropout=0.1, attention_dropout=0.1)
    assert fk_timm.patch(m) is not None and not fk.integrations.is_patched(m.features[1][0].attn)
    assert fk_tv.patch(m).patched["ShiftedWindowAttention"] == 12
    m.train()
    out = m(torch.randn(2, 3, 64, 64))  # attention dropout: the torch backend, as torchvision draws it
    out.sum().backward()
    assert torch.isfinite(out).all()


# --- torchvision's DeformConv2d and deform_conv2d --------------------------------------------------------------------


class _DeformNet(nn.Module):
    """A model holding torchvision DeformConv2d layers: DCNv2 (mask) with 2 groups and 2 offset groups, and DCNv1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.offset = nn.Conv2d(8, 2 * 2 * 9, 3, padding=1)
        self.mask = nn.Conv2d(8, 2 * 9, 3, padding=1)
        self.dcn = torchvision.ops.DeformConv2d(8, 8, 3, padding=1, groups=2)
        self.offset2 = nn.Conv2d(8, 2 * 9, 3, stride=2, padding=1)
        self.dcn1 = torchvision.ops.DeformConv2d(8, 6, 3, stride=2, padding=2, dilation=2, bias=False)
        with torch.no_grad():
            self.offset.weight.mul_(30)  # offsets of a few pixels: fractional positions, some outside
            self.offset2.weight.mul_(30)

    def forward(self, x):
        h = self.stem(x)
        h = self.dcn(h, self.offset(h), self.mask(h).sigmoid())
        return self.dcn1(h, self.offset2(h))


@pytest.mark.parametrize("backend", ["reference", "torch", *(["cpp"] if CPP else [])])
def test_model_with_torchvision_deform_conv(backend):
    torch.manual_seed(0)
    model = _DeformNet().double()
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    ref = _run(model, x, torch.float64)
    assert fk.patch(model, backend=backend).patched["DeformConv2d"] == 2
    got = _run(model, x, torch.float64)
    fk.unpatch(model)
    for what in ref:
        torch.testing.assert_close(got[what], ref[what], rtol=1e-9, atol=1e-11, msg=lambda m, w=what: f"{w}: {m}")


def test_deform_conv2d_has_torchvision_signature():
    import inspect

    ours = list(inspect.signature(fk.deform_conv2d).parameters)
    theirs = list(inspect.signature(torchvision.ops.deform_conv2d).parameters)
    assert ours[: len(theirs)] == theirs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 7, 7, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    off = torch.randn(1, 18, 4, 4, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(1, 9, 4, 4, generator=g, dtype=torch.float64)
    for args in ((x, off, w), (x, off, w, b, (2, 2), (1, 1), (1, 1)), (x, off, w, b, (2, 2), (1, 1), (1, 1), mask)):
        if len(args) == 3:
            args = (x, torch.randn(1, 18, 5, 5, generator=g, dtype=torch.float64), w)
        torch.testing.assert_close(fk.deform_conv2d(*args), torchvision.ops.deform_conv2d(*args), rtol=1e-10,
                                   atol=1e-10)  # fmt: skip


# --- mmdetection's DyHead constructor --------------------------------------------------------------------------------


def test_dyhead_takes_mmdetections_constructor():
    head = fk.nn.DyHead(32, 16, 2, False)  # mmdet: DyHead(in_channels, out_channels, num_blocks, zero_init_offset)
    assert [b.in_channels for b in head.dyhead_blocks] == [32, 16]
    assert head.dyhead_blocks[0].spatial_conv_offset.weight.abs().sum() > 0  # zero_init_offset=False
    kw = fk.nn.DyHead(in_channels=16, out_channels=16, num_blocks=1, zero_init_offset=True, init_cfg=None)
    assert kw.dyhead_blocks[0].spatial_conv_offset.weight.abs().sum() == 0
    assert "dyhead_blocks.1.spatial_conv_mid.conv.weight" in head.state_dict()  # mmdetection's keys
    out = head((torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)))
    assert isinstance(out, tuple) and [o.shape[1] for o in out] == [16, 16]
    with pytest.raises(ValueError, match="out_channels: 24 is not a multiple of 16"):
        fk.nn.DyHead(32, 24)
    with pytest.raises(ValueError, match="x: expected a list or tuple"):
        head(torch.randn(1, 32, 8, 8))


# --- open_clip's ClipLoss --------------------------------------------------------------------------------------------


def _features(N=12, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(N, D, generator=g, dtype=dtype), torch.randn(N, D, generator=g, dtype=dtype)
    return torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)


def _loss_and_grads(loss_fn, u, v, scale, bias=None, **kw):
    u, v = u.clone().requires_grad_(), v.clone().requires_grad_()
    s = torch.tensor(scale, dtype=u.dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=u.dtype, requires_grad=True) if bias is not None else None
    out = loss_fn(u, v, s, *([b] if b is not None else []), **kw)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    return [loss.detach(), u.grad, v.grad, s.grad] + ([b.grad] if b is not None else [])


@requires("open_clip")
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_clip_loss_matches_open_clip_in_one_process(backend):
    import open_clip

    from florence_kernels.integrations.open_clip import ClipLoss

    u, v = _features()
    for kw in ({}, {"cache_labels": True}):
        ours, theirs = ClipLoss(**kw, backend=backend), open_clip.ClipLoss(**kw)
        for call in ({}, {"output_dict": True}):
            mine = _loss_and_grads(ours, u, v, 14.0, 0.5, **call)
            peer = _loss_and_grads(theirs, u, v, 14.0, 0.5, **call)
            for a, b in zip(mine, peer, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(ours.get_ground_truth(u.device, 12), theirs.get_ground_truth(u.device, 12))
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="world_size: 2 needs torch.distributed"):
        ClipLoss(rank=0, world_size=2)(u, v, torch.tensor(1.0))


def _clip_worker(rank, world, init, out_dir):
    import datetime

    import open_clip
    import torch.distributed as dist

    from florence_kernels.integrations.open_clip import ClipLoss

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        u, v = _features(12)
        n = 12 // world
        ul, vl = u[rank * n : (rank + 1) * n], v[rank * n : (rank + 1) * n]
        results = {}
        for local in (False, True):
            for with_grad in (False, True):
                kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world)
                results[(local, with_grad)] = (_loss_and_grads(ClipLoss(**kw), ul, vl, 9.0),
                                               _loss_and_grads(open_clip.ClipLoss(**kw), ul, vl, 9.0))  # fmt: skip
        torch.save(results, f"{out_dir}/clip{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@requires("open_clip")
def test_clip_loss_matches_open_clip_on_two_gloo_ranks(tmp_path, monkeypatch):
    """local_loss and gather_with_grad on and off: each rank's loss and gradients (features, scale) equal open_clip's
    on that rank."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_clip_worker, args=(2, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for mode, (ours, theirs) in torch.load(tmp_path / f"clip{rank}.pt").items():
            for what, a, b in zip(("loss", "du", "dv", "dscale"), ours, theirs, strict=True):
                label = f"rank {rank} (local_loss, gather_with_grad) {mode} {what}"
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=label: f"{w}: {m}")
