"""The built-in dataset: scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package; nothing is
downloaded) as image-text pairs, in the curation command's input format.

    python -m florence.data.builtin --out DIR [--size 64] [--test-fraction 0.2] [--seed 0] [--colour-copies 1]

writes DIR/images/*.jpg (each digit upscaled to --size, bicubic, saved as JPEG), DIR/train.jsonl (one line per
training image: {"image": "images/....jpg", "captions": [...], "label": digit}) for ``florence.data.curate``,
DIR/test.jsonl (the held-out images with their class index and captions, for zero-shot and retrieval) and
DIR/classes.json (the class names, for zero-shot evaluation). Captions come in several styles per class and every
style is shared by all images of the class, so many pairs share a text (UniCL positives); some are a bare word
("seven"), which curation augments with prompts. --colour-copies N adds N coloured copies of every training digit
drawn as the question canvases draw digits (``build_digits``; not yet used by make demo).

Variants are registered in VARIANTS by name; each builder takes (out_dir, size, test_fraction, seed) and returns a
summary dict; --size defaults to the variant's own default (64 here, 128 for digit_canvases and digit_questions).
Further variants for the adapters are meant to be added there, reusing ``_digit_images`` and ``_split``.

    python -m florence.data.builtin --variant moving_digits --out DIR [--size 64] [--frames 16]

builds the video variant (``build_moving_digits``): a clip per digit image of a digit moving left, right, up or down
over a textured background, 40 classes (digit x direction), written as VP9 WebM files (its docstring has the
details and the measured build time).

    python -m florence.data.builtin --variant digit_canvases --out DIR [--size 128]

builds the detection variant (``florence.data.detection.build_digit_canvases``, imported when used): 128 x 128
canvases of 1-6 digits (10-60 px) over a textured background with clutter, DIR/images/canvas_XXXXX.jpg with COCO
instances files DIR/train.json and DIR/test.json (one box per digit, category id = digit + 1) for
``python -m florence.data.detection curate``.

    python -m florence.data.builtin --variant digit_questions --out DIR [--size 128]

builds the visual-question-answering variant (``florence.data.vqa.build_digit_questions``, imported when used):
canvases of 1-4 coloured digits with five questions each (count, exist, position, relation, colour; one-word
answers), DIR/images/canvas_XXXXX.jpg with VQA-format files DIR/train.json and DIR/test.json and the training answer
vocabulary DIR/answers.json, for ``python -m florence.data.vqa curate``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys

import numpy as np

from florence_kernels._io import atomic_write, atomic_write_text

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Several caption styles per class; {name} is the word, {digit} the numeral. The bare-word styles are "short
# texts" that curation turns into prompts (stage-1 augmentation).
CAPTION_STYLES = (
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a scan of a handwritten {name}",
    "{name}",
    "{digit}",
)


def _digit_images(size: int):
    """(images uint8 (N, size, size), labels (N,)): sklearn's digits (16 grey levels) upscaled, dark ink on white."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.empty((len(d.images), size, size), dtype=np.uint8)
    for i, img in enumerate(d.images):
        grey = (255 - img * (255 / 16)).clip(0, 255).astype(np.uint8)
        out[i] = np.asarray(Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC))
    return out, d.target.astype(np.int64)


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same fraction of every class held out (indices sorted)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _write_lines(path: str, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def build_digits(out_dir: str, size: int = 64, test_fraction: float = 0.2, seed: int = 0,
                 colour_copies: int = 0) -> dict:  # fmt: skip
    """The pretraining variant (module docstring): every digit image grey on white, filling the frame; the held-out
    split is those images only (zero-shot and retrieval). ``colour_copies`` adds that many copies of every TRAINING
    digit drawn as the question canvases draw digits (``florence.data.vqa.colour_copy``: one of six colours, 62-100%
    of the frame at a random place, the canvases' background and clutter; seeded by (seed, copy, image)), each with
    the five caption styles plus two naming its colour ("a red handwritten seven", "the number 7 in red"), written as
    images/colour{copy}_{index:04d}.jpg. make demo does not use them yet (one copy: make demo-vqa 45.4% against 39.3%,
    make demo-detect's AP50 0.847 under its 0.85; README, make demo). Returns the summary written to classes.json.
    Raises ValueError for a size < 8, a test_fraction outside (0, 1) or colour_copies not an int >= 0."""
    from PIL import Image

    from florence.data.curate import to_rgb8

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int >= 8 (pixels), got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    if not isinstance(colour_copies, int) or isinstance(colour_copies, bool) or colour_copies < 0:
        raise ValueError(f"colour_copies: expected an int >= 0, got {colour_copies!r}")
    images, labels = _digit_images(size)
    train, test = _split(labels, test_fraction, seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i, img in enumerate(images):
        path = os.path.join(img_dir, f"digit_{i:04d}.jpg")
        if not os.path.exists(path):
            rgb = to_rgb8(Image.fromarray(img, mode="L"))
            atomic_write(path, lambda tmp, rgb=rgb: rgb.save(tmp, format="JPEG", quality=95))

    def captions(y):
        return [s.format(name=CLASS_NAMES[y], digit=y) for s in CAPTION_STYLES]

    rows = [{"image": f"images/digit_{i:04d}.jpg", "captions": captions(int(labels[i])), "label": int(labels[i])}
            for i in train]  # fmt: skip
    if colour_copies:
        from florence.data.loader import _rng
        from florence.data.vqa import colour_copy

        digits8, _ = _digit_images(8)
        for c in range(colour_copies):
            for i in train:
                y, name = int(labels[i]), f"images/colour{c}_{i:04d}.jpg"
                image, colour = colour_copy(_rng(seed, c, f"digit{i}", "colour_copy"), digits8[i], size)
                path = os.path.join(out_dir, name)
                if not os.path.exists(path):
                    atomic_write(path, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="JPEG", quality=95))
                extra = [f"a {colour} handwritten {CLASS_NAMES[y]}", f"the number {y} in {colour}"]
                rows.append({"image": name, "captions": captions(y) + extra, "label": y, "colour": colour})
    _write_lines(os.path.join(out_dir, "train.jsonl"), rows)
    _write_lines(os.path.join(out_dir, "test.jsonl"),
                 ({"image": f"images/digit_{i:04d}.jpg", "label": int(labels[i]), "captions": captions(int(labels[i]))}
                  for i in test))  # fmt: skip
    summary = {"variant": "digits", "size": size, "train": int(len(train)), "test": int(len(test)),
               "classes": list(CLASS_NAMES), "captions_per_image": len(CAPTION_STYLES), "seed": seed,
               "colour_copies": colour_copies, "train_images": len(rows)}  # fmt: skip
    atomic_write_text(os.path.join(out_dir, "classes.json"), json.dumps(summary, indent=1) + "\n")
    return summary


DIRECTIONS = ("left", "right", "up", "down")
# (dx, dy) per direction, in pixels per unit of speed; image rows grow downwards
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}
VIDEO_CAPTION_STYLES = (
    "the digit {name} moving {words}",
    "a handwritten {digit} moving {direction}",
    "{name} moving {direction}",
    "a video of the number {digit} going {direction}",
)
# The digit's side over the frame's, and the background's colour range. make demo's CoSwin (pretrained on full-frame
# digits on white) reads a digit by its size, hardly by the background: on a random frame of these clips, zero-shot
# digit accuracy 21% / 39% / 65% and a linear probe on its frozen features 38% / 61% / 79% at 0.7 / 0.8 / 0.9 of
# the frame, whatever the noise range (215-250, 235-255 or 250-255; 2026-12-01, 359 held-out frames). The larger the
# digit, the shorter its path ((size - d) pixels): at 0.8 a 64-px clip still moves the digit 8-13 pixels (2-3 of the
# stem's 4-px patches); 0.9 would leave 6. Fine-tuned (make demo-video, 600 steps) the inflated model read the digit
# in 83% of held-out clips at 0.7 and 92% at 0.8, the direction in 99.7% and 99.4%.
DIGIT_SCALE = 0.8
# probability of a clip with two copies of its digit (each then half the frame's side, 32 px at 64: make demo's CoSwin
# reads such small digits worst; fine-tuned for make demo-video, 41-61% of two-copy held-out clips against 92-95% of
# one-copy clips, so at 0.1 they alone cost 4 points of the headline figure)
TWO_COPIES = 0.05
BACKGROUND = (215, 250)


def moving_digit_classes() -> list[str]:
    """The 40 class names, index digit * 4 + direction index ("zero moving left", "zero moving right", ...)."""
    return [f"{name} moving {d}" for name in CLASS_NAMES for d in DIRECTIONS]


def _video_captions(digit: int, direction: str) -> list[str]:
    return [s.format(name=CLASS_NAMES[digit], digit=digit, direction=direction, words=_DIRECTION_WORDS[direction])
            for s in VIDEO_CAPTION_STYLES]  # fmt: skip


def moving_digit_clip(digit_image: np.ndarray, size: int, frames: int, seed: int, clip: int):
    """(frames uint8 (T, size, size, 3), facts) of clip number ``clip``: the clip's own generator
    (seed, "moving_digits", clip) draws everything, so a clip does not depend on which others are built.

    The background: smooth colour noise (a 5x5 grid of light colours in the BACKGROUND range, upscaled bicubic). The
    digit: the (already upscaled, DIGIT_SCALE of the frame) digit image, its ink darkness as alpha over a dark ink
    colour (0-70). One copy, or with probability TWO_COPIES two (each shrunk to half the frame where two would not
    fit), side by side across the motion (a gap between them, never overlapping), moving together. Speed: uniform in
    [0.6, 1] of the fastest whose path stays in the frame, (size - d) / (frames - 1) pixels per frame; positions
    rounded to whole pixels. The path's midpoint is uniform over the positions that keep the digits inside the frame
    for every frame, the same range for every direction, and the frame at time t of a clip moving one way equals the
    frame at time T - 1 - t of the same clip moving the other way: the set of frames of a clip (a single frame at a
    random time, a frame-shuffled clip) carries no information about the direction.
    """
    from PIL import Image

    from florence.data.loader import _rng

    rng = _rng(seed, 0, f"clip{clip}", "moving_digits")
    d = digit_image.shape[0]
    direction = DIRECTIONS[int(rng.integers(4))]
    copies = 2 if rng.uniform() < TWO_COPIES else 1
    if copies == 2 and 2 * d > size:  # two copies side by side: each shrunk to fit across the frame
        d = size // 2
        digit_image = np.asarray(Image.fromarray(digit_image).resize((d, d), Image.BICUBIC))
    speed = rng.uniform(0.6, 1.0) * (size - d) / max(frames - 1, 1)  # the fastest path that fits: 1
    grid = rng.uniform(*BACKGROUND, (5, 5, 3)).astype(np.uint8)
    background = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    ink = rng.uniform(0, 70, 3).astype(np.float32)
    gap = int(rng.integers(0, size - 2 * d + 1)) if copies == 2 else 0
    across = copies * d + gap  # the extent across the motion
    travel = speed * (frames - 1)
    mid = rng.uniform(travel / 2, size - d - travel / 2)  # along the motion: symmetric for every direction
    side = int(rng.integers(0, size - across + 1))  # across the motion
    dx, dy = _STEP[direction]
    alpha = (255 - digit_image.astype(np.float32))[:, :, None] / 255
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    starts = []
    for t in range(frames):
        along = int(np.floor(mid + (t - (frames - 1) / 2) * speed * (dx + dy) + 0.5))
        x0, y0 = (along, side) if dx else (side, along)
        starts.append((x0, y0))
        frame = background.copy()
        for c in range(copies):
            x, y = (x0, y0 + c * (d + gap)) if dx else (x0 + c * (d + gap), y0)
            region = frame[y : y + d, x : x + d]
            frame[y : y + d, x : x + d] = region * (1 - alpha) + ink * alpha
        out[t] = np.floor(frame + 0.5).clip(0, 255).astype(np.uint8)
    facts = {"direction": direction, "copies": copies, "speed": round(float(speed), 4), "start": list(starts[0]),
             "end": list(starts[-1])}  # fmt: skip
    return out, facts


def _build_clip(job) -> dict:
    """One clip: rendered, encoded and written (unless the file exists); its facts."""
    path, digit_image, size, frames, fps, seed, clip = job
    video, facts = moving_digit_clip(digit_image, size, frames, seed, clip)
    if not os.path.exists(path):
        from florence.data.video import write_video

        write_video(path, video, fps=fps, codec="libvpx-vp9")
    return facts


def build_moving_digits(out_dir: str, size: int = 64, test_fraction: float = 0.2, seed: int = 0, *, frames: int = 16,
                        fps: int = 8, clips_per_image: int = 1, limit: int | None = None, workers: int | None = None,
                        quiet: bool = False) -> dict:  # fmt: skip
    """Moving digits: ``clips_per_image`` clips per sklearn digit image (``moving_digit_clip``: one digit, sometimes
    two copies, moving left, right, up or down over a textured background), 40 classes (label = digit * 4 +
    direction index, directions ordered left, right, up, down), split by digit image (``_split``: held-out clips
    show held-out images). ``limit``: at most this many clips per split (the first ones; for tests).

    Writes DIR/videos/clip_XXXXX.webm (VP9, yuv420p, ``fps``; clip number = image index * clips_per_image + copy),
    DIR/train.jsonl and DIR/test.jsonl ({"video", "captions", "label", "digit", "direction", "digit_image",
    "copies", "speed", "start", "end"}; start and end: the top-left pixel of the first digit copy in the first and
    last frame), DIR/classes.json (the 40 class names and a summary). Four caption styles, each shared by all clips
    of a class. Deterministic for a seed; files already there are kept when classes.json records the same size,
    frames, fps, seed, encoder options and rendering constants (DIGIT_SCALE, BACKGROUND, TWO_COPIES); else every
    clip is written again.

    Why VP9 in WebM: DALI 2.4's CPU video decoder (``fn.decoders.video``, device "cpu") decodes VP9 (and VP8, MJPEG)
    but refuses H.264, MPEG-4 Part 2 and AV1 (measured here; "Codec 27 (h264) is not supported by the CPU variant
    of this operator"), and PyAV's wheel encodes libvpx-vp9 (and libx264), so one file serves both loader backends.

    Measured on 2 CPU cores: the default dataset (1,797 clips of 16 frames at 64 x 64, 1,438 train + 359 test,
    4.2 MB of video) builds in 30 s with 2 worker processes (58 s while other jobs kept the machine at a load
    average of 4.7); per clip, rendering takes 1.3 ms, VP9 encoding 7-9 ms and the atomic write's fsync 5 ms. A
    second run with the same arguments keeps the files and takes 4 s (plus 3 s of imports).
    """
    from florence.data.video import ENCODER_OPTIONS

    for name, value, low in (("size", size, 16), ("frames", frames, 2), ("fps", fps, 1),
                             ("clips_per_image", clips_per_image, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if size % 2:
        raise ValueError(f"size: expected an even number of pixels (yuv420p), got {size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or a positive int, got {limit!r}")
    d = max(8, int(round(DIGIT_SCALE * size)))
    if (size - d) / (frames - 1) < 0.5:
        raise ValueError(f"frames: {frames} frames do not fit a {d}-pixel digit crossing a {size}-pixel frame at "
                         f">= 0.5 pixel per frame; use fewer frames or a larger size")  # fmt: skip
    images, labels = _digit_images(d)
    train, test = _split(labels, test_fraction, seed)
    video_dir = os.path.join(out_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    stamp = {"size": size, "frames": frames, "fps": fps, "seed": seed, "encoder": ENCODER_OPTIONS["libvpx-vp9"],
             "digit_scale": DIGIT_SCALE, "background": list(BACKGROUND), "two_copies": TWO_COPIES}  # fmt: skip
    try:
        with open(os.path.join(out_dir, "classes.json"), encoding="utf-8") as f:
            previous = json.load(f)
        reuse = {k: previous.get(k) for k in stamp} == stamp
    except (OSError, ValueError):
        reuse = False
    splits = {}
    jobs = []
    for split, indices in (("train", train), ("test", test)):
        clips = [(int(i), int(i) * clips_per_image + c) for i in indices for c in range(clips_per_image)]
        splits[split] = clips[:limit] if limit else clips
        for i, n in splits[split]:
            path = os.path.join(video_dir, f"clip_{n:05d}.webm")
            if not reuse and os.path.exists(path):
                os.unlink(path)
            jobs.append((path, images[i], size, frames, fps, seed, n))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            facts = list(_progress_bar(pool.imap(_build_clip, jobs, chunksize=8), len(jobs), quiet))
    else:
        facts = list(_progress_bar(map(_build_clip, jobs), len(jobs), quiet))
    facts_of = {job[-1]: f for job, f in zip(jobs, facts, strict=True)}
    for split, clips in splits.items():
        rows = []
        for i, n in clips:
            digit, f = int(labels[i]), facts_of[n]
            rows.append({"video": f"videos/clip_{n:05d}.webm", "captions": _video_captions(digit, f["direction"]),
                         "label": digit * 4 + DIRECTIONS.index(f["direction"]), "digit": digit,
                         "direction": f["direction"], "digit_image": i,
                         **{k: f[k] for k in ("copies", "speed", "start", "end")}})  # fmt: skip
        _write_lines(os.path.join(out_dir, f"{split}.jsonl"), rows)
    summary = {"variant": "moving_digits", **stamp, "train": len(splits["train"]), "test": len(splits["test"]),
               "classes": moving_digit_classes(), "directions": list(DIRECTIONS),
               "captions_per_clip": len(VIDEO_CAPTION_STYLES), "clips_per_image": clips_per_image, "digit_size": d,
               "codec": "vp9", "container": "webm"}  # fmt: skip
    atomic_write_text(os.path.join(out_dir, "classes.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def _progress_bar(it, total, quiet):
    if quiet:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="moving digits", unit="clip", file=sys.stderr)


def build_digit_canvases(out_dir: str, size: int = 128, test_fraction: float = 0.2, seed: int = 0, **kwargs) -> dict:
    """The detection variant: ``florence.data.detection.build_digit_canvases`` (imported here when used)."""
    from florence.data.detection import build_digit_canvases as build

    return build(out_dir, size, test_fraction, seed, **kwargs)


def build_digit_questions(out_dir: str, size: int = 128, test_fraction: float = 0.2, seed: int = 0, **kwargs) -> dict:
    """The visual-question-answering variant: ``florence.data.vqa.build_digit_questions`` (imported here when used)."""
    from florence.data.vqa import build_digit_questions as build

    return build(out_dir, size, test_fraction, seed, **kwargs)


VARIANTS = {"digits": build_digits, "moving_digits": build_moving_digits, "digit_canvases": build_digit_canvases,
            "digit_questions": build_digit_questions}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variant", default="digits", choices=sorted(VARIANTS))
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the variant's; 64, 128 for the canvas variants)")  # fmt: skip
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16; moving_digits only)")
    p.add_argument("--colour-copies", type=int, default=0,
                   help="coloured copies of every training digit (default 0; digits only)")  # fmt: skip
    args = p.parse_args(argv)
    if args.colour_copies and args.variant != "digits":
        p.error(f"--colour-copies: only for --variant digits, got --variant {args.variant}")
    extra = {"frames": args.frames} if args.variant == "moving_digits" else {}
    if args.variant == "digits":
        extra["colour_copies"] = args.colour_copies
    if args.size is not None:
        extra["size"] = args.size
    summary = VARIANTS[args.variant](args.out, test_fraction=args.test_fraction, seed=args.seed, **extra)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
