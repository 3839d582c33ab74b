"""Florence training, one loop for every task: DeepSpeed ZeRO, activation checkpointing, mixed precision, gradient
cache, DALI input.

    torchrun --nproc_per_node 2 -m florence.train --config configs/demo.yaml [--set key=value ...]
    torchrun --nproc_per_node 2 -m florence.train --config configs/video.yaml --init runs/demo
    deepspeed --num_gpus 8 -m florence.train --config configs/base.yaml       (any launcher that sets RANK etc.)

``task`` picks what is trained (florence.tasks: "pretrain", the default, described below; "video", Video CoSwin
classification; "detection", ATSS + Dynamic Head with COCO AP; "vqa", METER with VQA accuracy); every task shares
this module's config, engine, schedule, checkpoints and resume, progress, metrics, curves and evaluation at
intervals, and supplies its model, loader, loss and evaluator. ``--init PATH``
(config key ``init``) starts the task from a pretrained Florence: a ``save_pretrained`` folder or a run,
checkpoints folder or checkpoint tag of this module (florence.models.load_florence).

Without a GPU it runs on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, set here when no GPU is present) with
gloo. Config keys (YAML or JSON; ``--set a.b=v`` overrides, v parsed as YAML) and their defaults are in DEFAULTS.

One optimizer step takes ``batch_size`` image-text pairs in all (split over ranks: each rank its slice of the same
global batch). With ``chunk_size`` smaller than a rank's share, the step runs as a gradient cache (Gao et al.):
every chunk's embeddings without autograd, the UniCL loss over the whole batch (features and labels gathered
from every rank) and its gradient with respect to the embeddings and the logit scale, then every chunk again with
autograd (the same random state as its first pass), each backpropagating its slice of that gradient through
DeepSpeed (one micro-step per chunk, the optimizer at the last). Parameters are fp32; ``precision: bf16`` runs
the encoders under autocast (LayerNorm, softmax and the loss in fp32), ``fp16`` uses DeepSpeed's loss scaling
(GPU). AdamW without weight decay on norms, biases, position tables and the logit scale; linear warm-up, then
cosine.

Checkpoints (DeepSpeed's, per tag, plus every rank's random state) are complete before ``checkpoints/latest``
names them (written atomically): a kill never leaves a half-written checkpoint in use. Restarting with the same
config resumes from ``latest``: the data position is the step (the data order is a function of seed, epoch and
step), so the next step's loss equals the uninterrupted run's. Rank 0 shows a progress bar (loss, images/s, ETA),
appends metrics as JSON lines (``metrics.jsonl``: step, epoch, loss, ``lr`` = the learning rate that step ran at,
seconds, images/s), draws ``loss_curve.png`` and writes ``final_metrics.json``; zero-shot top-1/top-5 and
retrieval recall@1/5 on the held-out split at every eval interval and at the end. Text files are read and written
as UTF-8 whatever the locale.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

from florence_kernels._io import atomic_write, atomic_write_text

DEFAULTS = {
    "task": "pretrain",  # florence.tasks.TASKS: pretrain | video | detection | vqa
    "init": None,  # a pretrained Florence to start from (save_pretrained folder or a florence.train checkpoint)
    "model": "florence_cpu_demo",
    "model_overrides": {},
    "backend": None,  # florence_kernels backend for every op (None: automatic)
    "data": {"shards": None, "eval": None, "image_size": 64, "loader": "auto", "num_workers": 1},
    "batch_size": 128,  # image-text pairs per optimizer step, all ranks together
    "chunk_size": 0,  # gradient cache chunk per rank (0: no gradient cache)
    # lr_multipliers: {parameter-name prefix: factor on lr}, e.g. {"backbone.": 0.5} (build_engine's param_groups)
    "optimizer": {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "grad_clip": 5.0,
        "lr_multipliers": {},
    },
    "schedule": {"warmup_steps": 20, "min_lr_ratio": 0.0},
    "precision": "fp32",  # fp32 | bf16 | fp16
    "zero_stage": 0,
    "activation_checkpointing": False,
    "steps": 100,
    "eval_interval": 0,  # 0: only at the end
    "checkpoint_interval": 0,  # 0: only at the end
    "keep_checkpoints": 2,
    "seed": 0,
    "output_dir": "runs/florence",
    "resume": True,
    "log_interval": 1,
    # task "video" (florence.tasks.video): clips of `frames` frames `frame_stride` apart at data.image_size pixels
    "video": {
        "frames": 8,
        "frame_stride": 2,
        "window_size": None,
        "num_classes": None,
        "dropout": 0.5,
        "label_smoothing": 0.1,
        "frame_mode": "clip",
        "drop_path_rate": None,
        "head_init": "random",  # zero_shot (with init): the head starts as the text tower's zero-shot classifier
    },  # fmt: skip
    # task "detection" (florence.tasks.detection): ATSS + DyHead on CoSwin, images of data.image_size pixels
    "detection": {
        "fpn_channels": 256,
        "num_blocks": 6,
        "anchor_scale": 8.0,
        "topk": 9,
        "score_threshold": 0.05,
        "pre_nms_top_n": 1000,
        "nms_threshold": 0.6,
        "detections_per_image": 100,
        "drop_path_rate": None,
        "scale_range": [0.75, 1.25],  # training scale jitter around data.image_size
        "eval_size": None,  # test scale: held-out images resized to this longer side (None: data.image_size)
        "eval_annotations": "test.json",  # the COCO instances JSON in data.eval
        "eval_batch_size": 32,
    },  # fmt: skip
    # task "vqa" (florence.tasks.vqa): METER's co-attention fusion on both towers, images of data.image_size pixels
    "vqa": {
        "width": 768,  # METER's fusion: 768 wide, 12 heads, 6 co-attention layers per stream
        "heads": 12,
        "layers": 6,
        "mlp_ratio": 4.0,
        "dropout": 0.1,
        "question_only": False,  # the question-only baseline: no image tower, no cross-attention
        "drop_path_rate": None,
        "eval_annotations": "test.json",  # the VQA-format questions in data.eval
        "eval_batch_size": 64,
        # RoBERTa as the text stream, the paper's (florence.models.roberta): a local transformers folder (config.json,
        # weights, tokenizer files; never downloaded), its questions cut at max_text_len tokens (METER's 40); null:
        # Florence's text tower (from init, or from scratch)
        "roberta": None,
        "max_text_len": 40,
        "attn_backend": "sdpa",  # the fusion's attention; "flash_attn": flash-attn's varlen kernel (CUDA, installed)
    },
}


# --- configuration ----------------------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_load(text):
    """YAML (a str or a file) as PyYAML's safe loader reads it, except that numbers in exponent notation without a
    dot (``1e-3``, ``5E4``) are floats, as in YAML 1.2 and JSON; PyYAML's YAML 1.1 resolver makes them strings, so
    ``lr: 1e-3`` in a config or ``--set optimizer.lr=1e-3`` would reach the optimizer as the string "1e-3"."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))  # fmt: skip
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | None, overrides: list[str] = ()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        with open(path, encoding="utf-8") as f:
            user = yaml_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        unknown = set(user or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        cfg = _merge(cfg, user or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value (nested keys with dots: optimizer.lr=1e-3)")
        key, value = item.split("=", 1)
        if key.startswith("optimizer.lr_multipliers."):  # its keys are name prefixes, which hold dots themselves
            raise ValueError(f"--set {key}: give the whole mapping, e.g. --set 'optimizer.lr_multipliers="
                             f'{{"backbone.": 0.5}}\' (it replaces the configured one)')  # fmt: skip
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts[0] not in DEFAULTS:
            raise ValueError(f"--set {key}: unknown key {parts[0]!r}; known: {sorted(DEFAULTS)}")
        node[parts[-1]] = yaml_load(value)
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision: expected fp32, bf16 or fp16, got {cfg['precision']!r}")
    if cfg["zero_stage"] not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {cfg['zero_stage']!r}")
    from florence.tasks import get_task

    check_lr_multipliers(cfg["optimizer"].get("lr_multipliers"))
    get_task(cfg["task"]).check_config(cfg)  # ValueError naming the known tasks, or the task's key at fault
    if not cfg["data"].get("shards"):
        raise ValueError("data.shards: the curated shard folder (python -m florence.data.curate) is required")
    return cfg


# --- distributed set-up ------------------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int]:
    """DeepSpeed's process group (gloo on CPU, nccl on GPUs) from the launcher's RANK / WORLD_SIZE / MASTER_*; a
    plain ``python -m florence.train`` is a group of one. (rank, world_size)."""
    import socket

    from florence.optional import require

    deepspeed = require("deepspeed", "florence.train")

    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def cpu_supports_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class TrainWrapper(torch.nn.Module):
    """What DeepSpeed wraps: one module whose forward runs either tower or returns the scale, so that ZeRO-3 gathers
    the right parameters for each call (the logit scale lives on the root)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, what: str, x: torch.Tensor | None = None):
        if what == "image":
            return self.model.encode_image(x)
        if what == "text":
            return self.model.encode_text(x)
        return self.model.scale()


def lr_lambda(cfg):
    warm, total, floor = cfg["schedule"]["warmup_steps"], cfg["steps"], cfg["schedule"]["min_lr_ratio"]

    def f(step):
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def check_lr_multipliers(lr_multipliers) -> dict:
    """``optimizer.lr_multipliers`` checked: a mapping (or null) of parameter-name prefixes (str) to positive finite
    factors; returns it as a dict. ValueError naming the entry at fault."""
    if lr_multipliers is None:
        return {}
    if not isinstance(lr_multipliers, dict):
        raise ValueError(f"optimizer.lr_multipliers: expected a mapping of parameter-name prefix to factor, got "
                         f"{lr_multipliers!r}")  # fmt: skip
    for key, factor in lr_multipliers.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"optimizer.lr_multipliers: keys are parameter-name prefixes (non-empty str), got {key!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ValueError(f"optimizer.lr_multipliers[{key!r}]: expected a positive finite number, got {factor!r}")
    return dict(lr_multipliers)


def param_groups(wrapper, prefix: str, no_decay: set[str], lr: float, weight_decay: float,
                 lr_multipliers: dict) -> list[dict]:  # fmt: skip
    """AdamW's parameter groups over ``wrapper``'s parameters (the model inside it named ``prefix``): weight decay
    except on the names in ``no_decay``, and lr x the factor of the longest prefix in ``lr_multipliers`` (config
    ``optimizer.lr_multipliers``; prefixes of the parameter names in the model, e.g. {"backbone.": 0.5}) that the
    name starts with, else x 1; the schedule scales every group alike. Each group holds "lr_factor". Order: the
    unprefixed groups first (decayed, then not), then one pair per prefix in sorted order, so that a changed factor
    keeps the layout a checkpoint's optimizer state was saved with. The fine-tuning recipes of ViTDet, METER and
    DETR train a pretrained backbone slower than the new layers. ValueError (``check_lr_multipliers``) for a bad
    entry, or for a prefix that matches no parameter (a typo would silently train at the base lr)."""
    lr_multipliers = check_lr_multipliers(lr_multipliers)
    named = [(n, n[len(prefix) :] if n.startswith(prefix) else n, p) for n, p in wrapper.named_parameters()]
    for key in lr_multipliers:
        if not any(m.startswith(key) for _, m, _ in named):
            roots = sorted({m.split(".")[0] + "." for _, m, _ in named})
            raise ValueError(f"optimizer.lr_multipliers[{key!r}]: no parameter name starts with it (top-level "
                             f"modules: {roots})")  # fmt: skip
    groups: dict[tuple[str, bool], list] = {}
    for n, m, p in named:
        key = max((k for k in lr_multipliers if m.startswith(k)), key=len, default="")
        groups.setdefault((key, n in no_decay), []).append(p)
    out = []
    for key, plain in sorted(groups):
        factor = float(lr_multipliers[key]) if key else 1.0
        out.append({"params": groups[(key, plain)], "lr": lr * factor, "lr_factor": factor,
                    "weight_decay": 0.0 if plain else weight_decay})  # fmt: skip
    return out


def build_engine(cfg, model, world, device, wrapper=None, no_decay_names=None, lr_multipliers=None):
    """DeepSpeed's engine over ``wrapper`` (default: TrainWrapper(model)); AdamW without weight decay on
    ``no_decay_names`` (names in ``model``; default: model.no_weight_decay_names()), lr per ``param_groups`` with
    ``lr_multipliers`` (default: ``optimizer.lr_multipliers``; a task's ``Task.lr_multipliers``).
    Returns (engine, per-rank batch, chunk, group 0's lr factor). ValueError for a batch that does not split over
    the ranks and chunks, or a bad ``optimizer.lr_multipliers``."""
    from florence.optional import require

    deepspeed = require("deepspeed", "florence.train")

    per_rank = cfg["batch_size"] // world
    chunk = cfg["chunk_size"] or per_rank
    if cfg["batch_size"] % world or per_rank % chunk:
        raise ValueError(f"batch_size {cfg['batch_size']}: must split evenly over {world} ranks and into chunks of "
                         f"chunk_size {cfg['chunk_size']}")  # fmt: skip
    wrapper = TrainWrapper(model) if wrapper is None else wrapper
    names = model.no_weight_decay_names() if no_decay_names is None else no_decay_names
    prefix = next((f"{n}." for n, m in wrapper.named_modules() if m is model and n), "")
    no_decay = {prefix + n for n in names}
    o = cfg["optimizer"]
    multipliers = (o.get("lr_multipliers") or {}) if lr_multipliers is None else lr_multipliers
    groups = param_groups(wrapper, prefix, no_decay, o["lr"], o["weight_decay"], multipliers)
    optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ds = {
        "train_batch_size": cfg["batch_size"],
        "train_micro_batch_size_per_gpu": chunk,
        "gradient_accumulation_steps": per_rank // chunk,
        "gradient_clipping": o["grad_clip"],
        "zero_optimization": {"stage": cfg["zero_stage"]},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg["precision"] == "fp16":
        if device == "cpu":
            raise ValueError("precision fp16: DeepSpeed's loss-scaled fp16 needs a GPU; use bf16 or fp32 on CPU")
        ds["fp16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine, per_rank, chunk, groups[0]["lr_factor"]


# --- one step ----------------------------------------------------------------------------------------------------


def train_step(engine, images, tokens, labels, chunk, autocast, backend):
    """One optimizer step on this rank's slice of the global batch; returns the whole batch's loss (detached)."""
    import florence_kernels as fk
    from florence_kernels.gradcache import RngState

    def loss_fn(u, v, s):
        return fk.contrastive_loss(u.float(), v.float(), s, labels, backend=backend)

    n = images.shape[0]
    if chunk >= n:
        with autocast():
            u, v = engine("image", images), engine("text", tokens)
        loss = loss_fn(u, v, engine("scale"))
        engine.backward(loss)
        engine.step()
        return _global_mean(loss.detach())
    img_chunks, tok_chunks = images.split(chunk), tokens.split(chunk)
    devices = [images.device.index or 0] if images.is_cuda else []
    states, us, vs = [], [], []
    with torch.no_grad():
        for ic, tc in zip(img_chunks, tok_chunks, strict=True):
            states.append(RngState(devices))
            with autocast():
                us.append(engine("image", ic).float())
                vs.append(engine("text", tc).float())
        scale = engine("scale").detach()
    after = RngState(devices)
    u, v, s = torch.cat(us).requires_grad_(), torch.cat(vs).requires_grad_(), scale.requires_grad_()
    loss = loss_fn(u, v, s)
    gu, gv, gs = torch.autograd.grad(loss, [u, v, s])
    for i, (ic, tc, state) in enumerate(zip(img_chunks, tok_chunks, states, strict=True)):
        state.restore()
        with autocast():
            ui, vi = engine("image", ic), engine("text", tc)
        sl = slice(i * chunk, i * chunk + ic.shape[0])
        surrogate = (ui.float() * gu[sl]).sum() + (vi.float() * gv[sl]).sum()
        if i == len(img_chunks) - 1:
            surrogate = surrogate + gs * engine("scale")
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    after.restore()
    return _global_mean(loss.detach())


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    from florence.tasks import global_mean

    return global_mean(x)


# --- evaluation --------------------------------------------------------------------------------------------------


def load_eval_set(folder: str, image_size: int):
    """(images (N, 3, S, S) normalised, labels (N,), class names, captions, caption -> image index) from a folder
    with test.jsonl ({"image", "label", optional "captions"}) and classes.json ({"classes": [...]})."""
    import numpy as np
    from PIL import Image

    from florence.data.curate import native_path, to_rgb8, upright
    from florence.data.loader import MEAN, STD

    with open(os.path.join(folder, "classes.json"), encoding="utf-8") as f:
        classes = json.load(f)["classes"]
    images, labels, captions, owner = [], [], [], []
    with open(os.path.join(folder, "test.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            with Image.open(os.path.join(folder, native_path(row["image"]))) as img:
                img = to_rgb8(upright(img)).resize((image_size, image_size), Image.BILINEAR)
                images.append(np.asarray(img))
            labels.append(int(row["label"]))
            for c in row.get("captions", []):
                captions.append(c)
                owner.append(len(images) - 1)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels), classes, captions, torch.tensor(owner, dtype=torch.long)


@torch.no_grad()
def evaluate(engine, eval_set, context_length, autocast, device) -> dict:
    """Zero-shot top-1/top-5 (prompt ensembles) and retrieval recall@1/5 on the held-out split. Every rank runs it
    (ZeRO-3 needs all ranks in every forward); the results are identical."""
    from florence.eval import TEMPLATES, retrieval_recall, topk_accuracy
    from florence.tokenizer import get_tokenizer

    images, labels, classes, captions, owner = eval_set
    tok = get_tokenizer(context_length)
    was_training = engine.module.training
    engine.module.eval()
    with autocast():
        img = torch.cat([engine("image", images[i : i + 256].to(device)).float() for i in range(0, len(images), 256)])
        weights = []
        for name in classes:
            t = engine("text", tok([tmpl.format(name) for tmpl in TEMPLATES]).to(device)).float()
            weights.append(torch.nn.functional.normalize(torch.nn.functional.normalize(t, dim=-1).mean(0), dim=0))
        out = {f"zero_shot_{k}": v for k, v in topk_accuracy(img @ torch.stack(weights).T, labels.to(device)).items()}
        if captions:
            txt = torch.cat([engine("text", tok(captions[i : i + 256]).to(device)).float()
                             for i in range(0, len(captions), 256)])  # fmt: skip
            out.update(retrieval_recall(img, txt, owner.to(device), ks=(1, 5)))
    engine.module.train(was_training)
    return out


# --- checkpoints -------------------------------------------------------------------------------------------------


def save_checkpoint(engine, ckpt_dir, step, rank, world, keep):
    tag = f"step{step:07d}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
    rng_path = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    atomic_write(rng_path, lambda tmp: torch.save(rng, tmp))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and t != tag)
        import shutil

        for old in tags[: max(len(tags) - (keep - 1), 0)]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()


def load_checkpoint(engine, ckpt_dir, rank) -> int:
    """The step to continue from (0 without a checkpoint)."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        return 0
    with open(latest, encoding="utf-8") as f:
        tag = f.read().strip()
    _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if client is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    rng = torch.load(os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(client["step"])


# --- metrics ---------------------------------------------------------------------------------------------------------


class Metrics:
    """JSON lines in output_dir/metrics.jsonl (rank 0); on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: str, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if _line_step(line) is not None and _line_step(line) <= resume_step]
            atomic_write_text(path, "".join(kept))

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()


def _line_step(line):
    try:
        return json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None


def plot_loss(metrics_path: str, out_path: str, eval_key: str = "zero_shot_top1", loss_label: str = "UniCL loss"
              ) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r[eval_key]) for r in rows if eval_key in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([t[0] for t in train], [t[1] for t in train], label=loss_label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        label = eval_key.replace("_", " ").replace("top1", "top-1")
        ax2.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:green", label=label)
        ax2.set_ylabel(label)
        ax2.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# --- the run ---------------------------------------------------------------------------------------------------------


def run(cfg: dict) -> dict:
    import contextlib

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world = init_distributed(device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.manual_seed(cfg["seed"])
    from florence.tasks import get_task

    task = get_task(cfg["task"])(cfg, device)

    out_dir = cfg["output_dir"]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    if world > 1:
        torch.distributed.barrier()
    precision = cfg["precision"]
    if precision == "bf16" and device == "cpu" and not cpu_supports_bf16():
        if rank == 0:
            print("precision bf16: this CPU has no bf16 instructions (avx512_bf16 / amx); running fp32", flush=True)
        precision = "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": None, "fp32": None}[precision]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device, dtype=amp_dtype)

    model = task.build_model()
    model.set_grad_checkpointing(bool(cfg["activation_checkpointing"]))
    engine, per_rank, chunk, lr_factor = build_engine(cfg, model, world, device, task.wrap(model),
                                                      task.no_weight_decay(model), task.lr_multipliers())  # fmt: skip
    step = load_checkpoint(engine, ckpt_dir, rank) if cfg["resume"] else 0
    loader = task.make_loader(rank, world, per_rank)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg['batch_size']}: larger than one epoch of {cfg['data']['shards']}")
    eval_set = task.load_eval()
    metrics = Metrics(os.path.join(out_dir, "metrics.jsonl"), step, rank == 0)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg["steps"], initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    engine.train()
    t_start, seen, last_eval = time.time(), 0, {}
    delay = float(os.environ.get("FLORENCE_TRAIN_STEP_DELAY", "0"))  # test hook: widen the window for a kill
    while step < cfg["steps"]:
        epoch, start = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        for batch in loader.iterate(start):
            if step >= cfg["steps"]:
                break
            t0 = time.time()
            # the base rate this step runs at (group 0's over its lr_multipliers factor); train_step steps the
            # scheduler to the next one
            lr = engine.get_lr()[0] / lr_factor
            loss = task.train_step(engine, batch, chunk, autocast)
            step += 1
            if delay:
                time.sleep(delay)
            dt = time.time() - t0
            seen += cfg["batch_size"]
            ips = seen / (time.time() - t_start)
            if step % cfg["log_interval"] == 0 or step == cfg["steps"]:
                metrics.log(step=step, epoch=epoch, loss=loss.item(), lr=lr, step_seconds=dt,
                            **{f"{task.unit}_per_s": ips})  # fmt: skip
            if bar is not None:
                bar.set_postfix(
                    {"loss": f"{loss.item():.3f}", {"images": "img_s"}.get(task.unit, f"{task.unit}_s"): f"{ips:.0f}"}
                )
                bar.update(1)
            if (
                eval_set is not None
                and cfg["eval_interval"]
                and step % cfg["eval_interval"] == 0
                and step < cfg["steps"]
            ):
                last_eval = task.evaluate(engine, eval_set, autocast)
                metrics.log(step=step, **last_eval)
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in last_eval.items()))
            if cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step < cfg["steps"]:
                save_checkpoint(engine, ckpt_dir, step, rank, world, cfg["keep_checkpoints"])
    if bar is not None:
        bar.close()
    save_checkpoint(engine, ckpt_dir, step, rank, world, cfg["keep_checkpoints"])
    final = {"step": step, "train_seconds": round(time.time() - t_start, 1), "world_size": world,
             "precision": precision, "zero_stage": cfg["zero_stage"],
             "peak_rss_mb_per_rank": _peak_rss_per_rank(world)}  # fmt: skip
    final["task"] = cfg["task"]
    if eval_set is not None:
        scores = task.evaluate(engine, eval_set, autocast)
        final.update(scores)
        metrics.log(step=step, **scores)
    if rank == 0:
        final["metrics"] = os.path.join(out_dir, "metrics.jsonl")
        plot_loss(final["metrics"], os.path.join(out_dir, "loss_curve.png"), task.eval_key,
                  "UniCL loss" if cfg["task"] == "pretrain" else "loss")  # fmt: skip
        final["loss_curve"] = os.path.join(out_dir, "loss_curve.png")
        with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as f:
            final["checkpoint"] = os.path.join(ckpt_dir, f.read().strip())
        atomic_write_text(os.path.join(out_dir, "final_metrics.json"), json.dumps(final, indent=1) + "\n")
    return final


def _peak_rss_per_rank(world: int) -> list[float]:
    import resource

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    if world == 1:
        return [round(mine, 1)]
    out = [None] * world
    torch.distributed.all_gather_object(out, round(mine, 1))
    return out


def _loader_kind(name: str) -> str:
    from florence.data.loader import dali_available

    if name == "auto":
        return "dali" if dali_available() is None else "torch"
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML or JSON file (keys: see florence.train.DEFAULTS)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optimizer.lr=1e-3")
    p.add_argument(
        "--init",
        default=None,
        metavar="PATH",
        help="start from a pretrained Florence: a save_pretrained folder or a florence.train run/checkpoint",
    )
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set + ([f"init={args.init}"] if args.init else []))
    from florence.optional import MissingOptionalDependency, require
    from florence.tasks import get_task

    task = get_task(cfg["task"])
    try:  # before any process group or data: a missing package is one line, not a traceback per rank
        for name in task.requires:
            require(name, "florence.train" if name == "deepspeed" else f"florence.train (task {cfg['task']})")
    except MissingOptionalDependency as e:
        print(f"florence.train: {e}", file=sys.stderr)
        return 2
    final = run(cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        for line in task(cfg, "cpu").report(final):
            print(line)
        print(f"loss curve: {final['loss_curve']}")
        print(f"checkpoint: {final['checkpoint']}")
        print(f"final metrics: {os.path.join(cfg['output_dir'], 'final_metrics.json')}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
