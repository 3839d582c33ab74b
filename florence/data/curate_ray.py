"""Curation on Ray Data (issue 19): ``python -m florence.data.curate --engine ray`` runs ``florence.data.curate``'s
pipeline as distributed stages and writes the same bytes as the local engine (shards, DALI index files, manifest,
labels, stats, summary, plots), whatever the number of workers or where tasks run (paths are made absolute on the
driver: a cluster's tasks run in the directory where ``ray start`` ran).

    python -m florence.data.curate --engine ray --input crawl/*.parquet --out DIR [--num-workers N]
        [--ray-address HOST:6379 | ray://HOST:10001] [--unit-rows 10000] [the local engine's filters and options]

Without --ray-address a local Ray starts by itself (--num-workers CPUs, default all); with it the same code runs on
that cluster, whose nodes must have this package installed and see --input and --out under the same paths (a shared
file system, as on a Slurm or Kubernetes cluster with NFS or Lustre; a cluster with token authentication, the
default of ``ray start`` in Ray 2.60, needs RAY_AUTH_MODE=token and its token on the driver, else ClusterError says
so). Groupby and sort use Ray's pull-based sort shuffle. Stages, each a Ray Data job, each announced on stderr:

1. read + analyse (``Dataset.map`` over read units, ``curate.plan_inputs``): each task reads its unit's records
   (``curate.read_unit``: JSONL byte ranges, folder slices, Parquet row groups, CSV files), decodes, checks and
   hashes their images (``curate.analyse``), normalises their captions, and writes the unit's stage table
   DIR/.work/ray/stage1/unit-*.parquet and its analysis cache DIR/.work/ray/cache-*.parquet atomically (a run
   reads the inputs again and reuses a cached analysis where the row's image path is the same, the local engine's
   rule for its analysis.jsonl). Paths travel as bytes and captions as JSON text: Arrow strings must be UTF-8 and
   file names need not be;
2. duplicates (the stage tables read by tasks -> ``map_batches`` -> ``groupby(bucket).map_groups``): every
   candidate (a record that
   passes the per-record filters, ``curate.precheck``) goes to one bucket per dHash band (the pigeonhole bands of
   ``curate.NearDuplicateIndex``; by SHA-256 when near duplicates are off); a bucket emits the pairs of its members
   within the threshold (copies of one hash chained, distinct hashes compared pairwise; a pair shared by several
   bands only from the lowest); the driver joins the pairs
   into connected components and resolves each with ``curate.Deduplicator`` in input order, which is what the local
   engine decides (a verdict depends only on kept images within the threshold, all in the component);
3. select (``Dataset.map`` over units): with the removed records (broadcast) and each unit's first sample index
   (a prefix sum of per-unit counts), each task numbers its kept records, cuts and augments their captions
   (``curate.caption_texts``) and writes its samples and caption rows;
4. labels (``groupby(label key).map_groups`` -> ``sort``): each text's first appearance (sample, caption) and its
   number of pairs; sorted by first appearance, a label id is the number of distinct first appearances before it
   (block offsets from per-block counts), which is the local engine's numbering; labels.json is written from the
   sorted label texts, one block at a time;
5. shards (``groupby(shard).map_groups``): each shard's task reads its samples and their label ids and writes the
   shard and its DALI index with ``curate.write_shard`` (the local engine's writer: same order, same bytes); shards
   a killed run already wrote are kept when every sample's JSON in them is the one due.

What the driver gathers, and why it is small: the read units (one small dict per file, row group or --unit-rows
lines), per-unit and per-block counts, the near pairs (one row per pair of images within the threshold, not per
image) and the removed records (one entry per duplicate), the shard list, and the label texts as they stream into
labels.json. No step collects all records, images or hashes in one place; a task holds one unit, one bucket, the
captions of one text or one shard.

Fault tolerance: a worker that dies (a killed process, a lost node) fails its task, which Ray runs again, at most
MAX_RETRIES times (stages are pure functions of their inputs and every file is written atomically, so a second
attempt writes the same bytes); a whole run killed and started again reuses the analysis cache and the finished
shards and ends in the same bytes as an uninterrupted run (tests/data/test_curate_ray.py kills both ways).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import types
from collections import Counter

import numpy as np

from florence.data import curate as C
from florence_kernels._io import atomic_write

ORDER_BITS = 32  # a record's order: unit << ORDER_BITS | row in the unit (units are far smaller than 2^32 rows)
CAPTION_BITS = 20  # a caption's position: sample index << CAPTION_BITS | caption number
KILL_ENV = "FLORENCE_CURATE_KILL_UNIT"  # test hook "K:MARKER": the first task of unit K kills its worker process


# --- workers --------------------------------------------------------------------------------------------------------


@functools.cache
def _tokenizer():
    from florence.tokenizer import get_tokenizer

    return get_tokenizer()


@functools.lru_cache(maxsize=1 << 16)  # captions repeat; bounded in long-lived workers
def _count_tokens(text: str) -> int:
    return len(_tokenizer().encode(text))


def _write_parquet(path: str, columns: dict, schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


# Text that may hold lone surrogates (file names that are not UTF-8, escaped JSON strings) never enters an Arrow
# string column, which must be valid UTF-8: paths travel as their bytes (os.fsencode), captions and label keys as
# their JSON text (ASCII, exact round trip).
def _stage1_schema():
    import pyarrow as pa

    return pa.schema([("order", pa.int64()), ("bad", pa.string()), ("image", pa.binary()), ("source", pa.string()),
                      ("caps", pa.string()), ("ncaps", pa.int32()), ("empty", pa.int32()), ("ok", pa.bool_()),
                      ("reason", pa.string()), ("w", pa.int64()), ("h", pa.int64()), ("sha", pa.string()),
                      ("phash", pa.uint64()), ("as_is", pa.bool_())])  # fmt: skip


ANALYSIS_FIELDS = ("ok", "reason", "w", "h", "sha", "phash", "as_is")


def _cache_schema():
    import pyarrow as pa

    fields = [f for f in _stage1_schema() if f.name in ANALYSIS_FIELDS]
    return pa.schema([("row", pa.int64()), ("image", pa.binary()), *fields])


def _analysis(row: dict) -> dict | None:
    """The analysis dict of an analysis-table row (``curate.analyse``'s fields that later steps read)."""
    if row["ok"] is None:
        return None
    if not row["ok"]:
        return {"ok": False, "reason": row["reason"]}
    return {"ok": True, "w": row["w"], "h": row["h"], "sha": row.get("sha"), "phash": row.get("phash")}


def _analyse_unit(row: dict, *, work: str, min_size: int, kill: str | None) -> dict:
    """Stage 1 for one unit: its records read again (so the table always holds the inputs as they are now), their
    images analysed or taken from the unit's analysis cache where the cached row has the same image path (the
    local engine's rule for its analysis.jsonl), the stage table written, and the unit's counts."""
    import pyarrow.parquet as pq

    k, spec = int(row["unit"]), row["spec"]
    records = C.read_unit(json.loads(spec))
    cache_path = os.path.join(work, f"cache-{k:06d}-{_digest(spec)}.parquet")
    cached = {}
    if os.path.exists(cache_path):
        cached = {c["row"]: c for c in pq.read_table(cache_path).to_pylist()}
    cols = {name: [] for name in _stage1_schema().names}
    cache = {name: [] for name in _cache_schema().names}
    fresh = False
    for r, rec in enumerate(records):
        caps, empty = C.prepare_captions(rec)
        image = os.fsencode(rec["image"]) if "image" in rec else None
        values = {"order": k << ORDER_BITS | r, "bad": rec.get("bad"), "image": image, "source": rec["source"],
                  "caps": json.dumps(caps), "ncaps": len(caps), "empty": empty}  # fmt: skip
        values |= dict.fromkeys(ANALYSIS_FIELDS)
        if image is not None and caps:  # records without a caption are removed before their image matters
            hit = cached.get(r)
            if hit is not None and hit["image"] == image:
                values |= {f: hit[f] for f in ANALYSIS_FIELDS}
            else:
                if kill and int(kill.split(":", 1)[0]) == k and not os.path.exists(kill.split(":", 1)[1]):
                    open(kill.split(":", 1)[1], "w").close()  # the first attempt dies; Ray runs the task again
                    os._exit(1)
                a = C.analyse(rec["image"])
                values |= {f: a.get(f) for f in ANALYSIS_FIELDS[:-1]}
                values["as_is"] = C.stored_as_is(a) if a["ok"] else None
                fresh = True
            cache["row"].append(r)
            for f in ("image", *ANALYSIS_FIELDS):
                cache[f].append(values[f])
        for name, v in values.items():
            cols[name].append(v)
    if fresh or not os.path.exists(cache_path):
        _write_parquet(cache_path, cache, _cache_schema())
    _write_parquet(_stage1_path(work, k), cols, _stage1_schema())
    candidates = sum(C.precheck(cols["bad"][i], [""] * cols["ncaps"][i], _analysis({f: cols[f][i] for f in cols}),
                                min_size)[0] == "candidate" for i in range(len(records)))  # fmt: skip
    return {"unit": k, "rows": len(records), "candidates": candidates}


def _digest(spec: str) -> str:
    return hashlib.sha256(f"{C.ANALYSIS_VERSION}:{spec}".encode()).hexdigest()[:16]


def _stage1_path(work: str, k: int) -> str:
    return os.path.join(work, "stage1", f"unit-{k:06d}.parquet")


def _buckets(batch, *, min_size: int, threshold: int):
    """Stage 2's map (Arrow batches: 64-bit hashes stay exact): one row per (candidate, band) with the band's bucket
    key (the SHA-256 when near duplicates are off)."""
    import pyarrow as pa

    out = {"bucket": [], "order": [], "sha": [], "phash": []}
    bands = C.NearDuplicateIndex(threshold).bands if threshold >= 0 else []
    for row in batch.to_pylist():
        if C.precheck(row["bad"], [""] * row["ncaps"], _analysis(row), min_size)[0] != "candidate":
            continue
        h = row["phash"]
        for key in [f"{b}:{(h >> s) & m}" for b, (s, m) in enumerate(bands)] or [f"sha:{row['sha']}"]:
            out["bucket"].append(key)
            out["order"].append(row["order"])
            out["sha"].append(row["sha"])
            out["phash"].append(h)
    return pa.table(out, schema=pa.schema([("bucket", pa.string()), ("order", pa.int64()), ("sha", pa.string()),
                                           ("phash", pa.uint64())]))  # fmt: skip


PAIR_COLUMNS = ("a", "a_sha", "a_phash", "b", "b_sha", "b_phash")


def _pairs(group, *, threshold: int):
    """Stage 2's reduce: the pairs of one bucket's members that are within the threshold, enough of them to connect
    every such pair: copies of one dHash chained in input order, distinct hashes compared pairwise (quadratic in
    the distinct hashes of a bucket: see the README's costs). A pair found in several bands is emitted by the
    lowest, so the driver receives each pair once."""
    import pyarrow as pa

    members = sorted((r["order"], r["sha"], r["phash"]) for r in group.to_pylist())
    by_hash: dict[int, list] = {}
    for m in members:
        by_hash.setdefault(m[2], []).append(m)
    bands = C.NearDuplicateIndex(threshold).bands if threshold >= 0 else []
    band = int(group.column("bucket")[0].as_py().split(":", 1)[0]) if bands else 0

    def lowest_shared_band(x, y):  # a pair shared by several bands is emitted by the lowest only
        return next(i for i, (s, m) in enumerate(bands) if (x >> s) & m == (y >> s) & m)

    pairs = []
    for copies in by_hash.values():
        if not bands or band == 0:  # equal hashes share every band (and SHA buckets are one per hash)
            pairs += list(zip(copies, copies[1:], strict=False))
    firsts = [copies[0] for copies in by_hash.values()]
    for i, a in enumerate(firsts):
        for b in firsts[i + 1 :]:
            if bands and bin(a[2] ^ b[2]).count("1") <= threshold and lowest_shared_band(a[2], b[2]) == band:
                pairs.append((a, b))
    out = {c: [] for c in PAIR_COLUMNS}
    for a, b in pairs:
        for c, v in zip(PAIR_COLUMNS, (*a, *b), strict=True):
            out[c].append(v)
    types_ = (pa.int64(), pa.string(), pa.uint64()) * 2
    return pa.table(out, schema=pa.schema(list(zip(PAIR_COLUMNS, types_, strict=True))))


def resolve_duplicates(pairs: list[dict], threshold: int) -> dict[int, str]:
    """{order: "duplicate" | "near_duplicate"} of the removed candidates, from the near pairs (rows "a", "a_sha",
    "a_phash", "b", ...): connected components (union-find), each resolved by ``curate.Deduplicator`` in input
    order."""
    parent: dict[int, int] = {}
    attrs: dict[int, tuple[str, int]] = {}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        for o, sha, ph in ((p["a"], p["a_sha"], p["a_phash"]), (p["b"], p["b_sha"], p["b_phash"])):
            parent.setdefault(int(o), int(o))
            attrs[int(o)] = (sha, int(ph))
        ra, rb = find(int(p["a"])), find(int(p["b"]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict[int, list[int]] = {}
    for o in parent:
        components.setdefault(find(o), []).append(o)
    removed = {}
    for nodes in components.values():
        dedup = C.Deduplicator(threshold)
        for o in sorted(nodes):
            verdict = dedup.check(*attrs[o])
            if verdict:
                removed[o] = verdict
    return removed


def _select_unit(row: dict, *, work: str, removed_ref, first_index: dict, options: dict) -> dict:
    """Stage 3 for one unit: its samples (numbered from ``first_index[unit]``) and caption rows, and its tallies."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    removed = ray.get(removed_ref)
    args = types.SimpleNamespace(**options)
    k = int(row["unit"])
    table = pq.read_table(_stage1_path(work, k)).to_pylist()
    tally = {"removed": Counter(), "corrupt": Counter(), "bad": Counter(), "empty": 0, "truncated": 0, "tokens": 0,
             "pairs": 0, "augmented": 0, "images": 0, "lengths": Counter()}  # fmt: skip
    samples = {"idx": [], "image": [], "as_is": [], "source": [], "captions": [], "augmented": []}
    captions = {"key": [], "pos": [], "text": []}
    idx = first_index[str(k)]
    for t in table:
        t["caps"] = json.loads(t["caps"])
        if len(t["caps"]) >= 1 << CAPTION_BITS:  # (never in practice: positions would collide)
            raise ValueError(f"{t['source']}: {len(t['caps'])} captions; at most {(1 << CAPTION_BITS) - 1} per image")
        status, reason = C.precheck(t["bad"], t["caps"], _analysis(t), args.min_size)
        if status == "candidate":
            status = removed.get(t["order"], status)
        if status not in ("bad_record", "empty_caption"):
            tally["empty"] += t["empty"]
        if status == "bad_record":
            tally["bad"][reason] += 1
        elif status == "corrupt":
            tally["corrupt"][reason] += 1
        if status != "candidate":
            tally["removed"][status] += 1
            continue
        texts = C.caption_texts(idx, t["caps"], args, _count_tokens)
        for j, (text, key, c, augmented, cut) in enumerate(texts):
            captions["key"].append(json.dumps(key))
            captions["pos"].append(idx << CAPTION_BITS | j)
            captions["text"].append(json.dumps(c))  # labels.json's own text for it
            n = _count_tokens(text)
            tally["tokens"] += n
            tally["lengths"][n] += 1
            tally["truncated"] += cut
            tally["augmented"] += augmented
        samples["idx"].append(idx)
        for f in ("image", "as_is", "source"):
            samples[f].append(t[f])
        samples["captions"].append(json.dumps([x[0] for x in texts]))
        samples["augmented"].append([x[3] for x in texts])
        tally["pairs"] += len(texts)
        tally["images"] += 1
        idx += 1
    sample_schema = pa.schema([("idx", pa.int64()), ("image", pa.binary()), ("as_is", pa.bool_()),
                               ("source", pa.string()), ("captions", pa.string()),
                               ("augmented", pa.list_(pa.bool_()))])  # fmt: skip
    caption_schema = pa.schema([("key", pa.string()), ("pos", pa.int64()), ("text", pa.string())])
    _write_parquet(os.path.join(work, "select", f"samples-{k:06d}.parquet"), samples, sample_schema)
    _write_parquet(os.path.join(work, "select", f"captions-{k:06d}.parquet"), captions, caption_schema)
    # Counters travel as [key, count] lists in first-seen order (the order the local engine's counters have)
    return {"unit": k, "tally": json.dumps({n: list(v.items()) if isinstance(v, Counter) else v
                                            for n, v in tally.items()})}  # fmt: skip


def _firsts(group):
    """Stage 4's reduce over one label key's captions: each caption with the key's first appearance, the key's
    pair count, and the label text on the first appearance's row only."""
    import pyarrow as pa

    pos = group.column("pos").to_numpy()
    at = int(np.argmin(pos))
    text = [""] * len(pos)
    text[at] = group.column("text")[at].as_py()
    n = len(pos)
    return pa.table({"pos": pos, "first": np.full(n, pos[at], dtype=np.int64),
                     "count": np.full(n, n, dtype=np.int64), "text": pa.array(text, pa.string())})  # fmt: skip


def _block_summary(table) -> tuple[int, int, int]:
    """(distinct first appearances, the block's first one, its last one; -1 when empty) of a sorted block."""
    first = table.column("first").to_numpy() if table.num_rows else np.zeros(0, dtype=np.int64)
    if not len(first):
        return 0, -1, -1
    return int(1 + np.count_nonzero(first[1:] != first[:-1])), int(first[0]), int(first[-1])


def _assign_ids(table, offset: int, continues: bool, shard_size: int):
    """(rows pos, id, shard; the block's label texts in id order; its [pairs per label] counts) of a sorted block
    whose first label id is ``offset`` (``continues``: its first rows belong to the previous block's last label)."""
    import pyarrow as pa

    first = table.column("first").to_numpy() if table.num_rows else np.zeros(0, dtype=np.int64)
    pos = table.column("pos").to_numpy() if table.num_rows else np.zeros(0, dtype=np.int64)
    new = np.ones(len(first), dtype=bool)
    new[1:] = first[1:] != first[:-1]
    if continues and len(new):
        new[0] = False
    ids = offset - 1 + np.cumsum(new)  # a new label at each change of first appearance
    heads = np.flatnonzero(pos == first)
    texts = [table.column("text")[int(i)].as_py() for i in heads]
    counts = [int(table.column("count")[int(i)].as_py()) for i in heads]
    rows = pa.table({"pos": pos, "id": ids.astype(np.int64), "shard": (pos >> CAPTION_BITS) // shard_size})
    return rows, texts, counts


def _write_shard_group(group: dict, *, work: str, out: str, units: list, shard_size: int, delay: float) -> dict:
    """Stage 5 for one shard: its samples (read from the units that hold them) with their label ids, written by
    ``curate.write_shard`` unless a killed run finished it."""
    import pyarrow.parquet as pq

    k = int(group["shard"][0])
    ids = dict(zip(group["pos"].tolist(), group["id"].tolist(), strict=True))
    lo, hi = k * shard_size, (k + 1) * shard_size
    samples = []
    for unit, first, n in units:
        if n and first < hi and lo < first + n:
            for s in pq.read_table(os.path.join(work, "select", f"samples-{unit:06d}.parquet")).to_pylist():
                if lo <= s["idx"] < hi:
                    texts = json.loads(s["captions"])
                    labels = [ids[s["idx"] << CAPTION_BITS | j] for j in range(len(texts))]
                    samples.append({"idx": s["idx"], "key": f"{s['idx']:09d}", "image": os.fsdecode(s["image"]),
                                    "as_is": s["as_is"], "captions": texts, "labels": labels,
                                    "augmented": s["augmented"], "source": s["source"]})  # fmt: skip
    samples.sort(key=lambda s: s["idx"])
    pairs = sum(len(s["captions"]) for s in samples)
    if C._shard_done(out, k, samples):
        res = C.shard_result(out, k, len(samples), pairs)
    else:
        res = C.write_shard((out, k, samples, delay))
    return {"shard": np.array([k]), "result": np.array([json.dumps(res)], dtype=object)}


MAX_RETRIES = 3


def _retries() -> dict:
    return {"max_retries": MAX_RETRIES}


def _bounded(method, fn, **kwargs):
    """``method(fn, **kwargs)`` (a Dataset's ``map`` / ``map_batches`` or a GroupedData's ``map_groups``) with at
    most MAX_RETRIES runs again of a task whose worker died. Ray Data's default is to retry forever, so a file
    that crashed its decoder every time would hang the run. Ray 2.60 (pinned) takes the limit as a remote argument
    (``ray_remote_args_fn`` here), deprecated for 2.64 with no named replacement yet: its warning is silenced
    here, the one place to change when Ray is upgraded. (Ray's own shuffle tasks for groupby and sort keep Ray's
    default: they run no code of ours.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
        return method(fn, ray_remote_args_fn=_retries, **kwargs)


def _read_files(batch, *, columns=None):
    """The Parquet files named in a batch's "path" column, as one table (the stage files are ours: read with
    pyarrow in the task rather than ``ray.data.read_parquet``, whose file listing imports fsspec's HTTP file system
    from several threads at once and fails where aiohttp is not installed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, columns=columns) for p in batch.column("path").to_pylist()])


def _parquet_dataset(data, files: list[str], columns=None):
    """A Ray dataset of the rows of ``files`` (one read task per file)."""
    paths = data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return _bounded(paths.map_batches, functools.partial(_read_files, columns=columns), batch_size=1,
                    batch_format="pyarrow")  # fmt: skip


# --- the driver -----------------------------------------------------------------------------------------------------


def _start_ray(args):
    """(ray, whether this call started it): joins --ray-address, or starts a local Ray with --num-workers CPUs
    (address="local": never a stale cluster a killed run left behind)."""
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    if ray.is_initialized():
        return ray, False
    common = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
              "configure_logging": True}  # fmt: skip
    if args.ray_address:
        try:
            ray.init(address=args.ray_address, **common)
        except ConnectionError as e:
            raise C.ClusterError(
                f"--ray-address {args.ray_address}: cannot join the Ray cluster ({str(e).splitlines()[-1][:300]}). "
                "A cluster started with token authentication (`ray start` prints 'Token authentication is "
                "enabled') needs RAY_AUTH_MODE=token here and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
            ) from e
    else:
        ray.init(address="local", num_cpus=args.num_workers or os.cpu_count() or 1, **common)
    return ray, True


def curate_ray(args) -> dict:
    """The Ray engine (module docstring): the same result dict as ``curate._curate_local`` ("shards", "stats",
    "lengths", "positives"), labels.json written."""
    from florence.optional import require

    require("ray", "florence.data.curate --engine ray")
    require("pyarrow", "florence.data.curate --engine ray")
    # absolute paths: tasks on a cluster run in the directory where `ray start` ran, not in the driver's
    units = C.plan_inputs([os.path.abspath(p) for p in args.input], args.unit_rows)
    ray, started = _start_ray(args)
    try:
        return _run(ray, args, units)
    finally:
        if started:
            ray.shutdown()


def _run(ray, args, units) -> dict:
    data = ray.data
    ctx = data.DataContext.get_current()
    ctx.enable_progress_bars = not args.quiet
    ctx.print_on_execution_start = False
    # Ray's pull-based sort shuffle for groupby and sort: measured here on the 20-record test set, 19 s a run
    # against 53 s with Ray 2.60's default (SHUFFLE_V2, whose aggregator actors cost seconds per job at any size)
    ctx.shuffle_strategy = data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines and CPU warnings: our own lines say more
    workers = args.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    out = os.path.abspath(args.out)
    work = os.path.join(out, ".work", "ray")
    for stage in ("stage1", "select"):  # rewritten by every run (the inputs are read again)
        shutil.rmtree(os.path.join(work, stage), ignore_errors=True)
        os.makedirs(os.path.join(work, stage))
    C._clean_temporary(work)
    specs = [json.dumps(u, sort_keys=True) for u in units]
    items = [{"unit": k, "spec": s} for k, s in enumerate(specs)]
    # a task whose worker dies is run again, at most MAX_RETRIES times (Ray Data's default is forever: a file that
    # crashes its decoder every time would hang the run)
    task = {"num_cpus": 1, "compute": data.TaskPoolStrategy(size=workers)}
    progress = _Progress(args.quiet, len(units))
    # 1. read + analyse
    progress.stage("read + decode + hash")
    summaries = []
    if items:
        ds = data.from_items(items, override_num_blocks=len(items))
        fn = functools.partial(_analyse_unit, work=work, min_size=args.min_size, kill=os.environ.get(KILL_ENV))
        summaries = sorted(_bounded(ds.map, fn, **task).take_all(), key=lambda r: r["unit"])
    inputs = sum(s["rows"] for s in summaries)
    files = [_stage1_path(work, k) for k in range(len(specs))]
    # 2. duplicates: bucket pairs on the cluster, components on the driver (one row per near pair)
    progress.stage("duplicates", f"{inputs} records")
    removed: dict[int, str] = {}
    if sum(s["candidates"] for s in summaries):
        cols = ["order", "bad", "ncaps", "ok", "reason", "w", "h", "sha", "phash"]
        bucket = functools.partial(_buckets, min_size=args.min_size, threshold=args.near_dup_threshold)
        buckets = _bounded(_parquet_dataset(data, files, cols).map_batches, bucket, batch_format="pyarrow")
        pair = functools.partial(_pairs, threshold=args.near_dup_threshold)
        grouped = buckets.groupby("bucket", num_partitions=workers)
        pairs = _bounded(grouped.map_groups, pair, batch_format="pyarrow").take_all()
        removed = resolve_duplicates(pairs, args.near_dup_threshold)
    # 3. select: number the kept records (prefix sums of per-unit counts), cut and augment their captions
    progress.stage("select", f"{len(removed)} duplicates removed")
    gone = Counter(o >> ORDER_BITS for o in removed)
    kept = [s["candidates"] - gone[s["unit"]] for s in summaries]
    starts = np.concatenate([[0], np.cumsum(kept)]).astype(int).tolist() if kept else [0]
    options = {k: getattr(args, k) for k in ("min_size", "max_tokens", "short_words", "seed")}
    tallies = []
    if items:
        fn = functools.partial(_select_unit, work=work, removed_ref=ray.put(removed), options=options,
                               first_index={str(k): starts[k] for k in range(len(items))})  # fmt: skip
        tallies = sorted(_bounded(data.from_items(items, override_num_blocks=len(items)).map, fn, **task).take_all(),
                         key=lambda r: r["unit"])  # fmt: skip
    info, totals = _merge_tallies(tallies)
    images = starts[-1]
    # 4. labels: first appearances, sorted; ids from per-block offsets; labels.json streamed
    progress.stage("labels", f"{starts[-1]} images kept")
    manifest_shards, label_counts, unique = [], Counter(), 0
    labels_path = os.path.join(out, "labels.json")
    if images:
        caps = _parquet_dataset(
            data, [os.path.join(work, "select", f"captions-{k:06d}.parquet") for k in range(len(items))]
        )
        grouped = caps.groupby("key", num_partitions=workers)
        ordered = _bounded(grouped.map_groups, _firsts, batch_format="pyarrow").sort("first").materialize()
        refs = ordered.to_arrow_refs()
        summary = ray.remote(_block_summary)
        blocks = ray.get([summary.remote(r) for r in refs])
        assign = ray.remote(num_returns=3)(_assign_ids)
        offset, last, id_refs, text_refs, count_refs = 0, None, [], [], []
        for ref, (distinct, first, end) in zip(refs, blocks, strict=True):
            continues = distinct > 0 and first == last
            r_rows, r_texts, r_counts = assign.remote(ref, offset, continues, args.shard_size)
            id_refs.append(r_rows)
            text_refs.append(r_texts)
            count_refs.append(r_counts)
            offset += distinct - (1 if continues else 0)
            last = end if distinct else last
        unique = offset

        def write_labels(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                n = 0
                for ref in text_refs:  # one block's texts at a time
                    for text in ray.get(ref):
                        f.write(("[\n " if n == 0 else ",\n ") + text)  # already JSON (select's)
                        n += 1
                f.write("\n]\n" if n else "[]\n")

        atomic_write(labels_path, write_labels)
        for ref in count_refs:
            label_counts.update(ray.get(ref))
        # 5. shards
        progress.stage("shards", f"{unique} labels")
        layout = [(k, starts[k], kept[k]) for k in range(len(items))]
        fn = functools.partial(_write_shard_group, work=work, out=out, units=layout, shard_size=args.shard_size,
                               delay=float(os.environ.get("FLORENCE_CURATE_SHARD_DELAY", "0")))  # fmt: skip
        grouped = data.from_arrow_refs(id_refs).groupby("shard", num_partitions=workers)
        rows = _bounded(grouped.map_groups, fn, batch_format="numpy").take_all()
        manifest_shards = [json.loads(r["result"]) for r in sorted(rows, key=lambda r: int(r["shard"]))]
    else:
        C._atomic_json(labels_path, [])
    stats = C.make_stats(inputs=inputs, images=images, pairs=totals["pairs"], unique_texts=unique,
                         tokens=totals["tokens"], sharing=sum(n * c for n, c in label_counts.items() if n > 1),
                         augmented=totals["augmented"], info=info)  # fmt: skip
    progress.stage(None, f"{len(manifest_shards)} shards")
    return {"shards": manifest_shards, "stats": stats, "lengths": totals["lengths"], "positives": label_counts}


class _Progress:
    """One line per stage on stderr (``--quiet``: none): its number, what the previous stage produced and how long
    it took. Ray Data draws a progress bar per operator under it where stderr is a terminal."""

    def __init__(self, quiet: bool, units: int):
        import time

        self.quiet, self.clock, self.k, self.t = quiet, time.perf_counter, 0, None
        if not quiet:
            print(f"curate (ray): {units} read units", file=sys.stderr, flush=True)

    def stage(self, name: str | None, previous: str = "") -> None:
        now = self.clock()
        if not self.quiet:
            done = f"  ({previous}; {now - self.t:.1f} s)" if self.t is not None else ""
            if done:
                print(done, file=sys.stderr, flush=True)
            if name:
                print(f"stage {self.k + 1}/5: {name}", file=sys.stderr, flush=True)
        self.k, self.t = self.k + 1, now


def _merge_tallies(tallies: list[dict]) -> tuple[dict, dict]:
    """The units' tallies summed in unit order (counters keep the local engine's first-seen key order)."""
    removed = Counter({k: 0 for k in C.REMOVED_KEYS})
    corrupt, bad, lengths = Counter(), Counter(), Counter()
    totals = {"empty": 0, "truncated": 0, "tokens": 0, "pairs": 0, "augmented": 0}
    for row in tallies:
        t = json.loads(row["tally"])
        for counter, name in ((removed, "removed"), (corrupt, "corrupt"), (bad, "bad"), (lengths, "lengths")):
            for key, n in t[name]:
                counter[key] += n
        for name in totals:
            totals[name] += t[name]
    info = {"removed": dict(removed), "corrupt_reasons": dict(corrupt), "bad_record_reasons": dict(bad),
            "empty_captions_dropped": totals["empty"], "truncated_captions": totals["truncated"]}  # fmt: skip
    totals["lengths"] = Counter({int(k): n for k, n in lengths.items()})
    return info, totals
