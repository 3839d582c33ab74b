"""florence.data.curate on a small dataset built here with every kind of bad and repeated input: the counts, label
assignment and augmentation are exactly right; a run killed mid-way and started again writes the same bytes as
an uninterrupted run; the built-in digits dataset goes through the same command."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from florence.data import curate
from tests.conftest import requires

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _noise_image(path, seed, size=64, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).resize((size, size), Image.NEAREST).save(path, format=fmt, quality=95)


def build_messy_dataset(root) -> str:
    """10 good images (2 of them PNG) plus one of each problem; returns the JSONL path."""
    img = os.path.join(root, "img")
    os.makedirs(img)
    for i in range(10):
        _noise_image(os.path.join(img, f"good{i}.{'png' if i >= 8 else 'jpg'}"), i, fmt="PNG" if i >= 8 else "JPEG")
    shutil.copy(os.path.join(img, "good0.jpg"), os.path.join(img, "dup_of_0.jpg"))  # exact duplicate
    arr = np.asarray(Image.open(os.path.join(img, "good1.jpg"))).astype(np.int16)
    Image.fromarray(np.clip(arr + 2, 0, 255).astype(np.uint8)).save(os.path.join(img, "near_1.jpg"), quality=80)
    _noise_image(os.path.join(img, "tiny.jpg"), 99, size=16)  # too small
    with open(os.path.join(img, "garbage.jpg"), "wb") as f:  # not an image
        f.write(random.Random(0).randbytes(500))  # fixed garbage: the same input every run
    data = open(os.path.join(img, "good2.jpg"), "rb").read()
    with open(os.path.join(img, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(os.path.join(img, "grey.ppm"))  # unsupported format
    long_caption = " ".join(["word"] * 200)
    lines = [
        {"image": "img/good0.jpg", "caption": "a red square"},
        {"image": "img/good1.jpg", "captions": ["A red square.", "a photo of a dog on the grass"]},
        {"image": "img/good2.jpg", "captions": ["cat", "  ", "a photo of a dog on the grass"]},
        {"image": "img/good3.jpg", "caption": "cat"},
        {"image": "img/good4.jpg", "caption": "two dogs\tplaying   in the  snow"},
        {"image": "img/good5.jpg", "caption": long_caption},
        {"image": "img/good6.jpg", "caption": "ｆｕｌｌ width text here now"},  # NFKC -> "full width text here now"
        {"image": "img/good7.jpg", "caption": "a blue circle on white"},
        {"image": "img/good8.png", "caption": "a green triangle"},
        {"image": "img/good9.png", "caption": "a green triangle"},
        {"image": "img/dup_of_0.jpg", "caption": "something else entirely here"},
        {"image": "img/near_1.jpg", "caption": "near copy of one"},
        {"image": "img/tiny.jpg", "caption": "a tiny picture of things"},
        {"image": "img/garbage.jpg", "caption": "noise bytes in a file"},
        {"image": "img/truncated.jpg", "caption": "half of a jpeg file"},
        {"image": "img/grey.ppm", "caption": "a grey ppm image file"},
        {"image": "img/missing.jpg", "caption": "this file does not exist"},
        {"image": "img/good3.jpg", "caption": "   "},  # empty caption (counted before the duplicate check)
    ]
    path = os.path.join(root, "pairs.jsonl")
    with open(path, "w") as f:
        for obj in lines:
            f.write(json.dumps(obj) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"caption": "no image"}) + "\n")
    return path


def _run(jsonl, out, *extra):
    return curate.main(["--input", jsonl, "--out", str(out), "--min-size", "32", "--shard-size", "3", "--workers",
                        "2", "--quiet", *extra])  # fmt: skip


def _samples(out):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    metas = []
    for sh in manifest["shards"]:
        with tarfile.open(os.path.join(out, sh["path"])) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    return manifest, metas


@requires("open_clip")
def test_counts_labels_and_augmentation_are_exact(tmp_path):
    jsonl = build_messy_dataset(tmp_path)
    assert _run(jsonl, tmp_path / "out") == 0
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["removed"] == {"bad_record": 2, "empty_caption": 1, "corrupt": 4, "too_small": 1, "duplicate": 1,
                                "near_duplicate": 1}  # fmt: skip
    assert stats["corrupt_reasons"] == {
        "undecodable (UnidentifiedImageError)": 1,
        "truncated": 1,
        "unsupported format PPM": 1,
        "unreadable file (FileNotFoundError)": 1,
    }
    assert stats["inputs"] == 20 and stats["images"] == 10 == stats["inputs"] - sum(stats["removed"].values())
    assert stats["pairs"] == 12 and stats["empty_captions_dropped"] == 1 and stats["truncated_captions"] == 1
    # texts: red square (x2, one casefolded + trailing '.'), dog on grass (x2), cat (x2), snow, long, full width,
    # blue circle, green triangle (x2)
    assert stats["unique_texts"] == 8
    # augmented (at most 3 words): both red squares, both cats, both green triangles
    assert stats["pairs_sharing_a_text"] == 8 and stats["augmented_pairs"] == 6
    manifest, metas = _samples(tmp_path / "out")
    assert [m["key"] for m in metas] == [f"{i:09d}" for i in range(10)]
    assert manifest["samples"] == 10 and manifest["pairs"] == 12 and len(manifest["shards"]) == 4
    by_src = {m["source"]: m for m in metas}
    red0, red1 = by_src["pairs.jsonl:1"], by_src["pairs.jsonl:2"]
    assert red0["labels"][0] == red1["labels"][0] == 0 and red1["augmented"] == [True, False]
    assert red1["captions"][0] in [p.format("A red square") for p in curate.PROMPTS]
    dog_a, dog_b = red1["labels"][1], by_src["pairs.jsonl:3"]["labels"][1]
    assert dog_a == dog_b == 1
    cat2, cat3 = by_src["pairs.jsonl:3"], by_src["pairs.jsonl:4"]
    assert cat2["augmented"] == [True, False] and cat3["augmented"] == [True]
    assert cat2["labels"][0] == cat3["labels"][0] == 2  # augmented texts keep the label of their bare text
    assert cat2["captions"][0] in [p.format("cat") for p in curate.PROMPTS]
    assert by_src["pairs.jsonl:5"]["captions"] == ["two dogs playing in the snow"]
    assert by_src["pairs.jsonl:7"]["captions"] == ["full width text here now"]
    long = by_src["pairs.jsonl:6"]["captions"][0]
    assert long.startswith("word word") and len(long.split()) < 200
    labels = json.load(open(tmp_path / "out" / "labels.json"))
    assert labels[:3] == ["a red square", "a photo of a dog on the grass", "cat"]
    with tarfile.open(tmp_path / "out" / manifest["shards"][2]["path"]) as tar:  # PNG inputs stored as JPEG
        names = tar.getnames()
        assert Image.open(tar.extractfile(names[-2])).format == "JPEG"
    for f in ("summary.txt", "caption_lengths.png", "positives_per_label.png"):
        assert os.path.getsize(tmp_path / "out" / f) > 0


@requires("open_clip")
def test_folder_and_csv_inputs(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _noise_image(str(folder / "a.jpg"), 1)
    (folder / "a.txt").write_text("first caption\nsecond caption\n")
    _noise_image(str(folder / "b.png"), 2, fmt="PNG")  # no .txt: no caption
    _noise_image(str(tmp_path / "c.jpg"), 3)
    (tmp_path / "pairs.csv").write_text("image,caption,caption_extra\nc.jpg,a caption from csv,another one here\n")
    curate.main(["--input", str(folder), str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "out"), "--quiet"])
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert (stats["images"], stats["pairs"], stats["removed"]["empty_caption"]) == (2, 4, 1)


@requires("open_clip")
def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    jsonl = build_messy_dataset(tmp_path)
    full = tmp_path / "full"
    assert _run(jsonl, full) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "florence.data.curate", "--input", jsonl, "--out", str(out), "--min-size", "32",
           "--shard-size", "3", "--workers", "1", "--quiet"]  # fmt: skip
    env = dict(os.environ, FLORENCE_CURATE_SHARD_DELAY="1.5", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "shard-00000.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "shard-00000.tar").exists() and not (out / "manifest.json").exists()
    assert not (out / "shard-00003.tar").exists()
    assert _run(jsonl, out) == 0
    a, b = json.load(open(full / "manifest.json")), json.load(open(out / "manifest.json"))
    assert a["shards"] == b["shards"]
    for sh in a["shards"]:
        assert (full / sh["path"]).read_bytes() == (out / sh["path"]).read_bytes()
    assert json.load(open(full / "stats.json")) == json.load(open(out / "stats.json"))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@requires("open_clip")
def test_builtin_digits_through_curation(tmp_path):
    from florence.data import builtin

    summary = builtin.build_digits(str(tmp_path / "digits"), size=32, test_fraction=0.2, seed=0)
    assert summary["train"] + summary["test"] == 1797 and summary["test"] == pytest.approx(359, abs=5)
    curate.main(["--input", str(tmp_path / "digits" / "train.jsonl"), "--out", str(tmp_path / "cur"),
                 "--min-size", "16", "--near-dup-threshold", "-1", "--quiet"])  # fmt: skip
    stats = json.load(open(tmp_path / "cur" / "stats.json"))
    n = summary["train"]
    assert stats["images"] == n and stats["pairs"] == 5 * n
    assert stats["unique_texts"] == 50  # 5 caption styles x 10 classes
    assert stats["augmented_pairs"] == 2 * n  # the bare word and the bare numeral
    assert stats["pairs_sharing_a_text"] == 5 * n


def test_near_duplicate_index_matches_brute_force():
    rng = np.random.default_rng(0)
    hashes = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    hashes += [h ^ (1 << int(b)) ^ (1 << int(c)) for h, b, c in zip(hashes[:50], rng.integers(0, 64, 50),
                                                                     rng.integers(0, 64, 50), strict=True)]  # fmt: skip
    for t in (0, 2, 4, 9):
        idx = curate.NearDuplicateIndex(t)
        kept = []
        for h in hashes:
            brute = next((i for i, k in enumerate(kept) if bin(h ^ k).count("1") <= t), None)
            found = idx.find(h)
            assert (found is None) == (brute is None)
            if found is None:
                idx.add(h, len(kept))
                kept.append(h)


# --- captions cut to the token limit -------------------------------------------------------------------------------

URL = "https://example.com/" + "/".join(f"section-{i}/page_{i * 7}" for i in range(60)) + "?q=florence&lang=en"
LONG_WORD = "antidisestablishmentarianism" * 12


def _count():
    from florence.tokenizer import get_tokenizer

    tok = get_tokenizer()
    return lambda text: len(tok.encode(text))


@requires("open_clip")
def test_fit_tokens_cuts_inside_a_word_when_no_word_boundary_fits():
    count = _count()
    assert count(URL) == 646 and count(LONG_WORD + " is a word") == 97
    # the longest prefix of characters that fits: 75 tokens, one more character would not
    assert curate.fit_tokens(URL, 75, count) == (URL[:161], True)
    assert count(URL[:161]) == 75 and count(URL[:162]) == 76
    assert curate.fit_tokens(LONG_WORD + " is a word", 75, count) == (LONG_WORD[:264], True)
    assert count(LONG_WORD[:264]) == 75 and count(LONG_WORD[:265]) == 76
    # a word boundary that fits is still where the cut goes
    assert curate.fit_tokens("a " + LONG_WORD, 75, count) == ("a", True)
    assert curate.fit_tokens(" ".join(["word"] * 200), 75, count) == (" ".join(["word"] * 75), True)
    assert curate.fit_tokens("short text", 75, count) == ("short text", False)
    # with a prompt around the cut: the prompt and the cut fit together
    cut, was_cut = curate.fit_tokens(URL, 75, count, wrap="a photo of {}.".format)
    assert was_cut and URL.startswith(cut)
    assert count(f"a photo of {cut}.") <= 75 < count(f"a photo of {URL[: len(cut) + 1]}.")


def _prompt_inner(text):
    """(prompt, the caption inside it) of an augmented caption."""
    for p in curate.PROMPTS:
        pre, post = p.split("{}")
        if text.startswith(pre) and text.endswith(post) and len(text) >= len(pre) + len(post):
            yield p, text[len(pre) : len(text) - len(post)]


@requires("open_clip")
def test_every_stored_caption_fits_the_token_limit(tmp_path):
    for i in range(4):
        _noise_image(str(tmp_path / f"{i}.jpg"), 200 + i)
    long_words = " ".join(["word"] * 200)
    rows = [("0.jpg", URL), ("1.jpg", LONG_WORD + " is a word"), ("2.jpg", long_words), ("3.jpg", "a red square")]
    with open(tmp_path / "pairs.jsonl", "w", encoding="utf-8") as f:
        for image, caption in rows:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
    assert _run(str(tmp_path / "pairs.jsonl"), tmp_path / "out") == 0
    count = _count()
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["images"] == 4 and stats["truncated_captions"] == 3
    labels = json.load(open(tmp_path / "out" / "labels.json"))
    assert labels == [URL[:161], LONG_WORD[:264], " ".join(["word"] * 75), "a red square"]  # the bare cuts
    _, metas = _samples(tmp_path / "out")
    by_src = {m["source"]: m for m in metas}
    for n, bare in ((1, URL[:161]), (2, LONG_WORD[:264])):  # one word each: prompt-augmented
        meta = by_src[f"pairs.jsonl:{n}"]
        assert meta["augmented"] == [True] and meta["labels"] == [n - 1]
        ((prompt, inner),) = [(p, x) for p, x in _prompt_inner(meta["captions"][0]) if bare.startswith(x)]
        # the caption inside the prompt: the longest prefix of the bare cut for which the prompt fits
        assert len(inner) > 140 and count(prompt.format(inner)) <= 75 < count(prompt.format(bare[: len(inner) + 1]))
    assert by_src["pairs.jsonl:3"]["captions"] == [" ".join(["word"] * 75)]
    for m in metas:
        for caption in m["captions"]:
            assert count(caption) <= 75, caption
    assert stats["tokens"] == sum(count(c) for m in metas for c in m["captions"])


@requires("open_clip")
def test_a_prompt_that_cannot_fit_leaves_the_caption_bare(tmp_path):
    _noise_image(str(tmp_path / "0.jpg"), 300)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "0.jpg", "caption": "cat"}) + "\n")
    assert _run(str(tmp_path / "pairs.jsonl"), tmp_path / "out", "--max-tokens", "4") == 0  # a prompt + "cat": 5+
    _, (meta,) = _samples(tmp_path / "out")
    assert meta["captions"] == ["cat"] and meta["augmented"] == [False]


# --- the locale -------------------------------------------------------------------------------------------------


def _locale_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LC_") and k not in ("LANG", "LANGUAGE", "PYTHONUTF8", "PYTHONIOENCODING",
                                                    "PYTHONCOERCECLOCALE")}  # fmt: skip
    return dict(env, PYTHONPATH=ROOT, **extra)


@requires("open_clip")
def test_outputs_do_not_depend_on_the_locale(tmp_path):
    inputs = tmp_path / "inputs"
    folder = inputs / "dossier_é"
    folder.mkdir(parents=True)
    _noise_image(str(folder / "café_ünïcode.jpg"), 401)
    (folder / "café_ünïcode.txt").write_text("un café, s'il vous plaît\n", encoding="utf-8")
    _noise_image(str(folder / "日本.png"), 402, fmt="PNG")
    (folder / "日本.txt").write_text("富士山の写真です\n", encoding="utf-8")
    not_utf8 = os.path.join(os.fsencode(folder), b"latin1_\xe9")  # a name that is not UTF-8
    with open(not_utf8 + b".jpg", "wb") as f:
        _noise_image(f, 403)
    with open(not_utf8 + b".txt", "wb") as f:
        f.write(b"a file named in latin-1\n")
    (inputs / "imágenes").mkdir()
    _noise_image(str(inputs / "imágenes" / "ñandú.jpg"), 404)
    _noise_image(str(inputs / "imágenes" / "zoë.jpg"), 405)
    (inputs / "paires_é.jsonl").write_text(
        json.dumps({"image": "imágenes/ñandú.jpg", "caption": "un ñandú en el campo"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    (inputs / "données.csv").write_text("image,caption\nimágenes/zoë.jpg,zoë à la plage cet été\n", encoding="utf-8")
    c_env = _locale_env(LC_ALL="C", PYTHONUTF8="0")
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"], env=c_env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert probe.stdout.strip() == "ascii"  # the case of the report: file names decoded as ASCII + surrogates
    procs = {}
    for name, env in (("c", c_env), ("utf8", _locale_env(LC_ALL="C.UTF-8", PYTHONUTF8="1"))):
        cwd = tmp_path / name
        cwd.mkdir()
        os.symlink(inputs, cwd / "in")  # the same relative arguments in both runs
        cmd = [sys.executable, "-m", "florence.data.curate", "--input", "in/dossier_é", "in/paires_é.jsonl",
               "in/données.csv", "--out", "out", "--workers", "1", "--quiet"]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err.decode(errors="replace")[-3000:])
    a, b = tmp_path / "c" / "out", tmp_path / "utf8" / "out"
    manifest = json.load(open(b / "manifest.json", encoding="utf-8"))
    assert manifest["args"]["input"] == ["in/dossier_é", "in/paires_é.jsonl", "in/données.csv"]
    names = ["manifest.json", "labels.json", "stats.json", "summary.txt"]
    names += [n for sh in manifest["shards"] for n in (sh["path"], sh["path"][:-4] + ".idx") if os.path.exists(b / n)]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    _, metas = _samples(b)
    assert [m["source"] for m in metas] == ["café_ünïcode.jpg", "latin1_\\xe9.jpg", "日本.png", "paires_é.jsonl:1",
                                            "données.csv:2"]  # fmt: skip
    assert [m["captions"] for m in metas][0] == ["un café, s'il vous plaît"]
