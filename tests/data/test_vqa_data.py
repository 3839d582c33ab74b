"""florence.data.vqa and the digit_questions variant, on a small build (24 canvases per split at 96 px): every answer
against the stored objects (recomputed here by a separate reading of each template), the layout (no overlap, the
horizontal gap, sizes, colours in the pixels), held-out digit images, determinism and the rebuild stamp, balanced
yes/no and spread types, the training-only vocabulary; soft scores, normalisation and accuracy on hand cases;
curation's shards and its refusal of every kind of bad file in one error; the loader (batches, epochs, ranks,
resumption), PIL vs DALI, and the evaluation set."""

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch

import florence.data.vqa as vqa
from florence.data.builtin import CLASS_NAMES, _digit_images, _split
from florence.data.loader import _rng
from florence.data.vqa import (
    COLOURS,
    QUESTION_TYPES,
    answer_vocabulary,
    build_digit_questions,
    curate_vqa,
    digit_questions,
    load_vqa_eval_set,
    make_vqa_loader,
    normalize_answer,
    question_canvas,
    soft_scores,
    vqa_accuracy,
    vqa_report,
)
from florence.optional import missing
from tests.conftest import requires
from tests.data.test_detection_data import BACKENDS, HAS_DALI, _read_shard_samples, needs_dali

needs_tokenizer = requires("open_clip")  # the loader and the evaluation set tokenise the questions
SIZE, LIMIT, SHARD, PER_CANVAS = 96, 24, 10, 5
QUESTIONS = LIMIT * PER_CANVAS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    summary = build_digit_questions(str(root / "raw"), SIZE, limit=LIMIT, workers=1, quiet=True)
    files = {s: json.loads((root / "raw" / f"{s}.json").read_text()) for s in ("train", "test")}
    manifest = curate_vqa(str(root / "raw" / "train.json"), str(root / "shards"), shard_size=SHARD, quiet=True)
    return root, summary, files, manifest


def _pools():
    digits8, labels = _digit_images(8)
    train, test = _split(labels, 0.2, 0)
    return digits8, labels, {"train": train, "test": test}


# --- the generator ------------------------------------------------------------------------------------------------


def _oracle(question: str, objects: list[dict]) -> str:
    """The answer read off the objects by the template's plain meaning (no code shared with the generator)."""
    digits = [o["digit"] for o in objects]
    centres = [o["box"][0] + o["box"][2] / 2 for o in objects]
    if question == "how many digits are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) digits are there\?", question):
        assert m[1] in COLOURS
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.fullmatch(r"is there (a|an) (\w+)\?", question):
        assert m[1] == ("an" if m[2] == "eight" else "a")
        return "yes" if CLASS_NAMES.index(m[2]) in digits else "no"
    if m := re.fullmatch(r"which digit is on the far (left|right)\?", question):
        assert len(objects) >= 2
        ranked = sorted(range(len(objects)), key=lambda i: centres[i], reverse=m[1] == "right")
        assert abs(centres[ranked[0]] - centres[ranked[1]]) >= 8  # one clear extreme
        return str(digits[ranked[0]])
    if m := re.fullmatch(r"what digit is to the (left|right) of the (\w+)\?", question):
        (i,) = [i for i, d in enumerate(digits) if d == CLASS_NAMES.index(m[2])]  # named digit: exactly once
        side = [j for j in range(len(objects)) if (centres[j] > centres[i]) == (m[1] == "right") and j != i]
        distance = sorted((abs(centres[j] - centres[i]), j) for j in side)
        assert len(distance) == 1 or distance[1][0] - distance[0][0] >= 8  # one clear nearest
        return str(digits[distance[0][1]])
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        (i,) = [i for i, d in enumerate(digits) if d == CLASS_NAMES.index(m[1])]
        return objects[i]["colour"]
    raise AssertionError(f"not a template: {question!r}")


def test_files_follow_vqas_format(data):
    root, summary, files, _ = data
    assert (summary["train"], summary["test"], summary["size"]) == (LIMIT, LIMIT, SIZE)
    assert summary["train_questions"] == summary["test_questions"] == QUESTIONS
    for split, first in (("train", 0), ("test", 3000)):  # canvas numbers: training first, then the held-out ones
        f = files[split]
        assert f["info"]["split"] == split and set(f) == {"info", "images", "questions"}
        assert [img["id"] for img in f["images"]] == list(range(first + 1, first + LIMIT + 1))
        for img in f["images"]:
            assert img["file_name"] == f"images/canvas_{img['id'] - 1:05d}.jpg"
            assert (root / "raw" / img["file_name"]).exists()
            assert (img["width"], img["height"]) == (SIZE, SIZE)
        per_image = Counter(q["image_id"] for q in f["questions"])
        assert set(per_image.values()) == {PER_CANVAS} and len(per_image) == LIMIT
        assert len({(q["image_id"], q["question"]) for q in f["questions"]}) == QUESTIONS  # none twice on a canvas
        assert len({q["question_id"] for q in f["questions"]}) == QUESTIONS
        for q in f["questions"]:
            assert q["question_id"] // 1000 == q["image_id"] and q["question_id"] % 1000 < PER_CANVAS
            assert q["question"] == q["question"].lower() and q["question"].endswith("?")
            assert q["answers"] == [{"answer": q["multiple_choice_answer"], "answer_id": i} for i in range(1, 11)]
            a = q["multiple_choice_answer"]
            assert " " not in a and q["answer_type"] == ("yes/no" if a in ("yes", "no") else
                                                          "number" if a.isdigit() else "other")  # fmt: skip
        assert {q["question_type"] for q in f["questions"]} == set(QUESTION_TYPES)


def test_every_answer_is_right_against_the_objects(data):
    _, _, files, _ = data
    for f in files.values():
        objects = {img["id"]: img["objects"] for img in f["images"]}
        for q in f["questions"]:
            assert _oracle(q["question"], objects[q["image_id"]]) == q["multiple_choice_answer"], q


def test_layout_sizes_colours_and_held_out_digit_images(data):
    root, _, files, _ = data
    digits8, labels, pools = _pools()
    counts, heights = Counter(), []
    for split, f in files.items():
        allowed = set(pools[split].tolist())
        for img in f["images"]:
            objects = img["objects"]
            counts[len(objects)] += 1
            image, again = question_canvas(img["id"] - 1, pools[split], digits8, labels, SIZE, 0)
            assert again == objects  # the stored objects are the rendered ones
            for o in objects:
                assert o["digit_image"] in allowed and labels[o["digit_image"]] == o["digit"]
                x, y, w, h = (int(v) for v in o["box"])
                assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
                heights.append(h)
                pixels = image[y : y + h, x : x + w].reshape(-1, 3).astype(int)
                near = np.abs(pixels - np.asarray(COLOURS[o["colour"]])).max(1) <= 40
                assert near.mean() > 0.12, (img["id"], o)  # its strokes are drawn in its colour
                others = [c for c in COLOURS.values() if c != COLOURS[o["colour"]]]
                assert all((np.abs(pixels - np.asarray(c)).max(1) <= 40).sum() < near.sum() for c in others)
            for i, a in enumerate(objects):
                for b in objects[:i]:
                    ax0, ay0, aw, ah = a["box"]
                    bx0, by0, bw, bh = b["box"]
                    assert ax0 + aw <= bx0 or bx0 + bw <= ax0 or ay0 + ah <= by0 or by0 + bh <= ay0  # no overlap
                    assert abs((ax0 + aw / 2) - (bx0 + bw / 2)) >= vqa.MIN_CENTRE_DX
    assert set(counts) == {1, 2, 3, 4}
    low, high = (round(s * SIZE / 128) for s in vqa.DIGIT_SIDES)  # 27-39 px squares at 96 px
    assert max(heights) <= high and min(heights) >= 0.6 * low and max(heights) > 0.85 * high


def test_deterministic_and_the_rebuild_stamp(data, tmp_path, monkeypatch):
    root = data[0]
    build_digit_questions(str(tmp_path / "a"), SIZE, limit=LIMIT, workers=2, quiet=True)  # worker processes
    for name in ("train.json", "test.json", "answers.json", "images/canvas_03005.jpg", "images/canvas_00007.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (root / "raw" / name).read_bytes(), name
    small = tmp_path / "small"
    build_digit_questions(str(small), SIZE, limit=3, quiet=True)  # fewer canvases: the same first ones
    first = json.loads((small / "test.json").read_text())
    assert first["questions"] == data[2]["test"]["questions"][: 3 * PER_CANVAS]
    path = small / "images" / "canvas_00000.jpg"
    kept = os.stat(path).st_mtime_ns
    summary = build_digit_questions(str(small), SIZE, limit=3, questions_per_canvas=7, quiet=True)
    assert os.stat(path).st_mtime_ns == kept and summary["train_questions"] == 21  # questions only: images kept
    monkeypatch.setattr(vqa, "STROKE_GAIN", 1.0)
    before = path.read_bytes()
    assert build_digit_questions(str(small), SIZE, limit=3, quiet=True)["stroke_gain"] == 1.0
    assert path.read_bytes() != before  # a rendering constant changed: drawn again


def test_questions_balanced_and_spread_over_many_canvases():
    digits8, labels, pools = _pools()
    answers, types, pairs = Counter(), Counter(), Counter()
    for n in range(400):
        _, objects = question_canvas(n, pools["train"], digits8, labels, 64, 0)
        asked = digit_questions(objects, _rng(0, 0, f"canvas{n}", "test"), PER_CANVAS)
        assert len(asked) == PER_CANVAS and all(_oracle(q["question"], objects) == q["answer"] for q in asked)
        types.update(q["question_type"] for q in asked)
        exist = [q["answer"] for q in asked if q["question_type"] == "exist"]
        answers.update(exist)
        if len(exist) == 2:
            pairs[tuple(sorted(exist))] += 1
        if len(objects) == 1:  # the fewest candidates: up to MAX_QUESTIONS_PER_CANVAS different questions
            many = digit_questions(objects, _rng(0, 0, f"canvas{n}", "many"), vqa.MAX_QUESTIONS_PER_CANVAS)
            assert len({q["question"] for q in many}) == vqa.MAX_QUESTIONS_PER_CANVAS
    assert 0.45 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.55, answers
    assert pairs and set(pairs) == {("no", "yes")}  # a canvas asked two exist questions gets one of each
    shares = {t: types[t] / sum(types.values()) for t in QUESTION_TYPES}
    assert all(0.13 < s < 0.27 for s in shares.values()), shares  # even, short of what a canvas can be asked


def test_vocabulary_from_the_training_split_only(data):
    root, _, files, manifest = data
    saved = json.loads((root / "raw" / "answers.json").read_text())
    counts = Counter(q["multiple_choice_answer"] for q in files["train"]["questions"])
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert saved["split"] == "train" and [(r["answer"], r["count"]) for r in saved["answers"]] == expected
    vocab = [a for a, _ in expected]
    assert answer_vocabulary(str(root / "raw" / "train.json")) == answer_vocabulary(files["train"]) == vocab
    assert manifest["answers"] == vocab and answer_vocabulary(files["test"]) != vocab
    assert answer_vocabulary(files["train"], min_count=3) == [a for a, c in expected if c >= 3]
    with pytest.raises(ValueError, match="min_count: expected a positive int, got 0"):
        answer_vocabulary(files["train"], min_count=0)


# --- answers ------------------------------------------------------------------------------------------------------


def test_soft_scores_and_accuracy_hand_cases():
    index = {"yes": 0, "no": 1, "2": 2, "red": 3}
    assert soft_scores(["yes"] * 10, index) == {0: 1.0}
    assert soft_scores(["yes", "yes", "no", "No.", "no", "two", "2", "blue", "blue", "blue"], index) == {
        0: 2 / 3, 1: 1.0, 2: 2 / 3}  # fmt: skip  # "blue" is not in the vocabulary: nothing
    assert soft_scores(["Red"], index) == {3: 1 / 3} and soft_scores([], index) == {}
    human = [["cat"] * 10, ["dog"] + ["cat"] * 9, ["dog"] * 2 + ["cat"] * 8, ["dog"] * 3 + ["cat"] * 7, ["dog"] * 10]
    acc = vqa_accuracy(["dog"] * 5, human)
    assert acc.dtype == torch.float32 and acc.shape == (5,)
    assert torch.allclose(acc, torch.tensor([0, 1 / 3, 2 / 3, 1, 1]))
    assert vqa_accuracy(["Two.", " 2 ", "three"], [["2"] * 10, ["two"] * 10, ["4"] * 10]).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="predictions: 1 answers for 2 questions"):
        vqa_accuracy(["a"], [["a"], ["b"]])


@pytest.mark.parametrize("raw, normal", [("Yes", "yes"), ("  no. ", "no"), ("Two", "2"), ("zero", "0"),
                                         ("ten.", "10"), ("two  dogs", "2 dogs"), ("colour", "colour"),
                                         ("color", "color"), ("twenty", "twenty"), ("3.", "3")])  # fmt: skip
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_report_per_type():
    answers = [["1"] * 10, ["yes"] * 10, ["no"] * 10, ["red"] * 10]
    report = vqa_report(["1", "yes", "yes", "blue"], answers, ["count", "exist", "exist", "colour"])
    assert report == {"accuracy": 0.5, "questions": 4, "per_type": {"count": 1.0, "exist": 0.5, "colour": 0.0},
                      "per_type_questions": {"count": 1, "exist": 2, "colour": 1}}  # fmt: skip
    assert list(vqa_report(["a"] * 3, [["a"]] * 3, ["what is", "exist", "colour"])["per_type"]) == [
        "exist", "colour", "what is"]  # fmt: skip  # QUESTION_TYPES' order, then others (real VQA's types)
    with pytest.raises(ValueError, match="question_types: 1 types for 4 questions"):
        vqa_report(["1"] * 4, answers, ["count"])
    with pytest.raises(ValueError, match="no questions"):
        vqa_report([], [], [])


# --- curation -----------------------------------------------------------------------------------------------------


def test_curation_shards_and_manifest(data):
    import hashlib

    root, _, files, manifest = data
    assert manifest["images"] == manifest["samples"] == LIMIT and manifest["questions"] == QUESTIONS
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 4]
    assert sum(s["questions"] for s in manifest["shards"]) == QUESTIONS and manifest["images_without_questions"] == 0
    assert manifest["question_types"] == list(QUESTION_TYPES)
    for s in manifest["shards"]:
        assert hashlib.sha256((root / "shards" / s["path"]).read_bytes()).hexdigest() == s["sha256"]
        assert (root / "shards" / s["path"].replace(".tar", ".idx")).exists() == HAS_DALI
    samples = _read_shard_samples(root / "shards")
    questions = {}
    for q in files["train"]["questions"]:
        questions.setdefault(q["image_id"], []).append(q)
    for k, img in enumerate(files["train"]["images"]):
        s = samples[f"{k:09d}"]
        meta = json.loads(s["json"])
        assert s["jpg"] == (root / "raw" / img["file_name"]).read_bytes()  # byte for byte
        assert {k: meta[k] for k in ("image_id", "file_name", "width", "height")} == {
            "image_id": img["id"], "file_name": img["file_name"], "width": SIZE, "height": SIZE}  # fmt: skip
        assert meta["questions"] == [{"question_id": q["question_id"], "question": q["question"],
                                      "question_type": q["question_type"], "answer_type": q["answer_type"],
                                      "multiple_choice_answer": q["multiple_choice_answer"],
                                      "answers": [a["answer"] for a in q["answers"]]}
                                     for q in questions[img["id"]]]  # fmt: skip


def test_every_curation_problem_is_named_in_one_error(data, tmp_path):
    root, _, files, _ = data
    f = json.loads(json.dumps(files["train"]))
    f["images"] = f["images"][:4]
    for img in f["images"]:
        img["file_name"] = str(root / "raw" / img["file_name"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    f["images"][1]["file_name"] = "nowhere/canvas.jpg"
    f["images"][2]["file_name"] = str(tmp_path / "broken.jpg")
    f["images"][3]["width"] = 100
    q = [dict(x) for x in f["questions"][:10]]
    q[0].pop("image_id")
    q[1]["image_id"] = 999
    q[2]["question_id"] = q[3]["question_id"]
    q[4]["question"] = "  "
    q[5]["answers"] = "yes"
    q[6]["answers"] = ["yes"] * 10
    q[7]["answers"] = q[7]["answers"] + [{"answer": "1", "answer_id": 11}]
    q[8]["question_type"] = 5
    q[9]["image_id"] = [1]  # not even hashable
    f["questions"] = q
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(f))
    with pytest.raises(ValueError) as e:
        curate_vqa(str(path), str(tmp_path / "out"), quiet=True)
    message = str(e.value)
    ids = [x["question_id"] for x in q]
    for pattern in (r"bad\.json: 12 problem\(s\), nothing written",
                    r"image 2: file nowhere/canvas\.jpg is missing; expected an image PIL decodes",
                    r"image 3: file .*broken\.jpg is unreadable",
                    r"image 4: file .*canvas_00003\.jpg is 96 x 96 pixels \(upright\), declared 100 x 96",
                    rf"question {ids[0]} \(image None\): no 'image_id'",
                    rf"question {ids[1]} \(image 999\): unknown image id 999; expected one of the 'images' ids",
                    rf"question {ids[3]} \(image 1\): duplicate question id",
                    rf"question {ids[4]} \(image \d+\): question '  ' is empty",
                    rf"question {ids[5]} \(image \d+\): answers 'yes'; expected a list of 1-10 objects",
                    rf"question {ids[6]} \(image \d+\): answers \['yes', 'yes'",
                    rf"question {ids[7]} \(image \d+\): answers \[\{{'answer'",
                    rf"question {ids[8]} \(image \d+\): 'question_type' 5 is not a string",
                    rf"question {ids[9]} \(image \[1\]\): unknown image id \[1\]"):  # fmt: skip
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"
    assert not (tmp_path / "out").exists()  # checked whole before anything is written
    with pytest.raises(ValueError, match="shard_size: expected a positive int"):
        curate_vqa(str(path), str(tmp_path / "out"), shard_size=0)
    with pytest.raises(FileNotFoundError, match="annotations: .* is not a file"):
        curate_vqa(str(tmp_path / "none.json"), str(tmp_path / "out"))


def test_curation_cli(data, tmp_path, capsys):
    root = data[0]
    args = ["curate", "--annotations", str(root / "raw" / "test.json"), "--out", str(tmp_path / "s"), "--quiet"]
    assert vqa.main(args + ["--shard-size", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"images": LIMIT, "questions": QUESTIONS, "images_without_questions": 0, "shards": 5,
                   "answers": len(answer_vocabulary(data[2]["test"]))}  # fmt: skip
    (tmp_path / "bad.json").write_text("{")
    assert vqa.main(["curate", "--annotations", str(tmp_path / "bad.json"), "--out", str(tmp_path / "t")]) == 1
    assert "florence.data.vqa: bad.json: invalid JSON" in capsys.readouterr().err


def test_builtin_variant_and_argument_errors(tmp_path, monkeypatch):
    from florence.data import builtin

    calls = []
    monkeypatch.setattr(vqa, "build_digit_questions", lambda *a, **k: calls.append((a, k)) or {"ok": 1})
    builtin.main(["--variant", "digit_questions", "--out", str(tmp_path)])
    builtin.main(["--variant", "digit_questions", "--out", str(tmp_path), "--size", "96", "--seed", "3"])
    assert [a[1:] for a, _ in calls] == [(128, 0.2, 0), (96, 0.2, 3)]
    monkeypatch.undo()
    for kwargs, message in (({"size": 32}, "size: expected an int >= 64, got 32"),
                            ({"test_fraction": 0}, r"test_fraction: expected a value in \(0, 1\)"),
                            ({"test_canvases": 0}, "test_canvases: expected an int >= 1, got 0"),
                            ({"questions_per_canvas": 19}, r"questions_per_canvas: expected an int in 1\.\.18"),
                            ({"workers": 0}, "workers: expected None or a positive int")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            build_digit_questions(str(tmp_path / "never"), **kwargs)
    assert not (tmp_path / "never").exists()


# --- the loader and the evaluation set ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_train(data):
    """The training canvases as an evaluation set at 64 px: the images every loader batch must show."""
    if missing("open_clip"):
        pytest.skip(f"optional package missing: {missing('open_clip')}")
    return load_vqa_eval_set(str(data[0] / "raw"), 64, annotations="train.json", backend="torch")


def _ids(batches):
    return [i for b in batches for i in b["question_ids"].tolist()]


@needs_tokenizer
def test_loader_batches_hold_the_questions_answers_and_images(data, eval_train):
    from florence.tokenizer import tokenize

    root, _, files, manifest = data
    loader = make_vqa_loader(str(root / "shards"), 8, 64, backend="torch", seed=1)
    assert len(loader) == QUESTIONS // 8
    by_id = {q["question_id"]: q for q in files["train"]["questions"]}
    row_of = {i: k for k, i in enumerate(eval_train["image_ids"].tolist())}
    batches = list(loader)
    assert sorted(_ids(batches)) == sorted(by_id)  # every question once per epoch
    b = batches[0]
    assert b["images"].shape[1:] == (3, 64, 64) and b["images"].dtype == torch.float32
    assert b["image_index"].shape == (8,) and b["image_index"].dtype == torch.int64
    assert b["tokens"].shape == (8, 32) and b["tokens"].dtype == torch.int64
    assert b["targets"].shape == (8, len(manifest["answers"])) and b["targets"].dtype == torch.float32
    assert b["question_ids"].dtype == torch.int64 and b["image_ids"].dtype == torch.int64
    for batch in batches:
        qs = [by_id[i] for i in batch["question_ids"].tolist()]
        assert torch.equal(batch["tokens"], tokenize([q["question"] for q in qs], 32))
        assert batch["question_types"] == [q["question_type"] for q in qs]
        assert batch["answers"] == [[a["answer"] for a in q["answers"]] for q in qs]
        assert batch["image_ids"].tolist() == [q["image_id"] for q in qs]
        hot = torch.zeros(len(qs), len(manifest["answers"]))
        hot[range(len(qs)), [manifest["answers"].index(q["multiple_choice_answer"]) for q in qs]] = 1
        assert torch.equal(batch["targets"], hot)  # ten equal answers: a score of 1 for that answer
        # each image once, in the order of its first question; question b's image is images[image_index[b]]
        ids = batch["image_ids"].tolist()
        unique = list(dict.fromkeys(ids))
        assert len(batch["images"]) == len(unique)
        assert batch["image_index"].tolist() == [unique.index(i) for i in ids]
        rows = [row_of[i] for i in unique]
        assert torch.equal(batch["images"], eval_train["images"][rows])  # resized only: no crop, flip or jitter
    # training order: the images permuted, each image's questions together (in their order)
    order = _ids(batches)
    per_image = {}
    for q in order:
        per_image.setdefault(by_id[q]["image_id"], []).append(q)
    starts = [order.index(qs[0]) for qs in per_image.values()]
    assert all(order[k : k + len(qs)] == qs for k, qs in zip(starts, per_image.values(), strict=True))
    assert list(per_image) != sorted(per_image)  # permuted
    assert sum(len(b["images"]) for b in batches) < len(order)  # images shared between a batch's questions
    # the question-only model's loader decodes nothing
    blind = list(make_vqa_loader(str(root / "shards"), 8, 64, backend="torch", seed=1, decode_images=False))
    assert all(b["images"] is None for b in blind) and _ids(blind) == order
    assert all(torch.equal(x["image_index"], y["image_index"]) for x, y in zip(blind, batches, strict=True))


@needs_tokenizer
def test_loader_epochs_resumption_and_ranks(data):
    shards = str(data[0] / "shards")
    loader = make_vqa_loader(shards, 8, 32, backend="torch", seed=3)
    a = list(loader)
    assert _ids(a) == _ids(make_vqa_loader(shards, 8, 32, backend="torch", seed=3))  # deterministic
    loader.set_epoch(1)
    c = list(loader)
    assert _ids(c) != _ids(a) and sorted(_ids(c)) == sorted(_ids(a))  # a new order, the same questions
    with pytest.raises(ValueError, match="start_batch: expected an int >= 0"):
        next(loader.iterate(-1))
    resumed = list(loader.iterate(start_batch=9))
    assert _ids(resumed) == _ids(c[9:]) and torch.equal(resumed[0]["images"], c[9]["images"])
    ranks = [list(make_vqa_loader(shards, 4, 32, backend="torch", seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [len(a)] * 2
    for x, y, z in zip(a, *ranks, strict=True):  # two ranks' batches of a step: one process's batch
        assert x["question_ids"].tolist() == y["question_ids"].tolist() + z["question_ids"].tolist()
        assert torch.equal(x["targets"], torch.cat([y["targets"], z["targets"]]))
    split = [make_vqa_loader(shards, 7, 32, backend="torch", rank=r, world_size=2, split="rank", drop_last=False)
             for r in (0, 1)]  # fmt: skip
    assert sorted(_ids([b for s in split for b in s])) == sorted(_ids(a))
    ordered = list(make_vqa_loader(shards, 7, 32, backend="torch", train=False, drop_last=False))
    assert len(ordered) == -(-QUESTIONS // 7)
    assert _ids(ordered) == [q["question_id"] for q in data[2]["train"]["questions"]]  # evaluation: the file's order


@needs_tokenizer
@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_torch_and_dali_give_the_same_batches(data, train):
    shards = str(data[0] / "shards")
    batches = [list(make_vqa_loader(shards, 16, 64, backend=be, seed=4, train=train)) for be in ("torch", "dali")]
    for p, d in zip(*batches, strict=True):
        assert p["question_ids"].tolist() == d["question_ids"].tolist() and p["answers"] == d["answers"]
        assert torch.equal(p["tokens"], d["tokens"]) and torch.equal(p["targets"], d["targets"])
        diff = (p["images"] - d["images"]).abs().max().item()
        assert diff == 0, f"torch vs DALI images: max difference {diff:.4f}, expected identical pixels"


@needs_tokenizer
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_set(data, eval_train, backend):
    from florence.tokenizer import tokenize

    root, _, files, _ = data
    ev = load_vqa_eval_set(str(root / "raw"), 64, backend=backend)
    test = files["test"]
    vocab = [r["answer"] for r in json.loads((root / "raw" / "answers.json").read_text())["answers"]]
    assert ev["images"].shape == (LIMIT, 3, 64, 64) and ev["images"].dtype == torch.float32
    assert ev["image_ids"].tolist() == [img["id"] for img in test["images"]] and ev["answer_vocab"] == vocab
    assert ev["image_index"].tolist() == [ev["image_ids"].tolist().index(q["image_id"]) for q in test["questions"]]
    assert ev["question_ids"].tolist() == [q["question_id"] for q in test["questions"]]
    assert ev["question_types"] == [q["question_type"] for q in test["questions"]]
    assert ev["answers"] == [[a["answer"] for a in q["answers"]] for q in test["questions"]]
    assert torch.equal(ev["tokens"], tokenize([q["question"] for q in test["questions"]], 32))
    assert ev["targets"].shape == (QUESTIONS, len(vocab)) and ev["targets"].dtype == torch.float32
    for row, q in zip(ev["targets"], test["questions"], strict=True):  # training answers only: a test answer
        a = q["multiple_choice_answer"]  # the training split never gave has no target
        assert row.tolist() == [float(v == a) for v in vocab]
    if backend == "dali":
        assert torch.equal(ev["images"], load_vqa_eval_set(str(root / "raw"), 64, backend="torch")["images"])
    other = load_vqa_eval_set(str(root / "raw"), 64, answer_vocab=["no", "yes"], backend=backend, context_length=16)
    assert other["tokens"].shape == (QUESTIONS, 16) and other["targets"].shape == (QUESTIONS, 2)
    with pytest.raises(ValueError, match="size: expected an int >= 8, got 4"):
        load_vqa_eval_set(str(root / "raw"), 4, backend=backend)


@needs_tokenizer
@pytest.mark.parametrize("batch_size, kwargs, message", [
    (4, {"context_length": 2}, "context_length: expected an int >= 3, got 2"),
    (0, {}, "batch_size: expected an int >= 1, got 0"),  # the rest: make_detection_loader's checks
    (4, {"rank": 2, "world_size": 2}, "rank: expected 0 <= rank < world_size = 2, got 2"),
    (4, {"backend": "pil"}, "backend: expected 'auto', 'torch' or 'dali', got 'pil'"),
    (4, {"split": "interleave"}, "split: expected 'global_batch' or 'rank'")])  # fmt: skip
def test_bad_loader_arguments(data, batch_size, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_vqa_loader(str(data[0] / "shards"), batch_size, 64, **kwargs)


# --- make demo's coloured copies (pretraining digits drawn as the canvases draw them) -----------------------------


def test_colour_copy_draws_the_digit_in_its_colour_at_the_asked_scale():
    digits8, labels, _ = _pools()
    sides = []
    for n in range(40):
        image, colour = vqa.colour_copy(_rng(0, 0, f"t{n}", "copy"), digits8[n], 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and colour in COLOURS
        near = np.abs(image.astype(int) - np.asarray(COLOURS[colour])).max(-1) <= 40
        rows, cols = np.flatnonzero(near.any(1)), np.flatnonzero(near.any(0))
        assert near.sum() > 60  # its strokes are drawn in its colour
        sides.append(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
        again, colour2 = vqa.colour_copy(_rng(0, 0, f"t{n}", "copy"), digits8[n], 64)
        assert colour2 == colour and np.array_equal(again, image)  # deterministic for its generator
    # the ink spans most of the square's side (sklearn's glyphs fill their height): 40-64 px squares
    assert 0.55 * 64 <= np.median(sides) <= 64 and min(sides) >= 0.4 * 64
    tiny, _ = vqa.colour_copy(np.random.default_rng(0), digits8[0], 8, (0.1, 0.1))  # a 4-px digit, the least drawn
    assert tiny.shape == (8, 8, 3)
    for kwargs, message in (({"digit8": digits8[0][:4]}, r"digit8: expected a uint8 \(8, 8\) array"),
                            ({"size": 4}, "size: expected an int >= 8"),
                            ({"sides": (0.0, 1.0)}, r"sides: expected \(low, high\) with 0 < low")):  # fmt: skip
        args = {"digit8": digits8[0], "size": 64, **kwargs}
        with pytest.raises(ValueError, match=message):
            vqa.colour_copy(np.random.default_rng(0), **args)


def test_build_digits_with_colour_copies(tmp_path):
    from PIL import Image

    from florence.data import builtin

    plain = builtin.build_digits(str(tmp_path / "plain"), size=32)
    summary = builtin.build_digits(str(tmp_path / "copies"), size=32, colour_copies=2)
    n = summary["train"]
    assert plain["train_images"] == n and summary["train_images"] == 3 * n and summary["colour_copies"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "copies" / "train.jsonl")]
    assert rows[:n] == [json.loads(line) for line in open(tmp_path / "plain" / "train.jsonl")]  # the plain ones first
    assert open(tmp_path / "copies" / "test.jsonl").read() == open(tmp_path / "plain" / "test.jsonl").read()
    copies = rows[n:]
    twice = Counter(r["label"] for r in rows[:n] for _ in range(2))
    assert len({r["image"] for r in copies}) == 2 * n and Counter(r["label"] for r in copies) == twice  # no held-out
    for r in copies[:: max(1, len(copies) // 20)]:
        assert r["captions"][-2:] == [f"a {r['colour']} handwritten {CLASS_NAMES[r['label']]}",
                                      f"the number {r['label']} in {r['colour']}"]  # fmt: skip
        image = np.asarray(Image.open(tmp_path / "copies" / r["image"]))
        assert image.shape == (32, 32, 3)
    again = builtin.build_digits(str(tmp_path / "again"), size=32, colour_copies=2)
    same = open(tmp_path / "again" / "train.jsonl").read() == open(tmp_path / "copies" / "train.jsonl").read()
    assert again == summary and same  # deterministic
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="colour_copies: expected an int >= 0"):
            builtin.build_digits(str(tmp_path / "never"), size=32, colour_copies=bad)
    with pytest.raises(SystemExit):
        builtin.main(["--variant", "moving_digits", "--out", str(tmp_path / "never"), "--colour-copies", "1"])
    builtin.main(["--out", str(tmp_path / "cli"), "--size", "32", "--colour-copies", "1"])
    assert json.load(open(tmp_path / "cli" / "classes.json"))["train_images"] == 2 * n
