"""Video CoSwin, Florence's temporal adapter (../shared/SPEC.md section 6; Florence, Yuan et al. 2021, section 3.3),
and the models built on it.

Architecture (clips channels-first (B, 3, T, H, W) in, tokens channels-last (B, T, H, W, C) inside):
Conv3d stem (kernel (2, 7, 7), stride (2, 4, 4), pad (0, 2, 2)) + LayerNorm -> stage 1 -> [overlapping Conv3d
patch merging (kernel (3, 3, 3), stride (1, 2, 2), pad (1, 1, 1): time is not downsampled) + LayerNorm -> stage i]
... -> LayerNorm -> average pool over (T, H, W). All convolutional embeddings are ``florence_kernels.nn.ConvEmbed
(dims=3)``; the stages are Video Swin blocks (``SwinBlock3D``: 3-D shifted windows, shift = window // 2 on every
axis in every other block, Swin's shrink rule per axis) on the fused 3-D window attention. Window sizes are dynamic:
one (Wt, Wh, Ww) per stage, small early and large late (the paper's memory saving; default (2, w, w), (4, w, w),
(8, w, w), (8, w, w) with w the image model's window).

Inflation (:meth:`VideoCoSwin.from_image`, Florence's recipe, Video Swin's ``inflate_weights`` for the table): every
convolution kernel (C_out, C_in, kh, kw) is repeated over its temporal size kt and divided by kt; each stage's 2-D
relative position table is repeated for every temporal offset (the 3-D index is dt (2Wh-1)(2Ww-1) + spatial, so the
3-D table is the 2-D one tiled 2Wt-1 times), resized bicubically first where the spatial window differs from the
image model's; every other weight is copied. What this gives exactly, on a clip of one frame repeated (T even):

1. the stem's tokens on every time slice equal the 2-D stem's tokens of that frame (each slice sums kt frames with
   weight 1/kt; the stem has no temporal padding);
2. stage 1's output on every time slice equals the image model's stage-1 output (a token's keys are repeated the same
   number of times over time in every window and shifted-window region, with the same bias, so softmax weights
   are the 2-D weights; needs the same spatial window, i.e. no table resize);
3. a merge's output equals the 2-D merge's on every time slice at least one slice away from the ends of the clip;
   the first and last slices see the zero temporal padding (2/3 of the kernel's mass, 1/3 for a single slice).
   Attention in the next stage mixes those slices into the rest, so later stages and the pooled feature are close
   to, not equal to, the image model's (tests measure the distance).

:class:`VideoClassifier` adds an I3D-style head (average pool, dropout, linear; Video Swin's ``I3DHead``) for
fine-tuning; :class:`FlorenceVideo` puts Video CoSwin beside Florence's text tower with the image projection and
logit scale inherited, so ``encode_video`` lands in the text's embedding space (zero-shot video classification).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from florence_kernels.nn import ConvEmbed

from .coswin import CoSwin, CoSwinStage, _init_weights

STEM = {"kernel_size": (2, 7, 7), "stride": (2, 4, 4), "padding": (0, 2, 2)}
MERGE = {"kernel_size": (3, 3, 3), "stride": (1, 2, 2), "padding": (1, 1, 1)}
# image-model weights with no video counterpart: dropped by inflation (named here, so anything else is an error)
IMAGE_ONLY = re.compile(r"^pyramid_norms\.")


def default_video_windows(image_windows: Sequence[int], temporal: Sequence[int] = (2, 4, 8, 8)) -> list[tuple]:
    """The dynamic per-stage windows for an image model's windows: (2, w, w), (4, w, w), (8, w, w), (8, w, w)."""
    t = list(temporal) + [temporal[-1]] * max(len(image_windows) - len(temporal), 0)
    return [(int(t[i]), int(w), int(w)) for i, w in enumerate(image_windows)]


def _triples(window_size, n: int) -> list[tuple[int, int, int]]:
    """An int (cube), one (Wt, Wh, Ww) for every stage, or one triple per stage -> n triples."""
    try:
        if isinstance(window_size, int):
            ws = [(window_size,) * 3] * n
        elif all(isinstance(v, int) for v in window_size):
            ws = [tuple(window_size)] * n
        else:
            ws = [tuple(int(v) for v in w) for w in window_size]
    except TypeError:
        ws = []
    if len(ws) != n or any(len(w) != 3 or min(w) < 1 for w in ws):
        raise ValueError(f"window_size: expected one (Wt, Wh, Ww) of positive ints per stage ({n} stages), one "
                         f"triple for all or an int, got {window_size!r}")  # fmt: skip
    return ws


class VideoCoSwin(nn.Module):
    """The Video CoSwin encoder.

    Args:
        embed_dim, depths, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate, in_chans: as CoSwin.
        window_size: one (Wt, Wh, Ww) per stage (dynamic window sizes), one triple for all, or an int for cubes.
        stem, merge: Conv3d ``{"kernel_size", "stride", "padding"}`` of the tokeniser and of the patch merges
            (defaults: module constants STEM and MERGE, the paper's choice).
        backend: passed to every op (3-D window attention, 3-D conv embedding); None chooses per device.

    ``forward_features(video)``: (B, 3, T, H, W) float -> (B, num_features) (final LayerNorm, mean over T, H, W);
    ``forward_tokens(video)`` -> (B, T', H', W', C) final tokens after the LayerNorm; ``forward_stages(video)`` -> every
    stage's (B, T', H_i, W_i, C_i) output. T' = (T - 2) // 2 + 1 with the default stem; H_i = H / 2^(i+2).
    Raises ValueError for a clip that is not (B, in_chans, T, H, W) or shorter than the stem's temporal kernel.
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size=((2, 7, 7), (4, 7, 7), (8, 7, 7), (8, 7, 7)),
                 in_chans: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, stem: dict | None = None, merge: dict | None = None,
                 backend: str | None = None):  # fmt: skip
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads}: expected one entry per stage, equally many")
        windows = _triples(window_size, len(depths))
        dims = [embed_dim * 2**i for i in range(len(depths))]
        for i, (d, h) in enumerate(zip(dims, num_heads, strict=True)):
            if d % h:
                raise ValueError(f"num_heads[{i}] = {h} does not divide stage {i + 1}'s {d} channels")
        stem, merge = dict(STEM, **(stem or {})), dict(MERGE, **(merge or {}))
        self.depths, self.num_heads, self.window_sizes, self.dims = depths, num_heads, windows, dims
        self.num_features, self.backend = dims[-1], backend
        self.config = {"embed_dim": embed_dim, "depths": list(depths), "num_heads": list(num_heads),
                       "window_size": [list(w) for w in windows], "in_chans": in_chans, "mlp_ratio": mlp_ratio,
                       "drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate,
                       "stem": {k: list(v) for k, v in stem.items()},
                       "merge": {k: list(v) for k, v in merge.items()}}  # fmt: skip
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.embeds, self.stages = nn.ModuleList(), nn.ModuleList()
        for i, depth in enumerate(depths):
            c_in, conv = (in_chans, stem) if i == 0 else (dims[i - 1], merge)
            self.embeds.append(ConvEmbed(c_in, dims[i], conv["kernel_size"], conv["stride"], conv["padding"], dims=3,
                                         backend=backend))  # fmt: skip
            start = sum(depths[:i])
            self.stages.append(CoSwinStage(dims[i], depth, num_heads[i], windows[i], rates[start : start + depth],
                                           mlp_ratio, drop_rate, attn_drop_rate, backend))  # fmt: skip
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _check(self, video: torch.Tensor) -> None:
        c_in, kt = self.embeds[0].proj.in_channels, self.embeds[0].proj.kernel_size[0]
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != c_in:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video: expected (B, {c_in}, T, H, W) channels-first clips, got {got}")
        if video.shape[2] < kt:
            raise ValueError(f"video: T = {video.shape[2]} frames is fewer than the stem's temporal kernel {kt}")

    def forward_stages(self, video: torch.Tensor) -> list[torch.Tensor]:
        self._check(video)
        x, out = video, []
        for i, (embed, stage) in enumerate(zip(self.embeds, self.stages, strict=True)):
            x = stage(embed(x, input_layout="channels_first" if i == 0 else "channels_last"))
            out.append(x)
        return out

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_stages(video)[-1])

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(video).mean(dim=(1, 2, 3))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_features(video)

    # --- inflation ------------------------------------------------------------------------------------------------

    @classmethod
    def from_image(cls, image, config: dict | None = None, window_size=None, **overrides) -> VideoCoSwin:
        """A Video CoSwin inflated from an image CoSwin (Florence's inflation; see the module docstring).

        image: a :class:`CoSwin`, or a CoSwin state dict with ``config`` (CoSwin's keyword arguments; a CoSwin's
        ``.config``). window_size: the video windows (default :func:`default_video_windows` of the image windows).
        overrides: any other VideoCoSwin argument (drop_path_rate, backend, stem, merge, ...). Architecture
        arguments (embed_dim, depths, num_heads, in_chans, mlp_ratio) come from the image model.
        Raises ValueError naming every missing, unexpected or mis-shaped weight.
        """
        if isinstance(image, CoSwin):
            config, state = image.config, image.state_dict()
        elif isinstance(image, dict):
            if config is None:
                raise ValueError("config: a state dict needs the image model's CoSwin config (CoSwin(...).config)")
            state = image
        else:
            raise TypeError(f"image: expected a CoSwin or its state dict, got {type(image).__name__}")
        arch = {k: config[k] for k in ("embed_dim", "depths", "num_heads", "in_chans", "mlp_ratio") if k in config}
        img_windows = config.get("window_size", 7)
        img_windows = [img_windows] * len(arch["depths"]) if isinstance(img_windows, int) else list(img_windows)
        model = cls(**arch, window_size=window_size or default_video_windows(img_windows), **overrides)
        model.load_state_dict(inflate_coswin_state_dict(state, model, img_windows))
        return model


def inflate_table(table: torch.Tensor, image_window: Sequence[int], video_window: Sequence[int]) -> torch.Tensor:
    """A 2-D relative position table ((2Wh-1)(2Ww-1), heads) -> the 3-D one ((2Wt-1)(2Wh'-1)(2Ww'-1), heads):
    resized bicubically (align_corners False, as Video Swin's inflate_weights) where (Wh', Ww') differs from the
    image window, then repeated for every temporal offset. Raises ValueError on a table of the wrong size."""
    wh, ww = (image_window, image_window) if isinstance(image_window, int) else tuple(image_window)
    wt, wh2, ww2 = video_window
    rows, heads = table.shape
    if rows != (2 * wh - 1) * (2 * ww - 1):
        raise ValueError(f"table: {rows} rows do not fit the image window {wh}x{ww} ((2Wh-1)(2Ww-1) = "
                         f"{(2 * wh - 1) * (2 * ww - 1)})")  # fmt: skip
    if (wh2, ww2) != (wh, ww):
        grid = table.T.reshape(1, heads, 2 * wh - 1, 2 * ww - 1).float()
        grid = F.interpolate(grid, size=(2 * wh2 - 1, 2 * ww2 - 1), mode="bicubic", align_corners=False)
        table = grid.reshape(heads, -1).T.to(table.dtype)
    return table.repeat(2 * wt - 1, 1).contiguous()


def inflate_coswin_state_dict(state: dict, video: VideoCoSwin, image_windows: Sequence[int]) -> dict:
    """The image CoSwin's ``state`` mapped onto ``video``'s keys (Florence's inflation). Raises ValueError naming
    missing, unexpected (other than the image-only pyramid norms) and mis-shaped weights."""
    own = video.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not IMAGE_ONLY.match(k))
    out, shapes = {}, []
    for key, target in own.items():
        if key not in state:
            continue
        value = state[key]
        if key.endswith("relative_position_bias_table"):
            stage = int(key.split(".")[1])
            try:
                value = inflate_table(value, image_windows[stage], video.window_sizes[stage])
            except ValueError as e:
                shapes.append(f"{key}: {e}")
                continue
        elif value.dim() == 4 and target.dim() == 5:  # a convolution kernel
            kt = target.shape[2]
            value = value.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
        if tuple(value.shape) != tuple(target.shape):
            shapes.append(
                f"{key}: image {tuple(state[key].shape)} -> {tuple(value.shape)}, video {tuple(target.shape)}"
            )
            continue
        out[key] = value.to(target.dtype)
    if missing or unexpected or shapes:
        parts = [f"{what}: " + ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]  # fmt: skip
        raise ValueError("inflation: the image state dict does not match the video model: " + "; ".join(parts))
    return out


class VideoClassifier(nn.Module):
    """Video CoSwin + I3D-style head (Video Swin's I3DHead): average pool, dropout, linear to ``num_classes``.

    forward(video (B, 3, T, H, W) float) -> logits (B, num_classes). The head is initialised N(0, 0.01), bias 0.
    """

    def __init__(self, backbone: VideoCoSwin, num_classes: int, dropout: float = 0.5):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone.forward_features(video)))

    def no_weight_decay_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.dim() <= 1 or "relative_position_bias_table" in n}


class FlorenceVideo(nn.Module):
    """Florence with a video tower: Video CoSwin inflated from Florence's CoSwin, Florence's text tower, the image
    projection (as the video projection) and logit scale, all inherited.

    ``encode_video(video (B, 3, T, H, W))`` -> (B, D) and ``encode_text(tokens (B, L))`` -> (B, D), unit-norm, in one
    embedding space: zero-shot video classification uses ``florence.eval.zero_shot_classifier`` on this model as on
    an image model. Build with :meth:`from_florence`.
    """

    def __init__(self, visual: VideoCoSwin, text: nn.Module, video_projection: nn.Linear,
                 text_projection: nn.Linear, logit_scale: torch.Tensor, max_logit_scale: float):  # fmt: skip
        super().__init__()
        self.visual, self.text = visual, text
        self.video_projection, self.text_projection = video_projection, text_projection
        self.logit_scale = nn.Parameter(logit_scale.detach().clone())
        self.max_logit_scale = max_logit_scale

    @classmethod
    def from_florence(cls, florence, window_size=None, **video_overrides) -> FlorenceVideo:
        """Inflate ``florence`` (a :class:`florence.models.Florence`); its modules are copied, not shared."""
        visual = VideoCoSwin.from_image(florence.visual, window_size=window_size, **video_overrides)
        return cls(visual, copy.deepcopy(florence.text), copy.deepcopy(florence.image_projection),
                   copy.deepcopy(florence.text_projection), florence.logit_scale, florence.max_logit_scale)  # fmt: skip

    def encode_video(self, video: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.video_projection(self.visual.forward_features(video))
        return F.normalize(x, dim=-1) if normalize else x

    encode_image = encode_video  # what florence.eval's helpers call on the visual side

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_projection(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_logit_scale).exp().squeeze(0)

    def forward(self, video: torch.Tensor, tokens: torch.Tensor):
        return self.encode_video(video), self.encode_text(tokens), self.scale()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def create_video_coswin(name: str, **overrides) -> VideoCoSwin:
    """A freshly initialised Video CoSwin: "video_coswin_<size>" is the vision config of "florence_<size>" with the
    default dynamic windows (:func:`default_video_windows` of its windows); ``overrides`` as VideoCoSwin's."""
    from .factory import get_config, list_models

    prefix = "video_coswin_"
    if not name.startswith(prefix):
        raise ValueError(f"Video CoSwin name {name!r}: expected video_coswin_<size>, sizes "
                         f"{[n[len('florence_'):] for n in list_models()]}")  # fmt: skip
    vision = get_config("florence_" + name[len(prefix) :])["vision"]
    windows = vision.pop("window_size", 7)
    windows = [windows] * len(vision["depths"]) if isinstance(windows, int) else windows
    vision["window_size"] = default_video_windows(windows)
    return VideoCoSwin(**(vision | overrides))


def load_florence(path: str, map_location: str | torch.device = "cpu", **overrides):
    """A pretrained :class:`florence.models.Florence` from ``path``: a ``save_pretrained`` folder (config.json +
    model.safetensors), or a ``florence.train`` checkpoint: its run folder, its ``checkpoints`` folder or one tag
    folder (``.../checkpoints/step0000400``), any ZeRO stage. The architecture comes from the run's config.json
    (model name and overrides). Raises FileNotFoundError for a path that is neither, ValueError for weights that do
    not match the architecture (naming the keys)."""
    import json
    import os

    from .factory import create_model
    from .florence import CONFIG_NAME, WEIGHTS_NAME, Florence, load_state_dict_strict

    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return Florence.from_pretrained(path, map_location=map_location, **overrides)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest"), encoding="utf-8") as f:
            path = os.path.join(path, f.read().strip())
    ckpt_dir, tag = os.path.split(path)
    run_cfg = os.path.join(os.path.dirname(ckpt_dir), CONFIG_NAME)
    states = os.path.join(path, "mp_rank_00_model_states.pt")  # ZeRO 0-2 (ZeRO-3: zero_pp_rank_*_mp_rank_00_...)
    zero3 = os.path.isdir(path) and any(f.startswith("zero_pp_rank_") for f in os.listdir(path))
    if not ((os.path.isfile(states) or zero3) and os.path.isfile(run_cfg)):
        raise FileNotFoundError(f"path: {path} is neither a save_pretrained folder ({WEIGHTS_NAME} + {CONFIG_NAME}) "
                                "nor a florence.train run, checkpoints folder or checkpoint tag")  # fmt: skip
    with open(run_cfg, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("task", "pretrain") != "pretrain":
        raise ValueError(f"path: {path} is a checkpoint of task {cfg['task']!r}; --init takes a pretrained Florence")
    model = create_model(cfg["model"], **(cfg.get("model_overrides") or {}), **overrides)
    if zero3:  # the parameters live in the ranks' partitions: DeepSpeed's own consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:
        module = torch.load(states, map_location=map_location, weights_only=False)["module"]
    state = {k[len("model.") :]: v for k, v in module.items() if k.startswith("model.")}
    load_state_dict_strict(model, state, source=path)
    return model
