"""open_clip's ``ClipLoss`` on the memory-efficient contrastive loss: the same constructor, call and results.

    from florence_kernels.integrations.open_clip import ClipLoss
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss = loss_fn(image_features, text_features, logit_scale.exp())

Semantics (open_clip 3.x ``open_clip.loss.ClipLoss`` and ``gather_features``), reproduced exactly, gradients included:

- world_size 1: CLIP's loss (cross-entropy both ways, mean) on the batch.
- world_size > 1, ``local_loss=False``: every rank computes the loss of the whole gathered batch. The gathered
  features carry gradients through ``all_gather``'s backward (a sum over ranks) when ``gather_with_grad``; otherwise
  only this rank's own slot does (open_clip puts the local tensor back into the gathered list).
- ``local_loss=True``: this rank's rows (images against all texts, texts against all images) with labels offset by
  ``rank * N``; without ``gather_with_grad`` the gathered features carry no gradient at all.
- ``logit_bias``: a constant added to every logit leaves softmax cross-entropy unchanged; it gets a zero gradient.
- ``cache_labels``: the labels tensor is cached per device, as open_clip does (``get_ground_truth``).

The N x N (or N x NW) logits are never formed: rows and columns go through the fused log-sum-exp (``lse_pair``) and
the positives are O(N D). Horovod (``use_horovod=True``) is not supported: a ValueError says so.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..ops.contrastive_loss import CONTRASTIVE_LOSS, _GatherWithGrad, acc_dtype, contrastive_loss, lse_pair


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)``; calls as
    ``loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` with (N, D) features
    (L2-normalised) and logit_scale the multiplier (open_clip passes ``logit_scale.exp()``); returns a 0-dim fp32 loss
    (fp64 for fp64 features), or ``{"contrastive_loss": loss}``. ``backend`` (keyword only): the fused op's backend.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend: str | None = None):  # fmt: skip
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed (the default)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got rank {rank}, world {world_size}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's labels: arange(num_logits), offset by num_logits * rank under local_loss; cached if asked."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def _gather(self, x):
        if self.gather_with_grad:
            return _GatherWithGrad.apply(x, dist.group.WORLD)
        parts = [torch.zeros_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        if not self.local_loss:  # open_clip: the local slot keeps its gradient
            parts[self.rank] = x
        return torch.cat(parts)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        u, v = image_features, text_features
        if self.world_size > 1:
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError(f"world_size: {self.world_size} needs torch.distributed initialised (it is not)")
            if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                raise ValueError(
                    f"rank, world_size: constructed with {self.rank} of {self.world_size}, but torch.distributed says "
                    f"{dist.get_rank()} of {dist.get_world_size()}"
                )
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), device=u.device)
        if self.world_size == 1:
            loss = contrastive_loss(u, v, logit_scale, gather=False, backend=self.backend)
        elif not self.local_loss:
            loss = contrastive_loss(self._gather(u), self._gather(v), logit_scale, gather=False, backend=self.backend)
        else:
            loss = self._local_loss(u, v, logit_scale)
        if logit_bias is not None:  # cross-entropy is unchanged by a constant added to every logit: zero gradient
            loss = loss + 0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss

    def _local_loss(self, u, v, logit_scale):
        """This rank's N rows against all N W columns, both ways (open_clip's local_loss)."""
        for name, t in (("image_features", u), ("text_features", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected an (N, D) tensor, got {got}")
        N = u.shape[0]
        u_all, v_all = self._gather(u), self._gather(v)
        ct = acc_dtype(u.dtype)
        scale = logit_scale.reshape(()).to(device=u.device, dtype=ct)
        rows = slice(self.rank * N, (self.rank + 1) * N)
        name = CONTRASTIVE_LOSS.select([u, v], self.backend)
        if name == "reference":
            r = torch.logsumexp(scale * u.to(ct) @ v_all.to(ct).T, dim=1)
            c = torch.logsumexp(scale * v.to(ct) @ u_all.to(ct).T, dim=1)
        else:
            r = lse_pair(u, v_all, scale, need_cols=False, backend=name)[0]
            c = lse_pair(v, u_all, scale, need_cols=False, backend=name)[0]
        pos = scale * ((u.to(ct) * v_all[rows].to(ct)).sum() + (v.to(ct) * u_all[rows].to(ct)).sum())
        return (r.sum() + c.sum() - pos) / (2 * N)


__all__ = ["ClipLoss"]
