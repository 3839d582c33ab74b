"""FLD-style curation of image-text pairs with UniCL labels (../shared/SPEC.md section 1), on one machine (the
local engine, the default) or on Ray Data (``--engine ray``: ``florence.data.curate_ray``, the same bytes).

    python -m florence.data.curate --input FILE.jsonl [FILE.csv FILE.parquet FOLDER ...] --out DIR [--min-size 32]
        [--near-dup-threshold 4] [--shard-size 1000] [--short-words 3] [--max-tokens 75] [--workers N] [--seed 0]
        [--engine local|ray] [--ray-address ADDR] [--num-workers N] [--unit-rows 10000]

Inputs (several may be given; relative image paths resolve against the file's folder):
- JSONL: one object per line, {"image": path, "caption": text} or {"image": path, "captions": [texts]};
- CSV with a header: an ``image`` column, a ``caption`` column, and optional further caption columns
  (any column whose name starts with ``caption``);
- a folder: every image file with a same-named ``.txt`` beside it (one caption per line);
- Parquet (``.parquet``, ``.pq``; crawl metadata as img2dataset and LAION write it; needs pyarrow): an ``image``
  column of strings (paths; null or empty: a bad record) and caption columns as in CSV, each a string or a list of
  strings (nulls skipped). Lines are numbered in ``source`` from 1 for Parquet rows, JSONL lines end at "\n" only.
An input that cannot be read at all (a missing path, a file that is not Parquet, a Parquet file without an
``image`` column of strings, a CSV field over the csv module's size limit) stops the run before any work with
``InputError`` naming the file and the column or line (exit 2).

Steps, in order, each counted (``removed`` counts input records, so inputs = images + sum(removed)):
1. bad_record: a line or row that cannot be read (invalid JSON, no image field);
2. empty_caption: no caption left after normalisation (NFKC, whitespace collapsed, trimmed; empty captions of
   images that keep another caption are dropped and counted in ``empty_captions_dropped``);
3. corrupt: missing, unreadable, truncated or unsupported image files (format or PIL mode; the reasons are tallied
   in ``corrupt_reasons``);
4. too_small: shorter side below --min-size pixels;
5. duplicate: byte-identical to an earlier kept image (SHA-256);
6. near_duplicate: perceptual hash (64-bit dHash) within --near-dup-threshold bits of an earlier kept image
   (pigeonhole banding: exact matches on one of threshold + 1 bands, then the Hamming distance).
Images are analysed as they will be stored: upright (EXIF orientation applied) and in 8-bit RGB (``to_rgb8``, whose
docstring gives the rule for every PIL mode: 16-bit scaled by 1/257, transparency composited on white...); the
size filter and the dHash see that image.
Captions longer than --max-tokens CLIP BPE tokens are cut to fit (``truncated_captions``): after the last word that
fits, or, when not even the first word fits (a URL), after the longest prefix of characters that fits; a prompt
around a short caption is counted too (the caption inside it is cut further if need be, keeping the label of the
bare caption; a prompt that cannot fit at all leaves the caption bare). Every stored caption fits.
UniCL labels: one label per unique normalised text (casefolded for the hash table only), numbered in order of
first appearance; captions of at most --short-words words (a word or a phrase) are augmented with a prompt
template (deterministic per sample), keep the label of their bare text, and are flagged ``augmented``
(Florence's stage 1 uses them, stage 2 does not).

Output DIR: webdataset shards ``shard-00000.tar`` ... (per sample ``<key>.jpg``, the image as JPEG: upright RGB or
greyscale JPEG inputs byte for byte, everything else (other formats, JPEGs with an EXIF orientation 2-8, CMYK
JPEGs) re-encoded upright as 8-bit RGB at quality 95 without EXIF, so every reader sees the same upright pixels;
and ``<key>.json``: key, captions, labels, augmented flags, source), DALI index files ``shard-00000.idx`` (when
DALI is installed), ``manifest.json`` (shards with sample and pair counts and SHA-256), ``labels.json`` (label ->
text), ``stats.json`` and ``summary.txt`` (the paper-style report), ``caption_lengths.png`` and
``positives_per_label.png``.

Robust and resumable: bad lines and rows are counted, never fatal; every file is written under a temporary name
and renamed; image analysis results are cached (DIR/.work/analysis.jsonl, one line per record, flushed) and shards
are written whole (a shard on disk is kept only when its members and every sample's JSON are the ones due), so a
killed run started again with the same arguments redoes only the missing work and produces the same bytes.
Decoding and hashing use every core (--workers, default all); a progress bar shows each phase.

The outputs do not depend on the locale: text files are read and written as UTF-8; file names are written (in
``source`` and the manifest's arguments) as their bytes decoded as UTF-8, bytes that are not UTF-8 as ``\\xNN``
(``path_text``); paths inside JSONL / CSV files are UTF-8 (``native_path``); folders are listed in byte order.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
import unicodedata
from collections import Counter

from florence_kernels._io import atomic_write, atomic_write_bytes, atomic_write_text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
PROMPTS = (
    "a photo of {}.", "a picture of {}.", "an image of {}.", "a photo showing {}.", "a close-up of {}.",
    "{}, in a photo.", "a snapshot of {}.", "an example of {}.",
)  # fmt: skip
REMOVED_KEYS = ("bad_record", "empty_caption", "corrupt", "too_small", "duplicate", "near_duplicate")


# --- reading inputs -------------------------------------------------------------------------------------------------


class InputError(ValueError):
    """An input that cannot be read at all (a missing path, an unreadable Parquet file, a Parquet file without an
    ``image`` column): the message names the file and, where it applies, the column. Bad lines and rows inside a
    readable file are counted instead (``bad_record``)."""


class ClusterError(RuntimeError):
    """--ray-address names a Ray cluster this process cannot join (the message says why and what to set)."""


PARQUET_EXTS = (".parquet", ".pq")


def plan_inputs(paths: list[str], unit_rows: int | None = None) -> list[dict]:
    """The read units of the inputs, in input order: each is a JSON-able dict that ``read_unit`` turns into its
    records. ``unit_rows=None`` (the local engine): one unit per input. Otherwise units of about ``unit_rows``
    records, so that parallel tasks each read and analyse a bounded part: JSONL by byte ranges of ``unit_rows``
    lines (one streaming pass over the file counts them), folders by slices of their sorted listing, Parquet by row
    groups (from the footer; a row group is the unit however many rows it has: img2dataset and LAION write tens of
    thousands), CSV whole (a quoted field may span lines, so a CSV file cannot be split by lines).

    Raises InputError for a path that is neither a file nor a folder, and for an unreadable Parquet file or one
    without an ``image`` column of strings."""
    units = []
    for path in paths:
        if os.path.isdir(path):
            n = len(_folder_images(path))
            step = unit_rows or max(n, 1)
            units += [{"kind": "folder", "path": path, "start": s, "stop": min(s + step, n)} for s in range(0, n, step)]
        elif path.lower().endswith(PARQUET_EXTS) and os.path.isfile(path):
            units += _plan_parquet(path, unit_rows)
        elif path.lower().endswith(".csv") and os.path.isfile(path):
            units.append({"kind": "csv", "path": path})
        elif os.path.isfile(path):
            units += _plan_jsonl(path, unit_rows)
        else:
            raise InputError(f"--input: {path} is neither a file nor a folder")
    return units


def read_unit(unit: dict) -> list[dict]:
    """The records of one read unit (``plan_inputs``): {"image": absolute path, "captions": [raw texts], "source":
    "file:line"} or {"bad": reason, "source": ...}."""
    kind = unit["kind"]
    if kind == "jsonl":
        return _read_jsonl(unit["path"], unit["start"], unit["stop"], unit["first"])
    if kind == "csv":
        return _read_csv(unit["path"])
    if kind == "folder":
        return _read_folder(unit["path"], unit["start"], unit["stop"])
    return _read_parquet(unit["path"], unit["groups"], unit["first"])


def read_inputs(paths: list[str]) -> list[dict]:
    """Every record of the inputs, in order (the local engine's reading: ``read_unit`` over ``plan_inputs``)."""
    return [r for u in plan_inputs(paths) for r in read_unit(u)]


def path_text(path: str) -> str:
    """A file name or path as it is written into outputs (``source``, the manifest's arguments): its bytes
    (``os.fsencode``) decoded as UTF-8, bytes that are not UTF-8 as ``\\xNN`` (``backslashreplace``). The text does
    not depend on the locale: under LC_ALL=C Python decodes file names as ASCII with lone surrogates."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def native_path(text: str) -> str:
    """A path written in a UTF-8 text file (JSONL, CSV) as the ``str`` that opens that file under any locale (the
    file system's name is the path's UTF-8 bytes)."""
    return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def _resolve(base: str, image) -> str | None:
    if not isinstance(image, str) or not image:
        return None
    try:
        image = native_path(image)
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON: names no file
        return None
    return image if os.path.isabs(image) else os.path.normpath(os.path.join(base, image))


def _plan_jsonl(path: str, unit_rows: int | None) -> list[dict]:
    """JSONL units: byte ranges of ``unit_rows`` lines (lines end at b"\\n"; blank lines count) and their first
    line numbers."""
    if unit_rows is None:
        return [{"kind": "jsonl", "path": path, "start": 0, "stop": None, "first": 1}]
    units, start, first, n, pos = [], 0, 1, 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if n == unit_rows:
                units.append({"kind": "jsonl", "path": path, "start": start, "stop": pos, "first": first})
                start, first, n = pos, first + n, 0
            n += 1
            pos += len(raw)
    units.append({"kind": "jsonl", "path": path, "start": start, "stop": None, "first": first})
    return units


def _read_jsonl(path, start=0, stop=None, first=1):
    """Lines from byte ``start`` up to byte ``stop`` (None: the end), numbered from ``first``; each line's bytes
    decoded as UTF-8 (invalid bytes replaced)."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for n, raw in enumerate(f, first):
            if stop is not None and pos >= stop:
                break
            pos += len(raw)
            line = raw.decode("utf-8", "replace")
            if not line.strip():
                continue
            src = f"{path_text(os.path.basename(path))}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                out.append({"bad": f"invalid JSON ({e.msg})", "source": src})
                continue
            except RecursionError:  # a line of thousands of nested brackets
                out.append({"bad": "invalid JSON (nested too deeply)", "source": src})
                continue
            image = _resolve(base, obj.get("image")) if isinstance(obj, dict) else None
            if image is None:
                out.append({"bad": "no image path", "source": src})
                continue
            caps = obj.get("captions", [obj.get("caption")] if "caption" in obj else [])
            caps = [c for c in (caps if isinstance(caps, list) else [caps]) if isinstance(c, str)]
            out.append({"image": image, "captions": caps, "source": src})
    return out


def _read_csv(path):
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        try:
            cols = [c for c in (reader.fieldnames or []) if c and c.lower().startswith("caption")]
            for n, row in enumerate(reader, 2):
                src = f"{path_text(os.path.basename(path))}:{n}"
                image = _resolve(base, row.get("image"))
                if image is None:
                    out.append({"bad": "no image path", "source": src})
                    continue
                out.append({"image": image, "captions": [row[c] for c in cols if row.get(c)], "source": src})
        except csv.Error as e:  # e.g. a field over csv's size limit: the rest of the file cannot be parsed
            raise InputError(f"--input {path_text(path)}: CSV line {reader.line_num + 1}: {e}") from e
    return out


def _folder_images(path) -> list[str]:
    return [n for n in sorted(os.listdir(path), key=os.fsencode) if n.lower().endswith(IMAGE_EXTS)]  # byte order


def _read_folder(path, start=0, stop=None):
    out = []
    for name in _folder_images(path)[start:stop]:
        txt = os.path.join(path, os.path.splitext(name)[0] + ".txt")
        caps = []
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8", errors="replace") as f:
                caps = [line for line in f.read().splitlines() if line.strip()]
        out.append({"image": os.path.join(os.path.abspath(path), name), "captions": caps, "source": path_text(name)})
    return out


def _parquet_file(path):
    from florence.optional import require

    pq = require("pyarrow", f"--input {path_text(path)} (Parquet input)")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise InputError(f"--input {path_text(path)}: not a readable Parquet file ({type(e).__name__}: {e})") from e


def _parquet_caption_columns(path, schema) -> list[str]:
    """The caption columns of a Parquet schema (names starting with "caption", as in CSV: ``caption``,
    ``captions``, ``caption_2``...); InputError when there is no ``image`` column of strings."""
    import pyarrow as pa

    names = schema.names
    if "image" not in names:
        raise InputError(f"--input {path_text(path)}: no 'image' column (columns: {', '.join(names) or 'none'}); "
                         "expected 'image' (image paths, relative to the file's folder) and caption columns "
                         "('caption', 'captions' (a list), 'caption_*')")  # fmt: skip
    kind = schema.field("image").type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas' categoricals are dictionaries
    if not (pa.types.is_string(value) or pa.types.is_large_string(value)):
        raise InputError(f"--input {path_text(path)}: column 'image' has type {kind}; expected strings (image paths)")
    return [c for c in names if c.lower().startswith("caption")]


def _parquet_row_groups(path) -> list[int]:
    """The row counts of a Parquet file's row groups (its footer only), after checking its columns."""
    pf = _parquet_file(path)
    _parquet_caption_columns(path, pf.schema_arrow)
    return [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]


def _plan_parquet(path: str, unit_rows: int | None) -> list[dict]:
    rows = _parquet_row_groups(path)
    if unit_rows is None:
        return [{"kind": "parquet", "path": path, "groups": list(range(len(rows))), "first": 1}]
    starts = [0, *itertools.accumulate(rows)]
    return [{"kind": "parquet", "path": path, "groups": [g], "first": 1 + starts[g]} for g in range(len(rows))]


def _read_parquet(path, groups, first):
    """Rows of the given row groups, numbered from ``first`` (the file's first row is 1): ``image`` a path (null or
    empty: a bad record), each caption column a string or a list of strings (nulls skipped)."""
    pf = _parquet_file(path)
    cols = _parquet_caption_columns(path, pf.schema_arrow)
    base = os.path.dirname(os.path.abspath(path))
    name = path_text(os.path.basename(path))
    try:
        table = pf.read_row_groups(groups, columns=["image", *cols]) if groups else None
    except Exception as e:  # a corrupt page behind a valid footer
        raise InputError(f"--input {path_text(path)}: row groups {groups} unreadable ({type(e).__name__}: {e})") from e
    out = []
    if table is None:
        return out
    data = {c: table.column(c).to_pylist() for c in ["image", *cols]}
    for n in range(table.num_rows):
        src = f"{name}:{first + n}"
        image = _resolve(base, data["image"][n])
        if image is None:
            out.append({"bad": "no image path", "source": src})
            continue
        caps = []
        for c in cols:
            v = data[c][n]
            caps += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]  # "" counted as empty
        out.append({"image": image, "captions": caps, "source": src})
    return out


# --- captions -------------------------------------------------------------------------------------------------------


def normalise_caption(text: str) -> str:
    """Unicode NFKC, control characters to spaces, whitespace collapsed, trimmed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def label_key(text: str) -> str:
    """The hash-table key of a normalised text: casefolded, trailing punctuation dropped."""
    return text.casefold().rstrip(" .!?")


def _longest(n: int, fits) -> int:
    """k in 0..n with fits(k) true (or k = 0) and fits(k + 1) false (or k = n), by binary search: the largest k that
    fits when ``fits`` is monotone, a k that fits in any case (a BPE count of a prefix is not always monotone)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_tokens(text: str, max_tokens: int, count, wrap=None) -> tuple[str, bool]:
    """``text`` cut to at most ``max_tokens`` BPE tokens (counted on ``wrap(cut)`` when given: a prompt around it);
    (cut, was it cut).

    Cut after the last word that fits; when not even the first word fits (a long URL, a long compound), after the
    longest prefix of characters that fits (binary search over prefix lengths: the original characters are kept,
    a word may be cut inside). Every prefix the search keeps has been counted, so the cut always fits; it is ""
    when nothing does (only ever with ``wrap``).
    """

    def fits(t):
        return count(wrap(t) if wrap else t) <= max_tokens

    if fits(text):
        return text, False
    words = text.split(" ")
    k = _longest(len(words), lambda k: fits(" ".join(words[:k])))
    if k:
        return " ".join(words[:k]), True
    return text[: _longest(len(text) - 1, lambda k: fits(text[:k]))], True


# --- images: one conversion to 8-bit RGB, upright -------------------------------------------------------------------

ORIENTATION = 0x0112  # the EXIF orientation tag
_RGB8_CONVERT = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")  # PIL's own conversion is the right one
_RGB8_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")  # composited on white


def rgb8_supported(mode: str) -> bool:
    """Whether ``to_rgb8`` converts images of this PIL mode."""
    return mode in _RGB8_CONVERT or mode in _RGB8_ALPHA or mode in ("I", "F") or mode.startswith("I;16")


def to_rgb8(img):
    """The 8-bit RGB PIL image that every reader of an image uses (curation's re-encoding and dHash, the PyTorch
    loader, evaluation), whatever the PIL mode; an RGB image without a transparent colour is returned as it is.

    - 1, L, P, RGBX, CMYK, YCbCr: PIL's conversion (grey replicated; palette looked up; CMYK as
      R = (255 - C)(255 - K) / 255 rounded, no ICC profile).
    - Transparency (LA, La, PA, RGBA, RGBa; 1, L, P, RGB with a transparent colour or palette alpha): composited on
      white, each channel round((c a + 255 (255 - a)) / 255).
    - I;16, I;16B, I;16L (16-bit grey): round(v / 257), i.e. 0..65535 scaled to 0..255 with 257 k -> k exactly
      (PIL's own ``convert`` clips at 255, which made 16-bit images white; torchvision's ``to_dtype`` shifts,
      v >> 8, which differs from this by at most 1). A transparent grey value becomes white.
    - I (32-bit integers): clipped to 0..65535; read as 8-bit values when the image's maximum is at most 255, else
      as 16-bit like I;16 (PIL clips at 255; torchvision has no rule for int32).
    - F (32-bit floats): NaN as 0; read as 0..1 (times 255, rounded; torchvision's rule for floats) when every
      value lies in [0, 1], else rounded to integers and read as I.
    Other modes (LAB, HSV) raise ValueError naming the mode.
    """
    import numpy as np
    from PIL import Image

    mode, trns = img.mode, img.info.get("transparency")
    if mode == "RGB" and trns is None:
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        raw = np.asarray(img)
        if mode == "F":
            v = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
            if v.size and v.min() >= 0.0 and v.max() <= 1.0:
                grey = np.floor(v * 255 + 0.5)
            else:
                v = np.clip(np.floor(v + 0.5), 0, 65535)
                grey = v if v.size == 0 or v.max() <= 255 else (v + 128) // 257
        elif mode == "I":
            v = np.clip(raw.astype(np.int64), 0, 65535)
            grey = v if v.size == 0 or v.max() <= 255 else (v + 128) // 257
        else:
            grey = (raw.astype(np.int64) + 128) // 257
        grey = grey.astype(np.uint8)
        if isinstance(trns, int):  # a transparent grey value (PNG tRNS): white once composited
            grey[raw == trns] = 255
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in _RGB8_ALPHA or (trns is not None and mode in _RGB8_CONVERT):
        rgba = np.asarray((img.convert("LA") if mode == "La" else img).convert("RGBA"), dtype=np.uint32)
        a = rgba[:, :, 3:]
        out = (rgba[:, :, :3] * a + 255 * (255 - a) + 127) // 255
        return Image.fromarray(out.astype(np.uint8))
    if mode in _RGB8_CONVERT:
        return img.convert("RGB")
    raise ValueError(f"img: PIL mode {mode!r} is not supported (supported: {', '.join(_RGB8_CONVERT + _RGB8_ALPHA)}, "
                     "I;16, I;16B, I;16L, I, F)")  # fmt: skip


def exif_orientation(img) -> int:
    """The EXIF orientation (1-8) of a PIL image; 1 (upright) when it has none or an invalid one."""
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the pixels are still usable, as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(img):
    """``img`` with its EXIF orientation applied (PIL's ``ImageOps.exif_transpose``, which also drops the tag), or
    ``img`` itself when it is already upright."""
    if exif_orientation(img) == 1:
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


# --- image analysis (worker processes) ------------------------------------------------------------------------------


def dhash(img) -> int:
    """64-bit difference hash of the image as stored (``to_rgb8``): grey 9x8 thumbnail, one bit per horizontally
    adjacent pair."""
    from PIL import Image

    g = to_rgb8(img).convert("L").resize((9, 8), Image.BILINEAR)
    px = g.tobytes()  # 72 grey levels, row by row
    bits = 0
    for r in range(8):
        for c in range(8):
            bits = (bits << 1) | int(px[r * 9 + c] > px[r * 9 + c + 1])
    return bits


def analyse(path: str) -> dict:
    """Decode check, upright size, SHA-256 and dHash (of the upright image) of one image file; never raises."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        return {"ok": False, "reason": f"unreadable file ({type(e).__name__})"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            if fmt not in SUPPORTED_FORMATS:
                return {"ok": False, "reason": f"unsupported format {fmt}"}
            if not rgb8_supported(mode):
                return {"ok": False, "reason": f"unsupported mode {mode}"}
            img.load()
            orientation = exif_orientation(img)
            img = upright(img)
            w, h = img.size
            ph = dhash(img)
    except Exception as e:  # PIL raises many types for broken files
        msg = str(e).lower()
        reason = "truncated" if "truncat" in msg else f"undecodable ({type(e).__name__})"
        return {"ok": False, "reason": reason}
    return {"ok": True, "w": w, "h": h, "sha": hashlib.sha256(data).hexdigest(), "phash": ph, "format": fmt,
            "mode": mode, "orientation": orientation}  # fmt: skip


def stored_as_is(a: dict) -> bool:
    """Whether an analysed image is stored byte for byte: an upright RGB or greyscale JPEG. Everything else (other
    formats, JPEGs with an EXIF orientation 2-8, CMYK JPEGs) is re-encoded upright as 8-bit RGB, so that every
    reader of the shards (DALI, PIL, other tools) sees the same upright pixels."""
    return a["format"] == "JPEG" and a["orientation"] == 1 and a["mode"] in ("RGB", "L")


class NearDuplicateIndex:
    """Hamming-ball lookup of 64-bit hashes by banding: within ``t`` bits implies equality on one of t + 1 bands."""

    def __init__(self, threshold: int):
        self.t = threshold
        n = threshold + 1
        widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
        self.bands, start = [], 0
        for w in widths:
            self.bands.append((start, (1 << w) - 1))
            start += w
        self.tables = [dict() for _ in self.bands]

    def _keys(self, h):
        return [(h >> s) & m for s, m in self.bands]

    def find(self, h: int) -> int | None:
        """Index of a stored hash within the threshold, or None."""
        for table, key in zip(self.tables, self._keys(h), strict=True):
            for idx, other in table.get(key, ()):
                if bin(h ^ other).count("1") <= self.t:
                    return idx
        return None

    def add(self, h: int, idx: int) -> None:
        for table, key in zip(self.tables, self._keys(h), strict=True):
            table.setdefault(key, []).append((idx, h))


# --- the pipeline ---------------------------------------------------------------------------------------------------


def _progress(it, total, desc, quiet, unit="img"):
    if quiet:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, file=sys.stderr)


def _atomic_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


ANALYSIS_VERSION = 2  # cached rows of another version (fields added or changed) are analysed again


def analyse_all(records, work_dir, workers, quiet) -> list[dict | None]:
    """Analysis of every record's image, reusing and extending the cache (one flushed JSON line per record)."""
    os.makedirs(work_dir, exist_ok=True)
    cache_path = os.path.join(work_dir, "analysis.jsonl")
    results: list[dict | None] = [None] * len(records)
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: analysed again
                    continue
                i = row.get("i")
                if (isinstance(i, int) and 0 <= i < len(records) and row.get("v") == ANALYSIS_VERSION
                        and row.get("image") == records[i].get("image")):  # fmt: skip
                    results[i] = row["result"]
    todo = [i for i, r in enumerate(records) if "image" in r and results[i] is None]
    if todo:
        with open(cache_path, "a", encoding="utf-8") as cache, mp.Pool(workers) as pool:
            paths = [records[i]["image"] for i in todo]
            for i, res in _progress(zip(todo, pool.imap(analyse, paths, chunksize=16), strict=True), len(todo),
                                    "decode+hash", quiet):  # fmt: skip
                results[i] = res
                row = {"v": ANALYSIS_VERSION, "i": i, "image": records[i]["image"], "result": res}
                cache.write(json.dumps(row) + "\n")
                cache.flush()
    return results


def prepare_captions(rec: dict) -> tuple[list[str], int]:
    """(the record's captions normalised, empty ones dropped, repeats dropped in order; how many were empty)."""
    caps = [normalise_caption(c) for c in rec.get("captions", ())]
    return list(dict.fromkeys(c for c in caps if c)), sum(1 for c in caps if not c)


def precheck(bad: str | None, kept_caps: list[str], a: dict | None, min_size: int) -> tuple[str, str | None]:
    """The filters that look at one record alone, in order (steps 1-4 of the module docstring): ("bad_record",
    reason), ("empty_caption", None), ("corrupt", reason), ("too_small", None), or ("candidate", None) for a record
    that goes on to deduplication."""
    if bad is not None:
        return "bad_record", bad
    if not kept_caps:
        return "empty_caption", None
    if a is None or not a["ok"]:
        return "corrupt", a["reason"] if a else "not analysed"
    if min(a["w"], a["h"]) < min_size:
        return "too_small", None
    return "candidate", None


class Deduplicator:
    """Steps 5 and 6 over candidates taken in input order: ``check(sha, phash)`` is "duplicate" when an image kept
    before has the same SHA-256, "near_duplicate" when one is within ``threshold`` dHash bits (-1: off), else None
    and the image is kept (only kept images are compared with). Both engines resolve duplicates with it: the local
    one over all candidates, the Ray one over each connected component of the candidates' near pairs in input order
    (a candidate's verdict depends only on kept images within the threshold, all in its component, so the two give
    the same verdicts)."""

    def __init__(self, threshold: int):
        self.seen: set[str] = set()
        self.near = NearDuplicateIndex(threshold) if threshold >= 0 else None
        self.kept = 0

    def check(self, sha: str, phash: int) -> str | None:
        if sha in self.seen:
            return "duplicate"
        if self.near is not None and self.near.find(phash) is not None:
            return "near_duplicate"
        self.seen.add(sha)
        if self.near is not None:
            self.near.add(phash, self.kept)
        self.kept += 1
        return None


def caption_texts(idx: int, kept_caps: list[str], args, count_tokens) -> list[tuple[str, str, str, bool, bool]]:
    """The stored captions of sample ``idx``: (text, label key, label text, augmented, cut) per kept caption. A
    caption is cut to --max-tokens; one of at most --short-words words goes into a prompt picked by (seed, idx,
    key), cut further if the prompt needs it, and keeps the label of its bare text."""
    out = []
    for c in kept_caps:
        c, cut = fit_tokens(c, args.max_tokens, count_tokens)
        key = label_key(c)
        text, augmented = c, False
        if len(c.split(" ")) <= args.short_words:
            pick = int(hashlib.md5(f"{args.seed}:{idx}:{key}".encode()).hexdigest(), 16) % len(PROMPTS)
            bare = c.rstrip(" .!?")
            # a caption near the limit goes into its prompt cut further, so that the prompt fits too
            inner, inner_cut = fit_tokens(bare, args.max_tokens, count_tokens, wrap=PROMPTS[pick].format)
            if (inner or not bare) and count_tokens(PROMPTS[pick].format(inner)) <= args.max_tokens:
                text, augmented, cut = PROMPTS[pick].format(inner), True, cut or inner_cut
        out.append((text, key, c, augmented, cut))
    return out


def select(records, analysis, args, count_tokens) -> tuple[list[dict], dict]:
    """Filters, deduplication, caption normalisation, labels and augmentation, in input order (deterministic)."""
    removed = Counter({k: 0 for k in REMOVED_KEYS})
    corrupt_reasons, bad_reasons = Counter(), Counter()
    dedup = Deduplicator(args.near_dup_threshold)
    labels: dict[str, int] = {}
    label_text: list[str] = []
    samples = []
    empty_dropped = truncated = 0
    for i, rec in enumerate(records):
        kept_caps, empty = prepare_captions(rec)
        a = analysis[i]
        status, reason = precheck(rec.get("bad"), kept_caps, a, args.min_size)
        if status == "candidate":
            status = dedup.check(a["sha"], a["phash"]) or status
        if status not in ("bad_record", "empty_caption"):
            empty_dropped += empty
        if status == "bad_record":
            bad_reasons[reason] += 1
        elif status == "corrupt":
            corrupt_reasons[reason] += 1
        if status != "candidate":
            removed[status] += 1
            continue
        idx = len(samples)
        texts, labs, aug = [], [], []
        for text, key, c, augmented, cut in caption_texts(idx, kept_caps, args, count_tokens):
            if key not in labels:
                labels[key] = len(label_text)
                label_text.append(c)
            texts.append(text)
            aug.append(augmented)
            labs.append(labels[key])
            truncated += cut
        samples.append({"key": f"{idx:09d}", "image": rec["image"], "as_is": stored_as_is(a), "captions": texts,
                        "labels": labs, "augmented": aug, "source": rec["source"], "sha": a["sha"]})  # fmt: skip
    info = {"removed": dict(removed), "corrupt_reasons": dict(corrupt_reasons), "bad_record_reasons": dict(bad_reasons),
            "empty_captions_dropped": empty_dropped, "truncated_captions": truncated,
            "label_text": label_text}  # fmt: skip
    return samples, info


def _image_jpeg_bytes(sample) -> bytes:
    with open(sample["image"], "rb") as f:
        data = f.read()
    if sample["as_is"]:
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        to_rgb8(upright(img)).save(buf, format="JPEG", quality=95)  # no EXIF written: no orientation left
        return buf.getvalue()


def _tar_member(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(ti, io.BytesIO(data))


def write_shard(job) -> dict:
    """One shard, written under a temporary name and renamed; its DALI index beside it (when DALI is present)."""
    out_dir, shard_idx, samples, delay = job
    path = os.path.join(out_dir, f"shard-{shard_idx:05d}.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
        for s in samples:
            _tar_member(tar, f"{s['key']}.jpg", _image_jpeg_bytes(s))
            _tar_member(tar, f"{s['key']}.json", _sample_meta(s))
    data = buf.getvalue()
    if delay:  # test hook (FLORENCE_CURATE_SHARD_DELAY): widen the window in which a kill lands mid-run
        time.sleep(delay)
    atomic_write_bytes(path, data)
    write_dali_index(path)
    return {"path": os.path.basename(path), "samples": len(samples), "pairs": sum(len(s["captions"]) for s in samples),
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip


def write_dali_index(tar_path: str) -> bool:
    """``<shard>.idx`` in the format of DALI's wds2idx (version line, then one line per sample: each component's
    extension, offset and size), written atomically; False when DALI is not installed (its reader then indexes the
    tar itself when it opens it)."""
    import importlib.util

    if importlib.util.find_spec("nvidia.dali") is None:
        return False
    lines, current, comps = [], None, []
    with tarfile.open(tar_path, encoding="utf-8") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = m.name.rsplit(".", 1)
            if key != current and comps:
                lines.append(" ".join(comps))
                comps = []
            current = key
            comps += [ext, str(m.offset_data), str(m.size), m.name]
    if comps:
        lines.append(" ".join(comps))
    text = f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n"
    atomic_write_bytes(os.path.splitext(tar_path)[0] + ".idx", text.encode())
    return True


def _sample_meta(s: dict) -> bytes:
    return json.dumps({k: s[k] for k in ("key", "captions", "labels", "augmented", "source")}, sort_keys=True).encode()


def _shard_done(out_dir, shard_idx, samples) -> bool:
    """Whether shard ``shard_idx`` on disk (from an earlier, killed run) holds exactly ``samples``: the same members
    and each sample's JSON byte for byte (captions, labels, flags: a run with another --seed or other inputs
    writes the shard again)."""
    path = os.path.join(out_dir, f"shard-{shard_idx:05d}.tar")
    if not os.path.exists(path):
        return False
    try:
        with tarfile.open(path, encoding="utf-8") as tar:
            members = list(tar)
            if [m.name for m in members] != [n for s in samples for n in (f"{s['key']}.jpg", f"{s['key']}.json")]:
                return False
            metas = [tar.extractfile(m).read() for m in members[1::2]]
    except (tarfile.TarError, OSError, AttributeError):  # AttributeError: a member that is not a file
        return False
    return metas == [_sample_meta(s) for s in samples]


def _clean_temporary(folder: str) -> None:
    """Remove the temporary files of a killed run (atomic_write's ``.tmp-*``): never outputs."""
    for name in os.listdir(folder):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(folder, name))


def shard_result(out_dir: str, k: int, samples: int, pairs: int) -> dict:
    """The manifest entry of shard ``k`` written by an earlier (killed) run, described from disk (its DALI index
    written when missing)."""
    path = os.path.join(out_dir, f"shard-{k:05d}.tar")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if not os.path.exists(os.path.splitext(path)[0] + ".idx"):
        write_dali_index(path)
    return {"path": os.path.basename(path), "samples": samples, "pairs": pairs, "sha256": sha}


def _curate_local(args, count_tokens) -> dict:
    """The local engine: every step in this process, decoding and hashing and shard writing in a process pool."""
    records = read_inputs(args.input)
    analysis = analyse_all(records, os.path.join(args.out, ".work"), args.workers, args.quiet)
    samples, info = select(records, analysis, args, count_tokens)
    shards = [samples[i : i + args.shard_size] for i in range(0, len(samples), args.shard_size)]
    delay = float(os.environ.get("FLORENCE_CURATE_SHARD_DELAY", "0"))
    jobs = [(args.out, k, s, delay) for k, s in enumerate(shards) if not _shard_done(args.out, k, s)]
    done = {k: None for k in range(len(shards))}
    if jobs:
        with mp.Pool(min(args.workers, len(jobs))) as pool:
            for res in _progress(pool.imap(write_shard, jobs), len(jobs), "shards", args.quiet, "shard"):
                done[int(res["path"][6:11])] = res
    manifest_shards = [done[k] or shard_result(args.out, k, len(s), sum(len(x["captions"]) for x in s))
                       for k, s in enumerate(shards)]  # fmt: skip
    pairs = [(lab, text) for s in samples for lab, text in zip(s["labels"], s["captions"], strict=True)]
    per_label = Counter(lab for lab, _ in pairs)
    lengths = Counter(count_tokens(t) for _, t in pairs)
    stats = make_stats(inputs=len(records), images=len(samples), pairs=len(pairs), unique_texts=len(info["label_text"]),
                       tokens=sum(n * c for n, c in lengths.items()),
                       sharing=sum(n for n in per_label.values() if n > 1),
                       augmented=sum(sum(s["augmented"]) for s in samples), info=info)  # fmt: skip
    _atomic_json(os.path.join(args.out, "labels.json"), info["label_text"])
    return {"shards": manifest_shards, "stats": stats, "lengths": lengths, "positives": Counter(per_label.values())}


# arguments that choose how a run executes, not what it writes: left out of the manifest, so that the outputs do
# not depend on the engine or the number of workers
EXECUTION_ARGS = ("quiet", "workers", "engine", "ray_address", "num_workers", "unit_rows")


def curate(args) -> dict:
    """Run the pipeline with ``args.engine`` ("local", the default, or "ray": ``florence.data.curate_ray``); both
    write the same bytes. Returns the statistics (stats.json's) plus "seconds"."""
    from florence.optional import require
    from florence.tokenizer import get_tokenizer

    require("open_clip", "florence.data.curate (it counts CLIP BPE tokens to fit captions into the text context)")
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    _clean_temporary(args.out)
    if getattr(args, "engine", "local") == "ray":
        from florence.data.curate_ray import curate_ray

        res = curate_ray(args)
    else:
        tok = get_tokenizer()

        @functools.cache  # captions repeat (shared texts): each is tokenised once per run
        def count_tokens(text):
            return len(tok.encode(text))

        res = _curate_local(args, count_tokens)
    stats = res["stats"]
    manifest = {
        "format": "webdataset",
        "components": {"jpg": "image (JPEG)", "json": "key, captions, labels, augmented, source"},
        "index_format": "DALI wds2idx v1.2 (.idx beside each shard)",
        "shards": res["shards"],
        "samples": stats["images"],
        "pairs": stats["pairs"],
        "labels": stats["unique_texts"],
        "args": {k: _arg_text(k, v) for k, v in vars(args).items() if k not in EXECUTION_ARGS},
    }
    _atomic_json(os.path.join(args.out, "manifest.json"), manifest)
    _atomic_json(os.path.join(args.out, "stats.json"), stats)
    atomic_write_bytes(os.path.join(args.out, "summary.txt"), summary_text(stats).encode())
    plot_stats(res["lengths"], res["positives"], args.out)
    stats["seconds"] = round(time.time() - t0, 2)
    return stats


def _arg_text(name, value):
    if name == "input":
        return [path_text(v) for v in value]
    return path_text(value) if name == "out" else value


def make_stats(*, inputs, images, pairs, unique_texts, tokens, sharing, augmented, info) -> dict:
    """stats.json's content (both engines): counts of inputs, images, pairs, unique texts, BPE tokens of the stored
    captions, pairs whose text has other pairs (UniCL positives), prompt-augmented pairs, and ``info``'s removals."""
    return {
        "inputs": inputs,
        "images": images,
        "pairs": pairs,
        "unique_texts": unique_texts,
        "tokens": tokens,
        "pairs_sharing_a_text": sharing,
        "augmented_pairs": augmented,
        "removed": info["removed"],
        "corrupt_reasons": info["corrupt_reasons"],
        "bad_record_reasons": info["bad_record_reasons"],
        "empty_captions_dropped": info["empty_captions_dropped"],
        "truncated_captions": info["truncated_captions"],
    }


def summary_text(st: dict) -> str:
    lines = [
        "Curated image-text pairs",
        f"  inputs                {st['inputs']:>10,}",
        f"  images kept           {st['images']:>10,}",
        f"  image-text pairs      {st['pairs']:>10,}",
        f"  unique texts (labels) {st['unique_texts']:>10,}",
        f"  tokens (CLIP BPE)     {st['tokens']:>10,}",
        f"  pairs sharing a text  {st['pairs_sharing_a_text']:>10,}",
        f"  prompt-augmented      {st['augmented_pairs']:>10,}",
        "Removed (input records)",
    ]
    lines += [f"  {k:<21} {v:>10,}" for k, v in st["removed"].items()]
    lines += [f"    corrupt: {k}: {v}" for k, v in st["corrupt_reasons"].items()]
    lines += [f"  empty captions dropped from kept images: {st['empty_captions_dropped']}",
              f"  captions cut to the token limit: {st['truncated_captions']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_stats(lengths: Counter, positives: Counter, out_dir: str) -> None:
    """caption_lengths.png (a histogram of the stored captions' BPE lengths; ``lengths``: length -> captions) and
    positives_per_label.png (of the pairs per label; ``positives``: pairs -> labels), from counts, so that both
    engines draw them without holding one value per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = (("caption_lengths.png", lengths, "caption length (CLIP BPE tokens)"),
             ("positives_per_label.png", positives, "pairs per label (UniCL positives)"))  # fmt: skip
    for name, counts, xlabel in plots:
        values = sorted(counts) or [0]
        weights = [counts[v] for v in values] if counts else [1]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(values, bins=min(50, len(values)), weights=weights)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        fig.tight_layout()
        atomic_write(os.path.join(out_dir, name), lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL / CSV / Parquet files and folders of images with .txt")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (shards, manifest, stats, plots)")
    p.add_argument("--min-size", type=int, default=32, help="minimum shorter side in pixels (default 32)")
    p.add_argument("--near-dup-threshold", type=int, default=4, help="max dHash Hamming distance (-1: off)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--short-words", type=int, default=3, help="captions of at most this many words get a prompt")
    p.add_argument("--max-tokens", type=int, default=75, help="BPE tokens a caption may keep (77 minus start/end)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local engine: processes (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (one machine, the default) or ray (Ray Data: a local Ray, or --ray-address's cluster)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="ray engine: the cluster to join (ray://host:10001 or host:6379; default: start a local Ray)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="ray engine: tasks run at once per stage (default: the cluster's CPUs)",
    )
    p.add_argument(
        "--unit-rows",
        type=int,
        default=10000,
        help="ray engine: records per read-and-analyse task (JSONL lines, folder files; Parquet: a row "
        "group; CSV: a file)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("shard_size", "workers", "max_tokens", "num_workers", "unit_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if not 0 <= args.near_dup_threshold < 64 and args.near_dup_threshold != -1:
        p.error(f"--near-dup-threshold: expected -1 (off) or 0..63, got {args.near_dup_threshold}")
    if args.engine == "local" and (args.ray_address is not None or args.num_workers is not None):
        p.error("--ray-address and --num-workers belong to --engine ray (the local engine takes --workers)")
    from florence.optional import MissingOptionalDependency

    try:
        stats = curate(args)
    except (MissingOptionalDependency, InputError, ClusterError) as e:
        print(f"florence.data.curate: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary_text(stats), end="")
    print(json.dumps({"stats": os.path.join(args.out, "stats.json"), "images": stats["images"],
                      "pairs": stats["pairs"], "seconds": stats["seconds"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
