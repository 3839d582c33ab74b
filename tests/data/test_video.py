"""florence.data.video and the moving_digits dataset, on a small build (32 x 32 clips, a few dozen per split): the
generator's labels, split, codec, determinism, motion and direction-free frames; PyAV and DALI decode the same
frames; the loader's two backends give the same batches, its epochs, ranks and resumption; curation drops an
unreadable video."""

import json
import os
import random

import numpy as np
import pytest
import torch

from florence.optional import missing

pytest.importorskip("av", reason=str(missing("av")))

from florence.data.builtin import DIRECTIONS, _digit_images, build_moving_digits, moving_digit_clip  # noqa: E402
from florence.data.video import (  # noqa: E402
    curate_videos,
    decode_video,
    load_video_eval_set,
    make_video_loader,
    write_video,
)

HAS_DALI = missing("dali") is None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason=f"optional package missing: {missing('dali')}")
BACKENDS = ["pyav"] + (["dali"] if HAS_DALI else [])
SIZE, FRAMES, LIMIT = 32, 8, 40
# PyAV's frames (converted by yuv420p_to_rgb) and DALI's agree within 1 grey level (rounding of the same
# conversion), 0.008 on average, on the clips built here; the tolerances leave room for other FFmpeg builds.
DECODER_MAX, DECODER_MEAN = 2, 0.1
# VP9 at crf 30 with yuv420p: decoded frames 2.1 grey levels from the source on average at 64 px (2.8 at worst per
# clip); smaller frames lose more to chroma subsampling.
CODEC_MEAN = 6.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    build_moving_digits(str(root / "raw"), SIZE, 0.2, 0, frames=FRAMES, limit=LIMIT, quiet=True)
    manifest = curate_videos([str(root / "raw" / "train.jsonl")], str(root / "shards"), shard_size=16)
    rows = {s: [json.loads(x) for x in open(root / "raw" / f"{s}.jsonl")] for s in ("train", "test")}
    return root, rows, manifest


def _rerender(row, digit_size, seed=0):
    images, _ = _digit_images(digit_size)
    return moving_digit_clip(images[row["digit_image"]], SIZE, FRAMES, seed, int(row["video"][-10:-5]))


# --- the generator ------------------------------------------------------------------------------------------------


def test_classes_labels_split_and_codec(data):
    import av

    root, rows, _ = data
    meta = json.load(open(root / "raw" / "classes.json"))
    assert len(meta["classes"]) == 40 and meta["classes"][4 * 3 + 0] == "three moving left"
    assert (meta["codec"], meta["container"], meta["train"], meta["test"]) == ("vp9", "webm", LIMIT, LIMIT)
    for r in rows["train"] + rows["test"]:
        assert r["label"] == r["digit"] * 4 + DIRECTIONS.index(r["direction"])
        assert any(r["direction"] in c for c in r["captions"]) and len(r["captions"]) == 4
    train_images = {r["digit_image"] for r in rows["train"]}
    assert not train_images & {r["digit_image"] for r in rows["test"]}  # held-out clips show held-out images
    with av.open(str(root / "raw" / rows["test"][0]["video"])) as c:
        assert c.format.name.startswith("matroska,webm") and c.streams.video[0].codec_context.name == "vp9"
        assert sum(1 for _ in c.decode(video=0)) == FRAMES


@pytest.mark.parametrize("constant, value", [("DIGIT_SCALE", 0.6), ("BACKGROUND", (100, 140)), ("TWO_COPIES", 1.0)])
def test_a_rebuild_rewrites_the_clips_when_a_rendering_constant_changed(tmp_path, monkeypatch, constant, value):
    import florence.data.builtin as builtin

    build_moving_digits(str(tmp_path), SIZE, 0.2, 0, frames=FRAMES, limit=2, quiet=True)
    path = str(tmp_path / "videos" / "clip_00000.webm")
    before, kept = decode_video(path), os.stat(path).st_mtime_ns
    build_moving_digits(str(tmp_path), SIZE, 0.2, 0, frames=FRAMES, limit=2, quiet=True)
    assert os.stat(path).st_mtime_ns == kept  # nothing changed: the files are kept
    monkeypatch.setattr(builtin, constant, value)
    summary = build_moving_digits(str(tmp_path), SIZE, 0.2, 0, frames=FRAMES, limit=2, quiet=True)
    assert not np.array_equal(decode_video(path), before)
    assert summary[constant.lower()] == (list(value) if isinstance(value, tuple) else value)


def test_deterministic_and_frames_near_the_source(data, tmp_path):
    root, rows, _ = data
    summary = build_moving_digits(str(tmp_path), SIZE, 0.2, 0, frames=FRAMES, limit=2, quiet=True)
    row = rows["train"][0]
    a = decode_video(str(root / "raw" / row["video"]))
    b = decode_video(str(tmp_path / row["video"]))
    assert a.shape == (FRAMES, SIZE, SIZE, 3) and np.array_equal(a, b)  # same seed: the same clip, the same bytes
    source, facts = _rerender(row, summary["digit_size"])
    err = np.abs(a.astype(np.int16) - source).mean()
    assert err < CODEC_MEAN, f"VP9 round trip: mean error {err:.2f} grey levels, allowed {CODEC_MEAN}"
    assert facts["direction"] == row["direction"] and facts["start"] == row["start"]


def test_the_digit_moves_the_right_way():
    images, _ = _digit_images(29)
    seen = set()
    for clip in range(40):
        video, facts = moving_digit_clip(images[clip], 64, 16, 0, clip)
        ink = (255 - video.astype(np.float32).mean(-1)) > 90  # the digit is dark, the background light
        ys, xs = np.mgrid[:64, :64]
        cx = [(xs * m).sum() / m.sum() for m in ink]
        cy = [(ys * m).sum() / m.sum() for m in ink]
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        expected = {"left": -dx, "right": dx, "up": -dy, "down": dy}[facts["direction"]]
        assert expected > 10 and min(abs(dx), abs(dy)) < 3, (clip, facts, dx, dy)
        seen.add(facts["direction"])
    assert seen == set(DIRECTIONS)


def test_a_single_frame_does_not_tell_the_direction():
    # The path's midpoint is drawn from the same range for every direction, and a clip's frame t moving one way is
    # its frame T - 1 - t moving the other way: the set of frames (a frame-shuffled clip) carries no direction.
    images, _ = _digit_images(29)
    mids = {d: [] for d in DIRECTIONS}
    for clip in range(200):
        _, f = moving_digit_clip(images[clip % 50], 64, 16, 3, clip)
        mids[f["direction"]].append(np.add(f["start"], f["end"]) / 2)
    along = {d: np.array(m)[:, 0 if d in ("left", "right") else 1] for d, m in mids.items()}
    assert abs(along["left"].mean() - along["right"].mean()) < 4 and abs(along["up"].mean() - along["down"].mean()) < 4
    assert all(abs(a.mean() - (64 - 29) / 2) < 4 for a in along.values())  # centred: symmetric around the middle
    # the construction: the same clip drawn with the opposite direction has its frames in reverse order
    import florence.data.builtin as builtin

    video, facts = moving_digit_clip(images[7], 64, 16, 0, 7)
    flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}[facts["direction"]]
    original = builtin.DIRECTIONS
    try:  # the clip's generator draws a direction index; reorder the names so that it lands on the opposite one
        builtin.DIRECTIONS = tuple(flipped if d == facts["direction"] else d for d in original)
        mirror, mirror_facts = moving_digit_clip(images[7], 64, 16, 0, 7)
    finally:
        builtin.DIRECTIONS = original
    assert mirror_facts["direction"] == flipped and np.array_equal(mirror, video[::-1])


# --- decoding -----------------------------------------------------------------------------------------------------


@needs_dali
def test_pyav_and_dali_decode_the_same_frames(data):
    root, rows, _ = data
    diffs = []
    for r in rows["test"][:10]:
        path = str(root / "raw" / r["video"])
        a, b = decode_video(path, "pyav"), decode_video(open(path, "rb").read(), "dali")
        assert a.shape == b.shape == (FRAMES, SIZE, SIZE, 3) and a.dtype == b.dtype == np.uint8
        diffs.append(np.abs(a.astype(np.int16) - b))
    mx, mean = max(d.max() for d in diffs), np.mean([d.mean() for d in diffs])
    assert mx <= DECODER_MAX and mean < DECODER_MEAN, f"PyAV vs DALI: max {mx}, mean {mean:.4f}"


def test_h264_decodes_with_pyav_and_dali_refuses_it_clearly(tmp_path):
    t, y, x = np.mgrid[:6, :32, :32]
    frames = np.stack([x * 8, y * 8, 40 * t], axis=-1).astype(np.uint8)  # smooth ramps: little lost to yuv420p
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames, fps=8, codec="libx264")
    import av

    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    out = decode_video(path, "pyav")
    assert out.shape == (6, 32, 32, 3) and np.abs(out.astype(np.int16) - frames).mean() < CODEC_MEAN
    if HAS_DALI:
        with pytest.raises(ValueError, match=r"clip\.mp4: DALI's CPU video decoder cannot decode it.*backend='pyav'"):
            decode_video(path, "dali")
        assert decode_video(path, "pyav").shape[0] == 6  # the refused file left no broken decoder behind


def test_write_and_decode_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="frames: expected dtype uint8, got float32"):
        write_video(str(tmp_path / "a.webm"), np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"frames: expected shape \(T, H, W, 3\)"):
        write_video(str(tmp_path / "a.webm"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="path: expected a .webm, .mp4, .mkv file"):
        write_video(str(tmp_path / "a.avi"), np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="backend: expected 'pyav' or 'dali'"):
        decode_video(b"", "ffmpeg")
    with pytest.raises(ValueError, match="<9 bytes>: PyAV cannot decode it"):
        decode_video(b"not video", "pyav")


# --- curation and the loader --------------------------------------------------------------------------------------


def test_curation_counts_and_drops_an_unreadable_video(data, tmp_path):
    root, rows, manifest = data
    assert manifest["samples"] == LIMIT and [s["samples"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["codecs"] == {"vp9": LIMIT} and manifest["removed"] == {"bad_record": 0, "unreadable": 0}
    # WebM's EBML magic, then fixed garbage: a file that claims to be WebM and is not. (Unseeded random bytes were
    # taken for an audio-only stream by FFmpeg's probe about once in 300 files: "no video stream", a flaky reason.)
    (tmp_path / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3" + random.Random(0).randbytes(296))
    with open(tmp_path / "in.jsonl", "w") as f:
        for r in rows["test"][:3]:
            f.write(json.dumps(dict(r, video=str(root / "raw" / r["video"]))) + "\n")
        f.write(json.dumps({"video": "broken.webm", "captions": ["x"], "label": 0}) + "\n")
        f.write(json.dumps({"video": "missing.webm", "captions": ["x"], "label": 0}) + "\n")
        f.write("{not json\n")
    m = curate_videos([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), shard_size=2)
    assert m["samples"] == 3 and len(m["shards"]) == 2 and m["inputs"] == 6
    assert m["removed"] == {"bad_record": 1, "unreadable": 2}
    assert sum(m["drop_reasons"].values()) == 3 and any(k.startswith("undecodable") for k in m["drop_reasons"])


def _keys(batches):
    return [b["keys"] for b in batches]


def test_loader_shapes_epochs_and_resume(data):
    root, _, _ = data
    loader = make_video_loader(str(root / "shards"), 8, 4, 24, backend="pyav", seed=1, frame_stride=2)
    assert len(loader) == LIMIT // 8
    a = list(loader)
    b = list(make_video_loader(str(root / "shards"), 8, 4, 24, backend="pyav", seed=1, frame_stride=2))
    x = a[0]
    assert x["videos"].shape == (8, 3, 4, 24, 24) and x["videos"].dtype == torch.float32
    assert x["labels"].dtype == torch.int64 and x["labels"].shape == (8,) and "tokens" not in x
    assert x["videos"].abs().max() < 3.0 and x["videos"].std() > 0.2  # CLIP-normalised
    assert _keys(a) == _keys(b) and all(torch.equal(p["videos"], q["videos"]) for p, q in zip(a, b, strict=True))
    loader.set_epoch(1)
    c = list(loader)
    assert _keys(c) != _keys(a) and sorted(sum(_keys(c), [])) == sorted(sum(_keys(a), []))
    assert _keys(list(loader.iterate(start_batch=3))) == _keys(c)[3:]


def test_two_ranks_global_batch_equal_one_process(data):
    root, _, _ = data
    one = list(make_video_loader(str(root / "shards"), 8, 4, 16, backend="pyav", seed=2))
    ranks = [list(make_video_loader(str(root / "shards"), 4, 4, 16, backend="pyav", seed=2, rank=r, world_size=2))
             for r in (0, 1)]  # fmt: skip
    assert len(one) == len(ranks[0]) == len(ranks[1]) == LIMIT // 8
    for x, y, z in zip(one, *ranks, strict=True):
        assert x["keys"] == y["keys"] + z["keys"]
        assert torch.equal(x["videos"], torch.cat([y["videos"], z["videos"]]))
    split = [make_video_loader(str(root / "shards"), 4, 4, 16, backend="pyav", rank=r, world_size=2, split="rank",
                               drop_last=False) for r in (0, 1)]  # fmt: skip
    keys = [k for loader in split for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted(k for b in one for k in b["keys"])


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_pyav_and_dali_loaders_give_the_same_batches(data, train):
    root, _, _ = data
    batches = [list(make_video_loader(str(root / "shards"), 8, FRAMES, SIZE, backend=be, seed=4, train=train))
               for be in ("pyav", "dali")]  # fmt: skip
    for p, d in zip(*batches, strict=True):
        assert p["keys"] == d["keys"] and torch.equal(p["labels"], d["labels"])
        diff = (p["videos"] - d["videos"]).abs()  # 1 grey level is 1 / (255 * 0.26) = 0.015 after normalisation
        assert diff.max() < DECODER_MAX * 0.016 and diff.mean() < DECODER_MEAN * 0.016


@pytest.mark.skipif(missing("open_clip") is not None, reason=f"optional package missing: {missing('open_clip')}")
def test_tokens_are_one_of_the_sample_captions(data):
    import florence

    root, rows, _ = data
    by_label = {r["label"]: r["captions"] for r in rows["train"]}
    b = next(iter(make_video_loader(str(root / "shards"), 4, 2, 16, backend="pyav", context_length=32)))
    tok = florence.get_tokenizer(32)
    for t, lab in zip(b["tokens"], b["labels"], strict=True):
        assert any(torch.equal(t, tok(c)[0]) for c in by_label[int(lab)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_set(data, backend):
    root, rows, _ = data
    x, labels, classes, captions, owner = load_video_eval_set(str(root / "raw"), 4, 16, frame_stride=2,
                                                              backend=backend)  # fmt: skip
    assert x.shape == (LIMIT, 3, 4, 16, 16) and x.dtype == torch.float32 and len(classes) == 40
    assert labels.tolist() == [r["label"] for r in rows["test"]] and len(captions) == len(owner) == 4 * LIMIT


def test_bad_loader_arguments(data):
    root, _, _ = data
    d = str(root / "shards")
    for kwargs, message in (({"rank": 2, "world_size": 2}, "rank: expected 0 <= rank < world_size = 2, got 2"),
                            ({"backend": "ffmpeg"}, "backend: expected 'auto', 'pyav' or 'dali'"),
                            ({"split": "interleave"}, "split: expected 'global_batch' or 'rank'"),
                            ({"frame_stride": 0}, "frame_stride: expected an int >= 1, got 0"),
                            ({"context_length": 1}, "context_length: expected None or an int >= 2")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_video_loader(d, 4, 4, 16, **kwargs)
    with pytest.raises(ValueError, match="frames: expected an int >= 1, got 0"):
        make_video_loader(d, 4, 0, 16)
    with pytest.raises(ValueError, match="start_batch: expected an int >= 0"):
        next(make_video_loader(d, 4, 4, 16, backend="pyav").iterate(-1))
    with pytest.raises(ValueError, match="frames: 40 frames do not fit"):
        build_moving_digits(str(root / "never"), 32, frames=40)
