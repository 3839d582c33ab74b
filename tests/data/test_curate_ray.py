"""florence.data.curate's Ray engine (florence.data.curate_ray) against the local engine: on a messy set read from
JSONL, CSV, a folder and Parquet (every filter fires), ``--engine ray`` with 1, 2 and 4 workers writes the local
engine's bytes; a worker killed mid-run (Ray runs its task again) and a whole run killed and started again end in
the same bytes; the duplicate resolution equals the local one on random hash clusters (no Ray needed); Parquet
input and its bad inputs; read units split JSONL exactly."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from florence.data import curate
from tests.conftest import requires
from tests.data.test_curate import _noise_image, build_messy_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUTS_EXCEPT_MANIFEST = ("labels.json", "stats.json", "summary.txt", "caption_lengths.png", "positives_per_label.png")


def _write_parquet(path, columns, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def build_mixed_inputs(root) -> list[str]:
    """build_messy_dataset's JSONL, plus a CSV, a folder (one file name not UTF-8) and a Parquet file of two row
    groups (a null image, a list column of captions, a caption shared with the JSONL, a duplicate of a JSONL
    image): the inputs, in order."""
    jsonl = build_messy_dataset(root)
    img = os.path.join(root, "img")
    for i in range(10, 16):
        _noise_image(os.path.join(img, f"good{i}.jpg"), i)
    shutil.copy(os.path.join(img, "good3.jpg"), os.path.join(img, "dup_of_3.jpg"))
    with open(os.path.join(root, "pairs.csv"), "w") as f:
        f.write("image,caption,caption_2\nimg/good10.jpg,a caption from csv,cat\nimg/dup_of_3.jpg,copy,\n,no image,\n")
    folder = os.path.join(root, "folder")
    os.makedirs(folder)
    _noise_image(os.path.join(folder, "f1.jpg"), 21)
    with open(os.path.join(folder, "f1.txt"), "w") as f:
        f.write("a folder caption\n\na green triangle\n")
    _noise_image(os.path.join(folder, "f2.png"), 22, fmt="PNG")  # no .txt: empty caption
    latin1 = os.fsdecode(os.path.join(os.fsencode(folder), b"latin1_\xe9"))  # a name that is not UTF-8
    _noise_image(latin1 + ".jpg", 23)
    with open(latin1 + ".txt", "w") as f:
        f.write("a file name in latin-1\n")
    parquet = os.path.join(root, "crawl.parquet")
    _write_parquet(parquet, {
        "image": ["img/good11.jpg", None, "img/good12.jpg", "img/good13.jpg", "img/good1.jpg", "img/good14.jpg"],
        "caption": ["a red square", "lost", None, "cat", "again the first", "a parquet caption"],
        "captions": [["two", "more"], None, ["only in the list"], [], None, ["", "x y z w v"]],
    }, row_group_size=4)  # fmt: skip
    return [jsonl, os.path.join(root, "pairs.csv"), folder, parquet]


def _run(inputs, out, *extra) -> int:
    return curate.main(["--input", *inputs, "--out", str(out), "--min-size", "32", "--shard-size", "3", "--quiet",
                        *extra])  # fmt: skip


def assert_same_outputs(a, b, paths_as_given=("out",)):
    """Every output of two curation runs byte for byte (the manifest apart from its path arguments as given)."""
    ma, mb = json.load(open(os.path.join(a, "manifest.json"))), json.load(open(os.path.join(b, "manifest.json")))
    for name in paths_as_given:
        ma["args"].pop(name), mb["args"].pop(name)
    assert ma == mb
    names = [n for n in os.listdir(a) if n.startswith("shard-")]
    assert sorted(names) == sorted(n for n in os.listdir(b) if n.startswith("shard-"))
    assert len(names) == 2 * len(ma["shards"])  # the .idx files (DALI is installed in CI's first environment)
    for name in [*names, *OUTPUTS_EXCEPT_MANIFEST]:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    assert not [n for n in os.listdir(b) if n.startswith(".tmp-")]


# --- without Ray ----------------------------------------------------------------------------------------------------


def test_duplicate_resolution_by_components_equals_the_local_order():
    """The Ray engine's stage 2 (buckets per dHash band, pairs within a bucket, components, Deduplicator per
    component) removes exactly the records the local engine's single pass removes, reasons included: random
    hashes in tight clusters (chains where A~B and B~C but not A~C), exact copies, thresholds -1..6."""
    pa = pytest.importorskip("pyarrow")
    from florence.data import curate_ray

    rng = random.Random(0)
    seen = set()
    for trial in range(30):
        threshold = rng.choice([-1, 0, 1, 2, 4, 6])
        hashes, shas = [], []
        centres = [rng.getrandbits(64) for _ in range(rng.randint(1, 6))]
        for _ in range(rng.randint(1, 60)):
            h = rng.choice(centres)
            for _ in range(rng.choice([0, 0, 1, 2, 3, 5, 8])):
                h ^= 1 << rng.randrange(64)
            copy = rng.random() < 0.2 and bool(hashes)
            hashes.append(hashes[-1] if copy else h)
            shas.append(shas[-1] if copy else f"sha{len(shas)}")
        local = curate.Deduplicator(threshold)
        expected = {i: v for i, (s, h) in enumerate(zip(shas, hashes, strict=True)) if (v := local.check(s, h))}
        rows = pa.table({"order": list(range(len(hashes))), "bad": [None] * len(hashes), "ncaps": [1] * len(hashes),
                         "ok": [True] * len(hashes), "reason": [None] * len(hashes), "w": [64] * len(hashes),
                         "h": [64] * len(hashes), "sha": shas,
                         "phash": pa.array(hashes, pa.uint64())})  # fmt: skip
        table = curate_ray._buckets(rows, min_size=32, threshold=threshold)
        buckets = table.to_pylist()
        pairs = []
        for key in sorted({b["bucket"] for b in buckets}):
            group = pa.Table.from_pylist([b for b in buckets if b["bucket"] == key], schema=table.schema)
            pairs += curate_ray._pairs(group, threshold=threshold).to_pylist()
        assert curate_ray.resolve_duplicates(pairs, threshold) == expected, (trial, threshold)
        seen.update(expected.values())
    assert seen == {"duplicate", "near_duplicate"}


def test_jsonl_units_read_the_same_records_as_the_whole_file(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"image": f"i{i}.jpg", "caption": f"c {i}"}) for i in range(7)]
    lines[2], lines[4] = "", "{bad"
    path.write_bytes(("\n".join(lines)).encode() + b"\n\r\n" + json.dumps({"image": "last.jpg"}).encode())  # no \n
    whole = curate.read_inputs([str(path)])
    assert [r["source"] for r in whole][-1] == "p.jsonl:9" and len(whole) == 7
    for rows in range(1, 11):
        units = curate.plan_inputs([str(path)], rows)
        assert [r for u in units for r in curate.read_unit(u)] == whole, rows
        assert all(json.loads(json.dumps(u)) == u for u in units)  # units travel as JSON


def test_folder_and_parquet_units_cover_every_record(tmp_path):
    pytest.importorskip("pyarrow")
    inputs = build_mixed_inputs(tmp_path)[2:]
    whole = curate.read_inputs(inputs)
    for rows in (1, 2, 5):
        units = curate.plan_inputs(inputs, rows)
        assert [r for u in units for r in curate.read_unit(u)] == whole
    assert [u["groups"] for u in curate.plan_inputs(inputs, 1) if u["kind"] == "parquet"] == [[0], [1]]


@requires("open_clip")
@requires("pyarrow")
def test_parquet_input_equals_the_same_pairs_in_jsonl(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for i in range(4):
        _noise_image(str(img / f"{i}.jpg"), i)
    rows = [("img/0.jpg", ["a cat"]), ("img/1.jpg", ["two dogs on a sofa", "a dog"]), ("img/2.jpg", ["a cat"]),
            ("img/3.jpg", ["   "])]  # fmt: skip
    _write_parquet(tmp_path / "p.parquet", {"image": [r[0] for r in rows], "captions": [r[1] for r in rows]},
                   row_group_size=3)  # fmt: skip
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps({"image": r[0], "captions": r[1]}) + "\n" for r in rows)
    assert _run([str(tmp_path / "p.parquet")], tmp_path / "a") == 0
    assert _run([str(tmp_path / "p.jsonl")], tmp_path / "b") == 0
    for name in ("labels.json", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stats = json.load(open(tmp_path / "a" / "stats.json"))
    assert (stats["images"], stats["pairs"], stats["removed"]["empty_caption"]) == (3, 4, 1)
    with open(tmp_path / "a" / "manifest.json") as f:
        assert json.load(f)["samples"] == 3


@requires("open_clip")
@requires("pyarrow")
def test_bad_parquet_inputs_name_the_file_and_the_column(tmp_path, capsys):
    _write_parquet(tmp_path / "nocol.parquet", {"url": ["http://x/1.jpg"], "caption": ["a cat"]})
    (tmp_path / "garbage.parquet").write_bytes(random.Random(0).randbytes(300))  # fixed garbage, every run the same
    _write_parquet(tmp_path / "ints.parquet", {"image": [1, 2], "caption": ["a", "b"]})
    for name, words in (("nocol.parquet", ["no 'image' column", "url, caption"]),
                        ("garbage.parquet", ["not a readable Parquet file"]),
                        ("ints.parquet", ["column 'image' has type int64", "expected strings"])):  # fmt: skip
        assert _run([str(tmp_path / name)], tmp_path / f"out-{name}") == 2
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and all(w in err for w in words), err
        for engine in ("local", "ray"):  # planning checks the files before any work starts
            with pytest.raises(curate.InputError, match="Parquet|image"):
                curate.plan_inputs([str(tmp_path / name)], None if engine == "local" else 10)


def test_engine_arguments_are_checked(capsys):
    cases = ((["--ray-address", "h:6379"], "belong to --engine ray"),
             (["--engine", "ray", "--num-workers", "0"], "--num-workers: expected a positive number"),
             (["--engine", "ray", "--unit-rows", "0"], "--unit-rows: expected a positive number"))  # fmt: skip
    for argv, words in cases:
        with pytest.raises(SystemExit):
            curate.main(["--input", "x.jsonl", "--out", "/nonexistent/out", *argv])
        assert words in capsys.readouterr().err


# --- with Ray -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed inputs and the local engine's outputs for them."""
    from florence.optional import missing

    if missing("open_clip") or missing("pyarrow"):
        pytest.skip("open_clip and pyarrow are needed")
    root = tmp_path_factory.mktemp("mixed")
    inputs = build_mixed_inputs(root)
    assert _run(inputs, root / "local", "--workers", "2") == 0
    stats = json.load(open(root / "local" / "stats.json"))
    assert all(stats["removed"][k] > 0 for k in curate.REMOVED_KEYS), stats["removed"]  # every filter fires
    return inputs, root


@requires("ray")
def test_ray_engine_with_one_worker_writes_the_local_bytes(mixed, tmp_path, capsys):
    inputs, root = mixed
    argv = [
        "--input",
        *inputs,
        "--out",
        str(tmp_path / "ray"),
        "--min-size",
        "32",
        "--shard-size",
        "3",
        "--engine",
        "ray",
        "--num-workers",
        "1",
        "--unit-rows",
        "4",
    ]  # fmt: skip (not quiet: the progress lines)
    assert curate.main(argv) == 0
    assert_same_outputs(root / "local", tmp_path / "ray")
    err = capsys.readouterr().err
    stages = ["read + decode + hash", "duplicates", "select", "labels", "shards"]
    assert all(f"stage {k}/5: {name}" in err for k, name in enumerate(stages, 1)), err
    shards = len(json.load(open(tmp_path / "ray" / "manifest.json"))["shards"])
    assert f"({shards} shards;" in err  # the last stage's line


@requires("ray")
def test_ray_engine_with_two_workers_survives_a_killed_worker(mixed, tmp_path, monkeypatch):
    """Unit 2's first task kills its worker process (os._exit, as a lost node): Ray runs the task again and the
    run ends in the local engine's bytes."""
    inputs, root = mixed
    marker = tmp_path / "killed"
    monkeypatch.setenv("FLORENCE_CURATE_KILL_UNIT", f"2:{marker}")
    assert _run(inputs, tmp_path / "ray", "--engine", "ray", "--num-workers", "2", "--unit-rows", "3") == 0
    assert marker.exists(), "the worker was not killed"
    assert_same_outputs(root / "local", tmp_path / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires("ray")
def test_ray_engine_with_four_workers_on_a_cluster_address(mixed, tmp_path):
    """A Ray cluster started apart (``ray start --head``, as on a cluster's head node, in another directory) joined
    with --ray-address, the inputs and the output given relative to the driver's directory."""
    inputs, root = mixed
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    # token authentication on both sides (Ray 2.60's default for `ray start`): the driver reads the token `ray start`
    # left in ~/.ray when Ray is imported, hence a process of its own
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    elsewhere = tmp_path / "elsewhere"  # the cluster's working directory is not the driver's
    elsewhere.mkdir()
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120,
                   cwd=elsewhere)  # fmt: skip
    relative = [os.path.relpath(p, tmp_path) for p in inputs]  # relative to the driver's directory only
    cmd = [sys.executable, "-m", "florence.data.curate", "--input", *relative, "--out", "ray", "--min-size", "32",
           "--shard-size", "3", "--quiet", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
           "--num-workers", "4", "--unit-rows", "2"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=dict(env, PYTHONPATH=ROOT),
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert_same_outputs(root / "local", tmp_path / "ray", paths_as_given=("out", "input"))
    assert not os.listdir(elsewhere)


@requires("ray")
def test_killed_ray_run_restarts_to_the_same_bytes(mixed, tmp_path):
    """The whole run (driver and the local Ray it started) killed once the first shard is on disk; the same command
    again reuses the analysis cache and the finished shards and ends in the local engine's bytes."""
    inputs, root = mixed
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "florence.data.curate", "--input", *inputs, "--out", str(out), "--min-size", "32",
           "--shard-size", "3", "--quiet", "--engine", "ray", "--num-workers", "1", "--unit-rows", "4"]  # fmt: skip
    env = dict(os.environ, FLORENCE_CURATE_SHARD_DELAY="2", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not list(out.glob("shard-*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in out.glob("shard-*.tar"))
    assert written and not (out / "manifest.json").exists()
    assert len(written) < len(json.load(open(root / "local" / "manifest.json"))["shards"])
    before = {n: (out / n).stat().st_mtime_ns for n in written}
    assert subprocess.run(cmd, env=dict(env, FLORENCE_CURATE_SHARD_DELAY="0"), cwd=ROOT, timeout=600).returncode == 0
    assert {n: (out / n).stat().st_mtime_ns for n in written} == before  # finished shards are not written again
    assert_same_outputs(root / "local", out)


@requires("ray")
def test_a_ray_run_again_after_the_inputs_changed_reads_them_again(tmp_path):
    """The same command into the same folder after a CSV caption was edited and a JSONL line appended: the result is
    a fresh local run's on the new inputs (the analysis cache is reused only where a row's image path is the same,
    shards are kept only where their JSON is the one due)."""
    jsonl = build_messy_dataset(tmp_path)
    _noise_image(str(tmp_path / "img" / "csv.jpg"), 31)
    _noise_image(str(tmp_path / "img" / "appended.jpg"), 32)
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("image,caption\nimg/csv.jpg,first words\n")
    inputs = [jsonl, str(tmp_path / "pairs.csv")]
    assert _run(inputs, tmp_path / "ray", "--engine", "ray", "--num-workers", "2", "--unit-rows", "8") == 0
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("image,caption\nimg/csv.jpg,other words now\n")
    with open(jsonl, "a") as f:
        f.write(json.dumps({"image": "img/appended.jpg", "caption": "an appended line"}) + "\n")
    assert _run(inputs, tmp_path / "ray", "--engine", "ray", "--num-workers", "2", "--unit-rows", "8") == 0
    assert _run(inputs, tmp_path / "local") == 0
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    labels = json.load(open(tmp_path / "ray" / "labels.json"))
    assert "other words now" in labels and "an appended line" in labels and "first words" not in labels


@requires("open_clip")
def test_a_run_with_another_seed_into_the_same_folder_writes_its_own_shards(tmp_path):
    jsonl = build_messy_dataset(tmp_path)
    assert _run([jsonl], tmp_path / "out") == 0
    assert _run([jsonl], tmp_path / "out", "--seed", "1") == 0
    assert _run([jsonl], tmp_path / "fresh", "--seed", "1") == 0
    assert_same_outputs(tmp_path / "fresh", tmp_path / "out")


def test_jsonl_lines_nested_too_deeply_and_huge_csv_fields(tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100000 + "\n" + json.dumps({"image": "a.jpg", "caption": "x"}) + "\n")
    records = curate.read_inputs([str(tmp_path / "deep.jsonl")])
    assert records[0] == {"bad": "invalid JSON (nested too deeply)", "source": "deep.jsonl:1"} and len(records) == 2
    (tmp_path / "huge.csv").write_text("image,caption\na.jpg," + "x" * 200000 + "\n")
    with pytest.raises(curate.InputError, match=r"huge.csv: CSV line 2: field larger than field limit"):
        curate.read_inputs([str(tmp_path / "huge.csv")])
