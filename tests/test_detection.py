"""The detector (florence.models.detection) and COCO evaluation (florence.eval.coco_evaluate): ATSS assignment against
an independent brute-force computation on hand-built scenes (ties, boxes smaller than every anchor, boxes at the
border, no boxes), the three losses against their formulas on tiny cases, the box coder, fused backends against the
reference backend for the whole detector (outputs and every gradient), an image without boxes trains and infers,
inference's limits, save/load and from_florence, input errors, and COCOeval's perfect / shuffled cases."""

import math
import statistics

import pytest
import torch

from florence.models import create_model, get_config
from florence.models.detection import (
    ATSSDetector,
    atss_assign,
    atss_losses,
    centerness_targets,
    coco_results,
    decode_boxes,
    encode_boxes,
    make_anchors,
)
from tests.conftest import requires, runnable_backends

VISION = get_config("florence_cpu_demo")["vision"]


def _tiny(backend=None, **kw):
    torch.manual_seed(0)
    return ATSSDetector(VISION | {"drop_path_rate": 0.0}, 3, fpn_channels=32, num_blocks=1, backend=backend, **kw)


# --- ATSS assignment ---------------------------------------------------------------------------------------------


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def brute_force_atss(anchors, per_level, gts, topk=9):
    """ATSS's rule written out in plain Python (floats, loops), independently of the tensor code."""
    A = [tuple(map(float, a)) for a in anchors.tolist()]
    G = [tuple(map(float, g)) for g in gts.tolist()]
    pos = {}  # anchor -> list of (iou, gt)
    for g_i, g in enumerate(G):
        gx, gy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
        cands, start = [], 0
        for n in per_level:
            dists = []
            for a_i in range(start, start + n):
                a = A[a_i]
                ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
                dists.append((math.hypot(ax - gx, ay - gy), a_i))
            dists.sort()  # by distance, then by index: ties go to the lower anchor index
            cands += [a_i for _, a_i in dists[: min(topk, n)]]
            start += n
        ious = [_iou(A[a_i], g) for a_i in cands]
        thr = statistics.fmean(ious) + (statistics.stdev(ious) if len(ious) > 1 else 0.0)
        for a_i, iou in zip(cands, ious, strict=True):
            a = A[a_i]
            ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            inside = min(ax - g[0], ay - g[1], g[2] - ax, g[3] - ay) > 0.01
            if iou >= thr - 1e-6 and inside:
                pos.setdefault(a_i, []).append((iou, g_i))
    out = [-1] * len(A)
    for a_i, lst in pos.items():
        best = max(v for v, _ in lst)
        out[a_i] = min(g for v, g in lst if v == best)  # ties: the lower box index
    return out


SCENES = {
    "one box": [[30.0, 40.0, 70.0, 90.0]],
    "two identical boxes (an IoU tie)": [[20.0, 20.0, 60.0, 60.0], [20.0, 20.0, 60.0, 60.0]],
    "a box centred between anchors (distance ties)": [[16.0, 16.0, 32.0, 32.0]],
    "boxes smaller than every anchor": [[50.0, 50.0, 53.0, 53.0], [9.0, 9.0, 14.0, 12.0]],
    "boxes at the border": [[0.0, 0.0, 20.0, 30.0], [100.0, 90.0, 128.0, 128.0], [0.0, 60.0, 128.0, 70.0]],
    "crowded, overlapping boxes of many sizes": [[10.0, 10.0, 70.0, 70.0], [20.0, 20.0, 50.0, 50.0],
                                                 [40.0, 30.0, 120.0, 110.0], [64.0, 64.0, 80.0, 76.0],
                                                 [5.0, 90.0, 45.0, 126.0], [60.0, 5.0, 72.0, 19.0]],
}  # fmt: skip


@pytest.mark.parametrize("scene", list(SCENES))
def test_atss_assignment_matches_the_brute_force_rule(scene):
    anchors, per_level = make_anchors((128, 128))
    anchors = anchors.double()
    gt = torch.tensor(SCENES[scene], dtype=torch.float64)
    got = atss_assign(anchors, per_level, gt).tolist()
    want = brute_force_atss(anchors, per_level, gt)
    assert got == want
    if scene == "two identical boxes (an IoU tie)":
        assert 0 in got and 1 not in got  # every tie to the lower index
    if scene == "boxes smaller than every anchor":
        assert sum(g == 0 for g in got) > 0  # equal candidate IoUs stay positive (their mean rounds above them)


def test_atss_assignment_without_boxes_and_on_a_non_square_image():
    anchors, per_level = make_anchors((64, 96))
    assert per_level == [8 * 12, 4 * 6, 2 * 3, 1 * 2, 1 * 1]
    assert atss_assign(anchors, per_level, torch.zeros(0, 4)).eq(-1).all()
    gt = torch.tensor([[10.0, 5.0, 50.0, 40.0], [60.0, 30.0, 90.0, 60.0]])
    assert atss_assign(anchors.double(), per_level, gt.double()).tolist() == brute_force_atss(anchors, per_level, gt)


def test_anchors_are_8_strides_wide_and_centred_on_their_cells():
    anchors, per_level = make_anchors((128, 128))
    assert per_level == [256, 64, 16, 4, 1]
    assert anchors[0].tolist() == [4.0 - 32, 4.0 - 32, 4.0 + 32, 4.0 + 32]
    assert anchors[-1].tolist() == [64.0 - 512, 64.0 - 512, 64.0 + 512, 64.0 + 512]


# --- box coder and losses ----------------------------------------------------------------------------------------


def test_box_coder_round_trips_and_clamps_huge_sizes():
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 30.0, 60.0]])
    boxes = torch.tensor([[5.0, 7.0, 40.0, 33.0], [12.0, 18.0, 50.0, 44.0]])
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, rtol=0, atol=1e-4)
    huge = decode_boxes(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchors[:1])
    assert torch.allclose(huge[0, 2] - huge[0, 0], torch.tensor(64.0 * 1000 / 16))


def test_losses_match_their_formulas_on_a_tiny_case():
    """Three anchors, two classes: anchor 0 positive (class 1), anchors 1-2 negative."""
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0], [32.0, 32.0, 64.0, 64.0]])
    cls = torch.tensor([[[0.3, -1.2], [2.0, -0.5], [-3.0, 0.1]]])
    deltas = torch.tensor([[[0.5, -0.2, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    ctr = torch.tensor([[0.4, -0.3, 0.2]])
    gt = torch.tensor([4.0, 6.0, 30.0, 24.0])
    labels = torch.tensor([[1, 2, 2]])  # 2 = background
    tboxes = torch.stack([gt, torch.zeros(4), torch.zeros(4)])[None]
    out = atss_losses((cls, deltas, ctr), anchors, labels, tboxes, 2)

    def focal(x, t):  # sigmoid focal loss, alpha .25, gamma 2
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        return -(0.25 if t else 0.75) * (1 - pt) ** 2 * math.log(pt)

    targets = [[0, 1], [0, 0], [0, 0]]
    want_cls = sum(focal(cls[0, a, k].item(), targets[a][k]) for a in range(3) for k in range(2)) / 1
    # anchor 0's centre (16, 16): l 12, t 10, r 14, b 8
    c_t = math.sqrt(12 / 14 * 8 / 10)
    x1, y1, x2, y2 = decode_boxes(deltas[0, :1], anchors[:1])[0].tolist()
    inter = max(0, min(x2, 30) - max(x1, 4)) * max(0, min(y2, 24) - max(y1, 6))
    union = (x2 - x1) * (y2 - y1) + 26 * 18 - inter
    hull = (max(x2, 30) - min(x1, 4)) * (max(y2, 24) - min(y1, 6))
    giou = inter / union - (hull - union) / hull
    want_box = 2.0 * (1 - giou) * c_t / c_t
    z = ctr[0, 0].item()
    want_ctr = -(c_t * math.log(1 / (1 + math.exp(-z))) + (1 - c_t) * math.log(1 - 1 / (1 + math.exp(-z))))
    assert out["num_pos"].item() == 1
    assert out["loss_cls"].item() == pytest.approx(want_cls, rel=1e-5)
    assert out["loss_box"].item() == pytest.approx(want_box, rel=1e-5)
    assert out["loss_centerness"].item() == pytest.approx(want_ctr, rel=1e-5)
    assert out["loss"].item() == pytest.approx(want_cls + want_box + want_ctr, rel=1e-5)
    assert centerness_targets(anchors[:1], gt[None]).item() == pytest.approx(c_t, rel=1e-6)


def test_loss_normalisation_uses_the_rank_average_of_positives():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0]])
    outputs = (torch.zeros(1, 2, 2), torch.zeros(1, 2, 4), torch.zeros(1, 2))
    labels, boxes = torch.tensor([[0, 2]]), torch.tensor([[[2.0, 2.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]]])
    one = atss_losses(outputs, anchors, labels, boxes, 2)
    four = atss_losses(outputs, anchors, labels, boxes, 2, num_pos_avg=lambda x: x * 4)  # other ranks: 7 more
    assert four["loss_cls"].item() == pytest.approx(one["loss_cls"].item() / 4)
    assert four["loss_centerness"].item() == pytest.approx(one["loss_centerness"].item() / 4)
    assert four["loss_box"].item() == pytest.approx(one["loss_box"].item() / 4)


# --- the whole detector ----------------------------------------------------------------------------------------------


def test_forward_shapes_and_the_classification_prior():
    det = _tiny().eval()
    x = torch.randn(2, 3, 128, 96)
    cls, box, ctr = det(x)
    A = 16 * 12 + 8 * 6 + 4 * 3 + 2 * 2 + 1
    assert cls.shape == (2, A, 3) and box.shape == (2, A, 4) and ctr.shape == (2, A)
    assert det.cls_logits.bias[0].item() == pytest.approx(-math.log(99))


def _targets():
    boxes = [torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 64.0, 90.0, 80.0]]), torch.zeros(0, 4)]
    return boxes, [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]


@pytest.mark.parametrize("backend", [b for b in runnable_backends("modulated_deform_conv2d", "cpu")
                                     if b not in ("reference",)])  # fmt: skip
def test_fused_backends_match_the_reference_backend_for_the_whole_detector(backend):
    """Head outputs, the loss and every parameter gradient of a tiny detector, fused fp32 against the reference
    backend in fp32 and float64 by KERNELS.md's rule (at most twice the fp32 reference's error). The DyHead offsets
    are made non-zero, so the deformable sampling is exercised off the grid."""
    from florence_kernels.testing import assert_close_to_reference

    ref = _tiny("reference")
    with torch.no_grad():
        for blk in ref.dyhead.dyhead_blocks:
            blk.spatial_conv_offset.weight.normal_(0, 0.05)
    models = {"fused": _tiny(backend), "reference": ref, "ref64": _tiny("reference").double()}
    for m in models.values():
        m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    boxes, labels = _targets()
    boxes = [b / 2 for b in boxes]
    outs = {}
    for name, m in models.items():
        xi = x.double() if name == "ref64" else x
        o = m(xi)
        loss = m.loss(o, [b.to(xi.dtype) for b in boxes], labels, (64, 64))["loss"]
        (loss + sum(t.square().mean() for t in o)).backward()
        outs[name] = [*o, loss] + [p.grad for p in m.parameters()]
    names = ["cls", "box", "centerness", "loss"] + [n for n, _ in ref.named_parameters()]
    for n, a, b, c in zip(names, outs["fused"], outs["reference"], outs["ref64"], strict=True):
        assert_close_to_reference(a, c, b, atol=1e-6, what=n)


def test_an_image_without_boxes_trains_and_infers():
    det = _tiny()
    x = torch.randn(2, 3, 64, 64)
    losses = det.loss(det(x), [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (64, 64))
    assert losses["num_pos"].item() == 0 and losses["loss_box"].item() == 0
    losses["loss"].backward()
    grads = [p.grad for p in det.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert det.cls_logits.weight.grad.abs().sum() > 0  # the focal loss pushes every anchor towards background
    det.eval()
    for d in det.detect(x):
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) == len(d["scores"]) == len(d["labels"])


def test_inference_keeps_at_most_the_limit_sorted_and_inside_the_image():
    det = _tiny(detections_per_image=7, score_threshold=0.0).eval()
    with torch.no_grad():
        det.cls_logits.bias.fill_(2.0)  # every anchor and class above the threshold
    dets = det.detect(torch.randn(1, 3, 64, 96))
    d = dets[0]
    assert len(d["scores"]) == 7
    assert (d["scores"][:-1] >= d["scores"][1:]).all()
    assert (d["boxes"][:, 0::2] >= 0).all() and (d["boxes"][:, 0::2] <= 96).all()
    assert (d["boxes"][:, 1::2] >= 0).all() and (d["boxes"][:, 1::2] <= 64).all()
    res = coco_results(dets, [42], [0.5], [11, 12, 13])
    assert len(res) == 7 and {r["category_id"] for r in res} <= {11, 12, 13} and res[0]["image_id"] == 42
    b = d["boxes"][0] / 0.5
    assert res[0]["bbox"] == pytest.approx([b[0].item(), b[1].item(), (b[2] - b[0]).item(), (b[3] - b[1]).item()],
                                           abs=0.01)  # fmt: skip


def test_save_load_and_from_florence(tmp_path):
    det = _tiny()
    det.save_pretrained(str(tmp_path / "det"))
    back = ATSSDetector.from_pretrained(str(tmp_path / "det"))
    x = torch.randn(1, 3, 64, 64)
    det.eval(), back.eval()
    for a, b in zip(det(x), back(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ATSSDetector.from_pretrained(str(tmp_path))
    flo = create_model("florence_cpu_demo")
    det2 = ATSSDetector.from_florence(flo, 10, {"drop_path_rate": 0.0}, fpn_channels=32, num_blocks=1)
    own = det2.backbone.state_dict()
    for k, v in flo.visual.state_dict().items():
        assert torch.equal(own[k], v) if k in own else k.startswith(("norm.", "pyramid_norms.0."))
    assert len(own) == len(flo.visual.state_dict()) - 4


def test_bad_inputs_get_clear_errors():
    det = _tiny()
    with pytest.raises(ValueError, match="multiples of 32"):
        det(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, H, W\)"):
        det(torch.randn(3, 64, 64))
    out = det(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"boxes\[0\]: expected finite xyxy boxes with x2 > x1"):
        det.loss(out, [torch.tensor([[10.0, 10.0, 5.0, 20.0]])], [torch.tensor([0])], (64, 64))
    with pytest.raises(ValueError, match=r"labels\[0\]: expected values in \[0, 3\)"):
        det.loss(out, [torch.tensor([[1.0, 1.0, 5.0, 20.0]])], [torch.tensor([3])], (64, 64))
    with pytest.raises(ValueError, match="fpn_channels: 40 is not a multiple of 16"):
        ATSSDetector(VISION, 3, fpn_channels=40)


# --- COCO evaluation -------------------------------------------------------------------------------------------------


def _coco_gt(n_images=20, seed=0):
    import random

    rng = random.Random(seed)
    images = [{"id": i + 1, "width": 128, "height": 128, "file_name": f"{i}.jpg"} for i in range(n_images)]
    anns = []
    for im in images:
        for _ in range(rng.randint(1, 5)):
            s = rng.uniform(10, 60)
            x, y = rng.uniform(0, 128 - s), rng.uniform(0, 128 - s)
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": rng.randint(1, 10),
                         "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})  # fmt: skip
    cats = [{"id": c, "name": str(c - 1)} for c in range(1, 11)]
    return {"images": images, "annotations": anns, "categories": cats}


@requires("pycocotools")
def test_coco_evaluation_perfect_predictions_give_1_and_shuffled_labels_about_0():
    from florence.eval import coco_evaluate

    gt = _coco_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]  # fmt: skip
    scores = coco_evaluate(gt, perfect)
    assert scores["AP"] == pytest.approx(1.0) and scores["AP50"] == pytest.approx(1.0)
    assert scores["AP75"] == pytest.approx(1.0)
    shuffled = [dict(r, category_id=r["category_id"] % 10 + 1) for r in perfect]  # every label wrong
    assert coco_evaluate(gt, shuffled)["AP"] < 0.05
    assert coco_evaluate(gt, [])["AP"] == 0.0
    with pytest.raises(ValueError, match=r"results\[0\]: image_id 999"):
        coco_evaluate(gt, [dict(perfect[0], image_id=999)])
    with pytest.raises(ValueError, match=r"results\[0\]: category_id 11"):
        coco_evaluate(gt, [dict(perfect[0], category_id=11)])


def test_the_benchmarks_cpu_case_runs_on_every_cpu_provider():
    """benchmarks/bench_detection.py: the quick CPU case through each provider that runs here gives one finite loss
    whose gradient reaches the backbone (the same detector weights in every provider: equal losses)."""
    from benchmarks import bench_detection as bench

    (case,) = bench.cases(True, "cpu", torch.float32)
    losses = {}
    for p in bench.providers("cpu"):
        if p.unavailable("cpu"):
            continue
        inputs = case.make_inputs("cpu", torch.float32)
        loss = p.fn(*inputs)
        loss.backward()
        losses[p.name] = loss.item()
    assert set(losses) == {"reference", "fused", "cpp"}
    assert all(math.isfinite(v) for v in losses.values())
    assert max(losses.values()) - min(losses.values()) < 1e-3 * abs(losses["reference"])
