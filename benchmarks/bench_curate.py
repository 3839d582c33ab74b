"""Curation throughput: ``python -m florence.data.curate`` on a generated crawl of 20,000 image-text pairs (2,000
with --quick) in Parquet files of 2,000 rows (img2dataset's layout: one row group per file), with the rates of a
web crawl's problems: exact copies, near copies (re-encoded, brightened), corrupt and truncated files, tiny images,
missing files and null paths, empty captions, and captions shared by many pairs (alt texts repeat). Engines: local
(--workers 2) and Ray with 1 and 2 workers (a local Ray started by the run, as a user would run it on one machine).

    python -m benchmarks.bench_curate [--quick] [--reps 3] [--out DIR]

Each run is a fresh ``python -m florence.data.curate`` process into an empty folder (no analysis cache), the
engines interleaved round by round; ``items_per_s`` is input pairs per second of wall time (median over rounds).
Memory: every process of the run (the driver, its pool or Ray's workers and daemons) sampled every 0.1 s with
psutil; ``peak_mem_mb`` is the largest resident set of any one worker process, ``peak_driver_mb`` the driver's.
Every run's outputs are compared with the local engine's (``identical_to_local``). The crawl is generated once under
benchmarks/.cache/.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import harness

NAME = "curate"
REQUIRES = ("open_clip", "ray", "pyarrow")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
ROWS_PER_FILE = 2000
# the crawl's problems, as fractions of the pairs
RATES = {"exact_copy": 0.05, "near_copy": 0.03, "corrupt": 0.01, "truncated": 0.005, "tiny": 0.01, "missing": 0.005,
         "null_path": 0.005, "empty_caption": 0.01, "shared_caption": 0.35}  # fmt: skip
WORDS = ("dog cat car tree house river beach mountain city street bike boat flower bird child woman man table chair "
         "lamp book phone red blue green old new small large sunny snowy wooden glass").split()  # fmt: skip


def generate_crawl(n: int, seed: int = 0) -> str:
    """The crawl folder (images/, crawl-XXXX.parquet) of ``n`` pairs, built on first use."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = os.path.join(CACHE, f"crawl{n}")
    if os.path.exists(os.path.join(out, "done.json")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "images"))
    rng = np.random.default_rng(seed)
    pool = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))) for _ in range(max(50, n // 40))]
    paths, captions, kinds = [], [], []
    written = []  # (path, pixels) of the good images so far
    for i in range(n):
        name = f"images/{i:06d}.jpg"
        path = os.path.join(out, name)
        u = rng.random()
        edges = np.cumsum([RATES[k] for k in ("exact_copy", "near_copy", "corrupt", "truncated", "tiny", "missing",
                                              "null_path")])  # fmt: skip
        kind = ("exact_copy", "near_copy", "corrupt", "truncated", "tiny", "missing", "null_path", "good")[
            int(np.searchsorted(edges, u, side="right"))]  # fmt: skip
        if kind in ("exact_copy", "near_copy") and not written:
            kind = "good"
        if kind == "good" or kind == "tiny":
            side = 16 if kind == "tiny" else int(rng.integers(64, 129))
            cells = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(cells).resize((side, side), Image.NEAREST)
            img.save(path, format="JPEG", quality=90)
            if kind == "good":
                written.append((path, img))
        elif kind == "exact_copy":
            shutil.copyfile(written[int(rng.integers(len(written)))][0], path)
        elif kind == "near_copy":
            src = np.asarray(written[int(rng.integers(len(written)))][1]).astype(np.int16)
            Image.fromarray(np.clip(src + 3, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=75)
        elif kind == "corrupt":
            with open(path, "wb") as f:
                f.write(rng.bytes(400))
        elif kind == "truncated":
            data = open(written[int(rng.integers(len(written)))][0], "rb").read() if written else b""
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
        v = rng.random()
        if v < RATES["empty_caption"]:
            caption = "   "
        elif v < RATES["empty_caption"] + RATES["shared_caption"]:
            caption = pool[int(rng.integers(len(pool)))]
        else:
            caption = f"a photo of {' '.join(rng.choice(WORDS, size=int(rng.integers(3, 12))))} number {i}"
        paths.append(None if kind == "null_path" else name)
        captions.append(caption)
        kinds.append(kind)
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        part = slice(start, start + ROWS_PER_FILE)
        pq.write_table(pa.table({"image": paths[part], "caption": captions[part]}),
                       os.path.join(out, f"crawl-{f:04d}.parquet"))  # fmt: skip
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    with open(os.path.join(out, "done.json"), "w") as f:
        json.dump({"pairs": n, "kinds": counts, "rates": RATES}, f)
    return out


def _sample_memory(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Peak RSS (MB) per process of ``pid``'s tree until ``stop``; peaks[pid] is the driver's."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                rss = p.memory_info().rss / 2**20
                name = " ".join(p.cmdline())[:300]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rss > peaks.get(p.pid, (0, ""))[0]:
                peaks[p.pid] = (rss, name)
        stop.wait(0.1)


ENGINES = {"local": ["--engine", "local", "--workers", "2"],
           "ray_1worker": ["--engine", "ray", "--num-workers", "1", "--unit-rows", str(ROWS_PER_FILE)],
           "ray_2workers": ["--engine", "ray", "--num-workers", "2", "--unit-rows", str(ROWS_PER_FILE)]}  # fmt: skip


def _one_run(crawl: str, out: str, engine: str) -> dict:
    inputs = sorted(os.path.join(crawl, f) for f in os.listdir(crawl) if f.endswith(".parquet"))
    cmd = [sys.executable, "-m", "florence.data.curate", "--input", *inputs, "--out", out, "--quiet", *ENGINES[engine]]
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=_sample_memory, args=(proc.pid, stop, peaks), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=3600)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed: {stderr[-2000:]}")
    driver = peaks.pop(proc.pid, (0.0, ""))[0]
    workers = [rss for rss, name in peaks.values() if "gcs_server" not in name and "raylet" not in name]
    daemons = [rss for rss, name in peaks.values() if "gcs_server" in name or "raylet" in name]
    return {"seconds": seconds, "driver_mb": driver, "worker_mb": max(workers, default=0.0),
            "daemon_mb": max(daemons, default=0.0), "stats": json.loads(stdout.strip().splitlines()[-1])}  # fmt: skip


def _same_outputs(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.startswith("shard-")) + ["labels.json", "stats.json", "summary.txt"]
    if names[:-3] != sorted(n for n in os.listdir(b) if n.startswith("shard-")):
        return False
    for n in names:
        with open(os.path.join(a, n), "rb") as fa, open(os.path.join(b, n), "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def analyse_rate(side: int, images: int = 60) -> float:
    """Images per second of one core through ``curate.analyse`` (read, decode, upright, size, SHA-256, dHash) on
    photo-like JPEGs of ``side`` px (smooth gradients plus noise, quality 90): the first stage's per-core cost at
    the sizes crawls store (img2dataset's defaults: 256 or 384 px), for the cluster estimate."""
    import numpy as np
    from PIL import Image

    from florence.data import curate

    folder = os.path.join(CACHE, f"photos{side}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(side)
    paths = []
    for i in range(images):
        path = os.path.join(folder, f"{i:03d}.jpg")
        if not os.path.exists(path):
            y, x = np.mgrid[0:side, 0:side] / side
            base = np.stack([np.sin(6 * x * rng.random() + y), np.cos(5 * y * rng.random()), x * y], -1)
            pixels = np.clip(128 + 100 * base + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        paths.append(path)
    curate.analyse(paths[0])  # warm-up (imports)
    t0 = time.perf_counter()
    for p in paths:
        assert curate.analyse(p)["ok"]
    return images / (time.perf_counter() - t0)


def run(args) -> list[dict]:
    n = 2000 if args.quick else 20000
    reps = 1 if args.quick else getattr(args, "reps", 3)  # python -m benchmarks passes no --reps
    crawl = generate_crawl(n)
    env = harness.environment("cpu")
    times = {e: [] for e in ENGINES}
    memory = {e: [] for e in ENGINES}
    identical = {e: True for e in ENGINES}
    stats = None
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference")
        for r in range(reps):
            order = list(ENGINES)[r % len(ENGINES) :] + list(ENGINES)[: r % len(ENGINES)]  # interleaved, rotated
            for engine in order:
                out = os.path.join(tmp, f"{engine}-{r}")
                res = _one_run(crawl, out, engine)
                times[engine].append(res["seconds"])
                memory[engine].append(res)
                if engine == "local" and not os.path.exists(reference):
                    shutil.copytree(out, reference)
                    with open(os.path.join(out, "stats.json")) as f:
                        stats = json.load(f)
                print(f"  {engine} round {r}: {res['seconds']:.1f} s", file=sys.stderr)
        for engine in ENGINES:
            for r in range(reps):
                identical[engine] &= _same_outputs(reference, os.path.join(tmp, f"{engine}-{r}"))
    rows = []
    for engine, t in times.items():
        med = statistics.median(t)
        q = sorted(t)
        row = {"bench": NAME, "case": f"crawl{n}_parquet", "provider": engine, "mode": "full", "dtype": "n/a",
               "param_pairs": n, "param_files": -(-n // ROWS_PER_FILE), "param_reps": reps,
               "median_ms": med * 1e3, "p20_ms": q[len(q) // 5] * 1e3, "p80_ms": q[4 * len(q) // 5] * 1e3,
               "items_per_s": n / med, "peak_mem_mb": max(m["worker_mb"] for m in memory[engine]),
               "peak_driver_mb": max(m["driver_mb"] for m in memory[engine]),
               "peak_ray_daemon_mb": max(m["daemon_mb"] for m in memory[engine]),
               "identical_to_local": identical[engine], "kept_images": stats["images"] if stats else None,
               "removed": stats["removed"] if stats else None}  # fmt: skip
        rows.append(row | env)
    base = statistics.median(times["local"])
    for row in rows:
        row["speedup_vs_reference"] = base / (row["median_ms"] / 1e3)
    for side in (256, 384):  # stage 1's per-core cost at crawl image sizes (median of 3 passes)
        rate = statistics.median(analyse_rate(side) for _ in range(reps if reps > 1 else 1))
        ms = 1e3 / rate
        rows.append({"bench": NAME, "case": f"analyse_{side}px", "provider": "one_core", "mode": "forward",
                     "dtype": "n/a", "param_side": side, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                     "items_per_s": rate, "peak_mem_mb": None} | env)  # fmt: skip
    return rows


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--reps", type=int, default=3, help="rounds of the three engines (default 3; --quick: 1)")

    return harness.self_measured_main("benchmarks.bench_curate", argv, extra,
                                      ok=lambda rows: all(r.get("identical_to_local", True) for r in rows))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
