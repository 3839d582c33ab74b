"""florence.data.detection and the digit_canvases variant, on a small build (24 canvases per split at 128 px): the
generator's counts, sizes, tight boxes, overlap rule, split, determinism and rebuild stamp; curation's shards and its
refusal of every kind of bad annotation; the loader's box-aware plan (a hand-computed case, the evaluation plan),
epochs, ranks, resumption, empty images and crowd regions, and PIL vs DALI decoding."""

import json
import math
import os

import numpy as np
import pytest
import torch

import florence.data.detection as detection
from florence.data.builtin import _digit_images, _split
from florence.data.detection import (
    build_digit_canvases,
    curate_detection,
    digit_canvas,
    load_detection_eval_set,
    make_canvas,
    make_detection_loader,
    plan_detection,
    transform_boxes,
)
from florence.data.loader import MEAN, STD
from florence.optional import missing

HAS_DALI = missing("dali") is None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason=f"optional package missing: {missing('dali')}")
BACKENDS = ["torch"] + (["dali"] if HAS_DALI else [])
SIZE, LIMIT, SHARD = 128, 24, 10
# PIL (libjpeg-turbo) and DALI's CPU decoder gave identical pixels on every canvas built here (max and mean
# difference 0 over the 2,300 default canvases; DECODER_MAX_DIFF); the bound leaves one grey level for other builds.
# One grey level is 1 / (255 * 0.26) = 0.015 after CLIP's normalisation.
DECODER_MAX = 1 / (255 * min(STD)) + 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection")
    summary = build_digit_canvases(str(root / "raw"), SIZE, limit=LIMIT, workers=2, quiet=True)
    manifest = curate_detection(str(root / "raw" / "train.json"), str(root / "shards"), shard_size=SHARD)
    coco = {s: json.load(open(root / "raw" / f"{s}.json")) for s in ("train", "test")}
    return root, summary, coco, manifest


def _by_image(coco):
    out = {img["id"]: [] for img in coco["images"]}
    for a in coco["annotations"]:
        out[a["image_id"]].append(a)
    return out


def _rerender(n, split):
    digits8, labels = _digit_images(8)
    train, test = _split(labels, 0.2, 0)
    return digit_canvas(n, {"train": train, "test": test}[split], digits8, labels, SIZE, 0)


# --- the generator ------------------------------------------------------------------------------------------------


def test_counts_categories_sizes_and_split(data):
    _, summary, coco, _ = data
    assert (summary["train"], summary["test"], summary["size"]) == (LIMIT, LIMIT, SIZE)
    assert [c["id"] for c in coco["train"]["categories"]] == list(range(1, 11))
    assert coco["train"]["categories"][7] == {"id": 8, "name": "seven", "supercategory": "digit"}
    _, labels = _digit_images(8)
    train, test = _split(labels, 0.2, 0)
    for split, allowed in (("train", set(train.tolist())), ("test", set(test.tolist()))):
        c = coco[split]
        ids = [a["id"] for a in c["annotations"]]
        assert len(set(ids)) == len(ids) and min(ids) == 1
        for img in c["images"]:
            name = f"images/canvas_{img['id'] - 1:05d}.jpg"  # image id = canvas number + 1
            assert (img["width"], img["height"], img["file_name"]) == (SIZE, SIZE, name)
        for anns in _by_image(c).values():
            assert 1 <= len(anns) <= 6
        for a in c["annotations"]:
            assert a["digit_image"] in allowed  # held-out canvases show held-out digit images only
            assert a["category_id"] == labels[a["digit_image"]] + 1 and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            assert a["area"] == w * h and 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            assert 2 <= min(w, h) and max(w, h) <= 60
    counts = [len(v) for c in coco.values() for v in _by_image(c).values()]
    assert len(set(counts)) >= 4  # the count is drawn, not fixed


def test_boxes_are_tight_around_the_ink_and_respect_the_overlap_rule(data):
    from PIL import Image

    _, _, coco, _ = data
    digits8, _ = _digit_images(8)
    sides = []
    for split in ("train", "test"):
        anns = _by_image(coco[split])
        for img in coco[split]["images"][:12]:
            _, digits = _rerender(img["id"] - 1, split)
            assert [d["box"] for d in digits] == [a["bbox"] for a in anns[img["id"]]]
            for d in digits:
                side, (sx, sy) = d["side"], d["square"]
                sides.append(side)
                assert 10 <= side <= 60 and 0 <= sx <= SIZE - side and 0 <= sy <= SIZE - side
                grey = np.asarray(Image.fromarray(digits8[d["digit_image"]]).resize((side, side), Image.BICUBIC))
                ink = np.zeros((SIZE + 2, SIZE + 2), bool)  # a margin: the rows "just outside" always exist
                ink[sy + 1 : sy + 1 + side, sx + 1 : sx + 1 + side] = (255 - grey.astype(np.float32)) / 255 > 0.25
                x, y, w, h = (int(v) for v in d["box"])
                x, y = x + 1, y + 1
                assert ink[y : y + h, x].any() and ink[y : y + h, x + w - 1].any()  # border columns hold ink
                assert ink[y, x : x + w].any() and ink[y + h - 1, x : x + w].any()  # border rows hold ink
                assert not ink[:, x - 1].any() and not ink[:, x + w].any()  # and just outside there is none
                assert not ink[y - 1].any() and not ink[y + h].any()
            boxes = [a["bbox"] for a in anns[img["id"]]]
            for j, (x1, y1, w1, h1) in enumerate(boxes):
                for x0, y0, w0, h0 in boxes[:j]:  # a later digit against each earlier one
                    iw = max(0.0, min(x0 + w0, x1 + w1) - max(x0, x1))
                    ih = max(0.0, min(y0 + h0, y1 + h1) - max(y0, y1))
                    inter = iw * ih
                    assert inter / (w0 * h0 + w1 * h1 - inter) <= detection.MAX_IOU + 1e-9
                    assert inter / (w0 * h0) <= detection.MAX_COVER + 1e-9
    assert min(sides) < 20 and max(sides) > 35  # log-uniform over 10-60


def test_deterministic_and_a_canvas_does_not_depend_on_the_others(data, tmp_path):
    root, _, coco, _ = data
    build_digit_canvases(str(tmp_path / "a"), SIZE, limit=LIMIT, workers=1, quiet=True)
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.json").read_bytes() == (root / "raw" / f"{split}.json").read_bytes()
    name = coco["test"]["images"][3]["file_name"]
    assert (tmp_path / "a" / name).read_bytes() == (root / "raw" / name).read_bytes()
    build_digit_canvases(str(tmp_path / "b"), SIZE, limit=3, quiet=True)  # fewer canvases: the same first ones
    small = json.load(open(tmp_path / "b" / "test.json"))
    last = small["images"][-1]["id"]
    assert small["annotations"] == [a for a in coco["test"]["annotations"] if a["image_id"] <= last]


def test_the_coco_files_load_in_pycocotools(data):
    coco_mod = pytest.importorskip("pycocotools.coco", reason=str(missing("pycocotools")))
    root, _, coco, _ = data
    c = coco_mod.COCO(str(root / "raw" / "test.json"))
    assert c.getCatIds() == list(range(1, 11)) and len(c.getImgIds()) == LIMIT
    assert len(c.getAnnIds()) == len(coco["test"]["annotations"])


@pytest.mark.parametrize("constant, value", [("INK_ALPHA", 0.5), ("BACKGROUND", (100, 140)), ("CLUTTER", (0, 0))])
def test_a_rebuild_rewrites_the_canvases_when_a_rendering_constant_changed(tmp_path, monkeypatch, constant, value):
    build_digit_canvases(str(tmp_path), SIZE, limit=2, quiet=True)
    path = tmp_path / "images" / "canvas_00000.jpg"
    before, kept = path.read_bytes(), os.stat(path).st_mtime_ns
    build_digit_canvases(str(tmp_path), SIZE, limit=2, quiet=True)
    assert os.stat(path).st_mtime_ns == kept  # nothing changed: the files are kept
    monkeypatch.setattr(detection, constant, value)
    summary = build_digit_canvases(str(tmp_path), SIZE, limit=2, quiet=True)
    assert summary[constant.lower()] == (list(value) if isinstance(value, tuple) else value)
    if constant != "INK_ALPHA":  # the ink threshold changes the boxes, not the pixels
        assert path.read_bytes() != before
    assert os.stat(path).st_mtime_ns != kept


def test_builtin_cli_and_argument_errors(tmp_path, monkeypatch):
    from florence.data import builtin

    calls = []
    monkeypatch.setattr(detection, "build_digit_canvases", lambda *a, **k: calls.append((a, k)) or {"ok": 1})
    monkeypatch.setitem(builtin.VARIANTS, "digits", lambda *a, **k: calls.append((a, k)) or {"ok": 1})
    builtin.main(["--variant", "digit_canvases", "--out", str(tmp_path)])
    builtin.main(["--variant", "digit_canvases", "--out", str(tmp_path), "--size", "96"])
    builtin.main(["--out", str(tmp_path)])
    assert [a[1] for a, _ in calls[:2]] == [128, 96] and "size" not in calls[2][1]  # each variant's own default size
    monkeypatch.undo()
    for kwargs, message in (({"size": 32}, "size: expected an int >= 64, got 32"),
                            ({"test_fraction": 1.0}, r"test_fraction: expected a value in \(0, 1\)"),
                            ({"train_canvases": 0}, "train_canvases: expected an int >= 1, got 0"),
                            ({"limit": 0}, "limit: expected None or a positive int")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            build_digit_canvases(str(tmp_path / "never"), **kwargs)


# --- curation -----------------------------------------------------------------------------------------------------


def _read_shard_samples(shards_dir):
    import tarfile

    out = {}
    for name in sorted(os.listdir(shards_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shards_dir, name)) as tar:
                for m in tar:
                    key, ext = m.name.rsplit(".", 1)
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_curation_shards_manifest_and_labels(data):
    root, _, coco, manifest = data
    anns = _by_image(coco["train"])
    assert manifest["samples"] == LIMIT and [s["samples"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["annotations"] == len(coco["train"]["annotations"]) and manifest["empty_images"] == 0
    assert manifest["categories"] == coco["train"]["categories"]
    assert all(os.path.exists(root / "shards" / s["path"].replace(".tar", ".idx")) == HAS_DALI
               for s in manifest["shards"])  # fmt: skip
    samples = _read_shard_samples(root / "shards")
    assert sorted(samples) == [f"{k:09d}" for k in range(LIMIT)]
    for k, img in enumerate(coco["train"]["images"]):  # the input's order
        s = samples[f"{k:09d}"]
        meta = json.loads(s["json"])
        assert s["jpg"] == (root / "raw" / img["file_name"]).read_bytes()  # a JPEG is stored byte for byte
        assert (meta["image_id"], meta["file_name"], meta["width"], meta["height"]) == (img["id"], img["file_name"],
                                                                                        SIZE, SIZE)  # fmt: skip
        a = anns[img["id"]]
        assert meta["boxes"] == [x["bbox"] for x in a] and meta["annotation_ids"] == [x["id"] for x in a]
        assert meta["category_ids"] == [x["category_id"] for x in a]
        assert meta["labels"] == [x["category_id"] - 1 for x in a] and meta["iscrowd"] == [0] * len(a)


def test_max_images_curates_the_files_first_images_as_a_labelled_subset(data, tmp_path):
    root, _, coco, manifest = data
    sub = curate_detection(str(root / "raw" / "train.json"), str(tmp_path / "sub"), shard_size=10, max_images=7)
    first = coco["train"]["images"][:7]
    anns = _by_image(coco["train"])
    assert sub["samples"] == 7 and sub["annotations"] == sum(len(anns[img["id"]]) for img in first)
    assert sub["categories"] == manifest["categories"] and sub["args"]["max_images"] == 7
    full, part = _read_shard_samples(root / "shards"), _read_shard_samples(tmp_path / "sub")
    assert sorted(part) == [f"{k:09d}" for k in range(7)]
    assert all(part[k] == full[k] for k in part)  # the same samples, byte for byte, as the whole file's first 7
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_images: expected None or a positive int"):
            curate_detection(str(root / "raw" / "train.json"), str(tmp_path / "bad"), max_images=bad)


def _small_coco(root, tmp_path, n_images=3):
    coco = json.load(open(root / "raw" / "train.json"))
    coco["images"] = coco["images"][:n_images]
    ids = {img["id"] for img in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    for img in coco["images"]:
        img["file_name"] = str(root / "raw" / img["file_name"])  # absolute: the JSON may live anywhere
    return coco


def _curate(coco, tmp_path, **kwargs):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(coco))
    return curate_detection(str(path), str(tmp_path / "out"), **kwargs)


def _first_ann(coco, **changes):
    coco["annotations"][0].update(changes)
    return coco


BAD = {
    "negative": (lambda c: _first_ann(c, bbox=[-5, 3, 10, 10]),
                 r"in\.json: annotation 1 \(image 1\): bbox \[-5, 3, 10, 10\] has a negative corner.*x, y >= 0"),
    "zero_area": (lambda c: _first_ann(c, bbox=[5, 3, 0, 10]),
                  r"annotation 1 \(image 1\): bbox \[5, 3, 0, 10\] has zero or negative area.*expected w > 0, h > 0"),
    "past_the_edge": (lambda c: _first_ann(c, bbox=[100, 3, 40, 10]),
                      r"annotation 1 \(image 1\): bbox .* reaches \(140, 13\), past the image's 128 x 128 pixels"),
    "not_finite": (lambda c: _first_ann(c, bbox=[1, 2, float("nan"), 3]),
                   r"annotation 1 \(image 1\): bbox \[1, 2, nan, 3\]; expected \[x, y, w, h\], 4 finite numbers"),
    "unknown_category": (lambda c: _first_ann(c, category_id=99),
                         r"annotation 1 \(image 1\): unknown category id 99; expected one of \[1, 2, .* 10\]"),
    "unknown_image": (lambda c: _first_ann(c, image_id=999),
                      r"annotation 1 \(image 999\): unknown image id 999; expected one of the 'images' ids"),
    "duplicate_annotation": (lambda c: _first_ann(c, id=c["annotations"][1]["id"]),
                             r"annotation 2 \(image \d+\): duplicate annotation id"),
    "duplicate_image": (lambda c: c["images"].append(dict(c["images"][0])) or c,
                        r"image 1: duplicate image id; expected unique ids"),
    "missing_file": (lambda c: c["images"][1].update(file_name="nowhere/canvas.jpg") or c,
                     r"image 2: file nowhere/canvas\.jpg is missing; expected an image PIL decodes"),
    "size_mismatch": (lambda c: c["images"][2].update(width=100) or c,
                      r"image 3: file .*canvas_00002\.jpg is 128 x 128 pixels \(upright\), declared 100 x 128"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BAD))
def test_every_bad_annotation_raises_naming_it(data, tmp_path, kind):
    root = data[0]
    change, message = BAD[kind]
    coco = change(_small_coco(root, tmp_path))
    with pytest.raises(ValueError, match=message):
        _curate(coco, tmp_path)
    assert not (tmp_path / "out").exists()  # checked whole before anything is written


def test_an_undecodable_image_and_several_problems_at_once(data, tmp_path):
    root = data[0]
    coco = _small_coco(root, tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    coco["images"][0]["file_name"] = str(tmp_path / "broken.jpg")
    coco["annotations"][1]["bbox"] = [1, 1, -3, 4]
    with pytest.raises(ValueError, match=r"2 problem\(s\), nothing written") as e:
        _curate(coco, tmp_path)
    assert "image 1: file" in str(e.value) and "is unreadable: undecodable" in str(e.value)
    assert "zero or negative area" in str(e.value)


def test_empty_images_crowd_regions_and_slack(data, tmp_path):
    root = data[0]
    coco = _small_coco(root, tmp_path)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]  # image 1: no annotation
    second = [a for a in coco["annotations"] if a["image_id"] == 2]
    second[0]["iscrowd"] = 1
    x, y, w, h = second[-1]["bbox"]
    second[-1]["bbox"] = [x, y, SIZE + 0.5 - x, h]  # half a pixel past the edge: within BOX_SLACK, clipped
    m = _curate(coco, tmp_path, shard_size=2)
    assert (m["samples"], m["empty_images"], m["crowd_annotations"]) == (3, 1, 1)
    metas = {json.loads(s["json"])["image_id"]: json.loads(s["json"]) for s in
             _read_shard_samples(tmp_path / "out").values()}  # fmt: skip
    assert metas[1]["boxes"] == [] and metas[2]["iscrowd"] == [1] + [0] * (len(second) - 1)
    assert metas[2]["boxes"][-1] == [x, y, SIZE - x, h]
    for backend in BACKENDS:
        batch = next(iter(make_detection_loader(str(tmp_path / "out"), 3, SIZE, train=False, backend=backend)))
        assert batch["image_ids"].tolist() == [1, 2, 3]
        assert batch["boxes"][0].shape == (0, 4) and batch["labels"][0].shape == (0,)
        assert batch["boxes"][0].dtype == torch.float32 and batch["labels"][0].dtype == torch.int64
        expected = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in metas[2]["boxes"][1:]])
        assert torch.equal(batch["boxes"][1], expected)  # the crowd region is not a target
        assert batch["labels"][1].tolist() == metas[2]["labels"][1:]


def test_other_formats_are_stored_as_jpeg_and_a_non_square_image_is_padded(data, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 160, 4), dtype=np.uint8), "RGBA").save(tmp_path / "wide.png")
    coco = {"images": [{"id": 7, "file_name": "wide.png", "width": 160, "height": 96}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 20, 40, 30], "iscrowd": 0}],
            "categories": [{"id": 5, "name": "b"}, {"id": 3, "name": "a"}]}  # fmt: skip
    m = _curate(coco, tmp_path)
    assert [c["id"] for c in m["categories"]] == [3, 5]  # sorted by id: label k is categories[k]
    (sample,) = _read_shard_samples(tmp_path / "out").values()
    assert sample["jpg"][:2] == b"\xff\xd8" and json.loads(sample["json"])["labels"] == [0]
    for backend in BACKENDS:
        b = next(iter(make_detection_loader(str(tmp_path / "out"), 1, 80, train=False, backend=backend)))
        assert b["scales"].tolist() == [0.5] and b["boxes"][0].tolist() == [[5, 10, 25, 25]]
        assert torch.all(b["images"][0, :, 48:] == 0) and b["images"][0, :, :48].abs().sum(0).min() > 0


# --- the loader ---------------------------------------------------------------------------------------------------


def test_box_transform_and_placement_hand_computed():
    plan = {"scale": 0.5, "offset": (-10, 6)}  # a 200 x 100 image at half size on a 64-px canvas, 10 px cropped left
    boxes = [[20, 40, 30, 50],  # -> (0, 26, 15, 51): inside
             [0, 0, 30, 10],  # -> (-10, 6, 5, 11): a third left on the canvas, dropped
             [120, 100, 20, 40],  # -> (50, 56, 60, 76): 8 of its 20 rows left, dropped
             [100, 10, 40, 20],  # -> (40, 11, 60, 21): inside
             [2, 2, 3, 40],  # -> (-9, 7, -7.5, 27): off the canvas
             [60, 2, 3, 40],  # -> (20, 7, 21.5, 27): 1.5 px wide, dropped
             [40, 0, 20, 10]]  # fmt: skip  # -> (10, 6, 20, 11): 5 px high, kept
    xyxy, kept = transform_boxes(boxes, plan, 64)
    assert kept.tolist() == [True, False, False, True, False, False, True]
    assert xyxy[0].tolist() == [0, 26, 15, 51] and xyxy[3].tolist() == [40, 11, 60, 21]
    assert xyxy[2].tolist() == [50, 56, 60, 64] and xyxy[6].tolist() == [10, 6, 20, 11]
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100] = (255, 0, 0)
    image[:, 100:] = (0, 0, 255)
    x = make_canvas(image, plan, 64)
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    blue = (torch.tensor([0, 0, 1.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.all(x[:, :6] == 0) and torch.all(x[:, 56:] == 0)  # padded with CLIP's mean: 0
    assert torch.allclose(x[:, 6:56, :39], red[:, None, None].expand(3, 50, 39), atol=1e-5)
    assert torch.allclose(x[:, 6:56, 41:], blue[:, None, None].expand(3, 50, 23), atol=1e-5)  # edge at 100 s - 10


def test_training_plan_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        p = plan_detection(w, h, 64, True, rng, (0.75, 1.25))
        base = 64 / max(w, h)
        assert 0.75 * base <= p["scale"] <= 1.25 * base
        for n, o in zip((math.floor(w * p["scale"] + 1e-6), math.floor(h * p["scale"] + 1e-6)), p["offset"],
                        strict=True):  # fmt: skip
            assert (64 - n <= o <= 0) if n > 64 else (0 <= o <= 64 - n)
    assert plan_detection(200, 100, 64, False) == {"scale": 0.32, "offset": (0, 0)}


def test_eval_plan_boxes_are_the_original_boxes_times_s(data):
    root, _, coco, _ = data
    anns = _by_image(coco["train"])
    loader = make_detection_loader(str(root / "shards"), 8, 96, train=False, backend="torch")
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == [f"{k:09d}" for k in range(LIMIT)]  # in order
    for b in batches:
        assert torch.equal(b["scales"], torch.full((8,), 0.75))
        for iid, boxes, labels in zip(b["image_ids"].tolist(), b["boxes"], b["labels"], strict=True):
            a = anns[iid]
            expected = torch.tensor([[x * 0.75, y * 0.75, (x + w) * 0.75, (y + h) * 0.75] for x, y, w, h in
                                     (q["bbox"] for q in a)])  # fmt: skip
            assert torch.allclose(boxes, expected, atol=1e-5) and labels.tolist() == [q["category_id"] - 1 for q in a]


def _same_batches(a, b):
    return all(x["keys"] == y["keys"] and torch.equal(x["images"], y["images"])
               and all(torch.equal(p, q) for p, q in zip(x["boxes"], y["boxes"], strict=True)) for x, y in
               zip(a, b, strict=True))  # fmt: skip


def test_training_epochs_are_deterministic_and_differ_and_resume(data):
    root = data[0]
    loader = make_detection_loader(str(root / "shards"), 4, 64, backend="torch", seed=3)
    assert len(loader) == LIMIT // 4
    a = list(loader)
    b = list(make_detection_loader(str(root / "shards"), 4, 64, backend="torch", seed=3))
    assert _same_batches(a, b)
    x = a[0]
    assert x["images"].shape == (4, 3, 64, 64) and x["images"].dtype == torch.float32
    assert x["image_ids"].dtype == torch.int64 and x["scales"].dtype == torch.float32
    assert all(bx.dtype == torch.float32 and bx.shape[1:] == (4,) and bx.shape[0] == lab.shape[0]
               for bx, lab in zip(x["boxes"], x["labels"], strict=True))  # fmt: skip
    assert all(((bx >= 0) & (bx <= 64)).all() for batch in a for bx in batch["boxes"])
    assert sum(len(bx) for batch in a for bx in batch["boxes"]) > 0.7 * data[3]["annotations"]  # most boxes stay
    loader.set_epoch(1)
    c = list(loader)
    keys = [k for batch in c for k in batch["keys"]]
    assert keys != [k for batch in a for k in batch["keys"]] and sorted(keys) == [f"{k:09d}" for k in range(LIMIT)]
    scales = {k: s for batch in a for k, s in zip(batch["keys"], batch["scales"].tolist(), strict=True)}
    assert any(scales[k] != s for batch in c for k, s in zip(batch["keys"], batch["scales"].tolist(), strict=True))
    assert _same_batches(list(loader.iterate(start_batch=4)), c[4:])


def test_two_ranks_global_batch_equal_one_process(data):
    root = data[0]
    one = list(make_detection_loader(str(root / "shards"), 8, 64, backend="torch", seed=2))
    ranks = [list(make_detection_loader(str(root / "shards"), 4, 64, backend="torch", seed=2, rank=r, world_size=2))
             for r in (0, 1)]  # fmt: skip
    assert len(one) == len(ranks[0]) == len(ranks[1]) == LIMIT // 8
    for x, y, z in zip(one, *ranks, strict=True):
        assert x["keys"] == y["keys"] + z["keys"] and torch.equal(x["images"], torch.cat([y["images"], z["images"]]))
        assert all(torch.equal(p, q) for p, q in zip(x["boxes"], y["boxes"] + z["boxes"], strict=True))
    keys = [k for r in ranks for b in r for k in b["keys"]]
    assert sorted(keys) == [f"{k:09d}" for k in range(LIMIT)]  # the epoch once


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_torch_and_dali_give_the_same_batches(data, train):
    root = data[0]
    batches = [list(make_detection_loader(str(root / "shards"), 8, 96, backend=be, seed=4, train=train))
               for be in ("torch", "dali")]  # fmt: skip
    for p, d in zip(*batches, strict=True):
        assert p["keys"] == d["keys"] and torch.equal(p["scales"], d["scales"])
        assert all(torch.equal(x, y) for x, y in zip(p["boxes"], d["boxes"], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(p["labels"], d["labels"], strict=True))
        diff = (p["images"] - d["images"]).abs().max().item()
        assert diff <= DECODER_MAX, f"torch vs DALI images: max difference {diff:.4f}, allowed {DECODER_MAX:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_set(data, backend):
    root, _, coco, _ = data
    ev = load_detection_eval_set(str(root / "raw"), 64, backend=backend)
    assert ev["images"].shape == (LIMIT, 3, 64, 64) and ev["images"].dtype == torch.float32
    assert torch.equal(ev["scales"], torch.full((LIMIT,), 0.5))
    assert ev["image_ids"].tolist() == [img["id"] for img in coco["test"]["images"]]
    assert ev["annotations"] == str(root / "raw" / "test.json")
    assert [c["id"] for c in ev["categories"]] == list(range(1, 11))
    if backend == "dali":
        ref = load_detection_eval_set(str(root / "raw"), 64, backend="torch")["images"]
        assert (ref - ev["images"]).abs().max() <= DECODER_MAX


def test_bad_loader_arguments(data):
    d = str(data[0] / "shards")
    for kwargs, message in (({"rank": 2, "world_size": 2}, "rank: expected 0 <= rank < world_size = 2, got 2"),
                            ({"backend": "pil"}, "backend: expected 'auto', 'torch' or 'dali', got 'pil'"),
                            ({"split": "interleave"}, "split: expected 'global_batch' or 'rank'"),
                            ({"scale_range": (1.5, 1.0)}, r"scale_range: expected \(low, high\) with 0 < low <= high"),
                            ({"scale_range": 2}, "scale_range: expected"),
                            ({"num_threads": 0}, "num_threads: expected None or a positive int")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_detection_loader(d, 4, 64, **kwargs)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        make_detection_loader(d, 0, 64)
    with pytest.raises(ValueError, match="size: expected an int >= 8, got 4"):
        make_detection_loader(d, 4, 4)
    with pytest.raises(ValueError, match="start_batch: expected an int >= 0"):
        next(make_detection_loader(d, 4, 64, backend="torch").iterate(-1))
    with pytest.raises(ValueError, match="shard_size: expected a positive int"):
        curate_detection(str(data[0] / "raw" / "train.json"), str(data[0] / "never"), shard_size=0)


def test_rank_split_by_position_covers_the_epoch(data):
    root = data[0]
    split = [make_detection_loader(str(root / "shards"), 5, 64, backend="torch", rank=r, world_size=2, split="rank",
                                   drop_last=False) for r in (0, 1)]  # fmt: skip
    keys = [k for loader in split for b in loader for k in b["keys"]]
    assert sorted(keys) == [f"{k:09d}" for k in range(LIMIT)]
