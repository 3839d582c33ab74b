"""florence.data.loader: the same tests on the DALI and the PyTorch paths over shards curated here: batch shapes
and dtypes, labels and token ids equal to the sample's chosen caption, two ranks cover the data exactly once,
deterministic for a seed, a new order per epoch, evaluation mode."""

import json
import os
import tarfile

import pytest
import torch

import florence
from florence.data import curate
from florence.data.loader import dali_available, make_loader, pick_caption
from tests.conftest import requires
from tests.data.test_curate import _noise_image

pytestmark = requires("open_clip")  # the tokenizer

BACKENDS = ["torch"] + (["dali"] if dali_available() is None else [])
N = 23  # not a multiple of the batch or of two ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(N):
            _noise_image(str(root / f"{i}.jpg"), 100 + i, size=48 + 8 * (i % 3))
            caps = [f"an image of pattern number {i % 5}", f"texture {i}"]
            f.write(json.dumps({"image": f"{i}.jpg", "captions": caps}) + "\n")
    curate.main(["--input", str(root / "pairs.jsonl"), "--out", str(root / "out"), "--shard-size", "5", "--workers",
                 "1", "--min-size", "32", "--quiet"])  # fmt: skip
    metas = {}
    for name in sorted(os.listdir(root / "out")):
        if name.endswith(".tar"):
            with tarfile.open(root / "out" / name) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        meta = json.load(tar.extractfile(m))
                        metas[meta["key"]] = meta
    assert len(metas) == N
    return str(root / "out"), metas


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_shapes_labels_and_tokens(shards, backend):
    data_dir, metas = shards
    loader = make_loader(data_dir, 4, 32, backend=backend, seed=3, dtype=torch.bfloat16, context_length=77)
    batches = _epoch(loader, epoch=1)
    assert len(batches) == len(loader) == 6
    tok = florence.get_tokenizer(77)
    for b in batches:
        n = len(b["keys"])
        assert b["images"].shape == (n, 3, 32, 32) and b["images"].dtype == torch.bfloat16
        assert b["tokens"].shape == (n, 77) and b["tokens"].dtype == torch.int64 and b["labels"].shape == (n,)
        for i, key in enumerate(b["keys"]):
            caption, label = pick_caption(metas[key], 3, 1)
            assert int(b["labels"][i]) == label and torch.equal(b["tokens"][i], tok(caption)[0])
        x = b["images"].float()
        assert x.abs().max() < 3.0 and x.std() > 0.3  # CLIP-normalised pixels
    assert sorted(k for b in batches for k in b["keys"]) == sorted(metas)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_cover_the_data_once(shards, backend):
    data_dir, metas = shards
    keys = []
    for rank in (0, 1):
        loader = make_loader(data_dir, 4, 32, backend=backend, rank=rank, world_size=2, seed=0)
        keys += [k for b in _epoch(loader) for k in b["keys"]]
    assert sorted(keys) == sorted(metas)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_for_a_seed_and_new_order_each_epoch(shards, backend):
    data_dir, _ = shards

    def run(seed, epoch):
        loader = make_loader(data_dir, 4, 32, backend=backend, seed=seed)
        return _epoch(loader, epoch)

    a, b, c = run(5, 0), run(5, 0), run(5, 1)
    for x, y in zip(a, b, strict=True):
        assert (
            x["keys"] == y["keys"] and torch.equal(x["images"], y["images"]) and torch.equal(x["tokens"], y["tokens"])
        )
    assert [k for x in a for k in x["keys"]] != [k for x in c for k in x["keys"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_is_in_order_and_drop_last(shards, backend):
    data_dir, metas = shards
    loader = make_loader(data_dir, 4, 32, backend=backend, train=False, drop_last=True)
    batches = _epoch(loader)
    assert len(batches) == N // 4
    keys = [k for b in batches for k in b["keys"]]
    assert keys == sorted(metas)[: len(keys)]


def test_bad_arguments(shards):
    data_dir, _ = shards
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size = 2, got 2"):
        make_loader(data_dir, 4, 32, rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend: expected 'auto', 'dali' or 'torch'"):
        make_loader(data_dir, 4, 32, backend="ffcv")
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        make_loader(os.path.dirname(data_dir), 4, 32, backend="torch")


def test_index_files_equal_dalis_wds2idx(shards, tmp_path):
    import shutil
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(sys.executable), "wds2idx")
    if not os.path.exists(tool) or shutil.which(tool) is None:
        pytest.skip("DALI's wds2idx is not installed")
    data_dir, _ = shards
    shard = os.path.join(data_dir, "shard-00001.tar")
    subprocess.run([tool, shard, str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert open(os.path.join(data_dir, "shard-00001.idx")).read() == (tmp_path / "ref.idx").read_text()


def test_global_batch_split_matches_one_process_and_resume_part_way(shards):
    data_dir, _ = shards
    one = make_loader(data_dir, 4, 32, backend="torch", seed=1, drop_last=True)
    ranks = [make_loader(data_dir, 2, 32, backend="torch", seed=1, rank=r, world_size=2, drop_last=True,
                         split="global_batch") for r in (0, 1)]  # fmt: skip
    a = _epoch(one)
    b0, b1 = _epoch(ranks[0]), _epoch(ranks[1])
    assert len(a) == len(b0) == len(b1) == N // 4
    for x, y, z in zip(a, b0, b1, strict=True):
        assert x["keys"] == y["keys"] + z["keys"]
        assert torch.equal(x["images"], torch.cat([y["images"], z["images"]]))
    tail = list(one.iterate(start_batch=3))
    assert [t["keys"] for t in tail] == [x["keys"] for x in a[3:]]
