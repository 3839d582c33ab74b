"""Florence's text tower (../shared/SPEC.md section 4): a CLIP-like causal transformer over CLIP BPE tokens.

Pre-LN residual blocks (LayerNorm -> multi-head self-attention with a causal mask -> residual; LayerNorm -> MLP 4x
with GELU -> residual), a final LayerNorm, pooled at the end-of-text token (the largest id in each row, CLIP's argmax
pooling). Parameter names are open_clip's TextTransformer's (token_embedding, positional_embedding,
transformer.resblocks.i.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
ln_final), so its state dicts load as they are.

Attention: torch's scaled_dot_product_attention (``attn_backend="sdpa"``, any device), or flash-attn's
``flash_attn_func`` (``"flash_attn"``: CUDA, fp16/bf16, where the flash-attn package is installed; never required).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTN_BACKENDS = ("sdpa", "flash_attn")


def flash_attn_unavailable(x: torch.Tensor | None = None) -> str | None:
    """Why flash-attn cannot run (for ``x``, if given), or None."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn on a CUDA machine)"
    if x is not None and (x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16)):
        return f"flash-attn runs on CUDA fp16/bf16 tensors, got {x.dtype} on {x.device}"
    return None


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.MultiheadAttention's parameter layout (in_proj_weight (3W, W))."""

    def __init__(self, width: int, heads: int, attn_backend: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads: {heads} does not divide the width {width}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.width, self.heads, self.attn_backend = width, heads, attn_backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        h, hd = self.heads, W // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, h, hd)
        if self.attn_backend == "flash_attn":
            reason = flash_attn_unavailable(x)
            if reason:
                raise RuntimeError(f"attn_backend='flash_attn': {reason}")
            from flash_attn import flash_attn_func

            q, k, v = qkv.unbind(2)  # (B, L, h, hd): flash-attn's layout
            out = flash_attn_func(q, k, v, causal=True)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, hd)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.out_proj(out.reshape(B, L, W))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, attn_backend)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width, int(width * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, attn_backend):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, attn_backend)
                                       for _ in range(layers))  # fmt: skip
        self.grad_checkpointing = False

    def forward(self, x):
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class TextTransformer(nn.Module):
    """The text encoder: (B, L) token ids (L <= context_length) -> (B, width) pooled at each row's end-of-text token.

    Args:
        vocab_size: 49408, CLIP's BPE vocabulary; context_length: 77; width, heads, layers: Florence 1024, 16, 12.
        attn_backend: "sdpa" (default) or "flash_attn" (optional package, CUDA half precision).
    """

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 1024, heads: int = 16,
                 layers: int = 12, mlp_ratio: float = 4.0, attn_backend: str = "sdpa"):  # fmt: skip
        super().__init__()
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, layers, heads, mlp_ratio, attn_backend)
        self.ln_final = nn.LayerNorm(width)
        self.num_features = width
        self._init()

    def _init(self):
        """CLIP's initialisation (as open_clip's TextTransformer.init_parameters)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        w, n = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = w**-0.5 * (2 * n) ** -0.5, w**-0.5, (2 * w) ** -0.5
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def set_attn_backend(self, attn_backend: str) -> None:
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {attn_backend!r}")
        for blk in self.transformer.resblocks:
            blk.attn.attn_backend = attn_backend

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(tokens)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, width): every position's state after ``ln_final`` (causal: position i has seen
        tokens 0..i; what METER's text stream takes). ValueError for tokens that are not (B, L) integers or longer
        than the context."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected (B, L) integer token ids, got {got}")
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"tokens: {L} positions exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        return self.ln_final(self.transformer(x))
