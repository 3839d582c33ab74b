"""Object-detection data: the built-in digit canvases (COCO annotations), curation of any COCO instances file into
webdataset shards, and a loader of box-aware batches with two JPEG decoders (PIL, NVIDIA DALI) behind one
augmentation code path.

    python -m florence.data.builtin --variant digit_canvases --out DIR [--size 128]
    python -m florence.data.detection curate --annotations DIR/train.json --out DIR-shards [--image-root DIR]
        [--shard-size 256] [--max-images N] [--quiet]
    loader = make_detection_loader("DIR-shards", batch_size=16, size=128, seed=0, backend="auto")
    loader.set_epoch(e)
    for batch in loader:  # {"images": (B, 3, S, S) float32, "boxes": [(n_i, 4) float32 xyxy], "labels": [(n_i,)
        ...               #  int64], "image_ids": (B,) int64, "scales": (B,) float32, "keys": [...]}

Digit canvases (``build_digit_canvases``): 128 x 128 RGB images, each a textured light background with a few dark
strokes, arcs, rectangles and blobs of clutter, then 1-6 of scikit-learn's handwritten digits (8x8, upscaled bicubic
to 10-60 px) in random dark inks, placed with limited overlap. One box per digit: the tight box of its ink, in COCO's
xywh; category = the digit (COCO ids 1-10). Train canvases show training digit images only, held-out canvases
held-out ones (``builtin._split``).

Curation (``curate_detection``): a COCO instances JSON is checked whole before anything is written; a wrong box,
an unknown category or image, a duplicate id, a missing, undecodable or wrongly sized image raises one ValueError
listing every problem (the file, the annotation and image ids, what is wrong and what was expected); nothing is
dropped quietly. A box may reach BOX_SLACK pixels past the image's edges (float rounding in other tools' exports);
such a box is clipped to the image in the shards. Images without annotations are kept (an empty image is a valid
sample, a lesson in "nothing here"). Crowd regions (iscrowd=1) are stored with their flag; the loader leaves them
out of the training targets (COCO's evaluation ignores detections matched to them, it does not ask for them).
Shards ``shard-00000.tar`` ... hold ``<key>.jpg`` (upright RGB or grey JPEG files byte for byte, anything else
re-encoded upright as 8-bit RGB at quality 95, as ``florence.data.curate`` stores images) and ``<key>.json``
({"key", "image_id", "file_name", "width", "height", "boxes": [[x, y, w, h], ...] (COCO xywh, pixels),
"category_ids", "labels" (0..K-1: the position of the category id among the sorted ids), "iscrowd",
"annotation_ids"}), DALI index files beside them (when DALI is installed) and ``manifest.json`` (shards with their
sample counts and SHA-256, samples, annotations, the categories sorted by id: label k is categories[k]).

Loader plan, computed in Python from seeded generators so both backends give the same boxes exactly:
- training (per image, from (seed, epoch, key)): scale s = size / max(w, h) * uniform(scale_range); the image
  resized by s (``resize_exact``), then placed at a random offset on a size x size canvas: cropped where it is
  larger, padded at a random position with CLIP's mean colour (0 after normalisation) where it is smaller. No
  flips: a mirrored digit is another glyph (or none).
- evaluation: s = size / max(w, h), the image at the top-left, padded right and bottom, never cropped.
- boxes: xyxy = (x s + ox, y s + oy, (x + w) s + ox, (y + h) s + oy) for the image's offset (ox, oy) on the canvas
  (negative where cropped), clipped to [0, size]; a box with less than MIN_VISIBLE of its area left, or clipped
  narrower or shorter than MIN_BOX_SIDE pixels, leaves the targets (a sliver of a digit is no digit).
- backend="torch": PIL decoding (``upright``, ``to_rgb8``); backend="dali": DALI's image decoder
  (``fn.decoders.image``, device "cpu", one pipeline per loader); "auto": DALI where it imports. The two decoders
  gave identical pixels on every canvas (DECODER_MAX_DIFF = 0 grey levels), so the backends' batches are equal.
  A batch of 16 canvases at 128 px takes 19-20 ms in training and 10-11 ms in evaluation with either backend, on
  one core of this busy 2-core machine (load average 3): decoding is 0.2-0.4 ms of the 1.2 ms per image, PIL's
  resize and the normalisation the rest.
Samples are read from the shards by offset (an index of each tar built once); ranks and ``iterate(start_batch)``
as ``florence.data.video``'s loader (``split="global_batch"`` or ``"rank"``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import tarfile

import numpy as np
import torch

from florence.data.loader import MEAN, STD, _rng
from florence_kernels._io import atomic_write, atomic_write_bytes, atomic_write_text

# --- rendering constants of the digit canvases (recorded in classes.json: a change rebuilds the canvases) ----------
# Digit sides drawn log-uniform over 10-60 px on a 128-px canvas: from about the smallest a 4-px-patch stem still
# resolves (an 8x8 glyph at 10 px is barely more than its strokes) to half the canvas, so the sizes span the
# small / medium objects of COCO's area ranges (32^2 px splits them) and scale matters.
DIGIT_SIDES = (10, 60)
DIGITS_PER_CANVAS = (1, 6)  # uniform; fewer when a digit finds no place
# A placement is refused when its tight box overlaps an earlier digit's with IoU above MAX_IOU or covers more than
# MAX_COVER of its area: every digit stays readable (it is drawn over, never hidden) while boxes may still touch
# and overlap a little, as objects do. PLACEMENT_TRIES positions per digit, then the digit is left out.
MAX_IOU = 0.1
MAX_COVER = 0.3
PLACEMENT_TRIES = 50
# A pixel is ink where the digit's alpha (its darkness, 0-1) exceeds INK_ALPHA: the bicubic upscaling leaves faint
# ringing around the strokes that nobody would call part of the digit; its box is the tight box of these pixels.
INK_ALPHA = 0.25
# Background: a coarse BACKGROUND_GRID x BACKGROUND_GRID grid of light colours (BACKGROUND range per channel)
# upscaled bicubic, plus per-pixel Gaussian noise of BACKGROUND_NOISE grey levels.
BACKGROUND = (170, 250)
BACKGROUND_GRID = 6
BACKGROUND_NOISE = 6.0
INK = (0, 90)  # digit and clutter colours per channel: dark, so clutter is as dark as the digits
CLUTTER = (2, 6)  # strokes, arcs, rectangles and blobs per canvas, uniform in [2, 6], drawn before the digits

# --- curation and loader constants ----------------------------------------------------------------------------------
BOX_SLACK = 1.0  # pixels a box may reach past the image's edges (then clipped to it); more is an error
MIN_VISIBLE = 0.5  # fraction of a box's area that must stay on the canvas for it to stay a target
MIN_BOX_SIDE = 2.0  # pixels: a clipped box narrower or shorter than this leaves the targets
BACKENDS = ("torch", "dali")
# Grey levels between PIL's (libjpeg-turbo) and DALI's CPU decoder on the canvases' quality-95 JPEGs: identical
# pixels on all 2,300 default canvases (max and mean difference 0; Pillow 13.0.0, DALI 2.4.0), hence identical
# batches. DALI decoded a canvas in 0.18 ms (batches of 64, 2 threads), PIL in 0.38 ms.
DECODER_MAX_DIFF = 0


# --- the digit canvases -------------------------------------------------------------------------------------------


def _tight_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom), inclusive, of the pixels where ``alpha`` > INK_ALPHA; None when there is none."""
    ink = alpha > INK_ALPHA
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _overlap_ok(box, earlier) -> bool:
    """Whether xyxy-inclusive ``box`` overlaps each of ``earlier`` with IoU <= MAX_IOU and covers <= MAX_COVER of it."""
    x0, y0, x1, y1 = box
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for a0, b0, a1, b1 in earlier:
        iw, ih = min(x1, a1) - max(x0, a0) + 1, min(y1, b1) - max(y0, b0) + 1
        if iw <= 0 or ih <= 0:
            continue
        inter, other = iw * ih, (a1 - a0 + 1) * (b1 - b0 + 1)
        if inter / (area + other - inter) > MAX_IOU or inter / other > MAX_COVER:
            return False
    return True


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image

    grid = rng.uniform(*BACKGROUND, (BACKGROUND_GRID, BACKGROUND_GRID, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return smooth + rng.normal(0, BACKGROUND_NOISE, (size, size, 3)).astype(np.float32)


def _clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Draw CLUTTER items (a thin stroke, an arc, a rectangle outline or a filled blob) onto ``canvas`` in place."""
    from PIL import Image, ImageDraw

    size = canvas.shape[0]
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        kind = int(rng.integers(4))
        cx, cy = rng.uniform(0, size, 2)
        extent = rng.uniform(6, 40)
        width = int(rng.integers(1, 3))
        box = [cx - extent / 2, cy - extent * rng.uniform(0.3, 1) / 2, cx + extent / 2,
               cy + extent * rng.uniform(0.3, 1) / 2]  # fmt: skip
        if kind == 0:  # a straight stroke
            angle = rng.uniform(0, np.pi)
            dx, dy = np.cos(angle) * extent / 2, np.sin(angle) * extent / 2
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=width)
        elif kind == 1:  # an arc
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(60, 200), fill=255, width=width)
        elif kind == 2:  # a small rectangle outline
            draw.rectangle([box[0], box[1], box[0] + extent / 2, box[1] + extent / 3], outline=255, width=width)
        else:  # a blob
            r = rng.uniform(2, 5)
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=255)
        alpha = np.asarray(mask, dtype=np.float32)[:, :, None] / 255 * rng.uniform(0.6, 1.0)
        ink = rng.uniform(*INK, 3).astype(np.float32)
        canvas *= 1 - alpha
        canvas += ink * alpha


def digit_canvas(n: int, pool: np.ndarray, digits8: np.ndarray, labels: np.ndarray, size: int = 128, seed: int = 0):
    """(image uint8 (size, size, 3), digits) of canvas number ``n``: its own generator (seed, "digit_canvases",
    canvas n) draws everything, so a canvas does not depend on which others are built.

    ``digits8``: sklearn's digit images as uint8 (N, 8, 8), dark ink on white (``builtin._digit_images(8)``);
    ``pool``: the indices the canvas may draw its digits from (its split's). ``digits``: one dict per placed digit,
    in drawing order: {"digit", "digit_image", "side", "square": [x, y] (top-left of its side x side square),
    "box": [x, y, w, h]} (the tight box of its ink, alpha > INK_ALPHA, in pixel edges: columns 3..7 are x=3, w=5).
    Module constants give the background, clutter, sizes, inks and the overlap rule (each digit's tight box
    overlaps an earlier one's with IoU <= MAX_IOU and covers <= MAX_COVER of it; PLACEMENT_TRIES positions per
    digit, else it is left out).
    """
    from PIL import Image

    rng = _rng(seed, 0, f"canvas{n}", "digit_canvases")
    canvas = _background(rng, size)
    _clutter(rng, canvas)
    placed, boxes = [], []
    for _ in range(int(rng.integers(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1))):
        index = int(pool[int(rng.integers(len(pool)))])
        side = int(round(math.exp(rng.uniform(math.log(DIGIT_SIDES[0]), math.log(DIGIT_SIDES[1])))))
        grey = np.asarray(Image.fromarray(digits8[index]).resize((side, side), Image.BICUBIC), dtype=np.float32)
        alpha = (255 - grey) / 255
        tight = _tight_box(alpha)
        ink = rng.uniform(*INK, 3).astype(np.float32)
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if tight is None:
                break
            box = (x + tight[0], y + tight[1], x + tight[2], y + tight[3])
            if _overlap_ok(box, boxes):
                region = canvas[y : y + side, x : x + side]
                region *= 1 - alpha[:, :, None]
                region += ink * alpha[:, :, None]
                boxes.append(box)
                placed.append({"digit": int(labels[index]), "digit_image": index, "side": side, "square": [x, y],
                               "box": [float(box[0]), float(box[1]), float(box[2] - box[0] + 1),
                                       float(box[3] - box[1] + 1)]})  # fmt: skip
                break
    return np.floor(canvas + 0.5).clip(0, 255).astype(np.uint8), placed


_WORK: dict = {}  # set in each worker process by _init_worker (inherited through fork, never pickled per job)


def _init_worker(digits8, labels, pools):
    _WORK.update(digits8=digits8, labels=labels, pools=pools)


def _build_canvas(job) -> list[dict]:
    """One canvas: rendered, written as JPEG (unless the file exists); its digits."""
    path, n, split, size, seed = job
    image, digits = digit_canvas(n, _WORK["pools"][split], _WORK["digits8"], _WORK["labels"], size, seed)
    if not os.path.exists(path):
        from PIL import Image

        atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="JPEG", quality=95))
    return digits


def coco_categories() -> list[dict]:
    """The digit canvases' COCO categories: id d + 1 for digit d (COCO's ids start at 1), named as the class."""
    from florence.data.builtin import CLASS_NAMES

    return [{"id": d + 1, "name": CLASS_NAMES[d], "supercategory": "digit"} for d in range(10)]


def rendering_constants() -> dict:
    """The module constants a canvas depends on (part of the rebuild stamp)."""
    return {"digit_sides": list(DIGIT_SIDES), "digits_per_canvas": list(DIGITS_PER_CANVAS), "max_iou": MAX_IOU,
            "max_cover": MAX_COVER, "placement_tries": PLACEMENT_TRIES, "ink_alpha": INK_ALPHA,
            "background": list(BACKGROUND), "background_grid": BACKGROUND_GRID, "background_noise": BACKGROUND_NOISE,
            "ink": list(INK), "clutter": list(CLUTTER)}  # fmt: skip


def build_digit_canvases(out_dir: str, size: int = 128, test_fraction: float = 0.2, seed: int = 0, *,
                         train_canvases: int = 2000, test_canvases: int = 300, limit: int | None = None,
                         workers: int | None = None, quiet: bool = False) -> dict:  # fmt: skip
    """Digit canvases for object detection (``digit_canvas``): ``train_canvases`` canvases drawing their digits from
    the training digit images, ``test_canvases`` from the held-out ones (``builtin._split(labels, test_fraction,
    seed)``). ``limit``: at most this many canvases per split (the first ones; for tests).

    Writes DIR/images/canvas_XXXXX.jpg (JPEG quality 95; canvas number n: 0 .. train_canvases - 1 for training,
    then the held-out ones), DIR/train.json and DIR/test.json (COCO instances: "info", "images" [{"id": n + 1,
    "file_name", "width", "height"}], "annotations" [{"id" (from 1 in each file), "image_id", "category_id" (digit
    + 1), "bbox" [x, y, w, h], "area" (w h), "iscrowd": 0, "digit_image" (sklearn's index of the digit)}],
    "categories"), and DIR/classes.json (a summary: the class names, categories, counts, the rendering constants and
    seed). Deterministic for a seed; files already there are kept when classes.json records the same size, seed,
    test fraction, train_canvases and rendering constants (``rendering_constants``), else every canvas is written
    again. Rendering runs in ``workers`` fork processes (default min(canvases, CPU count)).

    Measured on 2 CPU cores: the default 2,000 + 300 canvases at 128 px (6,982 + 1,001 boxes, 18.7 MB of JPEG)
    build in 8.9 s with 2 workers (the command line, imports included; 14.1 s while other jobs kept the load
    average near 3). A second run keeps the files and renders again only to collect the boxes: 7.3 s (9.0 s).
    """
    from florence.data.builtin import CLASS_NAMES, _digit_images, _split

    for name, value, low in (("size", size, 64), ("train_canvases", train_canvases, 1),
                             ("test_canvases", test_canvases, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit: expected None or a positive int, got {limit!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: expected None or a positive int, got {workers!r}")
    digits8, labels = _digit_images(8)
    train, test = _split(labels, test_fraction, seed)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    stamp = {"size": size, "seed": seed, "test_fraction": test_fraction, "train_canvases": train_canvases,
             **rendering_constants()}  # fmt: skip
    try:
        with open(os.path.join(out_dir, "classes.json"), encoding="utf-8") as f:
            previous = json.load(f)
        reuse = {k: previous.get(k) for k in stamp} == stamp
    except (OSError, ValueError):
        reuse = False
    numbers = {"train": range(train_canvases), "test": range(train_canvases, train_canvases + test_canvases)}
    numbers = {split: list(r[:limit] if limit else r) for split, r in numbers.items()}
    jobs = []
    for split, ns in numbers.items():
        for n in ns:
            path = os.path.join(image_dir, f"canvas_{n:05d}.jpg")
            if not reuse and os.path.exists(path):
                os.unlink(path)
            jobs.append((path, n, split, size, seed))
    pools = {"train": train, "test": test}
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(digits8, labels, pools)) as pool:
            results = list(_progress_bar(pool.imap(_build_canvas, jobs, chunksize=16), len(jobs), quiet))
    else:
        _init_worker(digits8, labels, pools)
        results = list(_progress_bar(map(_build_canvas, jobs), len(jobs), quiet))
    digits_of = {job[1]: r for job, r in zip(jobs, results, strict=True)}
    categories = coco_categories()
    counts = {}
    for split, ns in numbers.items():
        images, annotations = [], []
        for n in ns:
            images.append({"id": n + 1, "file_name": f"images/canvas_{n:05d}.jpg", "width": size, "height": size})
            for d in digits_of[n]:
                x, y, w, h = d["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": d["digit"] + 1,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                    "digit_image": d["digit_image"]})  # fmt: skip
        coco = {"info": {"description": f"florence digit canvases ({split})", "version": "1.0", "seed": seed},
                "images": images, "annotations": annotations, "categories": categories}  # fmt: skip
        atomic_write_text(os.path.join(out_dir, f"{split}.json"), json.dumps(coco) + "\n")
        counts[split], counts[f"{split}_boxes"] = len(images), len(annotations)
    summary = {"variant": "digit_canvases", **stamp, **counts, "classes": list(CLASS_NAMES), "categories": categories,
               "test_canvases": test_canvases, "box_format": "COCO xywh, pixels"}  # fmt: skip
    atomic_write_text(os.path.join(out_dir, "classes.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def _progress_bar(it, total, quiet):
    if quiet:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="digit canvases", unit="canvas", file=sys.stderr)


# --- curation -------------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_coco(coco, name: str, image_root: str) -> tuple[list[str], list[dict], dict, list[dict]]:
    """(problems, images, annotations by image id, categories sorted by id) of a COCO instances dict; every image
    file is decoded (``florence.data.curate.analyse``) and its upright size compared with the declared one."""
    from florence.data.curate import analyse, native_path

    problems = []
    if not isinstance(coco, dict):
        return [f"{name}: expected a JSON object with 'images', 'annotations' and 'categories'"], [], {}, []
    for field in ("images", "annotations", "categories"):
        if not isinstance(coco.get(field), list):
            problems.append(f"{name}: '{field}' is missing or not a list; expected a list")
    if problems:
        return problems, [], {}, []
    categories = {}
    for c in coco["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if not _is_int(cid):
            problems.append(f"{name}: category {c!r}: 'id' is not an int; expected an int")
        elif cid in categories:
            problems.append(f"{name}: category {cid}: duplicate category id; expected unique ids")
        else:
            categories[cid] = c
    images, sizes = [], {}
    for img in coco["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        if not _is_int(iid):
            problems.append(f"{name}: image {img!r}: 'id' is not an int; expected an int")
            continue
        if iid in sizes:
            problems.append(f"{name}: image {iid}: duplicate image id; expected unique ids")
            continue
        w, h, file_name = img.get("width"), img.get("height"), img.get("file_name")
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            problems.append(f"{name}: image {iid}: width/height {w!r} x {h!r}; expected positive ints")
            w = h = None
        if not isinstance(file_name, str) or not file_name:
            problems.append(f"{name}: image {iid}: 'file_name' {file_name!r}; expected a path")
            sizes[iid] = (w, h)
            continue
        path = native_path(file_name)
        path = path if os.path.isabs(path) else os.path.join(image_root, path)
        a = analyse(path)
        if not a["ok"]:
            what = "missing" if not os.path.exists(path) else f"unreadable: {a['reason']}"
            problems.append(f"{name}: image {iid}: file {file_name} is {what}; expected an image PIL decodes")
        elif w is not None and (a["w"], a["h"]) != (w, h):
            problems.append(f"{name}: image {iid}: file {file_name} is {a['w']} x {a['h']} pixels (upright), "
                            f"declared {w} x {h}; expected the declared size")  # fmt: skip
        sizes[iid] = (w, h)
        images.append(dict(img, path=path, analysis=a))
    by_image: dict = {iid: [] for iid in sizes}
    seen = set()
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            problems.append(f"{name}: annotation {ann!r}: expected an object")
            continue
        aid, iid, cid = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        where = f"{name}: annotation {aid} (image {iid})"
        if not _is_int(aid):
            problems.append(f"{where}: 'id' is not an int; expected an int")
        elif aid in seen:
            problems.append(f"{where}: duplicate annotation id; expected unique ids")
        seen.add(aid)
        if iid not in sizes:
            problems.append(f"{where}: unknown image id {iid!r}; expected one of the 'images' ids")
        if cid not in categories:
            problems.append(f"{where}: unknown category id {cid!r}; expected one of {sorted(categories)}")
        if ann.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{where}: iscrowd {ann.get('iscrowd')!r}; expected 0 or 1")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float))
                                                                    and not isinstance(v, bool) for v in bbox)
                or not all(math.isfinite(v) for v in bbox)):  # fmt: skip
            problems.append(f"{where}: bbox {bbox!r}; expected [x, y, w, h], 4 finite numbers")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            problems.append(f"{where}: bbox {bbox} has zero or negative area (w {w:g}, h {h:g}); expected w > 0, h > 0")
            continue
        if x < -BOX_SLACK or y < -BOX_SLACK:
            problems.append(f"{where}: bbox {bbox} has a negative corner (x {x:g}, y {y:g}); expected x, y >= 0")
            continue
        width, height = sizes.get(iid, (None, None))
        if width is None:
            continue
        if x + w > width + BOX_SLACK or y + h > height + BOX_SLACK:
            problems.append(f"{where}: bbox {bbox} reaches ({x + w:g}, {y + h:g}), past the image's {width} x "
                            f"{height} pixels; expected x + w <= width, y + h <= height")  # fmt: skip
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            problems.append(f"{where}: bbox {bbox} lies outside the image ({width} x {height} pixels); expected a "
                            "box inside it")  # fmt: skip
            continue
        by_image[iid].append(dict(ann, bbox=[x0, y0, x1 - x0, y1 - y0]))
    return problems, images, by_image, [categories[c] for c in sorted(categories)]


MAX_PROBLEMS_SHOWN = 20


def curate_detection(annotations: str, out_dir: str, image_root: str | None = None, shard_size: int = 256,
                     seed: int = 0, quiet: bool = True, max_images: int | None = None) -> dict:  # fmt: skip
    """Check a COCO instances file whole, then write its images and boxes into webdataset shards (module docstring);
    returns the manifest. Raises ValueError listing every problem (up to MAX_PROBLEMS_SHOWN of them, and how many
    there are) before anything is written. ``image_root``: the folder image paths are relative to (default the
    JSON's). The shards keep the input's image order (the loader shuffles); ``seed`` is recorded in the manifest.
    ``max_images``: only the file's first N images (in its order) with their boxes go into the shards, a labelled
    subset for few-label fine-tuning (the whole file is still checked); ValueError unless None or an int >= 1."""
    from florence.data.curate import (
        _atomic_json,
        _image_jpeg_bytes,
        _progress,
        _tar_member,
        path_text,
        stored_as_is,
        write_dali_index,
    )

    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
    if max_images is not None and (not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 1):
        raise ValueError(f"max_images: expected None or a positive int, got {max_images!r}")
    if not os.path.isfile(annotations):
        raise FileNotFoundError(f"annotations: {annotations} is not a file")
    image_root = os.path.dirname(os.path.abspath(annotations)) if image_root is None else image_root
    name = path_text(os.path.basename(annotations))
    try:
        with open(annotations, encoding="utf-8") as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: invalid JSON ({e}); expected a COCO instances file") from e
    problems, images, by_image, categories = _check_coco(coco, name, image_root)
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise ValueError(f"{name}: {len(problems)} problem(s), nothing written:\n  {shown}{more}")
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    samples = []
    for k, img in enumerate(images[:max_images]):
        anns = by_image[img["id"]]
        meta = {"key": f"{k:09d}", "image_id": img["id"], "file_name": img["file_name"], "width": img["width"],
                "height": img["height"], "boxes": [a["bbox"] for a in anns],
                "category_ids": [a["category_id"] for a in anns], "labels": [label_of[a["category_id"]] for a in anns],
                "iscrowd": [int(a.get("iscrowd", 0)) for a in anns],
                "annotation_ids": [a["id"] for a in anns]}  # fmt: skip
        samples.append(({"image": img["path"], "as_is": stored_as_is(img["analysis"])}, meta))
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for k in _progress(range(0, len(samples), shard_size), -(-len(samples) // shard_size), "shards", quiet, "shard"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
            for image, meta in samples[k : k + shard_size]:
                _tar_member(tar, f"{meta['key']}.jpg", _image_jpeg_bytes(image))
                _tar_member(tar, f"{meta['key']}.json", json.dumps(meta, sort_keys=True).encode())
        data = buf.getvalue()
        path = os.path.join(out_dir, f"shard-{k // shard_size:05d}.tar")
        atomic_write_bytes(path, data)
        write_dali_index(path)
        shards.append({"path": os.path.basename(path), "samples": len(samples[k : k + shard_size]),
                       "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    n_boxes = sum(len(m["boxes"]) for _, m in samples)
    manifest = {
        "format": "webdataset",
        "components": {
            "jpg": "image (JPEG, upright)",
            "json": "key, image_id, file_name, width, height, boxes (COCO xywh, pixels), category_ids, labels "
            "(0..K-1: index into categories), iscrowd, annotation_ids",
        },
        "index_format": "DALI wds2idx v1.2 (.idx beside each shard, when DALI is installed)",
        "shards": shards,
        "samples": len(samples),
        "annotations": n_boxes,
        "crowd_annotations": sum(sum(m["iscrowd"]) for _, m in samples),
        "empty_images": sum(1 for _, m in samples if not m["boxes"]),
        "categories": categories,
        "args": {
            "annotations": path_text(annotations),
            "image_root": path_text(image_root),
            "shard_size": shard_size,
            "seed": seed,
            "max_images": max_images,
        },
    }
    _atomic_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


# --- the plan and the shared augmentation (both backends) -----------------------------------------------------------


def plan_detection(width: int, height: int, size: int, train: bool, rng: np.random.Generator | None = None,
                   scale_range: tuple[float, float] = (0.75, 1.25)) -> dict:  # fmt: skip
    """Where an image of ``width`` x ``height`` goes on the size x size canvas: {"scale": s, "offset": (ox, oy)}
    (the resized image's top-left on the canvas: negative where it is cropped). Training: s = size / max(w, h) *
    uniform(scale_range), a uniform offset per axis (a random crop where the resized image is larger, a random pad
    where it is smaller). Evaluation (``train=False``): s = size / max(w, h), offset (0, 0)."""
    s = size / max(width, height)
    if not train:
        return {"scale": s, "offset": (0, 0)}
    s *= float(rng.uniform(*scale_range))
    offset = []
    for n in _resized(width, height, s):
        offset.append(-int(rng.integers(0, n - size + 1)) if n > size else int(rng.integers(0, size - n + 1)))
    return {"scale": s, "offset": tuple(offset)}


def _resized(width: int, height: int, s: float) -> tuple[int, int]:
    # floor (with a little room for float error: 100 * 1.28 is 128.00000000000003, 100 * 0.29 is 28.999999999999996)
    return max(1, math.floor(width * s + 1e-6)), max(1, math.floor(height * s + 1e-6))


def resize_exact(image: np.ndarray, s: float) -> np.ndarray:
    """uint8 (H, W, 3) scaled by exactly ``s`` on both axes: (floor(w s), floor(h s)) pixels, PIL bilinear
    (antialiased when shrinking) over the source region (0, 0, floor(w s) / s, floor(h s) / s), so that source
    point x lands at x s (rounding the size to whole pixels would stretch one axis by up to half a pixel)."""
    from PIL import Image

    h, w = image.shape[:2]
    rw, rh = _resized(w, h, s)
    if (rw, rh) == (w, h) and abs(s - 1) < 1e-9:
        return image
    box = (0.0, 0.0, min(rw / s, float(w)), min(rh / s, float(h)))
    return np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR, box=box))


def transform_boxes(boxes_xywh, plan: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(xyxy float32 (n, 4) on the canvas, kept bool (n,)) of COCO xywh boxes under ``plan``: x s + ox, ..., clipped
    to [0, size]; kept: at least MIN_VISIBLE of the box's area left and both sides >= MIN_BOX_SIDE pixels."""
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    s, (ox, oy) = plan["scale"], plan["offset"]
    xyxy = np.stack([b[:, 0] * s + ox, b[:, 1] * s + oy, (b[:, 0] + b[:, 2]) * s + ox, (b[:, 1] + b[:, 3]) * s + oy],
                    axis=1)  # fmt: skip
    clipped = xyxy.clip(0, size)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    kept = (w * h >= MIN_VISIBLE * area) & (w >= MIN_BOX_SIDE) & (h >= MIN_BOX_SIDE)
    return clipped.astype(np.float32), kept


_MEAN = np.asarray(MEAN, dtype=np.float32) * 255
_INV_STD = 1 / (np.asarray(STD, dtype=np.float32) * 255)


def _place(image: np.ndarray, plan: dict, size: int, out: np.ndarray) -> None:
    """Write the canvas of ``image`` under ``plan`` into ``out``, float32 (3, size, size) of zeros."""
    x = resize_exact(image, plan["scale"])
    ox, oy = plan["offset"]
    rh, rw = x.shape[:2]
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + rw, size), min(oy + rh, size)
    if x1 > x0 and y1 > y0:
        part = x[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        out[:, y0:y1, x0:x1] = ((part.astype(np.float32) - _MEAN) * _INV_STD).transpose(2, 0, 1)


def make_canvas(image: np.ndarray, plan: dict, size: int) -> torch.Tensor:
    """float32 (3, size, size), CLIP-normalised: the decoded uint8 (H, W, 3) image resized by the plan's scale
    (``resize_exact``) at its offset, the rest CLIP's mean colour (0 after normalisation)."""
    out = np.zeros((3, size, size), dtype=np.float32)
    _place(image, plan, size, out)
    return torch.from_numpy(out)


def make_targets(meta: dict, plan: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes float32 (n, 4) xyxy on the canvas, labels int64 (n,)) of a sample: crowd regions and boxes the plan
    pushes (mostly) off the canvas are left out."""
    xyxy, kept = transform_boxes(meta["boxes"], plan, size)
    kept &= np.asarray(meta.get("iscrowd", [0] * len(kept)), dtype=bool).reshape(-1) == 0
    labels = np.asarray(meta["labels"], dtype=np.int64).reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(xyxy[kept])), torch.from_numpy(labels[kept])


# --- decoding -------------------------------------------------------------------------------------------------------


def pil_decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """uint8 (H, W, 3) RGB of an encoded image, upright (EXIF orientation applied) and in 8-bit RGB (``to_rgb8``)."""
    from PIL import Image

    from florence.data.curate import to_rgb8, upright

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(to_rgb8(upright(img)))
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"{name}: PIL cannot decode it ({type(e).__name__}: {e})") from e


class DaliImageDecoder:
    """Batches of encoded images -> lists of uint8 (H, W, 3) RGB, with DALI's image decoder on the CPU (one
    pipeline, rebuilt after a decoding error, which leaves a DALI pipeline unusable)."""

    def __init__(self, max_batch: int = 1, num_threads: int | None = None):
        from florence.optional import require

        require("dali", "florence.data.detection (backend='dali')")
        self.max_batch = max_batch
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=None, prefetch_queue_depth=1)
        def pipe():
            return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8), device="cpu",
                                     output_type=types.RGB)  # fmt: skip

        p = pipe()
        p.build()
        return p

    def _run(self, blobs):
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        try:
            (out,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None
            raise
        return [np.array(out.at(i)) for i in range(len(blobs))]

    def __call__(self, blobs: list[bytes], names: list[str]) -> list[np.ndarray]:
        out = []
        for i in range(0, len(blobs), self.max_batch):
            part = blobs[i : i + self.max_batch]
            try:
                out += self._run(part)
            except RuntimeError:
                for b, n in zip(part, names[i : i + self.max_batch], strict=True):  # which one: decode them singly
                    try:
                        out += self._run([b])
                    except RuntimeError as e:
                        raise ValueError(f"{n}: DALI's image decoder cannot decode it") from e
        return out


def _resolve_backend(backend: str) -> str:
    from florence.optional import missing

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'dali', got {backend!r}")
    if backend == "auto":
        return "dali" if missing("dali") is None else "torch"
    return backend


# --- the loader -----------------------------------------------------------------------------------------------------


class DetectionLoader:
    """Batches of images and boxes of one rank (module docstring). Build with ``make_detection_loader``."""

    def __init__(self, data_dir, batch_size, size, rank, world_size, seed, train, drop_last, backend, split,
                 scale_range, num_threads=None):  # fmt: skip
        from florence.data.loader import index_shard, load_manifest

        manifest = load_manifest(data_dir)
        self.batch_size, self.size, self.rank, self.world = batch_size, size, rank, world_size
        self.seed, self.train, self.drop_last, self.backend = seed, train, drop_last, backend
        self.split, self.scale_range = split, scale_range
        self.categories = manifest.get("categories", [])
        self.entries = []  # (shard path, key, jpg offset, jpg size, json offset, json size)
        for sh in manifest["shards"]:
            path = os.path.join(data_dir, sh["path"])
            self.entries += [(path, *e) for e in index_shard(path)]
        self.decoder = DaliImageDecoder(batch_size, num_threads) if backend == "dali" else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from florence.data.video import _rank_positions

        self.epoch = epoch
        order = np.arange(len(self.entries))
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.entries))
        self.positions = _rank_positions(order, self.rank, self.world, self.batch_size, self.drop_last, self.split)

    def __len__(self) -> int:
        n = len(self.positions)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        return self.iterate(0)

    def _read(self, path, offset, size):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def plan(self, meta: dict) -> dict:
        """The plan of a sample in the current epoch (``plan_detection``)."""
        rng = _rng(self.seed, self.epoch, meta["key"], "detect") if self.train else None
        return plan_detection(int(meta["width"]), int(meta["height"]), self.size, self.train, rng, self.scale_range)

    def batch(self, b: int) -> dict:
        """Batch ``b`` of the current epoch."""
        entries = [self.entries[p] for p in self.positions[b * self.batch_size : (b + 1) * self.batch_size]]
        metas = [json.loads(self._read(path, mo, ms)) for path, _, _, _, mo, ms in entries]
        blobs = [self._read(path, jo, js) for path, _, jo, js, _, _ in entries]
        names = [f"{os.path.basename(e[0])}:{e[1]}.jpg" for e in entries]
        if self.decoder is None:
            images = [pil_decode(blob, n) for blob, n in zip(blobs, names, strict=True)]
        else:
            images = self.decoder(blobs, names)
        # written into one array: torch.stack of the 16 canvases took 54 ms a batch of 16 at 128 px on this 2-core
        # machine while other jobs kept it busy (its copy threads waited for cores): the whole batch 74 -> 20 ms
        canvases = np.zeros((len(images), 3, self.size, self.size), dtype=np.float32)
        boxes, labels, scales = [], [], []
        for i, (image, meta) in enumerate(zip(images, metas, strict=True)):
            plan = self.plan(meta)
            _place(image, plan, self.size, canvases[i])
            bx, lab = make_targets(meta, plan, self.size)
            boxes.append(bx)
            labels.append(lab)
            scales.append(plan["scale"])
        return {"images": torch.from_numpy(canvases), "boxes": boxes, "labels": labels,
                "image_ids": torch.tensor([int(m["image_id"]) for m in metas], dtype=torch.int64),
                "scales": torch.tensor(scales, dtype=torch.float32), "keys": [m["key"] for m in metas]}  # fmt: skip

    def iterate(self, start_batch: int = 0):
        """The epoch's batches from ``start_batch`` on (resuming part-way)."""
        if not isinstance(start_batch, int) or start_batch < 0:
            raise ValueError(f"start_batch: expected an int >= 0, got {start_batch!r}")
        for b in range(start_batch, len(self)):
            yield self.batch(b)


def _check_scale_range(scale_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"scale_range: expected (low, high) with 0 < low <= high, got {scale_range!r}")
    return low, high


def make_detection_loader(data_dir: str, batch_size: int, size: int, *, rank: int = 0, world_size: int = 1,
                          seed: int = 0, train: bool = True, drop_last: bool = True, backend: str = "auto",
                          split: str = "global_batch", scale_range: tuple[float, float] = (0.75, 1.25),
                          num_threads: int | None = None) -> DetectionLoader:  # fmt: skip
    """A loader of detection batches from curated shards (``curate_detection``; module docstring). backend "auto"
    takes DALI where it imports, else PIL ("torch"); ``num_threads`` is DALI's."""
    for name, value, low in (("batch_size", batch_size, 1), ("size", size, 8), ("world_size", world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank!r}")
    if split not in ("global_batch", "rank"):
        raise ValueError(f"split: expected 'global_batch' or 'rank', got {split!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads: expected None or a positive int, got {num_threads!r}")
    scale_range = _check_scale_range(scale_range)
    backend = _resolve_backend(backend)
    return DetectionLoader(data_dir, batch_size, size, rank, world_size, seed, train, drop_last, backend, split,
                           scale_range, num_threads)  # fmt: skip


def load_detection_eval_set(folder: str, size: int, annotations: str = "test.json", backend: str = "auto") -> dict:
    """The held-out images of a raw folder (a COCO instances file and its images) for evaluation, each placed by the
    evaluation plan (s = size / max(w, h), top-left, padded): {"images": float32 (N, 3, size, size), "scales":
    float32 (N,) (divide predicted boxes by it for original pixels), "image_ids": int64 (N,), "annotations": the
    COCO file's absolute path (for COCOeval), "categories": the COCO categories sorted by id (label k is
    categories[k])}. Images in the file's order."""
    from florence.data.curate import native_path

    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    backend = _resolve_backend(backend)
    path = os.path.abspath(os.path.join(folder, annotations))
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    rows = coco["images"]
    paths = [os.path.join(os.path.dirname(path), native_path(r["file_name"])) for r in rows]
    blobs = []
    for p in paths:
        with open(p, "rb") as f:
            blobs.append(f.read())
    if backend == "dali":
        decoder = DaliImageDecoder(32)
        images = []
        for i in range(0, len(blobs), 32):
            images += decoder(blobs[i : i + 32], paths[i : i + 32])
    else:
        images = [pil_decode(b, p) for b, p in zip(blobs, paths, strict=True)]
    canvases, scales = np.zeros((len(images), 3, size, size), dtype=np.float32), []
    for i, image in enumerate(images):
        plan = plan_detection(image.shape[1], image.shape[0], size, False)
        _place(image, plan, size, canvases[i])
        scales.append(plan["scale"])
    return {"images": torch.from_numpy(canvases),
            "scales": torch.tensor(scales, dtype=torch.float32),
            "image_ids": torch.tensor([int(r["id"]) for r in rows], dtype=torch.int64), "annotations": path,
            "categories": sorted(coco["categories"], key=lambda c: c["id"])}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curate", help="check a COCO instances file and write webdataset shards")
    c.add_argument("--annotations", required=True, help="COCO instances JSON (e.g. DIR/train.json)")
    c.add_argument("--out", required=True, help="output folder (shards, .idx files, manifest.json)")
    c.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the JSON's)")
    c.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-images", type=int, default=None,
                   help="only the file's first N images and their boxes (a labelled subset; default: all)")  # fmt: skip
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size: expected a positive number, got {args.shard_size}")
    try:
        manifest = curate_detection(args.annotations, args.out, args.image_root, args.shard_size, args.seed,
                                    quiet=args.quiet, max_images=args.max_images)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"florence.data.detection: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: manifest[k] for k in ("samples", "annotations", "crowd_annotations", "empty_images")}
                     | {"shards": len(manifest["shards"]), "categories": len(manifest["categories"])}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
