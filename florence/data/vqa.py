"""Visual-question-answering data (issue 18, the METER adapter): the built-in digit questions (VQA-format files),
VQA's answer vocabulary, soft scores and accuracy, curation of a VQA-format file into webdataset shards, and a loader
of question batches with two JPEG decoders (PIL, NVIDIA DALI) behind one code path.

    python -m florence.data.builtin --variant digit_questions --out DIR [--size 128]
    python -m florence.data.vqa curate --annotations DIR/train.json --out DIR-shards [--image-root DIR]
        [--shard-size 256] [--quiet]
    loader = make_vqa_loader("DIR-shards", batch_size=32, size=128, seed=0, backend="auto")
    loader.set_epoch(e)
    for batch in loader:  # {"images": (N, 3, S, S) float32 (each image once), "image_index": (B,) int64,
        ...               #  "tokens": (B, L) int64, "targets": (B, A) float32, "question_ids": (B,) int64,
                          #  "image_ids": (B,) int64, "question_types": [str], "answers": [[str] * 10]}
    report = vqa_report(predicted_answers, batch_answers, question_types)  # {"accuracy", "per_type": {...}, ...}

Digit questions (``build_digit_questions``): canvases of 1-4 of scikit-learn's handwritten digits, each in one of
six clearly distinct colours (COLOURS), 36-52 px tall at 128 px (scaled with the canvas), on the detection canvases'
light textured background (``florence.data.detection._background``) with its clutter drawn at half strength. The
digits' squares never overlap and their centres lie at least MIN_CENTRE_DX pixels apart across, so "left of" and
"far right" have one answer. Train canvases show training digit images only, held-out canvases held-out ones
(``builtin._split``). Questions come from templates of five types (QUESTION_TYPES), every answer one word:
- count: "how many digits are there?" -> "1".."4"; "how many red digits are there?" -> "0".."4" (half of the count
  questions are the total; half of all count answers are "1": a colour on a canvas is mostly on one digit);
- exist: "is there a seven?" -> "yes" / "no", alternating on a canvas from a fair coin's first answer (1,945 yes
  and 1,907 no in the default training split);
- position: "which digit is on the far left?" / "... far right?" -> "0".."9" (canvases with >= 2 digits);
- relation: "what digit is to the right of the seven?" / "left of" -> the digit whose box centre is nearest in x on
  that side; asked only when the named digit appears once and has a digit on that side;
- colour: "what colour is the seven?" -> a colour name; asked only when the named digit appears once.
Each canvas gets ``questions_per_canvas`` different questions, the types taken in turn in a seeded order (one of
each available type per round), so the types are spread evenly.

Files (VQA's format, questions and annotations in one file): DIR/images/canvas_XXXXX.jpg (JPEG quality 95),
DIR/train.json and DIR/test.json {"info", "images": [{"id", "file_name", "width", "height", "objects": [{"digit",
"colour", "box": [x, y, w, h] (the tight box of its ink, pixels), "digit_image"}]}], "questions": [{"question_id"
(image id * 1000 + k, VQA's numbering), "image_id", "question", "question_type", "answer_type" ("yes/no", "number"
or "other", by VQA's rule: what the answer is), "multiple_choice_answer", "answers": [{"answer", "answer_id"}] x 10
(synthetic: ten equal answers, so the real VQA files and the metric work the same)}]}, DIR/answers.json (the answer
vocabulary of the TRAINING split: {"split", "questions", "answers": [{"answer", "count"}]}, by count descending then
text) and DIR/classes.json (a summary: counts per split and type, colours, the rendering constants and seed).

Answers (``normalize_answer``, ``answer_vocabulary``, ``soft_scores``, ``vqa_accuracy``, ``vqa_report``): VQA's
soft score of an answer is min(#humans who gave it / 3, 1); the accuracy of a prediction is the same count over
the human answers after normalisation (a documented subset of the official one).

Curation (``curate_vqa``): a VQA-format file is checked whole before anything is written; unknown or missing image
ids, duplicate question ids, empty questions, answer lists that are not 1-MAX_ANSWERS objects with an "answer"
string, fields of the wrong type, and missing, undecodable or wrongly sized images (the checks of
``florence.data.detection``'s curation) raise one ValueError listing every problem with its ids. Shards
``shard-00000.tar`` ... hold one sample per image: ``<key>.jpg`` (upright RGB or grey JPEGs byte for byte, anything
else re-encoded at quality 95, as every curation here stores images) and ``<key>.json`` ({"key", "image_id",
"file_name", "width", "height", "questions": [{"question_id", "question", "question_type", "answer_type",
"multiple_choice_answer" (normalised; the most given answer where the file has none), "answers": [str] (as
given)}]}; a missing question_type or answer_type is stored as "unknown"), DALI index files beside them (when DALI
is installed) and ``manifest.json`` (shards with their sample counts and SHA-256, images, questions, the answer
vocabulary of the file and its question types).

Loader (``make_vqa_loader``): the sample is a question. Per epoch a seeded permutation of the images, each image's
questions one after another (the shards' order for evaluation), so that a batch asks all questions of a few images
and each image is decoded, and encoded by the model (METER's ``image_index``), once; split between ranks and
resumed with ``iterate(start_batch)`` as ``florence.data.detection``'s loader does (its class is this one's base).
Every image is resized to size x size by
the detection loader's evaluation plan (longer side to ``size``, padded right and bottom with CLIP's mean when not
square; a square canvas is a plain resize), then CLIP-normalised; no flips, crops or colour jitter: positions and
colours are answers. backend "torch" decodes with PIL, "dali" with DALI's CPU image decoder (``DaliImageDecoder``);
the two gave identical pixels on the canvases, so their batches are equal (tested).

Measured on this 2-core machine while a training run shared it (load average 2-5): the default build (3,000 + 400
canvases at 128 px, 15,000 + 2,000 questions, 33 MB of JPEG, 18 answers) takes 18.8 s with 2 workers at load 2 and
32.5 s at load 5 (16.3 s of CPU), the command line and imports included; a second run keeps the images (25.1 s at
load 5, 13.2 s of CPU). Curating train.json (3,000 images, 12 shards): 8.0 s at load 5 (4.3 s of CPU). The loader:
66 ms (DALI) and 73 ms (PIL) a batch of 64 questions at 128 px on one thread at load 5, 234 batches an epoch; the
evaluation set (400 images, 2,000 questions) loads in 0.6-0.7 s. PIL and DALI decoded the 400 held-out canvases to
identical pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import pathlib
import sys
import tarfile
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from florence.data.builtin import CLASS_NAMES
from florence.data.detection import (
    _WORK,
    MAX_PROBLEMS_SHOWN,
    DaliImageDecoder,
    DetectionLoader,
    _background,
    _check_coco,
    _clutter,
    _init_worker,
    _is_int,
    _place,
    _resolve_backend,
    _tight_box,
    make_detection_loader,
    pil_decode,
    plan_detection,
)
from florence.data.loader import _rng
from florence_kernels._io import atomic_write, atomic_write_text

# --- rendering constants (recorded in classes.json: a change renders the canvases again) ---------------------------
# Six colours far apart in hue and lightness, all dark or saturated enough to stand out on the light background
# (170-250 per channel): the colour of a digit is an answer, so no two may be confused.
COLOURS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 70, 230), "orange": (245, 140, 0),
           "purple": (140, 40, 180), "black": (20, 20, 20)}  # fmt: skip
# The side of a digit's square at a 128-px canvas (sklearn's glyphs fill their height): nearer the 64 px of make
# demo's pretraining digits and the coloured copies' 40-64 px (COPY_SIDES). At 24-44 px (before 2026-12-01) a digit
# was about one of CoSwin's final 32-px tokens at 128 px: trained directly to name each digit from its box's
# final-stage tokens (16 canvases a step, lr 1e-3), the tower stayed at chance for 300 steps; at 40-56 px it reached
# 64% (README, Vision-language). Four digits of 36-52 px do not always find a place: of the 3,000 training canvases
# 26% hold one digit, 27% two, 33% three, 14% four.
DIGIT_SIDES = (36, 52)
DIGITS_PER_CANVAS = (1, 4)  # uniform; fewer when a digit finds no place (PLACEMENT_TRIES)
# Digit centres (of their ink boxes) at least this many pixels apart in x, so that the far left, the far right and
# the nearest neighbour on a side are plain to see; the digits' squares never overlap.
MIN_CENTRE_DX = 8
PLACEMENT_TRIES = 100
# The 16-level glyphs have many half-dark pixels; their alpha times STROKE_GAIN (clipped to 1) draws the strokes in
# the full colour rather than a blend with the background.
STROKE_GAIN = 1.5
# The detection canvases' clutter (dark strokes, arcs, rectangles, blobs) blended in at this strength: light
# clutter, never mistaken for a coloured digit.
CLUTTER_STRENGTH = 0.5

# The coloured pretraining copies (``colour_copy``): the digit's side as a fraction of the pretraining image's (40-64
# px at 64). Measured (2026-12-01, 2-core VM, one copy per training digit, make demo's 400 steps): zero-shot on the
# plain held-out digits 95.8-96.1% (without copies: 96.9%; copies at 24-48 px: 93.0%); see README, Vision-language.
COPY_SIDES = (0.625, 1.0)
QUESTION_TYPES = ("count", "exist", "position", "relation", "colour")
# The fewest questions any canvas has (one digit: 7 count, 10 exist, 1 colour): the most a canvas can be asked.
MAX_QUESTIONS_PER_CANVAS = 18
ANSWERS_PER_QUESTION = 10  # VQA's human answers per question (the synthetic ones repeat the answer)
MAX_ANSWERS = 10  # curation accepts 1..MAX_ANSWERS answers per question (fewer for single-annotator data sets)
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(CLASS_NAMES + ("ten",))}


# --- the canvases ---------------------------------------------------------------------------------------------------


def _cluttered_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 (size, size, 3): the detection canvases' background with their clutter at CLUTTER_STRENGTH."""
    canvas = _background(rng, size)
    cluttered = canvas.copy()
    _clutter(rng, cluttered)
    canvas += CLUTTER_STRENGTH * (cluttered - canvas)
    return canvas


def _ink_alpha(digit8: np.ndarray, side: int) -> np.ndarray:
    """float32 (side, side) in [0, 1]: a glyph's ink (dark on white) resized bicubically, times STROKE_GAIN."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(digit8).resize((side, side), Image.BICUBIC), dtype=np.float32)
    return np.minimum((255 - grey) / 255 * STROKE_GAIN, 1.0)


def _paint(canvas: np.ndarray, alpha: np.ndarray, x: int, y: int, colour: str) -> None:
    """Blend COLOURS[colour] into ``canvas`` in place at top-left (x, y) with the glyph's ``alpha``."""
    side = alpha.shape[0]
    region = canvas[y : y + side, x : x + side]
    region *= 1 - alpha[:, :, None]
    region += np.asarray(COLOURS[colour], dtype=np.float32) * alpha[:, :, None]


def question_canvas(n: int, pool: np.ndarray, digits8: np.ndarray, labels: np.ndarray, size: int = 128,
                    seed: int = 0) -> tuple[np.ndarray, list[dict]]:  # fmt: skip
    """(image uint8 (size, size, 3), objects) of canvas number ``n``, drawn by its own generator (seed,
    "digit_questions", canvas n): a canvas does not depend on which others are built.

    ``digits8``: sklearn's digit images uint8 (N, 8, 8), dark ink on white (``builtin._digit_images(8)``);
    ``pool``: the indices the canvas may draw from (its split's). ``objects``: one dict per placed digit in drawing
    order, {"digit", "colour" (a COLOURS name), "box": [x, y, w, h] (the tight box of the pixels drawn at alpha >
    detection.INK_ALPHA, in pixel edges), "digit_image" (sklearn's index)}.
    """

    rng = _rng(seed, 0, f"canvas{n}", "digit_questions")
    canvas = _cluttered_background(rng, size)
    low, high = (max(8, round(s * size / 128)) for s in DIGIT_SIDES)
    names = list(COLOURS)
    squares, centres, objects = [], [], []
    for _ in range(int(rng.integers(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1))):
        index = int(pool[int(rng.integers(len(pool)))])
        side = int(rng.integers(low, high + 1))
        alpha = _ink_alpha(digits8[index], side)
        tight = _tight_box(alpha)
        colour = names[int(rng.integers(len(names)))]
        for _ in range(PLACEMENT_TRIES if tight is not None else 0):  # (a glyph without ink: never with sklearn's)
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            centre = x + (tight[0] + tight[2] + 1) / 2
            apart = all(x + side <= x0 or x1 <= x or y + side <= y0 or y1 <= y for x0, y0, x1, y1 in squares)
            if apart and all(abs(centre - c) >= MIN_CENTRE_DX for c in centres):
                _paint(canvas, alpha, x, y, colour)
                squares.append((x, y, x + side, y + side))
                centres.append(centre)
                objects.append({"digit": int(labels[index]), "colour": colour, "digit_image": index,
                                "box": [float(x + tight[0]), float(y + tight[1]), float(tight[2] - tight[0] + 1),
                                        float(tight[3] - tight[1] + 1)]})  # fmt: skip
                break
    return np.floor(canvas + 0.5).clip(0, 255).astype(np.uint8), objects


def colour_copy(rng: np.random.Generator, digit8: np.ndarray, size: int = 64,
                sides: tuple[float, float] = COPY_SIDES) -> tuple[np.ndarray, str]:  # fmt: skip
    """(image uint8 (size, size, 3), colour name): one sklearn digit (``digit8``: uint8 (8, 8), dark ink on white)
    drawn as on the question canvases (a COLOURS colour, STROKE_GAIN, the canvases' background and clutter at
    CLUTTER_STRENGTH) at a side uniform in ``sides`` x ``size`` pixels and a uniform place: the pretraining copies of
    ``builtin.build_digits(colour_copies=...)``, so that the towers see digits as the canvases show them.
    Raises ValueError for a digit that is not (8, 8) uint8, a size < 8 or sides outside (0, 1]."""

    if not isinstance(digit8, np.ndarray) or digit8.shape != (8, 8) or digit8.dtype != np.uint8:
        got = (digit8.shape, digit8.dtype) if isinstance(digit8, np.ndarray) else type(digit8).__name__
        raise ValueError(f"digit8: expected a uint8 (8, 8) array, got {got}")
    if not _is_int(size) or size < 8:
        raise ValueError(f"size: expected an int >= 8 (pixels), got {size!r}")
    if not (len(sides) == 2 and 0 < sides[0] <= sides[1] <= 1):
        raise ValueError(f"sides: expected (low, high) with 0 < low <= high <= 1 (fractions of size), got {sides!r}")
    canvas = _cluttered_background(rng, size)
    low = max(4, round(sides[0] * size))
    side = int(rng.integers(low, max(low, round(sides[1] * size)) + 1))  # at least 4 px
    alpha = _ink_alpha(digit8, side)
    x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    _paint(canvas, alpha, x, y, colour)
    return np.floor(canvas + 0.5).clip(0, 255).astype(np.uint8), colour


def _render(job) -> list[dict]:
    """One canvas in a worker (pools from detection's ``_init_worker``): written as JPEG unless the file exists."""
    path, n, split, size, seed = job
    image, objects = question_canvas(n, _WORK["pools"][split], _WORK["digits8"], _WORK["labels"], size, seed)
    if not os.path.exists(path):
        from PIL import Image

        atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="JPEG", quality=95))
    return objects


# --- the questions --------------------------------------------------------------------------------------------------


def _x_centre(obj: dict) -> float:
    return obj["box"][0] + obj["box"][2] / 2


def question_candidates(objects: list[dict]) -> dict[str, list[tuple[float, str, str]]]:
    """Every question the templates can ask about a canvas's objects, by type: (weight, question, answer). The
    weights give the draw's odds: count asks the total half the time, a colour on the canvas 3/8 and one absent
    ("0") 1/8; exist's digits are equally likely (``digit_questions`` alternates its "yes" and "no" answers)."""
    digits, colours = [o["digit"] for o in objects], [o["colour"] for o in objects]
    xs = [_x_centre(o) for o in objects]
    shown = [c for c in COLOURS if c in colours]
    unseen = [c for c in COLOURS if c not in colours]
    count = [(0.5, "how many digits are there?", str(len(objects)))]
    count += [(0.375 / len(shown), f"how many {c} digits are there?", str(colours.count(c))) for c in shown]
    count += [(0.125 / len(unseen), f"how many {c} digits are there?", "0") for c in unseen]
    present = sorted(set(digits))
    exist = [(1.0, f"is there {'an' if word == 'eight' else 'a'} {word}?", "yes" if d in present else "no")
             for d, word in enumerate(CLASS_NAMES)]  # fmt: skip
    position = []
    if len(objects) >= 2:
        order = np.argsort(xs)
        position = [(1.0, "which digit is on the far left?", str(digits[order[0]])),
                    (1.0, "which digit is on the far right?", str(digits[order[-1]]))]  # fmt: skip
    relation, colour = [], []
    for i, d in enumerate(digits):
        if digits.count(d) != 1:
            continue
        colour.append((1.0, f"what colour is the {CLASS_NAMES[d]}?", colours[i]))
        for side, sign in (("left", -1), ("right", 1)):
            others = [j for j in range(len(objects)) if sign * (xs[j] - xs[i]) > 0]
            if others:
                nearest = min(others, key=lambda j: abs(xs[j] - xs[i]))
                relation.append((1.0, f"what digit is to the {side} of the {CLASS_NAMES[d]}?", str(digits[nearest])))
    return {"count": count, "exist": exist, "position": position, "relation": relation, "colour": colour}


def digit_questions(objects: list[dict], rng: np.random.Generator, k: int) -> list[dict]:
    """``k`` different questions about a canvas ([{"question", "answer", "question_type"}]; fewer only when the
    canvas has fewer than ``k`` candidates, never with k <= MAX_QUESTIONS_PER_CANVAS): the types in a seeded order,
    round after round, each round one more question of every type that has one left; within a type, candidates in
    a weighted random order (``question_candidates``'s weights; Efraimidis-Spirakis keys u^(1/w)), except that exist
    questions alternate "yes" and "no" from a fair coin's first answer: a canvas asked two gets one of each (drawn
    independently, a one-digit canvas asked two would give "no" 62% of the time), so the splits are balanced."""
    queues = {}
    for t, cands in question_candidates(objects).items():
        keys = rng.random(len(cands)) ** (1 / np.asarray([w for w, _, _ in cands], dtype=np.float64))
        queues[t] = [cands[i] for i in np.argsort(-keys, kind="stable")]
    first = "yes" if rng.random() < 0.5 else "no"
    yes_no = [[c for c in queues["exist"] if c[2] == first], [c for c in queues["exist"] if c[2] != first]]
    queues["exist"] = [c for pair in itertools.zip_longest(*yes_no) for c in pair if c is not None]
    types = [QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))]
    out = []
    while len(out) < k and any(queues.values()):
        for t in types:
            if queues[t] and len(out) < k:
                _, question, answer = queues[t].pop(0)
                out.append({"question": question, "answer": answer, "question_type": t})
    return out


def answer_type(answer: str) -> str:
    """VQA's answer type of an answer: "yes/no", "number" (a numeral) or "other"."""
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def rendering_constants() -> dict:
    """The constants a canvas depends on, detection's background and clutter included (part of the rebuild stamp)."""
    from florence.data.detection import rendering_constants as detection_constants

    layout = ("digit_sides", "digits_per_canvas", "max_iou", "max_cover", "placement_tries")  # detection's own
    shared = {k: v for k, v in detection_constants().items() if k not in layout}
    return {**shared, "colours": {k: list(v) for k, v in COLOURS.items()}, "digit_sides": list(DIGIT_SIDES),
            "digits_per_canvas": list(DIGITS_PER_CANVAS), "min_centre_dx": MIN_CENTRE_DX,
            "placement_tries": PLACEMENT_TRIES, "stroke_gain": STROKE_GAIN,
            "clutter_strength": CLUTTER_STRENGTH}  # fmt: skip


def _same_stamp(path: str, stamp: dict) -> bool:
    """Whether the JSON summary at ``path`` records ``stamp``'s values (False when it is missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        return {k: previous.get(k) for k in stamp} == stamp
    except (OSError, ValueError, AttributeError):  # AttributeError: a JSON that is not an object
        return False


def _vqa_question(image_id: int, k: int, q: dict) -> dict:
    answers = [{"answer": q["answer"], "answer_id": i + 1} for i in range(ANSWERS_PER_QUESTION)]
    return {"question_id": image_id * 1000 + k, "image_id": image_id, "question": q["question"],
            "question_type": q["question_type"], "answer_type": answer_type(q["answer"]),
            "multiple_choice_answer": q["answer"], "answers": answers}  # fmt: skip


def build_digit_questions(out_dir: str, size: int = 128, test_fraction: float = 0.2, seed: int = 0, *,
                          train_canvases: int = 3000, test_canvases: int = 400, questions_per_canvas: int = 5,
                          limit: int | None = None, workers: int | None = None,
                          quiet: bool = False) -> dict:  # fmt: skip
    """The digit questions (module docstring): ``train_canvases`` canvases (``question_canvas``) of training digit
    images, ``test_canvases`` of held-out ones (``builtin._split(labels, test_fraction, seed)``), each with
    ``questions_per_canvas`` questions (``digit_questions``, drawn by (seed, "digit_questions:questions", canvas n)).
    ``limit``: at most this many canvases per split (the first ones; for tests). Returns the summary written to
    DIR/classes.json.

    Writes DIR/images/canvas_XXXXX.jpg (canvas n: 0 .. train_canvases - 1 for training, then the held-out ones; image
    id n + 1), DIR/train.json, DIR/test.json, DIR/answers.json and DIR/classes.json (formats in the module
    docstring). Deterministic for a seed; images already there are kept when classes.json records the same size,
    seed, test fraction, train_canvases and rendering constants (``rendering_constants``), else every canvas is
    written again; the JSON files are always written again (questions_per_canvas changes only them). Rendering runs
    in ``workers`` fork processes (default min(canvases, CPU count)).

    Raises ValueError naming the argument: size not an int >= 64, test_fraction outside (0, 1), canvases not ints
    >= 1, questions_per_canvas outside 1..MAX_QUESTIONS_PER_CANVAS, limit or workers not None or a positive int.

    Measured on 2 CPU cores shared with a training run: the defaults (3,000 + 400 canvases at 128 px, 15,000 + 2,000
    questions, 33 MB of JPEG) build in 18.8 s with 2 workers at a load average of 2, 32.5 s at 5 (16.3 s of CPU),
    the command line and imports included; a second run keeps the images and renders again only to collect the
    objects: 25.1 s at load 5 (13.2 s of CPU). Rendering and drawing the questions take 2.5 ms a canvas.
    """
    from florence.data.builtin import _digit_images, _split
    from florence.data.curate import _progress

    for name, value, low in (("size", size, 64), ("train_canvases", train_canvases, 1),
                             ("test_canvases", test_canvases, 1)):  # fmt: skip
        if not _is_int(value) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not _is_int(questions_per_canvas) or not 1 <= questions_per_canvas <= MAX_QUESTIONS_PER_CANVAS:
        raise ValueError(f"questions_per_canvas: expected an int in 1..{MAX_QUESTIONS_PER_CANVAS} (a one-digit canvas "
                         f"has {MAX_QUESTIONS_PER_CANVAS} questions), got {questions_per_canvas!r}")  # fmt: skip
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    for name, value in (("limit", limit), ("workers", workers)):
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name}: expected None or a positive int, got {value!r}")
    digits8, labels = _digit_images(8)
    train, test = _split(labels, test_fraction, seed)
    stamp = {"size": size, "seed": seed, "test_fraction": test_fraction, "train_canvases": train_canvases,
             **rendering_constants()}  # fmt: skip
    reuse = _same_stamp(os.path.join(out_dir, "classes.json"), stamp)
    first = {"train": 0, "test": train_canvases}
    counts = {"train": train_canvases, "test": test_canvases}
    numbers = {s: list(range(first[s], first[s] + min(counts[s], limit or counts[s]))) for s in counts}
    jobs = [(os.path.join(out_dir, "images", f"canvas_{n:05d}.jpg"), n, split, size, seed)
            for split, ns in numbers.items() for n in ns]  # fmt: skip
    for path in [] if reuse else (job[0] for job in jobs):  # drawn with other parameters: drawn again
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    init = (digits8, labels, {"train": train, "test": test})
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers == 1:
        _init_worker(*init)
        objects = list(_progress(map(_render, jobs), len(jobs), "digit questions", quiet, "canvas"))
    else:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init) as pool:
            rendered = pool.imap(_render, jobs, chunksize=16)
            objects = list(_progress(rendered, len(jobs), "digit questions", quiet, "canvas"))
    objects_of = {job[1]: o for job, o in zip(jobs, objects, strict=True)}
    summary = {"variant": "digit_questions", **stamp, "test_canvases": test_canvases,
               "questions_per_canvas": questions_per_canvas, "question_types": list(QUESTION_TYPES)}  # fmt: skip
    for split, ns in numbers.items():
        images, questions = [], []
        for n in ns:
            images.append({"id": n + 1, "file_name": f"images/canvas_{n:05d}.jpg", "width": size, "height": size,
                           "objects": objects_of[n]})  # fmt: skip
            rng = _rng(seed, 0, f"canvas{n}", "digit_questions:questions")
            asked = digit_questions(objects_of[n], rng, questions_per_canvas)
            questions += [_vqa_question(n + 1, k, q) for k, q in enumerate(asked)]
        data = {"info": {"description": f"florence digit questions ({split})", "version": "1.0", "seed": seed,
                         "split": split}, "images": images, "questions": questions}  # fmt: skip
        atomic_write_text(os.path.join(out_dir, f"{split}.json"), json.dumps(data) + "\n")
        summary[split], summary[f"{split}_questions"] = len(images), len(questions)
        summary[f"{split}_types"] = dict(Counter(q["question_type"] for q in questions))
        summary[f"{split}_yes"] = sum(q["multiple_choice_answer"] == "yes" for q in questions)
        summary[f"{split}_no"] = sum(q["multiple_choice_answer"] == "no" for q in questions)
        if split == "train":
            vocab = _answer_counts(data)
            answers = {"split": "train", "questions": len(questions),
                       "answers": [{"answer": a, "count": c} for a, c in vocab]}  # fmt: skip
            atomic_write_text(os.path.join(out_dir, "answers.json"), json.dumps(answers, indent=1) + "\n")
            summary["answers"] = len(vocab)
    atomic_write_text(os.path.join(out_dir, "classes.json"), json.dumps(summary, indent=1) + "\n")
    return summary


# --- answers: normalisation, vocabulary, soft scores, accuracy -------------------------------------------------------


def normalize_answer(answer: str) -> str:
    """An answer as it is compared and looked up: lower-cased, whitespace collapsed and stripped, one trailing
    period dropped, the number words "zero".."ten" (whole words) written as digits ("Two." -> "2", "two dogs" ->
    "2 dogs"). "colour" and "color" are left as they are.

    A subset of the official VQA normalisation (vqaEval.py), which also strips other punctuation, drops the
    articles "a", "an", "the", expands contractions and maps "none" to "0"; the built-in answers are single
    lower-case words, where the two agree. Raises TypeError when ``answer`` is not a string."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected a string, got {type(answer).__name__}")
    text = " ".join(answer.lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split(" "))


def _main_answer(q: dict) -> str:
    """The question's answer for the vocabulary: its multiple_choice_answer, else the most given of its answers."""
    if isinstance(q.get("multiple_choice_answer"), str):
        return normalize_answer(q["multiple_choice_answer"])
    return Counter(normalize_answer(a["answer"]) for a in q["answers"]).most_common(1)[0][0]


def _answer_counts(data: dict) -> list[tuple[str, int]]:
    counts = Counter(_main_answer(q) for q in data["questions"])
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def answer_vocabulary(annotations: str | dict, min_count: int = 1) -> list[str]:
    """The answer vocabulary of a VQA-format file (path or dict): the normalised ``multiple_choice_answer`` of each
    question (the most given answer where it has none), those given for at least ``min_count`` questions, sorted by
    count descending, then text (VQA models' usual top-K answers: take the first K). Build it from the TRAINING
    questions only: answers seen only in evaluation are what a classifier cannot give. ValueError when
    ``min_count`` is not a positive int."""
    if not _is_int(min_count) or min_count < 1:
        raise ValueError(f"min_count: expected a positive int, got {min_count!r}")
    if not isinstance(annotations, dict):
        with open(annotations, encoding="utf-8") as f:
            annotations = json.load(f)
    return [a for a, c in _answer_counts(annotations) if c >= min_count]


def soft_scores(answers: list[str], vocab_index: dict[str, int]) -> dict[int, float]:
    """VQA's soft targets of one question: {vocabulary index: min(#humans giving the answer / 3, 1)} over its human
    ``answers`` (normalised, ``normalize_answer``); answers not in ``vocab_index`` ({answer: index}) contribute
    nothing. Ten equal answers give {index: 1.0}; "yes" x 2 and "no" x 8 give {yes: 2/3, no: 1.0}."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {vocab_index[a]: min(n / 3, 1.0) for a, n in counts.items() if a in vocab_index}


def _targets(answer_lists: Sequence[Sequence[str]], vocab_index: dict[str, int]) -> torch.Tensor:
    """float32 (Q, A) soft scores of each question's answers over a vocabulary of A answers."""
    out = torch.zeros(len(answer_lists), len(vocab_index), dtype=torch.float32)
    for i, answers in enumerate(answer_lists):
        for j, score in soft_scores(answers, vocab_index).items():
            out[i, j] = score
    return out


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> torch.Tensor:
    """float32 (Q,) VQA accuracy of each predicted answer: min(#human answers equal to it / 3, 1), both sides
    normalised (``normalize_answer``): 0, 1, 2 and 3 or more matches give 0, 1/3, 2/3 and 1.

    The official metric (vqaEval.py) averages this over the 10 leave-one-out subsets of 9 of the 10 human answers
    (3 matches of 10 then give 0.9, not 1); the two are equal whenever the 10 answers agree, as in the built-in
    data, and differ by at most 0.1 otherwise. ValueError when the two sequences differ in length."""
    if len(predictions) != len(answers):
        raise ValueError(f"predictions: {len(predictions)} answers for {len(answers)} questions; expected one each")
    scores = []
    for predicted, human in zip(predictions, answers, strict=True):
        p = normalize_answer(predicted)
        scores.append(min(sum(normalize_answer(a) == p for a in human) / 3, 1.0))
    return torch.tensor(scores, dtype=torch.float32)


def vqa_report(predictions: Sequence[str], answers: Sequence[Sequence[str]], question_types: Sequence[str]) -> dict:
    """{"accuracy": the mean VQA accuracy (``vqa_accuracy``, a float), "questions": their number, "per_type": {type:
    the mean over that type's questions}, "per_type_questions": {type: their number}} (types in QUESTION_TYPES
    order, then any others sorted; only types that occur). ValueError when the lengths differ or there is no
    question."""
    acc = vqa_accuracy(predictions, answers).double()
    if len(question_types) != len(acc):
        raise ValueError(f"question_types: {len(question_types)} types for {len(acc)} questions; expected one each")
    if not len(acc):
        raise ValueError("predictions: no questions to score")
    types = list(question_types)
    rows = {t: [i for i, x in enumerate(types) if x == t] for t in _ordered_types(types)}
    return {"accuracy": float(acc.mean()), "questions": len(acc),
            "per_type": {t: float(acc[r].mean()) for t, r in rows.items()},
            "per_type_questions": {t: len(r) for t, r in rows.items()}}  # fmt: skip


# --- curation -------------------------------------------------------------------------------------------------------


def _check_questions(data: dict, name: str, image_ids) -> list[str]:
    """The problems of a VQA-format file's questions (ids, image ids, texts, answers, field types)."""
    if not isinstance(data.get("questions"), list):
        return [f"{name}: 'questions' is missing or not a list; expected a list"]
    problems, seen = [], set()
    for q in data["questions"]:
        if not isinstance(q, dict):
            problems.append(f"{name}: question {q!r}: expected an object")
            continue
        qid, iid = q.get("question_id"), q.get("image_id")
        where = f"{name}: question {qid} (image {iid})"
        if not _is_int(qid):
            problems.append(f"{where}: 'question_id' is not an int; expected an int")
        elif qid in seen:
            problems.append(f"{where}: duplicate question id; expected unique ids")
        seen.add(qid)
        if "image_id" not in q:
            problems.append(f"{where}: no 'image_id'; expected one of the 'images' ids")
        elif not _is_int(iid) or iid not in image_ids:
            problems.append(f"{where}: unknown image id {iid!r}; expected one of the 'images' ids")
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            problems.append(f"{where}: question {q.get('question')!r} is empty; expected a text")
        answers = q.get("answers")
        if (not isinstance(answers, list) or not 1 <= len(answers) <= MAX_ANSWERS
                or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)):  # fmt: skip
            shown = repr(answers) if len(repr(answers)) <= 60 else f"{repr(answers)[:57]}..."
            problems.append(f"{where}: answers {shown}; expected a list of 1-{MAX_ANSWERS} objects with an 'answer' "
                            f"string (VQA: {ANSWERS_PER_QUESTION})")  # fmt: skip
        for field in ("question_type", "answer_type", "multiple_choice_answer"):
            if field in q and not isinstance(q[field], str):
                problems.append(f"{where}: '{field}' {q[field]!r} is not a string; expected a string")
    return problems


def _shard(path: str, members: list[tuple[str, bytes]]) -> str:
    """A USTAR tar of ``members`` ((name, bytes), in order; florence.data.curate's member headers) written under a
    temporary name and renamed, its DALI index beside it (when DALI is installed); returns its SHA-256."""
    from florence.data.curate import _tar_member, write_dali_index

    def write(tmp):
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
            for member, data in members:
                _tar_member(tar, member, data)

    atomic_write(path, write)
    write_dali_index(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ordered_types(types) -> list[str]:
    present = set(types)
    return [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))


def _read_vqa_file(annotations: str) -> tuple[str, dict]:
    """(the file's name for messages, its JSON object); FileNotFoundError when it is not a file, ValueError when it
    is not JSON or not an object."""
    from florence.data.curate import path_text

    name = path_text(os.path.basename(annotations))
    try:
        data = json.loads(pathlib.Path(annotations).read_bytes())
    except (FileNotFoundError, IsADirectoryError) as e:
        raise FileNotFoundError(f"annotations: {annotations} is not a file") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{name}: invalid JSON ({e}); expected a VQA-format file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a JSON object with 'images' and 'questions', got {type(data).__name__}")
    return name, data


def curate_vqa(annotations: str, out_dir: str, image_root: str | None = None, shard_size: int = 256,
               quiet: bool = False) -> dict:  # fmt: skip
    """Check a VQA-format file whole (module docstring), then write its images and questions into webdataset shards
    (one sample per image, in the file's image order); returns the manifest. Raises ValueError listing every
    problem (up to detection's MAX_PROBLEMS_SHOWN, and how many there are) before anything is written;
    FileNotFoundError when ``annotations`` is not a file. ``image_root``: the folder image paths are relative to
    (default the JSON's). The manifest's "answers" is the file's own answer vocabulary (``answer_vocabulary``):
    curate the training file, and the loader's targets are over the training answers."""
    from florence.data.curate import _atomic_json, _image_jpeg_bytes, _progress, path_text, stored_as_is

    if not _is_int(shard_size) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
    name, data = _read_vqa_file(annotations)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(annotations))
    # the image checks (ids, sizes, files decoded, upright sizes) are the COCO ones of detection's curation
    problems, images, by_image, _ = _check_coco({"images": data.get("images"), "annotations": [], "categories": []},
                                                name, root)  # fmt: skip
    problems += _check_questions(data, name, by_image)
    if problems:
        listed = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            listed.append(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        raise ValueError(f"{name}: {len(problems)} problem(s), nothing written:\n  " + "\n  ".join(listed))
    for q in data["questions"]:
        by_image[q["image_id"]].append({"question_id": q["question_id"], "question": q["question"],
                                        "question_type": q.get("question_type", "unknown"),
                                        "answer_type": q.get("answer_type", "unknown"),
                                        "multiple_choice_answer": _main_answer(q),
                                        "answers": [a["answer"] for a in q["answers"]]})  # fmt: skip
    samples = []  # (image for curate's _image_jpeg_bytes, the sample's JSON)
    for k, img in enumerate(images):
        meta = {"key": f"{k:09d}", "image_id": img["id"], "file_name": img["file_name"], "width": img["width"],
                "height": img["height"], "questions": by_image[img["id"]]}  # fmt: skip
        samples.append(({"image": img["path"], "as_is": stored_as_is(img["analysis"])}, meta))
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    starts = range(0, len(samples), shard_size)
    for k in _progress(starts, len(starts), "shards", quiet, "shard"):
        part = samples[k : k + shard_size]
        members = []
        for image, meta in part:
            members.append((f"{meta['key']}.jpg", _image_jpeg_bytes(image)))
            members.append((f"{meta['key']}.json", json.dumps(meta, sort_keys=True).encode()))
        path = f"shard-{k // shard_size:05d}.tar"
        shards.append({"path": path, "samples": len(part), "questions": sum(len(m["questions"]) for _, m in part),
                       "sha256": _shard(os.path.join(out_dir, path), members)})  # fmt: skip
    questions = data["questions"]
    manifest = {"images": len(samples), "samples": len(samples), "questions": len(questions),
                "images_without_questions": sum(1 for _, m in samples if not m["questions"]),
                "answers": answer_vocabulary(data),
                "question_types": _ordered_types(q.get("question_type", "unknown") for q in questions),
                "shards": shards, "format": "webdataset",
                "components": {"jpg": "the image (JPEG, upright)",
                               "json": "key, image_id, file_name, width, height, questions: [{question_id, question, "
                                       "question_type, answer_type, multiple_choice_answer (normalised), answers}]"},
                "index_format": "DALI wds2idx v1.2 (.idx beside each shard, where DALI is installed)",
                "args": {"annotations": path_text(annotations), "image_root": path_text(root),
                         "shard_size": shard_size}}  # fmt: skip
    _atomic_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


# --- the loader -----------------------------------------------------------------------------------------------------


class VQALoader(DetectionLoader):
    """Batches of questions of one rank (module docstring). Build with ``make_vqa_loader``: it is made from the
    image loader ``make_detection_loader`` gives for the same arguments (their checks, the shards' index, the
    decoder), and its rank split, ``__len__`` and ``iterate(start_batch)`` are that class's, over the (image,
    question) pairs in ``self.entries`` instead of the images; ``set_epoch`` (its own) keeps each image's questions
    together."""

    def __init__(self, images: DetectionLoader, data_dir: str, context_length: int, decode_images: bool = True,
                 tokenizer=None):  # fmt: skip
        from florence.data.loader import load_manifest

        vars(self).update(vars(images))  # the image loader's settings, shard index and decoder
        self.context_length, self.tokenizer = context_length, tokenizer
        self.answers = load_manifest(data_dir)["answers"]
        self.vocab_index = {a: i for i, a in enumerate(self.answers)}
        self.images = self.entries  # (shard path, key, jpg offset, jpg size, json offset, json size) per image
        self.metas = [json.loads(self._read(path, mo, ms)) for path, _, _, _, mo, ms in self.images]
        self.entries = [(i, j) for i, meta in enumerate(self.metas) for j in range(len(meta["questions"]))]
        self.first = np.cumsum([0] + [len(meta["questions"]) for meta in self.metas])  # image i: entries first[i]..
        self.decode_images = decode_images
        self.set_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch's question order: in training a seeded permutation of the images (seed, epoch), each image's
        questions one after another in their order (so that a batch holds all questions of few images, each image
        decoded and encoded once); in evaluation the shards' order. Split between ranks as the image loader splits
        (``split``)."""
        from florence.data.video import _rank_positions

        self.epoch = epoch
        images = np.arange(len(self.metas))
        if self.train:
            images = np.random.default_rng([self.seed, epoch]).permutation(len(self.metas))
        order = np.concatenate([np.arange(self.first[i], self.first[i + 1]) for i in images] or [np.zeros(0, int)])
        self.positions = _rank_positions(order, self.rank, self.world, self.batch_size, self.drop_last, self.split)

    def plan(self, meta: dict) -> dict:
        """Every image's plan, in training too: the longer side resized to ``size``, top-left (no crop, no flip)."""
        return plan_detection(int(meta["width"]), int(meta["height"]), self.size, False)

    def batch(self, b: int) -> dict:
        """Batch ``b`` of the current epoch (each image of the batch decoded and resized once)."""
        units = [self.entries[p] for p in self.positions[b * self.batch_size : (b + 1) * self.batch_size]]
        unique = list(dict.fromkeys(i for i, _ in units))
        placed = None
        if self.decode_images:
            blobs = [self._read(path, jo, js) for path, _, jo, js, _, _ in (self.images[i] for i in unique)]
            names = [f"{os.path.basename(self.images[i][0])}:{self.images[i][1]}.jpg" for i in unique]
            if self.decoder is None:
                decoded = [pil_decode(blob, n) for blob, n in zip(blobs, names, strict=True)]
            else:
                decoded = self.decoder(blobs, names)
            placed = np.zeros((len(unique), 3, self.size, self.size), dtype=np.float32)
            for k, (i, image) in enumerate(zip(unique, decoded, strict=True)):
                _place(image, self.plan(self.metas[i]), self.size, placed[k])
            placed = torch.from_numpy(placed)
        where = {i: k for k, i in enumerate(unique)}
        questions = [self.metas[i]["questions"][j] for i, j in units]
        answers = [q["answers"] for q in questions]
        return {"images": placed, "image_index": torch.tensor([where[i] for i, _ in units], dtype=torch.int64),
                "tokens": question_tokens([q["question"] for q in questions], self.context_length, self.tokenizer),
                "targets": _targets(answers, self.vocab_index),
                "question_ids": torch.tensor([q["question_id"] for q in questions], dtype=torch.int64),
                "image_ids": torch.tensor([self.metas[i]["image_id"] for i, _ in units], dtype=torch.int64),
                "question_types": [q["question_type"] for q in questions], "answers": answers}  # fmt: skip


def _check_context_length(context_length, tokenizer=None) -> None:
    from florence.tokenizer import get_tokenizer

    if tokenizer is None:  # ValueError for a bad length; needs open_clip (ImportError naming it)
        get_tokenizer(context_length=context_length)
    elif not callable(tokenizer):
        raise ValueError(f"tokenizer: expected None (CLIP's BPE) or a callable list[str] -> int64 (B, L), got "
                         f"{type(tokenizer).__name__}")  # fmt: skip


def question_tokens(texts: list[str], context_length: int, tokenizer=None) -> torch.Tensor:
    """int64 (len(texts), L): CLIP's BPE at ``context_length`` (``florence.tokenizer.tokenize``) when ``tokenizer``
    is None, else ``tokenizer(texts)`` (e.g. ``florence.models.roberta.RobertaTokens``: RoBERTa's ids at its
    ``max_length``). ValueError for a tokenizer whose output is not (len(texts), L) integers."""
    if tokenizer is None:
        from florence.tokenizer import tokenize

        return tokenize(texts, context_length)
    ids = tokenizer(texts)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or len(ids) != len(texts) or ids.dtype not in (
            torch.int64, torch.int32):  # fmt: skip
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"tokenizer: expected int64 ({len(texts)}, L) ids for {len(texts)} questions, got {got}")
    return ids.to(torch.int64)


def make_vqa_loader(data_dir: str, batch_size: int, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                    train: bool = True, drop_last: bool = True, backend: str = "auto", split: str = "global_batch",
                    context_length: int = 32, num_threads: int | None = None,
                    decode_images: bool = True, tokenizer=None) -> VQALoader:  # fmt: skip
    """A loader of question batches from curated shards (``curate_vqa``; module docstring): {"images": float32 (N, 3,
    size, size) (each image of the batch once; None with ``decode_images=False``, for the question-only model),
    "image_index": int64 (B,) (question b's row in "images"), "tokens": int64 (B, context_length) (CLIP BPE,
    ``florence.tokenizer.tokenize``; with ``tokenizer``, its ids: :func:`question_tokens`), "targets": float32 (B, A)
    soft scores over the manifest's A answers (``soft_scores``), "question_ids" and "image_ids": int64 (B,),
    "question_types": [str] * B, "answers": [[str]] * B (the human answers)}. ``train``: a new seeded order every epoch
    (``set_epoch``: the images permuted, each image's questions together, so that with ``split="global_batch"`` a rank's
    batch of B questions about canvases with k questions each holds about B / k + 1 images: a canvas at a batch's or a
    rank's edge is read on both sides), else the shards' order; ``split``: "global_batch" (rank r takes the r-th slice
    of each global batch) or "rank" (positions r, r + world_size, ...: this interleaves an image's questions over the
    ranks). backend "auto" takes DALI where it imports, else PIL ("torch"); ``num_threads`` is DALI's. Raises ValueError
    naming a bad argument; CLIP's tokenizer needs open_clip (florence.optional's ImportError names it)."""
    _check_context_length(context_length, tokenizer)
    images = make_detection_loader(data_dir, batch_size, size, rank=rank, world_size=world_size, seed=seed,
                                   train=train, drop_last=drop_last, backend=backend, split=split,
                                   num_threads=num_threads)  # fmt: skip
    return VQALoader(images, data_dir, context_length, decode_images, tokenizer)


def read_answer_vocab(path: str) -> list[str]:
    """The answers of an answers.json (``build_digit_questions``), in its order."""
    with open(path, encoding="utf-8") as f:
        return [row["answer"] for row in json.load(f)["answers"]]


def load_vqa_eval_set(folder: str, size: int, annotations: str = "test.json", answer_vocab: list[str] | None = None,
                      backend: str = "auto", context_length: int = 32, tokenizer=None) -> dict:  # fmt: skip
    """The questions of a raw folder (a VQA-format file and its images) for evaluation, images resized as the loader
    resizes them: {"images": float32 (N, 3, size, size) (each image once, the file's order), "image_ids": int64 (N,),
    and per question, the file's order: "image_index": int64 (Q,) (its image's row in "images"), "tokens": int64 (Q,
    context_length) (:func:`question_tokens` with ``tokenizer``), "question_ids": int64 (Q,), "question_types": [str] *
    Q, "answers": [[str]] * Q, "targets": float32 (Q, A) soft scores over ``answer_vocab``, "answer_vocab": the A
    answers (default: the folder's answers.json, the training answers), "annotations": the file's absolute path}. Raises
    ValueError for a bad size or backend, or a question naming an unknown image id; FileNotFoundError for a missing
    file."""
    from florence.data.curate import native_path

    if not _is_int(size) or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    backend = _resolve_backend(backend)
    _check_context_length(context_length, tokenizer)
    path = os.path.abspath(os.path.join(folder, annotations))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if answer_vocab is None:
        answer_vocab = read_answer_vocab(os.path.join(folder, "answers.json"))
    rows = data["images"]
    paths = [os.path.join(os.path.dirname(path), native_path(r["file_name"])) for r in rows]
    blobs = [pathlib.Path(p).read_bytes() for p in paths]
    if backend == "dali":
        decoded = DaliImageDecoder(32)(blobs, paths)
    else:
        decoded = [pil_decode(b, p) for b, p in zip(blobs, paths, strict=True)]
    images = np.zeros((len(rows), 3, size, size), dtype=np.float32)
    for k, image in enumerate(decoded):
        _place(image, plan_detection(image.shape[1], image.shape[0], size, False), size, images[k])
    index_of = {r["id"]: k for k, r in enumerate(rows)}
    questions = data["questions"]
    unknown = sorted({q["question_id"] for q in questions if q["image_id"] not in index_of})
    if unknown:
        raise ValueError(f"{annotations}: questions {unknown[:20]} name image ids not in 'images'")
    answers = [[a["answer"] for a in q["answers"]] for q in questions]
    return {"images": torch.from_numpy(images), "image_ids": torch.tensor([r["id"] for r in rows], dtype=torch.int64),
            "image_index": torch.tensor([index_of[q["image_id"]] for q in questions], dtype=torch.int64),
            "tokens": question_tokens([q["question"] for q in questions], context_length, tokenizer),
            "question_ids": torch.tensor([q["question_id"] for q in questions], dtype=torch.int64),
            "question_types": [q.get("question_type", "unknown") for q in questions], "answers": answers,
            "targets": _targets(answers, {a: i for i, a in enumerate(answer_vocab)}),
            "answer_vocab": list(answer_vocab), "annotations": path}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curate", help="check a VQA-format file whole, then write its webdataset shards")
    c.add_argument("--annotations", required=True, help="the VQA-format JSON, e.g. DIR/train.json")
    c.add_argument("--out", required=True, help="where the shards, their DALI indexes and manifest.json go")
    c.add_argument("--image-root", help="the folder file_name paths start from (default: the JSON's folder)")
    c.add_argument("--shard-size", type=int, default=256, help="images (with all their questions) per shard")
    c.add_argument("--quiet", action="store_true", help="without the progress bar")
    args = p.parse_args(argv)
    try:
        manifest = curate_vqa(args.annotations, args.out, args.image_root, args.shard_size, quiet=args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"florence.data.vqa: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: manifest[k] for k in ("images", "questions", "images_without_questions")}
                     | {"shards": len(manifest["shards"]), "answers": len(manifest["answers"])}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
