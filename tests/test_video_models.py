"""Video CoSwin (florence.models.video): the equalities inflation gives on a clip of one repeated frame (stated in
the module docstring), the relative-position table's inflation and resize, inflation's errors, every config forward
and backward in fp32 and bf16, fused backends against the reference backend, activation checkpointing, the I3D
classifier and the Florence video tower."""

import os

import pytest
import torch
import torch.nn.functional as F

import florence
from florence.models import (
    FlorenceVideo,
    VideoClassifier,
    VideoCoSwin,
    create_coswin,
    create_video_coswin,
    list_models,
    load_florence,
)
from florence.models.video import default_video_windows, inflate_table
from tests.conftest import runnable_backends

EXTENDED = os.environ.get("FLORENCE_RUN_EXTENDED_TESTS") == "1"


def _pair(backend="torch", window_size=None):
    torch.manual_seed(0)
    img = create_coswin("coswin_cpu_demo", backend=backend).eval()
    return img, VideoCoSwin.from_image(img, window_size=window_size, backend=backend).eval()


@torch.no_grad()
def test_inflation_on_a_repeated_frame_clip_gives_the_image_model_where_the_docstring_says():
    img, vid = _pair()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    clip = x.unsqueeze(2).expand(-1, -1, 8, -1, -1)
    # 1. the stem: every time slice is the 2-D stem's tokens
    s2, s3 = img.embeds[0](x, input_layout="channels_first"), vid.embeds[0](clip, input_layout="channels_first")
    assert s3.shape == (2, 4, 16, 16, 32)
    torch.testing.assert_close(s3, s2.unsqueeze(1).expand_as(s3), rtol=1e-5, atol=1e-5)
    # 2. stage 1 (3-D shifted windows, tables tiled over time): every slice is the image model's stage 1
    o2, o3 = img.stages[0](s2), vid.stages[0](s3)
    torch.testing.assert_close(o3, o2.unsqueeze(1).expand_as(o3), rtol=1e-5, atol=1e-5)
    # 3. the merge: equal away from the temporal ends; the end slices' convolution carries 2/3 of the kernel
    m2, m3 = img.embeds[1](o2, input_layout="channels_last"), vid.embeds[1](o3, input_layout="channels_last")
    torch.testing.assert_close(m3[:, 1:-1], m2.unsqueeze(1).expand_as(m3[:, 1:-1]), rtol=1e-4, atol=1e-4)
    assert (m3[:, 0] - m2).abs().max() > 1e-2 and (m3[:, -1] - m2).abs().max() > 1e-2
    w3, w2 = vid.embeds[1].proj, img.embeds[1].proj
    c3 = F.conv3d(o3.permute(0, 4, 1, 2, 3), w3.weight, None, w3.stride, w3.padding)
    c2 = F.conv2d(o2.permute(0, 3, 1, 2), w2.weight, None, w2.stride, w2.padding)
    torch.testing.assert_close(c3[:, :, 0], c2 * 2 / 3, rtol=1e-4, atol=1e-5)
    # beyond: attention mixes the end slices in; the pooled features stay close (measured cosine 0.9994)
    cos = F.cosine_similarity(vid.forward_features(clip), img.forward_features(x))
    assert cos.min() > 0.99


def test_table_inflation_tiles_every_temporal_offset_and_resizes_bicubically():
    t2 = torch.randn(49, 3)  # window 4: (2*4-1)^2 rows
    t3 = inflate_table(t2, 4, (3, 4, 4))
    assert t3.shape == (5 * 49, 3)
    for dt in range(5):
        torch.testing.assert_close(t3[dt * 49 : (dt + 1) * 49], t2, rtol=0, atol=0)
    big = inflate_table(t2, (4, 4), (2, 6, 6))
    grid = F.interpolate(t2.T.reshape(1, 3, 7, 7), size=(11, 11), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big, grid.reshape(3, 121).T.repeat(3, 1))
    with pytest.raises(ValueError, match="rows do not fit the image window"):
        inflate_table(t2, 5, (2, 5, 5))
    _, vid = _pair(window_size=[(2, 6, 6), (2, 6, 6), (2, 4, 4), (2, 4, 4)])  # resized stages load and run
    assert vid.stages[0].blocks[0].attn.relative_position_bias_table.shape == (3 * 121, 1)
    assert vid(torch.randn(1, 3, 4, 64, 64)).shape == (1, 256)


def test_inflation_names_missing_unexpected_and_mis_shaped_weights():
    img, _ = _pair()
    state = img.state_dict()
    VideoCoSwin.from_image(state, config=img.config)  # the image-only pyramid norms are dropped by name
    with pytest.raises(ValueError, match="unexpected: head.weight"):
        VideoCoSwin.from_image(state | {"head.weight": torch.zeros(1)}, config=img.config)
    del state["stages.0.blocks.0.norm1.weight"]
    with pytest.raises(ValueError, match="missing: stages.0.blocks.0.norm1.weight"):
        VideoCoSwin.from_image(state, config=img.config)
    with pytest.raises(ValueError, match="config: a state dict needs"):
        VideoCoSwin.from_image(img.state_dict())
    other = create_coswin("coswin_cpu_test")
    with pytest.raises(ValueError, match="shape mismatch"):
        VideoCoSwin.from_image(other.state_dict(), config=img.config)


# tiny, small, base and huge differ from cpu_demo in width, depth and window only (the same modules and code paths):
# they run with FLORENCE_RUN_EXTENDED_TESTS=1 (tiny 35 s, base 100 s here in fp32 + bf16, which this CPU emulates).
SIZES = [n[len("florence_") :] for n in list_models() if EXTENDED or n.endswith(("cpu_test", "cpu_demo"))]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_config_forward_and_backward(size, dtype):
    torch.manual_seed(0)
    model = create_video_coswin(f"video_coswin_{size}", drop_path_rate=0.0)
    windows = [w[1] for w in model.window_sizes]
    assert model.window_sizes == default_video_windows(windows)
    clip = torch.randn(1, 3, 4, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        feats = model.forward_features(clip)
        tokens = model.forward_tokens(clip)
    assert feats.shape == (1, model.num_features) and tokens.shape == (1, 2, 2, 2, model.num_features)
    assert feats.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    feats.float().square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", [b for b in runnable_backends("window_attention", "cpu") if b != "reference"])
def test_fused_backends_match_the_reference_backend(backend):
    """Features and every parameter gradient of a tiny Video CoSwin (the interpreter runs triton here): fused fp32
    against the reference fp32 and float64 by KERNELS.md's rule (at most twice the fp32 reference's error)."""
    from florence_kernels.testing import assert_close_to_reference

    torch.manual_seed(0)
    ref = create_video_coswin("video_coswin_cpu_test", drop_path_rate=0.0, backend="reference")
    models = {"fused": VideoCoSwin(**_cfg(ref), backend=backend), "reference": ref,
              "ref64": VideoCoSwin(**_cfg(ref), backend="reference").double()}  # fmt: skip
    for m in models.values():
        m.load_state_dict(ref.state_dict())
    clip = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # stage 1: 2x4x4, shifted
    outs = {}
    for name, m in models.items():
        x = clip.double() if name == "ref64" else clip
        f = m.forward_features(x)
        f.square().sum().backward()
        outs[name] = [f] + [p.grad for p in m.parameters()]
    for i, (a, b, c) in enumerate(zip(outs["fused"], outs["reference"], outs["ref64"], strict=True)):
        assert_close_to_reference(a, c, b, atol=1e-6, what=f"feature/gradient {i}")


def _cfg(model):
    c = dict(model.config)
    c["window_size"] = [tuple(w) for w in c["window_size"]]
    return c


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = create_video_coswin("video_coswin_cpu_test", drop_path_rate=0.0)
    b = VideoCoSwin(**_cfg(a))
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    clip = torch.randn(2, 3, 4, 32, 32)
    for m in (a, b):
        m.forward_features(clip).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_classifier_and_clear_errors():
    backbone = create_video_coswin("video_coswin_cpu_test")
    model = VideoClassifier(backbone, 40, dropout=0.5)
    assert model(torch.randn(3, 3, 4, 32, 32)).shape == (3, 40)
    assert "head.bias" in model.no_weight_decay_names() and "head.weight" not in model.no_weight_decay_names()
    with pytest.raises(ValueError, match="num_classes"):
        VideoClassifier(backbone, 0)
    with pytest.raises(ValueError, match=r"video: expected \(B, 3, T, H, W\)"):
        backbone(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="fewer than the stem's temporal kernel"):
        backbone(torch.randn(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match="window_size"):
        VideoCoSwin(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=[(2, 4, 4)])
    with pytest.raises(ValueError, match="video_coswin_<size>"):
        create_video_coswin("coswin_tiny")
    assert model(torch.randn(0, 3, 4, 32, 32)).shape == (0, 40)


@torch.no_grad()
def test_florence_video_tower_shares_the_text_space(tmp_path):
    torch.manual_seed(0)
    image_model = florence.create_model("florence_cpu_demo").eval()
    image_model.save_pretrained(str(tmp_path / "pre"))
    loaded = load_florence(str(tmp_path / "pre"))
    video_model = FlorenceVideo.from_florence(loaded).eval()
    x = torch.randn(2, 3, 64, 64)
    v = video_model.encode_video(x.unsqueeze(2).expand(-1, -1, 8, -1, -1))
    assert v.shape == (2, image_model.embed_dim)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    assert F.cosine_similarity(v, image_model.encode_image(x)).min() > 0.99  # a still clip ~ its frame
    tokens = florence.random_token_ids(2, 32, length=6)
    torch.testing.assert_close(video_model.encode_text(tokens), image_model.encode_text(tokens))
    torch.testing.assert_close(video_model.scale(), image_model.scale())
    with pytest.raises(FileNotFoundError, match="neither a save_pretrained folder"):
        load_florence(str(tmp_path))
