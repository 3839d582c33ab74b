"""CoSwin, Florence's image tower (../shared/SPEC.md section 3): Swin v1 blocks with convolutional embeddings.

stem Conv2d(3, C, 7, stride 4, pad 2) + LayerNorm -> stage 1 -> [Conv2d(C_i, 2 C_i, 3, stride 2, pad 1) + LayerNorm ->
stage i] ... -> LayerNorm -> global average pool. Tokens stay channels-last (B, H, W, C) from the stem to the pool: the
convolutional embeddings read and write that layout (florence_kernels.conv_embed), the blocks run windowed attention
on it (florence_kernels.nn.SwinBlock3D). Every op takes ``backend`` (None: automatic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from florence_kernels.nn import ConvEmbed, SwinBlock3D


class CoSwinStage(nn.Module):
    """``depth`` Swin blocks at one resolution, regular and shifted windows alternating (shift = window // 2 on every
    axis). window_size: an int (a square 2-D window, CoSwin) or a (Wt, Wh, Ww) triple (Video CoSwin)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int | Sequence[int],
                 drop_path: Sequence[float], mlp_ratio: float, drop: float, attn_drop: float,
                 backend: str | None):  # fmt: skip
        super().__init__()
        window = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        self.blocks = nn.ModuleList(
            SwinBlock3D(
                dim,
                num_heads,
                window,
                tuple(0 for _ in window) if i % 2 == 0 else tuple(w // 2 for w in window),
                mlp_ratio,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
                backend=backend,
            )  # fmt: skip
            for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class CoSwin(nn.Module):
    """The CoSwin image encoder.

    Args:
        embed_dim: channels of stage 1 (C); stage i has C 2^i.
        depths, num_heads: blocks and attention heads per stage.
        window_size: one int, or one per stage (Florence: 7 at 224, 12 at 384). A stage whose grid is no larger than
            its window attends over the whole grid without shift (Swin's rule).
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        in_chans, mlp_ratio, drop_rate, attn_drop_rate: as in Swin.
        backend: passed to every op (window attention, conv embedding); None chooses per device.

    ``forward_features(images)`` -> (B, num_features) pooled; ``forward_pyramid(images)`` -> the four stage outputs
    as (B, C_i, H_i, W_i) (each through its own LayerNorm, for detection necks); ``set_grad_checkpointing()``
    recomputes every block in the backward.
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int | Sequence[int] = 7, in_chans: int = 3,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, backend: str | None = None):  # fmt: skip
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads}: expected one entry per stage, equally many")
        windows = (window_size,) * len(depths) if isinstance(window_size, int) else tuple(window_size)
        if len(windows) != len(depths):
            raise ValueError(f"window_size: expected an int or {len(depths)} values (one per stage), got {window_size}")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        for i, (d, h) in enumerate(zip(dims, num_heads, strict=True)):
            if d % h:
                raise ValueError(f"num_heads[{i}] = {h} does not divide stage {i + 1}'s {d} channels")
        self.depths, self.num_heads, self.window_sizes, self.dims = depths, num_heads, windows, dims
        self.config = {"embed_dim": embed_dim, "depths": list(depths), "num_heads": list(num_heads),
                       "window_size": list(windows), "in_chans": in_chans, "mlp_ratio": mlp_ratio}  # fmt: skip
        self.num_features = dims[-1]
        self.backend = backend
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear from 0 (also on the meta device)
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            if i == 0:
                self.embeds.append(ConvEmbed(in_chans, dims[0], 7, 4, 2, backend=backend))
            else:
                self.embeds.append(ConvEmbed(dims[i - 1], dims[i], 3, 2, 1, backend=backend))
            start = sum(depths[:i])
            self.stages.append(CoSwinStage(dims[i], depth, num_heads[i], windows[i], rates[start : start + depth],
                                           mlp_ratio, drop_rate, attn_drop_rate, backend))  # fmt: skip
        self.norm = nn.LayerNorm(self.num_features)
        self.pyramid_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _check(self, images: torch.Tensor) -> None:
        if (
            not isinstance(images, torch.Tensor)
            or images.dim() != 4
            or images.shape[1] != self.embeds[0].proj.in_channels
        ):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, {self.embeds[0].proj.in_channels}, H, W), got {got}")

    def _stages(self, images: torch.Tensor):
        self._check(images)
        x = images
        for i, (embed, stage) in enumerate(zip(self.embeds, self.stages, strict=True)):
            # the layout said, not guessed: at 384 px CoSwin-T's first grid is (B, 96, 96, 96), C_in on both axes
            x = stage(embed(x, input_layout="channels_first" if i == 0 else "channels_last"))
            yield x  # (B, H_i, W_i, C_i) channels-last tokens throughout

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features): final LayerNorm, global average pool."""
        return self.forward_tokens(images).mean(dim=(1, 2))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H / 32, W / 32, num_features): the last stage's tokens through the final LayerNorm,
        before pooling (channels-last; what METER's image stream takes)."""
        *_, last = self._stages(images)
        return self.norm(last)

    def forward_pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the stage outputs (B, C_i, H / 2^(i+2), W / 2^(i+2)), each through its LayerNorm, as
        channels-first views of channels-last memory (what convolutions and DyHead take)."""
        return [norm(x).permute(0, 3, 1, 2) for norm, x in zip(self.pyramid_norms, self._stages(images), strict=True)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


def _init_weights(m: nn.Module) -> None:
    """Swin's initialisation: truncated normal(0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def coswin_param_count(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size, in_chans=3,
                       mlp_ratio: float = 4.0) -> int:  # fmt: skip
    """Parameters of CoSwin by formula (the derivation the tests pin the modules against).

    stem: 49 in_chans C + C (conv) + 2C (LayerNorm); merge into stage i: 9 C_{i-1} C_i + C_i + 2 C_i; a block of
    width d, h heads, window w, hidden r d: 2 LayerNorms 4d, qkv 3d^2 + 3d, proj d^2 + d, bias table (2w-1)^2 h,
    MLP 2 r d^2 + r d + d; final LayerNorm 2 C_last; pyramid LayerNorms 2 C_i each.
    """
    windows = (window_size,) * len(depths) if isinstance(window_size, int) else tuple(window_size)
    dims = [embed_dim * 2**i for i in range(len(depths))]
    total = 49 * in_chans * dims[0] + 3 * dims[0]
    for i in range(1, len(dims)):
        total += 9 * dims[i - 1] * dims[i] + 3 * dims[i]
    for d, depth, h, w in zip(dims, depths, num_heads, windows, strict=True):
        hidden = int(d * mlp_ratio)
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * w - 1) ** 2 * h + (2 * hidden * d + hidden + d)
        total += depth * block
    return total + 2 * dims[-1] + sum(2 * d for d in dims)
