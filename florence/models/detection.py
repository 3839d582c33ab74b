"""Florence's object adapter (../shared/SPEC.md section 7; Florence, Yuan et al. 2021, section 3.2): Dynamic Head on
the CoSwin pyramid, in the ATSS detector (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection"; Dai et al. 2021, "Dynamic Head").

    det = ATSSDetector(vision=get_config("florence_tiny")["vision"], num_classes=80)   # or from_florence(...)
    cls_logits, box_deltas, centerness = det(images)          # (B, A, K), (B, A, 4), (B, A): A anchors, all levels
    losses = det.loss((cls_logits, box_deltas, centerness), boxes, labels, image_size)
    detections = det.postprocess((cls_logits, box_deltas, centerness), image_size)  # per image: boxes, scores, labels

Architecture: CoSwin (``florence.models.CoSwin``) -> stages 2-4 (strides 8, 16, 32) through their pyramid
LayerNorms -> FPN (torchvision's ``FeaturePyramidNetwork``: 1x1 laterals, nearest top-down, 3x3 outputs) -> P3-P5,
with P6 and P7 by stride-2 3x3 convolutions on P5 and ReLU(P6) (torchvision's ``LastLevelP6P7``, ATSS's
``LastLevelP6P7`` on P5) -> ``num_blocks`` DyHeadBlocks (``florence_kernels.nn.DyHead``: the fused DyHead ops, every
one taking ``backend``) in place of ATSS's 4-conv towers (the Dynamic Head paper's ATSS) -> per level, 3x3
convolutions: classification (K sigmoid logits per anchor, bias -log((1 - 0.01) / 0.01): prior 0.01), box
regression (4 deltas, times a learnable scale per level) and centerness (1 logit).

Anchors: one square anchor per location, side ``anchor_scale`` x stride (8: ATSS), centred on the cell (x + 0.5)
stride, (y + 0.5) stride. Boxes are decoded from the deltas as ATSS's "BOX" regression (mmdetection's
DeltaXYWHBBoxCoder, stds (0.1, 0.1, 0.2, 0.2)): cx = ax + 0.1 dx aw, w = aw exp(min(0.2 dw, log(1000 / 16))), the
same for y and h.

Training targets (:func:`atss_assign`, ATSS's Algorithm 1 as in its code and mmdetection's ATSSAssigner): for each
ground-truth box, per level the ``topk`` (9) anchors whose centres are nearest the box's centre (L2; ties: the lower
anchor index) are candidates; the box's IoU threshold is the mean plus the standard deviation (unbiased, torch's
``std``) of its candidates' IoUs; a candidate is positive when its IoU reaches the threshold and its centre lies
inside the box (all four distances to the sides > 0.01 px, ATSS's EPS; the IoU compared within 1e-6, so that a
box's equal candidate IoUs, whose mean can round above them, stay positive); an anchor positive for several boxes is
assigned the one with the highest IoU (ties: the lower box index). Losses (:meth:`ATSSDetector.loss`, ATSS's):
sigmoid focal loss (alpha 0.25, gamma 2; torchvision.ops.sigmoid_focal_loss) summed over every anchor and class and
divided by the number of positives averaged over ranks; GIoU loss (torchvision.ops.generalized_box_iou_loss) of
the decoded positive boxes weighted by their centerness targets and divided by the centerness targets' sum averaged
over ranks, times 2; binary cross-entropy of the centerness logits against sqrt(min(l, r) / max(l, r) x min(t, b) /
max(t, b)) (l, t, r, b: the anchor centre's distances to the assigned box's sides), divided by the positives.

Inference (:meth:`ATSSDetector.postprocess`, ATSS's postprocessor): per level the anchors with a class score
sigmoid(logit) above ``score_threshold`` (0.05), at most ``pre_nms_top_n`` (1000) of them by score x
sigmoid(centerness), decoded and clipped to the image; score sqrt(class score x centerness); class-wise NMS at IoU
``nms_threshold`` (0.6; torchvision.ops.batched_nms); the best ``detections_per_image`` (100).
:func:`coco_results` turns detections into COCO's results JSON (``[{"image_id", "category_id", "bbox": [x, y, w,
h], "score"}]``), in the original image's pixels.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from florence_kernels.nn import DyHead

from .coswin import CoSwin

BOX_STDS = (0.1, 0.1, 0.2, 0.2)  # ATSS's BoxCoder weights (10, 10, 5, 5), mmdetection's DeltaXYWHBBoxCoder stds
MAX_LOG_RATIO = math.log(1000.0 / 16)  # the decoder's clamp on the size deltas (mmdetection, torchvision)
IOU_TOLERANCE = 1e-6  # the threshold comparison's slack for rounding (atss_assign)
CENTRE_EPS = 0.01  # ATSS: an anchor centre is inside a box when all four distances exceed this (pixels)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# CoSwin weights detection has no use for (from_florence drops them; anything else must match)
UNUSED_BACKBONE_WEIGHTS = re.compile(r"^(norm|pyramid_norms\.0)\.")


class ATSSDetector(nn.Module):
    """ATSS with Dynamic Head on CoSwin (module docstring).

    Args:
        vision: CoSwin's constructor arguments (``florence.models.get_config(name)["vision"]``; ``backend`` apart).
        num_classes: K, the object categories (no background class: sigmoid scores).
        fpn_channels: channels of P3-P7 and of the head (256 in ATSS and Florence; a multiple of 16, DyHead's
            GroupNorm(16)).
        num_blocks: DyHeadBlocks (Florence: 6).
        anchor_scale: anchor side over the level's stride (ATSS: 8). topk: ATSS's candidates per level (9).
        score_threshold, pre_nms_top_n, nms_threshold, detections_per_image: inference (module docstring).
        prior_prob: the classification bias's initial probability (0.01).
        backend: florence_kernels backend for every op of CoSwin and DyHead (None: automatic per device).

    Input images: (B, 3, H, W) float, H and W multiples of 32 (strides 8-128 then divide the levels exactly; other
    sizes raise ValueError). ``forward`` returns (cls_logits (B, A, K), box_deltas (B, A, 4), centerness (B, A)) with
    A = sum over levels of H_l W_l, level-major, row-major within a level, in the images' dtype.
    """

    strides = (8, 16, 32, 64, 128)

    def __init__(self, vision: dict, num_classes: int, fpn_channels: int = 256, num_blocks: int = 6,
                 anchor_scale: float = 8.0, topk: int = 9, score_threshold: float = 0.05, pre_nms_top_n: int = 1000,
                 nms_threshold: float = 0.6, detections_per_image: int = 100, prior_prob: float = 0.01,
                 backend: str | None = None):  # fmt: skip
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        for name, value, low in (("num_classes", num_classes, 1), ("fpn_channels", fpn_channels, 16),
                                 ("num_blocks", num_blocks, 0), ("topk", topk, 1), ("pre_nms_top_n", pre_nms_top_n, 1),
                                 ("detections_per_image", detections_per_image, 1)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if fpn_channels % 16:
            raise ValueError(f"fpn_channels: {fpn_channels} is not a multiple of 16 (DyHead's GroupNorm(16))")
        vision = {k: v for k, v in dict(vision).items() if k != "backend"}
        self.backbone = CoSwin(**vision, backend=backend)
        if len(self.backbone.dims) != 4:
            raise ValueError(f"vision: expected a 4-stage CoSwin (strides 4-32), got {len(self.backbone.dims)} stages")
        # what detection does not use (the pooled feature's LayerNorm, stage 1's pyramid LayerNorm: FPN starts at
        # stage 2) is left out, so that every parameter gets a gradient (DeepSpeed's reductions expect that)
        self.backbone.norm = nn.Identity()
        self.backbone.pyramid_norms[0] = nn.Identity()
        self.fpn = FeaturePyramidNetwork(list(self.backbone.dims[1:]), fpn_channels,
                                         extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))  # fmt: skip
        self.dyhead = DyHead(fpn_channels, fpn_channels, num_blocks, backend=backend)
        self.cls_logits = nn.Conv2d(fpn_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(fpn_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(fpn_channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))  # ATSS's Scale per level
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):  # ATSS's head initialisation
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.num_classes, self.anchor_scale, self.topk = num_classes, float(anchor_scale), topk
        self.score_threshold, self.pre_nms_top_n = float(score_threshold), pre_nms_top_n
        self.nms_threshold, self.detections_per_image = float(nms_threshold), detections_per_image
        self.backend = backend
        self.config = {"vision": vision, "num_classes": num_classes, "fpn_channels": fpn_channels,
                       "num_blocks": num_blocks, "anchor_scale": float(anchor_scale), "topk": topk,
                       "score_threshold": float(score_threshold), "pre_nms_top_n": pre_nms_top_n,
                       "nms_threshold": float(nms_threshold), "detections_per_image": detections_per_image,
                       "prior_prob": prior_prob}  # fmt: skip

    @classmethod
    def from_florence(cls, florence, num_classes: int, vision_overrides: dict | None = None, **kwargs) -> ATSSDetector:
        """A detector whose CoSwin is the pretrained Florence's image tower (``florence.visual``: its weights, pyramid
        LayerNorms of stages 2-4 included, copied; UNUSED_BACKBONE_WEIGHTS are left out); the neck and head are fresh.
        ``vision_overrides``: CoSwin arguments that hold no weights (drop_path_rate, ...)."""
        from .florence import load_state_dict_strict

        det = cls(florence.visual.config | dict(vision_overrides or {}), num_classes, **kwargs)
        state = {k: v for k, v in florence.visual.state_dict().items() if not UNUSED_BACKBONE_WEIGHTS.match(k)}
        load_state_dict_strict(det.backbone, state, source="florence.visual")
        return det

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    # --- forward ---------------------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> P3-P7 after the DyHead blocks, each (B, fpn_channels, H / s, W / s)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, 3, H, W), got {got}")
        H, W = images.shape[-2:]
        if H % 32 or W % 32 or H == 0 or W == 0:
            raise ValueError(f"images: height and width must be positive multiples of 32 (the backbone's strides; "
                             f"pad them), got {H}x{W}")  # fmt: skip
        c2, c3, c4, c5 = self.backbone.forward_pyramid(images)
        feats = self.fpn(OrderedDict([("c3", c3.contiguous()), ("c4", c4.contiguous()), ("c5", c5.contiguous())]))
        return list(self.dyhead(list(feats.values())))

    def forward(self, images: torch.Tensor):
        feats = self.features(images)
        cls, box, ctr = [], [], []
        for level, f in enumerate(feats):
            B = f.shape[0]
            cls.append(self.cls_logits(f).permute(0, 2, 3, 1).reshape(B, -1, self.num_classes))
            box.append((self.bbox_pred(f) * self.scales[level].to(f.dtype)).permute(0, 2, 3, 1).reshape(B, -1, 4))
            ctr.append(self.centerness(f).reshape(B, -1))
        return torch.cat(cls, 1), torch.cat(box, 1), torch.cat(ctr, 1)

    # --- anchors, targets, losses ----------------------------------------------------------------------------------

    def anchors(self, image_size: tuple[int, int], device=None) -> tuple[torch.Tensor, list[int]]:
        """(anchors (A, 4) xyxy float32 in pixels, anchors per level) for images of ``image_size`` (H, W)."""
        return make_anchors(image_size, self.strides, self.anchor_scale, device)

    def loss(self, outputs, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
             image_size: tuple[int, int], num_pos_avg=None) -> dict:  # fmt: skip
        """ATSS's losses (module docstring) of a batch: {"loss", "loss_cls", "loss_box", "loss_centerness",
        "num_pos"}. ``boxes[i]``: (n_i, 4) xyxy pixels of image i (n_i may be 0), ``labels[i]``: (n_i,) int in
        [0, K). ``num_pos_avg``: a function (tensor -> tensor) that averages a count over ranks (default: this
        process's count; florence.tasks.global_mean in training)."""
        cls, deltas, ctr = outputs
        B = cls.shape[0]
        if len(boxes) != B or len(labels) != B:
            raise ValueError(f"boxes, labels: expected {B} entries (one per image), got {len(boxes)} and {len(labels)}")
        anchors, per_level = self.anchors(image_size, cls.device)
        if anchors.shape[0] != cls.shape[1]:
            raise ValueError(f"image_size: {tuple(image_size)} gives {anchors.shape[0]} anchors, the outputs have "
                             f"{cls.shape[1]}")  # fmt: skip
        target_labels, target_boxes = [], []
        for b in range(B):
            gt, lab = _check_targets(boxes[b], labels[b], self.num_classes, b)
            assigned = atss_assign(anchors, per_level, gt.to(anchors), self.topk)
            pos = assigned >= 0
            tl = torch.full((anchors.shape[0],), self.num_classes, dtype=torch.long, device=cls.device)
            tl[pos] = lab.to(cls.device)[assigned[pos]]
            tb = torch.zeros_like(anchors)
            tb[pos] = gt.to(anchors)[assigned[pos]]
            target_labels.append(tl)
            target_boxes.append(tb)
        return atss_losses(outputs, anchors, torch.stack(target_labels), torch.stack(target_boxes), self.num_classes,
                           num_pos_avg)  # fmt: skip

    # --- inference ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def postprocess(self, outputs, image_size: tuple[int, int]) -> list[dict]:
        """Detections per image: {"boxes": (n, 4) xyxy float32 pixels of the input images, "scores": (n,),
        "labels": (n,) int64 in [0, K)}, n <= detections_per_image (module docstring)."""
        from torchvision.ops import batched_nms

        cls, deltas, ctr = (o.float() for o in outputs)
        anchors, per_level = self.anchors(image_size, cls.device)
        H, W = image_size
        out = []
        for b in range(cls.shape[0]):
            keep_boxes, keep_scores, keep_labels = [], [], []
            start = 0
            for n in per_level:
                scores = cls[b, start : start + n].sigmoid()  # (n, K)
                centre = ctr[b, start : start + n].sigmoid()
                cand = (scores > self.score_threshold).nonzero()  # (m, 2): anchor, class
                if len(cand):
                    joint = scores[cand[:, 0], cand[:, 1]] * centre[cand[:, 0]]
                    top = joint.topk(min(self.pre_nms_top_n, len(joint))).indices
                    a, k = cand[top, 0], cand[top, 1]
                    bx = decode_boxes(deltas[b, start : start + n][a], anchors[start : start + n][a])
                    bx[:, 0::2] = bx[:, 0::2].clamp(0, W)
                    bx[:, 1::2] = bx[:, 1::2].clamp(0, H)
                    keep_boxes.append(bx)
                    keep_scores.append(joint[top].sqrt())
                    keep_labels.append(k)
                start += n
            if keep_boxes:
                bx, sc, lb = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
                keep = batched_nms(bx, sc, lb, self.nms_threshold)[: self.detections_per_image]  # sorted by score
                out.append({"boxes": bx[keep], "scores": sc[keep], "labels": lb[keep]})
            else:
                out.append({"boxes": cls.new_zeros(0, 4), "scores": cls.new_zeros(0),
                            "labels": torch.zeros(0, dtype=torch.long, device=cls.device)})  # fmt: skip
        return out

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[dict]:
        """forward + postprocess on (B, 3, H, W) images (eval mode is the caller's)."""
        return self.postprocess(self(images), tuple(images.shape[-2:]))

    # --- save / load -------------------------------------------------------------------------------------------------

    def no_weight_decay_names(self) -> set[str]:
        """Norms, biases, relative position tables and the per-level scales: AdamW leaves them undecayed."""
        return {n for n, p in self.named_parameters() if p.dim() <= 1 or "relative_position_bias_table" in n}

    def save_pretrained(self, directory: str) -> None:
        """config.json and model.safetensors in ``directory``, each written whole or not at all."""
        from .florence import save_tagged_folder

        save_tagged_folder(self, directory, "atss_dyhead")

    @classmethod
    def from_pretrained(cls, directory: str, map_location="cpu", **overrides) -> ATSSDetector:
        """A detector saved by :meth:`save_pretrained` (``backend`` and inference settings may be overridden);
        FileNotFoundError for a folder without its files, ValueError naming mismatched weights."""
        from .florence import load_tagged_folder

        return load_tagged_folder(cls, directory, "atss_dyhead", "an ATSSDetector", map_location, **overrides)


# --- functions (the detector's steps, each testable alone) ---------------------------------------------------------


def make_anchors(image_size, strides=ATSSDetector.strides, anchor_scale: float = 8.0, device=None):
    """(anchors (A, 4) xyxy float32, anchors per level): one square anchor of side anchor_scale x stride per cell,
    centred on the cell, levels of ceil(H / stride) x ceil(W / stride) cells, row-major."""
    H, W = int(image_size[0]), int(image_size[1])
    out, per_level = [], []
    for s in strides:
        h, w = -(-H // s), -(-W // s)
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * s
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        half = anchor_scale * s / 2
        out.append(torch.stack([cx - half, cy - half, cx + half, cy + half], -1).reshape(-1, 4))
        per_level.append(h * w)
    return torch.cat(out), per_level


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(n, 4) deltas (dx, dy, dw, dh) on (n, 4) xyxy anchors -> (n, 4) xyxy boxes (module docstring)."""
    deltas = deltas.float()
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    dx, dy = deltas[:, 0] * BOX_STDS[0], deltas[:, 1] * BOX_STDS[1]
    dw = (deltas[:, 2] * BOX_STDS[2]).clamp(max=MAX_LOG_RATIO)
    dh = (deltas[:, 3] * BOX_STDS[3]).clamp(max=MAX_LOG_RATIO)
    cx, cy, w, h = ax + dx * aw, ay + dy * ah, aw * dw.exp(), ah * dh.exp()
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`decode_boxes` (tests and analyses)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x, y = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    return torch.stack([(x - ax) / aw / BOX_STDS[0], (y - ay) / ah / BOX_STDS[1], torch.log(w / aw) / BOX_STDS[2],
                        torch.log(h / ah) / BOX_STDS[3]], -1)  # fmt: skip


def atss_assign(anchors: torch.Tensor, per_level: Sequence[int], gt: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """ATSS's assignment (module docstring): (A,) int64, the index of the box each anchor is assigned, -1 for
    negatives. anchors (A, 4) and gt (G, 4) xyxy pixels; per_level: anchors per level (their order in ``anchors``)."""
    from torchvision.ops import box_iou

    A, G = anchors.shape[0], gt.shape[0]
    assigned = torch.full((A,), -1, dtype=torch.long, device=anchors.device)
    if G == 0 or A == 0:
        return assigned
    ious = box_iou(anchors, gt)  # (A, G)
    acx, acy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    gcx, gcy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
    dist = ((acx[:, None] - gcx[None]) ** 2 + (acy[:, None] - gcy[None]) ** 2).sqrt()  # (A, G)
    candidates, start = [], 0
    for n in per_level:
        k = min(topk, n)
        order = torch.sort(dist[start : start + n], dim=0, stable=True).indices[:k]  # ties: the lower anchor index
        candidates.append(order + start)
        start += n
    cand = torch.cat(candidates)  # (C, G)
    cand_iou = ious.gather(0, cand)  # (C, G)
    threshold = cand_iou.mean(0) + (cand_iou.std(0) if cand.shape[0] > 1 else 0)  # (G,)
    cx, cy = acx[cand], acy[cand]  # (C, G)
    inside = torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy]).amin(0) > CENTRE_EPS
    # equal IoUs (a box smaller than every anchor has the same IoU with each anchor covering it) have a mean that
    # can round above them: compared within IOU_TOLERANCE, they all stay positive, as the formula means
    positive = (cand_iou >= threshold - IOU_TOLERANCE) & inside  # (C, G)
    best = torch.full((A, G), -1.0, dtype=ious.dtype, device=anchors.device)
    g_idx = torch.arange(G, device=anchors.device).expand_as(cand)
    best[cand[positive], g_idx[positive]] = ious[cand[positive], g_idx[positive]]
    value, index = best.max(1)  # ties: the first (lower) box index (argmax's rule)
    assigned[value >= 0] = index[value >= 0]
    return assigned


def centerness_targets(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b)) of each anchor centre in its (n, 4) box."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    left, top, right, bottom = cx - boxes[:, 0], cy - boxes[:, 1], boxes[:, 2] - cx, boxes[:, 3] - cy
    lr = torch.minimum(left, right) / torch.maximum(left, right)
    tb = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return (lr * tb).clamp(min=0).sqrt()


def atss_losses(outputs, anchors, target_labels, target_boxes, num_classes: int, num_pos_avg=None) -> dict:
    """ATSS's three losses from assigned targets: target_labels (B, A) in [0, K] (K: background), target_boxes
    (B, A, 4) xyxy (rows of negatives unused). See the module docstring for the normalisation."""
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    cls, deltas, ctr = outputs
    avg = num_pos_avg or (lambda x: x)
    pos = target_labels < num_classes
    num_pos = pos.sum().to(torch.float32)
    norm = avg(num_pos).clamp(min=1.0)
    onehot = F.one_hot(target_labels, num_classes + 1)[..., :num_classes].to(torch.float32)
    loss_cls = sigmoid_focal_loss(cls.float(), onehot, alpha=0.25, gamma=2.0, reduction="sum") / norm
    a = anchors.expand(cls.shape[0], -1, -1)[pos]
    tb = target_boxes[pos]
    ctr_t = centerness_targets(a, tb)
    ctr_norm = avg(ctr_t.sum().detach()).clamp(min=1e-6)  # on every rank, positives or not (a collective)
    if pos.any():
        pred = decode_boxes(deltas[pos], a)
        giou = generalized_box_iou_loss(pred, tb, reduction="none")
        loss_box = 2.0 * (giou * ctr_t).sum() / ctr_norm
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos].float(), ctr_t, reduction="sum") / norm
    else:  # no positives: zero losses that still reach every output (DeepSpeed wants all gradients defined)
        loss_box = deltas.float().sum() * 0.0
        loss_ctr = ctr.float().sum() * 0.0
    total = loss_cls + loss_box + loss_ctr
    return {"loss": total, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(),
            "loss_centerness": loss_ctr.detach(), "num_pos": num_pos}  # fmt: skip


def _check_targets(boxes, labels, num_classes: int, i: int):
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes[{i}]: expected (n, 4) xyxy pixels, got {got}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (boxes.shape[0],):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels[{i}]: expected ({boxes.shape[0]},) class indices, got {got}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels[{i}]: expected values in [0, {num_classes}), got {labels.tolist()}")
    if len(boxes) and not (torch.isfinite(boxes).all() and (boxes[:, 2:] > boxes[:, :2]).all()):
        raise ValueError(f"boxes[{i}]: expected finite xyxy boxes with x2 > x1 and y2 > y1, got {boxes.tolist()}")
    return boxes.float(), labels.long()


def coco_results(detections: Sequence[dict], image_ids, scales, category_ids: Sequence[int]) -> list[dict]:
    """COCO's detection-results format: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] in the
    original image's pixels (boxes divided by each image's ``scales`` entry: input pixels per original pixel);
    label k -> ``category_ids[k]``."""
    out = []
    for det, image_id, s in zip(detections, image_ids, scales, strict=True):
        b = det["boxes"].float().cpu() / float(s)
        for (x1, y1, x2, y2), score, k in zip(b.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[k]),
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5)})  # fmt: skip
    return out
