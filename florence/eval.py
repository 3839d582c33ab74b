"""Evaluation of a two-tower model: zero-shot classification with prompt-template ensembles, image-text retrieval
recall@K both ways, and a linear probe on frozen features.

Zero-shot (CLIP's recipe, which Florence follows): each class's text embedding is the normalised mean of its
prompts' normalised embeddings (the templates below, our own list of 80 in CLIP's style); an image is assigned the
class of highest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.", "a picture of the {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.", "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of a {}.", "a blurry photo of a {}.", "a sharp photo of a {}.",
    "a grainy photo of a {}.", "a low resolution photo of a {}.", "a high resolution photo of a {}.",
    "a black and white photo of a {}.", "a faded photo of a {}.", "a noisy image of a {}.", "a clean image of a {}.",
    "a good photo of a {}.", "a bad photo of a {}.", "a nice photo of the {}.", "a poor photo of the {}.",
    "a large {}.", "a small {}.", "a big {}.", "a tiny {}.", "a photo of a large {}.", "a photo of a small {}.",
    "a centered photo of a {}.", "an off-center photo of a {}.", "a rotated photo of a {}.", "a tilted {}.",
    "a scan of a {}.", "a scanned image of the {}.", "a sketch of a {}.", "a drawing of a {}.", "a doodle of a {}.",
    "a rendering of a {}.", "a painting of a {}.", "a cartoon {}.", "an illustration of a {}.", "art of the {}.",
    "a handwritten {}.", "a hand-drawn {}.", "a written {}.", "a printed {}.", "a stamped {}.", "a digital {}.",
    "the {} on a page.", "the {} on a white background.", "the {} on a dark background.", "a {} in the frame.",
    "a thick {}.", "a thin {}.", "a bold {}.", "a faint {}.", "a neat {}.", "a messy {}.",
    "itap of a {}.", "my {}.", "the {}.", "a {}.", "this is a {}.", "there is a {} here.", "an example of a {}.",
    "one {}.", "a single {}.", "a clear {}.", "a clear photo of a {}.", "a typical {}.", "a simple {}.",
    "a plain {}.", "a pixelated {}.", "a low contrast {}.", "a high contrast {}.", "a zoomed in photo of a {}.",
    "a zoomed out photo of a {}.", "a snapshot of a {}.",
)  # fmt: skip


@torch.no_grad()
def zero_shot_classifier(model, classnames: Sequence[str], tokenizer: Callable, templates: Sequence[str] = TEMPLATES,
                         device: str | torch.device = "cpu", batch_size: int = 256) -> torch.Tensor:  # fmt: skip
    """(num_classes, D): per class, the normalised mean of its prompts' normalised text embeddings."""
    if not classnames:
        raise ValueError("classnames: expected at least one class name")
    if not templates or not all("{}" in t for t in templates):
        raise ValueError("templates: expected a non-empty list of strings, each with a {} for the class name")
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = torch.cat([model.encode_text(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])
        weights.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=0))
    return torch.stack(weights)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """{"top1": fraction, "top5": ...} of rows whose label is among the k largest logits (k capped at #classes)."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits (N, classes) and labels (N,): got {tuple(logits.shape)} and {tuple(labels.shape)}")
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[f"top{k}"] = (top == labels.view(-1, 1)).any(1).float().mean().item()
    return out


@torch.no_grad()
def zero_shot_evaluate(model, batches: Iterable, classifier: torch.Tensor, device: str | torch.device = "cpu",
                       ks: Iterable[int] = (1, 5)) -> dict[str, float]:  # fmt: skip
    """Top-k accuracy over (images, labels) batches against a :func:`zero_shot_classifier`."""
    logits, labels = [], []
    for images, y in batches:
        emb = model.encode_image(images.to(device)).float()
        logits.append(emb @ classifier.to(emb.device).T)
        labels.append(torch.as_tensor(y).view(-1).to(emb.device))
    if not logits:
        raise ValueError("batches: no data")
    return topk_accuracy(torch.cat(logits), torch.cat(labels), ks)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:  # fmt: skip
    """Recall@K both ways for normalised embeddings; ``text_to_image[j]`` is the image index of caption j (an image
    may have several captions).

    image->text: an image counts as found at K when any of its captions ranks in its top K; text->image: a caption
    counts when its image ranks in its top K. Keys "i2t_r1", "t2i_r5", ...
    """
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb (N_img, D) and text_emb (N_txt, D): got {tuple(image_emb.shape)}, "
                         f"{tuple(text_emb.shape)}")  # fmt: skip
    t2i = torch.as_tensor(text_to_image, device=text_emb.device).long()
    if t2i.shape != (text_emb.shape[0],) or (t2i < 0).any() or (t2i >= image_emb.shape[0]).any():
        raise ValueError(f"text_to_image: expected ({text_emb.shape[0]},) image indices in [0, {image_emb.shape[0]})")
    sim = image_emb.float() @ text_emb.float().T  # (N_img, N_txt)
    out = {}
    for k in ks:
        kt = min(k, sim.shape[1])
        top_t = sim.topk(kt, dim=1).indices  # (N_img, k) caption indices
        out[f"i2t_r{k}"] = (
            (t2i[top_t] == torch.arange(sim.shape[0], device=sim.device).view(-1, 1)).any(1).float().mean().item()
        )
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices  # (N_txt, k) image indices
        out[f"t2i_r{k}"] = (top_i == t2i.view(-1, 1)).any(1).float().mean().item()
    return out


def linear_probe(train_features, train_labels, test_features, test_labels, c: float = 1.0,
                 max_iter: int = 1000) -> dict[str, float]:  # fmt: skip
    """Logistic regression (L-BFGS, L2 strength 1/c) on frozen, normalised features; returns train/test accuracy.

    CLIP's linear-probe protocol; c is the inverse regularisation (sweep it on a validation split for real use).
    """
    from sklearn.linear_model import LogisticRegression

    def prep(x):
        x = torch.as_tensor(x).float()
        return F.normalize(x, dim=-1).cpu().numpy()

    xtr, xte = prep(train_features), prep(test_features)
    ytr, yte = np.asarray(torch.as_tensor(train_labels).cpu()), np.asarray(torch.as_tensor(test_labels).cpu())
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"features and labels differ in length: train {len(xtr)} vs {len(ytr)}, "
                         f"test {len(xte)} vs {len(yte)}")  # fmt: skip
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(xtr, ytr)
    return {"train_acc": float(clf.score(xtr, ytr)), "test_acc": float(clf.score(xte, yte))}


COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_evaluate(annotations, results: list[dict], quiet: bool = True) -> dict[str, float]:
    """COCO's box AP of detection results, by pycocotools' ``COCOeval`` (iouType "bbox", its default parameters:
    IoU thresholds .50:.05:.95, 101-point interpolated precision, at most 100 detections per image, area ranges
    small < 32^2 <= medium < 96^2 <= large in the annotation's ``area``).

    annotations: a COCO instances JSON (path) or its dict; results: COCO's results format (``[{"image_id",
    "category_id", "bbox": [x, y, w, h], "score"}]``, original pixels; florence.models.detection.coco_results).
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} (COCOeval's stats[0:6]; -1 where a range has no ground
    truth) and "detections". Every image of the annotations is evaluated, so images with no result count as
    misses; an empty ``results`` gives 0.0 (pycocotools' loadRes refuses an empty list). Raises ValueError for a
    result naming an image or category the annotations do not have. Needs pycocotools (florence.optional).
    """
    import contextlib
    import copy
    import io
    import json

    from florence.optional import require

    require("pycocotools", "florence.eval.coco_evaluate")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if isinstance(annotations, dict):
        data = copy.deepcopy(annotations)
    else:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
    image_ids = {im["id"] for im in data.get("images", [])}
    cat_ids = {c["id"] for c in data.get("categories", [])}
    for i, r in enumerate(results):
        if r.get("image_id") not in image_ids:
            raise ValueError(f"results[{i}]: image_id {r.get('image_id')!r} is not an image of the annotations")
        if r.get("category_id") not in cat_ids:
            raise ValueError(f"results[{i}]: category_id {r.get('category_id')!r} is not a category of the "
                             f"annotations ({sorted(cat_ids)})")  # fmt: skip
    if not results:
        return {k: 0.0 for k in COCO_METRICS} | {"detections": 0}
    data.setdefault("info", {})
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(COCO_METRICS, ev.stats[:6], strict=True)} | {"detections": len(results)}
