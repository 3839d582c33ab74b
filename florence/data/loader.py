"""Input pipeline over curated shards (``florence.data.curate``): NVIDIA DALI, or a pure-PyTorch path with the same
output, for machines without DALI.

    loader = make_loader(data_dir, batch_size=64, image_size=224, rank=0, world_size=1, seed=0, backend="dali")
    loader.set_epoch(e)
    for batch in loader:  # {"images": (B, 3, S, S) float32 / bf16, "tokens": (B, 77) int64, "labels": (B,) int64,
        ...               #  "keys": [sample keys]}

Training (``train=True``): samples shuffled per epoch (seeded), random resized crop (area 0.6-1, aspect 3/4-4/3),
horizontal flip, CLIP's mean/std normalisation. Evaluation (``train=False``): shorter side resized to the image size,
centre crop, no shuffle. Each sample has several captions: one is drawn per epoch (seeded by seed, epoch and the
sample's key), tokenised on the CPU (CLIP BPE) and returned with its UniCL label; ``use_augmented=False`` draws only
among captions that are not prompt augmentations (stage 2), where a sample has any.

Sharding for distributed training: samples are split between ranks by position in the epoch's order (torch path:
rank r takes positions r, r + world_size, ...; DALI: its reader's contiguous split), so the ranks of one epoch see
every sample exactly once; ``drop_last`` drops the last incomplete batch. Deterministic for a given seed. The torch
path can also split each global batch (``split="global_batch"``): rank r takes the r-th slice of every batch of
batch_size x world_size consecutive samples, so that the ranks' batches of a step together hold the very samples
one process would take at that step (how training compares 2 ranks with 1). ``iterate(start_batch)`` resumes an
epoch part-way (training restarts from a checkpoint's data position).

- backend="dali": ``fn.readers.webdataset`` (with the curation's .idx files), ``fn.decoders.image`` (device
  "cpu" here with device_id=None, "mixed" on a GPU), ``fn.random_resized_crop``, ``fn.crop_mirror_normalize``.
- backend="torch": the shards' tar members read by offset (an index built once per shard), PIL decoding with the
  EXIF orientation applied (as DALI's decoder does; curated shards hold upright images already, shards written by
  other tools may not) and curation's ``to_rgb8`` (any PIL mode to 8-bit RGB), torchvision's functional
  crop/resize/flip, in ``num_workers`` DataLoader processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import torch

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data_dir: {data_dir} has no manifest.json (run python -m florence.data.curate)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def index_shard(path: str) -> list[tuple[str, int, int, int, int]]:
    """(key, jpg offset, jpg size, json offset, json size) for every sample of a shard, in order."""
    parts: dict[str, dict[str, tuple[int, int]]] = {}
    order = []
    with tarfile.open(path, encoding="utf-8") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = m.name.rsplit(".", 1)
            if key not in parts:
                parts[key] = {}
                order.append(key)
            parts[key][ext] = (m.offset_data, m.size)
    out = []
    for key in order:
        if "jpg" not in parts[key] or "json" not in parts[key]:
            raise ValueError(f"{path}: sample {key} lacks its .jpg or .json component")
        out.append((key, *parts[key]["jpg"], *parts[key]["json"]))
    return out


def _rng(seed: int, epoch: int, key: str, what: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}:{what}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pick_caption(meta: dict, seed: int, epoch: int, use_augmented: bool = True) -> tuple[str, int]:
    """(caption, label) drawn for this sample and epoch."""
    idx = list(range(len(meta["captions"])))
    if not use_augmented:
        plain = [i for i in idx if not meta["augmented"][i]]
        idx = plain or idx
    j = idx[int(_rng(seed, epoch, meta["key"], "caption").integers(len(idx)))]
    return meta["captions"][j], int(meta["labels"][j])


def crop_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop (torchvision's rule: 10 tries, then the centre)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    s = min(w, h)
    return (h - s) // 2, (w - s) // 2, s, s


class TorchPairs(torch.utils.data.Dataset):
    """The samples of one rank for one epoch, decoded and augmented; __getitem__ -> (image CHW float32, caption,
    label, key)."""

    def __init__(self, data_dir, image_size, rank, world_size, seed, train, use_augmented, split="interleave",
                 batch_size=1, drop_last=False):  # fmt: skip
        manifest = load_manifest(data_dir)
        if split not in ("interleave", "global_batch"):
            raise ValueError(f"split: expected 'interleave' or 'global_batch', got {split!r}")
        self.split, self.batch_size, self.drop_last = split, batch_size, drop_last
        self.data_dir, self.size, self.seed, self.train = data_dir, image_size, seed, train
        self.rank, self.world, self.use_augmented = rank, world_size, use_augmented
        self.entries = []  # (shard path, key, jpg offset, jpg size, json offset, json size), manifest order
        for sh in manifest["shards"]:
            path = os.path.join(data_dir, sh["path"])
            self.entries += [(path, *e) for e in index_shard(path)]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = np.arange(len(self.entries))
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.entries))
        if self.split == "interleave":
            self.positions = order[self.rank :: self.world]
        else:
            g = self.batch_size * self.world
            parts = []
            end = len(order) - len(order) % g if self.drop_last else len(order)  # only whole global batches
            for b0 in range(0, end, g):
                gb = order[b0 : b0 + g]
                parts.append(gb[self.rank * len(gb) // self.world : (self.rank + 1) * len(gb) // self.world])
            self.positions = np.concatenate(parts) if parts else order[:0]
        self.start = 0

    def __len__(self):
        return len(self.positions) - self.start

    def _read(self, path, offset, size):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        from florence.data.curate import to_rgb8, upright

        path, key, jo, js, mo, ms = self.entries[self.positions[self.start + i]]
        meta = json.loads(self._read(path, mo, ms))
        caption, label = pick_caption(meta, self.seed, self.epoch, self.use_augmented)
        with Image.open(io.BytesIO(self._read(path, jo, js))) as img:
            img = to_rgb8(upright(img))
            w, h = img.size
            if self.train:
                rng = _rng(self.seed, self.epoch, key, "image")
                top, left, ch, cw = crop_box(rng, w, h)
                img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
                if rng.uniform() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                s = self.size / min(w, h)
                img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BILINEAR)
                w, h = img.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                img = img.crop((left, top, left + self.size, top + self.size))
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        return TF.normalize(x, MEAN, STD), caption, label, key


class _Loader:
    """Common iteration: batches of images, tokens, labels and keys, per rank and epoch."""

    def __init__(self, batch_size, context_length, dtype, drop_last):
        from florence.tokenizer import get_tokenizer

        self.batch_size, self.dtype, self.drop_last = batch_size, dtype, drop_last
        self.tokenizer = get_tokenizer(context_length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return self.iterate(0)

    def _batch(self, images, captions, labels, keys):
        return {"images": images.to(self.dtype), "tokens": self.tokenizer(list(captions)),
                "labels": torch.as_tensor(labels, dtype=torch.long), "keys": list(keys)}  # fmt: skip


class TorchLoader(_Loader):
    def __init__(self, data_dir, batch_size, image_size, rank=0, world_size=1, seed=0, train=True, dtype=torch.float32,
                 context_length=77, use_augmented=True, drop_last=False, num_workers=0,
                 split="interleave"):  # fmt: skip
        super().__init__(batch_size, context_length, dtype, drop_last)
        self.dataset = TorchPairs(data_dir, image_size, rank, world_size, seed, train, use_augmented, split,
                                  batch_size, drop_last)  # fmt: skip
        self.num_workers = num_workers

    def __len__(self):
        self.dataset.set_epoch(self.epoch)
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def iterate(self, start_batch: int = 0):
        self.dataset.set_epoch(self.epoch)
        self.dataset.start = start_batch * self.batch_size
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                                         num_workers=self.num_workers, drop_last=self.drop_last,
                                         persistent_workers=False)  # fmt: skip
        for images, captions, labels, keys in dl:
            yield self._batch(images, captions, labels, keys)


class DaliLoader(_Loader):
    """The same batches from a DALI pipeline (decoding and augmentation in DALI; captions in Python)."""

    def __init__(self, data_dir, batch_size, image_size, rank=0, world_size=1, seed=0, train=True, dtype=torch.float32,
                 context_length=77, use_augmented=True, drop_last=False, num_threads=None, device_id=None):  # fmt: skip
        from florence.optional import require

        require("dali", "DaliLoader")
        super().__init__(batch_size, context_length, dtype, drop_last)
        manifest = load_manifest(data_dir)
        self.paths = [os.path.join(data_dir, s["path"]) for s in manifest["shards"]]
        idx = [os.path.splitext(p)[0] + ".idx" for p in self.paths]
        self.index_paths = idx if all(os.path.exists(p) for p in idx) else None
        self.size, self.rank, self.world, self.seed, self.train = image_size, rank, world_size, seed, train
        self.use_augmented, self.device_id = use_augmented, device_id
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        total = manifest["samples"]
        self.shard_samples = total * (rank + 1) // world_size - total * rank // world_size  # DALI's contiguous split
        self._pipes = {}

    def __len__(self):
        n = self.shard_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _pipeline(self, epoch):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed * 1000003 + epoch, prefetch_queue_depth=2)  # fmt: skip
        def pipe():
            jpg, meta = fn.readers.webdataset(paths=self.paths, index_paths=self.index_paths, ext=["jpg", "json"],
                                              shard_id=self.rank, num_shards=self.world, random_shuffle=self.train,
                                              seed=self.seed * 1000003 + epoch, pad_last_batch=True,
                                              missing_component_behavior="error", name="reader")  # fmt: skip
            images = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if self.train:
                images = fn.random_resized_crop(images, size=(self.size, self.size), random_area=CROP_AREA,
                                                random_aspect_ratio=CROP_RATIO)  # fmt: skip
                mirror = fn.random.coin_flip()
            else:
                images = fn.resize(images, resize_shorter=self.size)
                mirror = 0
            images = fn.crop_mirror_normalize(images, crop=(self.size, self.size), mirror=mirror,
                                              mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                              dtype=types.FLOAT, output_layout="CHW")  # fmt: skip
            return images, meta

        p = pipe()
        p.build()
        return p

    def iterate(self, start_batch: int = 0):
        pipe = self._pipeline(self.epoch)  # a fresh pipeline per epoch: its own shuffle and augmentation seeds
        remaining = self.shard_samples
        for step in range(len(self)):
            images, metas = pipe.run()
            n = min(self.batch_size, remaining)
            remaining -= n
            if step < start_batch:  # resuming part-way: DALI's reader cannot seek, the batches are drawn and dropped
                continue
            if self.device_id is not None:
                images = images.as_cpu()
            x = torch.from_numpy(np.asarray(images.as_array()))[:n]
            caps, labs, keys = [], [], []
            for i in range(n):
                meta = json.loads(bytes(np.asarray(metas.at(i))).decode())
                c, lab = pick_caption(meta, self.seed, self.epoch, self.use_augmented)
                caps.append(c)
                labs.append(lab)
                keys.append(meta["key"])
            if self.device_id is not None:
                x = x.cuda(self.device_id)
            yield self._batch(x, caps, labs, keys)
        del pipe


def dali_available() -> str | None:
    """None when DALI can be imported, else why not (``florence.optional.missing("dali")``)."""
    from florence.optional import missing

    return missing("dali")


def make_loader(data_dir: str, batch_size: int, image_size: int, *, backend: str = "auto", **kwargs):
    """A TorchLoader or DaliLoader; backend "auto" takes DALI where it imports."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
    rank, world = kwargs.get("rank", 0), kwargs.get("world_size", 1)
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world}, got {rank}")
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend: expected 'auto', 'dali' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() is None else "torch"
    if backend == "dali":
        reason = dali_available()
        if reason:
            raise RuntimeError(f"backend='dali': {reason}")
        kwargs.pop("num_workers", None)
        if kwargs.pop("split", "interleave") != "interleave":
            raise ValueError("split: the DALI loader splits by its reader's contiguous shards ('interleave' only)")
        return DaliLoader(data_dir, batch_size, image_size, **kwargs)
    kwargs.pop("num_threads", None)
    kwargs.pop("device_id", None)
    return TorchLoader(data_dir, batch_size, image_size, **kwargs)
