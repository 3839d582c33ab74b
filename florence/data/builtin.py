"""The built-in dataset: scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package; nothing is
downloaded) as image-text pairs, in the curation command's input format.

    python -m florence.data.builtin --out DIR [--size 64] [--test-fraction 0.2] [--seed 0]

writes DIR/images/*.jpg (each digit upscaled to --size, bicubic, saved as JPEG), DIR/train.jsonl (one line per
training image: {"image": "images/....jpg", "captions": [...], "label": digit}) for ``florence.data.curate``,
DIR/test.jsonl (the held-out images with their class index and captions, for zero-shot and retrieval) and
DIR/classes.json (the class names, for zero-shot evaluation). Captions come in several styles per class and every
style is shared by all images of the class, so many pairs share a text (UniCL positives); some are a bare word
("seven"), which curation augments with prompts.

Variants are registered in VARIANTS by name; each builder takes (out_dir, size, test_fraction, seed) and returns a
summary dict. Detection (digits placed on canvases with COCO boxes), video (moving digits) and question-answer
variants for the adapters are meant to be added there, reusing ``_digit_images`` and ``_split``.
"""

from __future__ import annotations

import argparse
import json
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


def build_digits(out_dir: str, size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> dict:
    from PIL import Image

    from florence.data.curate import to_rgb8

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int >= 8 (pixels), got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
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

    _write_lines(os.path.join(out_dir, "train.jsonl"),
                 ({"image": f"images/digit_{i:04d}.jpg", "captions": captions(int(labels[i])), "label": int(labels[i])}
                  for i in train))  # fmt: skip
    _write_lines(os.path.join(out_dir, "test.jsonl"),
                 ({"image": f"images/digit_{i:04d}.jpg", "label": int(labels[i]), "captions": captions(int(labels[i]))}
                  for i in test))  # fmt: skip
    summary = {"variant": "digits", "size": size, "train": int(len(train)), "test": int(len(test)),
               "classes": list(CLASS_NAMES), "captions_per_image": len(CAPTION_STYLES), "seed": seed}  # fmt: skip
    atomic_write_text(os.path.join(out_dir, "classes.json"), json.dumps(summary, indent=1) + "\n")
    return summary


VARIANTS = {"digits": build_digits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variant", default="digits", choices=sorted(VARIANTS))
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = VARIANTS[args.variant](args.out, args.size, args.test_fraction, args.seed)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
