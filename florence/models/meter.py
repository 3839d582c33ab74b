"""METER's co-attention fusion on Florence's two towers: the vision-language adapter (Florence section 3.3,
../shared/SPEC.md section 8; METER, Dou et al. 2022, "An Empirical Study of Training End-to-End Vision-and-Language
Transformers", its co-attention "merged attention"-free variant and its VQAv2 head).

Streams:
- image: CoSwin's last-stage tokens after its final LayerNorm (``CoSwin.forward_tokens``: (N, h, w, C), h = H / 32,
  each image once), flattened row-major to (N, h w, C) -> Linear(C, width) + a fixed 2D sine-cosine position
  embedding (MAE's; METER's CLIP-ViT carries absolute positions in its tokens, a Swin does not, and questions about
  "left" and "right" need them) + token type 1, then gathered per question by ``image_index`` (B rows: questions
  that share an image share its tokens, computed once).
- text: the text tower's every token state (``TextTransformer.forward_tokens``: (B, L, text width), causal) ->
  Linear(text width, width) + token type 0; the positions after each row's end-of-text token (the row's largest
  id, CLIP's convention; CLIP's tokenizer pads with 0) are masked out of every attention over text, and the batch is
  cut after its longest question (the causal tower's states up to there do not depend on the padding).
  Or, as in the paper, RoBERTa (``text={"roberta": <RobertaConfig dict>}``, :mod:`florence.models.roberta`, from a
  local folder through transformers; :meth:`METER.from_florence` with ``roberta=load_roberta(PATH)[0]``): its every
  token state,
  bidirectional, with RoBERTa's own ids (``RobertaTokens``: ``<s> ... </s>`` then its pad id); a token equal to
  the pad id is padding (masked out of every attention over text, and of RoBERTa's own), the batch is cut after its
  longest question.

Fusion: ``layers`` co-attention layers per stream (:class:`CoAttentionLayer`, METER's BertCrossLayer): self-attention
-> cross-attention (queries from its own stream, keys and values from the other stream's previous-layer states, the
other stream's padding mask) -> feed-forward (GELU), each sub-layer ``LayerNorm(x + dropout(sublayer(x)))`` (post-LN,
BERT's). Both streams update in parallel from the previous layer's states. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` with a boolean key mask, so a padded key gets exactly zero
weight (softmax of -inf); on a GPU, SDPA dispatches to its fused (memory-efficient / flash) kernels.

Pooling (METER's poolers): text = tanh(Linear(the end-of-text token's state)); image = tanh(Linear(mean of the image
tokens)); METER pools BERT's first token ([CLS]), which has read the whole question in its bidirectional encoder, and so
does the RoBERTa stream (``<s>``); in Florence's causal text tower the first token has read nothing and the end-of-text
token everything (CLIP pools there too); pooled = concat(text, image): (B, 2 width). Heads: VQA (METER's vqa_classifier:
Linear(2w, 2w) -> LayerNorm -> GELU -> Linear(2w, num_answers), trained with binary cross-entropy on VQA's soft scores,
times the number of answers as METER does: :func:`vqa_loss`) and image-text matching (Linear(2w, 2)).

``question_only=True`` builds the question-only baseline: no image tower and no cross-attention (each layer is
self-attention -> feed-forward), pooled = the text pooler's output (B, width), the same VQA head on width inputs.

Parameters of one :class:`CoAttentionLayer` of width w and feed-forward ratio r (derivation, tested):
self-attention 4 w^2 + 4 w (q, k, v, out with biases) + cross-attention 4 w^2 + 4 w + feed-forward 2 r w^2 + r w + w
+ three LayerNorms 6 w = (8 + 2 r) w^2 + (15 + r) w; r = 4: 16 w^2 + 19 w (w = 768: 9,451,776, METER's 9.45M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .coswin import CoSwin
from .text import ATTN_BACKENDS, TextTransformer, flash_attn_unavailable

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def coattention_param_count(width: int, mlp_ratio: float = 4.0, cross: bool = True) -> int:
    """Parameters of one :class:`CoAttentionLayer` by the derivation in the module docstring."""
    hidden = int(width * mlp_ratio)
    attn = 4 * width * width + 4 * width
    ffn = 2 * width * hidden + hidden + width
    return attn * (2 if cross else 1) + ffn + 2 * width * (3 if cross else 2)


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h w, dim) fixed 2D sine-cosine position embedding (MAE's get_2d_sincos_pos_embed): the first half of the
    channels encodes the column, the second the row, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim /
    4)), k < dim / 4. ValueError when dim is not a multiple of 4."""
    if dim % 4:
        raise ValueError(f"dim: the 2D sine-cosine embedding needs a multiple of 4, got {dim}")
    k = torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4)
    omega = 1.0 / 10000**k
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")  # fmt: skip
    parts = []
    for pos in (xs.reshape(-1), ys.reshape(-1)):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).to(dtype)


def _unpad(x: torch.Tensor, mask: torch.Tensor | None):
    """(B, L, ...) and a (B, L) bool mask (None: all real) -> (the real rows packed (total, ...), cu_seqlens int32
    (B + 1,) (each row's start in the packing, then the total), the longest row's length, the packed rows' flat
    indices in (B L), None when every row is whole): flash-attn's varlen layout."""
    B, L = x.shape[:2]
    if mask is None:  # (image tokens: nothing to pack, no gather and no host sync)
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=x.device)
        return x.reshape(B * L, *x.shape[2:]), cu, L, None
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    index = mask.reshape(-1).nonzero().squeeze(1)
    return x.reshape(B * L, *x.shape[2:])[index], cu, int(lengths.max()) if B else 0, index


def flash_varlen_attention(q, k, v, query_mask=None, key_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention through flash-attn's ``flash_attn_varlen_func`` on padded batches: q (B, Lq, h, d), k, v (B, Lk, h,
    d), masks (B, L) bool (True = a real token; None = all real) -> (B, Lq, h, d). The real queries and keys of each
    row are packed one after another (``cu_seqlens``), so no padded key is read (exactly zero weight) and no work is
    spent on padding; the padded query rows come back as zeros (their states are masked out of every later read)."""
    from flash_attn import flash_attn_varlen_func

    B, Lq, h, d = q.shape
    qp, cu_q, max_q, index = _unpad(q, query_mask)
    kp, cu_k, max_k, k_index = _unpad(k, key_mask)
    vp = v.reshape(-1, h, d) if k_index is None else v.reshape(-1, h, d)[k_index]
    o = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, causal=False).to(q.dtype)
    if index is None:
        return o.view(B, Lq, h, d)
    return q.new_zeros(B * Lq, h, d).index_copy(0, index, o).view(B, Lq, h, d)


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v and output projections (BERT's layout), through SDPA
    (``attn_backend="sdpa"``) or flash-attn's varlen kernel (``"flash_attn"``: CUDA fp16/bf16, where the flash-attn
    package is installed; :func:`flash_varlen_attention`).

    forward(x (B, Lq, w), context (B, Lk, w), key_mask (B, Lk) bool or None: True = attend, query_mask (B, Lq) bool
    or None: x's real tokens, read by flash-attn only, which skips the others) -> (B, Lq, w). A query whose keys are
    all masked would have no distribution to take; the callers never build one (text keeps its start token, images
    have no padding). RuntimeError naming the reason when flash-attn cannot run on the inputs."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, attn_backend: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads: {heads} does not divide the width {width}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.heads, self.dropout, self.attn_backend = heads, dropout, attn_backend
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x, context, key_mask=None, query_mask=None):
        B, Lq, W = x.shape
        Lk, h = context.shape[1], self.heads
        q = self.query(x).view(B, Lq, h, W // h)
        k = self.key(context).view(B, Lk, h, W // h)
        v = self.value(context).view(B, Lk, h, W // h)
        dropout = self.dropout if self.training else 0.0
        if self.attn_backend == "flash_attn":
            reason = flash_attn_unavailable(q)
            if reason:
                raise RuntimeError(f"attn_backend='flash_attn': {reason}")
            o = flash_varlen_attention(q, k, v, query_mask, key_mask, dropout)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout).transpose(1, 2)
        return self.out(o.reshape(B, Lq, W))


class CoAttentionLayer(nn.Module):
    """One stream's co-attention layer (METER's BertCrossLayer), post-LN:

        x = LN1(x + drop(SelfAttn(x, x, x_mask)))
        x = LN2(x + drop(CrossAttn(x, other, other_mask)))     (skipped when cross=False)
        x = LN3(x + drop(W2 GELU(W1 x)))

    forward(x (B, L, w), x_mask (B, L) bool or None, other (B, L', w) or None, other_mask (B, L') or None) ->
    (B, L, w). Parameters: :func:`coattention_param_count`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1, cross: bool = True,
                 attn_backend: str = "sdpa"):  # fmt: skip
        super().__init__()
        self.self_attn = Attention(width, heads, dropout, attn_backend)
        self.ln1 = nn.LayerNorm(width)
        self.cross = cross
        if cross:
            self.cross_attn = Attention(width, heads, dropout, attn_backend)
            self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.ln3 = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, x_mask=None, other=None, other_mask=None):
        x = self.ln1(x + self.drop(self.self_attn(x, x, x_mask, x_mask)))
        if self.cross:
            x = self.ln2(x + self.drop(self.cross_attn(x, other, other_mask, x_mask)))
        return self.ln3(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class METER(nn.Module):
    """METER's co-attention model on a CoSwin image tower and Florence's text tower (see the module docstring).

    Args:
        vision, text: the towers' configs (``florence.models.get_config(name)["vision"]`` / ``["text"]``); ``text``
            may instead be ``{"roberta": config}`` (a RobertaConfig's ``to_dict()``): RoBERTa as the text stream
            (:mod:`florence.models.roberta`; its weights come from :meth:`from_florence` or a saved METER).
        num_answers: the VQA answer vocabulary's size (>= 1).
        width, heads, layers, mlp_ratio, dropout: the fusion (METER: 768, 12, 6, 4, 0.1).
        question_only: the question-only baseline (no image tower, no cross-attention).
        itm: build the image-text matching head (fine-tuning on VQA alone leaves it out: a parameter without a
            gradient stalls DeepSpeed's reductions).
        backend: florence_kernels backend of CoSwin's ops.
        attn_backend: the fusion's attention: "sdpa" (default, any device) or "flash_attn" (flash-attn's varlen
            kernel: CUDA fp16/bf16 where the package is installed; padding is packed away, not masked).

    ``forward(images, tokens, image_index=None)``: images (N, 3, H, W) float (None when question_only), tokens (B, L)
    int (CLIP BPE, zero-padded after each row's end-of-text token; with RoBERTa its ids, each row starting with ``<s>``
    and padded with its pad id), image_index (B,) int: question b asks about images[image_index[b]] (None: N = B, one
    image per question). Each image goes through the image tower once however many questions share it (a VQA canvas has
    several). Returns {"text": (B, L', width) with L' = the batch's longest question through its end-of-text token (the
    positions after it are padding, cut: the causal tower's states up to L' are those of the full context; with RoBERTa
    through its last token that is not the pad id), "image": (B, h w, width) (absent when question_only), "pooled": (B,
    2 width) (question_only: (B, width)), "vqa_logits": (B, num_answers), "itm_logits": (B, 2) (only with itm)}.
    ValueError for images that are not (N, 3, H, W) with H, W multiples of 32, tokens that are not (B, L >= 1) integers
    (with RoBERTa: or a row that starts with the pad id), N != B without image_index, or an image_index that is not (B,)
    integers in [0, N).
    """

    def __init__(self, vision: dict, text: dict, num_answers: int, width: int = 768, heads: int = 12,
                 layers: int = 6, mlp_ratio: float = 4.0, dropout: float = 0.1, question_only: bool = False,
                 itm: bool = True, backend: str | None = None, attn_backend: str = "sdpa"):  # fmt: skip
        super().__init__()
        for name, value, low in (("num_answers", num_answers, 1), ("width", width, 4), ("heads", heads, 1),
                                 ("layers", layers, 0)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if width % 4 or width % heads:
            raise ValueError(f"width: {width} must be a multiple of 4 (the 2D position embedding) and of heads {heads}")
        vision = {k: v for k, v in dict(vision).items() if k != "backend"}
        text = dict(text)
        self.roberta = "roberta" in text
        if self.roberta and set(text) != {"roberta"}:
            raise ValueError(f"text: a RoBERTa stream is {{'roberta': config}} alone, got the keys {sorted(text)}")
        self.config = {"vision": vision, "text": dict(text), "num_answers": num_answers, "width": width,
                       "heads": heads, "layers": layers, "mlp_ratio": mlp_ratio, "dropout": dropout,
                       "question_only": question_only, "itm": itm and not question_only}  # fmt: skip
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.question_only, self.width, self.backend = question_only, width, backend
        if self.roberta:
            from .roberta import RobertaStream

            self.text = RobertaStream(text["roberta"])
            self.config["text"] = {"roberta": self.text.config}
        else:
            self.text = TextTransformer(**text)
        self.text_proj = nn.Linear(self.text.width, width)
        self.token_type = nn.Embedding(2, width)
        cross = not question_only
        self.text_layers = nn.ModuleList(
            CoAttentionLayer(width, heads, mlp_ratio, dropout, cross, attn_backend) for _ in range(layers)
        )
        self.text_pooler = nn.Linear(width, width)
        if not question_only:
            self.visual = CoSwin(**vision, backend=backend)
            # CoSwin's pyramid LayerNorms serve detection necks; METER reads the final LayerNorm's tokens. Left out,
            # so that every parameter gets a gradient (DeepSpeed's reductions expect that).
            self.visual.pyramid_norms = nn.ModuleList(nn.Identity() for _ in self.visual.pyramid_norms)
            self.image_proj = nn.Linear(self.visual.num_features, width)
            self.image_layers = nn.ModuleList(CoAttentionLayer(width, heads, mlp_ratio, dropout, True, attn_backend)
                                              for _ in range(layers))  # fmt: skip
            self.image_pooler = nn.Linear(width, width)
        if self.config["itm"]:
            self.itm_head = nn.Linear(2 * width, 2)
        pooled = width if question_only else 2 * width
        self.vqa_head = nn.Sequential(nn.Linear(pooled, pooled), nn.LayerNorm(pooled), nn.GELU(),
                                      nn.Linear(pooled, num_answers))  # fmt: skip
        for name, module in self.named_children():  # the towers keep their own initialisation
            if name not in ("text", "visual"):
                module.apply(self._init_fusion)

    @staticmethod
    def _init_fusion(m):
        """The fusion layers', projections' and heads' initialisation: Linear weights normal(0, 1 / sqrt(fan_in))
        (LeCun's), zero biases, LayerNorms at (1, 0), the token-type embedding normal(0, 0.02) (BERT's).

        METER (init_weights) draws every weight from BERT's normal(0, 0.02), a scale chosen for width 768 (about 0.55 /
        sqrt(768)). At a smaller width the same 0.02 leaves queries and keys so small that every attention starts
        uniform, and the fusion sits on a plateau for hundreds of steps before it binds a question word to an image
        token. Measured on the digit questions with oracle image tokens (width 128, 2 layers, 64 questions a step; the
        diagnostics/ folders of benchmarks/results/cpu-2026-12-01-vqa-400 and -vqa-init): held-out accuracy 49.8%
        after 400 steps at 0.02 (86.4% only after 1,200), 87.2% after 400 with 1 / sqrt(fan_in) (78.1% after 200),
        81.5% with Xavier's uniform."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_florence(cls, florence, num_answers: int, vision_overrides: dict | None = None, roberta=None,
                      **kwargs) -> METER:  # fmt: skip
        """METER on a pretrained Florence's towers (``florence.visual`` and ``florence.text`` weights copied; the
        CoSwin pyramid norms and the contrastive projections are not used); the fusion and heads are fresh. With
        ``question_only=True`` only the text tower is copied. ``roberta``: a :class:`~florence.models.roberta.
        RobertaStream` (``load_roberta``'s, weights included) as the text stream instead of Florence's; ``florence``
        may then be None (a CoSwin from scratch, with ``vision_overrides`` the whole vision config)."""
        from .florence import load_state_dict_strict

        if florence is None and roberta is None:
            raise ValueError("florence: None (no pretrained Florence) needs roberta=<RobertaStream> (the text stream)")
        vision = (florence.visual.config if florence is not None else {}) | dict(vision_overrides or {})
        text = {"roberta": roberta.config} if roberta is not None else florence.config["text"]
        model = cls(vision, text, num_answers, **kwargs)
        source = roberta if roberta is not None else florence.text
        load_state_dict_strict(model.text, source.state_dict(), source="roberta" if roberta is not None else
                               "florence.text")  # fmt: skip
        if florence is not None and not model.question_only:
            state = {k: v for k, v in florence.visual.state_dict().items() if not k.startswith("pyramid_norms.")}
            load_state_dict_strict(model.visual, state, source="florence.visual")
        return model

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)
        if not self.question_only:
            self.visual.set_grad_checkpointing(enable)

    def _check(self, images, tokens, image_index):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected (B, L) integer token ids, got {got}")
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens: expected at least one position (the end-of-text token), got "
                             f"{tuple(tokens.shape)}")  # fmt: skip
        if self.roberta and len(tokens) and bool((tokens[:, 0] == self.text.pad_token_id).any()):
            row = int((tokens[:, 0] == self.text.pad_token_id).nonzero()[0, 0])
            raise ValueError(f"tokens: row {row} starts with RoBERTa's pad id {self.text.pad_token_id} (expected <s> "
                             "first: RobertaTokens' ids)")  # fmt: skip
        if self.question_only:
            return
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (N, 3, H, W), got {got}")
        if images.shape[-1] % 32 or images.shape[-2] % 32 or images.shape[-1] == 0 or images.shape[-2] == 0:
            raise ValueError(f"images: height and width must be positive multiples of 32 (CoSwin's last stride), got "
                             f"{images.shape[-2]}x{images.shape[-1]}")  # fmt: skip
        if image_index is None:
            if images.shape[0] != tokens.shape[0]:
                raise ValueError(f"images and tokens: batch sizes differ ({images.shape[0]} vs {tokens.shape[0]}; "
                                 "pass image_index to share images between questions)")  # fmt: skip
            return
        if (not isinstance(image_index, torch.Tensor) or image_index.shape != (tokens.shape[0],)
                or image_index.dtype not in (torch.int64, torch.int32)):  # fmt: skip
            got = f"{tuple(image_index.shape)} {image_index.dtype}" if isinstance(image_index, torch.Tensor) else (
                type(image_index).__name__)  # fmt: skip
            raise ValueError(f"image_index: expected ({tokens.shape[0]},) integer rows of images (one per question), "
                             f"got {got}")  # fmt: skip
        if len(image_index) and (int(image_index.min()) < 0 or int(image_index.max()) >= images.shape[0]):
            raise ValueError(f"image_index: rows must lie in [0, {images.shape[0]}) (the images given), got "
                             f"{int(image_index.min())}..{int(image_index.max())}")  # fmt: skip

    def forward(self, images, tokens, image_index=None):
        self._check(images, tokens, image_index)
        # The real tokens: up to each row's end-of-text token (the largest id, CLIP's convention, as the text tower
        # pools). The causal tower's states there do not depend on later positions, so the batch is cut after its
        # longest question: the same states, (context - L') fewer positions in every layer.
        if self.roberta:  # RoBERTa's ids: padding is its pad id; pooled at <s>, the first token (METER's [CLS])
            real = tokens != self.text.pad_token_id
            last = torch.where(real, torch.arange(tokens.shape[1], device=tokens.device), -1).amax(dim=-1)
            length = int(last.max()) + 1 if len(last) else 1
            if length > self.text.context_length:
                raise ValueError(f"tokens: questions of {length} tokens, more than RoBERTa's "
                                 f"{self.text.context_length} positions")  # fmt: skip
            tokens, text_mask = tokens[:, :length], real[:, :length]
            pool_at = torch.zeros(len(tokens), dtype=torch.int64, device=tokens.device)
            states = self.text.forward_tokens(tokens, text_mask)
        else:
            pool_at = tokens.argmax(dim=-1)  # the end-of-text token
            length = int(pool_at.max()) + 1 if len(pool_at) else 1
            tokens = tokens[:, :length]
            text_mask = torch.arange(length, device=tokens.device)[None] <= pool_at[:, None]
            states = self.text.forward_tokens(tokens)
        t = self.text_proj(states) + self.token_type.weight[0]
        out = {}
        if self.question_only:
            for layer in self.text_layers:
                t = layer(t, text_mask)
        else:
            grid = self.visual.forward_tokens(images)  # (N, h, w, C): each image once
            N, h, w, _ = grid.shape
            pos = sincos_2d(h, w, self.width, device=grid.device, dtype=grid.dtype)
            v = self.image_proj(grid.reshape(N, h * w, grid.shape[-1])) + pos + self.token_type.weight[1]
            if image_index is not None:
                v = v[image_index]  # (B, h w, width): each question's image
            for text_layer, image_layer in zip(self.text_layers, self.image_layers, strict=True):
                t, v = text_layer(t, text_mask, v, None), image_layer(v, None, t, text_mask)
            out["image"] = v
        pooled = torch.tanh(self.text_pooler(t[torch.arange(t.shape[0], device=t.device), pool_at]))
        if not self.question_only:
            pooled = torch.cat([pooled, torch.tanh(self.image_pooler(v.mean(dim=1)))], dim=-1)
        if self.config["itm"]:
            out["itm_logits"] = self.itm_head(pooled)
        out.update(text=t, pooled=pooled, vqa_logits=self.vqa_head(pooled))
        return out

    def no_weight_decay_names(self) -> set[str]:
        """METER's recipe: no weight decay on biases, LayerNorms, embeddings (the text tower's token and position
        embeddings, the token types) and CoSwin's relative position tables."""
        return {n for n, p in self.named_parameters()
                if p.dim() <= 1 or "embedding" in n or n.startswith("token_type.")
                or "relative_position_bias_table" in n}  # fmt: skip

    def save_pretrained(self, directory: str) -> None:
        """config.json and model.safetensors in ``directory``, each written whole or not at all."""
        from .florence import save_tagged_folder

        save_tagged_folder(self, directory, "meter")

    @classmethod
    def from_pretrained(cls, directory: str, map_location="cpu", **overrides) -> METER:
        """A model saved by :meth:`save_pretrained` (``backend``, ``dropout`` may be overridden); FileNotFoundError
        for a folder without its files, ValueError for another model's config or mismatched weights."""
        from .florence import load_tagged_folder

        return load_tagged_folder(cls, directory, "meter", "a METER", map_location, **overrides)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """METER's VQA loss: binary cross-entropy with logits against VQA's soft scores, averaged over every (question,
    answer) entry, times the number of answers (= summed over answers, averaged over questions). logits, targets:
    (B, A) float; ValueError when the shapes differ."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected equal (B, A)")
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
