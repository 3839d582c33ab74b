"""Video data: writing and decoding clips, curating them into webdataset shards, and a loader of clip batches with
two decoders (PyAV, NVIDIA DALI) behind one sampling and augmentation code path.

    write_video("clip.webm", frames)                   # frames: uint8 (T, H, W, 3); VP9 in WebM by default
    decode_video("clip.webm", backend="pyav")          # -> uint8 (T, H, W, 3), every frame
    python -m florence.data.video curate --input DIR/train.jsonl --out DIR-shards [--shard-size 256]
    loader = make_video_loader("DIR-shards", batch_size=8, frames=16, size=64, seed=0, backend="auto")
    loader.set_epoch(e)
    for batch in loader:  # {"videos": (B, 3, T, S, S) float32, "labels": (B,) int64, "keys": [...],
        ...               #  "tokens": (B, context_length) int64 when context_length is given}

Decoders and their codec limits (measured here: PyAV 18.0.0 with its bundled FFmpeg, DALI 2.4.0 on CPU):
- backend="pyav": any codec FFmpeg reads (VP9, VP8, H.264, MPEG-4 Part 2, AV1 (libdav1d), MJPEG, ...); yuv420p
  frames converted to RGB as DALI converts them (``yuv420p_to_rgb``: BT.601 limited range, bilinear chroma), other
  pixel formats by FFmpeg's swscale.
- backend="dali": ``nvidia.dali.fn.decoders.video`` (the ``fn.experimental.decoders.video`` of earlier releases,
  now a deprecated alias) on encoded bytes fed by an ``external_source``. Its CPU variant (device "cpu",
  device_id=None) decodes VP9, VP8 and MJPEG, in WebM, Matroska or MP4 alike, and refuses H.264, MPEG-4 Part 2 and
  AV1 ("Codec 27 (h264) is not supported by the CPU variant of this operator"); such a file raises ValueError
  naming it and saying to use backend="pyav". On a GPU, ``device="mixed"`` decodes with NVDEC (H.264, HEVC, VP9,
  AV1 among others) into GPU memory; its frames are brought back to the CPU for the shared augmentation below, and
  NVDEC's colour conversion is not FFmpeg's, so "mixed" clips may differ from PyAV's by more than rounding
  (untested here: no GPU). The CPU decoder converts yuv420p to RGB with BT.601 limited-range coefficients and
  bilinear chroma upsampling; PyAV's frames go through the same conversion (``yuv420p_to_rgb``), and on the VP9
  clips built here the two backends' frames differ by at most 1 grey level, 0.008 on average (FFmpeg's own rgb24
  conversion, which repeats chroma samples, differed from DALI's by up to 24 levels, 1.7 on average).
Decoding time per 16-frame 64 x 64 VP9 clip on this 2-core machine (busy with other work, load average ~4.5):
PyAV 11.6 ms (libvpx 4.4 ms, the RGB conversion the rest; swscale's conversion took 3.1 ms a clip in all when the
machine was idle), DALI 2.8 ms one clip at a time (1.9 ms idle; 0.8 ms idle in batches of 20 on 2 threads).

Curation (``curate_videos``): JSONL inputs ({"video": path, "captions": [...], "label": k, any other fields}); every
video is decoded once with PyAV (unreadable, undecodable or frameless videos are dropped and counted by reason);
the kept ones go into webdataset shards ``shard-00000.tar`` ... with members ``<key>.<ext>`` (the file's bytes,
its extension kept) and ``<key>.json`` ({"key", "captions", "label", "frames", "width", "height", "codec",
"source"} plus the input row's other fields), DALI index files beside them (when DALI is installed, as
``florence.data.curate`` writes them) and ``manifest.json`` (shards with their sample counts and SHA-256, samples,
drops by reason, codecs).

Loader sampling, computed in Python from seeded generators so both backends give the same clips:
- training: the samples in a per-epoch shuffled order (seed, epoch); per clip (seed, epoch, key): a temporal crop
  (start frame uniform over the valid starts, ``frames`` frames ``frame_stride`` apart; a shorter video repeats its
  last frame) and one random resized crop box for all its frames (area 0.7-1, aspect 3/4-4/3, torchvision's rule)
  resized to size x size (PIL bilinear, antialiased). No horizontal flip: it would turn a "2" into a mirrored glyph and
  "moving left" into "moving right", changing the label.
- evaluation: the samples in order, the centre clip in time, the shorter side resized to ``size`` and a centre crop.
- CLIP's mean/std normalisation (``florence.data.loader.MEAN``, ``STD``); with ``context_length``, one caption per
  sample drawn per epoch (seed, epoch, key) and tokenised (CLIP BPE: needs open_clip).
- ranks: ``split="global_batch"`` (rank r takes the r-th slice of every batch of batch_size x world_size
  consecutive samples: the ranks' batches of a step together hold one process's batch) or ``split="rank"`` (rank
  r takes positions r, r + world_size, ...). ``iterate(start_batch)`` resumes an epoch part-way.
Samples are read from the shards by offset (an index of each tar built once), as ``florence.data.loader``'s torch
path does.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter

import numpy as np
import torch

from florence.data.loader import MEAN, STD, _rng
from florence_kernels._io import atomic_write_bytes

CONTAINERS = {".webm": "webm", ".mp4": "mp4", ".mkv": "matroska"}
# Encoder options by codec. VP9: constant quality (crf 30, no bitrate cap), libvpx's realtime mode (cpu-used 8) on
# one thread. On the 64x64 16-frame moving-digit clips: 2.4 KB and 6.6 ms per clip, decoded frames 2.8 grey levels
# from the source on average; the "good" deadline (cpu-used 5) gives 1.9 KB and 2.6 grey levels but takes 18 ms,
# and most of the difference is yuv420p's chroma subsampling (a lossless VP9 round trip is 1.7 levels off on
# average, 16 at most, on a digit clip). One thread: clips are encoded in parallel processes instead.
ENCODER_OPTIONS = {
    "libvpx-vp9": {"crf": "30", "b:v": "0", "deadline": "realtime", "cpu-used": "8", "threads": "1"},
    "libx264": {"crf": "18", "preset": "fast"},
}
BACKENDS = ("pyav", "dali")
CROP_AREA = (0.7, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


# --- writing and decoding -------------------------------------------------------------------------------------------


def _check_frames(frames) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames: expected a numpy array uint8 (T, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected shape (T, H, W, 3) with T >= 1, got {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames: yuv420p needs an even height and width, got {tuple(frames.shape)}")
    return frames


def encode_video(frames: np.ndarray, fps: int = 8, codec: str = "libvpx-vp9", container: str = "webm",
                 options: dict | None = None) -> bytes:  # fmt: skip
    """The encoded bytes of uint8 (T, H, W, 3) RGB frames (yuv420p, ``fps`` frames per second)."""
    from florence.optional import require

    av = require("av", "florence.data.video.encode_video")
    frames = _check_frames(frames)
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps: expected a positive int, got {fps!r}")
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps, options=dict(ENCODER_OPTIONS.get(codec, {}) if options is None
                                                              else options))  # fmt: skip
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str = "libvpx-vp9",
                options: dict | None = None) -> None:  # fmt: skip
    """Write uint8 (T, H, W, 3) RGB frames as a video file, atomically; the container follows the extension (.webm,
    .mp4, .mkv). ``options``: the encoder's (default ``ENCODER_OPTIONS[codec]``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in CONTAINERS:
        raise ValueError(f"path: expected a {', '.join(CONTAINERS)} file, got {path!r}")
    atomic_write_bytes(path, encode_video(frames, fps, codec, CONTAINERS[ext], options))


def _source_name(source) -> str:
    return source if isinstance(source, str) else f"<{len(source)} bytes>"


def _read(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    raise ValueError(f"source: expected a path or bytes, got {type(source).__name__}")


def _upsample2(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """2x bilinear upsampling along ``axis`` with centred samples (edges repeated), cut to ``n``: out[2i] =
    3/4 a[i] + 1/4 a[i - 1], out[2i + 1] = 3/4 a[i] + 1/4 a[i + 1] (torch's interpolate, align_corners=False)."""
    a = np.moveaxis(a, axis, -1)
    prev = np.concatenate([a[..., :1], a[..., :-1]], axis=-1)
    nxt = np.concatenate([a[..., 1:], a[..., -1:]], axis=-1)
    out = np.stack([0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt], axis=-1).reshape(*a.shape[:-1], -1)
    return np.moveaxis(out[..., :n], -1, axis)


def yuv420p_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) RGB from 8-bit yuv420p planes (..., H, W), (..., H/2, W/2) x 2: BT.601 limited range,
    chroma upsampled bilinearly with centred samples. This is the conversion DALI's CPU video decoder makes (its
    frames and these agree within 1 grey level, 0.008 on average, on the VP9 clips built here), where FFmpeg's
    swscale (PyAV's ``to_ndarray(format="rgb24")``) repeats chroma samples and differs from DALI by up to 14 levels,
    1.7 on average."""
    h, w = y.shape[-2:]
    cb = _upsample2(_upsample2(u.astype(np.float32) - 128, -2, h), -1, w) * (255 / 224)
    cr = _upsample2(_upsample2(v.astype(np.float32) - 128, -2, h), -1, w) * (255 / 224)
    luma = (y.astype(np.float32) - 16) * (255 / 219)
    r = luma + 1.402 * cr
    b = luma + 1.772 * cb
    g = (luma - 0.299 * r - 0.114 * b) / 0.587
    return np.rint(np.stack([r, g, b], axis=-1)).clip(0, 255).astype(np.uint8)


def _plane(frame, i: int, h: int, w: int) -> np.ndarray:
    p = frame.planes[i]
    return np.frombuffer(p, dtype=np.uint8).reshape(-1, p.line_size)[:h, :w]


def pyav_decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Every frame of an encoded video as uint8 (T, H, W, 3) RGB, with PyAV; ValueError naming ``name`` when the
    bytes are no video or decode to no frame.

    8-bit yuv420p frames (VP9, H.264 and most other video) are converted by ``yuv420p_to_rgb``, as DALI's decoder
    converts them, so the two backends' frames agree; other pixel formats by FFmpeg's swscale (one reused
    ``VideoReformatter``: 7.5 ms -> 3.1 ms per 16-frame 64x64 clip against a converter built per frame).
    """
    from florence.optional import require

    av = require("av", "florence.data.video (backend='pyav')")
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    ys, us, vs, rgb = [], [], [], []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: no video stream")
            for f in container.decode(video=0):
                if f.format.name == "yuv420p" and not rgb:
                    h, w = f.height, f.width
                    ys.append(_plane(f, 0, h, w))
                    us.append(_plane(f, 1, (h + 1) // 2, (w + 1) // 2))
                    vs.append(_plane(f, 2, (h + 1) // 2, (w + 1) // 2))
                else:  # another pixel format (a stream may change it): swscale for every frame
                    if ys:
                        rgb += list(yuv420p_to_rgb(np.stack(ys), np.stack(us), np.stack(vs)))
                        ys, us, vs = [], [], []
                    rgb.append(reformatter.reformat(f, format="rgb24").to_ndarray())
    except av.FFmpegError as e:
        raise ValueError(f"{name}: PyAV cannot decode it ({type(e).__name__}: {e})") from e
    if ys:
        return yuv420p_to_rgb(np.stack(ys), np.stack(us), np.stack(vs))
    if not rgb:
        raise ValueError(f"{name}: the video has no frames")
    return np.stack(rgb)


class DaliVideoDecoder:
    """Batches of encoded videos -> lists of uint8 (T, H, W, 3) frames, with DALI's video decoder (one pipeline,
    rebuilt after a decoding error, which leaves a DALI pipeline unusable)."""

    def __init__(self, max_batch: int = 1, num_threads: int | None = None, device: str = "cpu"):
        from florence.optional import require

        require("dali", "florence.data.video (backend='dali')")
        if device not in ("cpu", "mixed"):
            raise ValueError(f"device: expected 'cpu' or 'mixed', got {device!r}")
        if device == "mixed" and not torch.cuda.is_available():
            raise ValueError("device: 'mixed' decodes on a GPU; none is available (use device='cpu')")
        self.max_batch, self.device = max_batch, device
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        device_id = torch.cuda.current_device() if self.device == "mixed" else None

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=1)  # fmt: skip
        def pipe():
            return fn.decoders.video(fn.external_source(name="encoded", dtype=types.UINT8), device=self.device)

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
            self._pipe = None  # DALI: "Current pipeline object is no longer valid"
            raise
        if self.device == "mixed":
            out = out.as_cpu()
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
                        raise ValueError(f"{n}: DALI's {self.device.upper()} video decoder cannot decode it (the CPU "
                                         "decoder reads VP9, VP8 and MJPEG only; H.264, MPEG-4 Part 2 and AV1 are "
                                         "refused); use backend='pyav'") from e  # fmt: skip
        return out


_DALI_DECODERS: dict[str, DaliVideoDecoder] = {}


def decode_video(source, backend: str = "pyav", device: str = "cpu") -> np.ndarray:
    """Every frame of a video file (path) or of its bytes as uint8 (T, H, W, 3) RGB.

    backend="pyav": any codec FFmpeg reads. backend="dali": DALI's video decoder on ``device`` ("cpu": VP9, VP8 and
    MJPEG only; "mixed": NVDEC on a GPU); a codec it refuses raises ValueError naming the file. See the module
    docstring for the measured limits.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'pyav' or 'dali', got {backend!r}")
    data, name = _read(source), _source_name(source)
    if backend == "pyav":
        return pyav_decode(data, name)
    if device not in _DALI_DECODERS:
        _DALI_DECODERS[device] = DaliVideoDecoder(1, 1, device)
    return _DALI_DECODERS[device]([data], [name])[0]


def _resolve_backend(backend: str) -> str:
    from florence.optional import missing

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend: expected 'auto', 'pyav' or 'dali', got {backend!r}")
    if backend == "auto":
        return "dali" if missing("dali") is None else "pyav"
    return backend


# --- curation -------------------------------------------------------------------------------------------------------


def probe_video(path: str) -> dict:
    """{"ok": True, "frames", "width", "height", "codec"} for a video every frame of which PyAV decodes, else
    {"ok": False, "reason"}; never raises."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        return {"ok": False, "reason": f"unreadable file ({type(e).__name__})"}
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return {"ok": False, "reason": "no video stream"}
            codec = container.streams.video[0].codec_context.name
            frames = [f for f in container.decode(video=0)]
    except Exception as e:  # PyAV raises FFmpegError subclasses, and others for odd containers
        return {"ok": False, "reason": f"undecodable ({type(e).__name__})"}
    if not frames:
        return {"ok": False, "reason": "no frames"}
    return {"ok": True, "frames": len(frames), "width": frames[0].width, "height": frames[0].height, "codec": codec}


def curate_videos(inputs: list[str], out_dir: str, shard_size: int = 256, seed: int = 0, quiet: bool = True) -> dict:
    """Check, then shard, the videos listed in JSONL files (module docstring); returns the manifest.

    ``seed`` is recorded in the manifest (the shards keep the input order; the loader shuffles).
    """
    from florence.data.curate import _atomic_json, _progress, _tar_member, native_path, path_text, write_dali_index
    from florence.optional import require

    require("av", "florence.data.video.curate_videos (it checks that every video decodes)")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
    if isinstance(inputs, str):
        inputs = [inputs]
    rows = []  # (row or None, source, absolute path or None, bad reason)
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"inputs: {path} is not a file")
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                src = f"{path_text(os.path.basename(path))}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    rows.append((None, src, None, "invalid JSON"))
                    continue
                video = row.get("video") if isinstance(row, dict) else None
                if not isinstance(video, str) or not video:
                    rows.append((None, src, None, "no video path"))
                    continue
                video = native_path(video)
                rows.append((row, src, video if os.path.isabs(video) else os.path.join(base, video), None))
    removed, reasons, codecs, samples = Counter(bad_record=0, unreadable=0), Counter(), Counter(), []
    for row, src, video, bad in _progress(rows, len(rows), "decode", quiet, "video"):
        if bad is not None:
            removed["bad_record"] += 1
            reasons[bad] += 1
            continue
        info = probe_video(video)
        if not info["ok"]:
            removed["unreadable"] += 1
            reasons[info["reason"]] += 1
            continue
        codecs[info["codec"]] += 1
        key = f"{len(samples):09d}"
        caps = row.get("captions", [row["caption"]] if "caption" in row else [])
        meta = {k: v for k, v in row.items() if k not in ("video", "caption")}
        meta.update(key=key, captions=[c for c in caps if isinstance(c, str)], label=int(row.get("label", -1)),
                    source=src, **{k: info[k] for k in ("frames", "width", "height", "codec")})  # fmt: skip
        samples.append((video, os.path.splitext(video)[1].lower().lstrip(".") or "bin", meta))
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for k in range(0, len(samples), shard_size):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
            for video, ext, meta in samples[k : k + shard_size]:
                with open(video, "rb") as f:
                    _tar_member(tar, f"{meta['key']}.{ext}", f.read())
                _tar_member(tar, f"{meta['key']}.json", json.dumps(meta, sort_keys=True).encode())
        data = buf.getvalue()
        path = os.path.join(out_dir, f"shard-{k // shard_size:05d}.tar")
        atomic_write_bytes(path, data)
        write_dali_index(path)
        shards.append({"path": os.path.basename(path), "samples": len(samples[k : k + shard_size]),
                       "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    manifest = {
        "format": "webdataset",
        "components": {
            "<ext>": "the video file's bytes (extension kept)",
            "json": "key, captions, label, frames, width, height, codec, source",
        },  # fmt: skip
        "index_format": "DALI wds2idx v1.2 (.idx beside each shard, when DALI is installed)",
        "shards": shards,
        "samples": len(samples),
        "inputs": len(rows),
        "removed": dict(removed),
        "drop_reasons": dict(reasons),
        "codecs": dict(codecs),
        "args": {"inputs": [path_text(p) for p in inputs], "shard_size": shard_size, "seed": seed},
    }
    _atomic_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def index_video_shard(path: str) -> list[tuple[str, str, int, int, int, int]]:
    """(key, video extension, video offset, video size, json offset, json size) for every sample of a shard."""
    parts: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, encoding="utf-8") as tar:
        for m in tar:
            if m.isfile():
                key, ext = m.name.rsplit(".", 1)
                parts.setdefault(key, {})[ext] = (m.offset_data, m.size)
    out = []
    for key, comps in parts.items():
        video = [e for e in comps if e != "json"]
        if "json" not in comps or len(video) != 1:
            raise ValueError(f"{path}: sample {key} needs one video and one .json member, has {sorted(comps)}")
        out.append((key, video[0], *comps[video[0]], *comps["json"]))
    return out


# --- sampling and augmentation (shared by both backends) ------------------------------------------------------------


def clip_indices(n_frames: int, frames: int, stride: int, start: int | None = None) -> np.ndarray:
    """``frames`` frame indices ``stride`` apart from ``start`` (default: the centre clip), the last frame repeated
    where the video is shorter."""
    span = (frames - 1) * stride + 1
    if start is None:
        start = max(0, (n_frames - span) // 2)
    return np.minimum(start + stride * np.arange(frames), n_frames - 1)


def crop_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, area CROP_AREA (0.7-1; the digits stay whole more often
    than with the image loader's 0.6), aspect CROP_RATIO, torchvision's rule: 10 tries, then the centre square."""
    for _ in range(10):
        target = w * h * rng.uniform(*CROP_AREA)
        ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    s = min(w, h)
    return (h - s) // 2, (w - s) // 2, s, s


def plan_clip(meta: dict, frames: int, size: int, stride: int, train: bool, seed: int, epoch: int) -> dict:
    """What to take from a sample: {"indices": frame indices, "box": (top, left, height, width)} of the decoded
    video, before resizing the box to size x size. Drawn from (seed, epoch, key) in training; the centre otherwise."""
    n, w, h = int(meta["frames"]), int(meta["width"]), int(meta["height"])
    if not train:
        s = min(w, h)  # the centre square: resizing it is "shorter side to size, centre crop"
        return {"indices": clip_indices(n, frames, stride), "box": ((h - s) // 2, (w - s) // 2, s, s)}
    rng = _rng(seed, epoch, meta["key"], "clip")
    span = (frames - 1) * stride + 1
    start = int(rng.integers(0, max(1, n - span + 1)))
    return {"indices": clip_indices(n, frames, stride, start), "box": crop_box(rng, w, h)}


_MEAN = np.asarray(MEAN, dtype=np.float32) * 255
_INV_STD = 1 / (np.asarray(STD, dtype=np.float32) * 255)


def make_clip(video: np.ndarray, plan: dict, size: int) -> torch.Tensor:
    """float32 (3, T, size, size), CLIP-normalised, from decoded uint8 (N, H, W, 3) frames and a plan.

    Each frame's box is resized by PIL (bilinear, antialiased when shrinking) in the calling thread: 0.1 ms a frame,
    where torch's interpolate took 3 ms a clip on one thread and 16 ms on two threads of a busy 2-core machine.
    """
    from PIL import Image

    idx = np.minimum(plan["indices"], len(video) - 1)  # a decoder that returned fewer frames than probed
    top, left, ch, cw = plan["box"]
    if (ch, cw) == (size, size):
        x = video[idx, top : top + ch, left : left + cw]
    else:
        box = (left, top, left + cw, top + ch)
        x = np.stack([np.asarray(Image.fromarray(video[i]).resize((size, size), Image.BILINEAR, box=box))
                      for i in idx])  # fmt: skip
    x = (x.astype(np.float32) - _MEAN) * _INV_STD  # (T, S, S, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2)))  # (3, T, S, S)


# --- the loader -----------------------------------------------------------------------------------------------------


def _rank_positions(order, rank, world, batch_size, drop_last, split):
    if split == "rank":
        return order[rank::world]
    g = batch_size * world
    end = len(order) - len(order) % g if drop_last else len(order)  # only whole global batches
    parts = []
    for b0 in range(0, end, g):
        gb = order[b0 : b0 + g]
        parts.append(gb[rank * len(gb) // world : (rank + 1) * len(gb) // world])
    return np.concatenate(parts) if parts else order[:0]


class VideoLoader:
    """Batches of clips of one rank (module docstring). Build with ``make_video_loader``."""

    def __init__(self, data_dir, batch_size, frames, size, rank, world_size, seed, train, drop_last, backend,
                 frame_stride, context_length, split, num_threads=None, device="cpu"):  # fmt: skip
        from florence.data.loader import load_manifest

        manifest = load_manifest(data_dir)
        self.batch_size, self.frames, self.size, self.rank, self.world = batch_size, frames, size, rank, world_size
        self.seed, self.train, self.drop_last, self.backend = seed, train, drop_last, backend
        self.stride, self.split = frame_stride, split
        self.entries = []  # (shard path, key, ext, video offset, video size, json offset, json size)
        for sh in manifest["shards"]:
            path = os.path.join(data_dir, sh["path"])
            self.entries += [(path, *e) for e in index_video_shard(path)]
        self.tokenizer = None
        if context_length is not None:
            from florence.tokenizer import get_tokenizer

            self.tokenizer = get_tokenizer(context_length)
        if backend == "dali":
            self.decoder = DaliVideoDecoder(batch_size, num_threads, device)
        else:
            from florence.optional import require

            require("av", "make_video_loader(backend='pyav')")
            self.decoder = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
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

    def batch(self, b: int) -> dict:
        """Batch ``b`` of the current epoch."""
        entries = [self.entries[p] for p in self.positions[b * self.batch_size : (b + 1) * self.batch_size]]
        metas = [json.loads(self._read(path, jo, js)) for path, _, _, _, _, jo, js in entries]
        blobs = [self._read(path, vo, vs) for path, _, _, vo, vs, _, _ in entries]
        names = [f"{os.path.basename(e[0])}:{e[1]}.{e[2]}" for e in entries]
        if self.decoder is None:
            videos = [pyav_decode(blob, name) for blob, name in zip(blobs, names, strict=True)]
        else:
            videos = self.decoder(blobs, names)
        clips = [make_clip(v, plan_clip(m, self.frames, self.size, self.stride, self.train, self.seed, self.epoch),
                           self.size) for v, m in zip(videos, metas, strict=True)]  # fmt: skip
        out = {"videos": torch.stack(clips), "labels": torch.tensor([int(m["label"]) for m in metas]),
               "keys": [m["key"] for m in metas]}  # fmt: skip
        if self.tokenizer is not None:
            caps = [m["captions"][int(_rng(self.seed, self.epoch, m["key"], "caption").integers(len(m["captions"])))]
                    for m in metas]  # fmt: skip
            out["tokens"] = self.tokenizer(caps)
        return out

    def iterate(self, start_batch: int = 0):
        """The epoch's batches from ``start_batch`` on (resuming part-way)."""
        if not isinstance(start_batch, int) or start_batch < 0:
            raise ValueError(f"start_batch: expected an int >= 0, got {start_batch!r}")
        for b in range(start_batch, len(self)):
            yield self.batch(b)


def make_video_loader(data_dir: str, batch_size: int, frames: int, size: int, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, train: bool = True, drop_last: bool = True, backend: str = "auto",
                      frame_stride: int = 1, context_length: int | None = None, split: str = "global_batch",
                      num_threads: int | None = None, device: str = "cpu") -> VideoLoader:  # fmt: skip
    """A loader of clip batches from curated video shards (module docstring). backend "auto" takes DALI where it
    imports, else PyAV; ``num_threads`` and ``device`` ("cpu" or "mixed") are DALI's."""
    for name, value, low in (("batch_size", batch_size, 1), ("frames", frames, 1), ("size", size, 8),
                             ("frame_stride", frame_stride, 1), ("world_size", world_size, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank!r}")
    if split not in ("global_batch", "rank"):
        raise ValueError(f"split: expected 'global_batch' or 'rank', got {split!r}")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 2):
        raise ValueError(f"context_length: expected None or an int >= 2, got {context_length!r}")
    backend = _resolve_backend(backend)
    return VideoLoader(data_dir, batch_size, frames, size, rank, world_size, seed, train, drop_last, backend,
                       frame_stride, context_length, split, num_threads, device)  # fmt: skip


def load_video_eval_set(folder: str, frames: int, size: int, frame_stride: int = 1, backend: str = "auto"):
    """(videos float32 (N, 3, T, S, S) normalised, labels (N,), class names, captions, caption -> video index) from a
    folder with test.jsonl ({"video", "label", optional "captions"}) and classes.json ({"classes": [...]}): the
    centre clip of each video, shorter side resized to ``size``, centre crop (``florence.train.load_eval_set`` for
    videos)."""
    from florence.data.curate import native_path

    backend = _resolve_backend(backend)
    with open(os.path.join(folder, "classes.json"), encoding="utf-8") as f:
        classes = json.load(f)["classes"]
    rows = []
    with open(os.path.join(folder, "test.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    paths = [os.path.join(folder, native_path(r["video"])) for r in rows]
    if backend == "dali":
        decoder = DaliVideoDecoder(16, None, "cpu")
        videos = []
        for i in range(0, len(paths), 16):
            videos += decoder([_read(p) for p in paths[i : i + 16]], paths[i : i + 16])
    else:
        videos = [pyav_decode(_read(p), p) for p in paths]
    clips, labels, captions, owner = [], [], [], []
    for i, (row, v) in enumerate(zip(rows, videos, strict=True)):
        meta = {"key": str(i), "frames": len(v), "height": v.shape[1], "width": v.shape[2]}
        clips.append(make_clip(v, plan_clip(meta, frames, size, frame_stride, False, 0, 0), size))
        labels.append(int(row["label"]))
        for c in row.get("captions", []):
            captions.append(c)
            owner.append(i)
    x = torch.stack(clips) if clips else torch.empty(0, 3, frames, size, size)
    return x, torch.tensor(labels, dtype=torch.long), classes, captions, torch.tensor(owner, dtype=torch.long)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curate", help="check videos listed in JSONL files and write webdataset shards")
    c.add_argument("--input", nargs="+", required=True, help="JSONL files ({'video': path, 'captions': [...], ...})")
    c.add_argument("--out", required=True, help="output folder (shards, .idx files, manifest.json)")
    c.add_argument("--shard-size", type=int, default=256, help="videos per shard (default 256)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size: expected a positive number, got {args.shard_size}")
    from florence.optional import MissingOptionalDependency

    try:
        manifest = curate_videos(args.input, args.out, args.shard_size, args.seed, quiet=args.quiet)
    except MissingOptionalDependency as e:
        print(f"florence.data.video: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("samples", "inputs", "removed", "drop_reasons", "codecs")}
                     | {"shards": len(manifest["shards"])}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
